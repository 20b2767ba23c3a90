"""Part tables: the one column schema of every table that lists parts of the residual stream.

Every table of parts (:func:`tl_residual.decompose.decompose`, the score tables of :mod:`tl_residual.scorers`,
the query splits of :mod:`tl_residual.query`, the bs-value minus scores of :mod:`tl_residual.bsvalues`) starts
with the identifying columns of :data:`ID_COLUMNS`, in that order, and carries only those its rows use: a table of
layer outputs has ``name, kind, layer``; a table of FFN neurons adds ``neuron``; a table of attention neurons adds
``head, dim, src_pos, src_token``. Which kind uses which index is :mod:`tl_residual.names`' vocabulary. In a table
mixing kinds (a decomposition, a query split), a row whose kind lacks an index column holds ``-1`` there (and
``""`` under ``src_token``). The value columns (``score``, ``coefficient``, ``minus``, ...) follow.

``src_token`` is the text of the token at ``src_pos``, recovered from the cache (:func:`src_token_texts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from tl_residual import model as tlm
from tl_residual.names import FIELDS

#: The identifying columns of every part table, in order (a table keeps those its kinds use).
ID_COLUMNS: tuple[str, ...] = ("name", "kind", "layer", "head", "dim", "src_pos", "src_token", "neuron", "expert")
#: The integer index columns (``-1`` in a row whose kind lacks the index).
INDEX_COLUMNS: tuple[str, ...] = ("head", "dim", "src_pos", "neuron", "expert")


def index_columns(kind: str, index_keys: Iterable[str] = ()) -> list[str]:
    """The index columns a part of ``kind`` carries (from :data:`tl_residual.names.FIELDS`; for a kind outside
    the vocabulary, e.g. a registered source, the keys of its group's ``index``)."""
    used = set(FIELDS.get(kind, ())) | set(index_keys)
    return [c for c in INDEX_COLUMNS if c in used]


def part_frame(
    group: Any,
    picks: Tensor | None = None,
    src_tokens: Sequence[str] | None = None,
    **values: Any,
) -> pd.DataFrame:
    """The identifying columns of the parts ``picks`` (default: all) of a
    :class:`~tl_residual.decompose.PartGroup`, followed by ``values`` (columns of the same length, or scalars).

    ``src_tokens`` are the prompt's token texts (``src_token`` is added where the group has ``src_pos``).
    """
    idx = torch.arange(len(group)) if picks is None else picks.long().cpu()
    n = len(idx)
    cols: dict[str, Any] = {
        "name": [group.names[i] for i in idx.tolist()],
        "kind": [group.kind] * n,
        "layer": [-1 if group.layer is None else int(group.layer)] * n,
    }
    for c in index_columns(group.kind, group.index):
        cols[c] = group.index[c][idx].cpu().numpy() if c in group.index else [-1] * n
        if c == "src_pos":
            toks = list(src_tokens or [])
            cols["src_token"] = [toks[p] if 0 <= p < len(toks) else "" for p in list(cols["src_pos"])]
    cols.update(values)
    return pd.DataFrame(cols, index=range(n))


def concat(
    frames: Sequence[pd.DataFrame], value_columns: Sequence[str] = (), kinds: Iterable[str] = ()
) -> pd.DataFrame:
    """Stack part tables: identifying columns in :data:`ID_COLUMNS` order (those some frame has, and those of
    ``kinds``, the kinds the table can hold), then the value columns; ``-1`` / ``""`` where a row's kind lacks an
    index."""
    frames = [f for f in frames if len(f)]
    expected = {c for k in kinds for c in index_columns(k)}
    if "src_pos" in expected:
        expected.add("src_token")
    if not frames:
        ids = [c for c in ID_COLUMNS if c in {"name", "kind", "layer"} | expected]
        return pd.DataFrame(columns=[*ids, *value_columns])
    df = pd.concat(frames, ignore_index=True)
    for c in expected - set(df.columns):
        df[c] = "" if c == "src_token" else -1
    ids = [c for c in ID_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in ids]
    df = df[ids + rest]
    for c in INDEX_COLUMNS:
        if c in df.columns and df[c].isna().any():
            df[c] = df[c].fillna(-1).astype("int64")
    if "src_token" in df.columns:
        df["src_token"] = df["src_token"].fillna("")
    return df


def src_token_texts(model: Any, cache: Any, batch: int = 0, n_pos: int | None = None) -> list[str]:
    """The text of each token of the cached prompt, recovered from ``hook_embed`` (the embedding lookup
    ``W_E[token]``: a position's token is the row of ``W_E`` equal to its cached embedding).

    Exact: a position whose cached embedding equals no row of ``W_E`` exactly (e.g. an embedding scaled inside the
    hook) gets ``""``. Cost: one ``[n_pos, d_model] x [d_model, d_vocab]`` product. ``n_pos`` limits the
    positions recovered (default: all).
    """
    emb = tlm.cached(cache, "hook_embed", batch)
    if n_pos is not None:
        emb = emb[:n_pos]
    w_e = tlm.W_E(model).to(emb.device)
    dist = w_e.pow(2).sum(-1)[None, :] - 2 * emb @ w_e.T  # ||W_E[t] - e||^2 - ||e||^2
    ids = dist.argmin(-1).tolist()
    tokenizer = getattr(model, "tokenizer", None)
    out = []
    for p, t in enumerate(ids):
        if not torch.equal(w_e[t], emb[p]):
            out.append("")
        elif tokenizer is None:
            out.append(f"<{t}>")
        else:
            out.append(tokenizer.decode([int(t)]))
    return out
