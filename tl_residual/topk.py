"""Exact top-k attribution with certified pruning: upper bounds on the log-probability increase.

**The bound.** For a part ``v`` added to the base residual ``x``, write ``u`` for the change it makes to the
vector the unembedding reads (the *lens-space change*) and ``s_w = u . W_U[:, w]`` for its effect on the logit of
token ``w``. Under every lens convention of :mod:`tl_residual.lens` the logits change by exactly ``s`` (``b_U``
cancels), so

    Imp(v | x) = log p(t | x + v) - log p(t | x) = s_t - log E_{w ~ p(x)} [exp s_w]              (exact)

(residual-stream paper Eq. 19; neuron-level paper Eq. 13). Split the vocabulary into a *head* ``S`` (the ``h``
most probable tokens of ``p(x)`` and the target) and the *tail* (the rest, total probability ``q``). Jensen's
inequality on the tail's conditional distribution gives

    log E_p [exp s_w] >= log( sum_{w in S} p_w exp(s_w) + q exp(s . mu_tail) ),
    mu_tail = W_U p_tail / q,

hence the certified upper bound

    Imp(v | x) <= s_t - logsumexp_{w in S} (log p_w + s_w  ,  log q + u . mu_tail)    =: B(v | x).   (1)

With an empty head this is the plain Jensen bound ``s_t - E_p[s_w] = u . (W_U[:, t] - W_U p(x))``; the head makes
it tight where ``p(x)`` is concentrated (the late layers, where the top parts live). The bound needs ``u`` only
through ``h + 2`` dot products (the *probes* :func:`bound_probes` builds once per base ``x``):

* linear lens (``frozen``, ``none``): ``u = T(v)`` is linear in ``v``, so for a part ``m * d`` the projections are
  ``m * (d . T^T probe)``: ``h + 2`` multiply-adds per ``d_model`` per part, no ``d_vocab`` work;
* ``recomputed`` lens: ``u = N(x + v) - N(x)`` with ``N`` the final norm recomputed (non-linear), computed per
  part in ``d_model`` operations; (1) holds unchanged.

Related bounds (neuron-level paper section 4.1): method b, ``log p(t | v)``, is ``Imp(v | 0) + log p(t | 0)`` (the
same bound at base ``x = 0``, where the frozen lens gives the uniform distribution); method c,
``p(t | x + v) - p(t | x) = p(t | x) * (exp Imp - 1)``, is increasing in ``Imp`` and is bounded by
``p(t | x) * expm1(B)``.

**The search** (:func:`certified_top_k`). Candidates are scored exactly in chunks in decreasing order of their
bound; the search stops when the k-th best exact score is above the next bound (plus a float tolerance), which
certifies that no unscored candidate can enter the top-k. Result: the dense top-k, same scores; ties at the k-th
score are broken by lower candidate index in both paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: Default size of the head ``S`` of the bound (1): probable tokens of ``p(x)`` treated exactly.
DEFAULT_HEAD = 8


@dataclass
class TopK:
    """Result of a certified search.

    Attributes:
        indices: ``Int[Tensor, "k"]`` candidate indices, best first.
        scores: ``Float[Tensor, "k"]`` their exact scores (units of the score, e.g. nats).
        n_scored: how many candidates were scored exactly (the rest were pruned by their bound).
    """

    indices: Int[Tensor, " k"]
    scores: Float[Tensor, " k"]
    n_scored: int


@dataclass
class BoundProbes:
    """Per-base quantities of the bound (1), for ``B`` bases at once.

    Attributes:
        probes: ``Float[Tensor, "B d_model m+1"]``: column 0 is ``W_U[:, t]``; columns ``1..m`` are the mixture
            atoms: ``W_U[:, w]`` for the ``h`` head tokens ``w`` (target included), then ``mu_tail``.
        log_weights: ``Float[Tensor, "B m"]``: ``log p_w`` of the atoms, then ``log q`` (``-inf`` where ``q = 0``).
        base_log_prob: ``Float[Tensor, "B"]``: ``log p(t | x)`` (nats).
    """

    probes: Float[Tensor, "B d_model m1"]
    log_weights: Float[Tensor, "B m"]
    base_log_prob: Float[Tensor, " B"]


def jensen_direction(
    W_U: Float[Tensor, "d_model d_vocab"], base_logits: Float[Tensor, " d_vocab"], target: int
) -> Float[Tensor, " d_model"]:
    """``W_U[:, t] - W_U softmax(base_logits)``: the plain Jensen bound is ``u . direction`` (bound (1) with an
    empty head; in the lens-transformed space, logits units)."""
    p = torch.softmax(base_logits.double(), dim=-1).to(W_U.dtype)
    return W_U[:, target] - W_U @ p


def bound_probes(
    W_U: Float[Tensor, "d_model d_vocab"],
    base_logits: Float[Tensor, "B d_vocab"],
    target: int | Int[Tensor, " B"],
    n_head: int = DEFAULT_HEAD,
) -> BoundProbes:
    """The probes of bound (1) for ``B`` bases, in two matmuls against ``W_U`` (one per direction).

    Args:
        W_U: the unembedding (``d_model x d_vocab``), float32 or float64 (pass it in float64 to convert it once
            for many calls).
        base_logits: the lens logits of each base ``x`` (logits; any additive constant per row is harmless).
        target: target token id, or one target per base (the bases of several prompts in one call).
        n_head: ``h``, how many of the most probable tokens of ``p(x)`` enter exactly (``0``: plain Jensen;
            the target is always added to the head).

    Returns:
        :class:`BoundProbes` in float64. Peak memory ``3 * B * d_vocab`` float64 values.
    """
    n_head = max(0, min(int(n_head), base_logits.shape[-1]))
    logp = torch.log_softmax(base_logits.double(), dim=-1)  # [B, V]
    B = logp.shape[0]
    rows = torch.arange(B, device=logp.device)[:, None]
    t_col = torch.as_tensor(target, dtype=torch.long, device=logp.device).reshape(-1, 1).expand(B, 1)
    head = torch.topk(logp, n_head, dim=-1).indices if n_head else logp.new_zeros(B, 0, dtype=torch.long)
    has_t = (head == t_col).any(-1, keepdim=True)
    t_logp = logp.gather(-1, t_col)  # [B, 1]
    # Put the target in the head; where it is already there, repeat a head token with zero weight instead.
    extra_lw = torch.where(has_t, torch.full_like(t_logp, -math.inf), t_logp)
    head = torch.cat([head, t_col], dim=-1)
    head_lw = torch.cat([logp[rows, head[:, :-1]], extra_lw], dim=-1)
    p_tail = logp.exp()
    p_tail[rows, head] = 0.0
    q = p_tail.sum(-1)  # [B]
    W = W_U.double()
    mu_tail = (p_tail @ W.T) / q.clamp_min(1e-300)[:, None]  # [B, d_model]
    probes = torch.cat([W[:, t_col[:, 0]].T[:, :, None], W[:, head].permute(1, 0, 2), mu_tail[:, :, None]], dim=-1)
    log_q = torch.where(q > 0, q.clamp_min(1e-300).log(), torch.full_like(q, -math.inf))
    return BoundProbes(probes, torch.cat([head_lw, log_q[:, None]], dim=-1), t_logp[:, 0])


def head_tail_bound(projections: Float[Tensor, "n m1"], log_weights: Float[Tensor, "n m"]) -> Float[Tensor, " n"]:
    """Bound (1) from the projections of each part's lens-space change on the probes.

    Args:
        projections: ``u . probes`` per part: column 0 the target, columns ``1..m`` the mixture atoms.
        log_weights: the atoms' log-weights (one row per part, or broadcastable).

    Returns:
        ``s_t - logsumexp(log_weights + s_atoms)`` (nats), float64: an upper bound of ``Imp(v | x)``.
    """
    projections = projections.double()
    y = projections[:, 1:] + log_weights.double()
    m = y.amax(dim=-1, keepdim=True)  # finite: the head's atoms have finite weights
    return projections[:, 0] - (y.sub_(m).exp_().sum(dim=-1).log_() + m[:, 0])  # logsumexp, fewer passes


def certified_top_k(
    bounds: Float[Tensor, " n"],
    exact: Callable[[Int[Tensor, " m"]], Float[Tensor, " m"]],
    k: int,
    chunk_size: int = 256,
    tol: float = 1e-5,
    min_chunk: int = 8,
) -> TopK:
    """Exact top-``k`` of a score that never exceeds ``bounds``.

    The first call scores the ``max(k, min_chunk)`` best-bounded candidates; each later call scores exactly the
    unscored candidates whose bound still beats the running k-th score (the only ones that can enter the top-k or
    block the stopping test; at most ``chunk_size`` per call). A candidate is therefore scored only if its bound
    beat the k-th score known when it was reached: no fixed-size overshoot.

    Args:
        bounds: an upper bound of every candidate's score (same units as the score).
        exact: scores a batch of candidate indices exactly (called with at most ``max(chunk_size, k)`` indices).
        k: how many to return (fewer if there are fewer candidates).
        chunk_size: most candidates scored per call of ``exact`` after the first (bounds the peak extra memory
            of the scorer, together with ``k``).
        min_chunk: fewest candidates scored by the first call.
        tol: slack added to the stopping test (relative to ``max(1, |bound|)``) against float rounding in bound
            and exact score; the search only stops once the k-th score beats the next bound by this margin.

    Returns:
        The top-``k`` candidates by exact score, best first (ties: lower index first), and how many were scored.

    Raises:
        ValueError: ``bounds`` is not one-dimensional.
    """
    if bounds.dim() != 1:
        raise ValueError(f"bounds must be one-dimensional, got shape {tuple(bounds.shape)}")
    n = int(bounds.shape[0])
    k = min(int(k), n)
    if k <= 0:
        empty = torch.zeros(0, dtype=torch.long)
        return TopK(empty, torch.zeros(0, dtype=torch.float64), 0)
    b = bounds.detach().double().cpu()
    b = torch.where(torch.isnan(b), torch.full_like(b, math.inf), b)  # an unknown bound prunes nothing
    order = torch.argsort(b, descending=True, stable=True)
    sorted_bounds = b[order]
    best_idx = torch.zeros(0, dtype=torch.long)
    best_score = torch.zeros(0, dtype=torch.float64)
    start = 0
    while start < n:
        # The first chunk holds at least k so the k-th best is known after one round; then grow geometrically.
        if start == 0:
            step = max(k, min_chunk)
        else:  # the unscored candidates that could still block the stopping test below
            kth = float(best_score.min())
            rest = sorted_bounds[start:]
            step = min(chunk_size, max(1, int((rest + tol * rest.abs().clamp_min(1.0) > kth).sum())))
        stop = min(n, start + step)
        idx = order[start:stop]
        scores = exact(idx).detach().double().cpu()
        best_idx = torch.cat([best_idx, idx])
        best_score = torch.cat([best_score, scores])
        if best_score.shape[0] > k:
            keep = _ranked(best_idx, best_score)[:k]
            best_idx, best_score = best_idx[keep], best_score[keep]
        start = stop
        if start < n and best_score.shape[0] >= k:
            kth = float(best_score.min())
            next_bound = float(sorted_bounds[start])
            if kth >= next_bound + tol * max(1.0, abs(next_bound)):
                break
    final = _ranked(best_idx, best_score)
    return TopK(best_idx[final], best_score[final], start)


def _ranked(idx: Tensor, score: Tensor) -> Tensor:
    """Order by score descending, then index ascending (a deterministic tie-break)."""
    by_index = torch.argsort(idx, stable=True)
    by_score = torch.argsort(score[by_index], descending=True, stable=True)
    return by_index[by_score]
