"""Exact top-k by log-probability increase with certified pruning.

Under a linear lens (``frozen`` or ``none``), for a part ``v`` added to the base ``x``:

    Imp(v | x) = z_t(v) - log E_{w ~ p(x)} [exp z_w(v)]                          (exact)
              <= z_t(v) - E_{w ~ p(x)} [z_w(v)]                                   (Jensen)
               = v . T^T (W_U[:, t] - W_U p(x))  =:  bound(v)

``T`` is the lens's linear map (:meth:`Lens.transform`). The bound costs one ``d_model`` dot product per part
(one vector per base ``x``, i.e. per layer). Candidates are scored exactly in chunks in decreasing order of
their bound; the search stops when the k-th best exact score is at least the next bound, which certifies that
no unscored part can enter the top-k. The result equals the dense top-k (up to ties at the k-th score).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class TopK:
    """Result of a certified search.

    Attributes:
        indices: ``Int[Tensor, "k"]`` candidate indices, best first.
        scores: ``Float[Tensor, "k"]`` their exact scores (nats).
        n_scored: how many candidates were scored exactly (the rest were pruned by their bound).
    """

    indices: Int[Tensor, " k"]
    scores: Float[Tensor, " k"]
    n_scored: int


def jensen_direction(
    W_U: Float[Tensor, "d_model d_vocab"], base_logits: Float[Tensor, " d_vocab"], target: int
) -> Float[Tensor, " d_model"]:
    """``W_U[:, t] - W_U softmax(base_logits)``: the bound is ``T(v) . direction`` (in the lens-transformed space)."""
    p = torch.softmax(base_logits.double(), dim=-1).to(W_U.dtype)
    return W_U[:, target] - W_U @ p


def certified_top_k(
    bounds: Float[Tensor, " n"],
    exact: Callable[[Int[Tensor, " m"]], Float[Tensor, " m"]],
    k: int,
    chunk_size: int = 256,
    tol: float = 1e-5,
) -> TopK:
    """Exact top-``k`` of a score that never exceeds ``bounds``.

    Args:
        bounds: an upper bound of every candidate's score.
        exact: scores a batch of candidate indices exactly.
        k: how many to return (fewer if there are fewer candidates).
        chunk_size: candidates scored per call of ``exact`` (bounds peak extra memory).
        tol: slack (nats) added to the stopping test against float rounding in bound and score.

    Returns:
        The top-``k`` candidates by exact score, best first, and how many were scored.
    """
    n = int(bounds.shape[0])
    k = min(k, n)
    if k <= 0:
        empty = torch.zeros(0, dtype=torch.long)
        return TopK(empty, torch.zeros(0), 0)
    order = torch.argsort(bounds.double(), descending=True)
    sorted_bounds = bounds.double()[order]
    best_idx = torch.zeros(0, dtype=torch.long)
    best_score = torch.zeros(0, dtype=torch.float64)
    start = 0
    while start < n:
        # Grow the first chunk to at least k so the k-th best is known after one round.
        stop = min(n, start + max(chunk_size, k if start == 0 else 0))
        idx = order[start:stop]
        scores = exact(idx).double()
        best_idx = torch.cat([best_idx, idx])
        best_score = torch.cat([best_score, scores])
        if best_score.shape[0] > k:
            top = torch.topk(best_score, k)
            best_idx, best_score = best_idx[top.indices], top.values
        start = stop
        if start < n and best_score.shape[0] >= k:
            kth = float(best_score.min())
            next_bound = float(sorted_bounds[start])
            if kth >= next_bound + tol * max(1.0, abs(next_bound)):
                break
    final = torch.argsort(best_score, descending=True)
    return TopK(best_idx[final], best_score[final].float(), start)
