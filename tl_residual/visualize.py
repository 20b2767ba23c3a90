"""Seeing it: a VISIT-style flow graph of one forward pass, the residual-stream plots, and an offline HTML report.

Flow graph (Katz & Belinkov, "VISIT", section 4 and appendix A; ``docs/flow_graph.md``)
    :func:`flow_graph` draws the chosen layers of one forward pass at one position, read left to right. Per layer:
    the block input ``resid_pre``, the first norm's output ``ln1``, one query node per head, the few *memory
    values* per head (head x source-position subvalues ``pattern[h,i,p] v[p] W_O[h]``, labelled with their source
    token), the head outputs, the top and bottom *attention neurons* (``pattern[h,i,p] v[p,d] W_O[h,d]``,
    neuron-level paper section 3.2), ``b_O``, the attention output ``hook_attn_out``, ``resid_mid``, ``ln2``, the
    top and bottom FFN neurons (``m_k W_out[k]``), ``b_out``, the MLP output ``hook_mlp_out`` and ``resid_post``.

    Every node that is a ``d_model`` vector is labelled with the top token of its logit-lens projection
    (``projection`` convention of :class:`~tl_residual.lens.Lens`; default ``"recomputed"``, VISIT Eq. 2:
    ``softmax(ln_f(x) W_U)``), coloured by the target's rank in that projection, and its hover shows the top
    tokens, the target's probability and rank, and (for the parts added to the residual) the node's
    log-probability increase ``log p(t | x + v) - log p(t | x)`` in nats under the scoring ``convention``
    (default ``"frozen"``, the authors' code), with ``x`` = ``resid_pre`` for attention parts and ``resid_mid``
    for FFN parts. Query nodes live in ``d_head`` space and, under rotary embeddings, have no position-free
    projection to the vocabulary; they are labelled with the source token they attend to most and drawn grey.

    Edge widths carry the quantity of the edge (VISIT A.4): the attention weight (query -> memory value), the
    coefficient ``|m|`` (norm -> neuron, memory value -> attention neuron), or the L2 norm of the vector that is
    summed (everything else). Pruning is selectable, with the counts as parameters:
    ``prune="log_prob_increase"`` (default) keeps, per head, the memory values with the largest ``|log-prob
    increase|`` (helpful or harmful), the heads with the largest ``|log-prob increase|``, and the neurons with the
    highest and the lowest log-prob increase; ``prune="activation"`` is VISIT's rule (appendix A.5): the highest
    attention weights, the largest head norms, the highest and lowest coefficients.

Plots (plotly figures)
    :func:`layer_contributions_figure` (attention vs FFN log-probability increase per layer, from
    :func:`~tl_residual.scorers.score_layers`), :func:`bs_value_trajectory_figure` (residual-stream paper Fig. 9:
    bs-values of chosen tokens along ``Lin0, Lres0, Lout0, ...``, from :func:`tl_residual.bsvalues.bs_trajectory`),
    :func:`bs_value_minus_figure` (Fig. 10: the bs-value minus score between two tokens on each layer's attention
    and FFN output, biases removed, from :func:`tl_residual.bsvalues.bs_minus_layers`) and :func:`parts_table_figure`
    (the top parts with their top tokens).

Report
    :func:`write_report` writes one self-contained HTML file (plotly's JavaScript embedded once, no network
    access) with the flow graph, the plots and the tables; ``tl-residual explain ... --html report.html`` calls it.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import decompose as D
from tl_residual import model as tlm
from tl_residual import names
from tl_residual.bsvalues import bs_minus_layers, bs_trajectory, bs_values
from tl_residual.errors import InvalidInputError
from tl_residual.lens import CONVENTIONS, Convention, Lens, model_logits
from tl_residual.scorers import ScoringContext, get_scorer, make_context

PruneRule = Literal["log_prob_increase", "activation"]
#: Pruning rules of :func:`flow_graph`: our log-probability increase (default) or VISIT's activation size.
PRUNE_RULES: tuple[str, ...] = ("log_prob_increase", "activation")

#: Node kinds (the keys, in left-to-right order) and their column offset inside a layer.
_STAGE = {
    "resid_pre": 0,
    "ln1": 1,
    "query": 2,
    "memory_value": 3,
    "head": 4,
    "attn_neuron": 5,
    "attn_bias": 5,
    "attn_out": 6,
    "resid_mid": 7,
    "ln2": 8,
    "ffn_neuron": 9,
    "mlp_bias": 9,
    "mlp_out": 10,
    "resid_post": 11,
}
_STAGE_TITLES = {
    0: "resid_pre",
    1: "ln1",
    2: "queries",
    3: "memory values",
    4: "heads",
    5: "attn neurons",
    6: "attn_out",
    7: "resid_mid",
    8: "ln2",
    9: "FFN neurons",
    10: "mlp_out",
    11: "resid_post",
}
_STREAM_KINDS = {"resid_pre", "resid_mid", "resid_post"}
_EDGE_STYLE = {  # quantity -> (colour, legend name)
    "residual": ("rgba(60,60,60,0.55)", "residual (norm)"),
    "norm": ("rgba(120,120,120,0.45)", "sum into (norm)"),
    "attention": ("rgba(0,150,136,0.65)", "attention weight"),
    "coefficient": ("rgba(123,31,162,0.55)", "coefficient |m|"),
}
_MAX_WIDTH = 9.0
_MIN_WIDTH = 0.8


# ----------------------------------------------------------------------------------------------
# The graph object
# ----------------------------------------------------------------------------------------------

NODE_COLUMNS = [
    "id",
    "kind",
    "layer",
    "head",
    "src_pos",
    "dim",
    "neuron",
    "label",
    "top_tokens",
    "target_prob",
    "target_rank",
    "log_prob_increase",
    "coefficient",
    "norm",
    "src_token",
    "x",
    "y",
]
EDGE_COLUMNS = ["source", "target", "kind", "quantity", "value"]


@dataclass
class FlowGraph:
    """A VISIT-style flow graph: nodes and edges as pandas tables, drawn with plotly.

    Attributes:
        nodes: one row per node, columns :data:`NODE_COLUMNS`: ``id`` (component name, e.g. ``L28.H3.p4``,
            ``L29.N1005``, ``L28.H3.d7.p4``, ``L28.resid_mid``), ``kind`` (``resid_pre``, ``ln1``, ``query``,
            ``memory_value``, ``head``, ``attn_neuron``, ``attn_bias``, ``attn_out``, ``resid_mid``, ``ln2``,
            ``ffn_neuron``, ``mlp_bias``, ``mlp_out``, ``resid_post``), ``layer``,
            ``head``/``src_pos``/``dim``/``neuron`` (-1 where not applicable), ``label`` (top token of the
            projection; for queries the most-attended source token), ``top_tokens``, ``target_prob``
            (probability, in the projection), ``target_rank`` (1 = top), ``log_prob_increase`` (nats; NaN for
            nodes that are not added to the residual), ``coefficient`` (attention weight or activation; NaN where
            none), ``norm`` (L2 norm of the node's vector), ``src_token``, and the layout ``x``, ``y``.
        edges: one row per edge, columns :data:`EDGE_COLUMNS`: ``source``, ``target`` (node ids), ``kind``
            (``"<source kind>-><target kind>"``), ``quantity`` (``attention``, ``coefficient``, ``norm`` or
            ``residual``) and its ``value``.
        meta: prompt tokens, target, position, layers, pruning rule and counts, conventions.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    _figure: go.Figure | None = field(default=None, repr=False)
    _figure_key: tuple[str, bool] = field(default=("rank", False), repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        """Nodes then edges in one table, with an ``element`` column (``"node"`` / ``"edge"``)."""
        return pd.concat([self.nodes.assign(element="node"), self.edges.assign(element="edge")], ignore_index=True)[
            ["element", *NODE_COLUMNS, *[c for c in EDGE_COLUMNS if c not in NODE_COLUMNS]]
        ]

    def figure(self, colour: str = "rank", fit: bool = False) -> go.Figure:
        """The plotly figure (built once per setting, then cached).

        Args:
            colour: the initial node colouring, one of :data:`COLOURINGS` (``"rank"`` of the target in the node's
                projection, ``"sign"`` of the coefficient as in VISIT, or ``"log_prob_increase"``); buttons on the
                figure switch between them.
            fit: size the figure to its container (a page or notebook cell) instead of ~105 px per column.

        Raises:
            InvalidInputError: an unknown colouring.
        """
        if colour not in COLOURINGS:
            raise InvalidInputError(f"colour {colour!r} is not one of {', '.join(COLOURINGS)}")
        key = (colour, fit)
        if self._figure is None or self._figure_key != key:
            self._figure, self._figure_key = _draw(self, colour, fit), key
        return self._figure

    def to_html(self, path: str | None = None) -> str:
        """A complete, self-contained HTML page (plotly.js embedded; works offline). Written to ``path`` if given.

        Raises:
            OSError: ``path`` cannot be written.
        """
        page = pio.to_html(self.figure(), full_html=True, include_plotlyjs=True, config=_PLOTLY_CONFIG)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def _repr_html_(self) -> str:
        return pio.to_html(
            self.figure(fit=True), full_html=False, include_plotlyjs=True, config=dict(_PLOTLY_CONFIG, responsive=True)
        )

    def show(self, renderer: str | None = None) -> None:
        """Display the figure (plotly's renderer; in Jupyter, inline)."""
        self.figure().show(renderer=renderer, config=_PLOTLY_CONFIG)


_PLOTLY_CONFIG = {"displaylogo": False, "responsive": False, "scrollZoom": True}


# ----------------------------------------------------------------------------------------------
# Building the graph
# ----------------------------------------------------------------------------------------------


def _check_count(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        what = "a non-negative integer or None" if allow_none else "a non-negative integer"
        raise InvalidInputError(f"{name} must be {what}, got {value!r}")


def _resolve_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(max(0, n_layers - 2), n_layers))
    if isinstance(layers, int):  # resolve_layer rejects a bool with a clear error
        return [D.resolve_layer(layers, n_layers)]
    out = [D.resolve_layer(l, n_layers) for l in layers]
    if not out:
        raise InvalidInputError("layers is empty: give at least one layer, e.g. layers=[28, 29]")
    if any(b != a + 1 for a, b in zip(out, out[1:])):
        raise InvalidInputError(
            f"layers must be consecutive and increasing (the graph chains resid_post of one layer into the next), "
            f"got {list(layers)!r}; e.g. layers=range({out[0]}, {out[0] + len(out)})"
        )
    return out


def _token_texts(lens: Lens, tokens: Tensor | Sequence[str] | None, n_pos: int, batch: int) -> list[str]:
    if tokens is None:
        return [f"p{i}" for i in range(n_pos)]
    if isinstance(tokens, Tensor):
        ids = tokens[batch] if tokens.dim() == 2 else tokens
        texts = [lens.token_str(int(t)) for t in ids.tolist()]
    else:
        texts = [str(t) for t in tokens]
    if len(texts) != n_pos:
        raise InvalidInputError(f"tokens has {len(texts)} entries but the cache has {n_pos} positions")
    return texts


def _short(token: str, limit: int = 12) -> str:
    """A token for a node label: whitespace made visible only when the token is all whitespace."""
    text = token.replace("\n", "⏎").replace("\t", "⇥")
    if not text.strip():
        text = repr(token)
    elif len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _pick(scores: Tensor, n: int, largest: bool) -> list[int]:
    n = min(n, int(scores.shape[0]))
    if n <= 0:
        return []
    return torch.topk(scores, n, largest=largest).indices.tolist()


@dataclass
class _Node:
    """One row of :attr:`FlowGraph.nodes` before projection (see its docstring for the columns)."""

    id: str
    kind: str
    layer: int
    log_prob_increase: float = math.nan
    coefficient: float = math.nan
    head: int = -1
    src_pos: int = -1
    dim: int = -1
    neuron: int = -1
    src_token: str = ""
    label: str | None = None
    order: float = 0.0
    norm: float = math.nan


class _Builder:
    """Accumulates nodes (with their vectors) and edges, then projects every vector in one chunked pass."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.vectors: list[Tensor | None] = []
        self.edges: list[dict[str, Any]] = []
        self.ids: set[str] = set()

    def node(self, node: _Node, vector: Tensor | None) -> str:
        """Add ``node`` (its ``norm`` is that of ``vector``; ``None`` for nodes that are not projected) unless a
        node with its id exists; returns the id."""
        if node.id in self.ids:
            return node.id
        self.ids.add(node.id)
        if vector is not None:
            node.norm = float(vector.norm())
        self.nodes.append(node)
        self.vectors.append(vector)
        return node.id

    def edge(self, source: str, target: str, quantity: str, value: float) -> None:
        self.edges.append(dict(source=source, target=target, quantity=quantity, value=abs(float(value))))


def _lpi(ctx: ScoringContext, group: D.PartGroup) -> Float[Tensor, " n"]:
    """Log-probability increase (nats) of every part of ``group`` against its base (registry scorer, Eq. 13)."""
    if len(group) == 0:
        return torch.zeros(0)
    return get_scorer("log_prob_increase").fn(ctx, group, ctx.base_for(group))


def _subset(group: D.PartGroup, keep: set[tuple[int, int]]) -> D.PartGroup:
    """The parts of an attention-neuron group whose ``(head, src_pos)`` is in ``keep``."""
    mask = torch.tensor(
        [(h, p) in keep for h, p in zip(group.index["head"].tolist(), group.index["src_pos"].tolist())],
        dtype=torch.bool,
    )
    idx = mask.nonzero().squeeze(-1)
    return D.PartGroup(
        group.kind,
        group.layer,
        group.coefficients[idx],
        group.directions[idx],
        {k: v[idx] for k, v in group.index.items()},
        [group.names[i] for i in idx.tolist()],
    )


def _group(kind: str, layer: int, vectors: Tensor, part_names: list[str]) -> D.PartGroup:
    return D.PartGroup(kind, layer, torch.ones(vectors.shape[0]), vectors, {}, part_names)


@dataclass(frozen=True)
class _Rule:
    """What :func:`flow_graph` keeps: the pruning rule and the counts."""

    activation: bool
    n_heads: int
    n_memory: int
    n_attn_neurons: int
    n_neurons: int


def _neuron_nodes(
    b: _Builder,
    ctx: ScoringContext,
    group: D.PartGroup,
    kind: str,
    n: int,
    activation: bool,
    into: str,
    parent: Callable[[int], str],
    fields: Callable[[int], dict[str, int]],
    src_tokens: Sequence[str] = (),
) -> None:
    """The ``n`` highest and ``n`` lowest neurons of ``group`` (by log-prob increase, or by coefficient under
    ``activation``) as nodes of ``kind``, each with an edge ``parent(k) -> node`` (its coefficient) and
    ``node -> into`` (its norm). ``fields(k)`` gives the node's ``head``/``dim``/``src_pos``/``neuron``."""
    if n <= 0 or len(group) == 0:
        return
    scores = group.coefficients if activation else _lpi(ctx, group)
    picks = _pick(scores, n, True) + _pick(scores, n, False)
    for j, k in enumerate(dict.fromkeys(picks)):
        vec = group.coefficients[k] * group.directions[k]
        lpi = float(_lpi(ctx, _group(kind, group.layer or 0, vec[None], ["x"]))[0]) if activation else float(scores[k])
        f = fields(k)
        src = src_tokens[f["src_pos"]] if "src_pos" in f else ""
        coefficient = float(group.coefficients[k])
        index = (f.get("head", -1), f.get("src_pos", -1), f.get("dim", -1), f.get("neuron", -1))
        node = b.node(_Node(group.names[k], kind, int(group.layer or 0), lpi, coefficient, *index, src, order=j), vec)
        b.edge(parent(k), node, "coefficient", coefficient)
        b.edge(node, into, "norm", float(vec.norm()))


def _site(layer: int, site: str) -> str:
    """Id of a graph node that is a site of layer ``layer`` rather than a component (``L12.resid_mid``,
    ``L12.ln1``, ``L12.attn_out``); components are named by :mod:`tl_residual.names`."""
    return f"L{layer}.{site}"


def _norm_stage(b: _Builder, ctx: ScoringContext, cache: Any, l: int, prev: str, norm: str, stream: str) -> str:
    """The node of layer ``l``'s normalised input ``norm`` (``ln1`` / ``ln2``), fed by the ``stream`` node
    ``prev`` (``resid_pre`` / ``resid_mid``)."""
    vec = tlm.cached(cache, f"blocks.{l}.{norm}.hook_normalized", ctx.batch)[ctx.position]
    node = b.node(_Node(_site(l, norm), norm, l), vec)
    b.edge(prev, node, "norm", float(ctx.resid(f"blocks.{l}.hook_{stream}").norm()))
    return node


def _sublayer_output(
    b: _Builder, ctx: ScoringContext, cache: Any, l: int, sublayer: Literal["attn", "mlp"]
) -> tuple[str, Tensor]:
    """The ``attn_out`` / ``mlp_out`` node of layer ``l`` (scored as the whole sublayer output) and its vector."""
    vec = tlm.cached(cache, f"blocks.{l}.hook_{sublayer}_out", ctx.batch)[ctx.position]
    whole = _group(sublayer, l, vec[None], [names.layer_output(l, sublayer)])
    return b.node(_Node(_site(l, f"{sublayer}_out"), f"{sublayer}_out", l, float(_lpi(ctx, whole)[0])), vec), vec


def _close_sublayer(
    b: _Builder,
    ctx: ScoringContext,
    l: int,
    bias: D.PartGroup,
    bias_kind: str,
    out: str,
    out_vec: Tensor,
    prev: str,
    stream_in: str,
    stream_out: str,
) -> str:
    """The end of a sublayer: its bias node (when non-zero) into ``out``, then the ``stream_out`` node fed by
    ``out`` and by the residual ``prev`` (the ``stream_in`` node). Returns the ``stream_out`` node."""
    bias_vec = bias.total()
    if float(bias_vec.norm()) > 0:
        bn = b.node(_Node(bias.names[0], bias_kind, l, float(_lpi(ctx, bias)[0]), order=1e6), bias_vec)
        b.edge(bn, out, "norm", float(bias_vec.norm()))
    node = b.node(_Node(_site(l, stream_out), stream_out, l), ctx.resid(f"blocks.{l}.hook_{stream_out}"))
    b.edge(out, node, "norm", float(out_vec.norm()))
    b.edge(prev, node, "residual", float(ctx.resid(f"blocks.{l}.hook_{stream_in}").norm()))
    return node


def _attention_stage(
    b: _Builder,
    model: Any,
    cache: Any,
    ctx: ScoringContext,
    l: int,
    prev: str,
    rule: _Rule,
    src_tokens: Sequence[str],
    n_heads: int,
) -> str:
    """Layer ``l``'s attention: ``ln1``, queries, memory values, heads, attention neurons, ``b_O``, ``attn_out``
    and ``resid_mid`` (returned), chained from the node ``prev`` (the layer's ``resid_pre``)."""
    pos, batch = ctx.position, ctx.batch
    ln1 = _norm_stage(b, ctx, cache, l, prev, "ln1", "resid_pre")
    sub, attn_bias = D.attention_parts(model, cache, l, pos, batch)
    n_src = pos + 1
    pattern = einops.rearrange(sub.coefficients, "(head src) -> head src", src=n_src)
    sub_lpi = _lpi(ctx, sub)
    sub_lpi_hs = einops.rearrange(sub_lpi, "(head src) -> head src", src=n_src)
    head_vecs = D.head_outputs(model, cache, l, pos, batch)
    head_lpi = _lpi(ctx, _group("head", l, head_vecs, [names.head(l, h) for h in range(n_heads)]))
    head_rank = head_vecs.norm(dim=-1) if rule.activation else head_lpi.abs()
    heads = sorted(_pick(head_rank, rule.n_heads, largest=True))
    q = tlm.cached(cache, f"blocks.{l}.attn.hook_q", batch)[pos]
    if q.shape[0] != n_heads:
        raise InvalidInputError(f"blocks.{l}.attn.hook_q has {q.shape[0]} heads, expected {n_heads}")
    attn_out, attn_out_vec = _sublayer_output(b, ctx, cache, l, "attn")
    mem_nodes: dict[tuple[int, int], str] = {}
    for rank_h, h in enumerate(heads):
        top_src = int(pattern[h].argmax())
        query_label = f"→{_short(src_tokens[top_src], 9)}"
        query = _Node(f"{names.head(l, h)}.q", "query", l, head=h, src_token=src_tokens[top_src], label=query_label)
        query.order = rank_h
        qn = b.node(query, None)
        b.edge(ln1, qn, "norm", float(q[h].norm()))
        hn = b.node(_Node(names.head(l, h), "head", l, float(head_lpi[h]), head=h, order=rank_h), head_vecs[h])
        b.edge(hn, attn_out, "norm", float(head_vecs[h].norm()))
        mem_scores = pattern[h] if rule.activation else sub_lpi_hs[h].abs()
        for j, p in enumerate(_pick(mem_scores, rule.n_memory, largest=True)):
            i = h * n_src + p
            order = rank_h + j / max(rule.n_memory, 1) * 0.5
            memory = _Node(names.attn_subvalue(l, h, p), "memory_value", l, float(sub_lpi[i]), float(pattern[h, p]))
            memory.head, memory.src_pos, memory.src_token, memory.order = h, p, src_tokens[p], order
            mv = b.node(memory, sub.vectors[i])
            mem_nodes[(h, p)] = mv
            b.edge(qn, mv, "attention", float(pattern[h, p]))
            b.edge(mv, hn, "norm", float(sub.vectors[i].norm()))
    if rule.n_attn_neurons > 0 and mem_nodes:
        # candidates: the attention neurons of the drawn memory values (each hangs off its memory value)
        neurons = _subset(D.attention_neuron_parts(model, cache, l, pos, batch), set(mem_nodes))

        def fields(k: int) -> dict[str, int]:
            return {key: int(neurons.index[key][k]) for key in ("head", "dim", "src_pos")}

        def parent(k: int) -> str:
            h, p = fields(k)["head"], fields(k)["src_pos"]
            return mem_nodes.get((h, p)) or (names.head(l, h) if names.head(l, h) in b.ids else ln1)

        _neuron_nodes(
            b, ctx, neurons, "attn_neuron", rule.n_attn_neurons, rule.activation, attn_out, parent, fields, src_tokens
        )
    return _close_sublayer(b, ctx, l, attn_bias, "attn_bias", attn_out, attn_out_vec, prev, "resid_pre", "resid_mid")


def _ffn_stage(b: _Builder, model: Any, cache: Any, ctx: ScoringContext, l: int, mid: str, rule: _Rule) -> str:
    """Layer ``l``'s FFN: ``ln2``, the top and bottom neurons, ``b_out``, ``mlp_out`` and ``resid_post``
    (returned), chained from ``mid`` (the layer's ``resid_mid`` node)."""
    ln2 = _norm_stage(b, ctx, cache, l, mid, "ln2", "resid_mid")
    ffn, ffn_bias = D.ffn_parts(model, cache, l, ctx.position, ctx.batch)
    mlp_out, mlp_out_vec = _sublayer_output(b, ctx, cache, l, "mlp")
    _neuron_nodes(
        b, ctx, ffn, "ffn_neuron", rule.n_neurons, rule.activation, mlp_out, lambda k: ln2, lambda k: {"neuron": k}
    )
    return _close_sublayer(b, ctx, l, ffn_bias, "mlp_bias", mlp_out, mlp_out_vec, mid, "resid_mid", "resid_post")


def flow_graph(
    model: Any,
    cache: Any,
    target: int | str | None = None,
    layers: int | Sequence[int] | None = None,
    position: int = -1,
    batch: int = 0,
    *,
    prune: PruneRule = "log_prob_increase",
    n_heads: int | None = None,
    n_memory: int = 3,
    n_attn_neurons: int = 3,
    n_neurons: int = 4,
    convention: Convention = "frozen",
    projection: Convention = "recomputed",
    n_top_tokens: int = 8,
    tokens: Tensor | Sequence[str] | None = None,
) -> FlowGraph:
    """Build the VISIT-style flow graph of ``layers`` at ``position`` for ``target``.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        cache: its ``ActivationCache`` for one prompt, or the prompt text (the model is then run on it).
        target: the token whose probability/rank colours the nodes and whose log-probability increase prunes
            them (one token, e.g. ``" Paris"``, or an id); default the model's top-1 at ``position``.
        layers: consecutive layers to draw (an int, or e.g. ``range(26, 30)``); default the last two.
        position: destination position (default ``-1``, the last token).
        batch: prompt index in a batched cache.
        prune: ``"log_prob_increase"`` (default) or ``"activation"`` (VISIT's rule); see the module doc.
        n_heads: heads drawn per layer (default all), the top ones by the pruning rule (``|log-prob increase|``
            of the head's output, or its norm as in VISIT).
        n_memory: memory values (head x source-position subvalues) per drawn head: the largest
            ``|log-prob increase|``, or the highest attention weights under ``prune="activation"``.
        n_attn_neurons: attention neurons drawn per layer from the top and as many from the bottom (0: none),
            chosen among the neurons of the drawn memory values (``n_memory * d_head`` per head).
        n_neurons: FFN neurons drawn per layer from the top and as many from the bottom.
        convention: lens convention of the log-probability increase scores (``frozen``, ``recomputed``, ``none``).
        projection: lens convention of the node labels, probabilities and ranks (default ``recomputed``: VISIT's
            logit lens ``softmax(ln_f(x) W_U)``).
        n_top_tokens: top tokens listed in each node's hover.
        tokens: the prompt's tokens (ids ``Int[Tensor, "batch pos"]`` or ``"pos"``, or their texts), for the
            memory-value labels; not needed when ``cache`` is the prompt text (default ``p0, p1, ...``).

    Returns:
        A :class:`FlowGraph` (``to_dataframe()``, ``figure()``, ``to_html()``, ``_repr_html_``, ``show()``).

    Raises:
        InvalidInputError: bad layers (out of range, not consecutive), position, target, pruning rule, counts or
            conventions; an empty prompt.
        MissingHookError: the cache lacks a hook the graph needs (``ln1/ln2.hook_normalized``, ``attn.hook_q``,
            ``hook_pattern``, ``hook_v``, ``mlp.hook_post``, the residual hooks).
        UnsupportedArchitectureError: a model outside what the decomposition covers.
    """
    spec = tlm.model_spec(model)
    if prune not in PRUNE_RULES:
        raise InvalidInputError(f"prune {prune!r} is not one of {', '.join(PRUNE_RULES)}")
    for name, value in (
        ("n_memory", n_memory),
        ("n_attn_neurons", n_attn_neurons),
        ("n_neurons", n_neurons),
        ("n_top_tokens", n_top_tokens),
    ):
        _check_count(name, value)
    _check_count("n_heads", n_heads, allow_none=True)
    if n_heads is not None and not 1 <= n_heads <= spec.n_heads:
        raise InvalidInputError(f"n_heads must be between 1 and {spec.n_heads} (the model's heads), got {n_heads}")
    for name, conv in (("convention", convention), ("projection", projection)):
        if conv not in CONVENTIONS:
            raise InvalidInputError(f"{name} {conv!r} is not one of {', '.join(CONVENTIONS)}")
    if isinstance(cache, str):
        if not cache.strip():
            raise InvalidInputError("the prompt is empty: give some text, e.g. 'The capital of France is'")
        tokens = model.to_tokens(cache)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
    layer_list = _resolve_layers(layers, spec.n_layers)
    ctx = make_context(model, cache, target, position, batch, convention)
    pos = ctx.position
    src_tokens = _token_texts(ctx.lens, tokens, D.n_positions(cache), batch)
    rule = _Rule(
        activation=prune == "activation",
        n_heads=n_heads if n_heads is not None else spec.n_heads,
        n_memory=n_memory,
        n_attn_neurons=n_attn_neurons,
        n_neurons=n_neurons,
    )
    b = _Builder()
    first = layer_list[0]
    prev = b.node(_Node(_site(first, "resid_pre"), "resid_pre", first), ctx.resid(f"blocks.{first}.hook_resid_pre"))
    for l in layer_list:
        mid = _attention_stage(b, model, cache, ctx, l, prev, rule, src_tokens, spec.n_heads)
        prev = _ffn_stage(b, model, cache, ctx, l, mid, rule)

    nodes = _project(b, model, cache, ctx, projection, n_top_tokens)
    nodes = _layout(nodes, layer_list, bool((nodes["kind"] == "attn_neuron").any()))
    kind_of = dict(zip(nodes["id"], nodes["kind"]))
    edges = pd.DataFrame(b.edges, columns=["source", "target", "quantity", "value"])
    edges["kind"] = [f"{kind_of[s]}->{kind_of[t]}" for s, t in zip(edges["source"], edges["target"])]
    meta = dict(
        target=ctx.target,
        target_token=ctx.lens.token_str(ctx.target),
        position=pos,
        position_token=src_tokens[pos],
        prompt_tokens=src_tokens,
        layers=layer_list,
        prune=prune,
        n_heads=n_heads,
        n_memory=n_memory,
        n_attn_neurons=n_attn_neurons,
        n_neurons=n_neurons,
        convention=convention,
        projection=projection,
        d_vocab=spec.d_vocab,
        target_prob=float(torch.softmax(model_logits(model, cache, pos, batch), -1)[ctx.target]),
    )
    return FlowGraph(nodes[NODE_COLUMNS].reset_index(drop=True), edges[EDGE_COLUMNS], meta)


def _project(
    b: _Builder, model: Any, cache: Any, ctx: ScoringContext, projection: Convention, n_top_tokens: int
) -> pd.DataFrame:
    """Logit lens of every node vector (:func:`tl_residual.bsvalues.bs_values` under ``projection``): top tokens, the
    target's probability and rank; the label is the top token (memory values: ``source ▸ top token``)."""
    nodes = pd.DataFrame([dataclasses.asdict(n) for n in b.nodes])
    named = {nid: v for nid, v in zip(nodes["id"], b.vectors) if v is not None}
    probs: list[float] = [math.nan] * len(nodes)
    ranks: list[int] = [-1] * len(nodes)
    tops: list[list[str]] = [[] for _ in range(len(nodes))]
    if named:
        bs = bs_values(model, cache, named, ctx.target, ctx.position, max(n_top_tokens, 1), projection, ctx.batch)
        row = {nid: i for i, nid in enumerate(nodes["id"])}
        for r in bs.itertuples():
            i = row[r.name]
            probs[i], ranks[i], tops[i] = float(r.target_prob), int(r.target_rank), list(r.top_tokens)
    nodes["target_prob"], nodes["target_rank"], nodes["top_tokens"] = probs, ranks, tops
    labels = []
    for lab, t, kind, src in zip(nodes["label"], tops, nodes["kind"], nodes["src_token"]):
        if isinstance(lab, str):
            labels.append(lab)
        elif kind == "memory_value":  # the source token the value was created from, then what it says
            labels.append(f"{_short(src.strip() or src, 8)} ▸ {_short(t[0].strip() or t[0], 9)}")
        else:
            labels.append(_short(t[0]) if t else "")
    nodes["label"] = labels
    return nodes


def _layout(nodes: pd.DataFrame, layer_list: list[int], with_attn_neurons: bool) -> pd.DataFrame:
    """Columns left to right (one per stage, 12 per layer, ``resid_post`` shared with the next ``resid_pre``);
    the residual stream on a top row, each column's other nodes stacked below it, in ``order``."""
    stride = 11
    stages = dict(_STAGE)
    if not with_attn_neurons:  # close the gap of the absent attention-neuron column
        stages = {k: (v - 1 if v >= 5 else v) for k, v in stages.items()}
        stride = 10
    nodes = nodes.copy()
    nodes["x"] = [(layer_list.index(l)) * stride + stages[k] for l, k in zip(nodes["layer"], nodes["kind"])]
    nodes["y"] = 0.0
    columns = nodes[~nodes["kind"].isin(_STREAM_KINDS)].groupby("x")
    tallest = max((len(g) for _, g in columns), default=1)
    for _, g in columns:
        g = g.sort_values(["order", "head", "src_pos"], kind="stable")
        n = len(g)
        # centre each column on the middle of the tallest one
        nodes.loc[g.index, "y"] = [-(tallest - 1) / 2 + (n - 1) / 2 - i for i in range(n)]
    # heads and their queries sit level with the middle of their memory values (VISIT's per-head fans)
    mem = nodes[nodes["kind"] == "memory_value"].groupby(["layer", "head"])["y"].mean()
    for i in nodes.index[nodes["kind"].isin(["head", "query"])]:
        key = (nodes.at[i, "layer"], nodes.at[i, "head"])
        if key in mem.index:
            nodes.at[i, "y"] = float(mem[key])
    nodes.loc[nodes["kind"].isin(_STREAM_KINDS), "y"] = 1.6
    return nodes


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _pt(text: str) -> str:
    """Escape text for plotly's HTML-like labels (``<``, ``>``, ``&``; plotly shows ``&quot;`` literally)."""
    return html.escape(text, quote=False)


_RANK_COLORSCALE = [[0.0, "#1a9850"], [0.25, "#91cf60"], [0.5, "#fee08b"], [0.75, "#fc8d59"], [1.0, "#d73027"]]


def _prob(p: float) -> str:
    """A probability with 4 decimals, or 2 significant digits below 1e-4 (never a bare ``0.0000``)."""
    if p != p:
        return ""
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.1e}"


def _hover(row: Any, meta: dict[str, Any]) -> str:
    esc = _pt
    lines = [f"<b>{esc(row.id)}</b> ({esc(row.kind.replace('_', ' '))})"]
    if row.src_token:
        lines.append(
            f"source token: {esc(repr(row.src_token))} (position {row.src_pos})"
            if row.src_pos >= 0
            else f"attends most to {esc(repr(row.src_token))}"
        )
    if row.kind in ("memory_value", "attn_neuron") and row.src_pos == 0 and meta["position"] > 0:
        lines.append("read from position 0 (the attention sink): drawn faded")
    if row.kind == "query":
        lines.append("query of the head (d_head space: no position-free vocabulary projection)")
    if row.top_tokens:
        lines.append("top tokens: " + esc(", ".join(repr(t) for t in row.top_tokens)))
        lines.append(
            f"target {esc(repr(meta['target_token']))}: p = {_prob(row.target_prob)}, rank {row.target_rank:,}"
        )
    if not math.isnan(row.log_prob_increase):
        lines.append(f"log-prob increase: {row.log_prob_increase:+.4f} nats")
    if not math.isnan(row.coefficient):
        what = "attention weight" if row.kind == "memory_value" else "coefficient"
        lines.append(f"{what}: {row.coefficient:.4f}")
    if not math.isnan(row.norm):
        lines.append(f"norm: {row.norm:.3f}")
    return "<br>".join(lines)


def _node_scatter(nodes: pd.DataFrame, marker: dict[str, Any], name: str) -> go.Scatter:
    """One plotly trace of node markers (the rows of ``nodes``, with a ``hover`` column), tagged ``meta="node"``
    and carrying the node ids as ``customdata`` (the page's click handlers read them)."""
    return go.Scatter(
        x=nodes["x"],
        y=nodes["y"],
        mode="markers",
        text=[_pt(t) for t in nodes["label"]],
        hovertext=nodes["hover"],
        hoverinfo="text",
        marker=marker,
        name=name,
        showlegend=False,
        meta="node",
        customdata=nodes["id"],
    )


def _draw(graph: FlowGraph, colour: str = "rank", fit: bool = False) -> go.Figure:
    """The plotly figure: fixed width (about 105 px per column), or ``fit`` to its container (the report)."""
    nodes, edges, meta = graph.nodes, graph.edges, graph.meta
    pos = {r.id: (r.x, r.y) for r in nodes.itertuples()}
    fig = go.Figure()
    # layer bands and stage titles
    xs_by_layer = nodes.groupby("layer")["x"].agg(["min", "max"])
    y_top = 1.6 + 1.2
    y_bottom = float(nodes["y"].min()) - 0.8
    for i, (l, r) in enumerate(xs_by_layer.iterrows()):
        fig.add_shape(
            type="rect",
            x0=r["min"] - 0.45,
            x1=r["max"] + 0.45,
            y0=y_bottom,
            y1=y_top + 0.9,
            fillcolor="rgba(63,81,181,0.05)" if i % 2 == 0 else "rgba(0,150,136,0.05)",
            line=dict(width=0),
            layer="below",
        )
        fig.add_annotation(
            x=(r["min"] + r["max"]) / 2, y=y_top + 0.75, text=f"<b>layer {l}</b>", showarrow=False, font=dict(size=14)
        )
    for (x, kind), _ in nodes.groupby(["x", "kind"]):
        stage = _STAGE[kind]
        if kind in ("attn_bias", "mlp_bias"):
            continue
        fig.add_annotation(
            x=x, y=y_top, text=_STAGE_TITLES[stage], showarrow=False, textangle=-30, font=dict(size=11, color="#555")
        )
    # edges, bucketed by quantity and width (one line trace per bucket)
    maxima = edges.groupby("quantity")["value"].max().to_dict()
    mids_x, mids_y, mids_text = [], [], []
    for quantity, (edge_colour, legend) in _EDGE_STYLE.items():
        sel = edges[edges["quantity"] == quantity]
        if sel.empty:
            continue
        top = maxima[quantity] or 1.0
        widths = (_MIN_WIDTH + (_MAX_WIDTH - _MIN_WIDTH) * sel["value"] / top).round(0).clip(lower=1)
        for k, (w, part) in enumerate(sel.groupby(widths)):
            ex: list[float | None] = []
            ey: list[float | None] = []
            for e in part.itertuples():
                (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
                ex += [x0, x1, None]
                ey += [y0, y1, None]
                mids_x.append((x0 + x1) / 2)
                mids_y.append((y0 + y1) / 2)
                mids_text.append(f"{_pt(e.source)} → {_pt(e.target)}<br>{quantity}: {e.value:.4f}")
            fig.add_trace(
                go.Scatter(
                    x=ex,
                    y=ey,
                    mode="lines",
                    line=dict(color=edge_colour, width=float(w)),
                    hoverinfo="skip",
                    name=legend,
                    legendgroup=quantity,
                    showlegend=k == 0,
                    meta="edge",
                )
            )
    fig.add_trace(
        go.Scatter(
            x=mids_x,
            y=mids_y,
            mode="markers",
            marker=dict(size=9, color="rgba(0,0,0,0)"),
            hovertext=mids_text,
            hoverinfo="text",
            showlegend=False,
            meta="edge-hover",
        )
    )
    # nodes: projected (coloured by the chosen colouring) and queries (grey); labels are annotations on a white
    # background (readable over the edges); memory values read from position 0 (the attention sink) are faded
    hover = [_hover(r, meta) for r in nodes.itertuples()]
    nodes = nodes.assign(hover=hover)
    proj = nodes[nodes["kind"] != "query"]
    queries = nodes[nodes["kind"] == "query"]
    sink = _is_sink(proj, meta)
    markers = {mode: _node_marker(proj, meta, mode, sink) for mode in COLOURINGS}
    node_trace = len(fig.data)
    fig.add_trace(_node_scatter(proj, markers[colour], "nodes"))
    if not queries.empty:
        query_marker = dict(size=12, color="#bdbdbd", symbol="diamond", line=dict(width=1, color="#555"))
        fig.add_trace(_node_scatter(queries, query_marker, "queries"))
    faded = dict(zip(proj["id"], sink))
    for r in nodes.itertuples():
        stream = r.kind in _STREAM_KINDS
        fig.add_annotation(
            x=r.x,
            y=r.y,
            text=_pt(r.label),
            showarrow=False,
            yshift=17 if stream else 14,
            name="label",
            font=dict(size=13 if stream else 12, color="#9e9e9e" if faded.get(r.id) else "#111"),
            bgcolor="rgba(255,255,255,0.85)",
            borderpad=1,
        )
    n_cols = int(nodes["x"].max() - nodes["x"].min()) + 1
    tallest = int(nodes.groupby("x").size().max())
    layers = meta["layers"]
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    title = (
        f"Flow graph, {span}, position {meta['position']} "
        f"({_pt(repr(meta['position_token']))}), target {_pt(repr(meta['target_token']))} "
        f"(p = {meta['target_prob']:.3f}); pruned by {meta['prune'].replace('_', ' ')}"
    )
    fig.update_layout(
        title=dict(text=title, font=dict(size=15), x=0.01),
        width=None if fit else max(900, 105 * n_cols + 220),
        height=max(520, 36 * tallest + 260),
        autosize=fit,
        plot_bgcolor="white",
        paper_bgcolor="white",
        hovermode="closest",
        margin=dict(l=10, r=100, t=110, b=60),
        xaxis=dict(visible=False, range=[float(nodes["x"].min()) - 0.6, float(nodes["x"].max()) + 0.6]),
        yaxis=dict(visible=False, range=[y_bottom - 0.3, y_top + 1.3]),
        legend=dict(orientation="h", x=0.0, y=0.0, yanchor="top"),
        hoverlabel=dict(align="left", font=dict(size=12)),
        updatemenus=[
            dict(
                type="buttons",
                direction="right",
                x=0.0,
                xanchor="left",
                y=1.0,
                yanchor="bottom",
                pad=dict(t=4, b=4),
                showactive=True,
                active=COLOURINGS.index(colour),
                font=dict(size=12),
                buttons=[
                    dict(label=_COLOURING_LABELS[m], method="restyle", args=[{"marker": [markers[m]]}, [node_trace]])
                    for m in COLOURINGS
                ],
            )
        ],
    )
    return fig


Colouring = Literal["rank", "sign", "log_prob_increase"]
#: Node colourings of the flow graph (buttons on the figure): the target's rank in the node's logit-lens
#: projection (default), the sign of the coefficient (VISIT: neurons red when positive, blue when negative), or the
#: node's log-probability increase of the target (nats, red helps, blue hurts).
COLOURINGS: tuple[str, ...] = ("rank", "sign", "log_prob_increase")
_COLOURING_LABELS = {
    "rank": "colour: target rank",
    "sign": "colour: sign of coefficient",
    "log_prob_increase": "colour: log-prob increase",
}


def _is_sink(nodes: pd.DataFrame, meta: dict[str, Any]) -> list[bool]:
    """Memory values and attention neurons read from source position 0 (BOS, the usual attention sink) while the
    destination is later: drawn faded, since heads park attention there (their values are near-constant)."""
    return [
        bool(k in ("memory_value", "attn_neuron") and p == 0 and meta["position"] > 0)
        for k, p in zip(nodes["kind"], nodes["src_pos"])
    ]


def _node_marker(nodes: pd.DataFrame, meta: dict[str, Any], mode: str, sink: list[bool]) -> dict[str, Any]:
    """The node trace's marker for one colouring (a full marker, so the buttons can swap it)."""
    sizes = [22 if k in _STREAM_KINDS else 15 for k in nodes["kind"]]
    common = dict(size=sizes, opacity=[0.35 if s else 1.0 for s in sink], line=dict(width=1, color="#333"))
    if mode == "sign":
        neuron = nodes["kind"].isin(["ffn_neuron", "attn_neuron"])
        colours = [
            "#d62728" if n and c > 0 else "#1f77b4" if n and c < 0 else "#e0e0e0"
            for n, c in zip(neuron, nodes["coefficient"])
        ]
        return dict(common, color=colours, showscale=False)
    if mode == "log_prob_increase":
        lpi = nodes["log_prob_increase"].fillna(0.0)
        top = max(float(lpi.abs().max()), 1e-6)
        return dict(
            common,
            color=list(lpi),
            colorscale="RdBu",
            reversescale=True,
            cmin=-top,
            cmax=top,
            showscale=True,
            colorbar=dict(title=dict(text="log-prob<br>increase<br>(nats)"), len=0.6, thickness=14),
        )
    d_vocab = meta.get("d_vocab", 50000)
    return dict(
        common,
        color=[math.log10(max(r, 1)) for r in nodes["target_rank"]],
        colorscale=_RANK_COLORSCALE,
        cmin=0,
        cmax=math.log10(max(d_vocab, 10)),
        showscale=True,
        colorbar=dict(
            title=dict(text=f"rank of<br>{_pt(repr(meta['target_token']))}"),
            tickvals=[0, 1, 2, 3, 4, 5],
            len=0.6,
            thickness=14,
            ticktext=["1", "10", "100", "1k", "10k", "100k"],
        ),
    )


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

_ATTN_COLOUR, _MLP_COLOUR = "#3f51b5", "#ef6c00"


def _sublayer_bars(df: pd.DataFrame, column: str, hover: str) -> list[tuple[pd.DataFrame, go.Bar]]:
    """One bar trace per sublayer (attention output, FFN output) of a per-layer table with ``layer``, ``kind``
    (``attn`` / ``mlp``) and ``column``, each with the rows it draws; ``hover`` is the plotly hover template."""
    bars = []
    for kind, colour, name in (("attn", _ATTN_COLOUR, "attention output"), ("mlp", _MLP_COLOUR, "FFN output")):
        sel = df[df["kind"] == kind]
        bar = go.Bar(
            x=sel["layer"], y=sel[column], name=name, marker_color=colour, hovertemplate=f"{hover}<extra>{name}</extra>"
        )
        bars.append((sel, bar))
    return bars


def layer_contributions_figure(layers: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Bar chart of each layer's attention and FFN log-probability increase (nats; residual-stream paper Eq. 19).

    Args:
        layers: the table of :func:`~tl_residual.scorers.score_layers` (or ``Explanation.layers``), columns
            ``layer``, ``kind`` (``attn`` / ``mlp``), ``score``, ``top_tokens``.

    Raises:
        InvalidInputError: the table lacks those columns.
    """
    missing = {"layer", "kind", "score"} - set(layers.columns)
    if missing:
        raise InvalidInputError(f"layers table lacks columns {sorted(missing)}; pass score_layers(ctx)'s table")
    df = layers.sort_values(["layer", "kind"])
    fig = go.Figure()
    for sel, bar in _sublayer_bars(df, "score", "layer %{x}: %{y:+.4f} nats<br>top tokens: %{hovertext}"):
        tops = [", ".join(repr(t) for t in list(tt)[:5]) for tt in sel.get("top_tokens", [[]] * len(sel))]
        fig.add_trace(bar.update(hovertext=[_pt(t) for t in tops]))
    target = layers.attrs.get("target_token") or layers.attrs.get("target")
    fig.update_layout(
        title=title or f"Layer-level log-probability increase of the target{f' ({target!r})' if target else ''}",
        barmode="group",
        xaxis_title="layer",
        yaxis_title="log-prob increase (nats)",
        height=420,
        plot_bgcolor="white",
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
        xaxis=dict(dtick=1 if df["layer"].nunique() <= 32 else None, gridcolor="#eee"),
        yaxis=dict(gridcolor="#eee", zerolinecolor="#999"),
    )
    return fig


def bs_value_trajectory_figure(
    model: Any,
    cache: Any,
    tokens: Sequence[int | str],
    position: int = -1,
    batch: int = 0,
    convention: Convention = "frozen",
) -> go.Figure:
    """Line plot of the tokens' bs-values (logits) along the residual stream ``Lin0, Lres0, Lout0, ...``
    (residual-stream paper Fig. 9), from :func:`tl_residual.bsvalues.bs_trajectory`.

    Raises:
        InvalidInputError: a token that is not exactly one token, a bad position or convention.
    """
    df = bs_trajectory(model, cache, tokens, position, convention, "bs", batch)
    token_cols = [c for c in df.columns if c not in ("stream", "layer")]
    steps = list(range(len(df)))
    fig = go.Figure()
    for token in token_cols:
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=df[token],
                mode="lines+markers",
                name=repr(token),
                customdata=df["stream"],
                marker=dict(size=4),
                hovertemplate="%{customdata}: %{y:.3f}<extra>" + _pt(repr(token)) + "</extra>",
            )
        )
    every = max(1, len(df) // 20)
    fig.update_layout(
        title=f"bs-values along the residual stream ({convention} lens)",
        height=420,
        plot_bgcolor="white",
        xaxis=dict(
            title="residual stream (Lin0, Lres0, Lout0, Lres1, ...)",
            tickmode="array",
            tickvals=steps[::every],
            ticktext=df["stream"].tolist()[::every],
            gridcolor="#eee",
        ),
        yaxis=dict(title="bs-value (logit)", gridcolor="#eee", zerolinecolor="#999"),
    )
    return fig


def bs_value_minus_figure(
    model: Any,
    cache: Any,
    token_a: int | str,
    token_b: int | str,
    position: int = -1,
    batch: int = 0,
    convention: Convention = "frozen",
    with_bias: bool = False,
) -> go.Figure:
    """Bar chart of the bs-value minus score ``bs_a - bs_b`` (logits) of each layer's attention and FFN output,
    side by side (residual-stream paper Fig. 10, which removes the biases: ``with_bias=False``), from
    :func:`tl_residual.bsvalues.bs_minus_layers`. The embedding row is left out, as in the paper.

    Raises:
        InvalidInputError: a token that is not exactly one token, a bad position or convention.
    """
    df = bs_minus_layers(model, cache, token_a, token_b, position, convention, with_bias, batch)
    ta, tb = df.attrs["token_a"], df.attrs["token_b"]
    fig = go.Figure()
    for _, bar in _sublayer_bars(df, "minus", "layer %{x}: %{y:+.3f}"):
        fig.add_trace(bar)
    fig.update_layout(
        title=_pt(
            f"bs-value minus score bs({ta!r}) − bs({tb!r}) per layer ({convention} lens"
            f"{'' if with_bias else ', biases removed'})"
        ),
        barmode="group",
        height=420,
        plot_bgcolor="white",
        xaxis=dict(title="layer", dtick=1, gridcolor="#eee"),
        yaxis=dict(title="bs-value minus (logits)", gridcolor="#eee", zerolinecolor="#999"),
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
    )
    return fig


def parts_table_figure(table: pd.DataFrame, title: str = "Top parts", n: int = 20) -> go.Figure:
    """A plotly table of a score table (:mod:`tl_residual.scorers` columns) with each part's top tokens.

    Raises:
        InvalidInputError: the table lacks ``name`` or ``score``.
    """
    missing = {"name", "score"} - set(table.columns)
    if missing:
        raise InvalidInputError(f"the table lacks columns {sorted(missing)}; pass a tl_residual.scorers table")
    df = table.head(n)
    coef = df["coefficient"] if "coefficient" in df else [math.nan] * len(df)
    tops = df["top_tokens"] if "top_tokens" in df else [[]] * len(df)
    cells = [
        list(df["name"]),
        [f"{s:+.4f}" for s in df["score"]],
        ["" if c != c else f"{c:.4f}" for c in coef],
        [_pt(" ".join(repr(t) for t in list(tt)[:6])) for tt in tops],
    ]
    fig = go.Figure(
        go.Table(
            columnwidth=[90, 60, 60, 300],
            header=dict(
                values=["<b>part</b>", "<b>score</b>", "<b>coefficient</b>", "<b>top tokens</b>"],
                fill_color="#e8eaf6",
                align="left",
            ),
            cells=dict(values=cells, align="left", fill_color="white", height=24),
        )
    )
    fig.update_layout(title=_pt(title), height=min(120 + 26 * len(df), 700), margin=dict(l=10, r=10, t=50, b=10))
    return fig


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 16px; }
.summary { font-size: 14px; line-height: 1.5; } .note { color: #555; font-size: 13px; max-width: 1100px; }
.scroll { overflow-x: auto; max-width: 100%; } .graph { border: 1px solid #ddd; border-radius: 6px; }
nav.layers a { margin-right: 12px; font-size: 14px; }
table.parts { border-collapse: collapse; font-size: 13px; } table.parts td, table.parts th {
  border-bottom: 1px solid #e0e0e0; padding: 3px 8px; text-align: left; white-space: nowrap; }
table.parts td { max-width: 420px; overflow: hidden; text-overflow: ellipsis; }
table.parts th { background: #e8eaf6; } code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
"""

#: How many layers the report's flow graph shows by default (see :func:`default_graph_layers`).
N_GRAPH_LAYERS = 2
#: Heads per layer the report's flow graph shows by default (the top ones by |log-prob increase|).
N_GRAPH_HEADS = 4


def _fig_div(fig: go.Figure, div_id: str, responsive: bool = True) -> str:
    config = dict(_PLOTLY_CONFIG, responsive=responsive)
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=config)


def _token_cell(token: Any, limit: int = 20) -> str:
    """A token with visible quotes, cut to ``limit`` characters."""
    text = repr(str(token))
    return text if len(text) <= limit else text[: limit - 2] + "…" + text[-1]


def display_table(df: pd.DataFrame, columns: list[str], tokens: Sequence[str] | None = None) -> pd.DataFrame:
    """A score or node table made for reading: only ``columns`` (those present), a ``src_token`` column added from
    ``tokens`` where the table has ``src_pos`` but no ``src_token``, tokens quoted, numbers as text with 4
    decimals (probabilities below 1e-4 in scientific notation), and blanks where a column does not apply (NaN,
    ``-1``, ``<NA>``) instead of placeholders. Used by the HTML report and the notebook displays.
    """
    df = df.copy()
    if "src_token" in columns and "src_token" not in df.columns and "src_pos" in df.columns and tokens is not None:
        df["src_token"] = [tokens[int(p)] if p == p and 0 <= int(p) < len(tokens) else "" for p in df["src_pos"]]
    cols = [c for c in columns if c in df.columns]
    out = pd.DataFrame(index=df.index)
    for c in cols:
        values = []
        for v in df[c]:
            missing = v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))
            if c in ("head", "src_pos", "dim", "neuron", "layer", "target_rank") and not missing:
                missing = int(v) < 0
            if missing or (c in ("src_token", "label") and v == ""):
                values.append("")
            elif c == "top_tokens":
                values.append(" ".join(_token_cell(t) for t in list(v)[:6]))
            elif c in ("src_token", "target_token"):
                values.append(_token_cell(v))
            elif c == "target_prob":
                values.append(_prob(float(v)))
            elif c in ("head", "src_pos", "dim", "neuron", "layer", "target_rank"):
                values.append(f"{int(v):,}" if c == "target_rank" else str(int(v)))
            elif isinstance(v, float):
                values.append(f"{v:+.4f}" if c in ("score", "log_prob_increase") else f"{v:.4f}")
            else:
                values.append(str(v))
        out[c] = values
    return out.reset_index(drop=True)


