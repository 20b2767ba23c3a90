"""Interventions: zero, scale or replace named components, rerun the model, and measure the target.

This is the faithfulness test of the neuron-level paper (Yu & Ananiadou, section 4.1, Table 2): take the
components an attribution method ranks highest, "set their parameters to zero", rerun the model, and report
the target token's reciprocal rank (averaged: MRR), probability and log-probability before and after.

Components are named as everywhere else in tl-residual (:mod:`tl_residual.names`) and are acted on with
TransformerLens hooks:

``L24.N1005``      FFN neuron ``k`` of layer ``l``: ``blocks.{l}.mlp.hook_post[..., k]`` (the coefficient
                   ``m_k``, ``act(gate) * up`` for gated MLPs), at every position. Zeroing it is the same as
                   zeroing the neuron's parameters (its row of ``W_out``).
``L12.H3.d7``      head dimension ``(h, d)`` (kind ``head_dim``): row ``d`` of head ``h``'s ``W_O``, all source
                   positions. Zeroing its parameters is zeroing ``blocks.{l}.attn.hook_z[..., h, d]`` at
                   every position (the neuron-level paper's "attention neuron" intervention, section 4.1).
``L12.H3.d7.p4``   attention neuron ``(h, d, p)`` (kind ``attn_neuron``; neuron-level paper section 3.2,
                   coefficient ``pattern[h, i, p] * v[p, kv(h), d]``): its contribution is removed from
                   ``hook_z[..., i, h, d]`` at every destination position ``i``.
``L12.H3.p4``      head x source-position subvalue: ``blocks.{l}.attn.hook_pattern[:, h, :, p]`` at every
                   destination position (the source position's whole contribution to head ``h``).
``L12.H3``         a whole head: ``blocks.{l}.attn.hook_z[..., h, :]`` at every position.
``L3.E5.N17``      neuron ``k`` of expert ``e`` of a mixture-of-experts FFN (coefficient ``w_e * act(gate) * up``,
                   ``w_e`` the routing weight at that token, 0 where ``e`` is not routed). Neither API exposes
                   per-expert activations by position, so the hook recomputes the coefficient from the MoE input
                   captured in the same pass and edits ``blocks.{l}.hook_mlp_out`` by ``(new - old) * W_out[e][k]``
                   at every position: exact, and the same as editing the expert's activation (the router reads the
                   MoE input, which is unchanged). ``replace`` sets the coefficient at every position.
``L3.shared.N17``  neuron ``k`` of the shared expert (Qwen2-MoE; coefficient ``sigmoid(x . w_g) * act(gate) * up``),
                   edited the same way.

Value biases: ``hook_z`` includes ``b_V`` unless TransformerLens' ``fold_value_biases=True`` moved it into
``b_O``; zeroing a head or an attention neuron then leaves its ``b_V`` share in ``b_O`` (the decomposition's
``L{l}.attn_bias`` part), exactly as its coefficient in :func:`tl_residual.decompose.attention_neuron_parts`.

"Zero the neuron's parameters" (the paper) acts at every position of the prompt, not only the scored one;
so do all modes here. Modes: ``zero`` (coefficient -> 0), ``scale`` (coefficient -> factor * coefficient),
``replace`` (coefficient -> a given value). Source positions ``p`` count the prompt's own tokens (BOS is 0),
whatever the padding.

Prompts are batched with padding (``right``: pads after the prompt, causal attention never sees them;
``left``: pads before, an attention mask is passed so the model ignores them and positions are shifted). The
scored position is each prompt's last real token.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_residual import model as tlm
from tl_residual import names
from tl_residual.errors import InvalidInputError
from tl_residual.lens import resolve_target, target_rank
from tl_residual.names import NAME_FORMS, ComponentRef

Mode = Literal["zero", "scale", "replace"]
MODES: tuple[str, ...] = ("zero", "scale", "replace")
PaddingSide = Literal["left", "right"]
#: The kinds an intervention acts on (:mod:`tl_residual.names` vocabulary).
INTERVENABLE_KINDS: tuple[str, ...] = (
    "ffn_neuron",
    "head_dim",
    "attn_neuron",
    "attn_subvalue",
    "head",
    "expert_neuron",
    "shared_neuron",
)

HookFn = Callable[[Tensor, Any], Tensor]


# ----------------------------------------------------------------------------------------------
# Component names
# ----------------------------------------------------------------------------------------------

#: One intervenable component: a :class:`~tl_residual.names.ComponentRef` (the former name of the type).
Component = ComponentRef


def component_hook(ref: ComponentRef) -> str:
    """The TransformerLens hook an intervention on ``ref`` acts on: ``mlp.hook_post`` (FFN neurons),
    ``attn.hook_pattern`` (subvalues) or ``attn.hook_z`` (heads, head dimensions, attention neurons)."""
    if ref.kind in ("expert_neuron", "shared_neuron"):
        return f"blocks.{ref.layer}.hook_mlp_out"
    if ref.kind == "ffn_neuron":
        return f"blocks.{ref.layer}.mlp.hook_post"
    if ref.kind == "attn_subvalue":
        return f"blocks.{ref.layer}.attn.hook_pattern"
    return f"blocks.{ref.layer}.attn.hook_z"


def parse_component(model: Any, name: str) -> ComponentRef:
    """Parse one component name (:func:`tl_residual.names.parse`) and check its indices against ``model``'s sizes.

    Source positions are checked against each prompt's length when the hooks are built.

    Raises:
        InvalidInputError: a malformed name (the message lists the accepted forms), a kind no intervention acts
            on, or an index out of range (layer >= n_layers, neuron >= d_mlp, head >= n_heads, dim >= d_head).
    """
    return _parse(tlm.model_spec(model), name)


def _parse(spec: tlm.ModelSpec, name: str) -> ComponentRef:
    ref = names.parse(name)
    if ref.kind not in INTERVENABLE_KINDS:
        raise InvalidInputError(
            f"{name!r} is a {ref.kind}; interventions act on {', '.join(INTERVENABLE_KINDS)} (e.g. L24.N1005, "
            f"L12.H3.d7, L12.H3.d7.p4, L12.H3.p4, L12.H3)"
        )
    if ref.kind == "shared_neuron" and not spec.shared_expert:
        raise InvalidInputError(f"{name}: this model has no shared expert")
    return ref.check(spec)


def parse_components(model: Any, names: str | Iterable[str]) -> list[ComponentRef]:
    """Parse a comma-separated string or an iterable of names (duplicates dropped, order kept).

    Raises:
        InvalidInputError: no names, or any name :func:`parse_component` rejects.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    spec = tlm.model_spec(model)
    out: dict[str, ComponentRef] = {}
    for n in names:
        c = _parse(spec, n)
        out.setdefault(c.name, c)
    if not out:
        raise InvalidInputError(f"no components given; name at least one, e.g. {NAME_FORMS}")
    return list(out.values())


