"""Component names: the one vocabulary every table, command and intervention uses.

A component is a part of the residual stream (or a group of parts) that tl-residual can score, split or
intervene on. Its name is short, readable and stable, and means the same component to every function:

==================  ====================  ==========================================================================
name                kind                  meaning
==================  ====================  ==========================================================================
``embed``           ``embed``             token embedding (``hook_embed``)
``pos_embed``       ``pos_embed``         learned position embedding (``hook_pos_embed``)
``L12.attn``        ``attn``              layer 12's whole attention output (``hook_attn_out``)
``L12.mlp``         ``mlp``               layer 12's whole FFN output (``hook_mlp_out``)
``L12.attn_bias``   ``attn_bias``         layer 12's attention output bias ``b_O``
``L20.mlp_bias``    ``ffn_bias``          layer 20's FFN output bias ``b_out``
``L12.H3``          ``head``              head 3 of layer 12, all source positions
``L12.H3.p4``       ``attn_subvalue``     head 3's subvalue from source position 4 (residual-stream paper Eq. 9)
``L12.H3.d7``       ``head_dim``          head dimension 7 of head 3 (row 7 of ``W_O[3]``), all source positions
``L12.H3.d7.p4``    ``attn_neuron``       attention neuron: head 3, dimension 7, source position 4 (neuron-level
                                          paper section 3.2)
``L20.N1005``       ``ffn_neuron``        FFN neuron 1005 of layer 20 (its subvalue ``m_k * W_out[k]``)
``L3.E5.N17``       ``expert_neuron``     neuron 17 of expert 5 of layer 3's mixture-of-experts FFN
``L3.E5``           ``expert``            expert 5 of layer 3, all its neurons
``L3.shared.N17``   ``shared_neuron``     neuron 17 of layer 3's shared expert (Qwen2-MoE)
==================  ====================  ==========================================================================

Source positions ``p`` count the prompt's own tokens from 0 (the BOS token, where the tokenizer prepends one),
whatever the padding of a batch.

TransformerLens writes neurons as ``L24N1005`` and heads as ``L12H3`` (no dots, e.g. in its
``utils``-style labels and in Neuronpedia); :func:`parse` accepts those compact forms too
(``parse("L24N1005") == parse("L24.N1005")``), and :func:`format` always writes the dotted form.

This module is pure: it knows nothing of models. :meth:`ComponentRef.check` range-checks a reference against
any object with the sizes ``n_layers``, ``n_heads``, ``d_head``, ``d_mlp`` (and ``n_experts``, ``d_expert``
for mixture-of-experts models), such as :class:`tl_residual.model.ModelSpec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from tl_residual.errors import InvalidInputError

ComponentKind = Literal[
    "embed",
    "pos_embed",
    "attn",
    "mlp",
    "attn_bias",
    "ffn_bias",
    "head",
    "attn_subvalue",
    "head_dim",
    "attn_neuron",
    "ffn_neuron",
    "expert",
    "expert_neuron",
    "shared_neuron",
]
#: Every kind name, in the order of the table in the module docstring.
KINDS: tuple[str, ...] = get_args(ComponentKind)

#: The accepted forms, for error messages.
NAME_FORMS = (
    "embed, pos_embed, L12.attn, L12.mlp, L12.attn_bias, L20.mlp_bias, L12.H3 (head), L12.H3.p4 (head x source "
    "position), L12.H3.d7 (head dimension), L12.H3.d7.p4 (attention neuron), L20.N1005 (FFN neuron), "
    "L3.E5.N17 (expert neuron), L3.E5 (expert), L3.shared.N17 (shared-expert neuron)"
)

_LAYER_RE = re.compile(
    r"^L(?P<layer>\d+)\.?"
    r"(?:"
    r"(?P<whole>attn|mlp|attn_bias|mlp_bias)"
    r"|N(?P<neuron>\d+)"
    r"|E(?P<expert>\d+)(?:\.N(?P<eneuron>\d+))?"
    r"|shared\.N(?P<sneuron>\d+)"
    r"|H(?P<head>\d+)(?:\.?d(?P<dim>\d+))?(?:\.?p(?P<src_pos>\d+))?"
    r")$"
)
_WHOLE_KIND: dict[str, ComponentKind] = {"attn": "attn", "mlp": "mlp", "attn_bias": "attn_bias", "mlp_bias": "ffn_bias"}


@dataclass(frozen=True, order=True)
class ComponentRef:
    """A typed reference to one component (see the module docstring for the kinds and names).

    Attributes:
        kind: one of :data:`KINDS`.
        layer: the layer (``None`` for ``embed`` and ``pos_embed``).
        head, dim, src_pos, neuron, expert: the indices the kind uses; ``None`` where it does not use them.
    """

    kind: ComponentKind
    layer: int | None = None
    head: int | None = None
    dim: int | None = None
    src_pos: int | None = None
    neuron: int | None = None
    expert: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"unknown component kind {self.kind!r}; kinds are {', '.join(KINDS)}")
        need = FIELDS[self.kind]
        for f in ("layer", "head", "dim", "src_pos", "neuron", "expert"):
            value = getattr(self, f)
            if f in need:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InvalidInputError(f"a {self.kind} reference needs a non-negative integer {f}, got {value!r}")
            elif value is not None:
                raise InvalidInputError(f"a {self.kind} reference has no {f} (got {f}={value!r})")

    @property
    def name(self) -> str:
        """The component's name (:func:`format`)."""
        return format(self)

    def __str__(self) -> str:
        return format(self)

    def check(self, sizes: Any, n_pos: int | None = None) -> ComponentRef:
        """Check every index against the model's sizes (and ``src_pos`` against ``n_pos`` where given).

        Args:
            sizes: an object with ``n_layers``, ``n_heads``, ``d_head``, ``d_mlp`` (``n_experts``, ``d_expert``
                for experts), e.g. :class:`tl_residual.model.ModelSpec`.
            n_pos: the prompt's length in tokens, to check source positions.

        Returns:
            ``self``.

        Raises:
            InvalidInputError: an index out of range; the message names the valid range.
        """
        text = self.name

        def bound(field: str, value: int | None, size: int | None, what: str) -> None:
            if value is None or size is None:
                return
            if value >= size:
                raise InvalidInputError(f"{text}: {field} {value} is out of range ({what} = {size}: 0..{size - 1})")

        bound("layer", self.layer, getattr(sizes, "n_layers", None), "n_layers")
        bound("head", self.head, getattr(sizes, "n_heads", None), "n_heads")
        bound("head dimension", self.dim, getattr(sizes, "d_head", None), "d_head")
        if self.kind in ("expert", "expert_neuron"):
            n_experts = getattr(sizes, "n_experts", None) or None
            if not n_experts:
                raise InvalidInputError(f"{text}: this model has no mixture-of-experts FFN (no experts to name)")
            bound("expert", self.expert, n_experts, "n_experts")
            bound("neuron", self.neuron, getattr(sizes, "d_expert", None) or getattr(sizes, "d_mlp", None), "d_expert")
        elif self.kind == "shared_neuron":
            bound("neuron", self.neuron, getattr(sizes, "d_shared_expert", None), "d_shared_expert")
        else:
            bound("neuron", self.neuron, getattr(sizes, "d_mlp", None), "d_mlp")
        if n_pos is not None:
            bound("source position", self.src_pos, n_pos, "prompt length")
        return self


