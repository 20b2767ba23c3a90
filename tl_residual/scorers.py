"""Scoring parts of the residual stream for a target token.

The proposed score of both papers is the **log-probability increase** (residual-stream paper Eq. 19;
neuron-level paper Eq. 13):

    Imp(v | x) = log p(t | x + v) - log p(t | x)        (nats)

with ``x`` the residual the part is added to, :func:`tl_residual.decompose.base_stream` (the stream its sublayer
reads: ``resid_pre`` of layer ``l`` for layer ``l``'s attention output, heads, head x position subvalues and
attention neurons; ``resid_mid`` of layer ``l`` for its FFN output and FFN neurons; zero for the embeddings;
``docs/quantities.md``). Probabilities come from a :class:`~tl_residual.lens.Lens` (default: the authors'
frozen-scale final norm).

Scorers live in a registry (:data:`SCORERS`): a scorer is a function ``(ctx, group, base) -> scores`` over one
:class:`~tl_residual.decompose.PartGroup`; :func:`register_scorer` adds one, and it then works everywhere a
built-in one does. A scorer may declare a certified upper bound; the bound is what lets the exact top-k be found
by pruning (:mod:`tl_residual.topk`), and is declared nowhere else.

One entry point scores any kinds of parts: :func:`score` (``kinds`` from :data:`SCORABLE_KINDS`); the other
table functions (:func:`score_layers`, :func:`score_heads`, :func:`score_ffn_neurons`,
:func:`score_attention_subvalues`, :func:`score_attention_neurons`, :func:`score_neurons`) are thin aliases with
the same arguments in the same order: ``ctx, method, top_k, layers, n_top_tokens``. Part tables default to the
top :data:`DEFAULT_TOP_K` rows; the layer and head tables (at most ``2 * n_layers`` and ``n_layers * n_heads``
rows) to every row. Every table is a :class:`pandas.DataFrame` sorted by score, highest first: the identifying
columns of :mod:`tl_residual.tables` its kinds use (``name``, ``kind``, ``layer``, then ``head``, ``dim``,
``src_pos``, ``src_token``, ``neuron`` where they apply), then ``score``, ``coefficient`` (parts only) and
``top_tokens``; ``df.attrs`` holds ``method``, ``units`` (of the score, from the scorer), ``target``,
``position`` and ``convention``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_residual import model as tlm
from tl_residual import names, tables
from tl_residual.decompose import (
    PartGroup,
    attention_neuron_groups,
    attention_parts,
    base_stream,
    check_reconstruction,
    ffn_neuron_groups,
    head_outputs,
    layer_outputs,
    n_positions,
    resolve_layer,
    resolve_position,
)
from tl_residual.errors import InvalidInputError
from tl_residual.lens import (
    DEFAULT_CHUNK_SIZE,
    Convention,
    Lens,
    map_chunks,
    model_logits,
    resolve_target,
    stacked_logits,
    target_rank,
)
from tl_residual.topk import DEFAULT_HEAD, BoundProbes, bound_probes, certified_top_k, head_tail_bound

__all__ = ["DEFAULT_CHUNK_SIZE", "target_rank"]  # re-exported from tl_residual.lens; the rest below

#: Rows of a part table by default (``top_k``); the layer and head tables list every row.
DEFAULT_TOP_K = 20


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
        n_head: size of the head of the pruning bound (:mod:`tl_residual.topk`).
        tokens: the prompt's token texts (for the ``src_token`` column); recovered from the cache on first use
            when not given (:func:`tl_residual.tables.src_token_texts`).
        projections: a :class:`ProjectionCache` kept for the context's lifetime (the bound projections of the
            directions of every search on this prompt, and those a batch computed for all its prompts at once,
            :func:`project_bounds`); ``None``: one cache per search.
        direction_logits: a :class:`DirectionLogits` shared by the contexts of one batch (same model and
            convention): the exact scores of FFN and attention neurons then reuse the vocabulary projection of a
            neuron's direction computed for another prompt; ``None``: every exact score projects its part.
    """

    model: Any
    cache: Any
    lens: Lens
    position: int
    batch: int
    target: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    n_head: int = DEFAULT_HEAD
    tokens: list[str] | None = None
    projections: ProjectionCache | None = field(default=None, repr=False)
    direction_logits: DirectionLogits | None = field(default=None, repr=False)
    _memo: dict[bytes, tuple[Tensor, BoundProbes]] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        """Number of layers of the model."""
        return tlm.n_layers(self.model)

    # -- per-base quantities, memoised per distinct base residual (one gemm for many bases) --------------

    @staticmethod
    def _keys(bases: Float[Tensor, "n d_model"]) -> list[bytes]:
        rows = bases.detach().float().cpu().contiguous().numpy()
        return [r.tobytes() for r in rows]

    def _new_rows(self, bases: Float[Tensor, "n d_model"]) -> tuple[list[bytes], Tensor | None]:
        """The distinct rows of ``bases`` not memoised yet, and their keys."""
        if bases.dim() == 1:
            bases = bases[None]
        new: dict[bytes, Tensor] = {}
        for key, row in zip(self._keys(bases), bases):
            if key not in self._memo and key not in new:
                new[key] = row
        return list(new), (torch.stack(list(new.values())).float() if new else None)

    def prime(self, bases: Float[Tensor, "n d_model"]) -> None:
        """Compute and memoise the lens logits and bound probes (:func:`~tl_residual.topk.bound_probes`) of
        the distinct rows of ``bases`` not seen yet, in one matmul against ``W_U`` each way
        (:func:`prime_contexts` does it for the contexts of many prompts at once).

        Memory: ``d_vocab + (n_head + 3) * d_model`` floats kept per distinct base (SmolLM2: 60 bases, 12 MB).
        """
        keys, rows = self._new_rows(bases)
        if rows is not None:
            self._store(keys, self.lens.logits(rows))

    def _store(self, keys: list[bytes], logits: Tensor, probes: BoundProbes | None = None) -> None:
        """Memoise ``logits`` (one row per key) and their bound probes (computed here unless given)."""
        if probes is None:
            probes = bound_probes(self.lens.W_U, logits, self.target, self.n_head)
        pr = probes.probes.transpose(1, 2)  # [B, m+1, d_model]
        if self.lens.linear:  # move the probes to residual coordinates: u . probe = v . T^T(probe)
            pr = self.lens.transform_transpose(pr)
        for i, key in enumerate(keys):
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
        return torch.stack([f[0] for f in found])  # one copy of the memoised rows

    def base_probes(self, base: Float[Tensor, " d_model"]) -> BoundProbes:
        """The probes of bound (1) of :mod:`tl_residual.topk` at ``base``, memoised. For a linear lens they are
        in residual coordinates (``T^T`` applied): a part's projections are ``v @ probes``."""
        return self._lookup(base)[0][1]

    def resid(self, hook: str) -> Float[Tensor, " d_model"]:
        """``cache[hook][batch, position]`` as float32."""
        return tlm.cached(self.cache, hook, self.batch)[self.position]

    def base_for(self, group: PartGroup) -> Float[Tensor, " d_model"]:
        """The residual ``x`` a part of ``group`` is added to: ``group.base`` if set (registered sources), else
        the stream :func:`~tl_residual.decompose.base_stream` names for its kind (zero for the embeddings)."""
        if group.base is not None:
            return group.base
        stream = base_stream(group.kind, tlm.model_spec(self.model))
        if stream is None or group.layer is None:
            return torch.zeros_like(self.resid("blocks.0.hook_resid_pre"))
        return self.resid(tlm.hook_name(stream, group.layer))

    def target_log_prob(self) -> float:
        """The model's own log-probability of the target at this position (nats)."""
        logits = model_logits(self.model, self.cache, self.position, self.batch)
        return float(torch.log_softmax(logits, -1)[self.target])

    def src_tokens(self) -> list[str]:
        """The prompt's token texts up to ``position`` (``tokens``, recovered from the cache if not given)."""
        if self.tokens is None:
            self.tokens = tables.src_token_texts(self.model, self.cache, self.batch, self.position + 1)
        return self.tokens


