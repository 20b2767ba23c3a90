"""Query side: which upstream parts switched a neuron on.

A neuron's input is a linear read of a normalised residual. For an FFN neuron ``k`` of layer ``l`` at position
``i`` (residual-stream paper section 3.3, Eq. 20-23; ``docs/query.md``):

    pre_k = LN2(resid_mid_l[i]) . W[:, k] + b[k]
          = sum_j c(part_j) . K_k / sigma + B_k,        K_k = gamma ⊙ W[:, k],   B_k = beta . W[:, k] + b[k]

where ``part_j`` runs over every part of ``resid_mid_l[i]`` (:func:`tl_residual.decompose.iter_parts`:
embeddings, every attention head x source-position subvalue of layers ``<= l``, every FFN neuron of layers
``< l``, the biases, and any registered custom source), ``sigma`` is the cached ``blocks.{l}.ln2.hook_scale``
and ``c(.)`` subtracts the mean over ``d_model`` (LayerNorm; RMSNorm has no centring and no ``beta``). Since
``c`` is a symmetric projection, ``c(part) . K = part . c(K)``: the *folded key* ``c(K_k) / sigma`` is computed
once and every part's contribution is one dot product. The split is exact: contributions plus ``B_k`` sum to the
cached pre-activation to float precision.

Which hook is which (checked in TransformerLens 3.x ``HookedTransformer`` and 4.x ``TransformerBridge``):

* GELU MLP (GPT-2): ``mlp.hook_pre = LN2(x) @ W_in + b_in`` (input ``"pre"``).
* Gated MLP (Llama, SmolLM2): ``mlp.hook_pre = LN2(x) @ W_gate (+ b_gate)`` (input ``"gate"``) and
  ``mlp.hook_pre_linear = LN2(x) @ W_in`` (input ``"up"``); ``hook_post = act(gate) * up``. The bridge adds the
  up-projection's bias (if any) inside ``hook_pre_linear``; ``HookedTransformer``'s gated MLP adds ``b_in``
  *after* the product, so it is not part of either input there.

An attention value neuron (layer ``l``, head ``h``, head dimension ``d``, source position ``p``) reads
``v[p, kv(h), d] = LN1(resid_pre_l[p]) . W_V[kv(h)][:, d] + b_V[kv(h), d]`` with ``ln1.hook_scale`` at ``p``
(input ``"value"``; under ``fold_value_biases`` ``b_V`` is zero and ``hook_v`` excludes it).

Units: contributions are in the units of the pre-activation (the input of the activation function).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import model as tlm
from tl_residual import names, tables
from tl_residual.decompose import (
    PartGroup,
    Stream,
    base_stream,
    ffn_parts,
    iter_parts,
    iter_parts_marked,
    layer_outputs,
    n_positions,
    resolve_layer,
    resolve_position,
    verify_exact,
)
from tl_residual.errors import InvalidInputError, UnsupportedArchitectureError
from tl_residual.names import ComponentRef
from tl_residual.scorers import ScoringContext, get_scorer, score

Input = Literal["pre", "gate", "up", "value"]

#: Kinds of value neurons whose input can be split (:mod:`tl_residual.names`): FFN neurons and attention neurons.
ValueKind = Literal["ffn_neuron", "attn_neuron"]
_OLD_VALUE_KINDS = {"ffn": "ffn_neuron", "attn": "attn_neuron"}

#: The kinds of parts a residual stream holds (the columns of every split table, whatever the stream).
STREAM_KINDS: tuple[str, ...] = ("embed", "pos_embed", "attn_subvalue", "attn_bias", "ffn_neuron", "ffn_bias")

#: A value neuron is a :class:`~tl_residual.names.ComponentRef` of kind ``ffn_neuron`` or ``attn_neuron``
#: (the former name of the type, kept for compatibility).
NeuronRef = ComponentRef


def parse_neuron(model: Any, name: str, n_pos: int | None = None) -> ComponentRef:
    """Parse (:func:`tl_residual.names.parse`) and range-check ``L24.N1005`` (FFN neuron) or ``L23.H4.d10.p4``
    (attention value neuron).

    Raises:
        InvalidInputError: a malformed name, a name of another kind, or a layer, neuron, head, head dimension or
            source position out of range (the message gives the valid range).
    """
    ref = names.parse(name)
    if ref.kind not in ("ffn_neuron", "attn_neuron"):
        raise InvalidInputError(
            f"{name!r} is a {ref.kind}, not a neuron: use L{{layer}}.N{{neuron}} for an FFN neuron (e.g. L24.N1005) "
            f"or L{{layer}}.H{{head}}.d{{dim}}.p{{source position}} for an attention value neuron (e.g. L23.H4.d10.p4)"
        )
    return ref.check(tlm.model_spec(model), n_pos)


def _read_norm(model: Any, kind: str, layer: int) -> tuple[Stream, str]:
    """The stream a neuron of ``kind`` reads (:func:`~tl_residual.decompose.base_stream` of the model: ``resid_pre``
    for FFN neurons of parallel attention+MLP blocks) and the norm in front of it (``{layer}.ln1`` before attention,
    :func:`tl_residual.model.mlp_norm` before the FFN: ``{layer}.ln2``, or ``{layer}.ln1`` where the block shares
    one norm)."""
    stream = base_stream(kind, tlm.model_spec(model))
    assert stream is not None
    attention = base_stream(kind) == "resid_pre"
    return stream, f"{layer}.ln1" if attention else tlm.mlp_norm(model, layer)


# ----------------------------------------------------------------------------------------------
# Keys: the weight columns a neuron reads with, and its bias
# ----------------------------------------------------------------------------------------------


def ffn_inputs(model: Any) -> tuple[Input, ...]:
    """The linear inputs of an FFN neuron: ``("pre",)`` for a GELU MLP, ``("gate", "up")`` for a gated MLP."""
    return ("gate", "up") if tlm.model_spec(model).gated_mlp else ("pre",)


def ffn_key(
    model: Any, layer: int, neurons: Sequence[int] | Tensor, which: Input = "pre"
) -> tuple[Float[Tensor, "d_model k"], Float[Tensor, " k"], str]:
    """Raw read weights ``W[:, k]``, bias ``b[k]`` and cached hook of FFN neurons' input ``which``.

    ``which``: ``"pre"`` (GELU MLP: ``W_in``, ``b_in``, ``mlp.hook_pre``), ``"gate"`` (gated: ``W_gate``,
    ``b_gate``, ``mlp.hook_pre``) or ``"up"`` (gated: ``W_in``, ``mlp.hook_pre_linear``; bias ``b_in`` on a
    ``TransformerBridge``, none on a ``HookedTransformer``, which adds ``b_in`` after ``act(gate) * up``).

    Raises:
        InvalidInputError: ``which`` does not fit the MLP (the message lists the valid inputs).
    """
    spec = tlm.model_spec(model)
    valid = ffn_inputs(model)
    if which not in valid:
        raise InvalidInputError(f"input {which!r} does not exist for this model's MLP; use one of {', '.join(valid)}")
    idx = torch.as_tensor(neurons, dtype=torch.long)
    if which == "gate":
        w, b, hook = tlm.W_gate(model, layer), tlm.b_gate(model, layer), "hook_pre"
    elif which == "up":
        w, hook = tlm.W_in(model, layer), "hook_pre_linear"
        b = tlm.b_in(model, layer) if spec.is_bridge else torch.zeros_like(tlm.b_in(model, layer))
    else:
        w, b, hook = tlm.W_in(model, layer), tlm.b_in(model, layer), "hook_pre"
    return w[:, idx], b[idx], f"blocks.{layer}.mlp.{hook}"


def value_key(
    model: Any, layer: int, head: int, dims: Sequence[int] | Tensor
) -> tuple[Float[Tensor, "d_model k"], Float[Tensor, " k"], str]:
    """Raw read weights ``W_V[kv(h)][:, d]``, bias ``b_V[kv(h), d]`` and hook ``attn.hook_v`` of value neurons.

    ``kv(h) = h // (n_heads / n_key_value_heads)`` under grouped-query attention.
    """
    spec = tlm.model_spec(model)
    kv = head // spec.heads_per_kv
    idx = torch.as_tensor(dims, dtype=torch.long)
    return tlm.W_V(model, layer)[kv][:, idx], tlm.b_V(model, layer)[kv][idx], f"blocks.{layer}.attn.hook_v"


def folded_key(
    model: Any, cache: Any, norm: str, position: int, weights: Float[Tensor, "d_model k"], batch: int = 0
) -> Float[Tensor, "d_model k"]:
    """The LN-folded key ``c(gamma ⊙ W[:, k]) / sigma`` (residual-stream paper Eq. 22-23).

    ``norm`` is ``"{layer}.ln1"`` or ``"{layer}.ln2"``; ``sigma`` is the cached ``blocks.{layer}.{ln}.hook_scale``
    at ``position`` (it includes ``eps``); ``c`` centres over ``d_model`` for LayerNorm (``E lambda_K`` of Eq. 23)
    and is the identity for RMSNorm. Then ``part . folded_key`` is the part's exact contribution to the neuron's
    input, and the contributions of all parts of the normalised residual plus :func:`key_bias` sum to it.

    Raises:
        MissingHookError: the cache lacks the norm's ``hook_scale``.
    """
    spec = tlm.model_spec(model)
    if not spec.pre_norm:
        raise UnsupportedArchitectureError(
            f"{spec.architecture}: the sublayers read the residual without a norm before them (norms only after the "
            "sublayer output); query splits through a pre-norm are not defined for it"
        )
    layer, ln = norm.split(".")
    sigma = tlm.cached(cache, f"blocks.{layer}.{ln}.hook_scale", batch)[position].reshape(-1)[0]
    k = tlm.norm_weight(model, norm)[:, None].double() * weights.double()
    if spec.norm == "LN":
        k = k - k.mean(dim=0, keepdim=True)
    return (k / sigma.double()).float()


def key_bias(
    model: Any, norm: str, weights: Float[Tensor, "d_model k"], bias: Float[Tensor, " k"]
) -> Float[Tensor, " k"]:
    """``B_k = beta . W[:, k] + b[k]`` (residual-stream paper Eq. 23): the part of the input no residual part writes."""
    return tlm.norm_bias(model, norm) @ weights + bias


def iter_query_contributions(
    model: Any,
    cache: Any,
    key: Float[Tensor, "d_model k"],
    layer: int,
    stream: Stream,
    position: int,
    batch: int = 0,
) -> Iterator[tuple[PartGroup, Float[Tensor, "n k"]]]:
    """Stream ``(group, contributions)`` for every part of ``blocks.{layer}.hook_{stream}[position]``.

    ``contributions[j, k] = coefficient_j * (direction_j . key[:, k])`` (float64 accumulation, returned as
    float64), one layer's groups at a time (:func:`~tl_residual.decompose.iter_parts`).
    """
    key64 = key.double()
    total = None
    for group in iter_parts(model, cache, layer, position, stream, batch):
        coefficients, directions = group.coefficients.double(), group.directions.double()  # converted once
        part = coefficients @ directions
        total = part if total is None else total + part
        yield group, coefficients[:, None] * (directions @ key64)
    assert total is not None  # iter_parts always yields the embedding
    verify_exact(model, cache, total, layer, position, stream, batch, "the query split's parts")  # safety net


# ----------------------------------------------------------------------------------------------
# Exact splits as tables
# ----------------------------------------------------------------------------------------------


def _split_table(
    model: Any,
    cache: Any,
    layer: int,
    stream: Stream,
    position: int,
    norm: str,
    columns: dict[str, tuple[Tensor, Tensor, str, int]],
    batch: int,
    label: str,
    reference: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Shared body: ``columns`` maps a column name to ``(weights [d_model, 1], bias [1], hook, index)``;
    ``reference`` (expert neurons) gives each input's value where no hook caches it."""
    cols = list(columns)
    weights = torch.cat([columns[c][0] for c in cols], dim=1)
    key = folded_key(model, cache, norm, position, weights, batch)
    frames, contribs = [], []
    tokens = tables.src_token_texts(model, cache, batch, position + 1)
    for group, contrib in iter_query_contributions(model, cache, key, layer, stream, position, batch):
        frames.append(tables.part_frame(group, src_tokens=tokens))
        contribs.append(contrib)
    bias = torch.stack([key_bias(model, norm, columns[c][0], columns[c][1])[0] for c in cols]).double()
    frames.append(pd.DataFrame({"name": [f"{label}.B"], "kind": ["key_bias"], "layer": [layer]}))
    contribs.append(bias[None, :])
    df = tables.concat(frames, kinds=STREAM_KINDS)
    values = torch.cat(contribs)
    for i, c in enumerate(cols):
        df[c] = values[:, i].numpy()
    cached = (
        reference
        if reference is not None
        else {c: float(tlm.cached(cache, columns[c][2], batch)[position].reshape(-1)[columns[c][3]]) for c in cols}
    )
    df.attrs.update(
        neuron=label,
        position=position,
        inputs=cols,
        hooks={c: columns[c][2] for c in cols},
        cached=cached,
        abs_error={c: abs(float(values[:, i].sum()) - cached[c]) for i, c in enumerate(cols)},
        units="pre-activation",
        norm=norm,
        stream=f"blocks.{layer}.hook_{stream}",
    )
    return df


