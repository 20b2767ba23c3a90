"""Query side: which upstream parts switched a neuron on.

A neuron's input is a linear read of a normalised residual. For an FFN neuron ``k`` of layer ``l`` at position
``i`` (residual-stream paper Eq. 20-23; REFERENCE.md "Query side"):

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

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import model as tlm
from tl_residual.decompose import (
    PartGroup,
    Stream,
    iter_parts,
    layer_outputs,
    n_positions,
    neuron_name,
    resolve_layer,
    resolve_position,
    verify_exact,
)
from tl_residual.errors import InvalidInputError, UnsupportedArchitectureError

Input = Literal["pre", "gate", "up", "value"]

#: Columns of the part tables (plus one contribution column per neuron input).
PART_COLUMNS = ["name", "kind", "layer", "head", "src_pos", "neuron"]

_FFN_RE = re.compile(r"^L(\d+)\.N(\d+)$")
_ATTN_RE = re.compile(r"^L(\d+)\.H(\d+)\.d(\d+)\.p(\d+)$")


# ----------------------------------------------------------------------------------------------
# Neuron names
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronRef:
    """A value neuron: an FFN neuron ``L{layer}.N{neuron}`` or an attention value neuron ``L{l}.H{h}.d{d}.p{p}``.

    Attributes:
        kind: ``"ffn"`` or ``"attn"``.
        layer: its layer.
        neuron: FFN neuron index in ``d_mlp`` (``-1`` for attention).
        head, dim, src_pos: attention head, head dimension and source position (``-1`` for FFN).
    """

    kind: Literal["ffn", "attn"]
    layer: int
    neuron: int = -1
    head: int = -1
    dim: int = -1
    src_pos: int = -1

    @property
    def name(self) -> str:
        if self.kind == "ffn":
            return neuron_name(self.layer, self.neuron)
        return f"L{self.layer}.H{self.head}.d{self.dim}.p{self.src_pos}"


def parse_neuron(model: Any, name: str, n_pos: int | None = None) -> NeuronRef:
    """Parse and range-check ``L24.N1005`` (FFN neuron) or ``L23.H4.d10.p4`` (attention value neuron).

    Raises:
        InvalidInputError: a malformed name, or a layer, neuron, head, head dimension or source position out of
            range (the message gives the valid range).
    """
    spec = tlm.model_spec(model)
    text = name.strip() if isinstance(name, str) else ""
    m_ffn, m_attn = _FFN_RE.match(text), _ATTN_RE.match(text)
    if not (m_ffn or m_attn):
        raise InvalidInputError(
            f"neuron name {name!r} is not understood: use L{{layer}}.N{{neuron}} for an FFN neuron (e.g. L24.N1005) "
            f"or L{{layer}}.H{{head}}.d{{dim}}.p{{source position}} for an attention value neuron (e.g. L23.H4.d10.p4)"
        )
    layer = int((m_ffn or m_attn).group(1))  # type: ignore[union-attr]
    if layer >= spec.n_layers:
        raise InvalidInputError(f"layer {layer} in {name!r} is out of range: the model has {spec.n_layers} layers "
                                f"(0..{spec.n_layers - 1})")
    if m_ffn:
        k = int(m_ffn.group(2))
        if k >= spec.d_mlp:
            raise InvalidInputError(f"neuron {k} in {name!r} is out of range: layer {layer} has d_mlp={spec.d_mlp} "
                                    f"neurons (0..{spec.d_mlp - 1})")
        return NeuronRef("ffn", layer, neuron=k)
    assert m_attn is not None
    h, d, p = (int(m_attn.group(i)) for i in (2, 3, 4))
    if h >= spec.n_heads:
        raise InvalidInputError(f"head {h} in {name!r} does not exist: the model has {spec.n_heads} heads "
                                f"(0..{spec.n_heads - 1})")
    if d >= spec.d_head:
        raise InvalidInputError(f"head dimension {d} in {name!r} is out of range: d_head={spec.d_head} "
                                f"(0..{spec.d_head - 1})")
    if n_pos is not None and p >= n_pos:
        raise InvalidInputError(f"source position {p} in {name!r} is out of range for a prompt of {n_pos} tokens "
                                f"(0..{n_pos - 1})")
    return NeuronRef("attn", layer, head=h, dim=d, src_pos=p)


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


def key_bias(model: Any, norm: str, weights: Float[Tensor, "d_model k"], bias: Float[Tensor, " k"]) -> Float[Tensor, " k"]:
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
        part = group.coefficients.double() @ group.directions.double()
        total = part if total is None else total + part
        yield group, group.coefficients.double()[:, None] * (group.directions.double() @ key64)
    verify_exact(model, cache, total, layer, position, stream, batch, "the query split's parts")  # safety net


# ----------------------------------------------------------------------------------------------
# Exact splits as tables
# ----------------------------------------------------------------------------------------------


def _part_frame(group: PartGroup) -> pd.DataFrame:
    n = len(group)

    def col(k: str) -> Any:
        return group.index[k].numpy() if k in group.index else -1

    return pd.DataFrame(
        {"name": group.names, "kind": group.kind, "layer": -1 if group.layer is None else group.layer,
         "head": col("head"), "src_pos": col("src_pos"), "neuron": col("neuron")},
        index=range(n),
    )


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
) -> pd.DataFrame:
    """Shared body: ``columns`` maps a column name to ``(weights [d_model, 1], bias [1], hook, index)``."""
    names = list(columns)
    weights = torch.cat([columns[c][0] for c in names], dim=1)
    key = folded_key(model, cache, norm, position, weights, batch)
    frames, contribs = [], []
    for group, contrib in iter_query_contributions(model, cache, key, layer, stream, position, batch):
        frames.append(_part_frame(group))
        contribs.append(contrib)
    bias = torch.stack([key_bias(model, norm, columns[c][0], columns[c][1])[0] for c in names]).double()
    frames.append(pd.DataFrame({"name": [f"{label}.B"], "kind": ["key_bias"], "layer": [layer], "head": [-1],
                                "src_pos": [-1], "neuron": [-1]}))
    contribs.append(bias[None, :])
    df = pd.concat(frames, ignore_index=True)
    values = torch.cat(contribs)
    for i, c in enumerate(names):
        df[c] = values[:, i].numpy()
    cached = {c: float(tlm.cached(cache, columns[c][2], batch)[position].reshape(-1)[columns[c][3]]) for c in names}
    df.attrs.update(
        neuron=label,
        position=position,
        inputs=names,
        hooks={c: columns[c][2] for c in names},
        cached=cached,
        abs_error={c: abs(float(values[:, i].sum()) - cached[c]) for i, c in enumerate(names)},
        norm=norm,
        stream=f"blocks.{layer}.hook_{stream}",
    )
    return df


def split_ffn_neuron(model: Any, cache: Any, layer: int, neuron: int, position: int = -1, batch: int = 0) -> pd.DataFrame:
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
    stream: Stream = "resid_mid" if spec.has_resid_mid else "resid_pre"  # parallel attention+MLP reads resid_pre
    return _split_table(model, cache, layer, stream, position, tlm.mlp_norm(model, layer), columns, batch,
                        neuron_name(layer, neuron))


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
    ref = parse_neuron(model, f"L{layer}.H{head}.d{dim}.p{src_pos}")
    w, b, hook = value_key(model, layer, ref.head, [ref.dim])
    v_heads = tlm.cached(cache, hook, batch).shape[1]
    flat = (ref.head // spec.heads_per_kv if v_heads == spec.n_kv_heads else ref.head) * spec.d_head + ref.dim
    return _split_table(model, cache, layer, "resid_pre", src_pos, f"{layer}.ln1", {"value": (w, b, hook, flat)},
                        batch, ref.name)


def split_neuron(model: Any, cache: Any, name: str, position: int = -1, batch: int = 0) -> pd.DataFrame:
    """:func:`split_ffn_neuron` for ``L{l}.N{k}`` (at ``position``) or :func:`split_value_neuron` for
    ``L{l}.H{h}.d{d}.p{p}`` (at its source position ``p``; ``position`` is ignored).

    Raises:
        InvalidInputError: a malformed name or an index out of range.
    """
    ref = parse_neuron(model, name, n_positions(cache))
    if ref.kind == "ffn":
        return split_ffn_neuron(model, cache, ref.layer, ref.neuron, position, batch)
    return split_value_neuron(model, cache, ref.layer, ref.head, ref.dim, ref.src_pos, batch)


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
# Query-neuron importance (neuron-level paper section 3.3)
# ----------------------------------------------------------------------------------------------


def query_neuron_scores(
    ctx: Any,
    n_value: int = 30,
    value_kind: Literal["ffn", "attn"] = "ffn",
    which: Input | None = None,
    top_k: int | None = None,
    min_abs_input: float = 1e-6,
) -> pd.DataFrame:
    """Importance of every query part: its share of the top value neurons' inputs, weighted by their Imp.

    Neuron-level paper section 3.3: take the ``n_value`` value neurons with the largest log-probability increase
    Imp(a) (nats; FFN neurons, or attention neurons with ``value_kind="attn"``); split each one's input exactly
    (:func:`iter_query_contributions`); a query part ``j`` scores ``sum_a Imp(a) * contribution_j(a) / input(a)``
    (nats). The key bias ``B`` of each value neuron gets its share too (rows ``kind == "key_bias"``), so the
    scores of all rows sum to ``sum_a Imp(a)`` over the value neurons used (``df.attrs["total_imp"]``).

    Input used: ``"pre"`` for GELU MLPs; for gated MLPs ``"up"`` by default, since ``m = act(gate) * up`` is
    linear in ``up`` at a fixed gate, so ``up``'s shares are exactly the shares of the coefficient ``m``
    (``which="gate"`` takes the gate's shares instead); ``"value"`` (``v``) for attention neurons, whose
    coefficient ``pattern * v`` is linear in ``v``.

    Differences from the authors' code (REFERENCE.md): they fold only gamma into the key (no centring, no
    ``1/sigma``) and divide by ``resid . key`` without a guard. Here each contribution is exact (centring and the
    cached norm scale folded in, ``B`` kept as its own row), the denominator is the cached input, and value
    neurons with ``|input| < min_abs_input`` are skipped (listed in ``df.attrs["skipped"]``), never divided by.

    Returns:
        Columns ``name, kind, layer, head, src_pos, neuron, position`` (the position of the query part) and
        ``score``; sorted by score, best first; cut to ``top_k`` if given.

    Raises:
        InvalidInputError: bad ``n_value``, ``value_kind``, ``which`` or ``top_k``.
    """
    from tl_residual.scorers import score_attention_neurons, score_ffn_neurons

    if not isinstance(n_value, int) or isinstance(n_value, bool) or n_value < 1:
        raise InvalidInputError(f"n_value must be a positive integer, got {n_value!r}")
    if value_kind not in ("ffn", "attn"):
        raise InvalidInputError(f"value_kind {value_kind!r} is not one of 'ffn', 'attn'")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")
    model, cache, batch = ctx.model, ctx.cache, ctx.batch
    spec = tlm.model_spec(model)
    acc: dict[tuple[str, int | None, int], tuple[PartGroup, Tensor]] = {}
    bias_rows: dict[tuple[int, int], float] = {}
    skipped: list[str] = []
    used = 0.0

    def run(layer: int, stream: Stream, position: int, norm: str, w: Tensor, b: Tensor, hook: str,
            flat: Tensor, imp: Tensor, names: list[str]) -> None:
        nonlocal used
        value = tlm.cached(cache, hook, batch)[position].reshape(-1)[flat].double()
        keep = value.abs() >= min_abs_input
        skipped.extend(n for n, k in zip(names, keep.tolist()) if not k)
        if not bool(keep.any()):
            return
        w, b, value, imp = w[:, keep], b[keep], value[keep], imp[keep].double()
        weight = imp / value
        used += float(imp.sum())
        key = folded_key(model, cache, norm, position, w, batch)
        for group, contrib in iter_query_contributions(model, cache, key, layer, stream, position, batch):
            gk = (group.kind, group.layer, position)
            score = contrib @ weight
            acc[gk] = (group, acc[gk][1] + score) if gk in acc else (group, score)
        bk = (layer, position)
        bias_rows[bk] = bias_rows.get(bk, 0.0) + float(key_bias(model, norm, w, b).double() @ weight)

    if value_kind == "ffn":
        if which is None:
            which = "up" if spec.gated_mlp else "pre"
        top = score_ffn_neurons(ctx, "log_prob_increase", top_k=n_value, n_top_tokens=0)
        for layer, rows in top.groupby("layer"):
            neurons = torch.tensor(rows["neuron"].tolist())
            w, b, hook = ffn_key(model, int(layer), neurons, which)
            run(int(layer), "resid_mid" if spec.has_resid_mid else "resid_pre", ctx.position,
                tlm.mlp_norm(model, int(layer)), w, b, hook, neurons,
                torch.tensor(rows["score"].tolist()), list(rows["name"]))
    else:
        if which not in (None, "value"):
            raise InvalidInputError(f"attention value neurons have one input, 'value'; got which={which!r}")
        top = score_attention_neurons(ctx, "log_prob_increase", top_k=n_value, n_top_tokens=0)
        for (layer, src, head), rows in top.groupby(["layer", "src_pos", "head"]):
            dims = torch.tensor(rows["dim"].tolist())
            w, b, hook = value_key(model, int(layer), int(head), dims)
            v_heads = tlm.cached(cache, hook, batch).shape[1]
            slot = int(head) // spec.heads_per_kv if v_heads == spec.n_kv_heads else int(head)
            run(int(layer), "resid_pre", int(src), f"{int(layer)}.ln1", w, b, hook, slot * spec.d_head + dims,
                torch.tensor(rows["score"].tolist()), list(rows["name"]))
    frames = []
    for (kind, layer, position), (group, score) in acc.items():
        f = _part_frame(group)
        f["position"] = position
        f["score"] = score.numpy()
        frames.append(f)
    for (layer, position), score in bias_rows.items():
        frames.append(pd.DataFrame({"name": [f"L{layer}.key_bias"], "kind": ["key_bias"], "layer": [layer],
                                    "head": [-1], "src_pos": [-1], "neuron": [-1], "position": [position],
                                    "score": [score]}))
    cols = PART_COLUMNS + ["position", "score"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    df = df[cols].sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    if top_k is not None:
        df = df.head(top_k).reset_index(drop=True)
    df.attrs.update(value_kind=value_kind, which=which, n_value=n_value, skipped=skipped, total_imp=used,
                    target=ctx.target, position=ctx.position, units="nats")
    return df


# ----------------------------------------------------------------------------------------------
# Cross-layer scores (residual-stream paper Appendix D, Eq. 24-25)
# ----------------------------------------------------------------------------------------------


def cross_layer_scores(
    ctx: Any, value_layers: Sequence[int] | None = None, which: Input | None = None
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
    from tl_residual.decompose import ffn_parts
    from tl_residual.scorers import get_scorer

    model, cache, batch, pos = ctx.model, ctx.cache, ctx.batch, ctx.position
    spec = tlm.model_spec(model)
    layers = range(spec.n_layers) if value_layers is None else [resolve_layer(l, spec.n_layers) for l in value_layers]
    if which is None:
        which = "gate" if spec.gated_mlp else "pre"
    queries = layer_outputs(model, cache, pos, batch)
    scorer = get_scorer("log_prob_increase")
    rows, biases = [], {}
    all_neurons = torch.arange(spec.d_mlp)
    for lv in layers:
        group, _ = ffn_parts(model, cache, lv, pos, batch)
        c = scorer.fn(ctx, group, ctx.base_for(group)).double()
        w, b, _ = ffn_key(model, lv, all_neurons, which)
        key = folded_key(model, cache, tlm.mlp_norm(model, lv), pos, w, batch).double()
        helpful, unhelpful = c > 0, c < 0
        biases[lv] = float(key_bias(model, tlm.mlp_norm(model, lv), w, b).double()[helpful | unhelpful].sum())
        for name, layer, kind, vec in queries:
            if layer > lv or (layer == lv and (kind == "mlp" or not spec.has_resid_mid)):
                continue
            inner = vec.double() @ key
            rows.append({
                "query": name, "query_kind": kind, "query_layer": layer, "value_layer": lv,
                "helpful_eq24": float(inner[helpful].sum()), "unhelpful_eq24": float(inner[unhelpful].sum()),
                "helpful_eq25": float((inner * c)[helpful].sum()), "unhelpful_eq25": float((inner * c)[unhelpful].sum()),
                "total_eq25": float((inner * c).sum()),
            })
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