def make_context(
    model: Any,
    cache: Any,
    target: int | str | None = None,
    position: int = -1,
    batch: int = 0,
    convention: Convention = "frozen",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tokens: Sequence[str] | None = None,
    check: bool = True,
) -> ScoringContext:
    """Resolve position and target (default: the model's top-1 at ``position``) and build the lens.

    Args:
        tokens: the prompt's token texts, if known (else recovered from the cache when a table needs them).
        check: run the safety net (:func:`~tl_residual.decompose.check_reconstruction` of the final
            ``resid_post`` at ``position``) and the finiteness check (:func:`tl_residual.model.check_finite`).
            Only a caller that runs both itself on the same cache and position passes ``False``
            (:func:`tl_residual.study.run`: once per prompt, never twice; finiteness once per batch).

    Raises:
        InvalidInputError: bad position, target (not exactly one token), batch, convention or chunk size.
    """
    cache = tlm.cache_to_scoring_device(model, cache)  # a model split over devices (device_map)
    pos = resolve_position(position, n_positions(cache))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if check:
        check_reconstruction(model, cache, -1, pos, "resid_post", batch)  # the safety net (issue 11): exact or raise
    logits = model_logits(model, cache, pos, batch)
    if check:
        tlm.check_finite(cache, pos, batch)  # a NaN/inf activation would enter the top-k or make target id 0
    t = resolve_target(model, target, logits)
    lens = Lens(model, cache, pos, batch, convention)
    return ScoringContext(
        model, cache, lens, pos, batch, t, chunk_size, tokens=None if tokens is None else [str(x) for x in tokens]
    )


def prime_contexts(
    ctxs: Sequence[ScoringContext], bases: Sequence[Float[Tensor, "n d_model"]], rows_per_call: int = 256
) -> None:
    """``ctxs[i].prime(bases[i])`` for the contexts of many prompts at once (the prompts of one batched cache):
    the lens logits of every new distinct base of every prompt in a few large matmuls against ``W_U``
    (:func:`~tl_residual.lens.stacked_logits`), and their bound probes (:func:`~tl_residual.topk.bound_probes`, one
    target per row) for ``rows_per_call`` rows at a time, ``W_U`` converted to float64 once. Same memo as
    ``prime`` per context (up to float32 rounding of the matmul).

    Memory: as ``prime`` per context, plus ``3 * rows_per_call * d_vocab`` float64 values and ``W_U`` in float64
    while it runs.
    """
    todo: list[tuple[ScoringContext, list[bytes], Tensor]] = []
    for c, b in zip(ctxs, bases):
        keys, rows = c._new_rows(b)
        if rows is not None:
            todo.append((c, keys, rows))
    if not todo:
        return
    logits = stacked_logits([c.lens for c, _, _ in todo], [rows for _, _, rows in todo])
    if len({c.n_head for c, _, _ in todo}) > 1:
        for (c, keys, _), z in zip(todo, logits):
            c._store(keys, z)
        return
    W64 = todo[0][0].lens.W_U.double()
    block: list[tuple[ScoringContext, list[bytes], Tensor]] = []

    def flush() -> None:
        z = torch.cat([zz for _, _, zz in block])
        targets = torch.cat([torch.full((len(k),), c.target, dtype=torch.long) for c, k, _ in block])
        probes = bound_probes(W64, z, targets.to(z.device), block[0][0].n_head)
        start = 0
        for c, keys, zz in block:
            sl = slice(start, start + len(keys))
            c._store(keys, zz, BoundProbes(probes.probes[sl], probes.log_weights[sl], probes.base_log_prob[sl]))
            start += len(keys)
        block.clear()

    for (c, keys, _), z in zip(todo, logits):
        if block and sum(len(k) for _, k, _ in block) + len(keys) > rows_per_call:
            flush()
        block.append((c, keys, z))
    flush()


# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------


def _logits_after(
    lens: Lens, base: Tensor, base_logits: Tensor, vectors: Tensor, rows: slice
) -> Float[Tensor, "chunk d_vocab"]:
    """``lens.logits(x + v)`` for the parts ``vectors[rows]`` (one shared base, or one base per part); under a
    linear lens ``z(x) + z(v)`` from the known ``z(x)``."""
    per_row = base.dim() == 2
    chunk = vectors[rows].float()
    if lens.linear:  # lens.logits returns a fresh tensor: add the base's logits in place
        return lens.logits(chunk).add_(base_logits[rows] if per_row else base_logits)
    return lens.logits((base[rows] if per_row else base) + chunk)


def log_prob_increase(
    lens: Lens,
    base: Float[Tensor, " d_model"] | Float[Tensor, "n d_model"],
    vectors: Float[Tensor, "n d_model"],
    target: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    base_logits: Float[Tensor, " d_vocab"] | Float[Tensor, "n d_vocab"] | None = None,
) -> Float[Tensor, " n"]:
    """``log p(t | x + v_j) - log p(t | x)`` for each row ``v_j`` of ``vectors`` (nats; neuron-level paper Eq. 13,
    residual-stream paper Eq. 19).

    Args:
        lens: the vocabulary projection.
        base: the residual ``x`` every part is added to, or one base per part (``[n, d_model]``).
        vectors: the parts.
        target: target token id.
        chunk_size: rows per matmul against ``W_U``.
        base_logits: ``lens.logits(base)`` if already known (same leading shape as ``base``).

    Chunked over rows (:func:`~tl_residual.lens.map_chunks`): peak extra memory about
    ``3 * chunk_size * d_vocab`` floats.
    """
    bl = lens.logits(base) if base_logits is None else base_logits
    base_lp = torch.log_softmax(bl, -1)[..., target]
    per_row = base.dim() == 2

    def chunk(rows: slice) -> Tensor:
        z = _logits_after(lens, base, bl, vectors, rows)
        # (log_softmax is faster than logsumexp on CPU)
        return torch.log_softmax(z, dim=-1)[:, target] - (base_lp[rows] if per_row else base_lp)

    return map_chunks(chunk, vectors.shape[0], chunk_size).to(vectors.device)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

ScorerFn = Callable[["ScoringContext", PartGroup, Tensor], Tensor]
#: ``(ctx, group, base) -> Float[Tensor, "n"]``: an upper bound of a scorer's score for every part of ``group``.
BoundFn = Callable[["ScoringContext", PartGroup, Tensor], Tensor]

#: Rows per block when computing bounds (peak ``BOUND_ROWS * (d_model + n_head + 3)`` float64 values).
BOUND_ROWS = 4096


@dataclass(frozen=True)
class IncreaseBound:
    """A bound declared through the bound (1) of :mod:`tl_residual.topk` on the log-probability increase: the
    scorer's score is at most ``post(B(v | x0), probes(x0))`` with ``x0`` the part's base (or the zero residual
    when ``at_zero``) and ``post`` non-decreasing in ``B``.

    Declared this way, a bound gets the fast path of the pruned search (many groups' bounds in a few large matrix
    products under a linear lens, projections shared by groups with the same directions); any other
    ``(ctx, group, base) -> bound`` function is evaluated group by group. Calling the object evaluates it.

    Attributes:
        at_zero: evaluate (1) at the zero residual (scores that ignore the base, e.g. ``log p(t | v)``).
        post: ``(bound (1), probes of x0) -> bound``; ``None`` is the identity.
    """

    at_zero: bool = False
    post: Callable[[Tensor, BoundProbes], Tensor] | None = None

    def base(self, ctx: ScoringContext, base: Tensor) -> Tensor:
        """The residual ``x0`` at which (1) is evaluated."""
        return torch.zeros_like(base) if self.at_zero else base

    def finish(self, bound: Tensor, probes: BoundProbes) -> Tensor:
        """``post(bound, probes)``."""
        return bound if self.post is None else self.post(bound, probes)

    def __call__(self, ctx: ScoringContext, group: PartGroup, base: Tensor) -> Float[Tensor, " n"]:
        x0 = self.base(ctx, base)
        return self.finish(log_prob_increase_bound(ctx, group, x0), ctx.base_probes(x0))


