"""The corpus analyses (tl_residual.analyses) on a tiny random model.

The study tables are built here from the library's single-prompt API (scorers, lens, query), so these tests do not
depend on the dataset runner; each aggregate is checked against a direct computation written in the test (plain
loops over the per-prompt tables, or the model's own forward pass).
"""

from __future__ import annotations

import functools
import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import HAS_BRIDGE, make_bridge, make_hooked, raw_frozen_logits, raw_norm
from tl_residual import analyses as A
from tl_residual import model as tlm
from tl_residual.errors import InvalidInputError
from tl_residual.query import query_neuron_scores, split_neuron
from tl_residual.scorers import (
    make_context,
    score_attention_neurons,
    score_ffn_neurons,
    score_heads,
    score_layers,
)

PROMPTS = [("t5 t17 t33 t8", "g1"), ("t9 t23 t42", "g1"), ("t12 t3 t44 t7 t30", "g2"), ("t50 t6 t11", "g2")]
METHODS = ("log_prob_increase", "log_prob", "prob_increase")
N_VALUE = {"ffn_neuron": 4, "attn_neuron": 6}
QUERY_OPTIONS = {"query_values": 4, "query_attn_values": 6, "query_top_k": 1000, "query_totals_k": 100_000}


@functools.lru_cache(maxsize=1)
def tiny():
    return make_bridge("gpt2") if HAS_BRIDGE else make_hooked("gpt2")