#: The indices each kind uses (besides ``kind``); also the index columns of its rows in every part table
#: (:mod:`tl_residual.tables`).
FIELDS: dict[str, tuple[str, ...]] = {
    "embed": (),
    "pos_embed": (),
    "attn": ("layer",),
    "mlp": ("layer",),
    "attn_bias": ("layer",),
    "ffn_bias": ("layer",),
    "head": ("layer", "head"),
    "attn_subvalue": ("layer", "head", "src_pos"),
    "head_dim": ("layer", "head", "dim"),
    "attn_neuron": ("layer", "head", "dim", "src_pos"),
    "ffn_neuron": ("layer", "neuron"),
    "expert": ("layer", "expert"),
    "expert_neuron": ("layer", "expert", "neuron"),
    "shared_neuron": ("layer", "neuron"),
}


def format(ref: ComponentRef) -> str:  # noqa: A001 - the module's verb, as in ``names.format``
    """The name of ``ref``: ``L24.N1005``, ``L23.H4.p4``, ``L12.H3.d7.p4``, ``L3.E5.N17``, ... (dotted form)."""
    k, layer = ref.kind, ref.layer
    if k in ("embed", "pos_embed"):
        return k
    if k in ("attn", "mlp", "attn_bias"):
        return f"L{layer}.{k}"
    if k == "ffn_bias":
        return f"L{layer}.mlp_bias"
    if k == "ffn_neuron":
        return ffn_neuron(layer, ref.neuron)  # type: ignore[arg-type]
    if k == "expert":
        return f"L{layer}.E{ref.expert}"
    if k == "expert_neuron":
        return expert_neuron(layer, ref.expert, ref.neuron)  # type: ignore[arg-type]
    if k == "shared_neuron":
        return f"L{layer}.shared.N{ref.neuron}"
    text = f"L{layer}.H{ref.head}"
    if ref.dim is not None:
        text += f".d{ref.dim}"
    if ref.src_pos is not None:
        text += f".p{ref.src_pos}"
    return text