@dataclass(frozen=True)
class Scorer:
    """A registered scoring method.

    Attributes:
        name: registry key (e.g. ``"log_prob_increase"``).
        fn: ``(ctx, group, base) -> Float[Tensor, "n"]``, one score per part of ``group`` (higher = more
            important for the target). ``base`` is ``Float[Tensor, "d_model"]``, or, when the scorer has a
            ``bound``, possibly ``Float[Tensor, "n d_model"]`` (one base per part: the pruned search scores parts
            of many layers in one call).
        description: one line.
        bound: a certified upper bound of ``fn`` for every part: an :class:`IncreaseBound` (fast path) or any
            ``(ctx, group, base) -> Float[Tensor, "n"]``. With it, :func:`score_groups` finds the exact top-k by
            the pruned search of :func:`~tl_residual.topk.certified_top_k` instead of scoring every part.
        units: units of the score (``"nats"``, ``"probability"``, ...), copied to ``df.attrs["units"]``.
    """

    name: str
    fn: ScorerFn
    description: str
    bound: BoundFn | None = None
    units: str = ""

    def __call__(self, ctx: ScoringContext, group: PartGroup, base: Tensor) -> Float[Tensor, " n"]:
        """``fn(ctx, group, base)``, checked: one finite float per part.

        Raises:
            InvalidInputError: the scorer returned something else (the message names the function).
        """
        out = self.fn(ctx, group, base)
        n = len(group)
        problem = None
        if not isinstance(out, Tensor):
            problem = f"a {type(out).__name__}, not a tensor"
        elif tuple(out.shape) != (n,):
            problem = f"shape {tuple(out.shape)}, not ({n},)"
        elif not out.is_floating_point():
            problem = f"dtype {out.dtype}, not a floating-point dtype"
        elif not bool(torch.isfinite(out).all()):
            problem = f"{int((~torch.isfinite(out)).sum())} non-finite values (NaN or inf)"
        if problem is not None:
            fn_name = getattr(self.fn, "__qualname__", repr(self.fn))
            raise InvalidInputError(
                f"scorer {self.name!r} ({fn_name}) returned {problem} for a group of {n} {group.kind} parts; "
                f"it must return Float[Tensor, 'n'] with one finite score per part"
            )
        return out


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str, description: str = "", *, bound: BoundFn | None = None, units: str = "", overwrite: bool = False
) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: register ``fn(ctx, group, base) -> scores`` under ``name``.

    ``bound`` (optional) is a certified upper bound of the score per part (see :class:`Scorer`; ``fn`` must then
    accept one base per part, ``base`` of shape ``[n, d_model]``); declare it as an :class:`IncreaseBound` where
    the score is a non-decreasing function of the log-probability increase, to get the fast path. A wrong bound
    gives a wrong top-k: test it densely (``bound >= score`` on every part).

    Example::

        @register_scorer("target_logit", "the part's bs-value on the target", units="logits")
        def target_logit(ctx, group, base):
            return ctx.lens.logits(group.vectors)[:, ctx.target]

    Raises:
        InvalidInputError: ``name`` is empty, or already registered and ``overwrite`` is not set.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError("a scorer needs a non-empty name")
    if name in SCORERS and not overwrite:
        raise InvalidInputError(
            f"a scorer named {name!r} is already registered; pass overwrite=True to replace it, or choose another name"
        )

    def decorate(fn: ScorerFn) -> ScorerFn:
        SCORERS[name] = Scorer(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0], bound, units)
        return fn

    return decorate


def unregister_scorer(name: str) -> None:
    """Remove a registered scorer.

    Raises:
        InvalidInputError: no scorer of that name.
    """
    get_scorer(name)
    del SCORERS[name]


