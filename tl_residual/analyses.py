"""The papers' corpus analyses: one call each, per knowledge type (``group``) and overall.

Every function here aggregates the tables of a dataset run (``tl_residual.study``; the columns are those of
docs/studies.md: ``parts``, ``layers``, ``stream``, ``query``, ``query_totals``, ``query_layers``, ``prompts`` and
a ``manifest`` dict) or, where the paper's quantity is not in those tables, recomputes it from the model and the
prompts. The query analyses (Tables 6, 7, 8 query side, 14, Figure 4) read the exact tables ``query_totals`` and
``query_layers`` (kind ``query``); a run without them is an error, never a sum of the per-value-neuron ``query``
rows (those are cut at ``query_top_k`` per value neuron). Any object with those
attributes works as ``results`` (a ``StudyResults``, a ``types.SimpleNamespace`` of DataFrames, ...).

Conventions:

* Per group and overall: every table has a ``group`` column; the row group ``"all"`` pools every prompt. Prompts
  without a group are in group ``"(none)"``.
* Averages are over the prompts of a group that the run scored successfully (``prompts.status == "ok"``; every
  prompt seen in the table if the run has no ``prompts`` table): a prompt with no row of a kind counts as 0.
* Scores are in the units of the method (nats for ``log_prob_increase``, neuron-level paper Eq. 13 /
  residual-stream paper Eq. 19).
* Layer labels follow the neuron-level paper: ``a{l}`` is layer ``l``'s attention, ``f{l}`` its FFN.
* Functions that have a figure in the paper return ``(DataFrame, plotly Figure)``; the others a DataFrame.

Sources: neuron-level paper = Yu & Ananiadou, "Neuron-Level Knowledge Attribution in Large Language Models";
residual-stream paper = Yu, Ananiadou et al., "Locating Factual Knowledge in Large Language Models: Exploring the
Residual Stream and Analyzing Subvalues in Vocabulary Space". Table, figure and equation numbers are theirs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd
import torch

from tl_residual import names
from tl_residual.errors import InvalidInputError

OVERALL = "all"
NO_GROUP = "(none)"
#: The three scorers of the neuron-level paper's Figure 2 (methods a, b, c of section 4.1).
FIGURE2_METHODS: tuple[str, ...] = ("log_prob_increase", "log_prob", "prob_increase")


# ----------------------------------------------------------------------------------------------
# Helpers: tables, groups, labels
# ----------------------------------------------------------------------------------------------


def _table(results: Any, attr: str, need: Sequence[str] = ()) -> pd.DataFrame:
    df = getattr(results, attr, None)
    if df is None or not isinstance(df, pd.DataFrame) or len(df) == 0:
        raise InvalidInputError(
            f"the study results have no {attr!r} rows; this analysis needs the run's {attr!r} "
            f"table (see docs/studies.md for the options that write it)"
        )
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InvalidInputError(f"the study's {attr!r} table lacks column(s) {', '.join(missing)}")
    return df


def _group_col(df: pd.DataFrame) -> pd.Series:
    if "group" not in df.columns:
        return pd.Series(NO_GROUP, index=df.index, dtype=object)
    return df["group"].astype(object).where(df["group"].notna(), NO_GROUP)


def _prompt_groups(results: Any, fallback: pd.DataFrame | None = None) -> pd.DataFrame:
    """``prompt_id, group`` of the prompts to average over (status ok)."""
    p = getattr(results, "prompts", None)
    if isinstance(p, pd.DataFrame) and len(p) and "prompt_id" in p.columns:
        if "status" in p.columns:
            p = p[p["status"].fillna("ok") == "ok"]
        out = pd.DataFrame({"prompt_id": p["prompt_id"].to_numpy(), "group": _group_col(p).to_numpy()})
    elif fallback is not None:
        out = pd.DataFrame({"prompt_id": fallback["prompt_id"].to_numpy(), "group": _group_col(fallback).to_numpy()})
    else:
        raise InvalidInputError("the study results have no 'prompts' table to count prompts with")
    return out.drop_duplicates("prompt_id").reset_index(drop=True)


def _group_order(groups: Iterable[Any]) -> list[str]:
    return sorted({str(g) for g in groups} - {OVERALL}) + [OVERALL]


def _per_prompt_mean(
    values: pd.DataFrame, keys: list[str], value_cols: list[str], prompts: pd.DataFrame
) -> pd.DataFrame:
    """Mean over each group's prompts (and over all prompts) of per-prompt values indexed by
    ``prompt_id`` + ``keys``; a prompt with no row for a key counts as 0. Adds ``n_prompts``."""
    values = values[values["prompt_id"].isin(prompts["prompt_id"])]
    frames = []
    gmap = prompts.set_index("prompt_id")["group"]
    pg = values["prompt_id"].map(gmap)
    for g in _group_order(prompts["group"]):
        ids = prompts["prompt_id"] if g == OVERALL else prompts.loc[prompts["group"] == g, "prompt_id"]
        n = len(ids)
        sub = values[pg == g] if g != OVERALL else values
        if keys:
            s = sub.groupby(keys, dropna=False)[value_cols].sum() / max(n, 1)
            s = s.reset_index()
        else:
            s = (sub[value_cols].sum() / max(n, 1)).to_frame().T
        s.insert(0, "n_prompts", n)
        s.insert(0, "group", g)
        frames.append(s)
    return pd.concat(frames, ignore_index=True)


def _method(df: pd.DataFrame, method: str | None) -> pd.DataFrame:
    if method is None or "method" not in df.columns:
        return df
    out = df[df["method"] == method]
    if len(out) == 0:
        raise InvalidInputError(f"no rows for method {method!r}; the run has {sorted(set(df['method']))}")
    return out


def _kind(df: pd.DataFrame, kinds: str | Sequence[str]) -> pd.DataFrame:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    out = df[df["kind"].isin(kinds)]
    if len(out) == 0:
        raise InvalidInputError(
            f"the study's parts table has no rows of kind {', '.join(kinds)} "
            f"(it has {sorted(set(df['kind']))}); run the study with those kinds"
        )
    return out


def layer_label(layer: int, sublayer: str) -> str:
    """The neuron-level paper's label: ``a{l}`` for layer ``l``'s attention, ``f{l}`` for its FFN."""
    return f"{'a' if sublayer == 'attn' else 'f'}{int(layer)}"


def _query_label(kind: str, layer: Any) -> str:
    if kind in ("embed", "pos_embed") or layer is None or pd.isna(layer) or int(layer) < 0:
        return "e"
    if kind in ("key_bias",):
        return "bias"
    return ("a" if str(kind).startswith(("attn", "head")) else "f") + str(int(layer))


def _run_option(results: Any, name: str) -> Any:
    """The run's option ``name`` (``manifest["options"]``; None when absent)."""
    return ((getattr(results, "manifest", None) or {}).get("options", {}) or {}).get(name)


def _stored_top_k(results: Any, kind: str) -> int | None:
    """The run's ``top_k`` for ``kind`` (``manifest["options"]["top_k"]``: an integer for the three neuron kinds,
    or a per-kind mapping as :func:`tl_residual.study.run` records it); ``None`` when every part of the kind was
    stored (no ``top_k``, ``"all"``, or the kind mapped to ``None``)."""
    top_k = _run_option(results, "top_k")
    if isinstance(top_k, dict):
        top_k = top_k.get(kind)
    elif isinstance(top_k, int) and kind == "head":
        top_k = None  # an integer top_k cuts the neuron kinds only (study.run)
    return None if top_k is None or top_k == "all" else int(top_k)


def _stored_all(results: Any, kind: str) -> bool:
    """Whether the run stored every part of ``kind`` (no ``top_k`` cut for it): needed for sums over all parts."""
    return _stored_top_k(results, kind) is None


def _figure() -> Any:
    import plotly.graph_objects as go

    return go.Figure()


def _layer_lines(out: pd.DataFrame, lines: dict[str, str], **layout: Any) -> Any:
    """A line chart of the overall group's rows by layer: one line per column of ``lines`` (column -> legend name),
    laid out with ``layout`` (plotly ``update_layout`` arguments)."""
    fig = _figure()
    s = out[out["group"] == OVERALL].sort_values("layer")
    for column, name in lines.items():
        fig.add_scatter(x=s["layer"], y=s[column], mode="lines+markers", name=name)
    fig.update_layout(**layout)
    return fig


def _layer_bars(out: pd.DataFrame, bars: dict[str, str], **layout: Any) -> Any:
    """A bar chart of the overall group's rows by layer: one bar series per column of ``bars`` (column -> legend
    name), laid out with ``layout`` (plotly ``update_layout`` arguments)."""
    fig = _figure()
    s = out[out["group"] == OVERALL].sort_values("layer")
    for column, name in bars.items():
        fig.add_bar(x=s["layer"], y=s[column], name=name)
    fig.update_layout(**layout)
    return fig


# ----------------------------------------------------------------------------------------------
# Neuron-level paper: layers and heads
# ----------------------------------------------------------------------------------------------


def layer_contributions(results: Any, method: str = "log_prob_increase") -> tuple[pd.DataFrame, Any]:
    """Neuron-level paper Table 3: the sum over layers of the attention layers' and of the FFN layers' scores.

    Per prompt, ``attn = sum_l Imp(A_l)`` and ``mlp = sum_l Imp(F_l)`` (each layer output scored against the
    residual it is added to, Eq. 13, from the run's ``layers`` table); averaged over the group's prompts.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, attn, mlp`` (nats for ``log_prob_increase``) and a grouped bar
        chart.

    Raises:
        InvalidInputError: no ``layers`` table or no rows for ``method``.
    """
    df = _method(_table(results, "layers", ["prompt_id", "sublayer", "score"]), method)
    wide = df.pivot_table(index="prompt_id", columns="sublayer", values="score", aggfunc="sum").reset_index()
    for c in ("attn", "mlp"):
        if c not in wide.columns:
            wide[c] = 0.0
    out = _per_prompt_mean(wide, [], ["attn", "mlp"], _prompt_groups(results, df))
    fig = _figure()
    for c, label in (("attn", "attention layers"), ("mlp", "FFN layers")):
        fig.add_bar(x=out["group"], y=out[c], name=label)
    fig.update_layout(
        title=f"Table 3: sum of {method} over attention / FFN layers",
        barmode="group",
        yaxis_title="nats" if "log" in method else method,
    )
    return out, fig


def top_layers(results: Any, k: int = 10, method: str = "log_prob_increase") -> pd.DataFrame:
    """Neuron-level paper Table 4: the ``k`` layers (``a_l`` attention, ``f_l`` FFN) with the largest mean score.

    Mean over the group's prompts of each layer output's score (``layers`` table).

    Returns:
        Columns ``group, rank, label, name, score`` (``rank`` 1 = best), ``k`` rows per group.
    """
    df = _method(_table(results, "layers", ["prompt_id", "name", "layer", "sublayer", "score"]), method)
    df = df.assign(label=[layer_label(l, s) for l, s in zip(df["layer"], df["sublayer"])])
    mean = _per_prompt_mean(
        df[["prompt_id", "label", "name", "score"]], ["label", "name"], ["score"], _prompt_groups(results, df)
    )
    return _top(mean, ["label", "name"], k)