def split_ffn_neuron(
    model: Any, cache: Any, layer: int, neuron: int, position: int = -1, batch: int = 0
) -> pd.DataFrame:
    """Split FFN neuron ``L{layer}.N{neuron}``'s input(s) at ``position`` over every part of ``resid_mid``.

    Residual-stream paper Eq. 20-23 with the cached ``ln2.hook_scale`` and centring folded in (see the module
    doc). One row per part of ``blocks.{layer}.hook_resid_mid[position]`` (columns ``name, kind, layer, head,
    src_pos, neuron``) plus the row ``L{l}.N{k}.B`` (kind ``key_bias``: ``beta . W[:, k] + b[k]``), and one
    contribution column per input: ``pre`` (GELU MLP) or ``gate`` and ``up`` (gated MLP). Each column sums to the
    cached hook value (``df.attrs["cached"]``; ``df.attrs["abs_error"]`` gives the difference). Rows in stream
    order (use :func:`top_query_parts` to rank).

    Raises:
        InvalidInputError: layer, neuron or position out of range.
        MissingHookError: the cache lacks ``ln2.hook_scale`` or the MLP hooks.
    """
    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    position = resolve_position(position, n_positions(cache))
    if not isinstance(neuron, int) or not 0 <= neuron < spec.d_mlp:
        raise InvalidInputError(f"neuron {neuron!r} is out of range: d_mlp={spec.d_mlp} (0..{spec.d_mlp - 1})")
    columns: dict[str, tuple[Tensor, Tensor, str, int]] = {}
    for which in ffn_inputs(model):
        w, b, hook = ffn_key(model, layer, [neuron], which)
        columns[which] = (w, b, hook, neuron)
    stream, norm = _read_norm(model, "ffn_neuron", layer)
    return _split_table(model, cache, layer, stream, position, norm, columns, batch, names.ffn_neuron(layer, neuron))