def get_scorer(name: str | Scorer) -> Scorer:
    """The registered scorer ``name`` (a :class:`Scorer` is returned as is).

    Raises:
        InvalidInputError: unknown name (the message lists the registered ones).
    """
    if isinstance(name, Scorer):
        return name
    if name not in SCORERS:
        raise InvalidInputError(f"unknown scoring method {name!r}; registered: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


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
    base_norm = ctx.lens.normalize(base[None]).double()

    def block(rows: slice) -> Tensor:
        vec = group.coefficients[rows].float()[:, None] * group.directions[rows].float()
        u = ctx.lens.normalize(base + vec).double() - base_norm
        proj = u @ probes.to(u.device)
        return head_tail_bound(proj, pr.log_weights.to(proj.device))

    return map_chunks(block, len(group), BOUND_ROWS).double()  # type: ignore[union-attr]


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    """What identifies a tensor's values among live tensors: storage address, shape, strides, dtype, device (two
    views of the same weights, e.g. ``W_out`` of one layer fetched for two prompts, have the same key)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


class ProjectionCache:
    """``directions @ probes(base)`` per (directions, base): groups that share their directions (FFN ``W_out``,
    the attention neurons' ``W_O`` view shared by every source position of a layer) are projected once.
    Directions are identified by :func:`_tensor_key` (views of the same weights share the entry) and kept alive
    by the cache, so that their memory (and key) cannot be reused by another tensor. The probes depend on the
    prompt, its target and its lens: one cache per :class:`ScoringContext` (or per search). Memory:
    ``n * (n_head + 2)`` float64 per distinct (directions, base) pair."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, bytes], tuple[Tensor, Tensor]] = {}

    def get(self, key: tuple[Any, bytes]) -> Tensor | None:
        """The projections stored under ``key`` (:func:`_tensor_key` of the directions, base key), if any (the key
        identifies the directions: they are kept alive, so it cannot be reused)."""
        hit = self._memo.get(key)
        return None if hit is None else hit[1]

    def put(self, key: tuple[Any, bytes], directions: Tensor, proj: Tensor) -> None:
        """Store ``proj``, keeping ``directions`` alive so that its memory cannot be reused."""
        self._memo[key] = (directions, proj)


def _direction_projections(
    ctx: ScoringContext,
    directions: Float[Tensor, "n d_model"],
    base: Float[Tensor, " d_model"],
    cache: ProjectionCache | None = None,
) -> Float[Tensor, "n m1"]:
    """``directions @ probes(base)`` in float64 (linear lens), in blocks of :data:`BOUND_ROWS` rows; memoised in
    ``cache`` when given."""
    key = (_tensor_key(directions), ctx._keys(base[None])[0])
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    probes = ctx.base_probes(base).probes.to(directions.device)
    proj = map_chunks(lambda rows: directions[rows].double() @ probes, len(directions), BOUND_ROWS)
    if cache is not None:
        cache.put(key, directions, proj)  # type: ignore[arg-type]
    return proj  # type: ignore[return-value]


def _fused_bounds(
    ctx: ScoringContext, groups: list[PartGroup], bases: list[Tensor], bound: IncreaseBound, cache: ProjectionCache
) -> list[Tensor]:
    """An :class:`IncreaseBound` for many groups under a linear lens, evaluated in blocks of consecutive groups
    that share a base (few large tensor operations instead of one small one per group). Same values as calling
    ``bound`` per group."""
    x0s = [bound.base(ctx, b) for b in bases]
    keys = [ctx._keys(b[None])[0] for b in x0s]
    out: list[Tensor] = []
    i = 0
    while i < len(groups):
        j, rows = i + 1, len(groups[i])
        while j < len(groups) and keys[j] == keys[i] and rows + len(groups[j]) <= 16 * BOUND_ROWS:
            rows += len(groups[j])
            j += 1
        pr = ctx.base_probes(x0s[i])
        proj = torch.cat(
            [
                g.coefficients.double()[:, None] * _direction_projections(ctx, g.directions, x0s[i], cache)
                for g in groups[i:j]
            ]
        )
        values = bound.finish(head_tail_bound(proj, pr.log_weights.to(proj.device)), pr).cpu()
        out += list(torch.split(values, [len(g) for g in groups[i:j]]))
        i = j
    return out


def _rows_times(a: Tensor, b: Tensor, rows: slice) -> Tensor:
    """``a[rows] @ b`` in float64."""
    return a[rows].double() @ b


def project_bounds(
    ctxs: Sequence[ScoringContext], groups: Sequence[Sequence[PartGroup]], scorer: str | Scorer = "log_prob_increase"
) -> None:
    """Fill each context's :attr:`~ScoringContext.projections` with the bound projections ``directions @
    probes(x0)`` that ``scorer``'s pruned search over ``groups[i]`` needs for prompt ``i``: one float64 product
    per distinct directions tensor for all prompts together (``[n, d_model] x [d_model, prompts * (n_head + 2)]``;
    FFN ``W_out`` and the attention neurons' ``W_O`` rows are shared by every prompt), instead of one narrow
    product per prompt. The searches then find them in the cache: same values as computing them per prompt.

    Only for an :class:`IncreaseBound` under linear lenses (else nothing to do). Contexts need their bases primed
    (:func:`prime_contexts`) and a ``projections`` cache. Memory: the projections, ``n * (n_head + 2)`` float64
    per group and prompt.
    """
    bound = get_scorer(scorer).bound
    if not isinstance(bound, IncreaseBound):
        return
    todo: dict[tuple[Any, ...], tuple[Tensor, dict[tuple[int, bytes], tuple[ScoringContext, Tensor, bytes]]]] = {}
    for ctx, gs in zip(ctxs, groups):
        if ctx.projections is None or not ctx.lens.linear or not ctx.lens.certifiable:
            continue
        for g in gs:
            if not len(g):
                continue
            x0 = bound.base(ctx, ctx.base_for(g))
            bkey = ctx._keys(x0[None])[0]
            dkey = _tensor_key(g.directions)
            if ctx.projections.get((dkey, bkey)) is not None:
                continue
            todo.setdefault(dkey, (g.directions, {}))[1][(id(ctx), bkey)] = (ctx, x0, bkey)
    for dkey, (directions, items) in todo.items():
        probes = [ctx.base_probes(x0).probes for ctx, x0, _ in items.values()]
        wide = torch.cat(probes, dim=1).to(directions.device)  # [d_model, prompts * (m+1)]
        proj: Tensor = map_chunks(  # type: ignore[assignment]
            functools.partial(_rows_times, directions, wide), len(directions), BOUND_ROWS
        )
        for (ctx, _, bkey), p in zip(items.values(), torch.split(proj, [q.shape[1] for q in probes], dim=1)):
            ctx.projections.put((dkey, bkey), directions, p)  # type: ignore[union-attr]


#: Kinds whose directions are rows of the model's weights (``W_out``, ``W_O``), the same for every prompt.
SHARED_DIRECTION_KINDS: tuple[str, ...] = ("ffn_neuron", "attn_neuron")


class DirectionLogits:
    """The vocabulary projections ``lens.prompt_free_transform(w) @ W_U`` of neuron directions ``w`` (rows of
    ``W_out`` and ``W_O``), computed once and shared by the prompts of a batch: under a linear lens the logits of a
    part ``m * w`` at a prompt are ``m * prompt_factor * P[w]`` (:attr:`~tl_residual.lens.Lens.prompt_factor`), so
    each (prompt, neuron) exact score costs ``O(d_vocab)`` (a log-softmax) instead of a ``d_model x d_vocab``
    product, and the products are paid once per distinct neuron of the batch (the union over its prompts).

    Args:
        max_bytes: memory for the projections (float32 rows of ``d_vocab``; reserved once, pages touched as rows
            are written); when full the table is cleared and filled again (results unchanged, only sharing lost).
        block: rows scored per pass (a block of ``block * d_vocab`` floats stays in cache across the passes).
    """

    def __init__(self, max_bytes: int = 2**30, block: int = 16) -> None:
        self.max_bytes, self.block = max_bytes, block
        self.n_projected = 0  # rows projected (cost counter: the union size)
        self.n_requested = 0  # rows asked for (the sum over prompts)
        self._buf: Tensor | None = None
        self.clear()

    def clear(self) -> None:
        """Forget every projection."""
        self._slot: dict[tuple[Any, int], int] = {}
        self._alive: dict[tuple[Any, ...], Tensor] = {}  # keeps the directions' memory (and keys) from reuse
        self._table: Tensor | None = None
        self._n = 0

    def slots(self, lens: Lens, directions: Float[Tensor, "n d_model"], local: Int[Tensor, " r"]) -> Tensor:
        """The table rows holding ``directions[local]``, projecting those not there yet (:meth:`prefetch`)."""
        wanted = local.tolist()
        self.n_requested += len(wanted)
        self.prefetch(lens, [(directions, wanted)])
        dkey = _tensor_key(directions)
        return torch.tensor([self._slot[(dkey, r)] for r in wanted], dtype=torch.long)

    def prefetch(self, lens: Lens, requests: Sequence[tuple[Tensor, Sequence[int]]]) -> None:
        """Project every requested row ``directions[r]`` not in the table yet: ``lens.prompt_free_transform`` of
        all of them, then one matmul against ``W_U`` per :data:`~tl_residual.lens.DEFAULT_CHUNK_SIZE` rows,
        written straight into the table (a product with few rows reads all of ``W_U`` for little work: ask for
        many rows at once). ``lens``: any lens of the batch (same model and convention)."""
        todo: dict[tuple[Any, int], tuple[Tensor, int]] = {}
        for directions, rows in requests:
            dkey = _tensor_key(directions)
            for r in rows:
                if (dkey, r) not in self._slot:
                    todo.setdefault((dkey, int(r)), (directions, int(r)))
        if not todo:
            return
        W_U = lens.W_U
        if self._table is None or self._n + len(todo) > self._table.shape[0]:
            self.clear()  # full (or first use): start again, and every requested row is missing now
            for directions, rows in requests:
                for r in rows:
                    todo.setdefault((_tensor_key(directions), int(r)), (directions, int(r)))
            cap = max(len(todo), self.max_bytes // (4 * W_U.shape[-1]))
            self._table = W_U.new_empty(cap, W_U.shape[-1])
        by_dir: dict[tuple[Any, ...], tuple[Tensor, list[int]]] = {}
        for (dkey, r), (directions, _) in todo.items():
            by_dir.setdefault(dkey, (directions, []))[1].append(r)
        x = torch.cat([d[torch.tensor(rows, device=d.device)].float().to(W_U.device) for d, rows in by_dir.values()])
        x = lens.prompt_free_transform(x)
        for s in range(0, x.shape[0], DEFAULT_CHUNK_SIZE):
            rows_x = x[s : s + DEFAULT_CHUNK_SIZE]
            torch.matmul(rows_x, W_U, out=self._table[self._n + s : self._n + s + rows_x.shape[0]])
        for dkey, (directions, rows) in by_dir.items():
            for r in rows:
                self._slot[(dkey, r)] = self._n
                self._n += 1
            self._alive[dkey] = directions
        self.n_projected += x.shape[0]

    def log_prob_increase(
        self,
        slots: Int[Tensor, " r"],
        coefficients: Float[Tensor, " r"],
        base_logits: Float[Tensor, " d_vocab"],
        target: int,
    ) -> Float[Tensor, " r"]:
        """``log_softmax(z(x) + m_j P[w_j])[t] - log_softmax(z(x))[t]`` for each row (nats): the log-probability
        increase of the parts ``m_j w_j`` (``coefficients`` already times the prompt factor) at a base of lens logits
        ``base_logits``; ``block`` rows at a time in one reused buffer (no allocation per row)."""
        assert self._table is not None
        V = base_logits.shape[-1]
        if self._buf is None or self._buf.shape[1] != V:
            self._buf = base_logits.new_empty(self.block, V)
        base_lp = float(torch.log_softmax(base_logits, -1)[target])
        coef = coefficients.float().to(base_logits.device)
        out = torch.empty(len(slots), dtype=torch.float64)
        idx = slots.to(self._table.device)
        for s in range(0, len(slots), self.block):
            b = self._buf[: min(self.block, len(slots) - s)]
            torch.index_select(self._table, 0, idx[s : s + self.block], out=b)
            b.mul_(coef[s : s + self.block, None]).add_(base_logits)  # the logits of x + m w
            zt = b[:, target].clone()
            m = b.amax(-1)
            lse = b.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)  # logsumexp, in place
            out[s : s + len(b)] = (zt - lse).double().cpu() - base_lp
        return out


def _uses_direction_logits(ctx: ScoringContext, scorer: Scorer) -> bool:
    """Whether ``scorer``'s exact scores at ``ctx`` go through the shared :class:`DirectionLogits`: the
    log-probability increase under a linear lens with certified bounds."""
    return scorer.fn is _log_prob_increase and ctx.lens.linear and ctx.lens.certifiable


def prefetch_direction_logits(
    ctxs: Sequence[ScoringContext],
    groups: Sequence[Sequence[PartGroup]],
    top_k: int,
    method: str | Scorer = "log_prob_increase",
    margin: float = 1.25,
) -> None:
    """For every prompt, project the directions of its ``ceil(margin * top_k)`` best-bounded parts of ``groups[i]``
    (those its certified search scores first) into the shared :class:`DirectionLogits`, all prompts' rows in a few
    large matmuls (the union over the batch), instead of a narrow product per search step. Only where the searches
    would use the shared projections (``log_prob_increase``, a linear lens, :data:`SHARED_DIRECTION_KINDS`).
    Results are unchanged; this only decides when the projections are computed."""
    scorer = get_scorer(method)
    todo: dict[int, tuple[DirectionLogits, Lens, list[tuple[Tensor, list[int]]]]] = {}
    for ctx, gs in zip(ctxs, groups):
        shared = ctx.direction_logits
        if shared is None or not _uses_direction_logits(ctx, scorer):
            continue
        gs = [g for g in gs if len(g) and g.kind in SHARED_DIRECTION_KINDS]
        if not gs or scorer.bound is None:
            continue
        bounds = torch.cat(_bounds(ctx, gs, [ctx.base_for(g) for g in gs], scorer))
        top = torch.topk(bounds, min(len(bounds), math.ceil(margin * top_k))).indices
        owner, local = part_index(gs)
        reqs = todo.setdefault(id(shared), (shared, ctx.lens, []))[2]
        for gi in owner[top].unique().tolist():
            reqs.append((gs[gi].directions, local[top[owner[top] == gi]].tolist()))
    for shared, lens, reqs in todo.values():
        shared.prefetch(lens, reqs)


def _shared_log_prob_increase(
    ctx: ScoringContext, groups: list[PartGroup], bases: list[Tensor], owner: Tensor, local: Tensor, idx: Tensor
) -> Float[Tensor, " m"]:
    """The log-probability increase of the parts ``idx`` (of many groups) exactly as ``log_prob_increase`` scores
    them, with the parts of :data:`SHARED_DIRECTION_KINDS` projected through ``ctx.direction_logits``:
    ``log_softmax(z(x) + m * prompt_factor * P[w])[t] - log p(t | x)`` (linear lens)."""
    shared = ctx.direction_logits
    assert shared is not None and ctx.lens.linear
    out = torch.empty(len(idx), dtype=torch.float64)
    own = owner[idx]
    rest = []
    for gi in own.unique().tolist():
        sel = (own == gi).nonzero().squeeze(-1)
        g = groups[gi]
        if g.kind not in SHARED_DIRECTION_KINDS:
            rest.append(sel)
            continue
        rows = local[idx[sel]]
        slots = shared.slots(ctx.lens, g.directions, rows)
        coef = g.coefficients[rows.to(g.coefficients.device)].float() * ctx.lens.prompt_factor
        out[sel] = shared.log_prob_increase(slots, coef, ctx.base_logits(bases[gi]), ctx.target)
    if rest:
        sel = torch.cat(rest)
        out[sel] = _log_prob_increase(ctx, *gather_parts(groups, bases, owner, local, idx[sel])).double().cpu()
    if not bool(torch.isfinite(out).all()):
        raise InvalidInputError(f"{int((~torch.isfinite(out)).sum())} non-finite log-probability increases")
    return out


def _prob_increase_post(b: Tensor, probes: BoundProbes) -> Tensor:
    """Method c is ``p(t | x) * expm1(Imp)``, increasing in ``Imp``: bounded by ``p(t | x) * expm1(B)``."""
    return probes.base_log_prob.double().exp() * torch.expm1(b)


def _log_prob_post(b: Tensor, probes: BoundProbes) -> Tensor:
    """Method b is ``Imp(v | 0) + log p(t | 0)``: bounded by ``B(v | 0) + log p(t | 0)``, clamped at 0."""
    return (b + probes.base_log_prob.double()).clamp_max(0.0)


#: Certified upper bound (probability) of method c, ``p(t | x + v) - p(t | x) = p0 * expm1(Imp)``:
#: ``p0 * expm1(B)`` with ``B`` the :func:`log_prob_increase_bound` at the same base.
prob_increase_bound = IncreaseBound(post=_prob_increase_post)
#: Certified upper bound (nats) of method b, ``log p(t | v) = Imp(v | 0) + log p(t | 0)``: bound (1) at the zero
#: residual (where the frozen and ``none`` lenses give the uniform distribution) plus ``log p(t | 0)``, clamped
#: at 0; ``base`` is not used.
log_prob_bound = IncreaseBound(at_zero=True, post=_log_prob_post)


# ----------------------------------------------------------------------------------------------
# The neuron-level paper's methods a-h (section 4.1, Table 2), for a part m * v: ``v`` is the part's direction
# (an FFN neuron's W_out row; an attention subvalue's v @ W_O), ``m`` its coefficient.
# ----------------------------------------------------------------------------------------------


def _chunked(ctx: ScoringContext, rows: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(lens.logits(rows[chunk]))`` chunk by chunk (peak ``chunk_size * d_vocab`` floats)."""
    return map_chunks(lambda sl: fn(ctx.lens.logits(rows[sl])), rows.shape[0], ctx.chunk_size)  # type: ignore[return-value]


@register_scorer(
    "log_prob_increase",
    "log p(t | x + v) - log p(t | x) (neuron-level paper Eq. 13, method a)",
    bound=IncreaseBound(),
    units="nats",
)
def _log_prob_increase(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return log_prob_increase(ctx.lens, base, group.vectors, ctx.target, ctx.chunk_size, ctx.base_logits(base))


@register_scorer(
    "log_prob",
    "log p(t | m v): the part's own log-probability of the target (method b)",
    bound=log_prob_bound,
    units="nats",
)
def _log_prob(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return _chunked(ctx, group.vectors, lambda z: torch.log_softmax(z, -1)[:, ctx.target])


@register_scorer(
    "prob_increase", "p(t | x + m v) - p(t | x) (method c)", bound=prob_increase_bound, units="probability"
)
def _prob_increase(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    base_logits = ctx.base_logits(base)
    p0 = torch.softmax(base_logits, -1)[..., ctx.target]
    per_row = base.dim() == 2
    vecs = group.vectors

    def chunk(rows: slice) -> Tensor:
        z = _logits_after(ctx.lens, base, base_logits, vecs, rows)
        return torch.softmax(z, -1)[:, ctx.target] - (p0[rows] if per_row else p0)

    return map_chunks(chunk, vecs.shape[0], ctx.chunk_size)  # type: ignore[return-value]


@register_scorer("norm", "||v||: L2 norm of the part's direction (method d)", units="residual norm")
def _norm(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.directions.norm(dim=-1)


@register_scorer("coefficient", "|m|: absolute coefficient (method e)", units="coefficient")
def _coefficient(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.coefficients.abs().float()


@register_scorer("inverse_rank", "1 / rank of t in the vocabulary projection of v (method f)", units="1 / rank")
def _inverse_rank(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return 1.0 / _chunked(ctx, group.directions, lambda z: target_rank(z, ctx.target))


@register_scorer("coefficient_norm", "|m| * ||v|| (method g)", units="residual norm")
def _coefficient_norm(ctx: ScoringContext, group: PartGroup, base: Tensor) -> Tensor:
    return group.coefficients.abs() * group.directions.norm(dim=-1)


@register_scorer(
    "coefficient_inverse_rank", "|m| / rank of t in the projection of v (method h)", units="coefficient / rank"
)
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

#: Value columns of a score table, after the identifying columns of :mod:`tl_residual.tables`
#: (``coefficient`` only for parts; a layer output or a head is not a coefficient times a direction).
VALUE_COLUMNS: tuple[str, ...] = ("score", "coefficient", "top_tokens")
#: Every column a score table can have, in order (a table keeps those its kinds use).
TABLE_COLUMNS: list[str] = [*tables.ID_COLUMNS, *VALUE_COLUMNS]
#: Kinds that are whole components (no ``coefficient`` column).
_WHOLE_KINDS = ("attn", "mlp", "head")


def _rows(ctx: ScoringContext, group: PartGroup, picks: Tensor, scores: Tensor, n_top_tokens: int) -> pd.DataFrame:
    picks = picks.long().cpu()
    dev = group.coefficients.device
    if n_top_tokens > 0 and len(picks) > 0:
        vectors = group.coefficients[picks.to(dev), None] * group.directions[picks.to(group.directions.device)]
        ids = torch.topk(ctx.lens.logits(vectors), n_top_tokens, dim=-1).indices.tolist()
        tokens = [[ctx.lens.token_str(t) for t in row] for row in ids]
    else:
        tokens = [[] for _ in range(len(picks))]
    values: dict[str, Any] = {"score": scores.float().cpu().numpy()}
    if group.kind not in _WHOLE_KINDS:
        values["coefficient"] = group.coefficients[picks.to(dev)].float().cpu().numpy()
    values["top_tokens"] = tokens
    src = ctx.src_tokens() if "src_pos" in group.index else None
    return tables.part_frame(group, picks, src, **values)


def _finish(frames: list[pd.DataFrame], top_k: int | None, scorer: Scorer, ctx: ScoringContext) -> pd.DataFrame:
    df = tables.concat(frames, ["score", "top_tokens"])
    df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    if top_k is not None:
        df = df.head(top_k).reset_index(drop=True)
    df.attrs.update(
        method=scorer.name,
        units=scorer.units,
        target=ctx.target,
        position=ctx.position,
        convention=ctx.lens.convention,
    )
    return df


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")


def score_groups(
    ctx: ScoringContext,
    groups: Iterable[PartGroup],
    method: str | Scorer = "log_prob_increase",
    top_k: int | None = DEFAULT_TOP_K,
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """Score every part of ``groups`` with ``method`` and return the table, best first.

    With ``top_k`` set and a method that carries a certified upper bound in the registry (``log_prob_increase``,
    ``log_prob``, ``prob_increase``, or a custom scorer's :attr:`Scorer.bound`), the exact top-k is found by the
    pruned search of :func:`~tl_residual.topk.certified_top_k`, under every lens convention: the same parts and
    scores as dense scoring (ties at the k-th score broken by order of appearance, as in the dense path), after
    scoring only the parts whose bound beats the running k-th score. ``df.attrs`` then holds ``n_scored`` and
    ``n_candidates``. ``pruned=False`` forces dense scoring (the reference path); methods without a bound are
    always dense. ``top_k=None`` keeps every row.

    Memory: dense consumes the groups one at a time; pruned keeps every group (FFN directions are views of
    ``W_out``, no copy) plus one bound per part, and scores ``max(ctx.chunk_size, top_k)`` parts per matmul
    against ``W_U`` (peak extra about ``3 * max(chunk_size, top_k) * d_vocab`` floats).

    Raises:
        InvalidInputError: unknown method, bad ``top_k``, or a scorer returning anything but one finite score per
            part.
    """
    _check_top_k(top_k)
    scorer = get_scorer(method)
    if top_k is not None and pruned and scorer.bound is not None and ctx.lens.certifiable:
        return _pruned(ctx, list(groups), top_k, n_top_tokens, scorer)
    frames = []
    for g in groups:
        if len(g) == 0:
            continue
        scores = scorer(ctx, g, ctx.base_for(g))
        picks = torch.arange(len(g))
        if top_k is not None and len(g) > top_k:
            # stable: ties keep the lower index, like the pruned search
            picks = torch.argsort(scores.cpu(), descending=True, stable=True)[:top_k]
            scores = scores[picks.to(scores.device)]
        frames.append(_rows(ctx, g, picks, scores, n_top_tokens))
    return _finish(frames, top_k, scorer, ctx)


def _bounds(ctx: ScoringContext, groups: list[PartGroup], bases: list[Tensor], scorer: Scorer) -> list[Tensor]:
    """Every part's bound, through the fast path where the scorer declares an :class:`IncreaseBound` and the
    lens is linear."""
    bound = scorer.bound
    assert bound is not None
    if isinstance(bound, IncreaseBound) and ctx.lens.linear:
        cache = ctx.projections if ctx.projections is not None else ProjectionCache()
        return _fused_bounds(ctx, groups, bases, bound, cache)
    return [bound(ctx, g, b).double().cpu() for g, b in zip(groups, bases)]


def part_index(groups: Sequence[PartGroup]) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """For the parts of ``groups`` numbered consecutively (group by group): each part's group index (``owner``)
    and its row in that group (``local``)."""
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(groups)), sizes)
    local = torch.cat([torch.arange(len(g)) for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
    return owner, local


def gather_parts(
    groups: list[PartGroup], bases: list[Tensor], owner: Tensor, local: Tensor, idx: Tensor
) -> tuple[PartGroup, Tensor]:
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


def _pruned(
    ctx: ScoringContext, groups: list[PartGroup], top_k: int, n_top_tokens: int, scorer: Scorer
) -> pd.DataFrame:
    """The certified top-k over all parts of ``groups`` (see :func:`score_groups`)."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return _finish([], top_k, scorer, ctx)
    bases = [ctx.base_for(g) for g in groups]
    ctx.prime(torch.stack(bases + [torch.zeros_like(bases[0])]))  # one matmul for every distinct base
    all_bounds = torch.cat(_bounds(ctx, groups, bases, scorer))
    owner, local = part_index(groups)
    k = min(top_k, int(all_bounds.shape[0]))  # never allocate for more rows than there are candidates

    shared = ctx.direction_logits is not None and _uses_direction_logits(ctx, scorer)

    def exact(idx: Tensor) -> Tensor:
        if shared:  # neuron directions' vocabulary projections shared with the other prompts of the batch
            return _shared_log_prob_increase(ctx, groups, bases, owner, local, idx)
        # Parts of many layers in one call: one base per part, one matmul against W_U per chunk.
        return scorer(ctx, *gather_parts(groups, bases, owner, local, idx)).double().cpu()

    result = certified_top_k(all_bounds, exact, k, chunk_size=ctx.chunk_size)
    frames = []
    for gi in owner[result.indices].unique().tolist():
        sel = (owner[result.indices] == gi).nonzero().squeeze(-1)
        frames.append(_rows(ctx, groups[gi], local[result.indices[sel]], result.scores[sel], 0))
    df = _finish(frames, top_k, scorer, ctx)
    if n_top_tokens > 0 and len(result.indices):
        # every row's logit-lens tokens from one matmul against W_U
        row_names = [groups[int(owner[i])].names[int(local[i])] for i in result.indices]
        vectors = gather_parts(groups, bases, owner, local, result.indices)[0].vectors
        ids = torch.topk(ctx.lens.logits(vectors), n_top_tokens, dim=-1).indices.tolist()
        by_name = {n: [ctx.lens.token_str(t) for t in row] for n, row in zip(row_names, ids)}
        df["top_tokens"] = [by_name[n] for n in df["name"]]
    df.attrs["n_scored"] = result.n_scored
    df.attrs["n_candidates"] = int(all_bounds.shape[0])
    return df


# ----------------------------------------------------------------------------------------------
# The one entry point and its aliases
# ----------------------------------------------------------------------------------------------

#: Kinds :func:`score` scores (:mod:`tl_residual.names` vocabulary).
SCORABLE_KINDS: tuple[str, ...] = ("attn", "mlp", "head", "attn_subvalue", "attn_neuron", "ffn_neuron")
#: The neuron-grain kinds of :func:`score_neurons`.
NEURON_KINDS: tuple[str, ...] = ("ffn_neuron", "attn_neuron", "attn_subvalue")


def _layers(ctx: ScoringContext, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(ctx.n_layers))
    return [resolve_layer(layer, ctx.n_layers) for layer in layers]


def _kinds(kinds: str | Iterable[str], allowed: tuple[str, ...] = SCORABLE_KINDS) -> tuple[str, ...]:
    out = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in out if k not in allowed]
    if bad or not out:
        raise InvalidInputError(f"kinds {bad or list(out)!r} are not a non-empty subset of {', '.join(allowed)}")
    return out


def _single_group(kind: str, layer: int, vector: Tensor) -> PartGroup:
    """A layer output (``attn``/``mlp``) as a one-part group of coefficient 1."""
    name = names.layer_output(layer, "attn" if kind == "attn" else "mlp")
    return PartGroup(kind, layer, torch.ones(1, device=vector.device), vector[None, :], {}, [name])


def head_group(ctx: ScoringContext, layer: int) -> PartGroup:
    """Every head's output at ``ctx.position`` (:func:`~tl_residual.decompose.head_outputs`, without ``b_O``) as a
    group of kind ``head``, coefficient 1, names ``L{l}.H{h}``."""
    vecs = head_outputs(ctx.model, ctx.cache, layer, ctx.position, ctx.batch)
    n_heads = vecs.shape[0]
    return PartGroup(
        "head",
        layer,
        torch.ones(n_heads),
        vecs,
        {"head": torch.arange(n_heads)},
        [names.head(layer, h) for h in range(n_heads)],
    )


def iter_groups(ctx: ScoringContext, kinds: Iterable[str], layers: Iterable[int] | None = None) -> Iterator[PartGroup]:
    """The groups of parts of ``kinds`` in ``layers`` at ``ctx.position``, layer by layer in stream order
    (attention kinds, then FFN kinds). Lazily: one layer's groups at a time.

    Raises:
        InvalidInputError: a kind outside :data:`SCORABLE_KINDS` or a layer out of range.
    """
    kinds = _kinds(kinds)
    layer_list = _layers(ctx, layers)
    m, c, p, b = ctx.model, ctx.cache, ctx.position, ctx.batch
    outputs = (
        {(layer, kind): vec for _, layer, kind, vec in layer_outputs(m, c, p, b)}
        if {"attn", "mlp"} & set(kinds)
        else {}
    )
    for layer in layer_list:
        if "attn" in kinds:
            yield _single_group("attn", layer, outputs[(layer, "attn")])
        if "head" in kinds:
            yield head_group(ctx, layer)
        if "attn_subvalue" in kinds:
            yield attention_parts(m, c, layer, p, b)[0]
        if "attn_neuron" in kinds:
            yield from attention_neuron_groups(m, c, layer, p, b)
        if "mlp" in kinds:
            yield _single_group("mlp", layer, outputs[(layer, "mlp")])
        if "ffn_neuron" in kinds:
            yield from ffn_neuron_groups(m, c, layer, p, b)  # mixture of experts: the routed experts' neurons


def score(
    ctx: ScoringContext,
    kinds: str | Iterable[str] = ("ffn_neuron", "attn_neuron"),
    method: str | Scorer = "log_prob_increase",
    top_k: int | None = DEFAULT_TOP_K,
    layers: Iterable[int] | None = None,
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """Score every part of ``kinds`` in ``layers`` (default: all) for ``ctx.target`` with ``method``: one table.

    Kinds (:data:`SCORABLE_KINDS`): ``attn`` / ``mlp`` (a layer's whole attention / FFN output, residual-stream
    paper Eq. 19), ``head`` (a head's output summed over source positions, without ``b_O``), ``attn_subvalue``
    (head x source position, ``pattern[h, i, p] * v[p] @ W_O[h]``; coefficient the attention weight),
    ``attn_neuron`` (head, head dimension, source position; neuron-level paper section 3.2; coefficient
    ``pattern * v[d]``) and ``ffn_neuron`` (``m_k * W_out[k]``; coefficient ``m_k``). Each part is scored against
    the residual :func:`~tl_residual.decompose.base_stream` names for its kind.

    With ``top_k`` (default :data:`DEFAULT_TOP_K`) and a method with a bound, the exact top-k comes from the
    certified pruned search (:func:`score_groups`; SmolLM2-135M, 6 tokens, FFN and attention neurons: 149,760
    candidates, typically a few hundred scored against the unembedding, ``docs/performance.md``). ``top_k=None``
    scores and lists everything (dense: ``n * d_model * d_vocab`` multiply-adds for ``n`` parts).

    Returns:
        The table of the module docstring; ``df.attrs["units"]`` the scorer's units.

    Raises:
        InvalidInputError: unknown ``method`` or kind, a layer out of range, bad ``top_k``.
    """
    scorer = get_scorer(method)
    groups = iter_groups(ctx, _kinds(kinds), _layers(ctx, layers))
    return score_groups(ctx, groups, scorer, top_k, n_top_tokens, pruned)


TableFn = Callable[..., pd.DataFrame]


def _alias(name: str, kinds: tuple[str, ...], top_k_default: int | None, doc: str) -> TableFn:
    """A thin alias of :func:`score` for ``kinds``: ``(ctx, method, top_k, layers, n_top_tokens, pruned)``."""

    def alias(
        ctx: ScoringContext,
        method: str | Scorer = "log_prob_increase",
        top_k: int | None = top_k_default,
        layers: Iterable[int] | None = None,
        n_top_tokens: int = 5,
        pruned: bool = True,
    ) -> pd.DataFrame:
        return score(ctx, kinds, method, top_k, layers, n_top_tokens, pruned)

    alias.__name__ = alias.__qualname__ = name
    alias.__doc__ = doc
    return alias


score_ffn_neurons = _alias(
    "score_ffn_neurons",
    ("ffn_neuron",),
    DEFAULT_TOP_K,
    """:func:`score` of the FFN neurons ``m_k W_out[k]`` (against ``resid_mid``; ``coefficient`` is ``m_k``).

    Arguments: ``(ctx, method="log_prob_increase", top_k=DEFAULT_TOP_K, layers=None, n_top_tokens=5, pruned=True)``
    as for :func:`score`.""",
)
"""``score(ctx, ("ffn_neuron",), ...)``: the FFN neurons ``m_k W_out[k]`` (against ``resid_mid``; ``coefficient``
is ``m_k``). Arguments ``(ctx, method, top_k=DEFAULT_TOP_K, layers, n_top_tokens, pruned)`` as for :func:`score`."""

score_attention_subvalues = _alias(
    "score_attention_subvalues",
    ("attn_subvalue",),
    DEFAULT_TOP_K,
    """:func:`score` of the head x source-position subvalues ``pattern[h,i,p] v[p] W_O[h]`` (against
    ``resid_pre``; ``coefficient`` is the attention weight).

    Arguments: ``(ctx, method="log_prob_increase", top_k=DEFAULT_TOP_K, layers=None, n_top_tokens=5, pruned=True)``
    as for :func:`score`.""",
)
"""``score(ctx, ("attn_subvalue",), ...)``: the head x source-position subvalues ``pattern[h,i,p] v[p] W_O[h]``
(against ``resid_pre``; ``coefficient`` is the attention weight). Arguments as for :func:`score_ffn_neurons`."""

score_attention_neurons = _alias(
    "score_attention_neurons",
    ("attn_neuron",),
    DEFAULT_TOP_K,
    """:func:`score` of the attention neurons ``pattern[h,i,p] v[p,kv(h),d] * W_O[h,d]`` (neuron-level paper
    section 3.2; against ``resid_pre``; names ``L{l}.H{h}.d{d}.p{p}``, ``coefficient`` ``pattern * v[d]``).

    Arguments: ``(ctx, method="log_prob_increase", top_k=DEFAULT_TOP_K, layers=None, n_top_tokens=5, pruned=True)``
    as for :func:`score`. Parts come one source position at a time
    (:func:`~tl_residual.decompose.attention_neuron_groups`: directions are views of ``W_O``, never copied). Cost:
    ``n_heads * d_head * (position + 1)`` parts per layer; dense scoring projects each on the vocabulary, so
    restrict ``layers`` or keep ``top_k``.""",
)
"""``score(ctx, ("attn_neuron",), ...)``: the attention neurons ``pattern[h,i,p] v[p,kv(h),d] * W_O[h,d]``
(neuron-level paper section 3.2; against ``resid_pre``; ``coefficient`` ``pattern * v[d]``). Arguments as for
:func:`score_ffn_neurons`; ``n_heads * d_head * (position + 1)`` parts per layer."""

score_heads = _alias(
    "score_heads",
    ("head",),
    None,
    """:func:`score` of every head's output at ``position`` (its subvalues summed over source positions, without
    ``b_O``; :func:`~tl_residual.decompose.head_outputs`), against ``resid_pre``.

    Arguments: ``(ctx, method="log_prob_increase", top_k=None, layers=None, n_top_tokens=5, pruned=True)`` as for
    :func:`score`; every head by default.""",
)
"""``score(ctx, ("head",), ...)``: every head's output at ``position`` (without ``b_O``), against ``resid_pre``.
Arguments ``(ctx, method, top_k=None, layers, n_top_tokens, pruned)``: every head by default."""


def score_neurons(
    ctx: ScoringContext,
    method: str | Scorer = "log_prob_increase",
    top_k: int | None = DEFAULT_TOP_K,
    layers: Iterable[int] | None = None,
    kinds: Iterable[str] = ("ffn_neuron", "attn_neuron"),
    n_top_tokens: int = 5,
    pruned: bool = True,
) -> pd.DataFrame:
    """:func:`score` restricted to the neuron-grain kinds (:data:`NEURON_KINDS`): one ranking over every FFN
    neuron and attention neuron (and, if asked, head x position subvalue) of ``layers``, the neuron-level
    paper's question "which neurons matter most for this token".

    Raises:
        InvalidInputError: unknown ``method`` or kind, a layer out of range, bad ``top_k``.
    """
    return score(ctx, _kinds(kinds, NEURON_KINDS), method, top_k, layers, n_top_tokens, pruned)


def score_layers(
    ctx: ScoringContext,
    method: str | Scorer = "log_prob_increase",
    top_k: int | None = None,
    layers: Iterable[int] | None = None,
    n_top_tokens: int = 5,
) -> pd.DataFrame:
    """:func:`score` of each layer's attention output (``hook_attn_out``, against ``resid_pre``) and FFN output
    (``hook_mlp_out``, against ``resid_mid``; ``resid_pre`` for parallel attention+MLP,
    :func:`~tl_residual.decompose.base_stream`): residual-stream paper Eq. 19 for ``log_prob_increase``. ``kind``
    is ``attn`` or ``mlp``; every row by default. ``df.attrs["embed_log_prob"]`` is ``log p(t | embedding)``
    (nats), so that under a linear lens it plus the ``log_prob_increase`` scores telescopes to the final
    residual's log-probability.
    """
    df = score(ctx, ("attn", "mlp"), method, top_k, layers, n_top_tokens)
    embed = tlm.cached(ctx.cache, "blocks.0.hook_resid_pre", ctx.batch)[ctx.position]
    df.attrs["embed_log_prob"] = float(ctx.lens.log_probs(embed)[ctx.target])
    return df


def score_neurons_batch(
    model: Any,
    cache: Any,
    kinds: Iterable[str] = ("ffn_neuron", "attn_neuron"),
    method: str | Scorer = "log_prob_increase",
    top_k: int | None = DEFAULT_TOP_K,
    layers: Iterable[int] | None = None,
    n_top_tokens: int = 5,
    positions: int | Iterable[int] = -1,
    targets: int | str | None | Iterable[int | str | None] = None,
    convention: Convention = "frozen",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    offsets: int | Iterable[int] | None = None,
) -> pd.DataFrame:
    """:func:`score` for every prompt of a batched cache: one exact top-k per prompt, each at its own destination
    position and for its own target. Arguments as :func:`score` (``model, cache`` build one context per prompt,
    as in :func:`make_context`).

    Args:
        model: the ``HookedTransformer`` or ``TransformerBridge``.
        cache: the ``ActivationCache`` of ``model.run_with_cache(tokens)`` with ``tokens`` of shape
            ``[batch, pos]`` (any device; float16/bfloat16 caches are scored in float32).
        positions: one destination position for all prompts or one per prompt (e.g. the last non-padding token
            of each prompt of a right-padded batch; ``-1`` is the last position).
        targets: one target for all, or one per prompt (token id, one-token string, or ``None`` for the model's
            top-1 at that prompt's position).
        chunk_size: parts scored per matmul against ``W_U``; peak extra memory about
            ``3 * max(chunk_size, top_k) * d_vocab`` floats (plus the search's per-part bounds, 8 bytes each).
        offsets: cache column of each prompt's first real token (``PromptBatch.offsets`` of
            :func:`tl_residual.interventions.tokenize_batch`; non-zero under left padding), one for all or one per
            prompt. ``positions`` index the cache (``-1`` or ``PromptBatch.last_index`` work for either padding
            side); every name, ``src_pos`` and ``position`` of the result is in the prompt's own coordinates
            (BOS = 0), the convention of every other function, and pad sources are never listed.

    Returns:
        The tables of :func:`score` stacked, with leading columns ``prompt`` (batch index), ``position`` and
        ``target``; sorted by prompt, then score. ``df.attrs["per_prompt"]`` holds each prompt's ``n_scored`` and
        ``n_candidates``.

    Raises:
        InvalidInputError: ``positions`` or ``targets`` of the wrong length, or any error of :func:`score`.
    """
    scorer = get_scorer(method)
    n_batch = int(tlm.cached(cache, "blocks.0.hook_resid_pre", batch=None).shape[0])
    pos_list = [positions] * n_batch if isinstance(positions, int) else list(positions)
    tgt_list = [targets] * n_batch if targets is None or isinstance(targets, (int, str)) else list(targets)
    off_list = (
        [0 if offsets is None else offsets] * n_batch
        if offsets is None or isinstance(offsets, int)
        else [int(o) for o in offsets]
    )
    for label, given in (("positions", pos_list), ("targets", tgt_list), ("offsets", off_list)):
        if len(given) != n_batch:
            raise InvalidInputError(
                f"{label} has {len(given)} entries but the cache holds {n_batch} prompts; "
                f"give one per prompt or a single value for all"
            )
    frames, per_prompt = [], []
    for b in range(n_batch):
        ctx = make_context(model, cache, tgt_list[b], pos_list[b], b, convention, chunk_size)
        df = _score_in_prompt_coordinates(ctx, off_list[b], scorer, top_k, layers, kinds, n_top_tokens)
        df.insert(0, "target", ctx.target)
        df.insert(0, "position", ctx.position - off_list[b])
        df.insert(0, "prompt", b)
        frames.append(df)
        per_prompt.append({k: df.attrs.get(k) for k in ("n_scored", "n_candidates")})
    out = pd.concat(frames, ignore_index=True)
    for c in tables.INDEX_COLUMNS:  # a prompt whose top-k lacks a kind leaves NaN: the mixed-table -1 instead
        if c in out.columns and out[c].isna().any():
            out[c] = out[c].fillna(-1).astype("int64")
    if "src_token" in out.columns:
        out["src_token"] = out["src_token"].fillna("")
    out.attrs.update(method=scorer.name, units=scorer.units, convention=convention, per_prompt=per_prompt)
    return out


def _score_in_prompt_coordinates(
    ctx: ScoringContext,
    offset: int,
    method: str | Scorer,
    top_k: int | None,
    layers: Iterable[int] | None,
    kinds: Iterable[str],
    n_top_tokens: int,
) -> pd.DataFrame:
    """:func:`score_neurons` for a prompt whose first real token is cache column ``offset`` (left padding): pad
    sources (``src_pos < offset``, attention weight 0) are dropped and positions renamed to the prompt's own
    coordinates (BOS = 0), so that ``L3.H1.p2`` means the same component as in :func:`intervene`. The exact
    top-k of the real parts: while pad parts fill the top-k, the search is repeated with ``k`` enlarged."""
    if not isinstance(offset, int) or not 0 <= offset <= ctx.position:
        raise InvalidInputError(
            f"offset {offset!r} must be an integer in 0..{ctx.position} (the destination "
            f"position {ctx.position} in the cache), e.g. PromptBatch.offsets[b]"
        )
    extra = 0  # how far k is enlarged beyond top_k to make room for the pad parts
    while True:
        k = None if top_k is None else top_k + extra
        df = score(ctx, kinds, method, k, layers, n_top_tokens)
        if offset == 0 or "src_pos" not in df.columns:
            return df
        real = df[(df["src_pos"] < 0) | (df["src_pos"] >= offset)]
        if top_k is None or len(real) >= top_k or len(df) < top_k + extra:
            break
        extra += len(df) - len(real)
    attrs = dict(df.attrs)
    real = real.head(top_k).reset_index(drop=True) if top_k is not None else real.reset_index(drop=True)
    shifted = real["src_pos"] >= 0
    real.loc[shifted, "src_pos"] = real.loc[shifted, "src_pos"] - offset
    real["name"] = [
        names.format(dataclasses.replace(names.parse(n), src_pos=int(p))) if p >= 0 else n
        for n, p in zip(real["name"], real["src_pos"])
    ]
    real.attrs.update(attrs, offset=offset)
    return real
