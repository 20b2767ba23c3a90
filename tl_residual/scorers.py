"""Scoring parts of the residual stream for a target token.

The proposed score of both papers is the **log-probability increase** (residual-stream paper Eq. 19;
neuron-level paper Eq. 13):

    Imp(v | x) = log p(t | x + v) - log p(t | x)        (nats)

with ``x`` the residual the part is added to (REFERENCE.md): ``resid_pre`` of layer ``l`` for layer ``l``'s
attention output, heads, head x position subvalues and attention neurons; ``resid_mid`` of layer ``l`` for
its FFN output and FFN neurons; zero for the embeddings. Probabilities come from a :class:`~tl_residual.lens.Lens`
(default: the authors' frozen-scale final norm).

Scorers live in a registry (:data:`SCORERS`): a scorer is a function ``(ctx, group, base) -> scores`` over one
:class:`~tl_residual.decompose.PartGroup`; :func:`register_scorer` adds one, and it then works everywhere a
built-in one does. The table functions (:func:`score_layers`, :func:`score_heads`,
:func:`score_attention_subvalues`, :func:`score_ffn_neurons`) take the model and an ``ActivationCache`` and
return a :class:`pandas.DataFrame` sorted by score, highest first, with columns ``name``, ``layer``, ``kind``,
``head``, ``src_pos``, ``neuron``, ``score``, ``coefficient``, ``top_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import model as tlm
from tl_residual.decompose import (
    PartGroup,
    attention_neuron_groups,
    attention_parts,
    check_reconstruction,
    ffn_parts,
    head_name,
    layer_outputs,
    n_positions,
    resolve_layer,
    resolve_position,
)
from tl_residual.errors import InvalidInputError
from tl_residual.lens import Convention, Lens, model_logits, resolve_target
from tl_residual.topk import DEFAULT_HEAD, BoundProbes, bound_probes, certified_top_k, head_tail_bound

#: Rows scored per matmul against the unembedding; peak extra memory is ``chunk_size * d_vocab`` floats.
DEFAULT_CHUNK_SIZE = 256


@dataclass
class ScoringContext:
    """Everything a scorer needs about one prompt, one position and one target.

    Build it with :func:`make_context`.

    Attributes:
        model, cache: the TransformerLens model and its ``ActivationCache``.
        lens: the vocabulary projection at ``position``.
        position: destination position (non-negative).
        batch: prompt index in a batched cache.
        target: target token id.
        chunk_size: rows per matmul against ``W_U``.
    """

    model: Any
    cache: Any
    lens: Lens
    position: int
    batch: int
    target: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    n_head: int = DEFAULT_HEAD
    _memo: dict[bytes, tuple[Tensor, BoundProbes]] = field(default_factory=dict, repr=False)
    #: while a pruned search runs: ``direction @ probes`` per (directions tensor object, base), reused by groups
    #: that share their directions (FFN ``W_out``, attention neurons' ``W_O``).
    _proj_memo: dict[tuple[int, bytes], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return tlm.n_layers(self.model)

    # -- per-base quantities, memoised per distinct base residual (one gemm for many bases) --------------

    @staticmethod
    def _keys(bases: Float[Tensor, "n d_model"]) -> list[bytes]:
        rows = bases.detach().float().cpu().contiguous().numpy()
        return [r.tobytes() for r in rows]

    def prime(self, bases: Float[Tensor, "n d_model"]) -> None:
        """Compute and memoise the lens logits and bound probes (:func:`~tl_residual.topk.bound_probes`) of
        the distinct rows of ``bases`` not seen yet, in one matmul against ``W_U`` each way.

        Memory: ``d_vocab + (n_head + 3) * d_model`` floats kept per distinct base (SmolLM2: 60 bases, 12 MB).
        """
        if bases.dim() == 1:
            bases = bases[None]
        new: dict[bytes, Tensor] = {}
        for key, row in zip(self._keys(bases), bases):
            if key not in self._memo and key not in new:
                new[key] = row
        if not new:
            return
        rows = torch.stack(list(new.values())).float()
        logits = self.lens.logits(rows)
        probes = bound_probes(self.lens.W_U, logits, self.target, self.n_head)
        pr = probes.probes.transpose(1, 2)  # [B, m+1, d_model]
        if self.lens.linear:  # move the probes to residual coordinates: u . probe = v . T^T(probe)
            pr = self.lens.transform_transpose(pr)
        for i, key in enumerate(new):
            self._memo[key] = (
                logits[i],
                BoundProbes(pr[i].T.contiguous(), probes.log_weights[i], probes.base_log_prob[i]),
            )

    def _lookup(self, base: Tensor) -> list[tuple[Tensor, BoundProbes]]:
        rows = base[None] if base.dim() == 1 else base
        keys = self._keys(rows)
        if any(k not in self._memo for k in keys):
            self.prime(rows)
        return [self._memo[k] for k in keys]

    def base_logits(
        self, base: Float[Tensor, " d_model"] | Float[Tensor, "n d_model"]
    ) -> Float[Tensor, " d_vocab"] | Float[Tensor, "n d_vocab"]:
        """``lens.logits(base)`` (logits), memoised per distinct base; one row per row of a 2-D ``base``."""
        found = self._lookup(base)
        if base.dim() == 1:
            return found[0][0]
        distinct = {id(f[0]): (i, f[0]) for i, f in reversed(list(enumerate(found)))}
        slot = {key: j for j, key in enumerate(distinct)}
        table = torch.stack([row for _, row in distinct.values()])  # one row per distinct base
        return table[torch.tensor([slot[id(f[0])] for f in found], device=table.device)]

    def base_probes(self, base: Float[Tensor, " d_model"]) -> BoundProbes:
        """The probes of bound (1) of :mod:`tl_residual.topk` at ``base``, memoised. For a linear lens they are
        in residual coordinates (``T^T`` applied): a part's projections are ``v @ probes``."""
        return self._lookup(base)[0][1]

    def resid(self, hook: str) -> Float[Tensor, " d_model"]:
        """``cache[hook][batch, position]`` as float32."""
        return tlm.cached(self.cache, hook, self.batch)[self.position]

    def base_for(self, group: PartGroup) -> Float[Tensor, " d_model"]:
        """The residual ``x`` a part of ``group`` is added to (REFERENCE.md "Which x"; ``group.base`` if set, as
        for registered sources)."""
        if group.base is not None:
            return group.base
        if group.layer is None:
            return torch.zeros_like(self.resid("blocks.0.hook_resid_pre"))
        if (group.kind.startswith("ffn") or group.kind == "mlp") and tlm.model_spec(self.model).has_resid_mid:
            # parallel attention+MLP (no resid_mid): the MLP reads resid_pre, so its parts are added to resid_pre
            return self.resid(f"blocks.{group.layer}.hook_resid_mid")
        return self.resid(f"blocks.{group.layer}.hook_resid_pre")

    def target_log_prob(self) -> float:
        """The model's own log-probability of the target at this position (nats)."""
        logits = model_logits(self.model, self.cache, self.position, self.batch)
        return float(torch.log_softmax(logits, -1)[self.target])


