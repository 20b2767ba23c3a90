"""Interventions: zero, scale or replace named components, rerun the model, and measure the target.

This is the faithfulness test of the neuron-level paper (Yu & Ananiadou, section 4.1, Table 2): take the
components an attribution method ranks highest, "set their parameters to zero", rerun the model, and report
the target token's reciprocal rank (averaged: MRR), probability and log-probability before and after.

Components are named as everywhere else in tl-residual and are acted on with TransformerLens hooks:

``L24.N1005``      FFN neuron ``k`` of layer ``l``: ``blocks.{l}.mlp.hook_post[..., k]`` (the coefficient
                   ``m_k``, ``act(gate) * up`` for gated MLPs), at every position. Zeroing it is the same as
                   zeroing the neuron's parameters (its row of ``W_out``).
``L12.H3.d7``      attention neuron ``(h, d)``: row ``d`` of head ``h``'s ``W_O``. Zeroing its parameters is
                   zeroing ``blocks.{l}.attn.hook_z[..., h, d]`` at every position (all source positions).
``L12.H3.d7.p4``   the attention neuron ``(h, d)`` restricted to source position ``p`` (REFERENCE.md's
                   attention neuron, coefficient ``pattern[h, i, p] * v[p, kv(h), d]``): its contribution
                   is removed from ``hook_z[..., i, h, d]`` at every destination position ``i``.
``L12.H3.p4``      head x source-position subvalue: ``blocks.{l}.attn.hook_pattern[:, h, :, p]`` at every
                   destination position (the source position's whole contribution to head ``h``).
``L12.H3``         a whole head: ``blocks.{l}.attn.hook_z[..., h, :]`` at every position.

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
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_residual import model as tlm
from tl_residual.errors import InvalidInputError

Mode = Literal["zero", "scale", "replace"]
MODES: tuple[str, ...] = ("zero", "scale", "replace")
PaddingSide = Literal["left", "right"]
ComponentKind = Literal["ffn_neuron", "attn_neuron", "attn_neuron_pos", "attn_subvalue", "head"]

_NAME = re.compile(r"^L(?P<layer>\d+)\.(?:N(?P<neuron>\d+)|H(?P<head>\d+)(?:\.d(?P<dim>\d+))?(?:\.p(?P<pos>\d+))?)$")
NAME_FORMS = "L24.N1005 (FFN neuron), L12.H3.d7 (attention neuron), L12.H3.d7.p4 (attention neuron at source " \
    "position 4), L12.H3.p4 (head x source-position subvalue), L12.H3 (head)"

HookFn = Callable[[Tensor, Any], Tensor]


# ----------------------------------------------------------------------------------------------
# Component names
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One intervenable component, parsed from its name by :func:`parse_component`.

    Attributes:
        name: the readable name (``L24.N1005``, ``L12.H3.d7``, ``L12.H3.d7.p4``, ``L12.H3.p4``, ``L12.H3``).
        kind: ``ffn_neuron``, ``attn_neuron``, ``attn_neuron_pos``, ``attn_subvalue`` or ``head``.
        layer: layer index (non-negative).
        head, dim, src_pos, neuron: the indices the kind uses (``None`` otherwise).
    """

    name: str
    kind: ComponentKind
    layer: int
    head: int | None = None
    dim: int | None = None
    src_pos: int | None = None
    neuron: int | None = None

    @property
    def hook(self) -> str:
        """The TransformerLens hook the intervention acts on."""
        if self.kind == "ffn_neuron":
            return f"blocks.{self.layer}.mlp.hook_post"
        if self.kind == "attn_subvalue":
            return f"blocks.{self.layer}.attn.hook_pattern"
        return f"blocks.{self.layer}.attn.hook_z"


def parse_component(model: Any, name: str) -> Component:
    """Parse one component name and check its indices against ``model``'s sizes.

    Source positions are checked against each prompt's length when the hooks are built.

    Raises:
        InvalidInputError: a malformed name (the message lists the accepted forms) or an index out of range
            (layer >= n_layers, neuron >= d_mlp, head >= n_heads, dim >= d_head).
    """
    return _parse(tlm.model_spec(model), name)