def _top(mean: pd.DataFrame, cols: list[str], k: int) -> pd.DataFrame:
    if not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    frames = []
    for g in _group_order(mean["group"]):
        sub = mean[mean["group"] == g].sort_values("score", ascending=False, kind="stable").head(k)
        frames.append(sub.assign(rank=range(1, len(sub) + 1)))
    out = pd.concat(frames, ignore_index=True)
    return out[["group", "rank", *cols, "score"]]


def top_heads(results: Any, k: int = 10, method: str = "log_prob_increase") -> pd.DataFrame:
    """Neuron-level paper Table 10 (Appendix B): the ``k`` heads with the largest mean score.

    A head's score is that of its output at the last position (``parts`` rows of kind ``head``), averaged over the
    group's prompts (a prompt where the head was not stored counts 0: run the study with every head stored).

    Returns:
        Columns ``group, rank, name, layer, head, score``.
    """
    df = _kind(_method(_table(results, "parts", ["prompt_id", "kind", "name", "score"]), method), "head")
    mean = _per_prompt_mean(
        df[["prompt_id", "name", "layer", "head", "score"]],
        ["name", "layer", "head"],
        ["score"],
        _prompt_groups(results, df),
    )
    return _top(mean, ["name", "layer", "head"], k)


# ----------------------------------------------------------------------------------------------
# Neuron-level paper: neurons
# ----------------------------------------------------------------------------------------------


def neuron_importance(
    results: Any,
    ks: Sequence[int] = (100, 200),
    method: str = "log_prob_increase",
    kinds: Sequence[str] = ("attn_neuron", "ffn_neuron"),
) -> pd.DataFrame:
    """Neuron-level paper Tables 5 (Llama) and 12 (GPT2): sums of importance of all, positive and top-k neurons.

    Per prompt and kind (attention neurons ``L.H.d.p``, FFN neurons ``L.N``): ``all`` = sum of every neuron's
    score (the paper's "total importance": the sum of Eq. 13 over all neurons of the kind at the last position),
    ``positive`` = sum of the scores > 0, ``top{k}`` = sum of the ``k`` best; each averaged over the group's prompts
    that have rows of the kind.
    ``share_top{k} = top{k} / all`` is the share of the total importance held by the top-k (the paper's claim:
    the top-200 attention and top-100 FFN neurons hold about all of it, i.e. a share near or above 1; the
    positive sum is much larger, since helpful and unhelpful neurons cancel).

    ``all`` and ``positive`` need every neuron's score: when the run cut the parts at a ``top_k``
    (``manifest["options"]["top_k"]``), they and the shares are NaN (a sum over the stored rows would be wrong).

    Returns:
        Columns ``group, kind, n_prompts, all, positive, top{k}..., share_top{k}...`` (nats).

    Raises:
        InvalidInputError: no ``parts`` rows of ``kinds`` for ``method``.
    """
    df = _method(_table(results, "parts", ["prompt_id", "kind", "score", "rank"]), method)
    prompts = _prompt_groups(results, df)
    frames = []
    for kind in kinds:
        complete = _stored_all(results, kind)
        sub = _kind(df, kind)
        per = sub.groupby("prompt_id").agg(all=("score", "sum")).reset_index()
        per["positive"] = per["prompt_id"].map(sub[sub["score"] > 0].groupby("prompt_id")["score"].sum()).fillna(0.0)
        for k in ks:
            per[f"top{k}"] = per["prompt_id"].map(sub[sub["rank"] <= k].groupby("prompt_id")["score"].sum()).fillna(0.0)
        cols = ["all", "positive", *[f"top{k}" for k in ks]]
        # averaged over the prompts whose neurons of this kind the run scored (a run may score a subset)
        m = _per_prompt_mean(per, [], cols, prompts[prompts["prompt_id"].isin(sub["prompt_id"])])
        if not complete:
            m["all"] = float("nan")
            m["positive"] = float("nan")
        for k in ks:
            m[f"share_top{k}"] = m[f"top{k}"] / m["all"]
        m.insert(1, "kind", kind)
        frames.append(m)
    return pd.concat(frames, ignore_index=True)


def _value_unit(name: str) -> str:
    """Shared-neuron unit: FFN neurons by name, attention neurons without their source position (``L.H.d``)."""
    ref = names.parse(name)
    if ref.kind == "attn_neuron":
        return f"L{ref.layer}.H{ref.head}.d{ref.dim}"
    return name


