"""bs-value tables: the logit lens of parts and vectors (residual-stream paper section 3.1, Figures 9 and 10).

A vector's bs-values (before-softmax values) are its vocabulary projection under a :class:`~tl_residual.lens.Lens`
convention (logits; residual-stream paper Eq. 11-15). This module turns them into tables: the top and bottom tokens
of parts or vectors (:func:`bs_values`), two-token minus scores of layer outputs (:func:`bs_minus_layers`, Figure 10)
and of every part (:func:`bs_minus_parts`, section 5.2 and Appendix C), and chosen tokens along the residual stream
(:func:`bs_trajectory`, Figure 9). See ``docs/logit_lens.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import model as tlm
from tl_residual import tables
from tl_residual.decompose import PartGroup, iter_parts, layer_outputs, residual_stream
from tl_residual.errors import InvalidInputError
from tl_residual.lens import Convention, Lens, map_chunks, model_logits, resolve_target, target_rank


def token_ids(model: Any, tokens: Sequence[int | str]) -> list[int]:
    """Token ids of ``tokens`` (ids, or one-token strings such as ``" Paris"``), via
    :func:`~tl_residual.lens.resolve_target`.

    Raises:
        InvalidInputError: an empty list, or an entry that is not exactly one token or out of range.
    """
    if isinstance(tokens, (str, int)) or len(tokens) == 0:
        raise InvalidInputError(f"give a non-empty list of tokens, e.g. [' Paris', ' London'], got {tokens!r}")
    return [resolve_target(model, t) for t in tokens]


def _token_bs(lens: Lens, vectors: Float[Tensor, "n d_model"], ids: list[int]) -> Float[Tensor, "n k"]:
    """bs-values of ``vectors`` on the tokens ``ids`` only (``k`` columns of ``W_U``; no full projection)."""
    cols = lens.W_U[:, ids]
    if lens.convention == "recomputed":
        return lens.normalize(vectors.float()) @ cols + lens.b_U[ids]
    return lens.transform(vectors.float()) @ cols


def _named_rows(vectors: Any) -> tuple[list[str], Tensor]:
    if isinstance(vectors, PartGroup):
        return list(vectors.names), vectors.vectors
    if isinstance(vectors, Mapping):
        return [str(n) for n in vectors], torch.stack([torch.as_tensor(v).float() for v in vectors.values()])
    if isinstance(vectors, Tensor):
        mat = vectors[None] if vectors.dim() == 1 else vectors
        return [f"v{i}" for i in range(mat.shape[0])], mat
    raise InvalidInputError(
        f"vectors must be a PartGroup, a dict of name -> vector or a tensor, got {type(vectors).__name__}"
    )


def bs_values(
    model: Any,
    cache: Any,
    vectors: Any,
    target: int | str | None = None,
    position: int = -1,
    n_top_tokens: int = 5,
    convention: Convention = "frozen",
    batch: int = 0,
    *,
    k: int | None = None,
) -> pd.DataFrame:
    """Logit lens of parts or vectors: top and bottom tokens with their bs-values, the target's rank and probability.

    Residual-stream paper Eq. 11-15: a vector ``v``'s bs-values (before-softmax values) are its vocabulary
    projection under the lens ``convention`` (logits); its distribution is their softmax.

    Args:
        vectors: a :class:`~tl_residual.decompose.PartGroup` (rows named by its part names), a mapping
            ``name -> Float[Tensor, "d_model"]``, or a ``Float[Tensor, "n d_model"]`` / ``"d_model"`` tensor
            (rows named ``v0, v1, ...``).
        target: token to report (id or one-token string); default the model's top-1 at ``position``.
        n_top_tokens: how many top and bottom tokens (``k``: its former name, still accepted).

    Returns:
        One row per vector: ``name``, ``top_tokens``, ``top_bs`` (logits), ``bottom_tokens``, ``bottom_bs``,
        ``target_bs``, ``target_rank`` (1 = largest bs-value), ``target_prob`` (probability under ``softmax(bs)``).
        Projections are chunked (:data:`~tl_residual.lens.DEFAULT_CHUNK_SIZE` rows against ``W_U`` at a time).
        ``df.attrs["units"]`` is ``"logits"``.

    Raises:
        InvalidInputError: bad position, target, ``n_top_tokens`` or ``vectors``.
    """
    n_top = n_top_tokens if k is None else k
    names, mat = _named_rows(vectors)
    lens = Lens(model, cache, position, batch, convention)
    d_vocab = lens.W_U.shape[1]
    if not isinstance(n_top, int) or isinstance(n_top, bool) or not 1 <= n_top <= d_vocab:
        raise InvalidInputError(f"n_top_tokens must be an integer in 1..{d_vocab}, got {n_top!r}")
    if mat.dim() != 2 or mat.shape[1] != lens.W_U.shape[0]:
        raise InvalidInputError(f"vectors must have d_model={lens.W_U.shape[0]} columns, got shape {tuple(mat.shape)}")
    t = resolve_target(model, target, model_logits(model, cache, lens.position, batch) if target is None else None)

    def chunk(rows: slice) -> tuple[Tensor, ...]:
        z = lens.logits(mat[rows])
        top, bottom = torch.topk(z, n_top, dim=-1), torch.topk(z, n_top, dim=-1, largest=False)
        z_t = z[:, t]
        prob = torch.exp(z_t - torch.logsumexp(z, dim=-1))
        return top.indices, top.values, bottom.indices, bottom.values, z_t, target_rank(z, t), prob

    columns = ["name", "top_tokens", "top_bs", "bottom_tokens", "bottom_bs", "target_bs", "target_rank", "target_prob"]
    if mat.shape[0] == 0:
        df = pd.DataFrame(columns=columns)
    else:
        top_i, top_v, bot_i, bot_v, z_t, rank, prob = map_chunks(chunk, mat.shape[0])
        df = pd.DataFrame(
            {
                "name": names,
                "top_tokens": [[lens.token_str(x) for x in row] for row in top_i.tolist()],
                "top_bs": top_v.tolist(),
                "bottom_tokens": [[lens.token_str(x) for x in row] for row in bot_i.tolist()],
                "bottom_bs": bot_v.tolist(),
                "target_bs": z_t.tolist(),
                "target_rank": rank.long().tolist(),
                "target_prob": prob.tolist(),
            },
            columns=columns,
        )
    df.attrs.update(
        target=t, target_token=lens.token_str(t), position=lens.position, convention=convention, units="logits"
    )
    return df


def _minus_columns(bs: Float[Tensor, "n 2"]) -> dict[str, Any]:
    """The columns ``bs_a``, ``bs_b`` and ``minus = bs_a - bs_b`` (logits)."""
    return {"bs_a": bs[:, 0].numpy(), "bs_b": bs[:, 1].numpy(), "minus": (bs[:, 0] - bs[:, 1]).numpy()}


def _minus_attrs(lens: Lens, ids: list[int]) -> dict[str, Any]:
    """``df.attrs`` of a minus-score table: the two tokens, the position, the lens convention and the units."""
    return {
        "token_a": lens.token_str(ids[0]),
        "token_b": lens.token_str(ids[1]),
        "ids": ids,
        "position": lens.position,
        "convention": lens.convention,
        "units": "logits",
    }


def bs_minus_layers(
    model: Any,
    cache: Any,
    token_a: int | str,
    token_b: int | str,
    position: int = -1,
    convention: Convention = "frozen",
    with_bias: bool = True,
    batch: int = 0,
) -> pd.DataFrame:
    """bs-value minus score ``bs_a(v) - bs_b(v)`` of each layer-level part (residual-stream paper Figure 10).

    Rows: ``embed`` (the layer-0 input), then ``L{l}.attn`` (``hook_attn_out``) and ``L{l}.mlp``
    (``hook_mlp_out``) for every layer. ``with_bias=False`` removes ``b_O`` / ``b_out`` from each layer's output,
    as the paper's Figure 10 does. Under a linear lens the rows sum to the minus score of the final
    ``resid_post`` (with biases).

    Returns:
        Columns ``name``, ``kind`` (``embed``/``attn``/``mlp``), ``layer`` (-1 for the embedding), ``bs_a``,
        ``bs_b``, ``minus`` (logits). ``df.attrs`` holds the token ids and texts.

    Raises:
        InvalidInputError: a token that is not exactly one token, a bad position or convention.
    """
    ids = token_ids(model, [token_a, token_b])
    lens = Lens(model, cache, position, batch, convention)
    parts = layer_outputs(model, cache, lens.position, batch)
    vecs = []
    for _, layer, kind, vec in parts:
        if not with_bias and kind == "attn":
            vec = vec - tlm.b_O(model, layer)
        elif not with_bias and kind == "mlp":
            vec = vec - tlm.b_out(model, layer)
        vecs.append(vec)
    bs = _token_bs(lens, torch.stack(vecs), ids)
    df = pd.DataFrame(
        {
            "name": [p[0] for p in parts],
            "kind": [p[2] for p in parts],
            "layer": [p[1] for p in parts],
            **_minus_columns(bs),
        }
    )
    df.attrs.update(_minus_attrs(lens, ids), with_bias=with_bias)
    return df


def bs_minus_parts(
    model: Any,
    cache: Any,
    token_a: int | str,
    token_b: int | str,
    position: int = -1,
    layer: int = -1,
    stream: str = "resid_post",
    convention: Convention = "frozen",
    top_k: int | None = None,
    batch: int = 0,
) -> pd.DataFrame:
    """bs-value minus score ``bs_a - bs_b`` of every part (embeddings, head x position subvalues, FFN neurons,
    biases, registered sources) of ``blocks.{layer}.hook_{stream}[position]`` (residual-stream paper section 5.2,
    Appendix C: the FFN subvalues with the largest ``bs_Paris - bs_Bordeaux``).

    Streams the parts layer by layer (:func:`~tl_residual.decompose.iter_parts`); under a linear lens each part
    costs two dot products (``coefficient * T(direction) . (W_U[:, a] - W_U[:, b])``, no vocabulary projection),
    and the minus scores of all parts sum to that of the cached vector.

    Returns:
        The identifying columns of :mod:`tl_residual.tables` (``name``, ``kind``, ``layer``, ``head``, ``src_pos``,
        ``src_token``, ``neuron``), then ``coefficient``, ``bs_a``, ``bs_b``, ``minus`` (logits), sorted by
        ``minus``, largest first; the ``top_k`` largest if given.

    Raises:
        InvalidInputError: bad tokens, layer, position, stream, convention or ``top_k``.
    """
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")
    ids = token_ids(model, [token_a, token_b])
    lens = Lens(model, cache, position, batch, convention)
    tokens = tables.src_token_texts(model, cache, batch, lens.position + 1)
    frames = []
    for g in iter_parts(model, cache, layer, lens.position, stream, batch):  # type: ignore[arg-type]
        if lens.linear:
            bs = g.coefficients[:, None] * _token_bs(lens, g.directions, ids)
        else:
            bs = _token_bs(lens, g.vectors, ids)
        frames.append(tables.part_frame(g, src_tokens=tokens, coefficient=g.coefficients.numpy(), **_minus_columns(bs)))
    df = tables.concat(frames, ["coefficient", "bs_a", "bs_b", "minus"])
    df = df.sort_values("minus", ascending=False, kind="stable")
    df = (df.head(top_k) if top_k is not None else df).reset_index(drop=True)
    df.attrs.update(_minus_attrs(lens, ids))
    return df


def bs_trajectory(
    model: Any,
    cache: Any,
    tokens: Sequence[int | str],
    position: int = -1,
    convention: Convention = "frozen",
    value: Literal["bs", "prob", "rank"] = "bs",
    batch: int = 0,
) -> pd.DataFrame:
    """The chosen tokens' bs-values along the residual stream ``Lin0, Lres0, Lout0, Lres1, ...`` (Figure 9).

    ``value="bs"`` gives bs-values (logits), ``"prob"`` the probabilities under ``softmax`` of each stream
    vector's bs-values, ``"rank"`` the tokens' ranks (1 = top). Under the default ``frozen`` lens the final-norm
    scale of the last residual is used for every row, so successive rows differ by exactly the bs-values of the
    layer-level part added (``bs(Lout_l) - bs(Lres_l) = bs(FFN_l)``); ``"recomputed"`` is the classic logit lens
    (each stream vector normalised by itself, ``b_U`` added).

    Returns:
        One row per stream vector: ``stream`` (``Lin0``, ``Lres0``, ``Lout0``, ...), ``layer``, then one column per
        token, named by its text (e.g. ``" Paris"``).

    Raises:
        InvalidInputError: bad tokens, position, convention or ``value``.
    """
    if value not in ("bs", "prob", "rank"):
        raise InvalidInputError(f"value {value!r} is not one of 'bs', 'prob', 'rank'")
    ids = token_ids(model, tokens)
    lens = Lens(model, cache, position, batch, convention)
    stream = residual_stream(model, cache, lens.position, batch)
    mat = torch.stack([v for _, v in stream])
    if value == "bs":
        out = _token_bs(lens, mat, ids)
    else:
        z = lens.logits(mat)
        if value == "prob":
            out = torch.softmax(z, dim=-1)[:, ids]
        else:
            out = torch.stack([target_rank(z, t) for t in ids], dim=1)
    names = [n for n, _ in stream]
    df = pd.DataFrame({"stream": names, "layer": [int(n[3:] if n.startswith("Lin") else n[4:]) for n in names]})
    for j, t in enumerate(ids):
        df[lens.token_str(t)] = out[:, j].numpy()
    units = {"bs": "logits", "prob": "probability", "rank": "rank"}[value]
    df.attrs.update(ids=ids, value=value, position=lens.position, convention=convention, units=units)
    return df


def bs_removal(
    model: Any,
    cache: Any,
    tokens: Any,
    token_a: int | str,
    token_b: int | str,
    layer: int,
    src_pos: int | None = None,
    position: int = -1,
    convention: Convention = "frozen",
    batch: int = 0,
) -> pd.DataFrame:
    """How removing each layer-level vector from an attention subvalue's input changes its bs-value minus score
    (residual-stream paper section 5.1 and Appendix B, Figures 11 and 12).

    The attention subvalue of ``layer`` from source ``src_pos`` to destination ``position`` is the sum over heads
    of ``pattern[h, position, src_pos] * (v[src_pos, kv(h)] @ W_O[h])`` (Eq. 7-8). Its input at the source is
    ``Lin_layer[src_pos] = resid_pre``, the sum of the layer-level vectors ``M``: the layer-0 input (``embed``) and
    ``L{j}.attn``, ``L{j}.mlp`` for ``j < layer`` (Eq. 2-4, :func:`~tl_residual.decompose.layer_outputs` at
    ``src_pos``). For each ``M``, ``resid_pre[src_pos]`` is replaced by ``resid_pre[src_pos] - M`` (one batched
    forward pass of the model, one row per ``M``, through a hook on ``blocks.{layer}.hook_resid_pre``; the norm is
    recomputed) and the subvalue rebuilt:

    * method 1: from the new attention weights and the new values (keys and values at ``src_pos`` change; the
      query at ``position`` too when ``src_pos == position``);
    * method 2: from the original attention weights ``pattern[h, position, src_pos]`` and the new values.

    The score is ``minus = bs_a - bs_b`` of the subvalue (logits, under the lens of ``cache`` at ``position``);
    ``drop = minus_before - minus_after`` is how much of the minus score ``M`` is responsible for.

    Args:
        tokens: ``Int[Tensor, "batch pos"]``, the tokens ``cache`` was computed on (row ``batch`` is used).
        layer: the attention layer (the paper: layer 15, the last of its 16).
        src_pos: the source position (the paper: 4, the token "France"); default: the source position whose
            subvalue has the largest minus score.

    Returns:
        One row per ``M`` in stream order: ``index`` (0 = ``embed``, then ``L0.attn``, ``L0.mlp``, ...),
        ``removed``, ``kind`` (``embed``/``attn``/``mlp``), ``layer`` (-1 for the embedding), ``minus_method1``,
        ``minus_method2``, ``drop_method1``, ``drop_method2`` (logits). ``df.attrs``: ``minus_before``, ``layer``,
        ``src_pos``, ``position`` and the tokens.

    Raises:
        InvalidInputError: bad tokens, layer, positions or convention.
        UnsupportedArchitectureError: a norm after the attention output (its scale would have to be frozen).
        TLResidualError: the unmodified row of the batched pass does not reproduce the cached subvalue (the
            safety net).
    """
    from tl_residual.decompose import n_positions, pattern_and_values, resolve_layer, resolve_position
    from tl_residual.errors import TLResidualError, UnsupportedArchitectureError

    spec = tlm.model_spec(model)
    if spec.post_attn_norm:
        raise UnsupportedArchitectureError(
            f"{spec.architecture}: a norm after the attention output; bs_removal would have to freeze its scale"
        )
    layer = resolve_layer(layer, spec.n_layers)
    ids = token_ids(model, [token_a, token_b])
    lens = Lens(model, cache, position, batch, convention)
    dest = lens.position
    w_o = tlm.W_O(model, layer).float()

    def subvalues(pattern: Tensor, v: Tensor) -> Float[Tensor, "src d_model"]:
        return torch.einsum("hs,shd,hdm->sm", pattern.float(), v.float(), w_o)

    pattern0, v0 = pattern_and_values(model, cache, layer, dest, batch)
    before = subvalues(pattern0, v0)  # [src, d_model], the cached subvalues of every source position
    minus0 = _token_bs(lens, before, ids)
    minus0 = minus0[:, 0] - minus0[:, 1]
    if src_pos is None:
        src_pos = int(torch.argmax(minus0))
    elif not isinstance(src_pos, int) or isinstance(src_pos, bool) or not -(dest + 1) <= src_pos <= dest:
        raise InvalidInputError(f"src_pos {src_pos!r} is out of range: sources of position {dest} are 0..{dest}")
    src_pos = resolve_position(src_pos, dest + 1)
    removed = [p for p in layer_outputs(model, cache, src_pos, batch) if p[1] < layer]
    deltas = torch.stack([torch.zeros_like(removed[0][3])] + [p[3] for p in removed]).float()  # row 0: nothing
    toks = torch.as_tensor(tokens)
    toks = toks[batch : batch + 1] if toks.dim() == 2 else toks.reshape(1, -1)
    if toks.shape[-1] != n_positions(cache):
        raise InvalidInputError(f"tokens have {toks.shape[-1]} positions, the cache {n_positions(cache)}")
    toks = toks.expand(len(deltas), -1)

    def subtract(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        x[:, src_pos, :] = x[:, src_pos, :] - deltas.to(x.device, x.dtype)
        return x

    wanted = {tlm.hook_name("pattern", layer), tlm.hook_name("v", layer), tlm.hook_name("resid_pre", 0)}
    with torch.no_grad(), model.hooks(fwd_hooks=[(tlm.hook_name("resid_pre", layer), subtract)]):
        _, runs = model.run_with_cache(toks, names_filter=lambda name: name in wanted)
    new1, new2 = [], []
    for i in range(len(deltas)):
        pattern, v = pattern_and_values(model, runs, layer, dest, i)
        new1.append(subvalues(pattern[:, src_pos : src_pos + 1], v[src_pos : src_pos + 1])[0])
        new2.append(subvalues(pattern0[:, src_pos : src_pos + 1], v[src_pos : src_pos + 1])[0])
    err = float((new1[0] - before[src_pos]).norm() / before[src_pos].norm().clamp_min(1e-12))
    if not err <= 1e-3:
        raise TLResidualError(
            f"the unmodified batched pass misses the cached subvalue of layer {layer}, source {src_pos} by {err:.2e} "
            "(relative); the removal scores would not be comparable"
        )
    bs1, bs2 = _token_bs(lens, torch.stack(new1), ids), _token_bs(lens, torch.stack(new2), ids)
    m1, m2 = (bs1[:, 0] - bs1[:, 1]).double(), (bs2[:, 0] - bs2[:, 1]).double()
    before_minus = float(minus0[src_pos])
    df = pd.DataFrame(
        {
            "index": range(len(removed)),
            "removed": [p[0] for p in removed],
            "kind": [p[2] for p in removed],
            "layer": [p[1] for p in removed],
            "minus_method1": m1[1:].numpy(),
            "minus_method2": m2[1:].numpy(),
            "drop_method1": (before_minus - m1[1:]).numpy(),
            "drop_method2": (before_minus - m2[1:]).numpy(),
        }
    )
    df.attrs.update(
        _minus_attrs(lens, ids), minus_before=before_minus, layer=layer, src_pos=src_pos, relative_error=err
    )
    return df
