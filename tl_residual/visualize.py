"""Seeing it: a VISIT-style flow graph of one forward pass, the residual-stream plots, and an offline HTML report.

Flow graph (Katz & Belinkov, "VISIT", section 4 and appendix A; REFERENCE.md "VISIT flow graph")
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
    bs-values of chosen tokens along ``Lin0, Lres0, Lout0, ...``, from :func:`tl_residual.lens.bs_trajectory`),
    :func:`bs_value_minus_figure` (Fig. 10: the bs-value minus score between two tokens on each layer's attention
    and FFN output, biases removed, from :func:`tl_residual.lens.bs_minus_layers`) and :func:`parts_table_figure`
    (the top parts with their top tokens).

Report
    :func:`write_report` writes one self-contained HTML file (plotly's JavaScript embedded once, no network
    access) with the flow graph, the plots and the tables; ``tl-residual explain ... --html report.html`` calls it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
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
from tl_residual.errors import InvalidInputError
from tl_residual.lens import CONVENTIONS, Convention, Lens, bs_minus_layers, bs_trajectory, bs_values, model_logits
from tl_residual.scorers import ScoringContext, get_scorer, make_context

PruneRule = Literal["log_prob_increase", "activation"]
#: Pruning rules of :func:`flow_graph`: our log-probability increase (default) or VISIT's activation size.
PRUNE_RULES: tuple[str, ...] = ("log_prob_increase", "activation")

#: Node kinds in left-to-right order; ``STAGE[kind]`` is the column offset inside a layer.
NODE_KINDS: tuple[str, ...] = (
    "resid_pre", "ln1", "query", "memory_value", "head", "attn_neuron", "attn_bias", "attn_out", "resid_mid",
    "ln2", "ffn_neuron", "mlp_bias", "mlp_out", "resid_post",
)
_STAGE = {
    "resid_pre": 0, "ln1": 1, "query": 2, "memory_value": 3, "head": 4, "attn_neuron": 5, "attn_bias": 5,
    "attn_out": 6, "resid_mid": 7, "ln2": 8, "ffn_neuron": 9, "mlp_bias": 9, "mlp_out": 10, "resid_post": 11,
}
_STAGE_TITLES = {
    0: "resid_pre", 1: "ln1", 2: "queries", 3: "memory values", 4: "heads", 5: "attn neurons", 6: "attn_out",
    7: "resid_mid", 8: "ln2", 9: "FFN neurons", 10: "mlp_out", 11: "resid_post",
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
    "id", "kind", "layer", "head", "src_pos", "dim", "neuron", "label", "top_tokens", "target_prob", "target_rank",
    "log_prob_increase", "coefficient", "norm", "src_token", "x", "y",
]
EDGE_COLUMNS = ["source", "target", "kind", "quantity", "value"]


@dataclass
class FlowGraph:
    """A VISIT-style flow graph: nodes and edges as pandas tables, drawn with plotly.

    Attributes:
        nodes: one row per node, columns :data:`NODE_COLUMNS`: ``id`` (component name, e.g. ``L28.H3.p4``,
            ``L29.N1005``, ``L28.H3.d7.p4``, ``L28.resid_mid``), ``kind`` (one of :data:`NODE_KINDS`), ``layer``,
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

    def to_dataframe(self) -> pd.DataFrame:
        """Nodes then edges in one table, with an ``element`` column (``"node"`` / ``"edge"``)."""
        return pd.concat(
            [self.nodes.assign(element="node"), self.edges.assign(element="edge")], ignore_index=True
        )[["element", *NODE_COLUMNS, *[c for c in EDGE_COLUMNS if c not in NODE_COLUMNS]]]

    def figure(self) -> go.Figure:
        """The plotly figure (built once, then cached)."""
        if self._figure is None:
            self._figure = _draw(self)
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
        return pio.to_html(self.figure(), full_html=False, include_plotlyjs=True, config=_PLOTLY_CONFIG)

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
        raise InvalidInputError(f"{name} must be a non-negative integer{' or None' if allow_none else ''}, got {value!r}")