def _top_units_value(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per prompt, the ``k`` best value units (FFN and attention neurons ranked together by score)."""
    d = df.sort_values(["prompt_id", "score"], ascending=[True, False], kind="stable")
    d = d.assign(unit=[_value_unit(n) for n in d["name"]]).drop_duplicates(["prompt_id", "unit"])
    return d.groupby("prompt_id", sort=False).head(k)[["prompt_id", "unit"]]


#: The study option (and CLI flag) giving how many value neurons of each kind kind ``query`` splits.
_QUERY_OPTION = {
    "ffn_neuron": ("query_values", "--query-values"),
    "attn_neuron": ("query_attn_values", "--query-attn-values"),
}


def _option_text(value_kind: str) -> str:
    option, flag = _QUERY_OPTION[value_kind]
    return f"{option} ({flag})"


def _query_table(results: Any, table: str, value_kind: str) -> pd.DataFrame:
    """The rows of the study's exact query table ``table`` (``query_totals`` or ``query_layers``, written by kind
    ``query``) for value neurons of ``value_kind``.

    Raises:
        InvalidInputError: the run has no such rows: an older run (its per-value-neuron ``query`` rows are cut at
            ``query_top_k`` per value neuron, so their sums are not the paper's quantity), a run without kind
            ``query``, or one that split no value neuron of ``value_kind``; the message names the option.
    """
    if value_kind not in _QUERY_OPTION:
        raise InvalidInputError(f"value_kind {value_kind!r} is not one of {', '.join(_QUERY_OPTION)}")
    df = getattr(results, table, None)
    need = ["prompt_id", "value_kind", "query_kind", "layer", "score"]
    if not isinstance(df, pd.DataFrame) or len(df) == 0 or any(c not in df.columns for c in need):
        raise InvalidInputError(
            f"the study has no {table!r} rows: run it with kind 'query' (tl-residual study --kinds ...,query; "
            f"{_option_text(value_kind)} > 0). Older runs stored only the per-value-neuron 'query' table, cut at "
            f"query_top_k parts per value neuron, whose sums are not the exact query scores"
        )
    out = df[df["value_kind"] == value_kind]
    if len(out) == 0:
        raise InvalidInputError(
            f"the study's {table!r} table has no rows for {value_kind} value neurons; rerun it with "
            f"{_option_text(value_kind)} > 0"
        )
    return out


def _top_query_neurons(results: Any, value_kind: str, k: int) -> pd.DataFrame:
    """Per prompt, the ``k`` FFN query neurons with the largest exact query score (``query_totals``: the score
    summed over the run's top value neurons of ``value_kind``, neuron-level paper section 3.4), one row per neuron
    name: a neuron read at several positions (attention value neurons read their source positions) keeps its best
    position's score, since zeroing it (:func:`tl_residual.interventions.intervene`) zeroes it at every position.

    Raises:
        InvalidInputError: no ``query_totals`` rows, or the run kept fewer than the ``k`` best distinct neurons of
            a prompt (``query_totals_k`` too small: rerun with ``--query-totals-k``).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    qt = _query_table(results, "query_totals", value_kind)
    qt = qt[qt["query_kind"] == "ffn_neuron"]
    stored = _run_option(results, "query_totals_k")
    if stored is None:
        raise InvalidInputError(
            "the study's manifest does not record query_totals_k, so whether the top query neurons are complete "
            "cannot be checked; rerun the study with kind 'query'"
        )
    qt = qt.sort_values(["prompt_id", "score"], ascending=[True, False], kind="stable")
    n_rows = qt.groupby("prompt_id").size()
    distinct = qt.drop_duplicates(["prompt_id", "query_name"])
    top = distinct.groupby("prompt_id", sort=False).head(k)
    n_top = top.groupby("prompt_id").size()
    short = [int(p) for p in n_top.index if n_top[p] < k and n_rows[p] >= int(stored)]
    if short:
        raise InvalidInputError(
            f"the run kept the top {stored} FFN query parts per prompt, fewer than {k} distinct neurons for prompt(s) "
            f"{short[:5]}; rerun the study with --query-totals-k above {k} (or ask for a smaller k)"
        )
    return top


def shared_neurons(
    results: Any,
    k: int = 300,
    threshold: float = 0.5,
    method: str = "log_prob_increase",
    query_of: str | None = "attn_neuron",
) -> pd.DataFrame:
    """Neuron-level paper Table 8: "shared" value and query neurons of each group.

    A value neuron (FFN ``L.N`` or attention ``L.H.d``; attention neurons are pooled over source positions, as the
    paper names them ``a_l^h-d``) is shared in a group when it is in the top-``k`` value neurons (``parts``, both
    kinds ranked together by ``method``) of more than ``threshold`` of the group's prompts. A query neuron (an FFN
    neuron, scored by its exact query score over the run's top value neurons of kind ``query_of``, table
    ``query_totals``; by default the attention value neurons, as for Table 7 and Figure 4; pooled over positions)
    likewise among the top-``k`` query neurons. The query side is left out when the run has no kind ``query``
    (or ``query_of=None``).

    Raises:
        InvalidInputError: no ``parts`` rows of the neuron kinds; a run with the old per-value-neuron ``query``
            rows but no ``query_totals`` (rerun with kind ``query``), or too small a ``query_totals_k``.

    Returns:
        One row per group and side (``value`` / ``query``): ``group, side, n_prompts, n_shared, shared`` (the names,
        most frequent first), ``frequency`` (their share of prompts).
    """
    parts = _kind(
        _method(_table(results, "parts", ["prompt_id", "kind", "name", "score"]), method), ("ffn_neuron", "attn_neuron")
    )
    prompts = _prompt_groups(results, parts)
    sides = {"value": _top_units_value(parts, k)}
    # a run with kind query (or the old per-value-neuron rows alone: an error below, never summed)
    has_query = any(
        isinstance(getattr(results, t, None), pd.DataFrame) and len(getattr(results, t))
        for t in ("query", "query_totals")
    )
    if query_of is not None and has_query:
        top = _top_query_neurons(results, query_of, k)
        sides["query"] = top.rename(columns={"query_name": "unit"})[["prompt_id", "unit"]]
    rows = []
    gmap = prompts.set_index("prompt_id")["group"]
    for side, top in sides.items():
        top = top[top["prompt_id"].isin(prompts["prompt_id"])]
        top = top.assign(group=top["prompt_id"].map(gmap))
        for g in _group_order(prompts["group"]):
            n = int((prompts["group"] == g).sum()) if g != OVERALL else len(prompts)
            sub = top if g == OVERALL else top[top["group"] == g]
            freq = sub.groupby("unit")["prompt_id"].nunique() / max(n, 1)
            freq = freq[freq > threshold].sort_values(ascending=False, kind="stable")
            rows.append(
                {
                    "group": g,
                    "side": side,
                    "n_prompts": n,
                    "n_shared": len(freq),
                    "shared": list(freq.index),
                    "frequency": [float(x) for x in freq.to_numpy()],
                }
            )
    return pd.DataFrame(rows)


def neuron_layer_distribution(
    results: Any, k: int = 10, methods: Sequence[str] = FIGURE2_METHODS, kind: str = "ffn_neuron"
) -> tuple[pd.DataFrame, Any]:
    """Neuron-level paper Figures 2 (Llama) and 5 (GPT2): over which layers the top-``k`` neurons of each method lie.

    Per method, the ``k`` best neurons of ``kind`` of every prompt (``rank <= k``) are counted per layer; ``share``
    is the count over all prompts' picks (so each method's shares sum to 1 per group).

    Returns:
        ``(df, fig)``: columns ``group, method, layer, count, share``; one line per method (overall).
    """
    df = _kind(_table(results, "parts", ["prompt_id", "kind", "method", "layer", "rank"]), kind)
    prompts = _prompt_groups(results, df)
    df = df[(df["rank"] <= k) & df["method"].isin(tuple(methods)) & df["prompt_id"].isin(prompts["prompt_id"])]
    if len(df) == 0:
        raise InvalidInputError(f"no {kind} rows of methods {', '.join(methods)} in the study's parts table")
    df = df.assign(group=_group_col(df))
    frames = []
    for g in _group_order(prompts["group"]):
        sub = df if g == OVERALL else df[df["group"] == g]
        c = sub.groupby(["method", "layer"]).size().rename("count").reset_index()
        c["share"] = c["count"] / c.groupby("method")["count"].transform("sum")
        c.insert(0, "group", g)
        frames.append(c)
    out = pd.concat(frames, ignore_index=True)
    fig = _figure()
    for m in methods:
        s = out[(out["group"] == OVERALL) & (out["method"] == m)].sort_values("layer")
        fig.add_scatter(x=s["layer"], y=s["share"], mode="lines+markers", name=m)
    fig.update_layout(
        title=f"Figures 2/5: layers of the top-{k} {kind}s per method",
        xaxis_title="layer",
        yaxis_title="share of picks",
    )
    return out, fig


def top_query_layers(
    results: Any,
    value_kind: str = "ffn_neuron",
    n_value: int | None = None,
    k: int = 10,
    method: str = "log_prob_increase",
) -> pd.DataFrame:
    """Neuron-level paper Tables 6 (query layers of the top-100 FFN value neurons) and 14 (of the top-200
    attention value neurons): the ``k`` layers whose parts contribute most to the value neurons' inputs.

    From the study's ``query_layers`` table (kind ``query``): per prompt, the exact query score (section 3.4:
    ``sum_a Imp(a) * contribution_j(a) / input(a)`` over the run's top value neurons ``a`` of ``value_kind``, every
    part ``j`` counted) summed per query layer label (``a_l``: layer ``l``'s attention subvalues and ``b_O``;
    ``f_l``: its FFN neurons and ``b_out``; ``e``: the embeddings; the key bias left out); averaged over the
    group's prompts. The number of value neurons is the run's (``query_values`` for FFN, ``query_attn_values``
    for attention; the paper's 100 and 200 need ``--query-values 100 --query-attn-values 200``).

    Returns:
        Columns ``group, rank, label, score`` (nats).

    Raises:
        InvalidInputError: no ``query_layers`` rows for ``value_kind`` (an older run, or none of that kind split),
            ``n_value`` other than the run's, or a ``method`` other than ``log_prob_increase`` (the query score's Imp).
    """
    if method != "log_prob_increase":
        raise InvalidInputError(f"the study's query scores weight by log-probability increase, not {method!r}")
    ql = _query_table(results, "query_layers", value_kind)
    option, flag = _QUERY_OPTION[value_kind]
    stored = _run_option(results, option)
    if n_value is not None and (
        (stored is not None and int(stored) != n_value)
        or (stored is None and "n_value" in ql.columns and (ql["n_value"] != n_value).any())
    ):
        raise InvalidInputError(
            f"the run split the top {stored if stored is not None else sorted(set(ql['n_value']))} {value_kind} "
            f"value neurons, not {n_value}; rerun the study with {flag} {n_value} (or pass n_value=None)"
        )
    ql = ql[ql["query_kind"] != "key_bias"]
    ql = ql.assign(label=[_query_label(kd, l) for kd, l in zip(ql["query_kind"], ql["layer"])])
    mean = _per_prompt_mean(ql[["prompt_id", "label", "score"]], ["label"], ["score"], _prompt_groups(results, ql))
    return _top(mean, ["label"], k)


def _per_layer_counts(
    results: Any, frame: pd.DataFrame, source: pd.DataFrame, columns: list[str], labels: dict[str, str], **layout: Any
) -> tuple[pd.DataFrame, Any]:
    """Per-prompt counts ``columns`` of ``frame`` summed per layer and averaged over each group's prompts (the groups
    of ``source``'s prompts), and their bar chart (``labels``: column -> legend name; ``layout``: plotly layout)."""
    out = _per_prompt_mean(frame[["prompt_id", "layer", *columns]], ["layer"], columns, _prompt_groups(results, source))
    return out, _layer_bars(out, labels, **layout)


def query_neuron_counts(
    results: Any, k: int = 1000, method: str = "log_prob_increase", value_kind: str = "attn_neuron"
) -> tuple[pd.DataFrame, Any]:
    """Neuron-level paper Figure 4: per FFN layer, the mean number per prompt of "query-value" neurons (in the
    top-``k`` query FFN neurons and the top-``k`` value FFN neurons of the prompt) and "query-only" neurons (in the
    top-``k`` query neurons only).

    Query FFN neurons: those with the largest exact query score over the run's top value neurons of
    ``value_kind`` (table ``query_totals``; by default the attention value neurons, as the paper's section 5.2
    counts the query neurons of Table 7), one per name (pooled over positions). Value FFN neurons: the ``parts``
    rows of rank ``<= k`` by ``method``.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, query_value, query_only``.

    Raises:
        InvalidInputError: no ``query_totals`` rows for ``value_kind``; too small a ``query_totals_k``; or a run that
            stored fewer than ``k`` FFN value neurons per prompt (``--top-k ffn_neuron=...``).
    """
    parts = _kind(
        _method(_table(results, "parts", ["prompt_id", "kind", "name", "layer", "rank"]), method), "ffn_neuron"
    )
    cut = _stored_top_k(results, "ffn_neuron")
    if cut is not None and cut < k:
        raise InvalidInputError(
            f"Figure 4 needs the top-{k} FFN value neurons per prompt; the run stored the top {cut} "
            f"(rerun the study with --top-k ffn_neuron={k} or more)"
        )
    value = set(zip(*[parts.loc[parts["rank"] <= k, c] for c in ("prompt_id", "name")]))
    top = _top_query_neurons(results, value_kind, k).copy()
    both = [(p, n) in value for p, n in zip(top["prompt_id"], top["query_name"])]
    top["query_value"] = [float(b) for b in both]
    top["query_only"] = [1.0 - float(b) for b in both]
    out, fig = _per_layer_counts(
        results,
        top,
        parts,
        ["query_value", "query_only"],
        {"query_only": "query-only", "query_value": "query-value"},
        title=f"Figure 4: top-{k} query FFN neurons per layer",
        barmode="stack",
        xaxis_title="layer",
        yaxis_title="neurons per prompt",
    )
    return out, fig


# ----------------------------------------------------------------------------------------------
# Residual-stream paper: from the run's tables
# ----------------------------------------------------------------------------------------------


def stream_log_prob(results: Any) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Figure 5: mean log probability (and probability) of the target along the residual
    stream ``Lin0, Lres0, Lout0, Lres1, ...`` (Eq. 1), from the run's ``stream`` table.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, index, stream, log_prob, prob`` (nats; probabilities).
    """
    df = _table(results, "stream", ["prompt_id", "stream", "index", "log_prob", "prob"])
    out = _per_prompt_mean(
        df[["prompt_id", "index", "stream", "log_prob", "prob"]],
        ["index", "stream"],
        ["log_prob", "prob"],
        _prompt_groups(results, df),
    )
    out = out.sort_values(["group", "index"], kind="stable").reset_index(drop=True)
    fig = _figure()
    for g in _group_order(out["group"]):
        s = out[out["group"] == g]
        fig.add_scatter(x=s["index"], y=s["log_prob"], mode="lines", name=g, text=s["stream"])
    fig.update_layout(
        title="Figure 5 (residual stream): mean log p(target) along the stream",
        xaxis_title="stream index (0 = Lin0, 1 = Lres0, 2 = Lout0, ...)",
        yaxis_title="log prob (nats)",
    )
    return out, fig


def ffn_subvalue_counts(results: Any, method: str = "log_prob_increase") -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Figure 6: mean number per prompt of helpful (score > 0) and unhelpful (score < 0) FFN
    subvalues (neurons) of each layer.

    Needs every FFN neuron stored (no ``top_k`` cut in the run); raises otherwise.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, helpful, unhelpful``.
    """
    df = _kind(_method(_table(results, "parts", ["prompt_id", "kind", "layer", "score"]), method), "ffn_neuron")
    if not _stored_all(results, "ffn_neuron"):
        raise InvalidInputError(
            f"ffn_subvalue_counts needs every FFN neuron's score; the run stored only the top "
            f"{_stored_top_k(results, 'ffn_neuron')} (rerun the study with --top-k ffn_neuron=all)"
        )
    df = df.assign(helpful=(df["score"] > 0).astype(float), unhelpful=(df["score"] < 0).astype(float))
    out, fig = _per_layer_counts(
        results,
        df,
        df,
        ["helpful", "unhelpful"],
        {"helpful": "helpful", "unhelpful": "unhelpful"},
        title="Figure 6 (residual stream): helpful / unhelpful FFN subvalues per layer",
        barmode="group",
        xaxis_title="FFN layer",
        yaxis_title="subvalues per prompt",
    )
    return out, fig


# ----------------------------------------------------------------------------------------------
# Analyses that need the model (and the prompts)
# ----------------------------------------------------------------------------------------------


def prompt_table(data: Any) -> pd.DataFrame:
    """The prompts to rerun, as ``prompt_id, group, prompt, target_id`` (``target_id`` may be NA: the model's top-1).

    Accepts study results (their ``prompts`` table, status ``ok``), a DataFrame with a ``prompt`` column and
    optionally ``prompt_id``, ``group`` (or ``type``) and ``target_id`` (or ``answer_id``), or a list of prompts.

    Raises:
        InvalidInputError: no prompts, or a DataFrame without a ``prompt`` column.
    """
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)):
        df = pd.DataFrame({"prompt": list(data)})
    elif isinstance(data, pd.DataFrame):
        df = data
    else:
        df = _table(data, "prompts", ["prompt"])
        if "status" in df.columns:
            df = df[df["status"].fillna("ok") == "ok"]
    if "prompt" not in df.columns:
        raise InvalidInputError(f"the prompt table lacks column 'prompt' (has {list(df.columns)})")
    if len(df) == 0:
        raise InvalidInputError("no prompts given")
    out = pd.DataFrame({"prompt": df["prompt"].astype(str).to_numpy()})
    out.insert(0, "prompt_id", df["prompt_id"].to_numpy() if "prompt_id" in df.columns else range(len(df)))
    gcol = "group" if "group" in df.columns else ("type" if "type" in df.columns else None)
    out.insert(1, "group", _group_col(df.rename(columns={gcol: "group"})).to_numpy() if gcol else NO_GROUP)
    tcol = "target_id" if "target_id" in df.columns else ("answer_id" if "answer_id" in df.columns else None)
    out["target_id"] = df[tcol].to_numpy() if tcol else pd.NA
    return out.reset_index(drop=True)