def random_components(
    model: Any,
    count: int,
    kind: Literal["ffn_neuron", "head_dim"] = "ffn_neuron",
    seed: int = 0,
    layers: Iterable[int] | None = None,
) -> list[str]:
    """``count`` distinct components drawn uniformly at random (the paper's random control), seeded.

    Args:
        kind: ``ffn_neuron`` (``L{l}.N{k}``) or ``head_dim`` (``L{l}.H{h}.d{d}``, all source positions).
        seed: seed of a private ``torch.Generator`` (the global RNG is untouched).
        layers: restrict the draw to these layers (default all).

    Raises:
        InvalidInputError: an unknown kind, a bad layer, or more components than exist.
    """
    spec = tlm.model_spec(model)
    layer_list = list(range(spec.n_layers)) if layers is None else [int(l) for l in layers]
    for l in layer_list:
        if not 0 <= l < spec.n_layers:
            raise InvalidInputError(f"layer {l} is out of range (0..{spec.n_layers - 1})")
    if kind == "ffn_neuron":
        per_layer = spec.d_mlp
    elif kind == "head_dim":
        per_layer = spec.n_heads * spec.d_head
    else:
        raise InvalidInputError(
            f"random components of kind {kind!r} are not supported; use ffn_neuron or head_dim (L12.H3.d7: a head "
            f"dimension at all source positions; attn_neuron names one source position)"
        )
    total = per_layer * len(layer_list)
    if not isinstance(count, int) or not 0 <= count <= total:
        raise InvalidInputError(f"count must be an integer in 0..{total}, got {count!r}")
    gen = torch.Generator().manual_seed(int(seed))
    picks = torch.randperm(total, generator=gen)[:count].tolist()
    out = []
    for i in picks:
        layer, j = layer_list[i // per_layer], i % per_layer
        if kind == "ffn_neuron":
            out.append(names.ffn_neuron(layer, j))
        else:
            out.append(names.format(ComponentRef("head_dim", layer, head=j // spec.d_head, dim=j % spec.d_head)))
    return out


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    """Padded tokens of several prompts.

    Attributes:
        prompts: the texts.
        tokens: ``Int[Tensor, "batch pos"]`` (pads where ``attention_mask`` is 0).
        attention_mask: ``Int[Tensor, "batch pos"]``, 1 on real tokens.
        lengths: ``Int[Tensor, "batch"]`` real tokens per prompt (BOS included where the model adds one).
        offsets: ``Int[Tensor, "batch"]`` index of each prompt's first real token (0 under right padding).
        padding_side: ``left`` or ``right``.
    """

    prompts: list[str]
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    offsets: Int[Tensor, " batch"]
    padding_side: PaddingSide

    @property
    def last_index(self) -> Int[Tensor, " batch"]:
        """Index of each prompt's last real token (the scored position)."""
        return self.offsets + self.lengths - 1

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: Sequence[int]) -> PromptBatch:
        """The sub-batch of ``rows`` (repeats allowed: run several interventions of one prompt in one pass)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return PromptBatch(
            [self.prompts[i] for i in idx.tolist()],
            self.tokens[idx],
            self.attention_mask[idx],
            self.lengths[idx],
            self.offsets[idx],
            self.padding_side,
        )


def tokenize_batch(model: Any, prompts: Sequence[str], padding_side: PaddingSide = "right") -> PromptBatch:
    """Tokenize each prompt with :func:`tl_residual.model.to_tokens` (the model's own BOS handling, never
    truncated) and pad them. ``offsets`` (non-zero under left padding) map prompt positions to cache columns:
    pass them to :func:`tl_residual.scorers.score_neurons_batch` so its names use prompt positions.

    Raises:
        InvalidInputError: no prompts, an empty prompt, a prompt longer than the model's ``n_ctx``, or an unknown
            ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise InvalidInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("no prompts given")
    seqs = [tlm.to_tokens(model, p)[0].cpu() for p in prompts]  # refuses empty prompts and prompts over n_ctx
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    tok = getattr(model, "tokenizer", None)
    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tok, "eos_token_id", None) or 0
    tokens = torch.full((len(seqs), width), int(pad_id), dtype=seqs[0].dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = torch.zeros(len(seqs), dtype=torch.long)
    for b, s in enumerate(seqs):
        start = width - len(s) if padding_side == "left" else 0
        tokens[b, start : start + len(s)] = s
        mask[b, start : start + len(s)] = 1
        offsets[b] = start
    return PromptBatch(prompts, tokens, mask, lengths, offsets, padding_side)


def _forward_kwargs(batch: PromptBatch) -> dict[str, Any]:
    if bool((batch.attention_mask == 1).all()):
        return {}
    return {"attention_mask": batch.attention_mask, "padding_side": batch.padding_side}


def last_token_logits(
    model: Any, batch: PromptBatch, hooks: list[tuple[str, HookFn]] | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """The model's next-token logits at each prompt's last real token, with ``hooks`` applied (float32)."""
    device = tlm.scoring_device(model)
    tokens = batch.tokens.to(device)
    kwargs = _forward_kwargs(batch)
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = kwargs["attention_mask"].to(device)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks or [], **kwargs)
    idx = batch.last_index.to(logits.device)
    return logits[torch.arange(len(batch), device=logits.device), idx].float()


def target_metrics(
    logits: Float[Tensor, "batch d_vocab"], targets: Int[Tensor, " batch"]
) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Rank (1 = top; ties counted in the target's favour), probability and log-probability (nats) of each
    row's target (neuron-level paper section 4.1: the reciprocal rank averages to the MRR)."""
    targets = targets.to(logits.device).long()
    rank = target_rank(logits, targets).long()
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return rank, logp.exp().float(), logp.float()


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------


def _check_mode(mode: str, factor: float | None, value: float | None) -> tuple[float, float | None]:
    if mode not in MODES:
        raise InvalidInputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    for label, given in (("factor", factor), ("value", value)):
        if given is not None and (
            isinstance(given, bool) or not isinstance(given, numbers.Real) or not math.isfinite(float(given))
        ):
            raise InvalidInputError(f"{label} must be a finite number, got {given!r} (mode {mode!r})")
    if mode == "zero":
        if value is not None or factor not in (None, 0, 0.0):
            raise InvalidInputError("mode 'zero' takes no factor or value (use mode='scale' with a factor)")
        return 0.0, None
    if mode == "scale":
        if factor is None or value is not None:
            raise InvalidInputError("mode 'scale' needs a factor (e.g. factor=0.5) and no value")
        return float(factor), None
    if value is None or factor is not None:
        raise InvalidInputError("mode 'replace' needs a value (the new coefficient) and no factor")
    return 1.0, float(value)


def intervention_hooks(
    model: Any,
    components: Sequence[Sequence[ComponentRef]],
    batch: PromptBatch,
    mode: Mode = "zero",
    factor: float | None = None,
    value: float | None = None,
) -> list[tuple[str, HookFn]]:
    """TransformerLens forward hooks that apply ``mode`` to ``components[b]`` for each prompt ``b`` of ``batch``.

    At each hook the new activation is ``factor * old`` (``zero``: factor 0) or ``value`` (``replace``) on the
    selected entries, at every (destination) position; everything else is untouched. Use the result with
    ``model.run_with_hooks(batch.tokens, fwd_hooks=hooks, ...)`` or :func:`last_token_logits`.

    Raises:
        InvalidInputError: ``len(components) != len(batch)``, a bad mode/factor/value, or a source position
            beyond a prompt's length.
    """
    fac, val = _check_mode(mode, factor, value)
    if len(components) != len(batch):
        raise InvalidInputError(f"got component lists for {len(components)} prompts, but the batch has {len(batch)}")
    spec = tlm.model_spec(model)
    n_b, width = batch.tokens.shape
    # hook name -> (selection mask) for elementwise kinds; (b, h, d, p) lists for attn_neuron
    masks: dict[str, Tensor] = {}
    pos_neurons: dict[int, list[tuple[int, int, int, int]]] = {}
    expert_neurons: dict[int, list[tuple[int, int | None, int]]] = {}
    for b, comps in enumerate(components):
        for c in comps:
            if c.src_pos is not None and c.src_pos >= int(batch.lengths[b]):
                raise InvalidInputError(
                    f"{c.name}: source position {c.src_pos} is beyond prompt {b}'s {int(batch.lengths[b])} tokens "
                    f"(positions 0..{int(batch.lengths[b]) - 1}, BOS included)"
                )
            hook = component_hook(c)
            if c.kind in ("expert_neuron", "shared_neuron"):
                expert_neurons.setdefault(c.layer, []).append((b, c.expert, int(c.neuron)))  # type: ignore[arg-type]
            elif c.kind == "ffn_neuron":
                if hook not in masks:  # (not setdefault: that would allocate a mask per component)
                    masks[hook] = torch.zeros(n_b, spec.d_mlp, dtype=torch.bool)
                m = masks[hook]
                m[b, c.neuron] = True
            elif c.kind in ("head_dim", "head"):
                if hook not in masks:
                    masks[hook] = torch.zeros(n_b, spec.n_heads, spec.d_head, dtype=torch.bool)
                m = masks[hook]
                if c.kind == "head":
                    m[b, c.head, :] = True
                else:
                    m[b, c.head, c.dim] = True
            elif c.kind == "attn_subvalue":
                assert c.src_pos is not None
                if hook not in masks:
                    masks[hook] = torch.zeros(n_b, spec.n_heads, width, dtype=torch.bool)
                m = masks[hook]
                m[b, c.head, int(batch.offsets[b]) + c.src_pos] = True
            else:  # attn_neuron (head, dim, source position)
                assert c.layer is not None and c.head is not None and c.dim is not None and c.src_pos is not None
                pos_neurons.setdefault(c.layer, []).append((b, c.head, c.dim, int(batch.offsets[b]) + c.src_pos))

    def apply(x: Tensor, sel: Tensor) -> Tensor:
        sel = sel.to(x.device)
        if val is None:
            return torch.where(sel, x * fac, x)
        return torch.where(sel, torch.full_like(x, val), x)

    def masked(name: str, sel: Tensor) -> HookFn:
        """Apply the mode where ``sel`` is set, at every (destination) position of hook ``name``'s activation:
        ``mlp.hook_post`` [B, pos, d_mlp], ``attn.hook_z`` [B, pos, H, d_head], ``attn.hook_pattern``
        [B, H, dst, src]."""
        if name.endswith("mlp.hook_post"):
            spread = sel[:, None, :]
        elif name.endswith("attn.hook_z"):
            spread = sel[:, None, :, :]
        else:  # hook_pattern: every destination position
            spread = sel[:, :, None, :]

        def hook_fn(x: Tensor, hook: Any) -> Tensor:
            return apply(x, spread.expand_as(x))

        return hook_fn

    captured: dict[str, Tensor] = {}

    def capturing(key: str) -> HookFn:
        def hook_fn(x: Tensor, hook: Any) -> Tensor:
            captured[key] = x.detach()
            return x

        return hook_fn

    def correcting(entries: list[tuple[int, int, int, int]], p_name: str, v_name: str) -> HookFn:
        """Correct ``hook_z`` by each attention neuron's contribution, from the pattern and values captured in the
        same forward pass."""

        def hook_fn(z: Tensor, hook: Any) -> Tensor:
            pattern, v = captured.pop(p_name), captured.pop(v_name)  # [B, H, dst, src], [B, src, kv, d_head]
            rep = spec.n_heads // v.shape[2]
            z = z.clone()
            for b, h, d, p in entries:
                contribution = pattern[b, h, :, p] * v[b, p, h // rep, d]  # [dst]
                new = contribution * fac if val is None else torch.full_like(contribution, val)
                z[b, :, h, d] = z[b, :, h, d] + (new - contribution).to(z.dtype)
            return z

        return hook_fn

    hooks: list[tuple[str, HookFn]] = []
    for layer, entries in sorted(pos_neurons.items()):
        # Capture this layer's pattern and values in the same forward pass, then correct hook_z.
        p_name, v_name = f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"
        if p_name in masks:  # capture the pattern after any subvalue intervention on the same layer
            hooks.append((p_name, masked(p_name, masks.pop(p_name))))
        hooks.append((p_name, capturing(p_name)))
        hooks.append((v_name, capturing(v_name)))
        hooks.append((f"blocks.{layer}.attn.hook_z", correcting(entries, p_name, v_name)))
    for layer, experts in sorted(expert_neurons.items()):
        hooks += _expert_hooks(model, layer, experts, fac, val)
    for name, sel in masks.items():
        hooks.append((name, masked(name, sel)))
    return hooks


def _expert_hooks(
    model: Any, layer: int, entries: list[tuple[int, int | None, int]], fac: float, val: float | None
) -> list[tuple[str, HookFn]]:
    """Hooks editing expert / shared-expert neurons ``(prompt, expert or None, neuron)`` of MoE layer ``layer``: the
    MoE input is captured, each neuron's coefficient recomputed at every position (routing frozen as the model
    routed it) and ``hook_mlp_out`` corrected by ``(new - old) * W_out row`` (see the module doc)."""
    from tl_residual.decompose import gated_activations, route

    captured: dict[str, Tensor] = {}
    in_name = tlm.moe_input_hook(model, layer)
    act = tlm.moe_act_fn(model, layer)

    def capture(x: Tensor, hook: Any) -> Tensor:
        captured["x"] = x.detach()
        return x

    def correct(out: Tensor, hook: Any) -> Tensor:
        x = tlm.moe_input_from(model, layer, captured.pop("x"))  # [B, pos, d_model]
        n_b, n_pos, _ = x.shape
        flat = x.reshape(n_b * n_pos, -1)
        experts, weights = route(
            flat @ tlm.moe_router(model, layer), tlm.moe_top_k(model, layer), tlm.moe_norm_topk(model, layer)
        )
        routed = torch.zeros(n_b * n_pos, tlm.moe_n_experts(model, layer), device=flat.device)
        routed = routed.scatter(1, experts, weights).reshape(n_b, n_pos, -1)  # 0 where an expert is not routed
        delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for b, e, k in entries:
            if e is None:
                w_gate, w_in, w_out, gate = tlm.shared_expert_weights(model, layer)  # type: ignore[misc]
                scale = torch.sigmoid(x[b] @ gate)
            else:
                w_gate, w_in = tlm.expert_W_gate(model, layer, e), tlm.expert_W_in(model, layer, e)
                w_out, scale = tlm.expert_W_out(model, layer, e), routed[b, :, e]
            coef = scale * gated_activations(x[b], w_gate[:, [k]], w_in[:, [k]], act)[:, 0]  # [pos]
            new = coef * fac if val is None else torch.full_like(coef, val)
            delta[b] += (new - coef)[:, None] * w_out[k].to(delta.device)
        return out + delta.to(out.dtype)

    return [(in_name, capture), (f"blocks.{layer}.hook_mlp_out", correct)]


# ----------------------------------------------------------------------------------------------
# One call
# ----------------------------------------------------------------------------------------------


@dataclass
class InterventionResult:
    """Before/after metrics of an intervention, one row per prompt.

    Attributes:
        per_prompt: DataFrame with columns ``prompt``, ``target``, ``target_token``, ``n_components``,
            ``rank_before``, ``prob_before``, ``logp_before``, ``rank_after``, ``prob_after``, ``logp_after``
            (probabilities in [0, 1], log-probabilities in nats), the top-1 prediction before
            (``top1_before_token``, ``top1_before_prob``) and after (``top1_after`` id, ``top1_after_token``,
            ``top1_after_prob``).
        mode, factor, value: what was done to the components.
        components: the component names per prompt.
    """

    per_prompt: pd.DataFrame
    mode: str
    factor: float | None
    value: float | None
    components: list[list[str]] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        """The per-prompt table."""
        return self.per_prompt

    def _repr_html_(self) -> str:
        """The notebook display: what was done, the summary, and the per-prompt table (tokens quoted)."""
        import html as _html

        how = {"zero": "zeroed", "scale": f"scaled by {self.factor}", "replace": f"replaced by {self.value}"}
        comps = sorted({c for cs in self.components for c in cs})
        shown = ", ".join(comps[:12]) + (f", … ({len(comps)} in all)" if len(comps) > 12 else "")
        df = self.per_prompt.copy()
        for c in ("target_token", "top1_after_token"):
            if c in df:
                df[c] = [repr(t) for t in df[c]]
        for c in ("top1_before_token",):
            if c in df:
                df[c] = [repr(t) for t in df[c]]
        cols = [
            c
            for c in (
                "prompt",
                "target_token",
                "rank_before",
                "rank_after",
                "prob_before",
                "prob_after",
                "logp_before",
                "logp_after",
                "top1_before_token",
                "top1_after_token",
                "top1_after_prob",
            )
            if c in df
        ]
        s = self.summary()
        head = (
            f"<p><b>{len(comps)} component(s) {_html.escape(how.get(self.mode, self.mode))} at every position</b>: "
            f"{_html.escape(shown)}<br>{len(df)} prompt(s): MRR {s['mrr_before']:.3f} → {s['mrr_after']:.3f}, "
            f"target probability {s['prob_before_pct']:.2f}% → {s['prob_after_pct']:.2f}%, log-probability "
            f"{s['logp_before']:.3f} → {s['logp_after']:.3f} nats</p>"
        )
        return head + df[cols].to_html(index=False, float_format=lambda x: f"{x:.4f}", max_rows=50)

    def summary(self) -> dict[str, float]:
        """MRR, mean probability (%) and mean log-probability (nats) of the target, before and after
        (the neuron-level paper's Table 2 metrics), and the relative MRR and probability decreases (%)."""
        df = self.per_prompt
        out = {"n_prompts": float(len(df))}
        for when in ("before", "after"):
            out[f"mrr_{when}"] = float((1.0 / df[f"rank_{when}"]).mean())
            out[f"prob_{when}_pct"] = float(100.0 * df[f"prob_{when}"].mean())
            out[f"logp_{when}"] = float(df[f"logp_{when}"].mean())
        out["mrr_decrease_pct"] = 100.0 * (1.0 - out["mrr_after"] / out["mrr_before"])
        out["prob_decrease_pct"] = 100.0 * (1.0 - out["prob_after_pct"] / out["prob_before_pct"])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: mode, summary, per-prompt records with their component names."""
        records = self.per_prompt.to_dict(orient="records")
        for rec, comps in zip(records, self.components):
            rec["components"] = comps
        return {
            "mode": self.mode,
            "factor": self.factor,
            "value": self.value,
            "summary": self.summary(),
            "prompts": records,
        }


def _per_prompt_components(model: Any, components: Any, n: int) -> list[list[ComponentRef]]:
    if isinstance(components, str):
        shared = parse_components(model, components)
        return [shared] * n
    components = list(components)
    if components and all(isinstance(c, str) for c in components):
        shared = parse_components(model, components)
        return [shared] * n
    if len(components) != n:
        raise InvalidInputError(
            f"components must be one list of names for all prompts or one list per prompt; got {len(components)} "
            f"lists for {n} prompts"
        )
    return [parse_components(model, c) for c in components]


def _resolve_targets(model: Any, targets: Any, n: int, base_logits: Tensor) -> Tensor:
    if targets is None or isinstance(targets, (str, int)):
        return torch.tensor([resolve_target(model, targets, base_logits[b]) for b in range(n)])
    targets = list(targets)
    if len(targets) != n:
        raise InvalidInputError(f"got {len(targets)} targets for {n} prompts")
    return torch.tensor([resolve_target(model, t, base_logits[b]) for b, t in enumerate(targets)])


def intervene(
    model: Any,
    prompts: str | Sequence[str],
    components: str | Sequence[str] | Sequence[Sequence[str]],
    targets: int | str | Sequence[int | str | None] | None = None,
    *,
    mode: Mode = "zero",
    factor: float | None = None,
    value: float | None = None,
    padding_side: PaddingSide = "right",
    batch_size: int = 16,
) -> InterventionResult:
    """Apply ``mode`` to ``components`` (at every position), rerun, and compare the target before and after.

    Neuron-level paper, section 4.1: "setting the top10 neurons' parameters to zero", then MRR, prob, logp of
    the correct token. Zeroing an FFN neuron's ``hook_post`` entry, or an attention neuron's ``hook_z`` entry,
    at every position equals zeroing its parameters (its ``W_out`` row / ``W_O`` row).

    Args:
        model: ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer.
        prompts: one prompt or several.
        components: names (a list, or one comma-separated string) applied to every prompt, or one list per
            prompt (e.g. each prompt's own top-10 neurons).
        targets: token per prompt (id or one-token string), one for all, or ``None`` for the model's top-1
            before the intervention.
        mode: ``zero``, ``scale`` (needs ``factor``) or ``replace`` (needs ``value``, the new coefficient).
        padding_side: how prompts of different lengths are padded in a batch; results do not depend on it.
        batch_size: prompts per forward pass.

    Returns:
        :class:`InterventionResult` (``.to_dataframe()``, ``.summary()``: MRR, prob %, logp in nats).

    Raises:
        InvalidInputError: bad names or indices, a bad mode, targets that are not one token, empty prompts.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not prompts:
        raise InvalidInputError("no prompts given")
    _check_mode(mode, factor, value)
    comps = _per_prompt_components(model, components, len(prompts))
    if targets is not None and not isinstance(targets, (str, int)) and len(list(targets)) != len(prompts):
        raise InvalidInputError(f"got {len(list(targets))} targets for {len(prompts)} prompts")
    tok = getattr(model, "tokenizer", None)
    frames = []
    for start in range(0, len(prompts), batch_size):
        stop = min(len(prompts), start + batch_size)
        batch = tokenize_batch(model, prompts[start:stop], padding_side)
        before = last_token_logits(model, batch)
        if targets is None or isinstance(targets, (str, int)):
            t = _resolve_targets(model, targets, len(batch), before)
        else:
            t = _resolve_targets(model, list(targets)[start:stop], len(batch), before)
        hooks = intervention_hooks(model, comps[start:stop], batch, mode, factor, value)
        after = last_token_logits(model, batch, hooks)
        r0, p0, lp0 = target_metrics(before, t)
        r1, p1, lp1 = target_metrics(after, t)
        top0, top1 = before.argmax(-1), after.argmax(-1)
        decode = (lambda i: tok.decode([i])) if tok is not None else (lambda i: f"<{i}>")
        frames.append(
            pd.DataFrame(
                {
                    "prompt": batch.prompts,
                    "target": t.tolist(),
                    "target_token": [tok.decode([i]) if tok is not None else f"<{i}>" for i in t.tolist()],
                    "n_components": [len(c) for c in comps[start:stop]],
                    "rank_before": r0.tolist(),
                    "prob_before": p0.tolist(),
                    "logp_before": lp0.tolist(),
                    "rank_after": r1.tolist(),
                    "prob_after": p1.tolist(),
                    "logp_after": lp1.tolist(),
                    "top1_before_token": [decode(i) for i in top0.tolist()],
                    "top1_before_prob": torch.softmax(before.float(), -1).gather(-1, top0[:, None])[:, 0].tolist(),
                    "top1_after": top1.tolist(),
                    "top1_after_token": [decode(i) for i in top1.tolist()],
                    "top1_after_prob": torch.softmax(after.float(), -1).gather(-1, top1[:, None])[:, 0].tolist(),
                }
            )
        )
    return InterventionResult(
        pd.concat(frames, ignore_index=True), mode, factor, value, [[c.name for c in cs] for cs in comps]
    )