def make_context(
    model: Any,
    cache: Any,
    target: int | str | None = None,
    position: int = -1,
    batch: int = 0,
    convention: Convention = "frozen",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ScoringContext:
    """Resolve position and target (default: the model's top-1 at ``position``) and build the lens.

    Raises:
        InvalidInputError: bad position, target (not exactly one token), batch or convention.
    """
    pos = resolve_position(position, n_positions(cache))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_reconstruction(model, cache, -1, pos, "resid_post", batch)  # the safety net (issue 11): exact or raise
    logits = model_logits(model, cache, pos, batch)
    t = resolve_target(model, target, logits)
    return ScoringContext(model, cache, Lens(model, cache, pos, batch, convention), pos, batch, t, chunk_size)


# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------


def log_prob_increase(
    lens: Lens,
    base: Float[Tensor, " d_model"] | Float[Tensor, "n d_model"],
    vectors: Float[Tensor, "n d_model"],
    target: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    base_logits: Float[Tensor, " d_vocab"] | Float[Tensor, "n d_vocab"] | None = None,
) -> Float[Tensor, " n"]:
    """``log p(t | x + v_j) - log p(t | x)`` for each row ``v_j`` of ``vectors`` (nats; Eq. 13 / Eq. 19).

    Args:
        lens: the vocabulary projection.
        base: the residual ``x`` every part is added to, or one base per part (``[n, d_model]``).
        vectors: the parts.
        target: target token id.
        chunk_size: rows per matmul against ``W_U``.
        base_logits: ``lens.logits(base)`` if already known (same leading shape as ``base``).

    Chunked over rows: peak extra memory about ``3 * chunk_size * d_vocab`` floats.
    """
    if base_logits is None:
        base_logits = lens.logits(base)
    base_lp = torch.log_softmax(base_logits, -1)[..., target]
    per_row = base.dim() == 2
    out = []
    for start in range(0, vectors.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        chunk = vectors[sl].float()
        b, bl, blp = (base[sl], base_logits[sl], base_lp[sl]) if per_row else (base, base_logits, base_lp)
        z = bl + lens.logits(chunk) if lens.linear else lens.logits(b + chunk)
        out.append(torch.log_softmax(z, dim=-1)[:, target] - blp)  # (log_softmax is faster than logsumexp on CPU)
    if not out:
        return torch.zeros(0, device=vectors.device)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

ScorerFn = Callable[[ScoringContext, PartGroup, Tensor], Tensor]
#: ``(ctx, group, base) -> Float[Tensor, "n"]``: an upper bound of a scorer's score for every part of ``group``.
BoundFn = Callable[[ScoringContext, PartGroup, Tensor], Tensor]


@dataclass(frozen=True)
class Scorer:
    """A registered scoring method.

    Attributes:
        name: registry key (e.g. ``"log_prob_increase"``).
        fn: ``(ctx, group, base) -> Float[Tensor, "n"]``, one score per part of ``group`` (higher = more
            important for the target). ``base`` is ``Float[Tensor, "d_model"]``, or, when the scorer has a
            ``bound``, possibly ``Float[Tensor, "n d_model"]`` (one base per part: the pruned search scores parts
            of many layers in one call).
        description: one line, with units.
        bound: ``(ctx, group, base) -> Float[Tensor, "n"]``, a certified upper bound of ``fn`` for every part,
            cheap (no ``d_vocab`` work per part). With it, :func:`score_groups` finds the exact top-k by the
            pruned search of :func:`~tl_residual.topk.certified_top_k` instead of scoring every part.
    """

    name: str
    fn: ScorerFn
    description: str
    bound: BoundFn | None = None


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str, description: str = "", *, bound: BoundFn | None = None
) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: register ``fn(ctx, group, base) -> scores`` under ``name``.

    ``bound`` (optional) is a certified upper bound of the score per part; with it the top-k is found by the
    pruned search (see :class:`Scorer`; ``fn`` must then accept one base per part, ``base`` of shape
    ``[n, d_model]``). A wrong bound gives a wrong top-k: test it densely (``bound >= score`` on every part).

    Example::

        @register_scorer("target_logit", "the part's bs-value on the target (logits)")
        def target_logit(ctx, group, base):
            return ctx.lens.logits(group.vectors)[:, ctx.target]

    Raises:
        InvalidInputError: ``name`` is empty.
    """
    if not name:
        raise InvalidInputError("a scorer needs a non-empty name")

    def decorate(fn: ScorerFn) -> ScorerFn:
        SCORERS[name] = Scorer(
            name, fn, description or (fn.__doc__ or "").strip().split("\n")[0], bound
        )
        return fn

    return decorate


def get_scorer(name: str) -> Scorer:
    """The registered scorer ``name``.

    Raises:
        InvalidInputError: unknown name (the message lists the registered ones).
    """
    if name not in SCORERS:
        raise InvalidInputError(f"unknown scoring method {name!r}; registered: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


#: Rows per block when computing bounds (peak ``BOUND_ROWS * (d_model + n_head + 3)`` float64 values).
BOUND_ROWS = 4096


def log_prob_increase_bound(
    ctx: ScoringContext, group: PartGroup, base: Float[Tensor, " d_model"]
) -> Float[Tensor, " n"]:
    """Certified upper bound (nats) of ``log p(t | x + v) - log p(t | x)`` for every part ``v`` of ``group``.

    Bound (1) of :mod:`tl_residual.topk` (Jensen on the tail of ``p(x)``, the ``ctx.n_head`` most probable tokens
    and the target exact). Linear lens: ``coefficient * (direction @ probes)``, ``(n_head + 2) * d_model``
    multiply-adds per part, directions never copied beyond a block of :data:`BOUND_ROWS` rows. ``recomputed``
    lens: the final norm is recomputed on ``x + v`` per part (``u = N(x + v) - N(x)``), ``O(d_model)`` per part;
    the bound is equally valid there.
    """
    pr = ctx.base_probes(base)
    if ctx.lens.linear:
        proj = group.coefficients.double()[:, None] * _direction_projections(ctx, group.directions, base)
        return head_tail_bound(proj, pr.log_weights.to(proj.device))
    probes = pr.probes  # [d_model, m+1], float64
    out = []
    for s in range(0, len(group), BOUND_ROWS):
        vec = group.coefficients[s : s + BOUND_ROWS].float()[:, None] * group.directions[s : s + BOUND_ROWS].float()
        u = ctx.lens.normalize(base + vec).double() - ctx.lens.normalize(base[None]).double()
        proj = u @ probes.to(u.device)
        out.append(head_tail_bound(proj, pr.log_weights.to(proj.device)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _direction_projections(
    ctx: ScoringContext, directions: Float[Tensor, "n d_model"], base: Float[Tensor, " d_model"]
) -> Float[Tensor, "n m1"]:
    """``directions @ probes(base)`` in float64 (linear lens), in blocks of :data:`BOUND_ROWS` rows; memoised per
    directions tensor object while a pruned search runs (FFN ``W_out`` and attention ``W_O`` views are shared)."""
    key = (id(directions), ctx._keys(base[None])[0])
    memo = ctx._proj_memo
    if memo is not None and key in memo and memo[key][0] is directions:
        return memo[key][1]
    probes = ctx.base_probes(base).probes.to(directions.device)
    proj = torch.cat([directions[s : s + BOUND_ROWS].double() @ probes for s in range(0, len(directions), BOUND_ROWS)])
    if memo is not None:
        memo[key] = (directions, proj)
    return proj


def _fused_linear_bounds(
    ctx: ScoringContext, groups: list[PartGroup], bases: list[Tensor], post: Callable[[Tensor, BoundProbes], Tensor]
) -> list[Tensor]:
    """The built-in bounds for many groups under a linear lens, evaluated in blocks of consecutive groups that
    share a base (few large tensor operations instead of one small one per group). ``post`` maps bound (1) at
    the base to the method's bound. Same values as calling the per-group bound functions."""
    keys = [ctx._keys(b[None])[0] for b in bases]
    out: list[Tensor] = []
    i = 0
    while i < len(groups):
        j, rows = i + 1, len(groups[i])
        while j < len(groups) and keys[j] == keys[i] and rows + len(groups[j]) <= 16 * BOUND_ROWS:
            rows += len(groups[j])
            j += 1
        pr = ctx.base_probes(bases[i])
        proj = torch.cat([g.coefficients.double()[:, None] * _direction_projections(ctx, g.directions, bases[i])
                          for g in groups[i:j]])
        bound = post(head_tail_bound(proj, pr.log_weights.to(proj.device)), pr).cpu()
        out += list(torch.split(bound, [len(g) for g in groups[i:j]]))
        i = j
    return out


def _chunked(
    ctx: ScoringContext, rows: Tensor, fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """Apply ``fn`` to ``lens.logits(rows[chunk])`` chunk by chunk (peak ``chunk_size * d_vocab`` floats)."""
    out = [fn(ctx.lens.logits(rows[s : s + ctx.chunk_size])) for s in range(0, rows.shape[0], ctx.chunk_size)]
    return torch.cat(out) if out else torch.zeros(0)


def target_rank(logits: Float[Tensor, "n d_vocab"], target: int) -> Float[Tensor, " n"]:
    """Rank of ``target`` in each row of ``logits`` (1 = largest), as float."""
    return 1.0 + (logits > logits[:, target : target + 1]).sum(-1).float()


# The seven baselines of the neuron-level paper, section 4.1 (REFERENCE.md rows b-h), for a part m * v.
# ``v`` is the part's direction (an FFN neuron's W_out row; an attention subvalue's v @ W_O), ``m`` its coefficient.


def log_prob_bound(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Float[Tensor, " n"]:
    """Certified upper bound (nats) of method b, ``log p(t | v)``, for every part ``v`` of ``group``.

    ``log p(t | v) = Imp(v | 0) + log p(t | 0)``: the log-probability increase over the zero residual (where the
    frozen and ``none`` lenses give the uniform distribution, so this is Jensen's ``log p_t(v) <= z_t(v) -
    mean_w z_w(v) - log V``, tightened by treating the target exactly). ``base`` is not used. Clamped at 0.
    """
    zero = torch.zeros(ctx.lens.W_U.shape[0], device=ctx.lens.W_U.device)
    b = log_prob_increase_bound(ctx, group, zero) + ctx.base_probes(zero).base_log_prob.double()
    return b.clamp_max(0.0)


@register_scorer(
    "log_prob_increase",
    "log p(t | x + v) - log p(t | x), nats (neuron-level paper Eq. 13, method a)",
    bound=log_prob_increase_bound,
)
def _log_prob_increase(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return log_prob_increase(ctx.lens, base, group.vectors, ctx.target, ctx.chunk_size, ctx.base_logits(base))


@register_scorer(
    "log_prob",
    "log p(t | m v): the part's own log-probability of the target, nats (method b)",
    bound=log_prob_bound,
)
def _log_prob(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return _chunked(ctx, group.vectors, lambda z: torch.log_softmax(z, -1)[:, ctx.target])


def prob_increase_bound(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Float[Tensor, " n"]:
    """Certified upper bound (probability) of method c, ``p(t | x + v) - p(t | x) = p0 (exp Imp - 1)``.

    Increasing in ``Imp``, so ``p0 * expm1(B)`` with ``B`` the :func:`log_prob_increase_bound` at the same base.
    """
    p0 = ctx.base_probes(base).base_log_prob.double().exp()
    return p0 * torch.expm1(log_prob_increase_bound(ctx, group, base))


@register_scorer("prob_increase", "p(t | x + m v) - p(t | x), probability (method c)", bound=prob_increase_bound)
def _prob_increase(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    base_logits = ctx.base_logits(base)
    p0 = torch.softmax(base_logits, -1)[..., ctx.target]
    per_row = base.dim() == 2
    vecs = group.vectors
    out = []
    for s in range(0, vecs.shape[0], ctx.chunk_size):
        sl = slice(s, s + ctx.chunk_size)
        bl, b, p = (base_logits[sl], base[sl], p0[sl]) if per_row else (base_logits, base, p0)
        z = bl + ctx.lens.logits(vecs[sl]) if ctx.lens.linear else ctx.lens.logits(b + vecs[sl])
        out.append(torch.softmax(z, -1)[:, ctx.target] - p)
    return torch.cat(out) if out else torch.zeros(0)


@register_scorer("norm", "||v||: L2 norm of the part's direction, residual units (method d)")
def _norm(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.directions.norm(dim=-1)


@register_scorer("coefficient", "|m|: absolute coefficient (method e)")
def _coefficient(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.coefficients.abs()


@register_scorer("inverse_rank", "1 / rank of t in the vocabulary projection of v (method f)")
def _inverse_rank(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return 1.0 / _chunked(ctx, group.directions, lambda z: target_rank(z, ctx.target))


@register_scorer("coefficient_norm", "|m| * ||v|| (method g)")
def _coefficient_norm(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.coefficients.abs() * group.directions.norm(dim=-1)


@register_scorer("coefficient_inverse_rank", "|m| / rank of t in the projection of v (method h)")
def _coefficient_inverse_rank(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.coefficients.abs() / _chunked(ctx, group.directions, lambda z: target_rank(z, ctx.target))


#: The neuron-level paper's methods a-h in its Table 2 order.
PAPER_METHODS: tuple[str, ...] = (
    "log_prob_increase",
    "log_prob",
    "prob_increase",
    "norm",
    "coefficient",
    "inverse_rank",
    "coefficient_norm",
    "coefficient_inverse_rank",
)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = ["name", "layer", "kind", "head", "src_pos", "neuron", "score", "coefficient", "top_tokens"]


def _rows(
    ctx: ScoringContext,
    group: PartGroup,
    picks: Tensor,
    scores: Tensor,
    n_top_tokens: int,
) -> pd.DataFrame:
    picks = picks.long()
    vectors = group.coefficients[picks, None] * group.directions[picks]
    if n_top_tokens > 0 and len(picks) > 0:
        ids = torch.topk(ctx.lens.logits(vectors), n_top_tokens, dim=-1).indices.tolist()
        tokens = [[ctx.lens.token_str(t) for t in row] for row in ids]
    else:
        tokens = [[] for _ in range(len(picks))]

    def col(key: str) -> Any:
        return group.index[key][picks].tolist() if key in group.index else -1

    # Index keys beyond the standard columns (e.g. an attention neuron's head dimension ``dim``) become extra
    # columns after TABLE_COLUMNS.
    extra = [k for k in group.index if k not in TABLE_COLUMNS]
    return pd.DataFrame(
        {
            "name": [group.names[i] for i in picks.tolist()],
            "layer": -1 if group.layer is None else group.layer,
            "kind": group.kind,
            "head": col("head"),
            "src_pos": col("src_pos"),
            "neuron": col("neuron"),
            "score": scores.float().cpu().numpy(),
            "coefficient": group.coefficients[picks].cpu().numpy(),
            "top_tokens": tokens,
            **{k: col(k) for k in extra},
        },
        columns=TABLE_COLUMNS + extra,
    )


def _finish(frames: list[pd.DataFrame], top_k: int | None, method: str, ctx: ScoringContext) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)
    df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    if top_k is not None:
        df = df.head(top_k).reset_index(drop=True)
    df.attrs.update(method=method, target=ctx.target, position=ctx.position, convention=ctx.lens.convention)
    return df


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")


#: Built-in bounds the pruned search evaluates for many groups at once (linear lens): bound function ->
#: (evaluated at the zero residual?, map from bound (1) and the base's probes to the method's bound).
_FUSED_BOUNDS: dict[Any, tuple[bool, Callable[[Tensor, BoundProbes], Tensor]]] = {
    log_prob_increase_bound: (False, lambda b, pr: b),
    prob_increase_bound: (False, lambda b, pr: pr.base_log_prob.double().exp() * torch.expm1(b)),
    log_prob_bound: (True, lambda b, pr: (b + pr.base_log_prob.double()).clamp_max(0.0)),
}


def score_groups(
    ctx: ScoringContext,
    groups: Iterable[PartGroup],
    method: str = "log_prob_increase",
    top_k: int | None = None,
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """Score every part of ``groups`` with ``method`` and return the table, best first.

    With ``top_k`` set and a method that carries a certified upper bound in the registry (``log_prob_increase``,
    ``log_prob``, ``prob_increase``; :attr:`Scorer.bound`), the exact top-k is found by the pruned search of
    :func:`~tl_residual.topk.certified_top_k`, under every lens convention: the same parts and scores as dense
    scoring (ties at the k-th score broken by order of appearance, as in the dense path), after scoring only the
    parts whose bound beats the running k-th score. ``df.attrs`` then holds ``n_scored`` and ``n_candidates``.
    ``pruned=False`` forces dense scoring (the reference path); methods without a bound are always dense.

    Memory: dense consumes the groups one at a time; pruned keeps every group (FFN directions are views of
    ``W_out``, no copy) plus one bound per part, and scores ``max(ctx.chunk_size, top_k)`` parts per matmul
    against ``W_U`` (peak extra about ``3 * max(chunk_size, top_k) * d_vocab`` floats).

    Raises:
        InvalidInputError: unknown method or bad ``top_k``.
    """
    _check_top_k(top_k)
    scorer = get_scorer(method)
    if top_k is not None and pruned and scorer.bound is not None and ctx.lens.certifiable:
        return _pruned(ctx, list(groups), top_k, n_top_tokens, method)
    frames = []
    for g in groups:
        if len(g) == 0:
            continue
        scores = scorer.fn(ctx, g, ctx.base_for(g))
        picks = torch.arange(len(g))
        if top_k is not None and len(g) > top_k:
            # stable: ties keep the lower index, like the pruned search
            picks = torch.argsort(scores.cpu(), descending=True, stable=True)[:top_k]
            scores = scores[picks.to(scores.device)]
        frames.append(_rows(ctx, g, picks, scores, n_top_tokens))
    return _finish(frames, top_k, method, ctx)


def _pruned(
    ctx: ScoringContext, groups: list[PartGroup], top_k: int, n_top_tokens: int, method: str
) -> pd.DataFrame:
    """The certified top-k over all parts of ``groups`` (see :func:`score_groups`)."""
    scorer = get_scorer(method)
    bound_fn = scorer.bound
    assert bound_fn is not None
    groups = [g for g in groups if len(g)]
    if not groups:
        return _finish([], top_k, method, ctx)
    bases = [ctx.base_for(g) for g in groups]
    ctx.prime(torch.stack(bases + [torch.zeros_like(bases[0])]))  # one matmul for every distinct base
    ctx._proj_memo = {}
    try:
        fused = _FUSED_BOUNDS.get(bound_fn) if ctx.lens.linear else None
        if fused is not None:
            at_zero, post = fused
            bound_bases = [torch.zeros_like(bases[0])] * len(groups) if at_zero else bases
            bounds = _fused_linear_bounds(ctx, groups, bound_bases, post)
        else:
            bounds = [bound_fn(ctx, g, b).double().cpu() for g, b in zip(groups, bases)]
    finally:
        ctx._proj_memo = None
    owner = torch.cat([torch.full((len(g),), gi, dtype=torch.long) for gi, g in enumerate(groups)])
    local = torch.cat([torch.arange(len(g)) for g in groups])
    all_bounds = torch.cat(bounds)

    def gather(idx: Tensor) -> tuple[PartGroup, Tensor]:
        """The parts ``idx`` (of many groups) as one group, in ``idx`` order, and one base row per part."""
        own, rows = owner[idx], local[idx]
        sels, coefs, dirs, base_rows = [], [], [], []
        for gi in own.unique().tolist():
            sel = (own == gi).nonzero().squeeze(-1)
            g, r = groups[gi], rows[sel].to(groups[gi].coefficients.device)
            sels.append(sel)
            coefs.append(g.coefficients[r])
            dirs.append(g.directions[r])
            base_rows.append(bases[gi].expand(len(sel), -1))
        back = torch.argsort(torch.cat(sels))
        chunk = PartGroup("mixed", None, torch.cat(coefs)[back], torch.cat(dirs)[back])
        return chunk, torch.cat(base_rows)[back]

    def exact(idx: Tensor) -> Tensor:
        # Parts of many layers in one call: one base per part, one matmul against W_U per chunk.
        return scorer.fn(ctx, *gather(idx)).double().cpu()

    result = certified_top_k(all_bounds, exact, top_k, chunk_size=ctx.chunk_size)
    frames = []
    for gi in owner[result.indices].unique().tolist():
        sel = (owner[result.indices] == gi).nonzero().squeeze(-1)
        frames.append(_rows(ctx, groups[gi], local[result.indices[sel]], result.scores[sel], 0))
    df = _finish(frames, top_k, method, ctx)
    if n_top_tokens > 0 and len(result.indices):
        # every row's logit-lens tokens from one matmul against W_U
        names = [groups[int(owner[i])].names[int(local[i])] for i in result.indices]
        ids = torch.topk(ctx.lens.logits(gather(result.indices)[0].vectors), n_top_tokens, dim=-1).indices.tolist()
        by_name = {n: [ctx.lens.token_str(t) for t in row] for n, row in zip(names, ids)}
        df["top_tokens"] = [by_name[n] for n in df["name"]]
    df.attrs["n_scored"] = result.n_scored
    df.attrs["n_candidates"] = int(all_bounds.shape[0])
    return df


def _layers(ctx: ScoringContext, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(ctx.n_layers))
    return [resolve_layer(l, ctx.n_layers) for l in layers]


def score_ffn_neurons(
    ctx: ScoringContext,
    method: str = "log_prob_increase",
    top_k: int | None = None,
    layers: Iterable[int] | None = None,
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """Score every FFN neuron ``m_k W_out[k]`` of ``layers`` (default: all) against ``resid_mid``.

    ``top_k=None`` scores all ``n_layers * d_mlp`` neurons densely (``n * d_model * d_vocab`` MACs); with
    ``top_k`` the certified pruned search is used where valid. Columns as in the module doc; ``neuron`` is the
    index in ``d_mlp``; ``coefficient`` is ``m_k``.
    """
    groups = [ffn_parts(ctx.model, ctx.cache, l, ctx.position, ctx.batch)[0] for l in _layers(ctx, layers)]
    return score_groups(ctx, groups, method, top_k, n_top_tokens, pruned)


def score_attention_subvalues(
    ctx: ScoringContext,
    method: str = "log_prob_increase",
    top_k: int | None = None,
    layers: Iterable[int] | None = None,
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """Score every head x source-position subvalue ``pattern[h,i,p] v[p] W_O[h]`` against ``resid_pre``.

    ``coefficient`` is the attention weight ``pattern[h, position, p]``.
    """
    groups = [attention_parts(ctx.model, ctx.cache, l, ctx.position, ctx.batch)[0] for l in _layers(ctx, layers)]
    return score_groups(ctx, groups, method, top_k, n_top_tokens, pruned)


def score_attention_neurons(
    ctx: ScoringContext,
    method: str = "log_prob_increase",
    top_k: int | None = None,
    layers: Iterable[int] | None = None,
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """Score every attention neuron ``pattern[h,i,p] v[p,kv(h),d] * W_O[h,d]`` of ``layers`` against ``resid_pre``.

    Neuron-level paper section 3.2 (attention neurons), scored with any registered ``method`` (Eq. 13 for
    ``log_prob_increase``, nats). Parts are those of :func:`~tl_residual.decompose.attention_neuron_parts`, taken
    one source position at a time (:func:`~tl_residual.decompose.attention_neuron_groups`: directions are views of
    ``W_O``, never copied); ``coefficient`` is ``pattern * v[d]``, the extra column ``dim`` the head dimension
    ``d``; names ``L{l}.H{h}.d{d}.p{p}``. With ``top_k`` and a method with a bound (``log_prob_increase``,
    ``log_prob``, ``prob_increase``) the certified pruned search is used (same result as dense).

    Cost: ``n_heads * d_head * (position + 1)`` parts per layer. Dense scoring projects each part on the vocabulary
    (SmolLM2-135M, 6 tokens, all 30 layers: 103,680 projections against the 49,152-token unembedding);
    restrict ``layers`` or use the pruned top-k. The pruned search keeps ``n_heads * d_head`` coefficients and
    bounds per layer and source position until it finishes.

    Raises:
        InvalidInputError: unknown ``method``, a layer out of range, bad ``top_k``.
    """
    layer_list = _layers(ctx, layers)
    get_scorer(method)
    groups = (g for l in layer_list for g in attention_neuron_groups(ctx.model, ctx.cache, l, ctx.position, ctx.batch))
    return score_groups(ctx, groups, method, top_k, n_top_tokens, pruned)


NEURON_KINDS: tuple[str, ...] = ("ffn_neuron", "attn_neuron", "attn_subvalue")


def score_neurons(
    ctx: ScoringContext,
    method: str = "log_prob_increase",
    top_k: int | None = 100,
    layers: Iterable[int] | None = None,
    kinds: Iterable[str] = ("ffn_neuron", "attn_neuron"),
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """One ranking over every FFN neuron and attention neuron (and, if asked, head x position subvalue) of
    ``layers``: the neuron-level paper's question "which neurons matter most for this token", at the finest grain.

    FFN neurons are scored against ``resid_mid``, attention neurons and subvalues against ``resid_pre`` of their
    layer (REFERENCE.md "Which x"). With ``top_k`` (default 100) and a method with a bound the exact top-k comes
    from the certified pruned search (:func:`score_groups`); SmolLM2-135M, 6 tokens: 149,760 candidates, typically
    a few hundred scored against the unembedding (docs/performance.md). ``top_k=None`` scores everything densely.

    Args:
        kinds: any of ``"ffn_neuron"``, ``"attn_neuron"``, ``"attn_subvalue"``.

    Raises:
        InvalidInputError: unknown ``method`` or kind, a layer out of range, bad ``top_k``.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in NEURON_KINDS]
    if bad or not kinds:
        raise InvalidInputError(f"kinds {bad or kinds!r} are not a non-empty subset of {', '.join(NEURON_KINDS)}")
    layer_list = _layers(ctx, layers)
    get_scorer(method)

    def groups() -> Iterable[PartGroup]:
        for l in layer_list:
            if "attn_subvalue" in kinds:
                yield attention_parts(ctx.model, ctx.cache, l, ctx.position, ctx.batch)[0]
            if "attn_neuron" in kinds:
                yield from attention_neuron_groups(ctx.model, ctx.cache, l, ctx.position, ctx.batch)
            if "ffn_neuron" in kinds:
                yield ffn_parts(ctx.model, ctx.cache, l, ctx.position, ctx.batch)[0]

    return score_groups(ctx, groups(), method, top_k, n_top_tokens, pruned)


def score_neurons_batch(
    model: Any,
    cache: Any,
    top_k: int = 100,
    positions: int | Iterable[int] = -1,
    targets: int | str | None | Iterable[int | str | None] = None,
    method: str = "log_prob_increase",
    convention: Convention = "frozen",
    kinds: Iterable[str] = ("ffn_neuron", "attn_neuron"),
    layers: Iterable[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    n_top_tokens: int = 5,
) -> pd.DataFrame:
    """:func:`score_neurons` for every prompt of a batched cache: one exact top-k per prompt, each at its own
    destination position and for its own target.

    Args:
        model: the ``HookedTransformer`` or ``TransformerBridge``.
        cache: the ``ActivationCache`` of ``model.run_with_cache(tokens)`` with ``tokens`` of shape
            ``[batch, pos]`` (any device; float16/bfloat16 caches are scored in float32).
        top_k: parts per prompt.
        positions: one destination position for all prompts or one per prompt (e.g. the last non-padding token
            of each prompt of a right-padded batch; ``-1`` is the last position).
        targets: one target for all, or one per prompt (token id, one-token string, or ``None`` for the model's
            top-1 at that prompt's position).
        chunk_size: parts scored per matmul against ``W_U``; peak extra memory about
            ``3 * max(chunk_size, top_k) * d_vocab`` floats (plus the search's per-part bounds, 8 bytes each).

    Returns:
        The tables of :func:`score_neurons` stacked, with leading columns ``prompt`` (batch index), ``position``
        and ``target``; sorted by prompt, then score. ``df.attrs["per_prompt"]`` holds each prompt's ``n_scored``
        and ``n_candidates``.

    Raises:
        InvalidInputError: ``positions`` or ``targets`` of the wrong length, or any error of :func:`score_neurons`.
    """
    n_batch = int(tlm.cached(cache, "blocks.0.hook_resid_pre", batch=None).shape[0])
    pos_list = [positions] * n_batch if isinstance(positions, int) else list(positions)
    tgt_list = [targets] * n_batch if targets is None or isinstance(targets, (int, str)) else list(targets)
    for label, given in (("positions", pos_list), ("targets", tgt_list)):
        if len(given) != n_batch:
            raise InvalidInputError(f"{label} has {len(given)} entries but the cache holds {n_batch} prompts; "
                                    f"give one per prompt or a single value for all")
    frames, per_prompt = [], []
    for b in range(n_batch):
        ctx = make_context(model, cache, tgt_list[b], pos_list[b], b, convention, chunk_size)
        df = score_neurons(ctx, method, top_k, layers, kinds, n_top_tokens)
        df.insert(0, "target", ctx.target)
        df.insert(0, "position", ctx.position)
        df.insert(0, "prompt", b)
        frames.append(df)
        per_prompt.append({k: df.attrs.get(k) for k in ("n_scored", "n_candidates")})
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(method=method, convention=convention, per_prompt=per_prompt)
    return out


def score_heads(
    ctx: ScoringContext, method: str = "log_prob_increase", n_top_tokens: int = 5
) -> pd.DataFrame:
    """Score every head's output at ``position`` (its subvalues summed over source positions).

    ``coefficient`` is 1 (a head's output is not a scalar times a fixed vector).
    """
    spec = tlm.model_spec(ctx.model)
    frames = []
    for l in range(ctx.n_layers):
        sub, _ = attention_parts(ctx.model, ctx.cache, l, ctx.position, ctx.batch)
        per_head = sub.vectors.reshape(spec.n_heads, -1, spec.d_model).sum(1)
        g = PartGroup(
            "head",
            l,
            torch.ones(spec.n_heads),
            per_head,
            {"head": torch.arange(spec.n_heads)},
            [head_name(l, h) for h in range(spec.n_heads)],
        )
        scores = get_scorer(method).fn(ctx, g, ctx.base_for(sub))
        frames.append(_rows(ctx, g, torch.arange(spec.n_heads), scores, n_top_tokens))
    return _finish(frames, None, method, ctx)


def score_layers(ctx: ScoringContext, n_top_tokens: int = 5) -> pd.DataFrame:
    """Log-probability increase of each layer's attention output (against ``resid_pre``) and FFN output
    (against ``resid_mid``): residual-stream paper Eq. 19. Rows in layer order (not sorted), ``kind`` is
    ``attn`` or ``mlp``; ``df.attrs`` holds ``embed_log_prob`` (log p(t | embedding), nats).
    """
    rows = []
    for name, layer, kind, vec in layer_outputs(ctx.model, ctx.cache, ctx.position, ctx.batch):
        if kind == "embed":
            embed_lp = float(ctx.lens.log_probs(vec)[ctx.target])
            continue
        mid = kind != "attn" and tlm.model_spec(ctx.model).has_resid_mid  # parallel blocks: the MLP reads resid_pre
        base = ctx.resid(f"blocks.{layer}.hook_resid_{'mid' if mid else 'pre'}")
        score = float(log_prob_increase(ctx.lens, base, vec[None], ctx.target)[0])
        rows.append(
            {
                "name": name,
                "layer": layer,
                "kind": kind,
                "head": -1,
                "src_pos": -1,
                "neuron": -1,
                "score": score,
                "coefficient": float("nan"),
                "top_tokens": ctx.lens.top_tokens(vec, n_top_tokens) if n_top_tokens else [],
            }
        )
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df.attrs.update(
        method="log_prob_increase", target=ctx.target, position=ctx.position, convention=ctx.lens.convention,
        embed_log_prob=embed_lp,
    )
    return df