def _resolve_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(max(0, n_layers - 2), n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
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


class _Builder:
    """Accumulates nodes (with their vectors) and edges, then projects every vector in one chunked pass."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.vectors: list[Tensor | None] = []
        self.edges: list[dict[str, Any]] = []
        self.ids: set[str] = set()

    def node(self, id: str, kind: str, layer: int, vector: Tensor | None, *, lpi: float = math.nan,
             coefficient: float = math.nan, head: int = -1, src_pos: int = -1, dim: int = -1, neuron: int = -1,
             src_token: str = "", label: str | None = None, order: float = 0.0) -> str:
        if id in self.ids:
            return id
        self.ids.add(id)
        self.nodes.append(dict(
            id=id, kind=kind, layer=layer, head=head, src_pos=src_pos, dim=dim, neuron=neuron, label=label,
            log_prob_increase=float(lpi), coefficient=float(coefficient),
            norm=float(vector.norm()) if vector is not None else math.nan, src_token=src_token, order=order,
        ))
        self.vectors.append(vector)
        return id

    def edge(self, source: str, target: str, quantity: str, value: float) -> None:
        self.edges.append(dict(source=source, target=target, quantity=quantity, value=abs(float(value))))


def _lpi(ctx: ScoringContext, group: D.PartGroup) -> Float[Tensor, " n"]:
    """Log-probability increase (nats) of every part of ``group`` against its base (registry scorer, Eq. 13)."""
    if len(group) == 0:
        return torch.zeros(0)
    return get_scorer("log_prob_increase").fn(ctx, group, ctx.base_for(group))


def _subset(group: D.PartGroup, keep: set[tuple[int, int]]) -> D.PartGroup:
    """The parts of an attention-neuron group whose ``(head, src_pos)`` is in ``keep``."""
    mask = torch.tensor([(h, p) in keep for h, p in zip(group.index["head"].tolist(), group.index["src_pos"].tolist())],
                        dtype=torch.bool)
    idx = mask.nonzero().squeeze(-1)
    return D.PartGroup(group.kind, group.layer, group.coefficients[idx], group.directions[idx],
                       {k: v[idx] for k, v in group.index.items()}, [group.names[i] for i in idx.tolist()])


def _group(kind: str, layer: int, vectors: Tensor, names: list[str]) -> D.PartGroup:
    return D.PartGroup(kind, layer, torch.ones(vectors.shape[0]), vectors, {}, names)


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
    for name, value in (("n_memory", n_memory), ("n_attn_neurons", n_attn_neurons), ("n_neurons", n_neurons),
                        ("n_top_tokens", n_top_tokens)):
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
    activation = prune == "activation"
    b = _Builder()

    resid = ctx.resid
    first = layer_list[0]
    prev = b.node(f"L{first}.resid_pre", "resid_pre", first, resid(f"blocks.{first}.hook_resid_pre"))
    for l in layer_list:
        # ---- attention ------------------------------------------------------------------------------
        x_pre = resid(f"blocks.{l}.hook_resid_pre")
        ln1 = b.node(f"L{l}.ln1", "ln1", l, tlm.cached(cache, f"blocks.{l}.ln1.hook_normalized", batch)[pos])
        b.edge(prev, ln1, "norm", float(x_pre.norm()))
        sub, attn_bias = D.attention_parts(model, cache, l, pos, batch)
        n_src = pos + 1
        pattern = einops.rearrange(sub.coefficients, "(head src) -> head src", src=n_src)
        sub_lpi = _lpi(ctx, sub)
        sub_lpi_hs = einops.rearrange(sub_lpi, "(head src) -> head src", src=n_src)
        head_vecs = einops.reduce(sub.vectors, "(head src) d_model -> head d_model", "sum", src=n_src)
        head_group = _group("head", l, head_vecs, [D.head_name(l, h) for h in range(spec.n_heads)])
        head_lpi = _lpi(ctx, head_group)
        head_rank = head_vecs.norm(dim=-1) if activation else head_lpi.abs()
        heads = sorted(_pick(head_rank, n_heads if n_heads is not None else spec.n_heads, largest=True))
        q = tlm.cached(cache, f"blocks.{l}.attn.hook_q", batch)[pos]
        if q.shape[0] != spec.n_heads:
            raise InvalidInputError(f"blocks.{l}.attn.hook_q has {q.shape[0]} heads, expected {spec.n_heads}")
        attn_out_vec = tlm.cached(cache, f"blocks.{l}.hook_attn_out", batch)[pos]
        attn_out = b.node(f"L{l}.attn_out", "attn_out", l, attn_out_vec,
                          lpi=float(_lpi(ctx, _group("attn", l, attn_out_vec[None], [f"L{l}.attn"]))[0]))
        mem_nodes: dict[tuple[int, int], str] = {}
        for rank_h, h in enumerate(heads):
            top_src = int(pattern[h].argmax())
            qn = b.node(f"L{l}.H{h}.q", "query", l, None, head=h, order=rank_h,
                        label=f"→{_short(src_tokens[top_src], 9)}", src_token=src_tokens[top_src])
            b.edge(ln1, qn, "norm", float(q[h].norm()))
            hn = b.node(D.head_name(l, h), "head", l, head_vecs[h], lpi=float(head_lpi[h]), head=h, order=rank_h)
            b.edge(hn, attn_out, "norm", float(head_vecs[h].norm()))
            mem_scores = pattern[h] if activation else sub_lpi_hs[h].abs()
            for j, p in enumerate(_pick(mem_scores, n_memory, largest=True)):
                i = h * n_src + p
                mv = b.node(D.subvalue_name(l, h, p), "memory_value", l, sub.vectors[i], lpi=float(sub_lpi[i]),
                            coefficient=float(pattern[h, p]), head=h, src_pos=p, src_token=src_tokens[p],
                            order=rank_h + j / max(n_memory, 1) * 0.5)
                mem_nodes[(h, p)] = mv
                b.edge(qn, mv, "attention", float(pattern[h, p]))
                b.edge(mv, hn, "norm", float(sub.vectors[i].norm()))
        if n_attn_neurons > 0 and mem_nodes:
            # candidates: the attention neurons of the drawn memory values (each hangs off its memory value)
            neurons = _subset(D.attention_neuron_parts(model, cache, l, pos, batch), set(mem_nodes))
            scores = neurons.coefficients if activation else _lpi(ctx, neurons)
            picks = _pick(scores, n_attn_neurons, True) + _pick(scores, n_attn_neurons, False)
            for j, k in enumerate(dict.fromkeys(picks)):
                h, d, p = (int(neurons.index[key][k]) for key in ("head", "dim", "src_pos"))
                vec = neurons.coefficients[k] * neurons.directions[k]
                lpi = float(scores[k]) if not activation else float(_lpi(ctx, _group("attn_neuron", l, vec[None], ["x"]))[0])
                an = b.node(neurons.names[k], "attn_neuron", l, vec, lpi=lpi, coefficient=float(neurons.coefficients[k]),
                            head=h, dim=d, src_pos=p, src_token=src_tokens[p], order=j)
                parent = mem_nodes.get((h, p)) or (D.head_name(l, h) if D.head_name(l, h) in b.ids else ln1)
                b.edge(parent, an, "coefficient", float(neurons.coefficients[k]))
                b.edge(an, attn_out, "norm", float(vec.norm()))
        bias_vec = attn_bias.total()
        if float(bias_vec.norm()) > 0:
            bn = b.node(f"L{l}.attn_bias", "attn_bias", l, bias_vec, lpi=float(_lpi(ctx, attn_bias)[0]), order=1e6)
            b.edge(bn, attn_out, "norm", float(bias_vec.norm()))
        x_mid = resid(f"blocks.{l}.hook_resid_mid")
        mid = b.node(f"L{l}.resid_mid", "resid_mid", l, x_mid)
        b.edge(attn_out, mid, "norm", float(attn_out_vec.norm()))
        b.edge(prev, mid, "residual", float(x_pre.norm()))
        # ---- FFN --------------------------------------------------------------------------------------
        ln2 = b.node(f"L{l}.ln2", "ln2", l, tlm.cached(cache, f"blocks.{l}.ln2.hook_normalized", batch)[pos])
        b.edge(mid, ln2, "norm", float(x_mid.norm()))
        ffn, ffn_bias = D.ffn_parts(model, cache, l, pos, batch)
        mlp_out_vec = tlm.cached(cache, f"blocks.{l}.hook_mlp_out", batch)[pos]
        mlp_out = b.node(f"L{l}.mlp_out", "mlp_out", l, mlp_out_vec,
                         lpi=float(_lpi(ctx, _group("mlp", l, mlp_out_vec[None], [f"L{l}.mlp"]))[0]))
        if n_neurons > 0:
            scores = ffn.coefficients if activation else _lpi(ctx, ffn)
            picks = _pick(scores, n_neurons, True) + _pick(scores, n_neurons, False)
            for j, k in enumerate(dict.fromkeys(picks)):
                vec = ffn.coefficients[k] * ffn.directions[k]
                lpi = float(scores[k]) if not activation else float(_lpi(ctx, _group("ffn_neuron", l, vec[None], ["x"]))[0])
                nn_ = b.node(ffn.names[k], "ffn_neuron", l, vec, lpi=lpi, coefficient=float(ffn.coefficients[k]),
                             neuron=k, order=j)
                b.edge(ln2, nn_, "coefficient", float(ffn.coefficients[k]))
                b.edge(nn_, mlp_out, "norm", float(vec.norm()))
        bias_vec = ffn_bias.total()
        if float(bias_vec.norm()) > 0:
            bn = b.node(f"L{l}.mlp_bias", "mlp_bias", l, bias_vec, lpi=float(_lpi(ctx, ffn_bias)[0]), order=1e6)
            b.edge(bn, mlp_out, "norm", float(bias_vec.norm()))
        x_post = resid(f"blocks.{l}.hook_resid_post")
        post = b.node(f"L{l}.resid_post", "resid_post", l, x_post)
        b.edge(mlp_out, post, "norm", float(mlp_out_vec.norm()))
        b.edge(mid, post, "residual", float(x_mid.norm()))
        prev = post

    nodes = _project(b, model, cache, ctx, projection, n_top_tokens)
    nodes = _layout(nodes, layer_list, bool((nodes["kind"] == "attn_neuron").any()))
    kind_of = dict(zip(nodes["id"], nodes["kind"]))
    edges = pd.DataFrame(b.edges, columns=["source", "target", "quantity", "value"])
    edges["kind"] = [f"{kind_of[s]}->{kind_of[t]}" for s, t in zip(edges["source"], edges["target"])]
    meta = dict(
        target=ctx.target, target_token=ctx.lens.token_str(ctx.target), position=pos,
        position_token=src_tokens[pos], prompt_tokens=src_tokens, layers=layer_list, prune=prune,
        n_heads=n_heads, n_memory=n_memory, n_attn_neurons=n_attn_neurons, n_neurons=n_neurons,
        convention=convention, projection=projection, d_vocab=spec.d_vocab,
        target_prob=float(torch.softmax(model_logits(model, cache, pos, batch), -1)[ctx.target]),
    )
    return FlowGraph(nodes[NODE_COLUMNS].reset_index(drop=True), edges[EDGE_COLUMNS], meta)


def _project(b: _Builder, model: Any, cache: Any, ctx: ScoringContext, projection: Convention,
             n_top_tokens: int) -> pd.DataFrame:
    """Logit lens of every node vector (:func:`tl_residual.lens.bs_values` under ``projection``): top tokens, the
    target's probability and rank; the label is the top token (memory values: ``source ▸ top token``)."""
    nodes = pd.DataFrame(b.nodes)
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


def _hover(row: Any, meta: dict[str, Any]) -> str:
    esc = _pt
    lines = [f"<b>{esc(row.id)}</b> ({esc(row.kind.replace('_', ' '))})"]
    if row.src_token:
        lines.append(f"source token: {esc(repr(row.src_token))} (position {row.src_pos})"
                     if row.src_pos >= 0 else f"attends most to {esc(repr(row.src_token))}")
    if row.kind == "query":
        lines.append("query of the head (d_head space: no position-free vocabulary projection)")
    if row.top_tokens:
        lines.append("top tokens: " + esc(", ".join(repr(t) for t in row.top_tokens)))
        lines.append(f"target {esc(repr(meta['target_token']))}: p = {row.target_prob:.4f}, rank {row.target_rank:,}")
    if not math.isnan(row.log_prob_increase):
        lines.append(f"log-prob increase: {row.log_prob_increase:+.4f} nats")
    if not math.isnan(row.coefficient):
        what = "attention weight" if row.kind == "memory_value" else "coefficient"
        lines.append(f"{what}: {row.coefficient:.4f}")
    if not math.isnan(row.norm):
        lines.append(f"norm: {row.norm:.3f}")
    return "<br>".join(lines)


def _draw(graph: FlowGraph) -> go.Figure:
    nodes, edges, meta = graph.nodes, graph.edges, graph.meta
    pos = {r.id: (r.x, r.y) for r in nodes.itertuples()}
    fig = go.Figure()
    # layer bands and stage titles
    xs_by_layer = nodes.groupby("layer")["x"].agg(["min", "max"])
    y_top = 1.6 + 1.2
    y_bottom = float(nodes["y"].min()) - 0.8
    for i, (l, r) in enumerate(xs_by_layer.iterrows()):
        fig.add_shape(type="rect", x0=r["min"] - 0.45, x1=r["max"] + 0.45, y0=y_bottom, y1=y_top + 0.9,
                      fillcolor="rgba(63,81,181,0.05)" if i % 2 == 0 else "rgba(0,150,136,0.05)",
                      line=dict(width=0), layer="below")
        fig.add_annotation(x=(r["min"] + r["max"]) / 2, y=y_top + 0.75, text=f"<b>layer {l}</b>", showarrow=False,
                           font=dict(size=14))
    for (x, kind), _ in nodes.groupby(["x", "kind"]):
        stage = _STAGE[kind]
        if kind in ("attn_bias", "mlp_bias"):
            continue
        fig.add_annotation(x=x, y=y_top, text=_STAGE_TITLES[stage], showarrow=False, textangle=-30,
                           font=dict(size=11, color="#555"))
    # edges, bucketed by quantity and width (one line trace per bucket)
    maxima = edges.groupby("quantity")["value"].max().to_dict()
    mids_x, mids_y, mids_text = [], [], []
    for quantity, (colour, legend) in _EDGE_STYLE.items():
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
            fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color=colour, width=float(w)),
                                     hoverinfo="skip", name=legend, legendgroup=quantity, showlegend=k == 0,
                                     meta="edge"))
    fig.add_trace(go.Scatter(x=mids_x, y=mids_y, mode="markers", marker=dict(size=9, color="rgba(0,0,0,0)"),
                             hovertext=mids_text, hoverinfo="text", showlegend=False, meta="edge-hover"))
    # nodes: projected (coloured by the target's rank) and queries (grey)
    d_vocab = meta.get("d_vocab", 50000)
    hover = [_hover(r, meta) for r in nodes.itertuples()]
    nodes = nodes.assign(hover=hover)
    proj = nodes[nodes["kind"] != "query"]
    queries = nodes[nodes["kind"] == "query"]
    sizes = [22 if k in _STREAM_KINDS else 15 for k in proj["kind"]]
    fig.add_trace(go.Scatter(
        x=proj["x"], y=proj["y"], mode="markers+text", text=[_pt(t) for t in proj["label"]],
        textposition="top center", textfont=dict(size=11, color="#111"), hovertext=proj["hover"], hoverinfo="text",
        marker=dict(size=sizes, color=[math.log10(max(r, 1)) for r in proj["target_rank"]],
                    colorscale=_RANK_COLORSCALE, cmin=0, cmax=math.log10(max(d_vocab, 10)),
                    line=dict(width=1, color="#333"),
                    colorbar=dict(title=dict(text=f"rank of<br>{_pt(repr(meta['target_token']))}"),
                                  tickvals=[0, 1, 2, 3, 4, 5], len=0.6, thickness=14,
                                  ticktext=["1", "10", "100", "1k", "10k", "100k"])),
        name="nodes", showlegend=False, meta="node", customdata=proj["id"],
    ))
    if not queries.empty:
        fig.add_trace(go.Scatter(
            x=queries["x"], y=queries["y"], mode="markers+text", text=[_pt(t) for t in queries["label"]],
            textposition="top center", textfont=dict(size=10, color="#444"), hovertext=queries["hover"],
            hoverinfo="text", marker=dict(size=12, color="#bdbdbd", symbol="diamond", line=dict(width=1, color="#555")),
            name="queries", showlegend=False, meta="node", customdata=queries["id"],
        ))
    n_cols = int(nodes["x"].max() - nodes["x"].min()) + 1
    tallest = int(nodes.groupby("x").size().max())
    layers = meta["layers"]
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    title = (f"Flow graph, {span}, position {meta['position']} "
             f"({_pt(repr(meta['position_token']))}), target {_pt(repr(meta['target_token']))} "
             f"(p = {meta['target_prob']:.3f}); pruned by {meta['prune'].replace('_', ' ')}")
    fig.update_layout(
        title=dict(text=title, font=dict(size=15), x=0.01),
        width=max(900, 105 * n_cols + 220), height=max(520, 34 * tallest + 260),
        plot_bgcolor="white", paper_bgcolor="white", hovermode="closest",
        margin=dict(l=20, r=20, t=70, b=60),
        xaxis=dict(visible=False, range=[float(nodes["x"].min()) - 0.7, float(nodes["x"].max()) + 0.7]),
        yaxis=dict(visible=False, range=[y_bottom - 0.3, y_top + 1.3]),
        legend=dict(orientation="h", x=0.0, y=0.0, yanchor="top"),
        hoverlabel=dict(align="left", font=dict(size=12)),
    )
    return fig


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