def _ranked(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    return df.assign(rank=range(1, len(df) + 1))


@functools.lru_cache(maxsize=1)
def study() -> SimpleNamespace:
    model = tiny()
    parts, layers, stream, query, prompts, ctxs = [], [], [], [], [], {}
    totals, qlayers = [], []
    for pid, (text, group) in enumerate(PROMPTS):
        tokens = model.to_tokens(text)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        ctx = make_context(model, cache)
        ctxs[pid] = ctx
        lp = torch.log_softmax(logits[0, -1].float(), -1)
        prompts.append(
            {
                "prompt_id": pid,
                "group": group,
                "prompt": text,
                "target_id": ctx.target,
                "target_prob": float(lp[ctx.target].exp()),
                "status": "ok",
            }
        )
        for m in METHODS:
            for kind, df in (
                ("ffn_neuron", score_ffn_neurons(ctx, m, top_k=None, n_top_tokens=0)),
                ("attn_neuron", score_attention_neurons(ctx, m, top_k=None, n_top_tokens=0)),
                ("head", score_heads(ctx, m, n_top_tokens=0)),
            ):
                df = _ranked(df)
                parts.append(
                    df.assign(prompt_id=pid, group=group, method=m, kind=kind)
                    .reindex(
                        columns=[
                            "prompt_id",
                            "group",
                            "method",
                            "kind",
                            "name",
                            "layer",
                            "head",
                            "neuron",
                            "score",
                            "rank",
                        ]
                    )
                    .fillna({"head": -1, "neuron": -1})
                )
        ld = score_layers(ctx, n_top_tokens=0).sort_values(["layer", "kind"]).reset_index(drop=True)
        layers.append(
            pd.DataFrame(
                {
                    "prompt_id": pid,
                    "group": group,
                    "method": "log_prob_increase",
                    "name": ld["name"],
                    "layer": ld["layer"],
                    "sublayer": ld["kind"],
                    "score": ld["score"],
                }
            )
        )
        from tl_residual.decompose import residual_stream

        for i, (name, vec) in enumerate(residual_stream(model, cache)):
            v = float(ctx.lens.log_probs(vec.float())[ctx.target])
            stream.append(
                {"prompt_id": pid, "group": group, "stream": name, "index": i, "log_prob": v, "prob": math.exp(v)}
            )
        # query rows: the top value neurons' inputs split over the parts, weighted by Imp / input
        lpi = [p for p in parts if p["prompt_id"].iloc[0] == pid and p["method"].iloc[0] == METHODS[0]]
        for vdf in lpi:
            if vdf["kind"].iloc[0] not in ("ffn_neuron", "attn_neuron"):
                continue
            for r in vdf.head(4).itertuples():
                split = split_neuron(model, cache, r.name)
                col = split.attrs["inputs"][0]
                w = r.score / split.attrs["cached"][col]
                query.append(
                    pd.DataFrame(
                        {
                            "prompt_id": pid,
                            "group": group,
                            "value_name": r.name,
                            "query_name": split["name"],
                            "query_kind": split["kind"],
                            "layer": split["layer"],
                            "score": split[col] * w,
                        }
                    )
                )
        # the exact tables of kind query: every query part's score summed over the top value neurons of a kind
        # (query_neuron_scores, which tests/test_study.py checks the runner's rows against), and the layer sums
        for kind in ("ffn_neuron", "attn_neuron"):
            ref = query_neuron_scores(ctx, n_value=N_VALUE[kind], value_kind=kind)
            ref = ref.assign(rank=ref.groupby("kind").cumcount() + 1)  # sorted by score: rank within the query kind
            totals.append(
                pd.DataFrame(
                    {
                        "prompt_id": pid,
                        "group": group,
                        "value_kind": kind,
                        "query_name": ref["name"],
                        "query_kind": ref["kind"],
                        "layer": ref["layer"],
                        "position": ref["position"],
                        "score": ref["score"],
                        "rank": ref["rank"],
                    }
                )
            )
            sums = ref.groupby(["kind", "layer"])["score"].sum().reset_index()
            qlayers.append(
                pd.DataFrame(
                    {
                        "prompt_id": pid,
                        "group": group,
                        "value_kind": kind,
                        "query_kind": sums["kind"],
                        "layer": sums["layer"],
                        "score": sums["score"],
                        "total_imp": ref.attrs["total_imp"],
                        "n_value": N_VALUE[kind],
                        "n_skipped": len(ref.attrs["skipped"]),
                    }
                )
            )
    return SimpleNamespace(
        parts=pd.concat(parts, ignore_index=True),
        layers=pd.concat(layers, ignore_index=True),
        stream=pd.DataFrame(stream),
        query=pd.concat(query, ignore_index=True),
        query_totals=pd.concat(totals, ignore_index=True),
        query_layers=pd.concat(qlayers, ignore_index=True),
        prompts=pd.DataFrame(prompts),
        manifest={"options": {"top_k": None, **QUERY_OPTIONS}},
        ctxs=ctxs,
    )


def _frozen_log_prob(model, ctx, vec) -> float:
    """log p(target) of ``vec`` under the frozen-scale final norm, written out: centre, times gamma / scale, W_U."""
    scale = float(tlm.cached(ctx.cache, "ln_final.hook_scale", 0)[-1].reshape(-1)[0])
    v = (vec - vec.mean()) * tlm.norm_weight(model, "final") / scale
    return float(torch.log_softmax(v @ tlm.W_U(model), -1)[ctx.target])


def _final_log_prob(model, ctx) -> float:
    n = tlm.model_spec(model).n_layers
    return _frozen_log_prob(model, ctx, tlm.cached(ctx.cache, f"blocks.{n - 1}.hook_resid_post", 0)[-1].float())


def _groups():
    return {"g1": [0, 1], "g2": [2, 3], "all": [0, 1, 2, 3]}


def test_table3_layer_contributions():
    s = study()
    out, fig = A.layer_contributions(s)
    for g, ids in _groups().items():
        row = out[out.group == g].iloc[0]
        for sub in ("attn", "mlp"):
            tables = [score_layers(s.ctxs[i], n_top_tokens=0) for i in ids]
            direct = sum(float(t.loc[t["kind"] == sub, "score"].sum()) for t in tables) / len(ids)
            assert row[sub] == pytest.approx(direct, abs=1e-9)
        assert row.n_prompts == len(ids)
    assert len(fig.data) == 2


def test_table4_and_table10_top_layers_and_heads():
    s = study()
    top = A.top_layers(s, k=3)
    heads = A.top_heads(s, k=2)
    for g, ids in _groups().items():
        acc: dict[str, float] = {}
        for i in ids:
            for r in score_layers(s.ctxs[i], n_top_tokens=0).itertuples():
                label = ("a" if r.kind == "attn" else "f") + str(r.layer)
                acc[label] = acc.get(label, 0.0) + r.score / len(ids)
        expect = sorted(acc, key=acc.get, reverse=True)[:3]
        assert top[top.group == g]["label"].tolist() == expect
        hacc: dict[str, float] = {}
        for i in ids:
            for r in score_heads(s.ctxs[i], n_top_tokens=0).itertuples():
                hacc[r.name] = hacc.get(r.name, 0.0) + r.score / len(ids)
        got = heads[heads.group == g]
        assert got["name"].tolist() == sorted(hacc, key=hacc.get, reverse=True)[:2]
        assert got["score"].tolist() == pytest.approx(sorted(hacc.values(), reverse=True)[:2])


def test_tables5_12_neuron_importance():
    s = study()
    out = A.neuron_importance(s, ks=(5, 20))
    for g, ids in _groups().items():
        for kind, fn in (("ffn_neuron", score_ffn_neurons), ("attn_neuron", score_attention_neurons)):
            scores = [sorted(fn(s.ctxs[i], top_k=None, n_top_tokens=0)["score"].tolist(), reverse=True) for i in ids]
            row = out[(out.group == g) & (out.kind == kind)].iloc[0]
            assert row["all"] == pytest.approx(sum(sum(x) for x in scores) / len(ids))
            assert row["positive"] == pytest.approx(sum(sum(v for v in x if v > 0) for x in scores) / len(ids))
            top5 = sum(sum(x[:5]) for x in scores) / len(ids)
            assert row["top5"] == pytest.approx(top5)
            assert row["share_top5"] == pytest.approx(top5 / row["all"])
    partial = SimpleNamespace(**{**vars(s), "manifest": {"options": {"top_k": 50}}})
    assert A.neuron_importance(partial)["all"].isna().all()
    with pytest.raises(InvalidInputError, match="every FFN neuron"):
        A.ffn_subvalue_counts(partial)


def test_table8_shared_neurons():
    s = study()
    out = A.shared_neurons(s, k=10, threshold=0.5)
    p = s.parts[(s.parts.method == "log_prob_increase") & s.parts.kind.isin(["ffn_neuron", "attn_neuron"])]
    for g, ids in _groups().items():
        counts: dict[str, int] = {}
        for i in ids:
            d = p[p.prompt_id == i].sort_values("score", ascending=False, kind="stable")
            units = []
            for n in d["name"]:
                u = ".".join(n.split(".")[:3]) if n.count(".") == 3 else n  # L.H.d.p -> L.H.d
                if u not in units:
                    units.append(u)
                if len(units) == 10:
                    break
            for u in units:
                counts[u] = counts.get(u, 0) + 1
        expect = {u for u, c in counts.items() if c / len(ids) > 0.5}
        row = out[(out.group == g) & (out.side == "value")].iloc[0]
        assert set(row["shared"]) == expect and row["n_shared"] == len(expect)
    # query side: per prompt, the 10 best distinct FFN query neurons of the attention value neurons
    qt = s.query_totals[(s.query_totals.value_kind == "attn_neuron") & (s.query_totals.query_kind == "ffn_neuron")]
    for g, ids in _groups().items():
        counts = {}
        for i in ids:
            names = qt[qt.prompt_id == i].sort_values("score", ascending=False, kind="stable")["query_name"]
            for n in list(dict.fromkeys(names))[:10]:
                counts[n] = counts.get(n, 0) + 1
        expect = {u for u, c in counts.items() if c / len(ids) > 0.5}
        row = out[(out.group == g) & (out.side == "query")].iloc[0]
        assert set(row["shared"]) == expect
    assert set(out["side"]) == {"value", "query"}


def test_figure2_layer_distribution_and_figure4_counts():
    s = study()
    out, fig = A.neuron_layer_distribution(s, k=7)
    p = s.parts
    for m in METHODS:
        sel = p[(p.kind == "ffn_neuron") & (p.method == m) & (p["rank"] <= 7)]
        for layer, n in sel.groupby("layer").size().items():
            row = out[(out.group == "all") & (out.method == m) & (out.layer == layer)].iloc[0]
            assert row["count"] == n and row["share"] == pytest.approx(n / (7 * 4))
    assert len(fig.data) == 3
    counts, _ = A.query_neuron_counts(s, k=6)
    qt = s.query_totals[(s.query_totals.value_kind == "attn_neuron") & (s.query_totals.query_kind == "ffn_neuron")]
    qv: dict[int, int] = {}
    qo: dict[int, int] = {}
    for i in range(4):
        mine = qt[qt.prompt_id == i].sort_values("score", ascending=False, kind="stable")
        top = mine.drop_duplicates("query_name").head(6)  # a neuron at several source positions counts once
        value = set(
            p[(p.prompt_id == i) & (p.method == "log_prob_increase") & (p.kind == "ffn_neuron") & (p["rank"] <= 6)][
                "name"
            ]
        )
        for n, layer in zip(top["query_name"], top["layer"]):
            d = qv if n in value else qo
            d[layer] = d.get(layer, 0) + 1
    allrows = counts[counts.group == "all"].set_index("layer")
    for layer in allrows.index:
        assert allrows.loc[layer, "query_value"] * 4 == pytest.approx(qv.get(layer, 0))
        assert allrows.loc[layer, "query_only"] * 4 == pytest.approx(qo.get(layer, 0))
    assert sum(qv.values()) + sum(qo.values()) == pytest.approx(
        (allrows["query_value"] + allrows["query_only"]).sum() * 4
    )
    with pytest.raises(InvalidInputError, match="ffn_neuron=50"):
        A.query_neuron_counts(
            SimpleNamespace(**{**vars(s), "manifest": {"options": {**QUERY_OPTIONS, "top_k": 10}}}), k=50
        )


def _label(kind: str, layer: int) -> str:
    return "e" if kind in ("embed", "pos_embed") else ("a" if kind.startswith("attn") else "f") + str(layer)


def test_tables6_14_top_query_layers():
    """The layer sums of ``query_layers`` averaged per label; every part of ``query_totals`` (complete here) summed
    per label gives the same; the key bias is left out."""
    s = study()
    for kind in ("ffn_neuron", "attn_neuron"):
        out = A.top_query_layers(s, kind, k=3)
        qt = s.query_totals[(s.query_totals.value_kind == kind) & (s.query_totals.query_kind != "key_bias")]
        acc: dict[str, float] = {}
        for r in qt.itertuples():
            acc[_label(r.query_kind, r.layer)] = acc.get(_label(r.query_kind, r.layer), 0.0) + r.score / 4
        got = out[out.group == "all"]
        assert got["label"].tolist() == sorted(acc, key=acc.get, reverse=True)[:3]
        assert got["score"].tolist() == pytest.approx(sorted(acc.values(), reverse=True)[:3])
        g1 = out[out.group == "g1"]
        ql = s.query_layers[(s.query_layers.value_kind == kind) & s.query_layers.prompt_id.isin([0, 1])]
        ql = ql[ql.query_kind != "key_bias"]
        direct = ql.assign(label=[_label(k, l) for k, l in zip(ql.query_kind, ql.layer)]).groupby("label")["score"]
        assert g1["score"].tolist() == pytest.approx(sorted((direct.sum() / 2).tolist(), reverse=True)[:3])
    with pytest.raises(InvalidInputError, match="--query-attn-values 200"):
        A.top_query_layers(s, "attn_neuron", n_value=200)
    # per prompt and value kind, the layer sums (key bias included) are the summed Imp of the value neurons used
    per = s.query_layers.groupby(["prompt_id", "value_kind"]).agg(score=("score", "sum"), imp=("total_imp", "first"))
    assert per["score"].to_numpy() == pytest.approx(per["imp"].to_numpy(), rel=1e-6)


def test_query_analyses_need_the_exact_tables():
    """(5) A run without ``query_totals`` / ``query_layers`` (an older run: only the truncated per-value-neuron
    ``query`` rows) is an error naming the option, never a sum of the truncated rows."""
    s = study()
    old = SimpleNamespace(**{**vars(s), "query_totals": None, "query_layers": None, "manifest": {"options": {}}})
    with pytest.raises(InvalidInputError, match="query_values"):
        A.top_query_layers(old, "ffn_neuron")
    with pytest.raises(InvalidInputError, match="query_attn_values"):
        A.top_query_layers(old, "attn_neuron")
    with pytest.raises(InvalidInputError, match="kind 'query'"):
        A.query_neuron_counts(old)
    with pytest.raises(InvalidInputError, match="kind 'query'"):
        A.shared_neurons(old)
    with pytest.raises(InvalidInputError, match="kind 'query'"):
        A.query_neuron_ablation(tiny(), old, k=5)
    assert set(A.shared_neurons(SimpleNamespace(**{**vars(old), "query": None}))["side"]) == {"value"}
    ffn_only = SimpleNamespace(**{**vars(s), "query_totals": s.query_totals[s.query_totals.value_kind == "ffn_neuron"]})
    with pytest.raises(InvalidInputError, match="query_attn_values"):
        A.query_neuron_ablation(tiny(), ffn_only, k=5)
    # a cut query_totals_k that keeps fewer than k distinct neurons is an error, not a shorter list
    cut = s.query_totals[s.query_totals["rank"] <= 3]
    small = SimpleNamespace(
        **{**vars(s), "query_totals": cut, "manifest": {"options": {**QUERY_OPTIONS, "query_totals_k": 3}}}
    )
    with pytest.raises(InvalidInputError, match="--query-totals-k"):
        A.query_neuron_counts(small, k=5)


def test_stream_and_subvalue_counts():
    s = study()
    out, _ = A.stream_log_prob(s)
    last = out[out.group == "all"].iloc[-1]
    # the last stream point is the final residual
    direct = sum(_final_log_prob(tiny(), s.ctxs[i]) for i in range(4)) / 4
    assert last["log_prob"] == pytest.approx(direct, abs=1e-4)
    counts, _ = A.ffn_subvalue_counts(s)
    for layer in (0, 1):
        helpful = sum(
            int((score_ffn_neurons(s.ctxs[i], top_k=None, layers=[layer], n_top_tokens=0)["score"] > 0).sum())
            for i in range(4)
        )
        assert counts[(counts.group == "all") & (counts.layer == layer)]["helpful"].iloc[0] == pytest.approx(
            helpful / 4
        )


def test_subvalue_counts_accept_a_run_that_stored_every_ffn_neuron():
    """(6) ``top_k={"ffn_neuron": None, "attn_neuron": 5}``: every FFN neuron stored, so Figure 6 is defined."""
    s = study()
    per_kind = SimpleNamespace(
        **{**vars(s), "manifest": {"options": {"top_k": {"ffn_neuron": None, "attn_neuron": 5}}}}
    )
    a, _ = A.ffn_subvalue_counts(per_kind)
    b, _ = A.ffn_subvalue_counts(s)
    pd.testing.assert_frame_equal(a, b)
    imp = A.neuron_importance(per_kind, ks=(5,))
    assert imp[imp.kind == "ffn_neuron"]["all"].notna().all() and imp[imp.kind == "attn_neuron"]["all"].isna().all()
    with pytest.raises(InvalidInputError, match="ffn_neuron=all"):
        A.ffn_subvalue_counts(SimpleNamespace(**{**vars(s), "manifest": {"options": {"top_k": {"ffn_neuron": 9}}}}))
    # a run without FFN neuron rows (e.g. kinds=("query",), which still records a default top_k) says so
    no_ffn = {"parts": s.parts[s.parts.kind != "ffn_neuron"], "manifest": {"options": {"top_k": 100}}}
    with pytest.raises(InvalidInputError, match="no rows of kind ffn_neuron"):
        A.ffn_subvalue_counts(SimpleNamespace(**{**vars(s), **no_ffn}))


def test_segment_curves_end_at_the_model_prediction():
    s = study()
    out, _ = A.segment_curves(tiny(), s, n_segments=4)
    end = out[(out.group == "all") & (out.segment == 4)]["log_prob"].iloc[0]
    assert end == pytest.approx(sum(_final_log_prob(tiny(), s.ctxs[i]) for i in range(4)) / 4, abs=1e-4)
    start = out[(out.group == "g2") & (out.segment == 0)]["log_prob"].iloc[0]
    direct = (
        sum(
            _frozen_log_prob(tiny(), s.ctxs[i], tlm.cached(s.ctxs[i].cache, "blocks.0.hook_resid_pre", 0)[-1])
            for i in (2, 3)
        )
        / 2
    )
    assert start == pytest.approx(direct, abs=1e-4)
    assert sorted(out["segment"].unique()) == [0, 1, 2, 3, 4]


def test_residual_paper_model_analyses():
    s, model = study(), tiny()
    add, _ = A.subvalue_additivity(model, s)
    ctx = s.ctxs[0]
    for layer in (0, 1):
        df = score_ffn_neurons(ctx, top_k=None, layers=[layer], n_top_tokens=0)
        helpful = df[df.score > 0]
        row = add[(add.prompt_id == 0) & (add.layer == layer)].iloc[0]
        assert row.n_helpful == len(helpful) and row.sum_of_scores == pytest.approx(helpful["score"].sum(), abs=1e-5)
        # C of the sum, written out: log p(t | resid_mid + sum_k m_k W_out[k]) - log p(t | resid_mid)
        mid = tlm.cached(ctx.cache, f"blocks.{layer}.hook_resid_mid", 0)[-1]
        post = tlm.cached(ctx.cache, f"blocks.{layer}.mlp.hook_post", 0)[-1]
        v = (post[helpful.neuron.tolist(), None] * tlm.W_out(model, layer)[helpful.neuron.tolist()]).sum(0)
        direct = float(ctx.lens.log_probs(mid + v)[ctx.target] - ctx.lens.log_probs(mid)[ctx.target])
        assert row.score_of_sum == pytest.approx(direct, abs=1e-4)
    sel = A.subvalue_selection(model, s, k=3)
    assert set(sel["method"]) == set(A.TABLE1_METHODS) and sel["score"].notna().all()
    share, _ = A.top10_share(model, s, k=200)  # k above d_mlp: the top-k is all, the share is 1
    assert share["helpful"].dropna().to_numpy() == pytest.approx(1.0)
    cl, _ = A.cross_layer_average(model, s, value_layer=1)
    assert cl[cl.group == "all"]["query"].iloc[0] == "embed"


def test_interventions_and_projections():
    s, model = study(), tiny()
    t11 = A.head_ablation(model, s, fraction=0.2)
    assert set(t11["heads_of"]) == {"g1", "g2"} and t11["heads"].map(len).eq(2).all()
    r = t11.iloc[0]
    assert r.mrr_decrease_pct == pytest.approx(100 * (1 - r.mrr_after / r.mrr_before))
    t7 = A.query_neuron_ablation(model, s, k=5)
    assert set(t7["selection"]) == {"query", "random"}
    proj = A.neuron_projections(model, ["L1.N3", "L0.H1.d2"], k=4)
    v = tlm.W_out(model, 1)[3].float()
    logits = ((v - v.mean()) * tlm.norm_weight(model, "final")) @ tlm.W_U(model)  # frozen lens up to a positive scale
    assert proj.loc[0, "top_tokens"] == [model.tokenizer.decode([int(i)]) for i in torch.topk(logits, 4).indices]
    with pytest.raises(InvalidInputError):
        A.neuron_projections(model, ["L1.attn"])
    t9 = A.shared_neuron_projections(model, s, k=3, n_per_group=2)
    assert {"top_tokens", "name", "side"} <= set(t9.columns)


def test_errors_name_what_is_missing():
    s = study()
    with pytest.raises(InvalidInputError, match="'layers'"):
        A.layer_contributions(SimpleNamespace(layers=None, prompts=s.prompts))
    with pytest.raises(InvalidInputError, match="no rows for method"):
        A.top_layers(s, method="norm")
    with pytest.raises(InvalidInputError, match="k must be"):
        A.top_layers(s, k=0)


def test_report_and_loader(tmp_path):
    s = study()
    for name in ("parts", "layers", "stream", "query", "query_totals", "query_layers", "prompts"):
        (tmp_path / name).mkdir()
        getattr(s, name).to_parquet(tmp_path / name / "rank0-00000.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps(s.manifest))
    loaded = A.load_study(str(tmp_path))
    assert len(loaded.parts) == len(s.parts)
    out = tmp_path / "report.html"
    n = A.write_report(loaded, str(out))
    text = out.read_text()
    assert n == 11 and "Table 3" in text and text.count("plotly.js v") <= 2 and "class='missing'" not in text
    with pytest.raises(InvalidInputError, match="not a study folder"):
        A.load_study(str(tmp_path / "nope"))
    from typer.testing import CliRunner

    from tl_residual.cli import app

    cli_out = tmp_path / "cli.html"
    r = CliRunner().invoke(app, ["study-report", str(tmp_path), "--html", str(cli_out)])
    assert r.exit_code == 0 and cli_out.exists() and "Table 4" in cli_out.read_text()
    r = CliRunner().invoke(app, ["study-report", str(tmp_path / "nope")])
    assert r.exit_code == 2


def test_faithfulness_reader(tmp_path):
    from tl_residual.faithfulness import read_prompts

    model = tiny()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "t5 t6", "target": " t7", "group": "a"}\n{"prompt": "t8 t9", "target_id": 3}\n')
    with pytest.raises(InvalidInputError, match="no such file"):
        read_prompts(model, str(tmp_path / "missing.jsonl"))
    path.write_text('{"prompt": "t5 t6", "target": " t7", "group": "a"}\n{"prompt": "t8 t9", "target": " t3"}\n')
    df = read_prompts(model, str(path))
    assert sorted(df["type"]) == ["a", "all"] and len(df) == 2
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["t1 t2"], "answer": [" t4 t5"]}).to_csv(csv, index=False)
    with pytest.raises(InvalidInputError, match="not one token"):
        read_prompts(model, str(csv))