def _table_html(
    df: pd.DataFrame,
    columns: list[str],
    table_id: str,
    tokens: Sequence[str] | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    shown = display_table(df, columns, tokens).rename(columns=headers or {})
    return (
        "<div class='scroll'>"
        + shown.to_html(index=False, classes="parts", escape=True, border=0, table_id=table_id)
        + "</div>"
    )


def default_graph_layers(layers: pd.DataFrame, n: int = N_GRAPH_LAYERS) -> list[int]:
    """The layers that matter: those of the ``n`` layer-level outputs (attention or FFN) with the largest
    ``|score|`` (e.g. ``score_layers`` or ``Explanation.layers``), distinct and increasing.

    On SmolLM2-135M-Instruct and "The capital of France is" these are layers 23 and 24 (their attention outputs
    add the most log-probability of ``' Paris'``).

    Raises:
        InvalidInputError: the table lacks ``layer``/``score``, or ``n`` is not positive.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidInputError(f"n must be a positive integer, got {n!r}")
    missing = {"layer", "score"} - set(layers.columns)
    if missing:
        raise InvalidInputError(f"the layers table lacks columns {sorted(missing)}; pass score_layers(ctx)'s table")
    rows = layers.dropna(subset=["layer"])
    rows = rows[rows["layer"].astype(int) >= 0] if len(rows) else rows
    order = rows.assign(_abs=rows["score"].abs()).sort_values("_abs", ascending=False, kind="stable")
    return sorted(list(dict.fromkeys(int(l) for l in order["layer"]))[:n])


def _graph_layers(layers: int | Sequence[int] | None, explanation: Any, n_layers: int, n: int) -> list[int]:
    if layers is None:
        return default_graph_layers(explanation.layers, n)
    if isinstance(layers, bool):
        raise InvalidInputError(f"graph layers must be layer indices (an int or a list of ints), got {layers!r}")
    raw = [layers] if isinstance(layers, int) else list(layers)
    out = sorted(dict.fromkeys(D.resolve_layer(l, n_layers) for l in raw))
    if not out:
        raise InvalidInputError("graph layers is empty: give at least one layer, e.g. [23, 24]")
    return out


_NODE_HEADERS = {
    "id": "node",
    "src_token": "source token",
    "label": "top token",
    "target_rank": "target rank",
    "target_prob": "target p",
    "log_prob_increase": "log-prob increase (nats)",
}


def report_html(
    model: Any,
    explanation: Any,
    *,
    layers: int | Sequence[int] | None = None,
    n_graph_layers: int = N_GRAPH_LAYERS,
    colour: str = "rank",
    compare_with: int | str | None = None,
    trajectory_tokens: Sequence[int | str] | None = None,
    **graph_kwargs: Any,
) -> str:
    """The HTML text of :func:`write_report` (one page, plotly.js embedded once, no network access).

    The flow graph is drawn one layer per figure, each sized to the page (a 1600 px window shows it without
    horizontal scrolling), with links to jump between layers.

    Args:
        model: the model ``explanation`` was computed with.
        explanation: a :class:`~tl_residual.explanation.Explanation` (its ``cache`` is reused; without it
            the model is rerun on the prompt).
        layers: flow-graph layers (any set, e.g. ``[23, 24]``; each drawn as its own graph); default
            :func:`default_graph_layers` of the explanation's layer table (the ``n_graph_layers`` layers whose
            attention or FFN output has the largest ``|score|``).
        n_graph_layers: how many layers the default picks (default 2).
        colour: the graphs' initial node colouring (:data:`COLOURINGS`; buttons switch it).
        compare_with: the second token of the bs-value minus plot (default: the model's best other token).
        trajectory_tokens: tokens of the bs-value trajectory plot (default: the target and the model's next
            top-4 predictions).
        graph_kwargs: passed to :func:`flow_graph` (``prune``, ``n_heads`` (default 4), ``n_memory``,
            ``n_neurons``, ...).

    Raises:
        InvalidInputError: bad flow-graph arguments, layers or tokens (see :func:`flow_graph`).
    """
    spec = tlm.model_spec(model)
    graph_layers = _graph_layers(layers, explanation, spec.n_layers, n_graph_layers)
    if colour not in COLOURINGS:
        raise InvalidInputError(f"colour {colour!r} is not one of {', '.join(COLOURINGS)}")
    graph_kwargs.setdefault("n_heads", min(N_GRAPH_HEADS, spec.n_heads))
    cache = explanation.cache
    with torch.no_grad():
        tokens = model.to_tokens(explanation.prompt)
        if cache is None:
            _, cache = model.run_with_cache(tokens)
    pos, target, conv = explanation.position, explanation.target, explanation.convention
    graphs = [
        flow_graph(model, cache, target, [l], pos, convention=conv, tokens=tokens, **graph_kwargs) for l in graph_layers
    ]
    top_ids = torch.topk(model_logits(model, cache, pos), 5).indices.tolist()
    others = [t for t in top_ids if t != target]
    traj = list(trajectory_tokens) if trajectory_tokens is not None else [target, *others[:4]]
    other = compare_with if compare_with is not None else others[0]
    layers_df = explanation.layers.copy()
    layers_df.attrs["target_token"] = explanation.target_token
    esc = html.escape
    toks = list(explanation.tokens)
    preds = ", ".join(f"{esc(repr(t))} {p:.3f}" for t, p in explanation.predictions)
    nav = " ".join(f"<a href='#graph-L{l}'>layer {l}</a>" for l in graph_layers)
    graph_sections = []
    for l, g in zip(graph_layers, graphs):
        graph_sections.append(
            f"<h3 id='graph-L{l}'>Layer {l}</h3>"
            f"<div class='graph'>{_fig_div(g.figure(colour, fit=True), f'flow-graph-L{l}')}</div>"
        )
    nodes = pd.concat([g.nodes for g in graphs], ignore_index=True)
    shown_layers = ", ".join(str(l) for l in graph_layers)
    sections = [
        f"<h1>tl-residual report: {esc(explanation.model)}</h1>",
        f"<div class='summary'>prompt {esc(repr(explanation.prompt))}, position {pos} "
        f"({esc(repr(explanation.tokens[pos]))})<br>target <b>{esc(repr(explanation.target_token))}</b> "
        f"(p = {explanation.target_prob:.4f}); top-5: {preds}<br>decomposition of the final resid_post: relative "
        f"error {explanation.decomposition_rel_error:.2e}; scores: {esc(explanation.method)}, {esc(conv)} lens</div>",
        "<h2>Flow graph</h2>",
        f"<p class='note'>Layers {esc(shown_layers)}"
        + (
            " (the layers whose attention or FFN output has the largest |log-prob increase|; choose others with "
            "<code>--graph-layers</code>)"
            if layers is None
            else ""
        )
        + f", one graph per layer, the top {graph_kwargs['n_heads']} heads by |log-prob increase|. Read left to "
        "right. Each node is labelled with the top token of its logit-lens projection; memory values read "
        "<i>source token ▸ top token</i>, query nodes (grey diamonds) <i>→ the token the head attends to most</i>. "
        "Colour (buttons above each graph): the target's rank in the node's projection (green: top), the sign of "
        "the coefficient (VISIT: neurons red if positive, blue if negative) or the node's log-probability increase "
        "(nats). Memory values read from position 0 (the attention sink, usually BOS) are faded. Hover for the top "
        "tokens, the target's probability and rank, and the log-probability increase. Edge width: attention "
        "weight (query → memory value), coefficient (norm → neuron) or the norm of the summed vector.</p>",
        f"<nav class='layers'>{nav}</nav>",
        *graph_sections,
        "<h2>Layer-level contributions</h2>",
        _fig_div(layer_contributions_figure(layers_df), "layer-contributions"),
        "<h2>bs-values along the residual stream</h2>",
        "<p class='note'>x axis, in the residual-stream paper's notation: <code>Lin<i>l</i></code> is the input of "
        "layer <i>l</i> (<code>resid_pre</code>; <code>Lin0</code> holds the embeddings), <code>Lres<i>l</i></code> "
        "the stream after layer <i>l</i>'s attention (<code>resid_mid</code>), <code>Lout<i>l</i></code> the "
        "output of layer <i>l</i> after its FFN (<code>resid_post</code>). A bs-value is a token's logit in the "
        "lens projection of that vector.</p>",
        _fig_div(bs_value_trajectory_figure(model, cache, traj, pos, convention=conv), "bs-trajectories"),
        "<h2>bs-value minus score per layer</h2>",
        _fig_div(bs_value_minus_figure(model, cache, target, other, pos, convention=conv), "bs-minus"),
        "<h2>Top parts</h2>",
        _fig_div(
            parts_table_figure(
                pd.concat([explanation.attention_subvalues, explanation.ffn_neurons]).sort_values(
                    "score", ascending=False
                ),
                "Top parts by score",
            ),
            "parts-table",
        ),
        "<h3>Attention subvalues (head × source position)</h3>",
        _table_html(
            explanation.attention_subvalues,
            ["name", "layer", "head", "src_pos", "src_token", "score", "coefficient", "top_tokens"],
            "attention-table",
            toks,
            {"src_token": "source token", "score": "score (nats)", "coefficient": "attention weight"},
        ),
        "<h3>FFN neurons</h3>",
        _table_html(
            explanation.ffn_neurons,
            ["name", "layer", "neuron", "score", "coefficient", "top_tokens"],
            "ffn-table",
            toks,
            {"score": "score (nats)", "coefficient": "activation"},
        ),
        "<h3>Flow-graph nodes</h3>",
        _table_html(
            nodes,
            [
                "id",
                "kind",
                "src_token",
                "label",
                "target_rank",
                "target_prob",
                "log_prob_increase",
                "coefficient",
                "norm",
            ],
            "nodes-table",
            toks,
            _NODE_HEADERS,
        ),
    ]
    from plotly.offline import get_plotlyjs

    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>tl-residual: {esc(explanation.prompt)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(model: Any, explanation: Any, path: str, **kwargs: Any) -> str:
    """Write :func:`report_html` to ``path`` (UTF-8) and return the path. ``kwargs`` go to :func:`report_html`.

    Raises:
        OSError: ``path`` cannot be written.
        InvalidInputError: bad flow-graph arguments.
    """
    from tl_residual._io import atomic_write_text

    page = report_html(model, explanation, **kwargs)
    atomic_write_text(path, page)  # temp file + os.replace: a failed write leaves the previous file intact
    return path