_ATTN_COLOUR, _MLP_COLOUR = "#3f51b5", "#ef6c00"


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
    for kind, colour, name in (("attn", _ATTN_COLOUR, "attention output"), ("mlp", _MLP_COLOUR, "FFN output")):
        sel = df[df["kind"] == kind]
        tops = [", ".join(repr(t) for t in list(tt)[:5]) for tt in sel.get("top_tokens", [[]] * len(sel))]
        fig.add_trace(go.Bar(x=sel["layer"], y=sel["score"], name=name, marker_color=colour,
                             hovertext=[_pt(t) for t in tops],
                             hovertemplate="layer %{x}: %{y:+.4f} nats<br>top tokens: %{hovertext}<extra>" + name
                             + "</extra>"))
    target = layers.attrs.get("target_token") or layers.attrs.get("target")
    fig.update_layout(
        title=title or f"Layer-level log-probability increase of the target{f' ({target!r})' if target else ''}",
        barmode="group", xaxis_title="layer", yaxis_title="log-prob increase (nats)", height=420,
        plot_bgcolor="white", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
        xaxis=dict(dtick=1 if df["layer"].nunique() <= 32 else None, gridcolor="#eee"),
        yaxis=dict(gridcolor="#eee", zerolinecolor="#999"),
    )
    return fig