def split_value_neuron(
    model: Any, cache: Any, layer: int, head: int, dim: int, src_pos: int, batch: int = 0
) -> pd.DataFrame:
    """Split attention value neuron ``v[src_pos, kv(head), dim]`` of ``layer`` over the parts of ``resid_pre[src_pos]``.

    ``v = LN1(resid_pre) . W_V[kv][:, dim] + b_V[kv, dim]`` with ``ln1.hook_scale`` at ``src_pos`` folded in
    (neuron-level paper section 3.3; the same algebra as Eq. 22-23). One contribution column ``value``; it sums to
    the cached ``attn.hook_v`` entry. The attention neuron ``L{l}.H{h}.d{d}.p{p}``'s coefficient at any
    destination is ``pattern * v``, so these are also the shares of its coefficient.

    Raises:
        InvalidInputError: layer, head, dim or source position out of range.
    """
    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    src_pos = resolve_position(src_pos, n_positions(cache))
    ref = ComponentRef("attn_neuron", layer, head=head, dim=dim, src_pos=src_pos).check(spec)
    h, d = int(head), int(dim)
    w, b, hook = value_key(model, layer, h, [d])
    v_heads = tlm.cached(cache, hook, batch).shape[1]
    flat = (h // spec.heads_per_kv if v_heads == spec.n_kv_heads else h) * spec.d_head + d
    stream, norm = _read_norm(model, "attn_neuron", layer)
    return _split_table(model, cache, layer, stream, src_pos, norm, {"value": (w, b, hook, flat)}, batch, ref.name)


def split_neuron(model: Any, cache: Any, name: str, position: int = -1, batch: int = 0) -> pd.DataFrame:
    """:func:`split_ffn_neuron` for ``L{l}.N{k}`` (at ``position``), :func:`split_expert_neuron` for
    ``L{l}.E{e}.N{k}`` / ``L{l}.shared.N{k}`` (at ``position``) or :func:`split_value_neuron` for
    ``L{l}.H{h}.d{d}.p{p}`` (at its source position ``p``; ``position`` is ignored).

    Raises:
        InvalidInputError: a malformed name or an index out of range.
    """
    expert_ref = _expert_ref(name)
    if expert_ref is not None:
        return split_expert_neuron(
            model, cache, expert_ref.layer, expert_ref.expert, expert_ref.neuron, position, batch
        )
    ref = parse_neuron(model, name, n_positions(cache))
    assert ref.layer is not None
    if ref.kind == "ffn_neuron":
        return split_ffn_neuron(model, cache, ref.layer, int(ref.neuron or 0), position, batch)
    return split_value_neuron(
        model, cache, ref.layer, int(ref.head or 0), int(ref.dim or 0), int(ref.src_pos or 0), batch
    )


def top_query_parts(split: pd.DataFrame, column: str | None = None, top_k: int | None = 20) -> pd.DataFrame:
    """The ``top_k`` rows of a split table with the largest ``|contribution|`` in ``column`` (default: the first
    input), sorted by contribution, largest first, keeping the bias row out of the ranking.

    Raises:
        InvalidInputError: ``column`` is not an input column of ``split``.
    """
    inputs = split.attrs.get("inputs", [])
    column = column or (inputs[0] if inputs else None)
    if column not in inputs:
        raise InvalidInputError(f"column {column!r} is not an input of this split; use one of {', '.join(inputs)}")
    parts = split[split["kind"] != "key_bias"]
    order = parts[column].abs().sort_values(ascending=False, kind="stable").index
    picked = parts.loc[order[:top_k] if top_k is not None else order]
    out = picked.sort_values(column, ascending=False, kind="stable").reset_index(drop=True)
    out.attrs = dict(split.attrs)
    return out


# ----------------------------------------------------------------------------------------------
# Query-neuron importance (neuron-level paper section 3.4)
# ----------------------------------------------------------------------------------------------


@dataclass
class _QueryScores:
    """Running sums of :func:`query_neuron_scores` for one context: per (part kind, layer, position) group and per
    key bias, fed the value neurons read at one position at a time by :meth:`add_many`.

    ``parts`` keeps, per group, the group's labels (its directions dropped: only names and indices are kept) and the
    running score of each of its parts; ``n_value`` counts the value neurons given, ``skipped`` names those whose
    input was too small to divide by, ``total_imp`` sums the Imp of the others (nats). Memory: one float64 per
    part of every stream vector read, plus one layer's groups at a time while :meth:`add_many` runs.
    """

    ctx: ScoringContext
    min_abs_input: float
    parts: dict[tuple[str, int | None, int], tuple[PartGroup, Tensor]] = field(default_factory=dict)
    key_bias: dict[tuple[int, int], float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    total_imp: float = 0.0
    n_value: int = 0

    def add_many(
        self,
        kind: str,
        position: int,
        reads: Sequence[tuple[int, tuple[Tensor, Tensor, str], Tensor, pd.DataFrame]],
        each: Callable[[int, PartGroup, Tensor], None] | None = None,
    ) -> list[tuple[pd.DataFrame, Tensor] | None]:
        """Add the query shares of the value neurons of ``kind`` read at ``position``: ``reads`` holds, per layer,
        ``(layer, read, flat, rows)`` (:func:`value_reads`): ``rows`` a score table (``name``, ``score`` = Imp in
        nats), ``read = (weights [d_model, k], bias [k], hook)`` of the neurons' input and ``flat`` their indices in
        the flattened hook.

        Each neuron ``a`` adds ``Imp(a) * contribution_j(a) / input(a)`` to every part ``j`` of the stream vector it
        reads (:func:`folded_key`: its exact contribution), and its share ``Imp(a) * B(a) / input(a)`` of the key
        bias. One pass over the parts of the deepest stream read serves every layer
        (:func:`~tl_residual.decompose.iter_parts_marked`: a lower layer's stream is a prefix of it; each read's
        parts are checked against its cached stream vector at its mark, the safety net). ``each``, if given, is
        called per read ``i`` and part group with the per-neuron scores ``[n parts, k kept]`` (float64; the columns
        are the kept neurons, in the order of the returned rows).

        Returns:
            Per read: ``(kept rows, key-bias share per kept neuron [k kept])``, or None when every neuron was
            skipped (``|input| < min_abs_input``).
        """
        model, cache, batch = self.ctx.model, self.ctx.cache, self.ctx.batch
        out: list[tuple[pd.DataFrame, Tensor] | None] = []
        live: list[tuple[int, int, Tensor, Tensor]] = []  # (read index, layer, folded key, weight)
        stream: Stream = "resid_pre"
        for i, (layer, (w, b, hook), flat, rows) in enumerate(reads):
            neuron_names = list(rows["name"])
            stream, norm = _read_norm(model, kind, layer)
            cached = tlm.cached(cache, hook, batch)[position].reshape(-1)
            value = cached[flat.to(cached.device)].double()
            imp = torch.tensor(rows["score"].tolist(), dtype=torch.float64, device=value.device)
            self.n_value += len(neuron_names)
            keep = value.abs() >= self.min_abs_input
            self.skipped.extend(n for n, k in zip(neuron_names, keep.tolist()) if not k)
            if not bool(keep.any()):
                out.append(None)
                continue
            keep_cpu = keep.cpu()
            w, b, value, imp = w[:, keep_cpu.to(w.device)], b[keep_cpu.to(b.device)], value[keep], imp[keep]
            weight = imp / value
            self.total_imp += float(imp.sum())
            live.append((i, layer, folded_key(model, cache, norm, position, w, batch).double(), weight))
            bias_share = key_bias(model, norm, w, b).double().to(weight.device) * weight
            bk = (layer, position)
            self.key_bias[bk] = self.key_bias.get(bk, 0.0) + float(bias_share.sum())
            out.append((rows[keep_cpu.numpy()], bias_share.cpu()))
        if not live:
            return out
        deepest = max(layer for _, layer, _, _ in live)
        keys = torch.cat([k for _, _, k, _ in live], dim=1)
        total: Tensor | None = None
        for item in iter_parts_marked(model, cache, deepest, position, stream, batch):
            if not isinstance(item, PartGroup):
                if item[1] == stream and any(layer == item[0] for _, layer, _, _ in live):
                    assert total is not None  # the embedding comes first
                    verify_exact(model, cache, total, item[0], position, stream, batch, "the query split's parts")
                    live = [r for r in live if r[1] != item[0]]  # these reads' parts are complete
                    keys = torch.cat([k for _, _, k, _ in live], dim=1) if live else keys[:, :0]
                continue
            if not live:
                break
            coefficients, directions = item.coefficients.double(), item.directions.double()  # converted once
            part = coefficients @ directions
            total = part if total is None else total + part
            contrib = coefficients[:, None] * (directions @ keys.to(directions.device))  # [n parts, open neurons]
            start, gk = 0, (item.kind, item.layer, position)
            for i, _, key, weight in live:
                scores = contrib[:, start : start + key.shape[1]] * weight.to(contrib.device)
                start += key.shape[1]
                scored = scores.sum(1)
                if gk in self.parts:
                    self.parts[gk] = (self.parts[gk][0], self.parts[gk][1] + scored)
                else:
                    self.parts[gk] = (_labels_only(item), scored)
                if each is not None:
                    each(i, item, scores)
        assert not live  # every read met its mark
        return out


def _labels_only(group: PartGroup) -> PartGroup:
    """``group`` without its directions (names, indices and coefficients' count kept): what a score table needs."""
    return PartGroup(group.kind, group.layer, torch.ones(len(group)), torch.empty(0), group.index, group.names)


def value_reads(
    ctx: ScoringContext, kind: ValueKind, top: pd.DataFrame, which: Input | None = None
) -> Iterator[tuple[int, int, tuple[Tensor, Tensor, str], Tensor, pd.DataFrame]]:
    """The value neurons of the score table ``top`` grouped by the stream vector they read: ``(layer, position,
    read, flat, rows)`` for :meth:`_QueryScores.add`.

    FFN neurons (``kind="ffn_neuron"``): one group per layer, read at ``ctx.position`` through input ``which``
    (:func:`ffn_key`; default ``"pre"``, or ``"up"`` for gated MLPs). Attention value neurons
    (``kind="attn_neuron"``, ``L{l}.H{h}.d{d}.p{p}``): one group per (layer, source position), read at ``p``
    through ``v`` (:func:`value_key`; every head of the group in one key matrix, the columns of the GQA slot
    ``kv(h)`` where the cache holds one ``v`` per key-value head). ``rows`` is ``top``'s rows in the key's column
    order.

    Raises:
        InvalidInputError: ``which`` does not fit the value kind.
    """
    model, cache, batch = ctx.model, ctx.cache, ctx.batch
    spec = tlm.model_spec(model)
    if kind == "ffn_neuron":
        which = which or ("up" if spec.gated_mlp else "pre")
        for layer, rows in top.groupby("layer", sort=True):
            neurons = torch.tensor(rows["neuron"].tolist(), dtype=torch.long)
            yield int(layer), ctx.position, ffn_key(model, int(layer), neurons, which), neurons, rows
        return
    if which not in (None, "value"):
        raise InvalidInputError(f"attention value neurons have one input, 'value'; got which={which!r}")
    for (layer, src), sel in top.groupby(["layer", "src_pos"], sort=True):
        ws, bs, flats, frames, hook = [], [], [], [], ""
        for head, rows in sel.groupby("head", sort=True):
            dims = torch.tensor(rows["dim"].tolist(), dtype=torch.long)
            w, b, hook = value_key(model, int(layer), int(head), dims)
            v_heads = tlm.cached(cache, hook, batch).shape[1]
            slot = int(head) // spec.heads_per_kv if v_heads == spec.n_kv_heads else int(head)
            ws.append(w)
            bs.append(b)
            flats.append(slot * spec.d_head + dims)
            frames.append(rows)
        read = (torch.cat(ws, dim=1), torch.cat(bs), hook)
        yield int(layer), int(src), read, torch.cat(flats), pd.concat(frames)


def reads_by_position(
    reads: Iterable[tuple[int, int, tuple[Tensor, Tensor, str], Tensor, pd.DataFrame]],
) -> list[tuple[int, list[tuple[int, tuple[Tensor, Tensor, str], Tensor, pd.DataFrame]]]]:
    """The reads of :func:`value_reads` grouped by position (in order of first appearance): the argument of
    :meth:`_QueryScores.add_many`."""
    out: dict[int, list[tuple[int, tuple[Tensor, Tensor, str], Tensor, pd.DataFrame]]] = {}
    for layer, position, read, flat, rows in reads:
        out.setdefault(position, []).append((layer, read, flat, rows))
    return list(out.items())


def query_part_table(acc: _QueryScores, tokens: Sequence[str] | None = None) -> pd.DataFrame:
    """The summed scores of :class:`_QueryScores` as a part table (unsorted): the identifying columns of
    :mod:`tl_residual.tables`, ``position`` and ``score`` (nats), and one row ``L{l}.key_bias`` (kind
    ``key_bias``) per (layer, position) of the value neurons."""
    frames = [
        tables.part_frame(group, src_tokens=tokens, position=position, score=scored.cpu().numpy())
        for (_, _, position), (group, scored) in acc.parts.items()
    ]
    for (layer, position), scored in acc.key_bias.items():
        frames.append(
            pd.DataFrame(
                {
                    "name": [names.key_bias(layer)],
                    "kind": ["key_bias"],
                    "layer": [layer],
                    "position": [position],
                    "score": [scored],
                }
            )
        )
    return tables.concat(frames, ["position", "score"], kinds=STREAM_KINDS)


def query_neuron_scores(
    ctx: ScoringContext,
    n_value: int = 30,
    value_kind: ValueKind = "ffn_neuron",
    which: Input | None = None,
    top_k: int | None = None,
    min_abs_input: float = 1e-6,
) -> pd.DataFrame:
    """Importance of every query part: its share of the top value neurons' inputs, weighted by their Imp.

    Neuron-level paper section 3.4: take the ``n_value`` value neurons with the largest log-probability increase
    Imp(a) (nats; FFN neurons, or attention neurons with ``value_kind="attn_neuron"``); split each one's input
    exactly (:func:`iter_query_contributions`); a query part ``j`` scores ``sum_a Imp(a) * contribution_j(a) /
    input(a)`` (nats). The key bias ``B`` of each value neuron gets its share too (rows ``kind == "key_bias"``), so
    the scores of all rows sum to ``sum_a Imp(a)`` over the value neurons used (``df.attrs["total_imp"]``).

    Input used: ``"pre"`` for GELU MLPs; for gated MLPs ``"up"`` by default, since ``m = act(gate) * up`` is
    linear in ``up`` at a fixed gate, so ``up``'s shares are exactly the shares of the coefficient ``m``
    (``which="gate"`` takes the gate's shares instead); ``"value"`` (``v``) for attention neurons, whose
    coefficient ``pattern * v`` is linear in ``v``.

    Differences from the authors' released code (``docs/query.md``): they fold only gamma into the key (no
    centring, no ``1/sigma``) and divide by ``resid . key`` without a guard. Here each contribution is exact
    (centring and the cached norm scale folded in, ``B`` kept as its own row), the denominator is the cached
    input, and value neurons with ``|input| < min_abs_input`` are skipped (listed in ``df.attrs["skipped"]``),
    never divided by.

    Args:
        value_kind: ``"ffn_neuron"`` or ``"attn_neuron"`` (the former ``"ffn"`` / ``"attn"`` are accepted).

    Returns:
        The identifying columns of :mod:`tl_residual.tables` (``name, kind, layer, head, src_pos, src_token,
        neuron``), ``position`` (the position of the query part) and ``score`` (nats); sorted by score, best
        first; cut to ``top_k`` if given.

    Raises:
        InvalidInputError: bad ``n_value``, ``value_kind``, ``which`` or ``top_k``.
    """
    if not isinstance(n_value, int) or isinstance(n_value, bool) or n_value < 1:
        raise InvalidInputError(f"n_value must be a positive integer, got {n_value!r}")
    kind = _OLD_VALUE_KINDS.get(value_kind, value_kind)
    if kind not in ("ffn_neuron", "attn_neuron"):
        raise InvalidInputError(f"value_kind {value_kind!r} is not one of 'ffn_neuron', 'attn_neuron'")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")
    spec = tlm.model_spec(ctx.model)
    acc = _QueryScores(ctx, min_abs_input)
    top = score(ctx, (kind,), "log_prob_increase", top_k=n_value, n_top_tokens=0)
    if kind == "ffn_neuron" and which is None:
        which = "up" if spec.gated_mlp else "pre"
    for position, reads in reads_by_position(value_reads(ctx, kind, top, which)):  # type: ignore[arg-type]
        acc.add_many(kind, position, reads)
    df = query_part_table(acc, ctx.src_tokens())
    df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    if top_k is not None:
        df = df.head(top_k).reset_index(drop=True)
    df.attrs.update(
        value_kind=kind,
        which=which,
        n_value=n_value,
        skipped=acc.skipped,
        total_imp=acc.total_imp,
        target=ctx.target,
        position=ctx.position,
        units="nats",
        method="log_prob_increase",
    )
    return df


# ----------------------------------------------------------------------------------------------
# Cross-layer scores (residual-stream paper Appendix D, Eq. 24-25)
# ----------------------------------------------------------------------------------------------


def ffn_layer_keys(
    model: Any, cache: Any, layer: int, position: int, which: Input | None = None, batch: int = 0
) -> tuple[Float[Tensor, "d_model d_mlp"], Float[Tensor, " d_mlp"], Input]:
    """The folded keys of every FFN neuron of ``layer`` and their key biases, in float64:
    ``(key, B, which)`` with ``part . key[:, k]`` the part's exact contribution to neuron ``k``'s input at
    ``position`` (:func:`folded_key`, residual-stream paper Eq. 22-23) and ``B[k]`` the part no residual part writes
    (:func:`key_bias`).

    ``which`` (default): ``"pre"`` for GELU MLPs, ``"gate"`` for gated MLPs (the input of the activation function,
    as :func:`cross_layer_scores` uses). Memory: ``d_model * d_mlp`` float64.

    Raises:
        InvalidInputError: ``which`` does not fit the MLP. MissingHookError: the cache lacks ``ln2.hook_scale``.
    """
    spec = tlm.model_spec(model)
    if which is None:
        which = "gate" if spec.gated_mlp else "pre"
    w, b, _ = ffn_key(model, layer, torch.arange(spec.d_mlp), which)
    _, norm = _read_norm(model, "ffn_neuron", layer)
    key = folded_key(model, cache, norm, position, w, batch).double()
    return key, key_bias(model, norm, w, b).double(), which


def cross_layer_scores(
    ctx: ScoringContext, value_layers: Sequence[int] | None = None, which: Input | None = None
) -> pd.DataFrame:
    """Cross-layer scores ``Cr(Lq, Lv)`` between every layer-level query vector and every FFN value layer.

    Residual-stream paper Appendix D: for a query vector ``Lq`` (the embedding, ``L{l}.attn`` = ``hook_attn_out``
    or ``L{l}.mlp`` = ``hook_mlp_out`` of a lower layer, or ``Lv``'s own attention) and FFN layer ``Lv``:

        Eq. 24:  Cr(Lq, Lv) = sum_k inner(Lq, K_k)
        Eq. 25:  Cr(Lq, Lv) = sum_k inner(Lq, K_k) * C(k)

    over the neurons ``k`` of ``Lv`` at ``ctx.position``, where ``inner(Lq, K_k) = Lq . c(gamma ⊙ W[:, k]) / sigma``
    is ``Lq``'s exact contribution to neuron ``k``'s input (Eq. 22-23 with the cached ``ln2.hook_scale`` folded in,
    as in :func:`split_ffn_neuron`) and ``C(k)`` its log-probability increase (nats). Each sum is split into
    helpful (``C(k) > 0``) and unhelpful (``C(k) < 0``) neurons; unhelpful sums are signed (Eq. 25 terms with
    ``C < 0``), so ``helpful + unhelpful`` is the whole Eq. 25 sum (the paper's "minus" of the two magnitudes).
    Exactness: for each ``Lv``, summing ``helpful_eq24 + unhelpful_eq24`` over all query rows plus
    ``df.attrs["key_bias"][Lv]`` gives the sum of ``Lv``'s cached inputs over neurons with ``C != 0``.

    Input: ``"pre"`` for GELU MLPs; for gated MLPs ``"gate"`` by default, the input of the activation function
    (the analogue of GPT-2's pre-activation: it decides whether the neuron is switched on); ``which="up"`` takes the
    linear input instead (whose effect on ``m = act(gate) * up`` changes sign with ``act(gate)``).

    Cost: scores all ``d_mlp`` neurons of each value layer by log-probability increase (``d_mlp`` vocabulary
    projections per layer).

    Returns:
        Long table: ``query``, ``query_kind`` (``embed``/``attn``/``mlp``), ``query_layer`` (-1 for the embedding),
        ``value_layer``, ``helpful_eq24``, ``unhelpful_eq24``, ``helpful_eq25``, ``unhelpful_eq25``,
        ``total_eq25``. :func:`cross_layer_matrix` pivots it to query x value layer.

    Raises:
        InvalidInputError: a value layer out of range or a bad ``which``.
    """
    model, cache, batch, pos = ctx.model, ctx.cache, ctx.batch, ctx.position
    spec = tlm.model_spec(model)
    layers = range(spec.n_layers) if value_layers is None else [resolve_layer(l, spec.n_layers) for l in value_layers]
    queries = layer_outputs(model, cache, pos, batch)
    scorer = get_scorer("log_prob_increase")
    rows, biases = [], {}
    for lv in layers:
        group, _ = ffn_parts(model, cache, lv, pos, batch)
        c = scorer(ctx, group, ctx.base_for(group)).double()
        key, bias, which = ffn_layer_keys(model, cache, lv, pos, which, batch)
        helpful, unhelpful = c > 0, c < 0
        biases[lv] = float(bias[helpful | unhelpful].sum())
        for name, layer, kind, vec in queries:
            if layer > lv or (layer == lv and (kind == "mlp" or not spec.has_resid_mid)):
                continue
            inner = vec.double() @ key
            rows.append(
                {
                    "query": name,
                    "query_kind": kind,
                    "query_layer": layer,
                    "value_layer": lv,
                    "helpful_eq24": float(inner[helpful].sum()),
                    "unhelpful_eq24": float(inner[unhelpful].sum()),
                    "helpful_eq25": float((inner * c)[helpful].sum()),
                    "unhelpful_eq25": float((inner * c)[unhelpful].sum()),
                    "total_eq25": float((inner * c).sum()),
                }
            )
    df = pd.DataFrame(rows)
    df.attrs.update(which=which, key_bias=biases, target=ctx.target, position=pos)
    return df


def cross_layer_matrix(scores: pd.DataFrame, column: str = "total_eq25") -> pd.DataFrame:
    """Pivot :func:`cross_layer_scores` to a query x value-layer table of ``column`` (rows in stream order).

    Raises:
        InvalidInputError: ``column`` is not a score column.
    """
    valid = [c for c in scores.columns if c.endswith(("eq24", "eq25"))]
    if column not in valid:
        raise InvalidInputError(f"column {column!r} is not one of {', '.join(valid)}")
    order = list(dict.fromkeys(scores["query"]))
    mat = scores.pivot(index="query", columns="value_layer", values=column)
    return mat.loc[order]


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------


def _expert_ref(name: Any) -> Any:
    """The :class:`~tl_residual.names.ComponentRef` of an expert or shared-expert neuron name, else None."""
    from tl_residual import names

    if not isinstance(name, str) or not (".E" in name or ".shared." in name):
        return None
    ref = names.parse(name.strip())
    return ref if ref.kind in ("expert_neuron", "shared_neuron") else None


def split_expert_neuron(
    model: Any, cache: Any, layer: int, expert: int | None, neuron: int, position: int = -1, batch: int = 0
) -> pd.DataFrame:
    """Split expert neuron ``L{layer}.E{expert}.N{neuron}`` (``expert=None``: shared-expert neuron
    ``L{layer}.shared.N{neuron}``) over every part of ``resid_mid`` at ``position``.

    The router is frozen: at this token the neuron's coefficient is ``w_e * act(gate) * up`` with the routing
    weight ``w_e`` a constant, so, as for a dense gated FFN neuron (residual-stream paper Eq. 20-23), its two linear
    inputs ``gate = LN2(x) . W_gate[e][:, k]`` and ``up = LN2(x) . W_in[e][:, k]`` are split exactly over the parts
    of ``resid_mid`` with the cached ``ln2.hook_scale`` folded in. The split is defined whether or not the expert
    is routed at this token (an unrouted expert's neuron has coefficient 0 but well-defined inputs). Neither API
    caches per-expert pre-activations, so ``df.attrs["cached"]`` holds them recomputed from the cached MoE input
    (:func:`tl_residual.model.moe_input`) and the weights; each column sums to it. Table as in
    :func:`split_ffn_neuron` (bias row ``{name}.B``).

    Raises:
        InvalidInputError: layer, expert, neuron or position out of range.
        UnsupportedArchitectureError: ``layer`` is not a mixture-of-experts layer (or has no shared expert).
        MissingHookError: the cache lacks ``ln2.hook_scale`` or the MoE input hook.
    """
    from tl_residual import names

    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    position = resolve_position(position, n_positions(cache))
    if expert is None:
        shared = tlm.shared_expert_weights(model, layer)
        if shared is None:
            raise UnsupportedArchitectureError(f"layer {layer}'s mixture of experts has no shared expert")
        w_gate, w_in = shared[0], shared[1]
        label = names.shared_neuron(layer, neuron)
    else:
        w_gate, w_in = tlm.expert_W_gate(model, layer, expert), tlm.expert_W_in(model, layer, expert)
        label = names.expert_neuron(layer, expert, neuron)
    if not isinstance(neuron, int) or not 0 <= neuron < w_gate.shape[1]:
        raise InvalidInputError(
            f"neuron {neuron!r} in {label} is out of range: the expert has {w_gate.shape[1]} "
            f"neurons (0..{w_gate.shape[1] - 1})"
        )
    x = tlm.moe_input(model, cache, layer, batch)[position]
    hook = tlm.moe_input_hook(model, layer)
    columns: dict[str, tuple[Tensor, Tensor, str, int]] = {}
    reference: dict[str, float] = {}
    for which, w in (("gate", w_gate), ("up", w_in)):
        col = w[:, [neuron]]
        columns[which] = (col, torch.zeros(1, device=col.device), hook, neuron)
        reference[which] = float(x.double() @ col[:, 0].double())
    return _split_table(model, cache, layer, "resid_mid", position, f"{layer}.ln2", columns, batch, label, reference)