def _run(model: Any, prompt: str) -> tuple[Any, Any]:
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return tokens, cache


def _ctx(model: Any, row: Any) -> Any:
    from tl_residual.scorers import make_context

    _, cache = _run(model, row.prompt)
    target = None if pd.isna(row.target_id) else int(row.target_id)
    return make_context(model, cache, target)


def _summarise(frame: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    """Mean of ``cols`` per group (and overall) and ``keys`` of a per-prompt frame with a ``group`` column."""
    frames = []
    for g in _group_order(frame["group"]):
        sub = frame if g == OVERALL else frame[frame["group"] == g]
        m = sub.groupby(keys)[cols].mean().reset_index() if keys else sub[cols].mean().to_frame().T
        m.insert(0, "n_prompts", sub["prompt_id"].nunique())
        m.insert(0, "group", g)
        frames.append(m)
    return pd.concat(frames, ignore_index=True)


def segment_curves(model: Any, data: Any, n_segments: int = 60) -> tuple[pd.DataFrame, Any]:
    """Neuron-level paper Figures 3 (Llama) and 6 (GPT2): ``log p(w | Seg_S)`` and ``p(w | Seg_S)`` on the straight
    line ``Seg_S = h^0 + S (h^L - h^0) / n_segments`` (``S = 0..n_segments``) from the layer-0 input ``h^0``
    (``blocks.0.hook_resid_pre``) to the final residual ``h^L`` at the last position, through the frozen-scale lens
    (section 4.1), averaged over prompts.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, segment, log_prob, prob`` (nats; probabilities).
    """
    from tl_residual import model as tlm

    if not isinstance(n_segments, int) or n_segments < 1:
        raise InvalidInputError(f"n_segments must be a positive integer, got {n_segments!r}")
    rows = []
    n_layers = tlm.model_spec(model).n_layers
    for row in prompt_table(data).itertuples():
        ctx = _ctx(model, row)
        h0 = tlm.cached(ctx.cache, "blocks.0.hook_resid_pre", 0)[ctx.position].float()
        hl = tlm.cached(ctx.cache, f"blocks.{n_layers - 1}.hook_resid_post", 0)[ctx.position].float()
        s = torch.arange(n_segments + 1, dtype=torch.float32)[:, None]
        lp = ctx.lens.log_probs(h0 + s * (hl - h0) / n_segments)[:, ctx.target]
        for i, v in enumerate(lp.tolist()):
            rows.append(
                {"prompt_id": row.prompt_id, "group": row.group, "segment": i, "log_prob": v, "prob": math.exp(v)}
            )
    out = _summarise(pd.DataFrame(rows), ["segment"], ["log_prob", "prob"])
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("log probability", "probability"))
    s = out[out["group"] == OVERALL]
    fig.add_scatter(x=s["segment"], y=s["log_prob"], mode="lines", name="log p", row=1, col=1)
    fig.add_scatter(x=s["segment"], y=s["prob"], mode="lines", name="p", row=1, col=2)
    fig.update_layout(title="Figures 3/6 (neuron-level): the target along h0 -> hL in segments")
    return out, fig


def _decrease(res: Any) -> dict[str, float]:
    s = res.summary()
    return {
        k: s[k]
        for k in (
            "n_prompts",
            "mrr_before",
            "mrr_after",
            "prob_before_pct",
            "prob_after_pct",
            "mrr_decrease_pct",
            "prob_decrease_pct",
        )
    }


def head_ablation(
    model: Any, results: Any, fraction: float = 0.01, method: str = "log_prob_increase", batch_size: int = 16
) -> pd.DataFrame:
    """Neuron-level paper Table 11: MRR and probability decrease (%) on each group's prompts when zeroing the top
    ``fraction`` (1%) of heads of each group (:func:`top_heads`, at least one head), through
    :func:`tl_residual.interventions.intervene` (a head's output zeroed at every position).

    Returns:
        Columns ``heads_of`` (the group whose heads are zeroed), ``prompts_of``, ``heads`` (names),
        ``n_prompts, mrr_before, mrr_after, prob_before_pct, prob_after_pct, mrr_decrease_pct, prob_decrease_pct``.
    """
    from tl_residual import model as tlm
    from tl_residual.interventions import intervene

    spec = tlm.model_spec(model)
    n = max(1, round(fraction * spec.n_layers * spec.n_heads))
    heads = top_heads(results, n, method)
    prompts = prompt_table(results)
    groups = [g for g in _group_order(prompts["group"]) if g != OVERALL] or [OVERALL]
    rows = []
    for hg in groups:
        hnames = heads.loc[heads["group"] == hg, "name"].tolist()
        for pg in groups:
            p = prompts if pg == OVERALL else prompts[prompts["group"] == pg]
            tg = [None if pd.isna(t) else int(t) for t in p["target_id"]]
            res = intervene(model, p["prompt"].tolist(), hnames, tg, batch_size=batch_size)
            rows.append({"heads_of": hg, "prompts_of": pg, "heads": hnames, **_decrease(res)})
    return pd.DataFrame(rows)


def query_neuron_ablation(
    model: Any, results: Any, k: int = 1000, seed: int = 0, batch_size: int = 16, value_kind: str = "attn_neuron"
) -> pd.DataFrame:
    """Neuron-level paper Table 7: MRR / probability decrease (%) when zeroing each prompt's top-``k`` query FFN
    neurons, against ``k`` random FFN neurons (seeded, per prompt).

    The query FFN neurons are those with the largest exact query score over the run's top value neurons of
    ``value_kind`` (table ``query_totals``; the paper's Table 7 takes those of the top-200 attention value
    neurons: ``--query-attn-values 200``). A neuron read at several positions (attention value neurons read
    their source positions) counts once, as zeroing it through :func:`tl_residual.interventions.intervene` zeroes
    it at every position; so the ``k`` zeroed neurons are ``k`` distinct names.

    Returns:
        Columns ``group, selection`` (``query`` / ``random``), ``n_prompts, mrr_before, ..., prob_decrease_pct``.

    Raises:
        InvalidInputError: no ``query_totals`` rows for ``value_kind`` (an older run: rerun with kind ``query``),
            or fewer than ``k`` distinct query neurons kept (``--query-totals-k``).
    """
    from tl_residual.interventions import intervene, random_components

    picks = _top_query_neurons(results, value_kind, k).groupby("prompt_id")["query_name"].apply(list)
    prompts = prompt_table(results)
    prompts = prompts[prompts["prompt_id"].isin(picks.index)]
    rows = []
    for g in _group_order(prompts["group"]):
        p = prompts if g == OVERALL else prompts[prompts["group"] == g]
        tg = [None if pd.isna(t) else int(t) for t in p["target_id"]]
        sel = {
            "query": [picks[i] for i in p["prompt_id"]],
            "random": [random_components(model, len(picks[i]), seed=seed * 1_000_003 + int(i)) for i in p["prompt_id"]],
        }
        for name, comps in sel.items():
            res = intervene(model, p["prompt"].tolist(), comps, tg, batch_size=batch_size)
            rows.append({"group": g, "selection": name, **_decrease(res)})
    return pd.DataFrame(rows)


def neuron_projections(model: Any, neuron_names: Sequence[str], k: int = 10, data: Any = None) -> pd.DataFrame:
    """Neuron-level paper Table 9: the top-``k`` tokens of each neuron's direction in vocabulary space.

    FFN neuron ``L.N``: row ``k`` of ``W_out``; attention neuron ``L.H.d`` (or ``L.H.d.p``): row ``d`` of head
    ``h``'s ``W_O``; projected through the frozen-scale lens of the first prompt of ``data`` (default: the model's
    BOS token alone; the frozen scale is a positive factor, so the ranking does not depend on it).

    Returns:
        Columns ``name, top_tokens`` (list of strings, best first), ``bottom_tokens``.
    """
    from tl_residual import model as tlm
    from tl_residual.lens import Lens

    if data is None:
        tokens = torch.tensor(
            [
                [
                    int(
                        getattr(model.cfg, "default_prepend_bos", True)
                        and (getattr(model.tokenizer, "bos_token_id", None) or 0)
                    )
                ]
            ]
        )
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
    else:
        _, cache = _run(model, prompt_table(data)["prompt"].iloc[0])
    lens = Lens(model, cache, -1, 0, "frozen")
    rows = []
    for n in neuron_names:
        ref = names.parse(n)
        if ref.kind == "ffn_neuron" and ref.layer is not None:
            v = tlm.W_out(model, ref.layer)[ref.neuron]
        elif ref.kind in ("attn_neuron", "head_dim") and ref.layer is not None:
            v = tlm.W_O(model, ref.layer)[ref.head, ref.dim]
        else:
            raise InvalidInputError(f"{n}: only FFN neurons (L.N) and attention neurons (L.H.d) have a fixed direction")
        rows.append(
            {
                "name": n,
                "top_tokens": lens.top_tokens(v.float(), k),
                "bottom_tokens": lens.top_tokens(v.float(), k, largest=False),
            }
        )
    return pd.DataFrame(rows)


def shared_neuron_projections(
    model: Any, results: Any, k: int = 10, n_per_group: int = 5, **kwargs: Any
) -> pd.DataFrame:
    """Table 9 on the shared neurons of :func:`shared_neurons` (``kwargs`` go to it): the ``n_per_group`` most
    shared value and query neurons of each group, with their top-``k`` tokens.

    Returns:
        Columns ``group, side, name, frequency, top_tokens, bottom_tokens``.
    """
    shared = shared_neurons(results, **kwargs)
    rows = []
    for r in shared.itertuples():
        for n, f in list(zip(r.shared, r.frequency))[:n_per_group]:
            rows.append({"group": r.group, "side": r.side, "name": n, "frequency": f})
    if not rows:
        return pd.DataFrame(columns=["group", "side", "name", "frequency", "top_tokens", "bottom_tokens"])
    df = pd.DataFrame(rows)
    proj = neuron_projections(model, list(dict.fromkeys(df["name"])), k, results).set_index("name")
    return df.join(proj, on="name")


def _ffn_layer_groups(ctx: Any, layer: int) -> tuple[Any, torch.Tensor]:
    from tl_residual.decompose import ffn_parts

    group, _ = ffn_parts(ctx.model, ctx.cache, layer, ctx.position, ctx.batch)
    return group, ctx.base_for(group)


