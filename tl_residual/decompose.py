"""Exact decomposition of a residual-stream vector into the parts that wrote it.

A pre-norm transformer's residual stream is a sum (residual-stream paper Eq. 1-6; neuron-level paper Eq. 1,
5, 7). At destination position ``i`` the vector ``resid_post`` of layer ``L`` is

    embed[i] (+ pos_embed[i])
    + sum_{l <= L} [ sum_{h, p <= i} pattern_l[h, i, p] * (v_l[p, kv(h)] @ W_O_l[h])  + b_O_l ]     (attention)
    + sum_{l <= L} [ sum_k m_l[i, k] * W_out_l[k]                                      + b_out_l ]   (FFN)

where ``v`` is the cached ``hook_v`` (it includes ``b_V`` unless ``fold_value_biases`` moved it into ``b_O``),
``kv(h)`` maps a query head to its key/value head under grouped-query attention, and ``m`` is the cached
``mlp.hook_post`` (``act(gate) * up`` for gated MLPs). ``resid_pre`` of layer ``L`` stops before layer ``L``;
``resid_mid`` adds layer ``L``'s attention only.

Every part is a *coefficient* times a *direction*: an attention subvalue is ``pattern[h, i, p]`` times
``v[p, kv(h)] @ W_O[h]``; an FFN subvalue is ``m_k`` times the row ``W_out[k]``. Parts are produced layer by
layer (:func:`iter_parts`), so no call holds every FFN subvalue of every layer at once.

Component names: ``embed``, ``pos_embed``, ``L12.H3.p4`` (layer 12, head 3, source position 4),
``L12.attn_bias``, ``L20.N1005`` (layer 20, FFN neuron 1005), ``L20.mlp_bias``; in a mixture-of-experts FFN
``L3.E5.N17`` (neuron 17 of expert 5, coefficient routing weight x activation, :func:`expert_parts`) and
``L3.shared.N17`` (shared expert); layer level ``L12.attn``,
``L12.mlp``, heads ``L12.H3``; the stream ``Lin0, Lres0, Lout0, ...``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_residual import model as tlm
from tl_residual import names, tables
from tl_residual.errors import DecompositionError, InvalidInputError, UnsupportedArchitectureError

Stream = Literal["resid_pre", "resid_mid", "resid_post"]
STREAMS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")

PartKind = Literal[
    "embed",
    "pos_embed",
    "attn_subvalue",
    "attn_bias",
    "attn_neuron",
    "ffn_neuron",
    "ffn_bias",
    "expert_neuron",
    "shared_neuron",
]


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def subvalue_name(layer: int, head: int, src_pos: int) -> str:
    """``L{layer}.H{head}.p{src_pos}``: an attention head x source-position subvalue (:func:`names.attn_subvalue`)."""
    return names.attn_subvalue(layer, head, src_pos)


def neuron_name(layer: int, neuron: int) -> str:
    """``L{layer}.N{neuron}``: an FFN neuron (:func:`names.ffn_neuron`)."""
    return names.ffn_neuron(layer, neuron)


def head_name(layer: int, head: int) -> str:
    """``L{layer}.H{head}``: a whole attention head (:func:`names.head`)."""
    return names.head(layer, head)


def base_stream(kind: str, spec: tlm.ModelSpec | None = None) -> Stream | None:
    """The residual stream a part of ``kind`` is added to, the ``x`` of the log-probability increase
    ``log p(t | x + v) - log p(t | x)``: the stream its sublayer reads (residual-stream paper section 3.2, Eq. 19;
    neuron-level paper section 3.3, Eq. 13): ``resid_pre`` of the part's layer for attention parts (``attn``,
    ``attn_bias``, ``head``, ``attn_subvalue``, ``head_dim``, ``attn_neuron``), ``resid_mid`` for FFN parts
    (``mlp``, ``ffn_bias``, ``ffn_neuron``, experts), ``None`` (the zero vector) for the embeddings.

    Parallel attention+MLP (GPT-J, Pythia, Phi-1/2; ``spec.has_resid_mid`` False): the MLP reads ``resid_pre`` too,
    so FFN parts are added to ``resid_pre``. Pass the model's ``spec`` (:func:`tl_residual.model.model_spec`) for
    this rule; without it the sequential rule applies.

    The one place this rule lives (scorers, query splits and the flow graph use it).

    Raises:
        InvalidInputError: a kind outside :data:`tl_residual.names.KINDS` (a registered source carries its own
            base, ``PartGroup.base``).
    """
    if kind in ("embed", "pos_embed"):
        return None
    if kind in ("mlp", "ffn_bias", "ffn_neuron", "expert", "expert_neuron", "shared_neuron"):
        return "resid_pre" if spec is not None and not spec.has_resid_mid else "resid_mid"
    if kind in ("attn", "attn_bias", "head", "attn_subvalue", "head_dim", "attn_neuron", "attn_heads"):
        return "resid_pre"
    raise InvalidInputError(f"no base stream for part kind {kind!r}; kinds are {', '.join(names.KINDS)}")


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def resolve_position(position: int, n_pos: int) -> int:
    """A non-negative position index; negative counts from the end (``-1`` is the last token).

    Raises:
        InvalidInputError: ``position`` is outside ``[-n_pos, n_pos)``.
    """
    if not isinstance(position, int) or isinstance(position, bool):
        raise InvalidInputError(f"position must be an integer, got {position!r}")
    if not -n_pos <= position < n_pos:
        raise InvalidInputError(
            f"position {position} is out of range for a sequence of {n_pos} tokens "
            f"(use 0..{n_pos - 1}, or -1 for the last token)"
        )
    return position % n_pos


def resolve_layer(layer: int, n_layers: int) -> int:
    """A non-negative layer index (negative counts from the end).

    Raises:
        InvalidInputError: ``layer`` is outside ``[-n_layers, n_layers)``.
    """
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n_layers <= layer < n_layers:
        raise InvalidInputError(f"layer {layer!r} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer % n_layers


def resolve_stream(stream: str) -> Stream:
    """Check ``stream`` is one of ``resid_pre``, ``resid_mid``, ``resid_post``.

    Raises:
        InvalidInputError: any other value.
    """
    if stream not in STREAMS:
        raise InvalidInputError(f"stream {stream!r} is not one of {', '.join(STREAMS)}")
    return stream  # type: ignore[return-value]


def n_positions(cache: Any) -> int:
    """Sequence length of a cache (from ``blocks.0.hook_resid_pre``)."""
    return int(tlm.cached(cache, tlm.hook_name("resid_pre", 0), batch=None).shape[1])


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------


@dataclass
class PartGroup:
    """A batch of parts of one kind from one layer: ``vector_j = coefficients[j] * directions[j]``.

    Attributes:
        kind: ``embed``, ``pos_embed``, ``attn_subvalue``, ``attn_bias``, ``ffn_neuron``, ``ffn_bias``, or the
            kind of a user-registered source.
        layer: the layer that wrote the parts (``None`` for embeddings).
        coefficients: ``Float[Tensor, "n"]``: the scalar of each part (attention weight, FFN activation
            ``m_k``; 1 for embeddings and biases).
        directions: ``Float[Tensor, "n d_model"]``: the direction of each part (for FFN neurons a view of
            ``W_out``, not a copy).
        index: per-part integer labels, e.g. ``{"head": ..., "src_pos": ...}`` or ``{"neuron": ...}``.
        names: readable component names, one per part.
        base: the residual ``x`` the parts are added to, where it is not the default for the kind (scorers use
            it for registered sources: the stream at the source's hook minus the source itself); ``None`` else.
    """

    kind: str
    layer: int | None
    coefficients: Float[Tensor, " n"]
    directions: Float[Tensor, "n d_model"]
    index: dict[str, Int[Tensor, " n"]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    base: Float[Tensor, " d_model"] | None = None

    def __len__(self) -> int:
        return int(self.coefficients.shape[0])

    @property
    def vectors(self) -> Float[Tensor, "n d_model"]:
        """The parts themselves, ``coefficients[:, None] * directions`` (materialised on access)."""
        return self.coefficients[:, None] * self.directions

    def total(self) -> Float[Tensor, " d_model"]:
        """Sum of the parts, ``coefficients @ directions``."""
        return self.coefficients @ self.directions


def _single(kind: str, layer: int | None, name: str, vector: Tensor) -> PartGroup:
    return PartGroup(kind, layer, torch.ones(1, device=vector.device), vector[None, :], {}, [name])


# ----------------------------------------------------------------------------------------------
# Custom sources: vectors a user's own hook writes into the residual stream
# ----------------------------------------------------------------------------------------------

SourceVector = Callable[[Any, Any, int, int], Tensor]
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)$")


@dataclass(frozen=True)
class Source:
    """A registered extra writer to the residual stream (see :func:`register_source`).

    Attributes:
        name: part name (e.g. ``"steer"``), unique in the registry.
        at: the residual hook at which the vector enters, ``blocks.{layer}.hook_resid_{pre|mid|post}``.
        layer, stream: ``at`` parsed.
        vector: a cache hook name whose ``[batch, position]`` entry is the vector added, or a callable
            ``(model, cache, position, batch) -> Float[Tensor, "d_model"]``.
        kind: the ``PartGroup.kind`` of its part (default ``"source"``).
        model: restrict to this model object (``None``: every model).
    """

    name: str
    at: str
    layer: int
    stream: str
    vector: str | SourceVector
    kind: str = "source"
    model: Any = None

    def applies_to(self, model: Any) -> bool:
        return self.model is None or self.model is model

    def value(self, model: Any, cache: Any, position: int, batch: int = 0) -> Float[Tensor, " d_model"]:
        """The vector this source added at ``position`` (float32).

        Raises:
            MissingHookError: ``vector`` names a hook the cache lacks.
            InvalidInputError: the vector does not have ``d_model`` entries.
        """
        if isinstance(self.vector, str):
            vec = tlm.cached(cache, self.vector, batch)[position]
        else:
            vec = torch.as_tensor(self.vector(model, cache, position, batch)).detach().float()
        d_model = tlm.d_model(model)
        if tuple(vec.shape) != (d_model,):
            raise InvalidInputError(
                f"source {self.name!r} gave a vector of shape {tuple(vec.shape)} at position {position}; "
                f"it must be ({d_model},) (d_model)"
            )
        return vec


SOURCES: dict[str, Source] = {}


def register_source(
    name: str, at: str, vector: str | SourceVector, kind: str = "source", model: Any = None, *, overwrite: bool = False
) -> Source:
    """Register a vector that a user's hook adds to the residual stream, so decompositions stay exact.

    A hook such as ``model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", lambda x, hook: x + steer)])`` adds a
    vector the model's own components did not write; without registration :func:`reconstruction_error` reports
    the mismatch (and :func:`embedding_parts` refuses a modified ``blocks.0.hook_resid_pre``). Registered, the
    vector is one more part: :func:`iter_parts` yields it (as a :class:`PartGroup` of kind ``kind``, layer
    ``layer``, coefficient 1, name ``name``) at ``at`` and in every later stream, so :func:`reconstruction_error`,
    :func:`decompose`, the query splits of :mod:`tl_residual.query`, the bs-value tables and every scorer
    (through :func:`~tl_residual.scorers.score_groups`) include it. Its scoring base ``x`` is the stream at ``at``
    minus the vector itself.

    Args:
        name: part name, unique: registering a name already registered raises unless ``overwrite=True``.
        at: ``blocks.{layer}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post``: the cached stream that
            already includes the vector (the hook point it was added at, with the cache hook running after it,
            as in ``with model.hooks(...): model.run_with_cache(...)``).
        vector: a cache hook whose ``[batch, position]`` value is the added vector (e.g. a ``HookPoint`` of the
            user's own module), or ``fn(model, cache, position, batch) -> Float[Tensor, "d_model"]``.
        kind: the part kind shown in tables.
        model: apply only to this model object (default: every model).
        overwrite: replace a source already registered under ``name``.

    Raises:
        InvalidInputError: an empty name, a name already registered (without ``overwrite=True``), ``at`` not a
            residual hook name, ``vector`` neither a string nor callable, or ``kind`` one of the built-in kinds.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError("a source needs a non-empty name")
    if name in SOURCES and not overwrite:
        raise InvalidInputError(
            f"a source named {name!r} is already registered (at {SOURCES[name].at}); pass overwrite=True to replace "
            f"it, or unregister_source({name!r}) first"
        )
    m = _RESID_HOOK.match(at) if isinstance(at, str) else None
    if m is None:
        raise InvalidInputError(
            f"at={at!r} is not a residual hook; use blocks.{{layer}}.hook_resid_pre, hook_resid_mid or hook_resid_post"
        )
    if not (isinstance(vector, str) or callable(vector)):
        raise InvalidInputError(
            "vector must be a cache hook name or a callable (model, cache, position, batch) -> vector"
        )
    if kind in get_args(PartKind):
        raise InvalidInputError(f"kind {kind!r} is a built-in part kind; choose another (e.g. 'source')")
    src = Source(name, at, int(m.group(1)), m.group(2), vector, kind, model)
    SOURCES[name] = src
    return src


def unregister_source(name: str) -> None:
    """Remove a registered source.

    Raises:
        InvalidInputError: no source of that name (the message lists the registered ones).
    """
    if name not in SOURCES:
        raise InvalidInputError(f"no source named {name!r}; registered: {', '.join(sorted(SOURCES)) or 'none'}")
    del SOURCES[name]


def source_parts(model: Any, cache: Any, layer: int, stream: str, position: int, batch: int = 0) -> list[PartGroup]:
    """The registered sources entering at ``blocks.{layer}.hook_{stream}`` for ``model``, as single-part groups.

    Raises:
        InvalidInputError: a source's layer is beyond the model, or its vector has the wrong shape.
        MissingHookError: a source's hook is not in the cache.
    """
    out = []
    for src in SOURCES.values():
        if not src.applies_to(model) or src.layer != layer or src.stream != stream:
            continue
        if src.layer >= tlm.n_layers(model):
            raise InvalidInputError(
                f"source {src.name!r} is at {src.at}, beyond the model's {tlm.n_layers(model)} layers"
            )
        vec = src.value(model, cache, position, batch)
        group = _single(src.kind, layer, src.name, vec)
        group.base = tlm.cached(cache, src.at, batch)[position] - vec
        out.append(group)
    return out


def embedding_parts(model: Any, cache: Any, position: int, batch: int = 0) -> list[PartGroup]:
    """Token embedding (and learned position embedding) at ``position``.

    With a norm after the embedding (BLOOM, ``ModelSpec.embed_norm``) the first residual is not linear in its
    inputs: it is one ``embed`` part, whatever ``blocks.0.hook_resid_pre`` holds (minus registered sources).

    Raises:
        UnsupportedArchitectureError: ``blocks.0.hook_resid_pre`` is not ``hook_embed (+ hook_pos_embed)``
            within the dtype's tolerance (e.g. an embedding multiplier applied outside the hooks).
    """
    spec = tlm.model_spec(model)
    position = resolve_position(position, n_positions(cache))
    resid0 = tlm.cached(cache, tlm.hook_name("resid_pre", 0), batch)[position]
    sources = source_parts(model, cache, 0, "resid_pre", position, batch)
    if spec.embed_norm:
        return [_single("embed", None, "embed", resid0 - sum((g.total() for g in sources), torch.zeros_like(resid0)))]
    parts = [_single("embed", None, "embed", tlm.cached(cache, tlm.hook_name("embed"), batch)[position])]
    if spec.learned_pos:
        pos = tlm.cached(cache, tlm.hook_name("pos_embed"), batch)[position]
        parts.append(_single("pos_embed", None, "pos_embed", pos))
    total = torch.stack([g.total() for g in parts + sources]).sum(0)
    tol = tlm.tolerance(model, cache)
    if not relative_error(total, resid0) <= tol:
        raise UnsupportedArchitectureError(
            "blocks.0.hook_resid_pre is not hook_embed + hook_pos_embed for this model (an embedding scale or "
            "extra embedding is applied outside the hooks); the decomposition would not be exact"
        )
    return parts


def pattern_and_values(
    model: Any, cache: Any, layer: int, position: int, batch: int = 0
) -> tuple[Float[Tensor, "head src"], Float[Tensor, "src head d_head"]]:
    """The attention weights of destination ``position`` and the values of sources ``0..position``, per query head.

    ``pattern[h, p]`` is ``attn.hook_pattern[h, position, p]``; ``v[p, h]`` is ``attn.hook_v[p, kv(h)]`` with the
    key/value heads of grouped-query attention repeated to the query heads (``kv(h) = h // (n_heads / n_kv)``).

    Raises:
        MissingHookError: the cache lacks ``hook_pattern`` or ``hook_v`` of ``layer``.
        UnsupportedArchitectureError: ``hook_v`` has neither ``n_heads`` nor ``n_key_value_heads`` heads.
    """
    position = resolve_position(position, n_positions(cache))
    tlm.check_pattern_position(cache, position)
    pattern = tlm.cached(cache, tlm.hook_name("pattern", layer), batch)[:, position, : position + 1]
    v = tlm.cached(cache, tlm.hook_name("v", layer), batch)[: position + 1]  # [src, kv_heads, d_head]
    rep = tlm.value_heads(model, int(v.shape[1]))
    return pattern, einops.repeat(v, "src kv d_head -> src (kv rep) d_head", rep=rep)


def post_norm_factor(
    model: Any,
    cache: Any,
    layer: int,
    sublayer: Literal["attn", "mlp"],
    position: int,
    batch: int = 0,
    raw_output: Tensor | None = None,
) -> Float[Tensor, " d_model"] | None:
    """``w / sigma``: what a norm after ``sublayer``'s output does to each of its parts at ``position``.

    Gemma-2/3 and OLMo-2/3 add ``RMSNorm(out) = w * out / sigma`` to the residual, with
    ``sigma = sqrt(mean(out^2) + eps)`` of the whole sublayer output ``out`` at that token. As the authors freeze the
    final norm's scale (neuron-level paper Eq. 12), ``sigma`` is frozen at its value on this token, so a part ``v``
    of the sublayer contributes ``w * v / sigma`` and the parts still sum exactly to ``hook_{attn,mlp}_out``.
    ``w`` is the effective gain (``1 + w`` for Gemma's offset weights). ``sigma`` is the cached
    ``{post-norm}.hook_scale``; where that hook is not cached it is recomputed from ``raw_output`` (the sum of the
    sublayer's raw parts, exact), and the safety net checks the result against the cached residual.

    Returns:
        ``Float[Tensor, "d_model"]``, or ``None`` where the model has no such norm.

    Raises:
        MissingHookError: the scale is not cached and ``raw_output`` is not given.
    """
    spec = tlm.model_spec(model)
    if not (spec.post_attn_norm if sublayer == "attn" else spec.post_mlp_norm):
        return None
    w = tlm.post_norm_weight(model, layer, sublayer)
    hook = tlm.hook_name(f"post_{sublayer}_scale", layer, model)
    if tlm.has_hook(cache, hook) or raw_output is None:
        sigma = tlm.cached(cache, hook, batch)[position].reshape(-1)[0]
    else:
        sigma = (raw_output.double().pow(2).mean() + spec.eps).sqrt().float()
    return w / sigma


def attention_parts(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> tuple[PartGroup, PartGroup]:
    """Attention subvalues of ``layer`` at destination ``position``, one per (head, source position), and ``b_O``.

    Subvalue ``(h, p)`` = ``pattern[h, position, p] * (v[p, kv(h)] @ W_O[h])`` (residual-stream paper Eq. 7;
    neuron-level paper Eq. 7). Memory: ``n_heads * (position + 1) * d_model`` floats.

    Returns:
        ``(subvalues, bias)``: ``subvalues`` has ``n_heads * (position + 1)`` parts ordered head-major, with
        ``index = {"head", "src_pos"}``; ``bias`` is the single part ``b_O``.
    """
    spec = tlm.model_spec(model)
    position = resolve_position(position, n_positions(cache))
    pattern, v = pattern_and_values(model, cache, layer, position, batch)
    w_o = tlm.W_O(model, layer)
    directions = einops.einsum(v, w_o, "src head d_head, head d_head d_model -> head src d_model")
    b_o = tlm.b_O(model, layer)
    if spec.post_attn_norm:
        raw = einops.einsum(pattern, directions, "head src, head src d_model -> d_model") + b_o
        factor = post_norm_factor(model, cache, layer, "attn", position, batch, raw)
        assert factor is not None  # spec.post_attn_norm
        directions, b_o = directions * factor, b_o * factor
    n_src = position + 1
    heads = einops.repeat(torch.arange(spec.n_heads), "head -> (head src)", src=n_src)
    srcs = einops.repeat(torch.arange(n_src), "src -> (head src)", head=spec.n_heads)
    subvalues = PartGroup(
        "attn_subvalue",
        layer,
        einops.rearrange(pattern, "head src -> (head src)"),
        einops.rearrange(directions, "head src d_model -> (head src) d_model"),
        {"head": heads, "src_pos": srcs},
        [subvalue_name(layer, int(h), int(p)) for h, p in zip(heads.tolist(), srcs.tolist())],
    )
    bias_name = names.format(names.ComponentRef("attn_bias", layer))
    return subvalues, _single("attn_bias", layer, bias_name, b_o)


def head_outputs(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> Float[Tensor, "head d_model"]:
    """Each head's output at destination ``position`` without ``b_O``: ``sum_p pattern[h, position, p] *
    (v[p, kv(h)] @ W_O[h])``, the sum of its subvalues over source positions (residual-stream paper Eq. 7), times
    the frozen post-attention-norm factor where the model has that norm (:func:`post_norm_factor`).

    The one head-output computation (score tables and the flow graph use it). Memory: ``n_heads * d_model`` floats.

    Raises:
        As :func:`pattern_and_values`.
    """
    pattern, v = pattern_and_values(model, cache, layer, position, batch)
    z = einops.einsum(pattern, v, "head src, src head d_head -> head d_head")
    w_o = _scaled_w_o(model, cache, layer, position, batch)
    return einops.einsum(z, w_o, "head d_head, head d_head d_model -> head d_model")


@functools.lru_cache(maxsize=4096)
def _ffn_neuron_names(layer: int, n: int) -> tuple[str, ...]:
    """The names ``L{layer}.N{k}`` of a layer's ``n`` FFN neurons, built once (every prompt's FFN group lists them)."""
    return tuple(neuron_name(layer, k) for k in range(n))


def ffn_parts(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> tuple[PartGroup, PartGroup]:
    """FFN subvalues of ``layer`` at ``position``, ``m_k * W_out[k]`` (residual-stream paper Eq. 10), and ``b_out``.

    ``m`` is ``blocks.{layer}.mlp.hook_post`` (for gated MLPs ``act(gate) * up``). ``directions`` is a view of
    ``W_out``: memory is ``d_mlp`` floats beyond the model's weights. With a norm after the MLP output (Gemma-2/3,
    OLMo-2/3) the directions are ``W_out * w / sigma`` (:func:`post_norm_factor`), a ``d_mlp * d_model`` copy.

    Returns:
        ``(neurons, bias)`` with ``neurons.index = {"neuron"}``.

    Raises:
        UnsupportedArchitectureError: ``layer`` is a mixture of experts (use :func:`mlp_parts`).
    """
    if tlm.is_moe_layer(model, layer):
        raise UnsupportedArchitectureError(f"layer {layer}'s FFN is a mixture of experts: use mlp_parts / expert_parts")
    m = tlm.cached(cache, tlm.hook_name("mlp_post", layer), batch)[resolve_position(position, n_positions(cache))]
    neurons = torch.arange(m.shape[0])
    w_out, b_out = tlm.W_out(model, layer), tlm.b_out(model, layer)
    if tlm.model_spec(model).post_mlp_norm:
        factor = post_norm_factor(model, cache, layer, "mlp", position, batch, m @ w_out + b_out)
        assert factor is not None  # spec.post_mlp_norm
        w_out, b_out = w_out * factor, b_out * factor
    group = PartGroup(
        "ffn_neuron",
        layer,
        m,
        w_out,
        {"neuron": neurons},
        list(_ffn_neuron_names(layer, m.shape[0])),
    )
    bias_name = names.format(names.ComponentRef("ffn_bias", layer))
    return group, _single("ffn_bias", layer, bias_name, b_out)


def _scaled_w_o(model: Any, cache: Any, layer: int, position: int, batch: int) -> Float[Tensor, "head d_head d_model"]:
    """``W_O`` times the frozen post-attention-norm factor where the model has that norm (else ``W_O`` itself)."""
    w_o = tlm.W_O(model, layer)
    if not tlm.model_spec(model).post_attn_norm:
        return w_o
    pattern, v = pattern_and_values(model, cache, layer, position, batch)
    raw = einops.einsum(pattern, v, w_o, "head src, src head d_head, head d_head d_model -> d_model")
    raw = raw + tlm.b_O(model, layer)
    factor = post_norm_factor(model, cache, layer, "attn", position, batch, raw)
    assert factor is not None  # spec.post_attn_norm
    return w_o * factor


def attention_neuron_name(layer: int, head: int, dim: int, src_pos: int) -> str:
    """``L{layer}.H{head}.d{dim}.p{src_pos}``: an attention neuron (:func:`names.attn_neuron`)."""
    return names.attn_neuron(layer, head, dim, src_pos)


def attention_neuron_parts(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> PartGroup:
    """Attention neurons of ``layer`` at destination ``position``: one part per (head h, source p, head dim d).

    Neuron-level paper, section 3.2 (Eq. 7 split over the head dimension; ``docs/quantities.md``):

        coefficient[h, p, d] = pattern[h, position, p] * v[p, kv(h), d]        (v = cached ``attn.hook_v``)
        direction[h, p, d]   = W_O[h, d, :]

    Summing over ``d`` gives the head x source-position subvalue of :func:`attention_parts` exactly
    (``sum_d pattern * v[d] * W_O[h, d] = pattern * (v @ W_O[h])``); summing over ``h`` and ``p`` too and adding
    ``b_O`` gives ``hook_attn_out[position]``. Under grouped-query attention ``kv(h) = h // (n_heads / n_kv_heads)``.

    Value biases: ``hook_v`` includes ``b_V`` unless TransformerLens' ``fold_value_biases=True`` moved
    ``sum_h b_V[h] @ W_O[h]`` into ``b_O``. Folding therefore changes the *coefficients* (each loses its
    ``pattern * b_V[d]`` share, which reappears in the ``L{layer}.attn_bias`` part, as the attention weights of a
    row sum to 1), while every sum stays exact. Scores of single attention neurons are thus not invariant to
    ``fold_value_biases``; the authors' definition (v includes b_V) is the unfolded one.

    Memory: ``directions`` is a contiguous copy of the ``W_O`` rows repeated per source position,
    ``n_heads * (position + 1) * d_head * d_model`` floats (SmolLM2-135M, 6 tokens: 2.0M floats, 8 MB per layer);
    the coefficients are ``n_heads * (position + 1) * d_head`` floats.

    Returns:
        A :class:`PartGroup` of kind ``"attn_neuron"`` with ``n_heads * (position + 1) * d_head`` parts ordered
        (head, src_pos, dim), ``index = {"head", "dim", "src_pos"}``, names ``L{l}.H{h}.d{d}.p{p}``. ``b_O`` is
        not included (it is the ``attn_bias`` part of :func:`attention_parts`).

    Raises:
        InvalidInputError: bad ``layer``, ``position`` or ``batch``.
        MissingHookError: the cache lacks ``hook_pattern`` or ``hook_v`` of ``layer``.
        UnsupportedArchitectureError: ``hook_v`` has neither ``n_heads`` nor ``n_key_value_heads`` heads.
    """
    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    position = resolve_position(position, n_positions(cache))
    coefficients = attention_neuron_coefficients(model, cache, layer, position, batch)
    n_src = position + 1
    directions = einops.repeat(
        _scaled_w_o(model, cache, layer, position, batch), "head d_head d_model -> (head src d_head) d_model", src=n_src
    )
    heads, srcs, dims = (
        t.reshape(-1)
        for t in torch.meshgrid(
            torch.arange(spec.n_heads), torch.arange(n_src), torch.arange(spec.d_head), indexing="ij"
        )
    )
    return PartGroup(
        "attn_neuron",
        layer,
        einops.rearrange(coefficients, "head src d_head -> (head src d_head)"),
        directions,
        {"head": heads, "dim": dims, "src_pos": srcs},
        [attention_neuron_name(layer, h, d, p) for h, p, d in zip(heads.tolist(), srcs.tolist(), dims.tolist())],
    )


def attention_neuron_coefficients(
    model: Any, cache: Any, layer: int, position: int, batch: int = 0
) -> Float[Tensor, "head src d_head"]:
    """``pattern[h, position, p] * v[p, kv(h), d]`` for every head, source ``p <= position`` and head dimension:
    the attention-neuron coefficients of :func:`attention_neuron_parts` (neuron-level paper section 3.2).

    Raises:
        As :func:`attention_neuron_parts`.
    """
    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    position = resolve_position(position, n_positions(cache))
    pattern, v = pattern_and_values(model, cache, layer, position, batch)
    return einops.einsum(pattern, v, "head src, src head d_head -> head src d_head")


class LazyNames(Sequence):
    """Component names computed on access (``names[i]``), for groups too large to name up front."""

    def __init__(self, n: int, name: Callable[[int], str]) -> None:
        self._n, self._name = n, name

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._name(j) for j in range(*i.indices(self._n))]
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._name(i % self._n)


def _attention_neuron_namer(layer: int, d_head: int, src_pos: int) -> Callable[[int], str]:
    """Name of part ``j`` (head-major ``(head, dim)``) of a source position's attention-neuron group."""
    return lambda j: attention_neuron_name(layer, j // d_head, j % d_head, src_pos)


def attention_neuron_groups(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> list[PartGroup]:
    """The attention neurons of :func:`attention_neuron_parts`, one :class:`PartGroup` per source position ``p``.

    Group ``p`` holds the ``n_heads * d_head`` parts ``(h, d)`` ordered head-major, coefficient
    ``pattern[h, position, p] * v[p, kv(h), d]``, direction ``W_O[h, d, :]``: ``directions`` is a *view* of
    ``W_O`` shared by every group of the layer (no copy; the same tensor object), names are computed on access.
    Same parts, names and values as :func:`attention_neuron_parts`; memory ``3 * n_heads * d_head`` integers and
    ``n_heads * d_head`` floats per group, independent of ``d_model``, so long prompts stay cheap.

    Raises:
        As :func:`attention_neuron_coefficients`.
    """
    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    position = resolve_position(position, n_positions(cache))
    coefficients = attention_neuron_coefficients(model, cache, layer, position, batch)
    w_o = einops.rearrange(
        _scaled_w_o(model, cache, layer, position, batch), "head d_head d_model -> (head d_head) d_model"
    )
    heads = einops.repeat(torch.arange(spec.n_heads), "head -> (head d_head)", d_head=spec.d_head)
    dims = einops.repeat(torch.arange(spec.d_head), "d_head -> (head d_head)", head=spec.n_heads)
    d_head = spec.d_head
    groups = []
    for p in range(position + 1):
        groups.append(
            PartGroup(
                "attn_neuron",
                layer,
                einops.rearrange(coefficients[:, p], "head d_head -> (head d_head)"),
                w_o,
                {"head": heads, "dim": dims, "src_pos": torch.full_like(heads, p)},
                LazyNames(len(heads), _attention_neuron_namer(layer, d_head, p)),  # type: ignore[arg-type]
            )
        )
    return groups


def aggregate_attention_neurons(
    group: PartGroup, level: Literal["subvalue", "head", "layer"] = "subvalue"
) -> PartGroup:
    """Sum the attention neurons of :func:`attention_neuron_parts` to head x position subvalues, heads or the layer.

    ``level="subvalue"`` sums over the head dimension ``d`` and reproduces :func:`attention_parts`' subvalues
    (``pattern[h, i, p] * v[p, kv(h)] @ W_O[h]``, same order, names ``L{l}.H{h}.p{p}``); ``"head"`` also sums over
    source positions (names ``L{l}.H{h}``: the head's output at ``i`` without ``b_O``); ``"layer"`` sums everything
    (name ``L{l}.attn_heads``: ``hook_attn_out[i] - b_O``). The returned parts have coefficient 1 and the summed
    vector as direction, ``Float[Tensor, "n d_model"]``.

    Raises:
        InvalidInputError: ``group`` is not of kind ``"attn_neuron"`` or ``level`` is unknown.
    """
    if group.kind != "attn_neuron":
        raise InvalidInputError(f"aggregate_attention_neurons needs an 'attn_neuron' group, got {group.kind!r}")
    heads, srcs, dims = group.index["head"], group.index["src_pos"], group.index["dim"]
    n_heads, n_src, d_head = int(heads.max()) + 1, int(srcs.max()) + 1, int(dims.max()) + 1
    coef = einops.rearrange(
        group.coefficients, "(head src d_head) -> head src d_head", head=n_heads, src=n_src, d_head=d_head
    )
    dirs = einops.rearrange(
        group.directions, "(head src d_head) d_model -> head src d_head d_model", head=n_heads, src=n_src, d_head=d_head
    )
    sub = einops.einsum(coef, dirs, "head src d_head, head src d_head d_model -> head src d_model")
    l = group.layer
    if level == "subvalue":
        h_idx = einops.repeat(torch.arange(n_heads), "head -> (head src)", src=n_src)
        p_idx = einops.repeat(torch.arange(n_src), "src -> (head src)", head=n_heads)
        return PartGroup(
            "attn_subvalue",
            l,
            torch.ones(n_heads * n_src),
            einops.rearrange(sub, "head src d -> (head src) d"),
            {"head": h_idx, "src_pos": p_idx},
            [subvalue_name(l, h, p) for h, p in zip(h_idx.tolist(), p_idx.tolist())],  # type: ignore[arg-type]
        )
    if level == "head":
        return PartGroup(
            "head",
            l,
            torch.ones(n_heads),
            einops.reduce(sub, "head src d -> head d", "sum"),
            {"head": torch.arange(n_heads)},
            [head_name(l, h) for h in range(n_heads)],  # type: ignore[arg-type]
        )
    if level == "layer":
        return PartGroup(
            "attn_heads", l, torch.ones(1), einops.reduce(sub, "head src d -> 1 d", "sum"), {}, [f"L{l}.attn_heads"]
        )
    raise InvalidInputError(f"level {level!r} is not one of 'subvalue', 'head', 'layer'")


def iter_parts(
    model: Any,
    cache: Any,
    layer: int = -1,
    position: int = -1,
    stream: Stream = "resid_post",
    batch: int = 0,
) -> Iterator[PartGroup]:
    """Yield, layer by layer, every part of ``blocks.{layer}.hook_{stream}`` at ``position``.

    Order: embeddings, then for each layer its attention subvalues, ``b_O``, FFN subvalues, ``b_out``; registered
    sources (:func:`register_source`) where they enter (after the stream hook they were added at). The parts of
    all groups sum to the cached vector (see :func:`reconstruction_error`; :func:`verify_exact` checks it).

    Parallel attention+MLP (GPT-J, Pythia, Phi-1/2; ``ModelSpec.parallel_attn_mlp``): both sublayers read
    ``resid_pre`` and ``resid_post = resid_pre + attn_out + mlp_out``; there is no ``resid_mid`` (neither API
    caches one), so ``stream="resid_mid"`` is refused. Norms after the sublayer output: see
    :func:`post_norm_factor`.

    Memory: one layer at a time, at most ``max(n_heads * (position + 1), 1) * d_model`` new floats per group
    (FFN directions are views of ``W_out``).

    Raises:
        InvalidInputError: bad ``layer``, ``position``, ``stream`` or ``batch``.
        MissingHookError: the cache lacks a needed hook.
        UnsupportedArchitectureError: the model is outside what the decomposition covers, or ``resid_mid`` of a
            parallel attention+MLP model.
    """
    for item in iter_parts_marked(model, cache, layer, position, stream, batch):
        if isinstance(item, PartGroup):
            yield item


def iter_parts_marked(
    model: Any,
    cache: Any,
    layer: int = -1,
    position: int = -1,
    stream: Stream = "resid_post",
    batch: int = 0,
) -> Iterator[PartGroup | tuple[int, str]]:
    """:func:`iter_parts`, with a mark ``(l, "resid_pre")``, ``(l, "resid_mid")`` or ``(l, "resid_post")`` yielded
    where the parts so far are exactly those of that stream vector: one pass over the parts of the deepest stream
    serves every lower stream at the same position (the stream of a lower layer is a prefix of it). No
    ``resid_mid`` mark for parallel attention+MLP models (they have no ``resid_mid``).

    Raises:
        As :func:`iter_parts`.
    """
    spec = tlm.model_spec(model)
    stream = resolve_stream(stream)
    check_stream(spec, stream)
    layer = resolve_layer(layer, spec.n_layers)
    position = resolve_position(position, n_positions(cache))
    yield from embedding_parts(model, cache, position, batch)
    for l in range(layer + 1):
        yield from source_parts(model, cache, l, "resid_pre", position, batch)
        yield (l, "resid_pre")
        if l == layer and stream == "resid_pre":
            break
        yield from attention_parts(model, cache, l, position, batch)
        yield from source_parts(model, cache, l, "resid_mid", position, batch)
        if spec.has_resid_mid:
            yield (l, "resid_mid")
        if l == layer and stream == "resid_mid":
            break
        yield from mlp_parts(model, cache, l, position, batch)
        yield from source_parts(model, cache, l, "resid_post", position, batch)
        yield (l, "resid_post")


def check_stream(spec: tlm.ModelSpec, stream: str) -> None:
    """Refuse ``resid_mid`` where it does not exist (parallel attention+MLP).

    Raises:
        UnsupportedArchitectureError: ``stream == "resid_mid"`` on a parallel attention+MLP model.
    """
    if stream == "resid_mid" and not spec.has_resid_mid:
        raise UnsupportedArchitectureError(
            f"{spec.architecture or 'this model'} runs attention and MLP in parallel (both read resid_pre; "
            "resid_post = resid_pre + attn_out + mlp_out): there is no resid_mid; use resid_pre or resid_post"
        )


def target_vector(cache: Any, layer: int, position: int, stream: Stream, batch: int = 0) -> Float[Tensor, " d_model"]:
    """The cached ``blocks.{layer}.hook_{stream}[batch, position]``."""
    return tlm.cached(cache, tlm.hook_name(stream, layer), batch)[position]


# ----------------------------------------------------------------------------------------------
# The safety net
# ----------------------------------------------------------------------------------------------


def relative_error(total: Tensor, target: Tensor) -> float:
    """``||total - target|| / ||target||`` in float64."""
    total, target = total.double(), target.double().to(total.device)
    return float((total - target).norm() / target.norm().clamp_min(1e-30))


def verify_exact(
    model: Any,
    cache: Any,
    total: Float[Tensor, " d_model"],
    layer: int = -1,
    position: int = -1,
    stream: Stream = "resid_post",
    batch: int = 0,
    what: str = "the parts",
) -> float:
    """The safety net: check that ``total`` (the sum of the parts used) equals the cached vector it decomposes.

    Every public entry point that reports parts or scores calls it (:func:`decompose`, the scorers' contexts and
    tables, query splits, ``explain``). Tolerance: :func:`tl_residual.model.tolerance`, the looser of the model's
    and the cache's dtype (float32 ``1e-4`` relative; float16 ``1e-2``, bfloat16 ``5e-2``, as their forward passes
    round every residual add).

    Returns:
        The relative error found.

    Raises:
        DecompositionError: the relative error exceeds the tolerance. The message names the model class, the
            vector (hook and position), the error and the likely causes.
    """
    spec = tlm.model_spec(model)
    layer_i = resolve_layer(layer, spec.n_layers)
    pos_i = resolve_position(position, n_positions(cache))
    target = target_vector(cache, layer_i, pos_i, stream, batch)
    err = relative_error(total, target)
    tol = tlm.tolerance(model, cache)
    if not err <= tol:  # also catches NaN
        raise DecompositionError(
            f"{what} of {tlm.hook_name(stream, layer_i)}[batch {batch}, position {pos_i}] do not sum to the cached "
            f"vector for {tlm.model_class(model)}: relative error {err:.3g} > tolerance {tol:g} "
            f"(model {spec.dtype}). Likely causes: the cache was taken from a different model than the one passed; "
            "a hook "
            "edited activations without being registered (tl_residual.register_source); or the model has a feature "
            "the decomposition does not model. No number is reported."
        )
    return err


def parts_total(
    model: Any, cache: Any, layer: int = -1, position: int = -1, stream: Stream = "resid_post", batch: int = 0
) -> Float[Tensor, " d_model"]:
    """The float64 sum of every part of :func:`iter_parts` (one layer at a time)."""
    total = None
    for group in iter_parts(model, cache, layer, position, stream, batch):
        part = group.coefficients.double() @ group.directions.double()
        total = part if total is None else total + part
    assert total is not None
    return total


def check_reconstruction(
    model: Any, cache: Any, layer: int = -1, position: int = -1, stream: Stream = "resid_post", batch: int = 0
) -> float:
    """Decompose ``blocks.{layer}.hook_{stream}[batch, position]`` and :func:`verify_exact` the sum (cheap: one
    pass over the parts). Returns the relative error.

    Raises:
        DecompositionError: the parts do not sum to the cached vector.
    """
    return verify_exact(
        model, cache, parts_total(model, cache, layer, position, stream, batch), layer, position, stream, batch
    )


def reconstruction_error(
    model: Any, cache: Any, layer: int = -1, position: int = -1, stream: Stream = "resid_post", batch: int = 0
) -> float:
    """Relative error ``||sum(parts) - cached|| / ||cached||`` of the decomposition (float64 accumulation).

    A value near float32 precision (about 1e-7 to 1e-6) means the decomposition is exact. This only measures; the
    entry points that report numbers call :func:`verify_exact` / :func:`check_reconstruction`, which raise.
    """
    spec = tlm.model_spec(model)
    layer_i = resolve_layer(layer, spec.n_layers)
    pos_i = resolve_position(position, n_positions(cache))
    total = parts_total(model, cache, layer_i, pos_i, stream, batch)
    return relative_error(total, target_vector(cache, layer_i, pos_i, stream, batch))


def decompose(
    model: Any, cache: Any, layer: int = -1, position: int = -1, stream: Stream = "resid_post", batch: int = 0
) -> pd.DataFrame:
    """One row per part of ``blocks.{layer}.hook_{stream}[batch, position]``: a browsable table.

    Columns: the identifying columns of :mod:`tl_residual.tables` (``name``, ``kind``, ``layer`` (-1 for
    embeddings), ``head``, ``src_pos``, ``src_token``, ``neuron``; -1 where a row's kind lacks the index), then
    ``coefficient``, ``norm`` (L2 norm of the part, in residual units). Vectors are not stored; use
    :func:`iter_parts` for them. ``df.attrs["rel_error"]`` holds :func:`reconstruction_error`.

    Raises:
        DecompositionError: the parts do not sum to the cached vector (:func:`verify_exact`).
    """
    rows: list[pd.DataFrame] = []
    total = None
    tokens = tables.src_token_texts(model, cache, batch)
    for g in iter_parts(model, cache, layer, position, stream, batch):
        norms = g.coefficients.abs() * g.directions.norm(dim=-1)
        part = g.coefficients.double() @ g.directions.double()
        total = part if total is None else total + part
        rows.append(
            tables.part_frame(g, src_tokens=tokens, coefficient=g.coefficients.cpu().numpy(), norm=norms.cpu().numpy())
        )
    df = tables.concat(rows, ["coefficient", "norm"])
    assert total is not None  # iter_parts always yields the embedding
    df.attrs["rel_error"] = verify_exact(model, cache, total, layer, position, stream, batch)
    return df


# ----------------------------------------------------------------------------------------------
# Layer level
# ----------------------------------------------------------------------------------------------


_SUBLAYER_OUTPUTS: tuple[tuple[Literal["attn", "mlp"], str], ...] = (("attn", "attn_out"), ("mlp", "mlp_out"))


def layer_outputs(model: Any, cache: Any, position: int = -1, batch: int = 0) -> list[tuple[str, int, str, Tensor]]:
    """The layer-level parts of the final residual: ``[("embed", -1, "embed", v), ("L0.attn", 0, "attn", v),
    ("L0.mlp", 0, "mlp", v), ...]``, each ``Float[Tensor, "d_model"]`` (``hook_attn_out`` / ``hook_mlp_out``).

    ``embed`` includes the learned position embedding where the model has one.
    """
    spec = tlm.model_spec(model)
    position = resolve_position(position, n_positions(cache))
    out: list[tuple[str, int, str, Tensor]] = [
        ("embed", -1, "embed", tlm.cached(cache, tlm.hook_name("resid_pre", 0), batch)[position])
    ]
    for l in range(spec.n_layers):
        for kind, hook in _SUBLAYER_OUTPUTS:
            vec = tlm.cached(cache, tlm.hook_name(hook, l), batch)[position]
            out.append((names.layer_output(l, kind), l, kind, vec))
    return out


def residual_stream(model: Any, cache: Any, position: int = -1, batch: int = 0) -> list[tuple[str, Tensor]]:
    """The residual stream of the residual-stream paper, Eq. 1: ``[("Lin0", resid_pre_0), ("Lres0", resid_mid_0),
    ("Lout0", resid_post_0), ("Lres1", ...), ...]``; ``Lin_{l+1} = Lout_l`` so only ``Lin0`` is listed.
    Parallel attention+MLP models have no ``resid_mid``: their ``Lres`` entries are left out.
    """
    spec = tlm.model_spec(model)
    position = resolve_position(position, n_positions(cache))
    out = [("Lin0", tlm.cached(cache, tlm.hook_name("resid_pre", 0), batch)[position])]
    for l in range(spec.n_layers):
        if spec.has_resid_mid:
            out.append((f"Lres{l}", tlm.cached(cache, tlm.hook_name("resid_mid", l), batch)[position]))
        out.append((f"Lout{l}", tlm.cached(cache, tlm.hook_name("resid_post", l), batch)[position]))
    return out


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------

#: Relative tolerance of the check that the expert parts sum to the cached ``hook_mlp_out`` (float32 caches;
#: float16/bfloat16 caches use :data:`MOE_TOLERANCE_LOW_PRECISION`).
MOE_TOLERANCE = 1e-4
MOE_TOLERANCE_LOW_PRECISION = 3e-2


def route(
    logits: Float[Tensor, "n n_experts"],
    top_k: int,
    normalize: bool,
    selected: Int[Tensor, "n k"] | None = None,
) -> tuple[Int[Tensor, "n k"], Float[Tensor, "n k"]]:
    """Routing of Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE: ``p = softmax(logits)`` over every expert (float32),
    the top ``top_k`` experts, their probabilities renormalised to sum to 1 when ``normalize``.

    ``selected`` (e.g. the model's own cached ``hook_expert_indices``) fixes which experts are routed, so a
    near-tie between two router probabilities cannot pick a different expert than the model did.

    Returns:
        ``(experts, weights)``: expert indices and routing weights (probabilities), ``n x top_k``.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if selected is None:
        weights, selected = torch.topk(probs, top_k, dim=-1)
    else:
        weights = probs.gather(-1, selected.to(probs.device).long())
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return selected, weights


def gated_activations(
    x: Float[Tensor, "n d_model"],
    w_gate: Float[Tensor, "d_model d_ff"],
    w_in: Float[Tensor, "d_model d_ff"],
    act: Callable[[Tensor], Tensor],
) -> Float[Tensor, "n d_ff"]:
    """``act(x @ w_gate) * (x @ w_in)``: the neuron activations of one expert (or of the shared expert)."""
    return act(x @ w_gate) * (x @ w_in)


def expert_parts(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> list[PartGroup]:
    """The expert neurons of MoE layer ``layer`` at ``position``: one :class:`PartGroup` per routed expert (in
    expert order), then one for the shared expert (Qwen2-MoE).

    Expert neuron ``L{l}.E{e}.N{k}`` (kind ``expert_neuron``) has coefficient ``w_e * h_e[k]`` and direction
    ``W_out[e][k]``, with ``w_e`` the routing weight of expert ``e`` at this token (:func:`route`) and
    ``h_e = act(x @ W_gate[e]) * (x @ W_in[e])`` its activations; experts not routed at this token contribute
    nothing and yield no group. Shared-expert neuron ``L{l}.shared.N{k}`` (kind ``shared_neuron``) has coefficient
    ``sigmoid(x . w_shared_gate) * h_shared[k]`` and direction its ``W_out`` row. This is the residual-stream
    paper's FFN subvalue (Eq. 10) with the router weight, frozen at this token, folded into the coefficient: the
    parts sum to ``hook_mlp_out[position]``, and are checked to.

    The activations are recomputed from the cached MoE input ``x`` (:func:`tl_residual.model.moe_input`: the
    bridge's ``mlp.hook_in``, ``HookedTransformer``'s ``ln2.hook_normalized`` times ``gamma``) and the weights,
    as neither API caches per-expert activations by position; the routed experts are the model's own
    (``mlp.hook_expert_indices``) where cached. Memory: the routed experts' matrices are views of float32 weights
    (16-bit weights: float32 copies, ``3 * d_model * d_expert`` floats per routed expert), plus ``d_expert``
    floats of coefficients per group.

    Returns:
        Groups with ``index = {"expert", "neuron"}`` (shared: ``{"neuron"}``); no bias group.

    Raises:
        InvalidInputError: bad ``layer``, ``position`` or ``batch``.
        MissingHookError: the cache lacks the MoE input hook or ``hook_mlp_out``.
        UnsupportedArchitectureError: ``layer`` is not an MoE layer.
        DecompositionError: the parts do not sum to the cached ``hook_mlp_out`` (relative error above
            :data:`MOE_TOLERANCE`: a cache from another model, edited hooks, or a routing convention the
            decomposition does not reproduce); the safety net.
    """
    from tl_residual import names

    spec = tlm.model_spec(model)
    layer = resolve_layer(layer, spec.n_layers)
    n_pos = n_positions(cache)
    position = resolve_position(position, n_pos)
    if not tlm.is_moe_layer(model, layer):
        raise UnsupportedArchitectureError(f"layer {layer}'s FFN is not a mixture of experts; use ffn_parts")
    x = tlm.moe_input(model, cache, layer, batch)[position]
    act = tlm.moe_act_fn(model, layer)
    cached_idx = tlm.cached_expert_indices(model, cache, layer, batch, n_pos)
    experts, weights = route(
        (x @ tlm.moe_router(model, layer))[None],
        tlm.moe_top_k(model, layer),
        tlm.moe_norm_topk(model, layer),
        None if cached_idx is None else cached_idx[position][None],
    )
    groups = []
    for e, w in sorted(zip(experts[0].tolist(), weights[0].tolist())):
        h = gated_activations(x[None], tlm.expert_W_gate(model, layer, e), tlm.expert_W_in(model, layer, e), act)[0]
        n = h.shape[0]
        groups.append(
            PartGroup(
                "expert_neuron",
                layer,
                w * h,
                tlm.expert_W_out(model, layer, e),
                {"expert": torch.full((n,), e, dtype=torch.long), "neuron": torch.arange(n)},
                [names.expert_neuron(layer, e, k) for k in range(n)],
            )
        )
    shared = tlm.shared_expert_weights(model, layer)
    if shared is not None:
        w_gate, w_in, w_out, gate = shared
        h = gated_activations(x[None], w_gate, w_in, act)[0] * torch.sigmoid(x @ gate)
        n = h.shape[0]
        groups.append(
            PartGroup(
                "shared_neuron",
                layer,
                h,
                w_out,
                {"neuron": torch.arange(n)},
                [names.shared_neuron(layer, k) for k in range(n)],
            )
        )
    _check_moe_sum(model, cache, layer, position, batch, groups)
    return groups


def _check_moe_sum(model: Any, cache: Any, layer: int, position: int, batch: int, groups: list[PartGroup]) -> None:
    hook = tlm.hook_name("mlp_out", layer)
    target = tlm.cached(cache, hook, batch)[position].double()
    total = sum((g.coefficients.double() @ g.directions.double() for g in groups), torch.zeros_like(target))
    err = float((total - target).norm() / target.norm().clamp_min(1e-30))
    low = cache[hook].dtype in (torch.float16, torch.bfloat16)
    tol = MOE_TOLERANCE_LOW_PRECISION if low else MOE_TOLERANCE
    if not err <= tol:
        raise DecompositionError(
            f"{tlm.model_class(model)}: the expert parts of layer {layer} at position {position} do not sum to the "
            f"cached {hook} (relative error {err:.3g} > {tol:g}). Likely causes: a cache from another model, "
            f"hooks edited during the run, or a routing convention tl-residual does not reproduce"
        )


def mlp_parts(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> list[PartGroup]:
    """Every part the FFN of ``layer`` wrote at ``position``: a dense MLP's neurons and ``b_out``
    (:func:`ffn_parts`), or a mixture of experts' routed expert neurons, shared-expert neurons
    (:func:`expert_parts`) and a zero ``L{l}.mlp_bias`` (these MoE blocks have no output bias).

    Raises:
        As :func:`ffn_parts` / :func:`expert_parts`.
    """
    if not tlm.is_moe_layer(model, layer):
        return list(ffn_parts(model, cache, layer, position, batch))
    groups = expert_parts(model, cache, layer, position, batch)
    d_model = tlm.d_model(model)
    bias_name = names.format(names.ComponentRef("ffn_bias", layer))
    groups.append(_single("ffn_bias", layer, bias_name, torch.zeros(d_model, device=groups[0].directions.device)))
    return groups


def ffn_neuron_groups(model: Any, cache: Any, layer: int, position: int, batch: int = 0) -> list[PartGroup]:
    """The neuron groups of :func:`mlp_parts` (no bias): ``[ffn_neurons]`` for a dense MLP, one group per routed
    expert (plus the shared expert) for a mixture of experts. What the FFN-neuron scorers rank."""
    return [g for g in mlp_parts(model, cache, layer, position, batch) if g.kind != "ffn_bias"]