def _parse(spec: tlm.ModelSpec, name: str) -> Component:
    if not isinstance(name, str):
        raise InvalidInputError(f"a component name must be a string, got {name!r}")
    text = name.strip()
    match = _NAME.match(text)
    if match is None:
        raise InvalidInputError(f"cannot parse component name {name!r}; use one of: {NAME_FORMS}")
    g = {k: (int(v) if v is not None else None) for k, v in match.groupdict().items()}
    layer = g["layer"]
    if layer >= spec.n_layers:
        raise InvalidInputError(f"{text}: layer {layer} is out of range (the model has layers 0..{spec.n_layers - 1})")
    if g["neuron"] is not None:
        if g["neuron"] >= spec.d_mlp:
            raise InvalidInputError(f"{text}: FFN neuron {g['neuron']} is out of range (d_mlp = {spec.d_mlp}: 0..{spec.d_mlp - 1})")
        return Component(text, "ffn_neuron", layer, neuron=g["neuron"])
    head = g["head"]
    if head >= spec.n_heads:
        raise InvalidInputError(f"{text}: head {head} is out of range (n_heads = {spec.n_heads}: 0..{spec.n_heads - 1})")
    dim, pos = g["dim"], g["pos"]
    if dim is not None and dim >= spec.d_head:
        raise InvalidInputError(f"{text}: head dimension {dim} is out of range (d_head = {spec.d_head}: 0..{spec.d_head - 1})")
    if dim is not None:
        kind: ComponentKind = "attn_neuron_pos" if pos is not None else "attn_neuron"
    else:
        kind = "attn_subvalue" if pos is not None else "head"
    return Component(text, kind, layer, head=head, dim=dim, src_pos=pos)