def bs_value_trajectory_figure(
    model: Any, cache: Any, tokens: Sequence[int | str], position: int = -1, batch: int = 0,
    convention: Convention = "frozen",
) -> go.Figure:
    """Line plot of the tokens' bs-values (logits) along the residual stream ``Lin0, Lres0, Lout0, ...``
    (residual-stream paper Fig. 9), from :func:`tl_residual.lens.bs_trajectory`.

    Raises:
        InvalidInputError: a token that is not exactly one token, a bad position or convention.
    """
    df = bs_trajectory(model, cache, tokens, position, convention, "bs", batch)
    token_cols = [c for c in df.columns if c not in ("stream", "layer")]
    steps = list(range(len(df)))
    fig = go.Figure()
    for token in token_cols:
        fig.add_trace(go.Scatter(x=steps, y=df[token], mode="lines+markers", name=repr(token),
                                 customdata=df["stream"], marker=dict(size=4),
                                 hovertemplate="%{customdata}: %{y:.3f}<extra>" + _pt(repr(token)) + "</extra>"))
    every = max(1, len(df) // 20)
    fig.update_layout(
        title=f"bs-values along the residual stream ({convention} lens)", height=420, plot_bgcolor="white",
        xaxis=dict(title="residual stream (Lin0, Lres0, Lout0, Lres1, ...)", tickmode="array",
                   tickvals=steps[::every], ticktext=df["stream"].tolist()[::every], gridcolor="#eee"),
        yaxis=dict(title="bs-value (logit)", gridcolor="#eee", zerolinecolor="#999"),
    )
    return fig


def bs_value_minus_figure(
    model: Any, cache: Any, token_a: int | str, token_b: int | str, position: int = -1, batch: int = 0,
    convention: Convention = "frozen", with_bias: bool = False,
) -> go.Figure:
    """Bar chart of the bs-value minus score ``bs_a - bs_b`` (logits) of each layer's attention and FFN output,
    side by side (residual-stream paper Fig. 10, which removes the biases: ``with_bias=False``), from
    :func:`tl_residual.lens.bs_minus_layers`. The embedding row is left out, as in the paper.

    Raises:
        InvalidInputError: a token that is not exactly one token, a bad position or convention.
    """
    df = bs_minus_layers(model, cache, token_a, token_b, position, convention, with_bias, batch)
    ta, tb = df.attrs["token_a"], df.attrs["token_b"]
    fig = go.Figure()
    for kind, colour, name in (("attn", _ATTN_COLOUR, "attention output"), ("mlp", _MLP_COLOUR, "FFN output")):
        sel = df[df["kind"] == kind]
        fig.add_trace(go.Bar(x=sel["layer"], y=sel["minus"], name=name, marker_color=colour,
                             hovertemplate="layer %{x}: %{y:+.3f}<extra>" + name + "</extra>"))
    fig.update_layout(
        title=_pt(f"bs-value minus score bs({ta!r}) − bs({tb!r}) per layer ({convention} lens"
                  f"{'' if with_bias else ', biases removed'})"),
        barmode="group", height=420, plot_bgcolor="white", xaxis=dict(title="layer", dtick=1, gridcolor="#eee"),
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
    fig = go.Figure(go.Table(
        columnwidth=[90, 60, 60, 300],
        header=dict(values=["<b>part</b>", "<b>score</b>", "<b>coefficient</b>", "<b>top tokens</b>"],
                    fill_color="#e8eaf6", align="left"),
        cells=dict(values=cells, align="left", fill_color="white", height=24),
    ))
    fig.update_layout(title=_pt(title), height=min(120 + 26 * len(df), 700),
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.summary { font-size: 14px; line-height: 1.5; } .note { color: #555; font-size: 13px; max-width: 1100px; }
.scroll { overflow-x: auto; border: 1px solid #ddd; border-radius: 6px; padding: 4px; }
table.parts { border-collapse: collapse; font-size: 13px; } table.parts td, table.parts th {
  border-bottom: 1px solid #e0e0e0; padding: 3px 8px; text-align: left; }
table.parts th { background: #e8eaf6; } code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
"""


def _fig_div(fig: go.Figure, div_id: str, responsive: bool = True) -> str:
    config = dict(_PLOTLY_CONFIG, responsive=responsive)
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=config)


def _table_html(df: pd.DataFrame, columns: list[str], table_id: str) -> str:
    cols = [c for c in columns if c in df.columns]
    out = df[cols].copy()
    if "top_tokens" in out:
        out["top_tokens"] = [" ".join(repr(t) for t in list(tt)[:6]) for tt in out["top_tokens"]]
    return out.to_html(index=False, classes="parts", float_format=lambda x: f"{x:.4f}", escape=True, border=0,
                       table_id=table_id)


def report_html(model: Any, explanation: Any, *, layers: int | Sequence[int] | None = None,
                compare_with: int | str | None = None, trajectory_tokens: Sequence[int | str] | None = None,
                **graph_kwargs: Any) -> str:
    """The HTML text of :func:`write_report` (one page, plotly.js embedded once, no network access).

    Args:
        model: the model ``explanation`` was computed with.
        explanation: a :class:`~tl_residual.explain.Explanation` (its ``extra["cache"]`` is reused; without it
            the model is rerun on the prompt).
        layers: flow-graph layers (default the last two).
        compare_with: the second token of the bs-value minus plot (default: the model's best other token).
        trajectory_tokens: tokens of the bs-value trajectory plot (default: the target and the model's next
            top-4 predictions).
        graph_kwargs: passed to :func:`flow_graph` (``prune``, ``n_memory``, ``n_neurons``, ...).

    Raises:
        InvalidInputError: bad flow-graph arguments or tokens (see :func:`flow_graph`).
    """
    cache = explanation.extra.get("cache")
    with torch.no_grad():
        tokens = model.to_tokens(explanation.prompt)
        if cache is None:
            _, cache = model.run_with_cache(tokens)
    pos, target, conv = explanation.position, explanation.target, explanation.convention
    graph = flow_graph(model, cache, target, layers, pos, convention=conv, tokens=tokens, **graph_kwargs)
    top_ids = torch.topk(model_logits(model, cache, pos), 5).indices.tolist()
    others = [t for t in top_ids if t != target]
    traj = list(trajectory_tokens) if trajectory_tokens is not None else [target, *others[:4]]
    other = compare_with if compare_with is not None else others[0]
    layers_df = explanation.layers.copy()
    layers_df.attrs["target_token"] = explanation.target_token
    esc = html.escape
    preds = ", ".join(f"{esc(repr(t))} {p:.3f}" for t, p in explanation.predictions)
    sections = [
        f"<h1>tl-residual report: {esc(explanation.model)}</h1>",
        f"<div class='summary'>prompt {esc(repr(explanation.prompt))}, position {pos} "
        f"({esc(repr(explanation.tokens[pos]))})<br>target <b>{esc(repr(explanation.target_token))}</b> "
        f"(p = {explanation.target_prob:.4f}); top-5: {preds}<br>decomposition of the final resid_post: relative "
        f"error {explanation.decomposition_rel_error:.2e}; scores: {esc(explanation.method)}, {esc(conv)} lens</div>",
        "<h2>Flow graph</h2>",
        "<p class='note'>Read left to right. Each node is labelled with the top token of its logit-lens projection "
        "and coloured by the target's rank in it (green: top); hover for the top tokens, the target's probability "
        "and rank, and the node's log-probability increase (nats). Edge width: attention weight (query → memory "
        "value), coefficient (norm → neuron) or the norm of the summed vector. Memory values are head × "
        "source-position subvalues, labelled in the hover with their source token. Query nodes (grey diamonds) "
        "show the token the head attends to most.</p>",
        f"<div class='scroll'>{_fig_div(graph.figure(), 'flow-graph', responsive=False)}</div>",
        "<h2>Layer-level contributions</h2>",
        _fig_div(layer_contributions_figure(layers_df), "layer-contributions"),
        "<h2>bs-values along the residual stream</h2>",
        _fig_div(bs_value_trajectory_figure(model, cache, traj, pos, convention=conv), "bs-trajectories"),
        "<h2>bs-value minus score per layer</h2>",
        _fig_div(bs_value_minus_figure(model, cache, target, other, pos, convention=conv), "bs-minus"),
        "<h2>Top parts</h2>",
        _fig_div(parts_table_figure(pd.concat([explanation.attention_subvalues, explanation.ffn_neurons])
                                    .sort_values("score", ascending=False), "Top parts by score"), "parts-table"),
        "<h3>Attention subvalues (head × source position)</h3>",
        _table_html(explanation.attention_subvalues,
                    ["name", "layer", "head", "src_pos", "score", "coefficient", "top_tokens"], "attention-table"),
        "<h3>FFN neurons</h3>",
        _table_html(explanation.ffn_neurons, ["name", "layer", "neuron", "score", "coefficient", "top_tokens"],
                    "ffn-table"),
        "<h3>Flow-graph nodes</h3>",
        _table_html(graph.nodes, ["id", "kind", "label", "target_prob", "target_rank", "log_prob_increase",
                                  "coefficient", "norm"], "nodes-table"),
    ]
    from plotly.offline import get_plotlyjs

    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>tl-residual: {esc(explanation.prompt)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>\n"
        + "\n".join(sections) + "\n</body></html>\n"
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