def test_rank_table_buckets_equal_sorting():
    """The sort-free rank table gives exactly the ranks of a direct count over each row."""
    from tl_residual.faithfulness import target_rank_table
    from tl_residual.lens import Lens

    s, model = study(), tiny()
    lens = Lens(model, s.ctxs[0].cache, -1, 0, "frozen")
    targets = [3, 7, 7, 20, 0, 60]
    fast = target_rank_table(model, lens, targets, chunk_rows=24)
    ref = target_rank_table(model, lens, targets, algorithm="sort")
    few = target_rank_table(model, lens, targets[:3])
    assert all(torch.equal(few[t], ref[t]) for t in targets[:3])
    spec = tlm.model_spec(model)
    for t in set(targets):
        assert torch.equal(fast[t], ref[t])
        for layer in range(spec.n_layers):
            z = lens.logits(tlm.W_out(model, layer))
            direct = 1 + (z > z[:, t : t + 1]).sum(1)
            assert torch.equal(fast[t][layer * spec.d_mlp : (layer + 1) * spec.d_mlp], direct)


def test_visit_analyses():
    s, model = study(), tiny()
    out, _ = A.visit_intersections(model, s, k=5, n_values=3)
    # direct: prompt set "all", layer 1, head 0 against the final prediction's top-5 tokens
    vals = []
    for i in range(4):
        ctx = s.ctxs[i]
        final = torch.topk(ctx.lens.logits(tlm.cached(ctx.cache, "blocks.1.hook_resid_post", 0)[-1]), 5).indices
        z = tlm.cached(ctx.cache, "blocks.1.attn.hook_z", 0)[-1, 0]  # [d_head] of head 0
        head_out = z @ tlm.W_O(model, 1)[0]
        ids = torch.topk(ctx.lens.logits(head_out), 5).indices
        vals.append(len(set(ids.tolist()) & set(final.tolist())) / 5)
    got = out[(out.group == "all") & (out.layer == 1) & (out.component == "H0")]["with_final"].iloc[0]
    assert got == pytest.approx(sum(vals) / 4)
    reg = A.regularisation_neurons(model, s, k=3, layers=[0])
    top = reg.iloc[0]
    dh = []
    for i in range(4):
        ctx = s.ctxs[i]
        mid = tlm.cached(ctx.cache, "blocks.0.hook_resid_mid", 0)[-1]
        v = tlm.cached(ctx.cache, "blocks.0.mlp.hook_post", 0)[-1, top.neuron] * tlm.W_out(model, 0)[top.neuron]

        def ent(x, ctx=ctx):
            lp = ctx.lens.log_probs(x)
            return float(-(lp.exp() * lp).sum())

        dh.append(ent(mid + v) - ent(mid))
    assert top.mean_entropy_change == pytest.approx(sum(dh) / 4, abs=1e-5)
    nf = A.norm_filter(model, s, k=3)
    assert len(nf) == 2 * 2 + 1 and nf["promoted"].map(len).eq(3).all()