def _lpi(ctx: Any, base: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    from tl_residual.scorers import log_prob_increase

    return log_prob_increase(ctx.lens, base, vectors, ctx.target)


#: Tolerance of the spot check of stored FFN scores (:class:`_FfnScores`): float32 scores of the same quantity.
_STORED_RTOL, _STORED_ATOL = 1e-3, 1e-4


class _FfnScores:
    """Every FFN neuron's log-probability increase on ``resid_mid`` (``C(k)``, nats) per prompt and layer: read from
    ``data`` when it is a study that stored every FFN neuron (``top_k`` ``all`` for kind ``ffn_neuron``, method
    ``log_prob_increase``; :func:`tl_residual.study.run` with ``top_k={"ffn_neuron": None}``), else computed (one
    full-vocabulary projection per neuron: the dense cost of the residual-stream analyses).

    Stored scores are spot-checked against a fresh computation (the best and the worst neuron of each layer) and a
    mismatch (another target, convention or prompt) raises :class:`InvalidInputError`, as does a layer with
    missing neurons."""

    def __init__(self, data: Any) -> None:
        self.stored: dict[tuple[int, int], pd.DataFrame] | None = None
        parts = getattr(data, "parts", None)
        if isinstance(parts, pd.DataFrame) and len(parts) and _stored_all(data, "ffn_neuron"):
            p = parts[(parts["kind"] == "ffn_neuron") & (parts["method"] == "log_prob_increase")]
            if len(p):
                self.stored = {
                    (int(pid), int(layer)): g[["neuron", "score"]]
                    for (pid, layer), g in p.groupby(["prompt_id", "layer"], sort=False)
                }

    def __call__(self, row: Any, ctx: Any, layer: int, group: Any, base: torch.Tensor) -> torch.Tensor:
        """``C(k)`` of every neuron of ``layer`` (``group``: its subvalues; ``base``: the residual they join)."""
        if self.stored is None:
            return _lpi(ctx, base, group.vectors.float())
        g = self.stored.get((int(row.prompt_id), int(layer)))
        n = group.vectors.shape[0]
        if g is None or len(g) != n:
            raise InvalidInputError(
                f"the study stored {0 if g is None else len(g)} of the {n} FFN neurons of layer {layer} for prompt "
                f"{row.prompt_id}; rerun it with top_k={{'ffn_neuron': None}} (--top-k ffn_neuron=all)"
            )
        c = torch.full((n,), float("nan"), dtype=torch.float64)
        c[torch.tensor(g["neuron"].to_numpy(dtype="int64"))] = torch.tensor(g["score"].to_numpy(dtype="float64"))
        idx = torch.stack([c.argmax(), c.argmin()])
        fresh = _lpi(ctx, base, group.vectors[idx].float()).double()
        if torch.isnan(c).any() or not torch.allclose(fresh, c[idx], rtol=_STORED_RTOL, atol=_STORED_ATOL):
            raise InvalidInputError(
                f"the study's stored FFN scores of prompt {row.prompt_id}, layer {layer} do not match a fresh "
                f"computation ({c[idx].tolist()} stored, {fresh.tolist()} now): another target, convention or prompt"
            )
        return c.float()


#: Residual-stream paper Table 1: the paper's selection rules and the registry scorer that implements each.
TABLE1_METHODS: dict[str, str] = {
    "Imp (log-prob increase)": "log_prob_increase",
    "coefficient": "coefficient",
    "coefficient x norm": "coefficient_norm",
    "rank of the target": "inverse_rank",
}


def _ffn_layers(
    model: Any, data: Any, layers: Sequence[int] | None
) -> Iterator[tuple[Any, Any, int, Any, Any, torch.Tensor]]:
    """For each prompt of ``data`` (:func:`prompt_table`) and each FFN layer of ``layers`` (default: all), in that
    order: ``(row, ctx, layer, group, base, c)``, the prompt's scoring context, the layer's FFN subvalues with the
    residual they are added to (:func:`_ffn_layer_groups`) and their log-probability increases (:class:`_FfnScores`:
    stored in ``data`` or computed). One prompt's forward pass at a time."""
    from tl_residual import model as tlm

    layer_list = list(range(tlm.model_spec(model).n_layers)) if layers is None else list(layers)
    scores = _FfnScores(data)
    for row in prompt_table(data).itertuples():
        ctx = _ctx(model, row)
        for layer in layer_list:
            group, base = _ffn_layer_groups(ctx, layer)
            yield row, ctx, layer, group, base, scores(row, ctx, layer, group, base)


def subvalue_selection(model: Any, data: Any, k: int = 10, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Residual-stream paper Table 1: ``log p(w | Lres + sum_k v) - log p(w | Lres)`` for the ``k`` FFN subvalues of
    each layer chosen by each rule of :data:`TABLE1_METHODS` (``Lres`` = ``resid_mid`` of the layer, the
    residual the FFN output is added to), averaged over layers and prompts.

    Returns:
        Columns ``group, n_prompts, method, score`` (nats); ``df.attrs["per_layer"]`` the per-layer means.
    """
    from tl_residual import model as tlm
    from tl_residual.scorers import score_ffn_neurons

    n_layers = tlm.model_spec(model).n_layers
    layer_list = list(range(n_layers)) if layers is None else list(layers)
    rows = []
    for row in prompt_table(data).itertuples():
        ctx = _ctx(model, row)
        for l in layer_list:
            group, base = _ffn_layer_groups(ctx, l)
            for label, method in TABLE1_METHODS.items():
                top = score_ffn_neurons(ctx, method, top_k=k, layers=[l], n_top_tokens=0)
                idx = torch.tensor(top["neuron"].tolist(), dtype=torch.long)
                v = group.vectors[idx].sum(0, keepdim=True).float()
                rows.append(
                    {
                        "prompt_id": row.prompt_id,
                        "group": row.group,
                        "layer": l,
                        "method": label,
                        "score": float(_lpi(ctx, base, v)[0]),
                    }
                )
    per = pd.DataFrame(rows)
    out = _summarise(per, ["method"], ["score"])
    out.attrs["per_layer"] = _summarise(per, ["method", "layer"], ["score"])
    return out


def subvalue_additivity(model: Any, data: Any, layers: Sequence[int] | None = None) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Figure 3: for the helpful FFN subvalues (``C > 0``) of each layer,
    ``C(v_1 + ... + v_n)`` against ``C(v_1) + ... + C(v_n)`` (``C`` = log-probability increase on ``resid_mid``).

    ``data``: the prompts (:func:`prompt_table`), or a study that stored every FFN neuron (``top_k={"ffn_neuron":
    None}``), whose scores are then read instead of recomputed (spot-checked; the dense cost goes).

    Returns:
        ``(df, fig)``: one row per prompt and layer: ``prompt_id, group, layer, n_helpful, sum_of_scores,
        score_of_sum`` (nats); a scatter of ``score_of_sum`` against ``sum_of_scores``.
    """
    rows = []
    for row, ctx, l, group, base, c in _ffn_layers(model, data, layers):
        h = c > 0
        rows.append(
            {
                "prompt_id": row.prompt_id,
                "group": row.group,
                "layer": l,
                "n_helpful": int(h.sum()),
                "sum_of_scores": float(c[h].double().sum()),
                "score_of_sum": float(_lpi(ctx, base, group.vectors[h].float().sum(0, keepdim=True))[0]),
            }
        )
    df = pd.DataFrame(rows)
    fig = _figure()
    fig.add_scatter(x=df["sum_of_scores"], y=df["score_of_sum"], mode="markers", text=df["layer"], name="layer")
    fig.update_layout(
        title="Figure 3 (residual stream): C(v1+...+vn) against sum C(vi), helpful FFN subvalues",
        xaxis_title="sum of C(v_i) (nats)",
        yaxis_title="C(sum v_i) (nats)",
    )
    return df, fig


def top10_share(model: Any, data: Any, k: int = 10, layers: Sequence[int] | None = None) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Figure 7: per FFN layer, ``C(sum of the top-k helpful) / C(sum of all helpful)`` and
    the same for the unhelpful subvalues (top-k = the ``k`` most negative), ``C`` the log-probability increase on
    ``resid_mid``; averaged over prompts (layers without helpful / unhelpful subvalues are skipped).

    ``data``: the prompts (:func:`prompt_table`), or a study that stored every FFN neuron (``top_k={"ffn_neuron":
    None}``), whose scores are then read instead of recomputed (spot-checked; the dense cost goes).

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, helpful, unhelpful``.
    """
    rows = []
    for row, ctx, l, group, base, c in _ffn_layers(model, data, layers):
        rec = {"prompt_id": row.prompt_id, "group": row.group, "layer": l}
        for side, mask, desc in (("helpful", c > 0, True), ("unhelpful", c < 0, False)):
            idx = torch.nonzero(mask).flatten()
            if len(idx) == 0:
                rec[side] = float("nan")
                continue
            order = idx[torch.argsort(c[idx], descending=desc)][:k]
            vs = group.vectors.float()
            top = float(_lpi(ctx, base, vs[order].sum(0, keepdim=True))[0])
            all_ = float(_lpi(ctx, base, vs[idx].sum(0, keepdim=True))[0])
            rec[side] = top / all_ if all_ != 0 else float("nan")
        rows.append(rec)
    out = _summarise(pd.DataFrame(rows), ["layer"], ["helpful", "unhelpful"])
    fig = _layer_lines(
        out,
        {"helpful": "helpful", "unhelpful": "unhelpful"},
        title=f"Figure 7 (residual stream): share of the top-{k} in the layer's helpful / unhelpful sum",
        xaxis_title="FFN layer",
        yaxis_title="C(top-k) / C(all)",
    )
    return out, fig


def cross_layer_average(model: Any, data: Any, value_layer: int = -1) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Figure 8 (and 13, 14): the cross-layer scores of FFN layer ``value_layer``
    (:func:`tl_residual.query.cross_layer_scores`, Eq. 24-25) averaged over prompts, helpful and unhelpful.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, query, query_layer, query_kind, helpful_eq24, unhelpful_eq24,
        helpful_eq25, unhelpful_eq25``, rows in stream order.
    """
    from tl_residual import model as tlm
    from tl_residual.decompose import resolve_layer
    from tl_residual.query import cross_layer_scores

    lv = resolve_layer(value_layer, tlm.model_spec(model).n_layers)
    frames = []
    for row in prompt_table(data).itertuples():
        df = cross_layer_scores(_ctx(model, row), [lv])
        df["order"] = range(len(df))
        frames.append(df.assign(prompt_id=row.prompt_id, group=row.group))
    cols = ["helpful_eq24", "unhelpful_eq24", "helpful_eq25", "unhelpful_eq25"]
    out = _summarise(pd.concat(frames, ignore_index=True), ["order", "query", "query_layer", "query_kind"], cols)
    out = out.sort_values(["group", "order"], kind="stable").drop(columns="order").reset_index(drop=True)
    fig = _figure()
    s = out[out["group"] == OVERALL]
    fig.add_scatter(x=s["query"], y=s["helpful_eq24"], mode="lines+markers", name="helpful")
    fig.add_scatter(x=s["query"], y=s["unhelpful_eq24"], mode="lines+markers", name="unhelpful")
    fig.update_layout(
        title=f"Figure 8 (residual stream): cross-layer scores of FFN layer {lv} (Eq. 24)",
        xaxis_title="query vector",
        yaxis_title="inner product",
    )
    return out, fig


# ----------------------------------------------------------------------------------------------
# Residual-stream paper, Appendix D: FFN subvalues as "value" and as "query"
# ----------------------------------------------------------------------------------------------

#: Parameters of :func:`ffn_value_query_roles` (recorded in its ``df.attrs``).
ROLE_PARAMS: tuple[str, ...] = ("n_value", "n_query", "n_union", "k", "which")


def _ffn_roles_one(
    ctx: Any, row: Any, ffn_scores: _FfnScores, n_value: int, n_query: int, n_union: int, k: int, which: Any
) -> list[dict[str, Any]]:
    """The per-layer counts of :func:`ffn_value_query_roles` for one prompt (one scoring context)."""
    from tl_residual import model as tlm
    from tl_residual.decompose import layer_outputs
    from tl_residual.query import ffn_layer_keys

    n_layers = tlm.model_spec(ctx.model).n_layers
    mlp_out = torch.stack(
        [v for _, _, kind, v in layer_outputs(ctx.model, ctx.cache, ctx.position, ctx.batch) if kind == "mlp"]
    ).double()  # [layer, d_model], FFN_l = hook_mlp_out
    scores, eq25, union = [], [], []
    for lv in range(n_layers):
        group, base = _ffn_layer_groups(ctx, lv)
        c = ffn_scores(row, ctx, lv, group, base).double()  # C(k), nats
        key, _, which = ffn_layer_keys(ctx.model, ctx.cache, lv, ctx.position, which, ctx.batch)
        scores.append(c)
        eq25.append(key @ c)  # Eq. 25 summed over Lv's neurons: Cr(q, Lv) = q . (key @ C)
        if lv > 0:  # Table 4: top-n_union terms inner(FFN_lq, K_k) C(k) of Lv for each lower FFN layer lq
            terms = (mlp_out[:lv] @ key) * c[None, :]
            top = torch.topk(terms, min(n_union, terms.shape[1]), dim=1).indices
            union.append(len(set(top.flatten().tolist())) / (top.shape[0] * top.shape[1]))
        else:
            union.append(float("nan"))
    C = torch.stack(scores)  # [layer, d_mlp]
    W = torch.stack(eq25)  # [layer, d_model]
    above = torch.flip(torch.cumsum(torch.flip(W, [0]), 0), [0]) - W  # sum over lv > lq of W[lv]
    query_score = torch.full_like(C, float("-inf"))
    rows = []
    for lq in range(n_layers):
        group, _ = _ffn_layer_groups(ctx, lq)
        v = group.vectors.double()  # [d_mlp, d_model], the subvalues m_k W_out[k]
        rec: dict[str, Any] = {"layer": lq, "union_share": union[lq]}
        if lq < n_layers - 1:
            query_score[lq] = v @ above[lq]  # Figure 19, method 1
            s = v @ W[lq + 1 :].T  # [d_mlp, upper layers]: Eq. 25 of each subvalue on each upper FFN layer
            tops = set(torch.topk(s, min(n_query, s.shape[0]), dim=0).indices.flatten().tolist())
            c = C[lq]
            for side, mask, desc in (("helpful", c > 0, True), ("unhelpful", c < 0, False)):
                idx = torch.nonzero(mask).flatten()
                picked = idx[torch.argsort(c[idx], descending=desc)][:n_value].tolist()
                rec[f"n_{side}"] = len(picked)
                rec[f"{side}_as_query"] = sum(i in tops for i in picked)
        else:
            rec.update(n_helpful=0, helpful_as_query=0, n_unhelpful=0, unhelpful_as_query=0)
        rows.append(rec)
    value_top = torch.topk(C.flatten(), min(k, C.numel())).indices // C.shape[1]
    finite = int(torch.isfinite(query_score).sum())
    query_top = torch.topk(query_score.flatten(), min(k, finite)).indices // C.shape[1]
    for rec in rows:
        rec["value_top"] = int((value_top == rec["layer"]).sum())
        rec["query_top"] = int((query_top == rec["layer"]).sum())
    return rows


def ffn_value_query_roles(
    model: Any,
    data: Any,
    n_value: int = 10,
    n_query: int = 20,
    n_union: int = 5,
    k: int = 100,
    which: Any = None,
) -> pd.DataFrame:
    """Per prompt and FFN layer, the counts behind the residual-stream paper's Appendix D (Tables 3 and 4,
    Figure 19): FFN subvalues (neurons ``m_k W_out[k]`` at the last position) working as "value" and as "query".

    Built on the query side (:func:`tl_residual.query.ffn_layer_keys`): ``inner(q, K_k)`` is the exact contribution
    of a vector ``q`` to the input of neuron ``k`` of FFN layer ``Lv`` (Eq. 22-23, cached ``ln2`` scale and centring
    folded in; input ``pre``, or ``gate`` for gated MLPs, as :func:`tl_residual.query.cross_layer_scores`), and
    ``C(k)`` its log-probability increase on ``resid_mid`` (Eq. 19, nats). A query's Eq. 25 score on ``Lv`` is
    ``Cr(q, Lv) = sum_k inner(q, K_k) C(k)`` over every neuron of ``Lv``.

    * Table 3 (D.1): of layer ``l``'s top-``n_value`` helpful (largest ``C > 0``) and top-``n_value`` unhelpful
      (most negative ``C < 0``) subvalues, how many are among the ``n_query`` subvalues of layer ``l`` with the
      largest Eq. 25 score on at least one upper FFN layer (``helpful_as_query`` of ``n_helpful``, likewise
      unhelpful; the last layer has no upper layer).
    * Table 4 (D.2): for value layer ``Lv``, the top-``n_union`` neurons by ``inner(FFN_lq, K_k) C(k)`` for each
      lower FFN layer output ``FFN_lq`` (``hook_mlp_out``), and ``union_share`` = the size of their union over
      ``lq < Lv`` divided by ``n_union * Lv`` (NaN for layer 0).
    * Figure 19 (D.3): ``value_top``, how many of the prompt's top-``k`` subvalues by ``C`` (all layers together)
      lie in the layer; ``query_top``, the same for the top-``k`` by the query score ``sum_{Lv > l} Cr(v, Lv)``
      (the paper's first method; its second, iterative method is not implemented).

    Cost per prompt: every FFN neuron of every layer scored (``n_layers * d_mlp`` vocabulary projections, chunked;
    read instead from ``data`` when it is a study that stored every FFN neuron, :class:`_FfnScores`) plus one
    ``d_model x d_mlp`` key per layer; peak memory one layer's subvalues, keys (float64) and one chunk of logits.

    Returns:
        One row per prompt and layer: ``prompt_id, group, layer, n_helpful, helpful_as_query, n_unhelpful,
        unhelpful_as_query, union_share, value_top, query_top``; ``df.attrs`` holds the parameters.

    Raises:
        InvalidInputError: a parameter that is not a positive integer.
    """
    for label, v in (("n_value", n_value), ("n_query", n_query), ("n_union", n_union), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidInputError(f"{label} must be a positive integer, got {v!r}")
    rows = []
    scores = _FfnScores(data)
    for row in prompt_table(data).itertuples():
        for rec in _ffn_roles_one(_ctx(model, row), row, scores, n_value, n_query, n_union, k, which):
            rows.append({"prompt_id": row.prompt_id, "group": row.group, **rec})
    df = pd.DataFrame(rows)
    df.attrs.update(n_value=n_value, n_query=n_query, n_union=n_union, k=k, which=which)
    return df


def _roles(model: Any, data: Any, roles: pd.DataFrame | None, **params: Any) -> pd.DataFrame:
    """``roles`` if given (checked against ``params``), else :func:`ffn_value_query_roles` of ``model`` and ``data``."""
    if roles is None:
        return ffn_value_query_roles(model, data, **params)
    clash = {p: (roles.attrs.get(p), v) for p, v in params.items() if p in roles.attrs and roles.attrs[p] != v}
    if clash:
        raise InvalidInputError(
            "roles were computed with other parameters: "
            + ", ".join(f"{p}={a!r}, asked {b!r}" for p, (a, b) in clash.items())
        )
    return roles


def value_query_overlap(
    model: Any, data: Any, n_value: int = 10, n_query: int = 20, *, roles: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Appendix D.1, Table 3: the proportion of each FFN layer's top-``n_value`` helpful and
    unhelpful subvalues that are also top-``n_query`` queries of at least one upper FFN layer (see
    :func:`ffn_value_query_roles`), pooled over the group's prompts (hits / subvalues picked).

    Args:
        roles: a :func:`ffn_value_query_roles` table to reuse (its parameters must match); else it is computed.

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, proportion, helpful, unhelpful`` (shares in 0..1; NaN
        for the last layer), and a line chart of the overall proportions per layer.
    """
    per = _roles(model, data, roles, n_value=n_value, n_query=n_query)
    frames = []
    for g in _group_order(per["group"]):
        sub = per if g == OVERALL else per[per["group"] == g]
        s = sub.groupby("layer")[["n_helpful", "helpful_as_query", "n_unhelpful", "unhelpful_as_query"]].sum()
        out = pd.DataFrame(
            {
                "layer": s.index,
                "proportion": (s["helpful_as_query"] + s["unhelpful_as_query"])
                / (s["n_helpful"] + s["n_unhelpful"]).replace(0, float("nan")),
                "helpful": s["helpful_as_query"] / s["n_helpful"].replace(0, float("nan")),
                "unhelpful": s["unhelpful_as_query"] / s["n_unhelpful"].replace(0, float("nan")),
            }
        )
        out.insert(0, "n_prompts", sub["prompt_id"].nunique())
        out.insert(0, "group", g)
        frames.append(out)
    out = pd.concat(frames, ignore_index=True)
    fig = _layer_lines(
        out,
        {"proportion": "helpful and unhelpful", "helpful": "helpful", "unhelpful": "unhelpful"},
        title=f"Appendix D Table 3 (residual stream): top-{n_value} subvalues that are top-{n_query} queries above",
        xaxis_title="FFN layer",
        yaxis_title="proportion",
    )
    return out, fig


def query_union(
    model: Any, data: Any, n_union: int = 5, *, roles: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Appendix D.2, Table 4: for each "value" FFN layer, the union of the top-``n_union``
    subvalues activated by each lower FFN layer, as a share of ``n_union`` times the number of lower layers (small:
    lower layers activate the same subvalues), averaged over the group's prompts (see
    :func:`ffn_value_query_roles`).

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, union_share`` (0..1; NaN for layer 0).
    """
    per = _roles(model, data, roles, n_union=n_union)
    out = _summarise(per, ["layer"], ["union_share"])
    fig = _layer_lines(
        out,
        {"union_share": "union share"},
        title=f"Appendix D Table 4 (residual stream): union of the top-{n_union} subvalues per lower FFN layer",
        xaxis_title="value FFN layer",
        yaxis_title="|union| / (n_union x lower layers)",
    )
    return out, fig


def value_query_layers(
    model: Any, data: Any, k: int = 100, *, roles: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper Appendix D.3, Figure 19: per FFN layer, the mean number per prompt of the top-``k``
    subvalues working as "value" (largest ``C``) and as "query" (largest ``sum_{Lv > l} Cr(v, Lv)``, Eq. 25; the
    paper's first method), all layers ranked together (see :func:`ffn_value_query_roles`).

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, value, query`` (subvalues per prompt; each sums to ``k``
        over layers), and a bar chart.
    """
    per = _roles(model, data, roles, k=k).rename(columns={"value_top": "value", "query_top": "query"})
    out = _summarise(per, ["layer"], ["value", "query"])
    fig = _layer_bars(
        out,
        {"value": "value", "query": "query"},
        title=f"Appendix D Figure 19 (residual stream): top-{k} FFN subvalues as value and as query",
        barmode="group",
        xaxis_title="FFN layer",
        yaxis_title="subvalues per prompt",
    )
    return out, fig


# ----------------------------------------------------------------------------------------------
# Residual-stream paper, Appendix B: removing layer-level vectors from an attention subvalue's input
# ----------------------------------------------------------------------------------------------


def bs_removal_average(
    model: Any, data: Any, layer: int | None = None, foil: int | str | None = None
) -> tuple[pd.DataFrame, Any]:
    """Residual-stream paper section 5.1 and Appendix B, Figures 11 and 12, over prompts: the change of an attention
    subvalue's bs-value minus score ``bs_target - bs_foil`` when each layer-level vector ``M`` (``embed``,
    ``L{j}.attn``, ``L{j}.mlp``, ``j < layer``) is removed from its input, by method 1 (attention weights
    recomputed) and method 2 (attention weights fixed) (:func:`tl_residual.bsvalues.bs_removal`).

    Per prompt, as in the paper's case study: the foil is ``foil`` or the model's most probable token other than the
    target (the paper: "London" against "Paris"); the attention layer is ``layer`` or the one whose output (without
    ``b_O``) has the largest minus score (Appendix A, :func:`tl_residual.bsvalues.bs_minus_layers`); the source
    position is the one whose subvalue at that layer has the largest minus score (the paper: "France").

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, removed, kind, m_layer, drop_method1, drop_method2``
        (logits; ``drop = minus before - minus after``, mean over the prompts whose chosen layer is above
        ``m_layer``; ``n_prompts`` counts them) in stream order; ``df.attrs["per_prompt"]`` the per-prompt rows
        (with the chosen ``layer``, ``src_pos``, ``foil`` and ``minus_before``). A line chart of both methods.

    Raises:
        InvalidInputError: bad layer or foil.
    """
    from tl_residual.bsvalues import bs_minus_layers, bs_removal
    from tl_residual.lens import model_logits

    rows = []
    for row in prompt_table(data).itertuples():
        tokens, cache = _run(model, row.prompt)
        logits = model_logits(model, cache, -1, 0).float()
        target = int(torch.argmax(logits)) if pd.isna(row.target_id) else int(row.target_id)
        b: int | str
        if foil is None:
            b = int(torch.topk(logits, 2).indices[1 if int(torch.argmax(logits)) == target else 0])
        else:
            b = foil
        if layer is None:
            lm = bs_minus_layers(model, cache, target, b, with_bias=False)
            lm = lm[lm["kind"] == "attn"]
            chosen = int(lm.loc[lm["minus"].idxmax(), "layer"])
        else:
            chosen = layer
        df = bs_removal(model, cache, tokens, target, b, chosen)
        rows.append(
            df.assign(
                prompt_id=row.prompt_id,
                group=row.group,
                layer_chosen=df.attrs["layer"],
                src_pos=df.attrs["src_pos"],
                foil=df.attrs["token_b"],
                minus_before=df.attrs["minus_before"],
            )
        )
    per = pd.concat(rows, ignore_index=True).rename(columns={"layer": "m_layer"})
    frames = []
    for g in _group_order(per["group"]):
        sub = per if g == OVERALL else per[per["group"] == g]
        m = sub.groupby(["index", "removed", "kind", "m_layer"], sort=True).agg(
            n_prompts=("prompt_id", "nunique"),
            drop_method1=("drop_method1", "mean"),
            drop_method2=("drop_method2", "mean"),
        )
        m = m.reset_index().drop(columns="index")
        m.insert(0, "group", g)
        frames.append(m)
    out = pd.concat(frames, ignore_index=True)
    out = out[["group", "n_prompts", "removed", "kind", "m_layer", "drop_method1", "drop_method2"]]
    out.attrs["per_prompt"] = per
    fig = _figure()
    s = out[out["group"] == OVERALL]
    fig.add_scatter(x=s["removed"], y=s["drop_method1"], mode="lines+markers", name="method 1 (Figure 11)")
    fig.add_scatter(x=s["removed"], y=s["drop_method2"], mode="lines+markers", name="method 2 (Figure 12)")
    fig.update_layout(
        title="Appendix B (residual stream): drop of the attention subvalue's bs-value minus score when M is removed",
        xaxis_title="removed vector M",
        yaxis_title="minus before - minus after (logits)",
    )
    return out, fig


# ----------------------------------------------------------------------------------------------
# Loading a run folder and the offline HTML report
# ----------------------------------------------------------------------------------------------


PAPER_NUMBERS_FILE = "paper_numbers.json"


@lru_cache(maxsize=1)
def paper_numbers() -> dict[str, pd.DataFrame]:
    """The papers' own published numbers shown beside the run's, one DataFrame per table (row labels as index,
    one column per knowledge type or per selection rule), read once from the package data file
    ``tl_residual/data/paper_numbers.json`` (each table there names its ``source``: paper and table).

    Keys: ``neuron_table3``, ``neuron_table5_12``, ``neuron_table7``, ``neuron_table8`` (neuron-level paper,
    GPT2-large and Llama-7B), ``residual_table1`` (residual-stream paper, nats), ``residual_table3`` and
    ``residual_table4`` (its Appendix D, one sentence; columns are FFN layers); the residual-stream paper's model is
    the 16-layer adaptive-input language model of Baevski & Auli (2018) (its section 2.1).
    """
    text = resources.files("tl_residual").joinpath("data").joinpath(PAPER_NUMBERS_FILE).read_text(encoding="utf-8")
    tables = {key: value for key, value in json.loads(text).items() if not key.startswith("_")}
    return {key: pd.DataFrame(t["columns"], index=t["index"]) for key, t in tables.items()}


def load_study(directory: str) -> Any:
    """A run folder of :func:`tl_residual.study.run` as a :class:`~tl_residual.study.StudyResults`
    (``parts, layers, stream, query, query_totals, query_layers, prompts`` DataFrames and ``manifest``):
    :func:`tl_residual.study.load`.

    Raises:
        InvalidInputError: ``directory`` is not a study folder.
    """
    from tl_residual.study import load

    return load(directory)


def _wide(df: pd.DataFrame, col: str, value: str = "score", fmt: str = "{:.2f}") -> pd.DataFrame:
    """``group x rank`` table of ``label (score)`` cells, as the papers print their top-10 lists."""
    cells = df.assign(cell=[f"{a} ({fmt.format(b)})" for a, b in zip(df[col], df[value])])
    return cells.pivot(index="group", columns="rank", values="cell")


def report_sections(results: Any, model: Any = None, max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Every analysis the run (and, if given, the model) allows: a list of ``{paper, title, table, figure,
    paper_table, error}`` (``error`` says why an analysis is missing)."""
    sections: list[dict[str, Any]] = []

    def add(paper: str, title: str, fn: Any, paper_key: str | None = None, shape: Any = None) -> None:
        entry: dict[str, Any] = {
            "paper": paper,
            "title": title,
            "table": None,
            "figure": None,
            "error": None,
            "paper_table": paper_numbers().get(paper_key) if paper_key else None,
        }
        try:
            out = fn()
            table, fig = out if isinstance(out, tuple) else (out, None)
            entry["table"] = shape(table) if shape else table
            entry["figure"] = fig
        except Exception as exc:  # noqa: BLE001 - an analysis the run does not allow is listed, not fatal
            entry["error"] = f"{type(exc).__name__}: {exc}"
        sections.append(entry)

    neuron, resid = "Neuron-level paper (Yu & Ananiadou)", "Residual-stream paper (Yu et al.)"
    add(
        neuron,
        "Table 3: sum of log-probability increase of attention / FFN layers",
        lambda: layer_contributions(results),
        "neuron_table3",
    )
    add(neuron, "Table 4: top-10 layers", lambda: top_layers(results), shape=lambda t: _wide(t, "label"))
    add(neuron, "Table 10: top-10 heads", lambda: top_heads(results), shape=lambda t: _wide(t, "name"))
    add(
        neuron,
        "Tables 5 / 12: importance of all, positive, top-100 and top-200 neurons",
        lambda: neuron_importance(results),
        "neuron_table5_12",
    )
    n_ffn = _run_option(results, "query_values")
    n_attn = _run_option(results, "query_attn_values")
    add(
        neuron,
        f"Table 6: top-10 query layers of the top-{n_ffn or 'N'} FFN value neurons (the paper: top-100)",
        lambda: top_query_layers(results, "ffn_neuron"),
        shape=lambda t: _wide(t, "label"),
    )
    add(
        neuron,
        f"Table 14: top-10 query layers of the top-{n_attn or 'N'} attention value neurons (the paper: top-200)",
        lambda: top_query_layers(results, "attn_neuron"),
        shape=lambda t: _wide(t, "label"),
    )
    add(
        neuron,
        "Table 8: shared value and query neurons (top-300 in > 50% of a group's prompts)",
        lambda: (
            shared_neurons(results)
            .drop(columns=["frequency"])
            .assign(shared=lambda d: d["shared"].map(lambda x: ", ".join(x[:15]) + (" ..." if len(x) > 15 else "")))
        ),
        "neuron_table8",
    )
    add(
        neuron,
        "Figures 2 / 5: layers of the top-10 FFN neurons of methods a, b, c",
        lambda: neuron_layer_distribution(results),
    )
    add(
        neuron,
        f"Figure 4: query-only and query-value FFN neurons per layer (top-1000 query neurons of the top-"
        f"{n_attn or 'N'} attention value neurons)",
        lambda: query_neuron_counts(results),
    )
    add(
        resid,
        "Figure 5: mean log probability of the target along the residual stream",
        lambda: stream_log_prob(results),
    )
    add(resid, "Figure 6: helpful / unhelpful FFN subvalues per layer", lambda: ffn_subvalue_counts(results))
    if model is not None:
        data = prompt_table(results)
        if max_prompts is not None:
            data = data.head(max_prompts)
        add(
            neuron,
            "Figures 3 / 6: log probability and probability along h0 -> hL (60 segments)",
            lambda: segment_curves(model, data),
        )
        add(neuron, "Table 11: zeroing the top 1% heads of each group", lambda: head_ablation(model, results))
        add(
            neuron,
            f"Table 7: zeroing the top-1000 query FFN neurons of the top-{n_attn or 'N'} attention value neurons "
            "against 1000 random",
            lambda: query_neuron_ablation(model, results),
            "neuron_table7",
        )
        add(
            neuron,
            "Table 9: vocabulary projections of shared neurons",
            lambda: shared_neuron_projections(model, results),
        )
        add(
            resid,
            "Table 1: log-probability increase of the top-10 FFN subvalues by each selection rule",
            lambda: subvalue_selection(model, data),
            "residual_table1",
        )
        add(
            resid,
            "Figure 3: C(v1 + ... + vn) against sum C(vi), helpful subvalues",
            lambda: subvalue_additivity(model, data),
        )
        add(
            resid,
            "Figure 7: share of the top-10 in the layer's helpful / unhelpful sum",
            lambda: top10_share(model, data),
        )
        add(resid, "Figure 8: cross-layer scores of the last FFN layer", lambda: cross_layer_average(model, data))
        roles: dict[str, pd.DataFrame] = {}  # Appendix D: one pass over the prompts for its three results

        def role_table() -> pd.DataFrame:
            if "df" not in roles:
                roles["df"] = ffn_value_query_roles(model, data)
            return roles["df"]

        def by_layer(col: str) -> Any:
            return lambda t: t.pivot(index="group", columns="layer", values=col).loc[_group_order(t["group"])]

        add(
            resid,
            "Appendix D, Table 3: top-10 helpful / unhelpful FFN subvalues that are also top-20 queries of an upper "
            "FFN layer (proportion per FFN layer)",
            lambda: value_query_overlap(model, data, roles=role_table()),
            "residual_table3",
            shape=by_layer("proportion"),
        )
        add(
            resid,
            "Appendix D, Table 4: union of the top-5 subvalues activated by each lower FFN layer (share per FFN layer)",
            lambda: query_union(model, data, roles=role_table()),
            "residual_table4",
            shape=by_layer("union_share"),
        )
        add(
            resid,
            "Appendix D, Figure 19: top-100 FFN subvalues working as value and as query, per layer",
            lambda: value_query_layers(model, data, roles=role_table()),
        )
        add(
            resid,
            "Appendix B, Figures 11 / 12: drop of an attention subvalue's bs-value minus score when a layer-level "
            "vector is removed (method 1: attention weights recomputed; method 2: fixed)",
            lambda: bs_removal_average(model, data),
        )
        visit = "VISIT (Katz & Belinkov)"
        add(
            visit,
            "Intersection of head / memory-value top-50 tokens with the block output and final prediction",
            lambda: visit_intersections(model, data),
        )
        add(
            visit,
            "Layer norm as a filter: tokens most promoted / suppressed by each norm",
            lambda: norm_filter(model, data),
        )
    return sections


def _html_table(df: pd.DataFrame) -> str:
    import html as _h

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return _h.escape(", ".join(map(str, v)))
        return _h.escape(str(v))

    df = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df
    head = "".join(f"<th>{_h.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(results: Any, path: str, model: Any = None, max_prompts: int | None = None) -> int:
    """Write the offline HTML report of :func:`report_sections` to ``path`` (atomically; plotly.js embedded once).

    Returns:
        The number of analyses computed (the missing ones are listed in the report with the reason).
    """
    import html as _h
    import os

    sections = report_sections(results, model, max_prompts)
    manifest = getattr(results, "manifest", None) or {}
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}.missing{color:#a00}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tl-residual study report</title><style>"
        f"{style}</style></head><body>",
        "<h1>tl-residual study report</h1>",
        f"<pre>{_h.escape(str({k: manifest[k] for k in list(manifest)[:12]}))}</pre>",
    ]
    plotly_included = False
    done = 0
    for paper in dict.fromkeys(s["paper"] for s in sections):
        parts.append(f"<h2>{_h.escape(paper)}</h2>")
        for s in (x for x in sections if x["paper"] == paper):
            parts.append(f"<h3>{_h.escape(s['title'])}</h3>")
            if s["error"]:
                parts.append(f"<p class='missing'>not available from this run: {_h.escape(s['error'])}</p>")
                continue
            done += 1
            if s["table"] is not None:
                parts.append(_html_table(s["table"]))
            if s["figure"] is not None:
                parts.append(s["figure"].to_html(full_html=False, include_plotlyjs=not plotly_included))
                plotly_included = True
            if s["paper_table"] is not None:
                parts.append("<p>The paper's own numbers:</p>" + _html_table(s["paper_table"]))
    parts.append("</body></html>")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return done


# ----------------------------------------------------------------------------------------------
# VISIT (Katz & Belinkov): logit-lens intersections and regularisation neurons
# ----------------------------------------------------------------------------------------------


def _top_ids(lens: Any, vectors: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(lens.logits(vectors.float()), k, dim=-1).indices


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i ∩ b| / k`` for each row ``a_i`` of ``a`` [n, k] against ``b`` [k]."""
    return torch.isin(a, b).float().mean(-1)


def visit_intersections(model: Any, data: Any, k: int = 50, n_values: int = 10) -> tuple[pd.DataFrame, Any]:
    """VISIT (Katz & Belinkov), Figures 2, 3, 5, 12, 13, 15-18: the intersection score between the top-``k``
    logit-lens tokens of each head's output (and of each of the ``n_values`` most activated FFN memory values, by
    coefficient ``m``, times ``W_out[k]``) and the top-``k`` tokens of the block output (``resid_post`` of the
    layer) and of the final prediction (the model's last residual), at the last position, through the
    frozen-scale lens. Score = |intersection| / ``k``, averaged over prompts (memory values: over the
    ``n_values`` values too).

    Returns:
        ``(df, fig)``: columns ``group, n_prompts, layer, component`` (``H{h}`` or ``memory values``),
        ``with_block_output, with_final``.
    """
    from tl_residual import model as tlm
    from tl_residual.decompose import attention_parts

    spec = tlm.model_spec(model)
    rows = []
    for row in prompt_table(data).itertuples():
        ctx = _ctx(model, row)
        final = _top_ids(
            ctx.lens, tlm.cached(ctx.cache, f"blocks.{spec.n_layers - 1}.hook_resid_post", 0)[ctx.position][None], k
        )[0]
        for l in range(spec.n_layers):
            block = _top_ids(ctx.lens, tlm.cached(ctx.cache, f"blocks.{l}.hook_resid_post", 0)[ctx.position][None], k)[
                0
            ]
            sub, _ = attention_parts(model, ctx.cache, l, ctx.position, ctx.batch)
            heads = sub.vectors.reshape(spec.n_heads, -1, spec.d_model).sum(1)
            ids = _top_ids(ctx.lens, heads, k)
            for h, (wb, wf) in enumerate(zip(_overlap(ids, block).tolist(), _overlap(ids, final).tolist())):
                rows.append(
                    {
                        "prompt_id": row.prompt_id,
                        "group": row.group,
                        "layer": l,
                        "component": f"H{h}",
                        "with_block_output": wb,
                        "with_final": wf,
                    }
                )
            m = tlm.cached(ctx.cache, f"blocks.{l}.mlp.hook_post", 0)[ctx.position].float()
            top = torch.topk(m, min(n_values, m.shape[0])).indices
            vids = _top_ids(ctx.lens, m[top, None] * tlm.W_out(model, l)[top].float(), k)
            rows.append(
                {
                    "prompt_id": row.prompt_id,
                    "group": row.group,
                    "layer": l,
                    "component": "memory values",
                    "with_block_output": float(_overlap(vids, block).mean()),
                    "with_final": float(_overlap(vids, final).mean()),
                }
            )
    out = _summarise(pd.DataFrame(rows), ["layer", "component"], ["with_block_output", "with_final"])
    fig = _figure()
    s = out[out["group"] == OVERALL]
    mv = s[s["component"] == "memory values"]
    hd = s[s["component"] != "memory values"].groupby("layer")[["with_block_output", "with_final"]].max().reset_index()
    fig.add_scatter(x=hd["layer"], y=hd["with_final"], mode="lines+markers", name="best head vs final prediction")
    fig.add_scatter(x=mv["layer"], y=mv["with_final"], mode="lines+markers", name="memory values vs final prediction")
    fig.add_scatter(x=hd["layer"], y=hd["with_block_output"], mode="lines", name="best head vs block output")
    fig.update_layout(
        title=f"VISIT: top-{k} logit-lens token intersections", xaxis_title="layer", yaxis_title="|intersection| / k"
    )
    return out, fig


def norm_filter(model: Any, data: Any, k: int = 10) -> pd.DataFrame:
    """VISIT Figure 7 and Appendix E (Figures 21-23), the layer norm as a filter: for each norm (``ln1``, ``ln2``
    of every layer, ``ln_final``) at the last position, the tokens whose logit-lens bs-value the norm raises and
    lowers most: ``delta = z(N(x)) - z(x) * mean(gamma) / sigma`` with ``z(v) = v @ W_U`` (the input's projection
    scaled to the normalised magnitude), averaged over prompts.

    Returns:
        Columns ``norm, promoted, suppressed`` (lists of ``k`` tokens, strongest first) and ``mean_abs_delta``.
    """
    from tl_residual import model as tlm

    spec = tlm.model_spec(model)
    W_U = tlm.W_U(model).float()
    acc: dict[str, torch.Tensor] = {}
    n = 0
    hooks = [
        (f"blocks.{l}.{w}", f"blocks.{l}.hook_resid_{'pre' if w == 'ln1' else 'mid'}", f"{l}.{w}")
        for l in range(spec.n_layers)
        for w in ("ln1", "ln2")
    ]
    hooks.append(("ln_final", f"blocks.{spec.n_layers - 1}.hook_resid_post", "final"))
    for row in prompt_table(data).itertuples():
        _, cache = _run(model, row.prompt)
        n += 1
        for name, resid, which in hooks:
            x = tlm.cached(cache, resid, 0)[-1].float()
            gamma = tlm.norm_weight(model, which).float()
            beta = tlm.norm_bias(model, which).float()
            scale = tlm.cached(cache, f"{name}.hook_scale", 0)[-1].reshape(-1)[0].float()
            xc = x - x.mean() if spec.norm == "LN" else x
            normed = xc / scale * gamma + beta
            delta = normed @ W_U - (x / scale * gamma.mean()) @ W_U
            acc[name] = acc.get(name, 0) + delta
    tok = getattr(model, "tokenizer", None)

    def words(ids: torch.Tensor) -> list[str]:
        return [tok.decode([int(i)]) if tok is not None else f"<{int(i)}>" for i in ids]

    rows = []
    for name, total in acc.items():
        d = total / max(n, 1)
        rows.append(
            {
                "norm": name,
                "promoted": words(torch.topk(d, k).indices),
                "suppressed": words(torch.topk(-d, k).indices),
                "mean_abs_delta": float(d.abs().mean()),
            }
        )
    return pd.DataFrame(rows)


def regularisation_neurons(model: Any, data: Any, k: int = 20, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """VISIT Figures 8-9, regularisation neurons: the FFN neurons whose output changes the entropy of the
    prediction most. Per prompt and neuron ``m_k W_out[k]`` of ``layers`` (default all; dense: one vocabulary
    projection per neuron), ``dH = H(p(x + m_k W_out[k])) - H(p(x))`` with ``x`` = ``resid_mid`` of the layer and
    ``p`` the frozen-scale lens (nats); averaged over prompts; the ``k`` most negative (sharpening) and ``k`` most
    positive (flattening) neurons.

    Returns:
        Columns ``name, layer, neuron, mean_entropy_change`` (nats), sorted by ``|change|``, ``2 k`` rows.
    """
    from tl_residual import model as tlm

    spec = tlm.model_spec(model)
    layer_list = list(range(spec.n_layers)) if layers is None else list(layers)
    acc: dict[int, torch.Tensor] = {}
    n = 0
    for row in prompt_table(data).itertuples():
        ctx = _ctx(model, row)
        n += 1
        for l in layer_list:
            group, base = _ffn_layer_groups(ctx, l)
            zb = ctx.lens.logits(base[None].float())
            h0 = -(torch.softmax(zb, -1) * torch.log_softmax(zb, -1)).sum(-1)
            dh = []
            for s in range(0, len(group), 256):
                z = zb + ctx.lens.logits(group.vectors[s : s + 256].float())
                dh.append(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1) - h0)
            acc[l] = acc.get(l, 0) + torch.cat(dh)
    rows = [
        {"name": names.ffn_neuron(l, i), "layer": l, "neuron": i, "mean_entropy_change": float(v) / max(n, 1)}
        for l, t in acc.items()
        for i, v in enumerate(t.tolist())
    ]
    df = pd.DataFrame(rows).sort_values("mean_entropy_change", kind="stable")
    out = pd.concat([df.head(k), df.tail(k).iloc[::-1]]).drop_duplicates("name")
    return out.reset_index(drop=True)