def parse(name: str) -> ComponentRef:
    """Parse a component name (dotted, or TransformerLens' compact ``L24N1005`` / ``L12H3``).

    Raises:
        InvalidInputError: ``name`` is not a string or not one of the forms in :data:`NAME_FORMS`.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"a component name must be a string, got {name!r}")
    text = name.strip()
    if text in ("embed", "pos_embed"):
        return ComponentRef(text)  # type: ignore[arg-type]
    m = _LAYER_RE.match(text)
    if m is None:
        raise InvalidInputError(f"cannot parse component name {name!r}; use one of: {NAME_FORMS}")
    g: dict[str, Any] = {k: (v if k == "whole" or v is None else int(v)) for k, v in m.groupdict().items()}
    layer = g["layer"]
    if g["whole"] is not None:
        return ComponentRef(_WHOLE_KIND[g["whole"]], layer)
    if g["neuron"] is not None:
        return ComponentRef("ffn_neuron", layer, neuron=g["neuron"])
    if g["expert"] is not None:
        if g["eneuron"] is None:
            return ComponentRef("expert", layer, expert=g["expert"])
        return ComponentRef("expert_neuron", layer, expert=g["expert"], neuron=g["eneuron"])
    if g["sneuron"] is not None:
        return ComponentRef("shared_neuron", layer, neuron=g["sneuron"])
    head, dim, src = g["head"], g["dim"], g["src_pos"]
    if dim is None:
        return ComponentRef("head" if src is None else "attn_subvalue", layer, head=head, src_pos=src)
    return ComponentRef("head_dim" if src is None else "attn_neuron", layer, head=head, dim=dim, src_pos=src)


# Convenience constructors (one per kind that tables build in bulk).


def ffn_neuron(layer: int, neuron: int) -> str:
    """``L{layer}.N{neuron}``."""
    return f"L{layer}.N{neuron}"


def attn_subvalue(layer: int, head: int, src_pos: int) -> str:
    """``L{layer}.H{head}.p{src_pos}``."""
    return f"L{layer}.H{head}.p{src_pos}"


def attn_neuron(layer: int, head: int, dim: int, src_pos: int) -> str:
    """``L{layer}.H{head}.d{dim}.p{src_pos}``."""
    return f"L{layer}.H{head}.d{dim}.p{src_pos}"


def head(layer: int, head: int) -> str:
    """``L{layer}.H{head}``."""
    return f"L{layer}.H{head}"


def expert_neuron(layer: int, expert: int, neuron: int) -> str:
    """``L{layer}.E{expert}.N{neuron}``."""
    return f"L{layer}.E{expert}.N{neuron}"


def shared_neuron(layer: int, neuron: int) -> str:
    """``L{layer}.shared.N{neuron}``."""
    return f"L{layer}.shared.N{neuron}"


def layer_output(layer: int, sublayer: Literal["attn", "mlp"]) -> str:
    """``L{layer}.attn`` or ``L{layer}.mlp``: a whole sublayer output."""
    return f"L{layer}.{sublayer}"


def key_bias(layer: int) -> str:
    """``L{layer}.key_bias``: the query side's key bias of layer ``layer``'s value neurons (the part of their input
    no residual part writes, residual-stream paper Eq. 23), a row of the query tables."""
    return f"L{layer}.key_bias"