def parse_components(model: Any, names: str | Iterable[str]) -> list[Component]:
    """Parse a comma-separated string or an iterable of names (duplicates dropped, order kept).

    Raises:
        InvalidInputError: no names, or any name :func:`parse_component` rejects.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    spec = tlm.model_spec(model)
    out: dict[str, Component] = {}
    for n in names:
        c = _parse(spec, n)
        out.setdefault(c.name, c)
    if not out:
        raise InvalidInputError(f"no components given; name at least one, e.g. {NAME_FORMS}")
    return list(out.values())


def random_components(
    model: Any, count: int, kind: Literal["ffn_neuron", "attn_neuron"] = "ffn_neuron", seed: int = 0,
    layers: Iterable[int] | None = None,
) -> list[str]:
    """``count`` distinct components drawn uniformly at random (the paper's random control), seeded.

    Args:
        kind: ``ffn_neuron`` (``L{l}.N{k}``) or ``attn_neuron`` (``L{l}.H{h}.d{d}``).
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
    elif kind == "attn_neuron":
        per_layer = spec.n_heads * spec.d_head
    else:
        raise InvalidInputError(f"random components of kind {kind!r} are not supported; use ffn_neuron or attn_neuron")
    total = per_layer * len(layer_list)
    if not isinstance(count, int) or not 0 <= count <= total:
        raise InvalidInputError(f"count must be an integer in 0..{total}, got {count!r}")
    gen = torch.Generator().manual_seed(int(seed))
    picks = torch.randperm(total, generator=gen)[:count].tolist()
    names = []
    for i in picks:
        layer, j = layer_list[i // per_layer], i % per_layer
        if kind == "ffn_neuron":
            names.append(f"L{layer}.N{j}")
        else:
            names.append(f"L{layer}.H{j // spec.d_head}.d{j % spec.d_head}")
    return names


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
        return PromptBatch([self.prompts[i] for i in idx.tolist()], self.tokens[idx], self.attention_mask[idx],
                           self.lengths[idx], self.offsets[idx], self.padding_side)


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
    device = tlm.W_U(model).device
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
    t_logit = logits.gather(-1, targets[:, None])
    rank = 1 + (logits > t_logit).sum(-1)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return rank, logp.exp().float(), logp.float()


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------


def _check_mode(mode: str, factor: float | None, value: float | None) -> tuple[float, float | None]:
    if mode not in MODES:
        raise InvalidInputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    for label, given in (("factor", factor), ("value", value)):
        if given is not None and (isinstance(given, bool) or not isinstance(given, numbers.Real)
                                  or not math.isfinite(float(given))):
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
    components: Sequence[Sequence[Component]],
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
    # hook name -> (selection mask) for elementwise kinds; (b, h, d, p) lists for attn_neuron_pos
    masks: dict[str, Tensor] = {}
    pos_neurons: dict[int, list[tuple[int, int, int, int]]] = {}
    for b, comps in enumerate(components):
        for c in comps:
            if c.src_pos is not None and c.src_pos >= int(batch.lengths[b]):
                raise InvalidInputError(
                    f"{c.name}: source position {c.src_pos} is beyond prompt {b}'s {int(batch.lengths[b])} tokens "
                    f"(positions 0..{int(batch.lengths[b]) - 1}, BOS included)"
                )
            if c.kind == "ffn_neuron":
                m = masks.setdefault(c.hook, torch.zeros(n_b, spec.d_mlp, dtype=torch.bool))
                m[b, c.neuron] = True
            elif c.kind in ("attn_neuron", "head"):
                m = masks.setdefault(c.hook, torch.zeros(n_b, spec.n_heads, spec.d_head, dtype=torch.bool))
                if c.kind == "head":
                    m[b, c.head, :] = True
                else:
                    m[b, c.head, c.dim] = True
            elif c.kind == "attn_subvalue":
                m = masks.setdefault(c.hook, torch.zeros(n_b, spec.n_heads, width, dtype=torch.bool))
                m[b, c.head, int(batch.offsets[b]) + c.src_pos] = True
            else:
                pos_neurons.setdefault(c.layer, []).append((b, c.head, c.dim, int(batch.offsets[b]) + c.src_pos))

    def apply(x: Tensor, sel: Tensor) -> Tensor:
        sel = sel.to(x.device)
        if val is None:
            return torch.where(sel, x * fac, x)
        return torch.where(sel, torch.full_like(x, val), x)

    hooks: list[tuple[str, HookFn]] = []
    captured: dict[str, Tensor] = {}
    for layer, entries in sorted(pos_neurons.items()):
        # Capture this layer's pattern and values in the same forward pass, then correct hook_z.
        def capture(x: Tensor, hook: Any, key: str = "") -> Tensor:
            captured[key] = x.detach()
            return x

        p_name, v_name = f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"
        if p_name in masks:  # capture the pattern after any subvalue intervention on the same layer
            sel = masks.pop(p_name)
            hooks.append((p_name, lambda x, hook, sel=sel: apply(x, sel[:, :, None, :].expand_as(x))))
        hooks.append((p_name, lambda x, hook, key=p_name: capture(x, hook, key)))
        hooks.append((v_name, lambda x, hook, key=v_name: capture(x, hook, key)))

        def correct(z: Tensor, hook: Any, entries: list = entries, p_name: str = p_name, v_name: str = v_name) -> Tensor:
            pattern, v = captured.pop(p_name), captured.pop(v_name)  # [B, H, dst, src], [B, src, kv, d_head]
            rep = spec.n_heads // v.shape[2]
            z = z.clone()
            for b, h, d, p in entries:
                contribution = pattern[b, h, :, p] * v[b, p, h // rep, d]  # [dst]
                new = contribution * fac if val is None else torch.full_like(contribution, val)
                z[b, :, h, d] = z[b, :, h, d] + (new - contribution).to(z.dtype)
            return z

        z_name = f"blocks.{layer}.attn.hook_z"
        hooks.append((z_name, correct))
    for name, sel in masks.items():
        if name.endswith("mlp.hook_post"):
            hooks.append((name, lambda x, hook, sel=sel: apply(x, sel[:, None, :].expand_as(x))))
        elif name.endswith("attn.hook_z"):
            hooks.append((name, lambda x, hook, sel=sel: apply(x, sel[:, None, :, :].expand_as(x))))
        else:  # hook_pattern [B, H, dst, src]: every destination position
            hooks.append((name, lambda x, hook, sel=sel: apply(x, sel[:, :, None, :].expand_as(x))))
    return hooks


# ----------------------------------------------------------------------------------------------
# One call
# ----------------------------------------------------------------------------------------------


@dataclass
class InterventionResult:
    """Before/after metrics of an intervention, one row per prompt.

    Attributes:
        per_prompt: DataFrame with columns ``prompt``, ``target``, ``target_token``, ``n_components``,
            ``rank_before``, ``prob_before``, ``logp_before``, ``rank_after``, ``prob_after``, ``logp_after``
            (probabilities in [0, 1], log-probabilities in nats).
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
        return {"mode": self.mode, "factor": self.factor, "value": self.value, "summary": self.summary(),
                "prompts": records}


def _per_prompt_components(model: Any, components: Any, n: int) -> list[list[Component]]:
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
    from tl_residual.lens import resolve_target

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
        frames.append(pd.DataFrame({
            "prompt": batch.prompts,
            "target": t.tolist(),
            "target_token": [tok.decode([i]) if tok is not None else f"<{i}>" for i in t.tolist()],
            "n_components": [len(c) for c in comps[start:stop]],
            "rank_before": r0.tolist(), "prob_before": p0.tolist(), "logp_before": lp0.tolist(),
            "rank_after": r1.tolist(), "prob_after": p1.tolist(), "logp_after": lp1.tolist(),
        }))
    return InterventionResult(pd.concat(frames, ignore_index=True), mode, factor, value,
                              [[c.name for c in cs] for cs in comps])