# ----------------------------------------------------------------------------------------------
# Residual-stream paper Appendix D (Tables 3, 4, Figure 19) and Appendix B (Figures 11, 12)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tiny3():
    """Three layers, so that Appendix D has lower, middle and upper FFN layers."""
    return make_bridge("gpt2", n_layers=3, seed=3) if HAS_BRIDGE else make_hooked("gpt2", n_layers=3, seed=3)


def _raw_ln(model, which, x):
    """A LayerNorm written out from the module's own weights: centre, divide by sqrt(var + eps), gamma, beta."""
    gamma, beta = raw_norm(model, which)
    x = x.double() - x.double().mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt() * gamma.double() + beta.double()


def _direct_roles(model, text, n_value, n_query, n_union, k):
    """Appendix D counts for one prompt, written from raw weights and the cache: C(k) by the frozen lens, inner
    products with the LN2-folded input weights, then plain top-k sets."""
    tokens = model.to_tokens(text)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    t = int(logits[0, -1].argmax())
    L = model.cfg.n_layers

    def logp(v):
        return torch.log_softmax(raw_frozen_logits(model, cache, v), -1)[..., t]

    C, sub, keys, mlp_out = [], [], [], []
    for l in range(L):
        mid = cache[f"blocks.{l}.hook_resid_mid"][0, -1].double()
        w_out = model.blocks[l].mlp.W_out.detach().double()
        vecs = cache[f"blocks.{l}.mlp.hook_post"][0, -1].double()[:, None] * w_out  # m_k W_out[k]
        C.append(logp(mid[None] + vecs) - logp(mid))
        sub.append(vecs)
        gamma, _ = raw_norm(model, f"{l}.ln2")
        kk = gamma.double()[:, None] * model.blocks[l].mlp.W_in.detach().double()
        scale = cache[f"blocks.{l}.ln2.hook_scale"][0, -1].double().reshape(-1)[0]
        keys.append((kk - kk.mean(0, keepdim=True)) / scale)  # q . key = contribution of q to the neuron's input
        mlp_out.append(cache[f"blocks.{l}.hook_mlp_out"][0, -1].double())
    rows = []
    for l in range(L):
        rec = {"layer": l}
        ups = [sub[l] @ (keys[u] @ C[u]) for u in range(l + 1, L)]  # Eq. 25 of every subvalue of l on layer u
        tops = set()
        for s in ups:
            tops |= set(torch.topk(s, n_query).indices.tolist())
        c = C[l].tolist()
        helpful = sorted((i for i in range(len(c)) if c[i] > 0), key=lambda i: -c[i])[:n_value]
        unhelpful = sorted((i for i in range(len(c)) if c[i] < 0), key=lambda i: c[i])[:n_value]
        rec["helpful_as_query"] = sum(i in tops for i in helpful) if ups else 0
        rec["unhelpful_as_query"] = sum(i in tops for i in unhelpful) if ups else 0
        union = set()
        for q in range(l):
            union |= set(torch.topk((mlp_out[q] @ keys[l]) * C[l], n_union).indices.tolist())
        rec["union_share"] = len(union) / (n_union * l) if l else float("nan")
        rec["query_score"] = sum(ups) if ups else None
        rows.append(rec)
    allc = torch.cat(C)
    d_mlp = model.cfg.d_mlp
    value_layers = (torch.topk(allc, k).indices // d_mlp).tolist()
    qs = torch.cat([r["query_score"] for r in rows if r["query_score"] is not None])
    query_layers = (torch.topk(qs, k).indices // d_mlp).tolist()
    for r in rows:
        r["value_top"] = value_layers.count(r["layer"])
        r["query_top"] = query_layers.count(r["layer"])
        del r["query_score"]
    return rows


def test_appendix_d_value_and_query_subvalues():
    model = tiny3()
    data = pd.DataFrame({"prompt": [p for p, _ in PROMPTS[:3]], "group": [g for _, g in PROMPTS[:3]]})
    roles = A.ffn_value_query_roles(model, data, n_value=3, n_query=8, n_union=4, k=20)
    for pid, text in enumerate(data["prompt"]):
        for exp in _direct_roles(model, text, 3, 8, 4, 20):
            got = roles[(roles.prompt_id == pid) & (roles.layer == exp["layer"])].iloc[0]
            for col, v in exp.items():
                assert got[col] == pytest.approx(v, nan_ok=True), (pid, exp["layer"], col)
    t3, fig3 = A.value_query_overlap(model, data, n_value=3, n_query=8, roles=roles)
    g1 = roles[(roles.group == "g1") & (roles.layer == 0)]
    hits = g1["helpful_as_query"].sum() + g1["unhelpful_as_query"].sum()
    row = t3[(t3.group == "g1") & (t3.layer == 0)].iloc[0]
    assert row.proportion == pytest.approx(hits / (g1["n_helpful"].sum() + g1["n_unhelpful"].sum()))
    assert math.isnan(t3[(t3.group == "all") & (t3.layer == 2)]["proportion"].iloc[0])  # no upper layer
    t4, _ = A.query_union(model, data, n_union=4, roles=roles)
    assert t4[(t4.group == "all") & (t4.layer == 2)]["union_share"].iloc[0] == pytest.approx(
        roles[roles.layer == 2]["union_share"].mean()
    )
    f19, fig19 = A.value_query_layers(model, data, k=20, roles=roles)
    allrows = f19[f19.group == "all"]
    assert allrows["value"].sum() == pytest.approx(20) and allrows["query"].sum() == pytest.approx(20)
    assert len(fig3.data) == 3 and len(fig19.data) == 2
    with pytest.raises(InvalidInputError, match="other parameters"):
        A.query_union(model, data, n_union=5, roles=roles)


def test_appendix_b_removal_methods():
    """Both methods against a direct recomputation of the attention subvalue from raw weights and the cache."""
    from tl_residual.bsvalues import bs_removal

    model = tiny3()
    tokens = model.to_tokens(PROMPTS[2][0])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    layer, src, dest, a, b = 2, 2, tokens.shape[1] - 1, 7, 9
    df = bs_removal(model, cache, tokens, a, b, layer, src_pos=src)
    attn = model.blocks[layer].attn
    W_Q, W_K, W_V, W_O = (getattr(attn, n).detach().double() for n in ("W_Q", "W_K", "W_V", "W_O"))
    b_Q, b_K, b_V = (getattr(attn, n).detach().double() for n in ("b_Q", "b_K", "b_V"))
    resid = cache[f"blocks.{layer}.hook_resid_pre"][0].double()  # [pos, d_model]
    q = torch.einsum("m,hmd->hd", _raw_ln(model, f"{layer}.ln1", resid[dest]), W_Q) + b_Q
    pattern0 = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, dest, src].double()

    def minus(vec):
        z = raw_frozen_logits(model, cache, vec)
        return float(z[a] - z[b])

    Ms = [cache["blocks.0.hook_resid_pre"][0, src]] + [
        cache[f"blocks.{j}.hook_{kind}_out"][0, src] for j in range(layer) for kind in ("attn", "mlp")
    ]
    assert df["removed"].tolist() == ["embed"] + [f"L{j}.{k}" for j in range(layer) for k in ("attn", "mlp")]
    before = None
    for i, M in enumerate([torch.zeros_like(Ms[0])] + Ms):
        x = resid.clone()
        x[src] = x[src] - M.double()
        normed = _raw_ln(model, f"{layer}.ln1", x)
        v = torch.einsum("m,hmd->hd", normed[src], W_V) + b_V  # [head, d_head]
        keys = torch.einsum("pm,hmd->hpd", normed[: dest + 1], W_K) + b_K[:, None]
        alpha = torch.softmax((keys @ q[:, :, None])[..., 0] / math.sqrt(W_K.shape[-1]), -1)[:, src]
        m1 = minus(torch.einsum("h,hd,hdm->m", alpha, v, W_O))
        m2 = minus(torch.einsum("h,hd,hdm->m", pattern0, v, W_O))
        if i == 0:
            before = m1
            assert m2 == pytest.approx(m1, abs=1e-5) and df.attrs["minus_before"] == pytest.approx(m1, abs=1e-4)
            continue
        row = df.iloc[i - 1]
        assert row.minus_method1 == pytest.approx(m1, abs=1e-4) and row.minus_method2 == pytest.approx(m2, abs=1e-4)
        assert row.drop_method1 == pytest.approx(before - m1, abs=1e-4)
    out, fig = A.bs_removal_average(model, pd.DataFrame({"prompt": [p for p, _ in PROMPTS]}), layer=2)
    per = out.attrs["per_prompt"]
    assert out[out.group == "all"]["drop_method2"].tolist() == pytest.approx(
        per.groupby("index")["drop_method2"].mean().tolist()
    )
    assert (out["n_prompts"] == 4).all() and len(fig.data) == 2


def test_report_has_the_appendix_sections_with_the_papers_numbers():
    sections = A.report_sections(study(), model=tiny(), max_prompts=2)
    appx = {s["title"].split(":")[0]: s for s in sections if s["title"].startswith("Appendix")}
    assert set(appx) == {
        "Appendix D, Table 3",
        "Appendix D, Table 4",
        "Appendix D, Figure 19",
        "Appendix B, Figures 11 / 12",
    }
    assert all(s["error"] is None and s["figure"] is not None for s in appx.values())
    t3 = appx["Appendix D, Table 3"]
    assert list(t3["table"].index) == ["g1", "all"] and list(t3["paper_table"].columns)[:2] == ["0", "1"]
    assert t3["paper_table"].loc["16-layer LM, one sentence", "0"] == pytest.approx(0.8)
