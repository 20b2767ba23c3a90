"""Faithfulness benchmark: the neuron-level paper's Table 2 (and Appendix C, Table 13) on any model and prompts.

Yu & Ananiadou, "Neuron-Level Knowledge Attribution in Large Language Models", section 4.1: each method picks the
top-10 FFN neurons for the correct token, their parameters are set to zero (at every position), the model is
rerun, and the correct token's MRR, probability (%) and log-probability (nats) are reported. Lower is better.

What runs (:func:`run_benchmark`, on the prompts of :func:`read_prompts`: the built-in factual prompts that survive
the paper's filter for the model, :func:`tl_residual.datasets.filter_prompts`, or the user's JSONL/CSV/Parquet):

* the eight methods of :data:`tl_residual.scorers.PAPER_METHODS` and a seeded random control, top-k FFN neurons
  for k in {10, 100, 300} (the top-300 is computed once per prompt and method; top-10 and top-100 are its
  prefixes), overall and per knowledge type;
* Appendix C: the top-200 attention neurons (``L{l}.H{h}.d{d}.p{p}``, scored by log-probability increase) and the
  top-100 FFN neurons zeroed together, against 200 random attention neurons + 100 random FFN neurons.

The selected component names are kept per prompt and method (``BenchmarkResult.selections``, written to
``{out}.selections.parquet`` by :func:`write`).

Speed (same selections as the reference computations, checked in ``tests/test_faithfulness.py``):
:class:`FfnSelector` runs the certified pruned top-k of ``log_prob_increase``, ``log_prob`` and ``prob_increase``
with one exact-score table per prompt shared by the three (one projection of each candidate on the vocabulary),
and sorts the dense methods d, e, g once. ``inverse_rank`` and ``coefficient_inverse_rank`` depend on a neuron
only through the rank of the target in its direction's vocabulary projection, which under the frozen lens does
not depend on the prompt (the frozen final-norm scale is a positive factor), so :class:`RankTable` counts those
ranks once per run for all FFN neurons and distinct targets, up to a cap, and certifies each prompt's selection
(re-counting the few neurons that could still enter); :func:`target_rank_table` is the full reference. The
per-prompt scores are ``1 / rank`` and ``|m| / rank`` (the registry's formulas). Interventions are batched.

Command line: ``tl-residual faithfulness --data prompts.jsonl`` (or ``--data builtin:factual``); the benchmark
script ``benchmarks/faithfulness.py`` calls the same code on the built-in prompts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_residual import interventions as I
from tl_residual import model as tlm
from tl_residual._io import atomic_write, atomic_write_text
from tl_residual.datasets import KNOWLEDGE_TYPES
from tl_residual.decompose import ffn_neuron_groups, neuron_name
from tl_residual.errors import InvalidInputError
from tl_residual.lens import Lens
from tl_residual.scorers import (
    PAPER_METHODS,
    ScoringContext,
    gather_parts,
    get_scorer,
    make_context,
    part_index,
    score_attention_neurons,
    score_ffn_neurons,
)
from tl_residual.topk import certified_top_k

RANDOM = "random"
LABELS = {
    "none": "o) no intervention",
    "log_prob_increase": "a) log-prob increase",
    "log_prob": "b) log prob",
    "prob_increase": "c) prob increase",
    "norm": "d) norm",
    "coefficient": "e) coefficient",
    "inverse_rank": "f) 1/rank",
    "coefficient_norm": "g) coef x norm",
    "coefficient_inverse_rank": "h) coef / rank",
    RANDOM: "random (same count, seeded)",
}
#: Table 2 of the neuron-level paper (REFERENCE.md): (MRR, prob %, logp) for GPT2-large and Llama-7B.
PAPER_TABLE2 = {
    "none": ((0.361, 7.1, -3.15), (0.551, 21.5, -2.24)),
    "log_prob_increase": ((0.201, 3.4, -4.06), (0.312, 9.2, -3.91)),
    "log_prob": ((0.214, 3.6, -3.91), (0.339, 10.8, -3.35)),
    "prob_increase": ((0.219, 3.7, -3.92), (0.345, 10.0, -3.57)),
    "norm": ((0.363, 7.1, -3.14), (0.549, 21.3, -2.25)),
    "coefficient": ((0.439, 8.6, -3.10), (0.529, 22.9, -2.35)),
    "inverse_rank": ((0.306, 5.8, -3.40), (0.493, 18.1, -2.49)),
    "coefficient_norm": ((0.394, 8.1, -3.06), (0.523, 22.6, -2.39)),
    "coefficient_inverse_rank": ((0.232, 4.0, -3.80), (0.389, 13.0, -3.06)),
}
#: Appendix C, Table 13: MRR / probability decrease (%) after zeroing the top-200 attention + top-100 FFN neurons.
PAPER_TABLE13 = {
    "GPT2-large": {
        "language": (96, 99),
        "color": (97, 99),
        "number": (96, 98),
        "capital": (96, 99),
        "country": (97, 99),
        "month": (96, 99),
    },
    "Llama-7B": {
        "language": (97, 99),
        "color": (98, 99),
        "number": (96, 99),
        "capital": (97, 99),
        "country": (97, 99),
        "month": (97, 99),
    },
}
RANK_METHODS = ("inverse_rank", "coefficient_inverse_rank")


# ----------------------------------------------------------------------------------------------
# Rank-based methods: one pass over the FFN neurons per distinct target
# ----------------------------------------------------------------------------------------------


def target_rank_table(
    model: Any,
    lens: Lens,
    targets: list[int],
    chunk_rows: int = 256,
    layers: list[int] | None = None,
    algorithm: str = "auto",
) -> dict[int, Int[Tensor, " n_neurons"]]:
    """Rank (1 = largest bs-value) of each target in the vocabulary projection of every FFN neuron's direction
    (row ``k`` of ``W_out`` of every layer, flattened layer-major: index ``l * d_mlp + k``).

    Neuron-level paper section 4.1, methods f and h. Under the ``frozen`` lens the projection is
    ``(centre(v) * gamma / scale) @ W_U`` with a positive per-prompt ``scale``, so the ranks do not depend on the
    prompt and one table serves every prompt with the same target. Streams ``chunk_rows x d_vocab`` logits.
    ``rank = 1 + #{w : z_w > z_t}``, counted without sorting the rows (``algorithm="buckets"``, the default): the
    ``T`` targets' bs-values of a row are sorted (``T`` values), every bs-value of the row is placed among them by
    binary search (``log2 T`` comparisons), the bucket sizes are counted and summed from the top: exactly the
    counts of strictly larger values, in ``O(d_vocab log T)`` per row instead of a full ``O(d_vocab log d_vocab)``
    sort (``algorithm="sort"``, the previous method, kept as the reference); with at most 4 distinct targets the
    counts are direct comparisons ``(z > z_t).sum()`` (``algorithm="compare"``); ``"auto"`` picks. Peak memory about
    ``chunk_rows * d_vocab * 12`` bytes. ``layers`` restricts the work to those layers (the other entries are left
    at 0, which no rank takes).

    Raises:
        InvalidInputError: a non-linear (``recomputed``) lens or an unknown ``algorithm``.
    """
    if not lens.linear:
        raise InvalidInputError("target_rank_table needs a linear lens (frozen or none)")
    if algorithm not in ("auto", "buckets", "sort", "compare"):
        raise InvalidInputError(f"algorithm {algorithm!r} is not 'auto', 'buckets', 'compare' or 'sort'")
    spec = tlm.model_spec(model)
    t = torch.tensor(sorted(set(int(x) for x in targets)), dtype=torch.long)
    n_t = len(t)
    if algorithm == "auto":
        algorithm = "compare" if n_t <= 4 else "buckets"
    out = torch.zeros(spec.n_layers * spec.d_mlp, n_t, dtype=torch.long)
    for layer in range(spec.n_layers) if layers is None else layers:
        W = tlm.W_out(model, layer)
        for s in range(0, spec.d_mlp, chunk_rows):
            z = lens.logits(W[s : s + chunk_rows]).contiguous()  # [rows, d_vocab]
            zt = z[:, t.to(z.device)].contiguous()
            rows = slice(layer * spec.d_mlp + s, layer * spec.d_mlp + s + z.shape[0])
            if algorithm == "sort":
                above = z.shape[1] - torch.searchsorted(torch.sort(z, dim=1).values, zt, right=True)
            elif algorithm == "compare":
                above = torch.stack([(z > zt[:, j : j + 1]).sum(1) for j in range(n_t)], dim=1)
            else:
                zs, order = torch.sort(zt, dim=1)  # the targets' values, ascending
                # bucket = #targets with value strictly below z_w (side="left"): z_w > zs[j]  <=>  bucket > j
                bucket = torch.searchsorted(zs, z, side="left")  # [rows, d_vocab] in 0..T
                n_rows = z.shape[0]
                flat = bucket + (n_t + 1) * torch.arange(n_rows, device=z.device)[:, None]
                hist = torch.bincount(flat.reshape(-1), minlength=n_rows * (n_t + 1)).reshape(n_rows, n_t + 1)
                above_sorted = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [rows, T]: #values above zs[j]
                above = torch.empty_like(above_sorted)
                above.scatter_(1, order, above_sorted)
            out[rows] = 1 + above.cpu()
    return {int(tok): out[:, j].clone() for j, tok in enumerate(t.tolist())}


class RankTable:
    """The ranks that methods f and h need, for every FFN neuron and every distinct target, without counting every
    rank: the same numbers as :func:`target_rank_table` wherever a selection can depend on them.

    Built in one pass over the FFN neurons (chunks of ``chunk_rows`` rows of ``W_out``, exactly the chunks and lens
    of :func:`target_rank_table`, so every bs-value is the same float): per row, the ``cap`` largest bs-values
    (:func:`torch.topk`) and, per target, ``rank = 1 + #{top values > z_t}``, exact when below ``cap + 1``
    (every value above ``z_t`` is then among the top ``cap``); else only ``rank > cap`` is known (stored as 0).
    :meth:`top_k` certifies each selection against those lower bounds (``1 / rank <= 1 / (cap + 1)``,
    ``|m| / rank <= |m| / (cap + 1)``) and computes the exact rank of any neuron that could still enter
    (:meth:`resolve`: its chunk again, counted in full), so selections equal the full table's.

    Cost: one ``[chunk_rows, d_model] x [d_model, d_vocab]`` product and one top-``cap`` per chunk; peak memory
    about ``chunk_rows * d_vocab * 4`` bytes for the bs-values plus ``chunk_rows * cap * 12`` bytes; the table is
    ``n_neurons * n_targets`` int32.

    Raises:
        InvalidInputError: a non-linear (``recomputed``) lens, or ``cap`` < 1.
    """

    def __init__(self, model: Any, lens: Lens, targets: list[int], cap: int = 4096, chunk_rows: int = 256) -> None:
        if not lens.linear:
            raise InvalidInputError("RankTable needs a linear lens (frozen or none)")
        if not isinstance(cap, int) or cap < 1:
            raise InvalidInputError(f"cap must be a positive integer, got {cap!r}")
        spec = tlm.model_spec(model)
        self.model, self.lens, self.chunk_rows = model, lens, chunk_rows
        self.d_mlp, self.n_layers = spec.d_mlp, spec.n_layers
        self.targets = sorted(set(int(x) for x in targets))
        self.column = {tok: j for j, tok in enumerate(self.targets)}
        self.cap = min(cap, spec.d_vocab)
        self.n_resolved = 0
        t = torch.tensor(self.targets, dtype=torch.long)
        self.ranks = torch.zeros(spec.n_layers * spec.d_mlp, len(t), dtype=torch.int32)
        for layer in range(spec.n_layers):
            W = tlm.W_out(model, layer)
            for s in range(0, spec.d_mlp, chunk_rows):
                z = lens.logits(W[s : s + chunk_rows]).contiguous()  # the chunk target_rank_table projects
                zt = z[:, t.to(z.device)].contiguous()
                top = torch.topk(z, self.cap, dim=1, sorted=True).values.flip(1).contiguous()  # ascending
                above = self.cap - torch.searchsorted(top, zt, right=True)  # #top values > z_t
                rank = torch.where(above < self.cap, 1 + above, torch.zeros_like(above))
                row0 = layer * spec.d_mlp + s
                self.ranks[row0 : row0 + z.shape[0]] = rank.to(torch.int32).cpu()

    def resolve(self, neurons: Tensor, target: int) -> None:
        """Exact ranks of ``target`` for the (flattened) ``neurons`` whose rank is only known to exceed ``cap``:
        their chunks projected again and counted in full."""
        j = self.column[target]
        todo = neurons[self.ranks[neurons, j] == 0]
        chunks = sorted({(int(i) // self.d_mlp, int(i) % self.d_mlp // self.chunk_rows) for i in todo})
        for layer, c in chunks:
            s = c * self.chunk_rows
            start = layer * self.d_mlp + s
            z = self.lens.logits(tlm.W_out(self.model, layer)[s : s + self.chunk_rows]).contiguous()
            rank = 1 + (z > z[:, target : target + 1]).sum(1)
            self.ranks[start : start + z.shape[0], j] = rank.to(torch.int32).cpu()
            self.n_resolved += z.shape[0]

    def top_k(self, coefficients: Float[Tensor, " n_neurons"], target: int, method: str, k: int) -> list[str]:
        """:func:`rank_method_top_k` with the full table's ranks: the same names in the same order."""
        if method not in RANK_METHODS:
            raise InvalidInputError(f"{method!r} is not a rank-based method ({', '.join(RANK_METHODS)})")
        j = self.column[target]
        mag = coefficients.double().abs().cpu() if method == "coefficient_inverse_rank" else None
        k = min(k, self.ranks.shape[0])
        while True:
            r = self.ranks[:, j]
            known = (r > 0).nonzero().squeeze(-1)
            rk = r[known].double()
            scores = 1.0 / rk if mag is None else mag[known] / rk
            picks = torch.argsort(scores, descending=True, stable=True)[:k]  # known is ascending: ties by index
            unknown = (r == 0).nonzero().squeeze(-1)
            if len(unknown) == 0:
                break
            bound = torch.full((len(unknown),), 1.0 / (self.cap + 1), dtype=torch.float64)
            if mag is not None:
                bound = mag[unknown] / float(self.cap + 1)
            if len(picks) < k:
                contenders = unknown  # too few known ranks: every unknown one could enter
            else:
                contenders = unknown[bound >= scores[picks[-1]]]  # ">=": an equal score with a lower index wins
            if len(contenders) == 0:
                break
            self.resolve(contenders, target)
        return [neuron_name(int(i) // self.d_mlp, int(i) % self.d_mlp) for i in known[picks]]


def rank_method_top_k(
    model: Any, coefficients: Float[Tensor, " n_neurons"], ranks: Int[Tensor, " n_neurons"], method: str, k: int
) -> list[str]:
    """Top-``k`` FFN neuron names by ``1 / rank`` (``inverse_rank``) or ``|m| / rank``
    (``coefficient_inverse_rank``); ties keep the lower (layer, neuron) index, as the registry's dense path."""
    spec = tlm.model_spec(model)
    if method == "inverse_rank":
        scores = 1.0 / ranks.double()
    elif method == "coefficient_inverse_rank":
        scores = coefficients.double().abs() / ranks.double()
    else:
        raise InvalidInputError(f"{method!r} is not a rank-based method ({', '.join(RANK_METHODS)})")
    picks = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
    return [neuron_name(i // spec.d_mlp, i % spec.d_mlp) for i in picks]


def ffn_coefficients(model: Any, cache: Any, position: int, batch: int) -> Float[Tensor, " n_neurons"]:
    """Every layer's ``mlp.hook_post`` at ``position``, flattened layer-major."""
    n = tlm.model_spec(model).n_layers
    return torch.cat([tlm.cached(cache, f"blocks.{l}.mlp.hook_post", batch)[position] for l in range(n)])


def random_attention_neurons(model: Any, count: int, n_src: int, seed: int) -> list[str]:
    """``count`` distinct random attention neurons ``L{l}.H{h}.d{d}.p{p}`` with ``p < n_src`` (seeded)."""
    spec = tlm.model_spec(model)
    per_layer = spec.n_heads * spec.d_head * n_src
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(spec.n_layers * per_layer, generator=gen)[:count].tolist()
    out = []
    for i in picks:
        l, r = divmod(i, per_layer)
        h, r = divmod(r, spec.d_head * n_src)
        d, p = divmod(r, n_src)
        out.append(f"L{l}.H{h}.d{d}.p{p}")
    return out


# ----------------------------------------------------------------------------------------------
# Methods a-e, g for one prompt: one set of groups, exact scores shared by a, b and c
# ----------------------------------------------------------------------------------------------

#: The pruned methods whose exact scores come from the same vocabulary projection ``lens.logits(m v)``.
SHARED_METHODS = ("log_prob_increase", "log_prob", "prob_increase")
#: Relative slack of method c's stopping test (see :class:`FfnSelector`).
PROB_TOL = 2e-5


class FfnSelector:
    """The top-k FFN neurons of one prompt (one :class:`~tl_residual.scorers.ScoringContext`) for the neuron-level
    paper's methods a-e and g, with exactly the parts, scores and order of
    :func:`~tl_residual.scorers.score_ffn_neurons` (``top_k=k``): best first, ties by the lower (layer, neuron)
    index.

    * ``log_prob_increase``, ``log_prob``, ``prob_increase`` (a, b, c): the certified pruned search
      (:func:`~tl_residual.topk.certified_top_k`, each method's registered bound), with one exact-score table
      shared by the three methods: a candidate's ``lens.logits(m v)`` is computed once per prompt and gives all
      three scores with the registry's formulas (``log_softmax(z_x + z_v)[t] - log p(t | x)``,
      ``log_softmax(z_v)[t]``, ``softmax(z_x + z_v)[t] - p(t | x)``). Method c's stopping slack is relative,
      ``PROB_TOL * max_l p(t | x_l)`` (probability units) instead of the library's absolute ``1e-5``: where the
      300th best probability increase is below ``1e-5`` (a target the FFN neurons barely raise), the absolute
      slack made the search score every neuron (46,080 rows against ``W_U``). The slack only guards the
      comparison of float32 exact scores with float64 bounds against rounding: the library's ``1e-5`` nats on
      ``Imp`` (method a) is a relative ``1e-5`` on ``p(t | x + m v) = p0 * exp(Imp)``, and
      ``2e-5 * max_l p0 >= 1e-5 * (p0 + c)`` for every candidate whose bound ``c <= max_l p0``, so c keeps at
      least a's margin for probabilities up to ``2 max_l p0``.
    * ``norm``, ``coefficient``, ``coefficient_norm`` (d, e, g): the registry's scorer per layer, one stable sort
      instead of a table per layer.

    Other methods, a lens without certified bounds (soft-capping) or a non-linear lens: the library's
    :func:`~tl_residual.scorers.score_ffn_neurons`.

    Memory: the groups are views of ``W_out``; one ``float64`` score per neuron and method; exact scoring
    ``3 * chunk_size * d_vocab`` floats at a time.
    """

    def __init__(self, ctx: ScoringContext) -> None:
        self.ctx = ctx
        m, c = ctx.model, ctx.cache
        groups = [g for layer in range(ctx.n_layers) for g in ffn_neuron_groups(m, c, layer, ctx.position, ctx.batch)]
        self.groups = [g for g in groups if len(g)]
        self.bases = [ctx.base_for(g) for g in self.groups]
        self.fast = ctx.lens.linear and ctx.lens.certifiable and bool(self.groups)
        self.primed = False
        self.owner, self.local = part_index(self.groups)
        n = int(self.owner.shape[0])
        self.exact = {name: torch.full((n,), float("nan"), dtype=torch.float64) for name in SHARED_METHODS}
        self.known = torch.zeros(n, dtype=torch.bool)
        self.n_exact = 0

    def name(self, i: int) -> str:
        return self.groups[int(self.owner[i])].names[int(self.local[i])]

    def _fill(self, idx: Tensor) -> None:
        """Exact a, b, c scores of the neurons ``idx`` not scored yet."""
        ctx, t = self.ctx, self.ctx.target
        missing = idx[~self.known[idx]]
        if len(missing) == 0:
            return
        rows = missing
        group, base = gather_parts(self.groups, self.bases, self.owner, self.local, rows)
        for s in range(0, len(rows), ctx.chunk_size):
            sl = slice(s, s + ctx.chunk_size)
            bl = ctx.base_logits(base[sl])
            zv = ctx.lens.logits(group.vectors[sl].float())
            z = bl + zv
            out = rows[sl]
            # the registry's formulas (scorers._log_prob_increase, _log_prob, _prob_increase), row by row
            self.exact["log_prob_increase"][out] = (
                (torch.log_softmax(z, dim=-1)[:, t] - torch.log_softmax(bl, -1)[..., t]).double().cpu()
            )
            self.exact["log_prob"][out] = torch.log_softmax(zv, -1)[:, t].double().cpu()
            self.exact["prob_increase"][out] = (
                (torch.softmax(z, -1)[:, t] - torch.softmax(bl, -1)[..., t]).double().cpu()
            )
        self.known[rows] = True
        self.n_exact += len(rows)

    def _pruned(self, method: str, k: int) -> list[str]:
        ctx = self.ctx
        if not self.primed:  # the stack the library's pruned search primes first: the same base logits
            ctx.prime(torch.stack([*self.bases, torch.zeros_like(self.bases[0])]))
            self.primed = True
        bound = get_scorer(method).bound
        assert bound is not None
        bounds = torch.cat([bound(ctx, g, b).double().cpu() for g, b in zip(self.groups, self.bases)])
        tol = 1e-5
        if method == "prob_increase":
            p0 = max(float(ctx.base_probes(b).base_log_prob.exp()) for b in self.bases)
            tol = PROB_TOL * p0

        def exact(idx: Tensor) -> Tensor:
            self._fill(idx)
            return self.exact[method][idx]

        res = certified_top_k(bounds, exact, min(k, len(bounds)), chunk_size=ctx.chunk_size, tol=tol)
        return [self.name(int(i)) for i in res.indices]

    def _dense(self, method: str, k: int) -> list[str]:
        scorer = get_scorer(method)
        raw = torch.cat([scorer(self.ctx, g, b).cpu() for g, b in zip(self.groups, self.bases)])
        # score_groups' dense path: per layer by raw score (stable), then all rows by float32 score (stable)
        by_raw = torch.argsort(raw, descending=True, stable=True)
        by_layer = by_raw[torch.argsort(self.owner[by_raw], stable=True)]
        order = by_layer[torch.argsort(raw[by_layer].float(), descending=True, stable=True)]
        return [self.name(int(i)) for i in order[:k]]

    def top_k(self, method: str, k: int) -> list[str]:
        """The names of the top-``k`` FFN neurons by ``method``, best first."""
        if self.fast and method in SHARED_METHODS:
            return self._pruned(method, k)
        if method in ("norm", "coefficient", "coefficient_norm"):
            return self._dense(method, k)
        return score_ffn_neurons(self.ctx, method, top_k=k, n_top_tokens=0)["name"].tolist()


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchmarkResult:
    """Per-prompt records (one per prompt x method x k), the selected component names (one per prompt x method,
    the longest list: the top-k for smaller k are its prefixes) and timings."""

    records: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    selections: list[dict[str, Any]] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.records)


def _add(res: BenchmarkResult, key: str, t0: tuple[float, float]) -> tuple[float, float]:
    """Add the wall-clock and CPU (``time.process_time``, every thread) seconds since ``t0`` to stage ``key``."""
    now = (time.perf_counter(), time.process_time())
    res.timings[key] = res.timings.get(key, 0.0) + now[0] - t0[0]
    cpu = res.info.setdefault("cpu_s", {})
    cpu[key] = cpu.get(key, 0.0) + now[1] - t0[1]
    return now


def run_benchmark(
    model: Any,
    prompts: pd.DataFrame,
    methods: tuple[str, ...] = PAPER_METHODS,
    ks: tuple[int, ...] = (10, 100, 300),
    attention: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    checkpoint: Any = None,
    intervention_rows: int = 64,
    rank_cap: int | None = None,
) -> BenchmarkResult:
    """Score, select, intervene and measure for every prompt of ``prompts`` (columns ``type``, ``prompt``,
    ``answer_id``: the filtered dataset).

    Interventions run as rows of batches of ``intervention_rows`` (each row one prompt with one method's
    components). Records: ``prompt_index``, ``type``, ``method`` (a registry name, ``random``, ``none``, or
    ``appendix_c`` / ``appendix_c_random``), ``k`` (neurons zeroed), ``rank``, ``prob``, ``logp`` (after), and the
    same before.

    Exactly the selections of the reference computations (:func:`~tl_residual.scorers.score_ffn_neurons` per
    method, :func:`target_rank_table` with :func:`rank_method_top_k`), faster: :class:`FfnSelector` per prompt
    (methods a-e, g). Methods f and h use the full :func:`target_rank_table`, or with ``rank_cap`` a
    :class:`RankTable` (ranks counted up to the cap, selections certified; on SmolLM2 method h then needs the
    exact rank of 600-1,200 large-``|m|`` neurons per prompt beyond rank 4,096, so the full table is the default).
    ``res.info["n_exact"]`` and ``res.info["rank_resolved"]`` count the exact scores and re-counted rank rows.
    """
    from tqdm.auto import tqdm

    res = BenchmarkResult()
    kmax = max(ks)
    t0 = (time.perf_counter(), time.process_time())
    rank_table: RankTable | None = None
    full_ranks: dict[int, Tensor] = {}
    if any(m in RANK_METHODS for m in methods):
        first = I.tokenize_batch(model, [prompts.iloc[0]["prompt"]])
        with torch.no_grad():
            _, cache0 = model.run_with_cache(first.tokens)
        lens = Lens(model, cache0, -1, 0, "frozen")
        if rank_cap is None:
            full_ranks = target_rank_table(model, lens, prompts["answer_id"].astype(int).tolist())
        else:
            rank_table = RankTable(model, lens, prompts["answer_id"].astype(int).tolist(), cap=rank_cap)
    t0 = _add(res, "rank_table", t0)
    bar = tqdm(total=len(prompts), desc="faithfulness", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        rows = prompts.iloc[start : start + batch_size]
        batch = I.tokenize_batch(model, rows["prompt"].tolist(), "right")
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens)
        last = batch.last_index
        before = logits[torch.arange(len(batch)), last].float()
        targets = torch.tensor(rows["answer_id"].astype(int).tolist())
        r0, p0, lp0 = I.target_metrics(before, targets)
        t0 = _add(res, "forward_cache", t0)
        picks: dict[str, list[list[str]]] = {m: [] for m in (*methods, RANDOM)}
        appendix: dict[str, list[list[str]]] = {"appendix_c": [], "appendix_c_random": []}
        for b in range(len(batch)):
            idx = start + b
            ctx = make_context(model, cache, int(targets[b]), int(last[b]), b, "frozen")
            selector = FfnSelector(ctx)
            coefs = None
            for m in methods:
                if m in RANK_METHODS:
                    if coefs is None:
                        coefs = ffn_coefficients(model, cache, int(last[b]), b)
                    if rank_table is not None:
                        picks[m].append(rank_table.top_k(coefs, int(targets[b]), m, kmax))
                    else:
                        picks[m].append(rank_method_top_k(model, coefs, full_ranks[int(targets[b])], m, kmax))
                else:
                    picks[m].append(selector.top_k(m, kmax))
                t0 = _add(res, f"score_{m}", t0)
            res.info["n_exact"] = res.info.get("n_exact", 0) + selector.n_exact
            if rank_table is not None:
                res.info["rank_resolved"] = rank_table.n_resolved
            picks[RANDOM].append(I.random_components(model, kmax, seed=seed * 1_000_003 + idx))
            if attention:
                att = score_attention_neurons(ctx, "log_prob_increase", top_k=200, n_top_tokens=0)["name"].tolist()
                ffn = (
                    picks["log_prob_increase"][-1]
                    if "log_prob_increase" in methods
                    else score_ffn_neurons(ctx, "log_prob_increase", top_k=100, n_top_tokens=0)["name"].tolist()
                )
                appendix["appendix_c"].append(att + ffn[:100])
                appendix["appendix_c_random"].append(
                    random_attention_neurons(model, 200, int(batch.lengths[b]), seed * 1_000_003 + idx)
                    + I.random_components(model, 100, seed=seed * 1_000_003 + idx + 500_000)
                )
                t0 = _add(res, "score_appendix_c", t0)

        def record(
            method: str,
            k: int,
            logits_after: Tensor,
            targets: Tensor = targets,
            batch: Any = batch,
            start: int = start,
            rows: pd.DataFrame = rows,
            r0: Tensor = r0,
            p0: Tensor = p0,
            lp0: Tensor = lp0,
        ) -> None:
            r1, p1, lp1 = I.target_metrics(logits_after, targets)
            for b in range(len(batch)):
                res.records.append(
                    {
                        "prompt_index": start + b,
                        "type": rows.iloc[b]["type"],
                        "prompt": rows.iloc[b]["prompt"],
                        "method": method,
                        "k": k,
                        "rank_before": int(r0[b]),
                        "prob_before": float(p0[b]),
                        "logp_before": float(lp0[b]),
                        "rank": int(r1[b]),
                        "prob": float(p1[b]),
                        "logp": float(lp1[b]),
                    }
                )

        for m, lists in (*picks.items(), *appendix.items()):
            for b, comps in enumerate(lists):
                res.selections.append(
                    {"prompt_index": start + b, "type": rows.iloc[b]["type"], "method": m, "components": list(comps)}
                )
        record("none", 0, before)
        # Every (method, k, prompt) intervention as one row of a large batch: few forward passes.
        jobs = [(m, k, [names[:k] for names in lists]) for m, lists in picks.items() for k in ks]
        if attention:
            jobs += [(m, 300, lists) for m, lists in appendix.items()]
        rows_b = [b for _ in jobs for b in range(len(batch))]
        rows_c = [I.parse_components(model, names) for _, _, lists in jobs for names in lists]
        outs = []
        for s in range(0, len(rows_b), intervention_rows):
            sub = batch.select(rows_b[s : s + intervention_rows])
            hooks = I.intervention_hooks(model, rows_c[s : s + intervention_rows], sub)
            outs.append(I.last_token_logits(model, sub, hooks))
        after = torch.cat(outs)
        for j, (m, k, _) in enumerate(jobs):
            record(m, k, after[j * len(batch) : (j + 1) * len(batch)])
        t0 = _add(res, "interventions", t0)
        del cache
        bar.update(len(batch))
        if checkpoint is not None:
            checkpoint(res)
    bar.close()
    return res


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def summarise(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """MRR, mean probability (%) and mean log-probability after the intervention, grouped by ``by``."""
    g = df.assign(rr=1.0 / df["rank"], rr0=1.0 / df["rank_before"]).groupby(by, sort=False)
    out = g.agg(
        n=("rr", "size"),
        mrr=("rr", "mean"),
        prob_pct=("prob", "mean"),
        logp=("logp", "mean"),
        mrr_before=("rr0", "mean"),
        prob_before_pct=("prob_before", "mean"),
    ).reset_index()
    out["prob_pct"] *= 100
    out["prob_before_pct"] *= 100
    out["mrr_decrease_pct"] = 100 * (1 - out["mrr"] / out["mrr_before"])
    out["prob_decrease_pct"] = 100 * (1 - out["prob_pct"] / out["prob_before_pct"])
    return out


def markdown(res: BenchmarkResult) -> str:
    """The results as markdown tables (Table 2 beside the paper; top-k; per type; Appendix C)."""
    df = res.frame()
    info = res.info
    lines = [f"# Faithfulness benchmark: {info.get('model', '?')}", ""]
    n_done = int((df["method"] == "none").sum()) if len(df) else 0
    head = (
        f"Prompts run: {n_done} (a seeded random sample) of the {info.get('n_prompts')} prompts that survive the "
        f"filter out of {info.get('n_dataset')}"
        if n_done != info.get("n_prompts")
        else f"Prompts: {info.get('n_prompts')} of {info.get('n_dataset')} survive the filter"
    )
    lines.append(
        f"{head} ({', '.join(f'{k} {v}' for k, v in info.get('survivors', {}).items())}). "
        f"Runtime {info.get('runtime_s', 0):.0f} s on this machine"
        f"{'' if info.get('complete', True) else ' (INCOMPLETE: partial run)'}."
    )
    lines += [
        "",
        "## Table 2: zero the top-10 FFN neurons of each method",
        "",
        "| method | SmolLM2 MRR | prob % | logp | GPT2-large MRR | prob % | logp | Llama-7B MRR | prob % | logp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    s = summarise(df, ["method", "k"]).set_index(["method", "k"])
    order = ["none", *[m for m in LABELS if m not in ("none", RANDOM)], RANDOM]
    for m in order:
        key = (m, 0 if m == "none" else 10)
        if key not in s.index:
            continue
        r = s.loc[key]
        g, l = PAPER_TABLE2.get(m, (("", "", ""), ("", "", "")))
        lines.append(
            f"| {LABELS[m]} | {r.mrr:.3f} | {r.prob_pct:.1f} | {r.logp:.2f} | "
            + " | ".join(str(x) for x in (*g, *l))
            + " |"
        )
    ks = sorted(k for k in df["k"].unique() if k > 0 and k in set(df[df.method == "log_prob_increase"]["k"]))
    lines += [
        "",
        "## Top-k: MRR / prob % / logp after zeroing the top-k FFN neurons",
        "",
        "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for m in order[1:]:
        cells = []
        for k in ks:
            if (m, k) in s.index:
                r = s.loc[(m, k)]
                cells.append(f"{r.mrr:.3f} / {r.prob_pct:.1f} / {r.logp:.2f}")
            else:
                cells.append("")
        if any(cells):
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    types = [t for t in KNOWLEDGE_TYPES if t in set(df["type"])]
    st = summarise(df[df.k.isin([0, 10])], ["method", "type"]).set_index(["method", "type"])
    counts = df[df.method == "none"].groupby("type").size()
    lines += [
        "",
        "## Per knowledge type: MRR after zeroing the top-10 FFN neurons (prob % in brackets)",
        "",
        "| method | " + " | ".join(f"{t} (n={int(counts.get(t, 0))})" for t in types) + " |",
        "|---|" + "---|" * len(types),
    ]
    for m in order:
        cells = [
            f"{st.loc[(m, t)].mrr:.3f} ({st.loc[(m, t)].prob_pct:.1f})" if (m, t) in st.index else "" for t in types
        ]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    if "appendix_c" in set(df["method"]):
        sa = summarise(df[df.method.isin(["appendix_c", "appendix_c_random"])], ["method", "type"])
        sa_all = summarise(df[df.method.isin(["appendix_c", "appendix_c_random"])], ["method"]).set_index("method")
        sa = sa.set_index(["method", "type"])
        lines += [
            "",
            "## Appendix C: zero the top-200 attention neurons + top-100 FFN neurons "
            "(MRR decrease % / prob decrease %)",
            "",
            "| selection | all | " + " | ".join(types) + " |",
            "|---|---|" + "---|" * len(types),
        ]
        for m, label in (("appendix_c", "log-prob increase (SmolLM2)"), ("appendix_c_random", "random (SmolLM2)")):
            if m not in sa_all.index:
                continue
            cells = [
                f"{sa.loc[(m, t)].mrr_decrease_pct:.1f} / {sa.loc[(m, t)].prob_decrease_pct:.1f}"
                if (m, t) in sa.index
                else ""
                for t in types
            ]
            a = sa_all.loc[m]
            lines.append(
                f"| {label} | {a.mrr_decrease_pct:.1f} / {a.prob_decrease_pct:.1f} | " + " | ".join(cells) + " |"
            )
        for name, row in PAPER_TABLE13.items():
            lines.append(f"| paper, {name} | | " + " | ".join(f"{row[t][0]} / {row[t][1]}" for t in types) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res.timings.items()), ""]
    if info.get("cpu_s"):
        cpu = info["cpu_s"]
        lines += ["CPU time (s, all threads): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()), ""]
    return "\n".join(lines)


def _selection_frame(selections: list[dict[str, Any]]) -> pd.DataFrame:
    """The selections in long form: one row per prompt, method and selected component, ``rank`` from 1."""
    rows = [
        {"prompt_index": s["prompt_index"], "type": s["type"], "method": s["method"], "rank": r, "name": name}
        for s in selections
        for r, name in enumerate(s["components"], 1)
    ]
    return pd.DataFrame(rows, columns=["prompt_index", "type", "method", "rank", "name"])


def write(res: BenchmarkResult, out: str) -> None:
    """Write the run under the prefix ``out``, each file atomically:

    * ``{out}.md``: the tables (:func:`markdown`);
    * ``{out}.json``: run facts, timings, summaries, per-type summaries and the papers' numbers;
    * ``{out}.records.parquet``: one row per prompt x method x k (target rank, probability and log-probability
      before and after the intervention);
    * ``{out}.selections.parquet``: one row per prompt x method x selected component (``prompt_index``, ``type``,
      ``method``, ``rank`` from 1, ``name``): the longest list, whose prefixes are the smaller k.

    :func:`read` loads them back.
    """
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    df = res.frame()
    payload = {
        "info": res.info,
        "timings_s": res.timings,
        "summary": summarise(df, ["method", "k"]).to_dict(orient="records") if len(df) else [],
        "per_type": summarise(df, ["method", "k", "type"]).to_dict(orient="records") if len(df) else [],
        "paper_table2": {m: {"GPT2-large": g, "Llama-7B": l} for m, (g, l) in PAPER_TABLE2.items()},
        "paper_table13": PAPER_TABLE13,
    }
    atomic_write(out + ".records.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    sel = _selection_frame(res.selections)
    atomic_write(out + ".selections.parquet", lambda tmp: sel.to_parquet(tmp, index=False))
    atomic_write_text(out + ".json", json.dumps(payload, indent=1))
    if len(df):
        atomic_write_text(out + ".md", markdown(res))


def read(out: str) -> BenchmarkResult:
    """The run :func:`write` wrote under the prefix ``out`` (records, timings, run facts and selections).

    Raises:
        InvalidInputError: ``{out}.json`` or one of the Parquet files is missing.
    """
    paths = [out + ".json", out + ".records.parquet", out + ".selections.parquet"]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise InvalidInputError(f"no faithfulness run under {out!r}: missing {', '.join(missing)}")
    with open(paths[0], encoding="utf-8") as f:
        saved = json.load(f)
    records = pd.read_parquet(paths[1]).to_dict(orient="records")
    sel = pd.read_parquet(paths[2])  # written in selection order, ranks ascending
    selections = [
        {"prompt_index": int(i), "type": g["type"].iloc[0], "method": m, "components": g["name"].tolist()}
        for (i, m), g in sel.groupby(["prompt_index", "method"], sort=False)
    ]
    return BenchmarkResult(records, saved["timings_s"], saved["info"], selections)


# ----------------------------------------------------------------------------------------------
# Input: the dataset runner's formats
# ----------------------------------------------------------------------------------------------

BUILTIN = "builtin:factual"


def read_prompts(model: Any, data: str = BUILTIN, paper_filter: bool | None = None, seed: int = 0) -> pd.DataFrame:
    """The benchmark's prompts: columns ``type``, ``prompt``, ``answer``, ``answer_id``, in a seeded random order
    (so a partial run is a random sample of every type).

    Args:
        data: ``builtin:factual`` (the shipped prompts), or a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file
            with a ``prompt`` column, the answer as ``answer`` or ``target`` (a one-token string, with its
            leading space) or ``target_id``/``answer_id``, and optionally ``type`` or ``group``.
        paper_filter: apply the neuron-level paper's filter (:func:`tl_residual.datasets.filter_prompts`;
            default: only for the built-in prompts, whose types have candidate lists). Without it, every prompt
            whose answer is one token is kept.

    Returns:
        The kept prompts; ``df.attrs`` holds ``n_dataset`` and ``survivors`` (per type).

    Raises:
        InvalidInputError: an unreadable file or format, missing columns, an answer that is not one token.
    """
    from tl_residual.datasets import filter_prompts, load_factual_prompts

    if data == BUILTIN:
        raw = load_factual_prompts()
        paper_filter = True if paper_filter is None else paper_filter
    else:
        if not os.path.isfile(data):
            raise InvalidInputError(
                f"--data {data!r}: no such file (give a .jsonl, .csv or .parquet file, or {BUILTIN})"
            )
        ext = os.path.splitext(data)[1].lower()
        try:
            if ext in (".jsonl", ".json"):
                raw = pd.read_json(data, lines=ext == ".jsonl")
            elif ext == ".csv":
                raw = pd.read_csv(data)
            elif ext in (".parquet", ".pq"):
                raw = pd.read_parquet(data)
            else:
                raise InvalidInputError(f"--data {data!r}: unknown format {ext!r}; use .jsonl, .json, .csv or .parquet")
        except InvalidInputError:
            raise
        except Exception as exc:
            raise InvalidInputError(f"--data {data!r}: cannot read it ({exc})") from exc
        raw = raw.rename(columns={"group": "type", "target": "answer", "target_id": "answer_id"})
        if "prompt" not in raw.columns or not ({"answer", "answer_id"} & set(raw.columns)):
            raise InvalidInputError(
                f"--data {data!r} needs a 'prompt' column and an 'answer'/'target' (string) or "
                f"'target_id' column; it has {list(raw.columns)}"
            )
        if "type" not in raw.columns:
            raw["type"] = "all"
        raw["type"] = raw["type"].fillna("all").astype(str)
        paper_filter = False if paper_filter is None else paper_filter
    n_dataset = len(raw)
    if paper_filter:
        filtered = filter_prompts(model, raw)
        kept = filtered[filtered["keep"]]
        survivors = filtered.attrs["survivors"]
    else:
        if "answer_id" not in raw.columns:
            tok = model.tokenizer
            ids = [tok.encode(str(a), add_special_tokens=False) for a in raw["answer"]]
            bad = [str(a) for a, i in zip(raw["answer"], ids) if len(i) != 1]
            if bad:
                raise InvalidInputError(
                    f"{len(bad)} answers are not one token of the model's tokenizer, e.g. "
                    f"{bad[0]!r} (give the leading space: ' Paris'), or pass target_id"
                )
            raw = raw.assign(answer_id=[i[0] for i in ids])
        kept = raw
        survivors = {**{str(k): int(v) for k, v in kept.groupby("type").size().items()}, "total": len(kept)}
    if "answer" not in kept.columns:
        kept = kept.assign(answer=[model.tokenizer.decode([int(i)]) for i in kept["answer_id"]])
    out = kept.sample(frac=1.0, random_state=seed).reset_index(drop=True)[["type", "prompt", "answer", "answer_id"]]
    out.attrs.update(n_dataset=n_dataset, survivors=survivors)
    return out


def run(
    model: Any,
    data: str = BUILTIN,
    out: str | None = None,
    max_prompts: int | None = None,
    methods: tuple[str, ...] = PAPER_METHODS,
    ks: tuple[int, ...] = (10, 100, 300),
    attention: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    paper_filter: bool | None = None,
    model_name: str = "?",
) -> BenchmarkResult:
    """Read the prompts (:func:`read_prompts`), run :func:`run_benchmark` and, with ``out``, write the files of
    :func:`write` under that prefix (summaries, records, the selected names per prompt and method, the tables),
    checkpointed after every batch.

    Raises:
        InvalidInputError: bad data (see :func:`read_prompts`), ``ks`` or ``methods``.
    """
    from tl_residual.scorers import SCORERS

    bad = [m for m in methods if m not in SCORERS]
    if bad:
        raise InvalidInputError(f"unknown method(s) {', '.join(bad)}; methods are {', '.join(SCORERS)}")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise InvalidInputError(f"ks must be positive integers, got {ks!r}")
    t_start, c_start = time.perf_counter(), time.process_time()
    kept = read_prompts(model, data, paper_filter, seed)
    filter_s = (time.perf_counter() - t_start, time.process_time() - c_start)
    if max_prompts is not None:
        kept = kept.head(max_prompts)
    if len(kept) == 0:
        raise InvalidInputError(f"no prompt of {data!r} survives (survivors: {kept.attrs.get('survivors')})")
    info = {
        "model": model_name,
        "data": data,
        "n_dataset": kept.attrs["n_dataset"],
        "survivors": kept.attrs["survivors"],
        "n_prompts": len(kept),
        "ks": ",".join(map(str, ks)),
        "seed": seed,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "read_prompts_s": filter_s[0],
        "read_prompts_cpu_s": filter_s[1],
    }

    def checkpoint(res: BenchmarkResult) -> None:
        res.info = {
            **res.info,
            **info,
            "complete": False,
            "runtime_s": time.perf_counter() - t_start,
            "cpu_total_s": time.process_time() - c_start,
        }
        if out is not None:
            write(res, out)

    res = run_benchmark(model, kept, tuple(methods), tuple(ks), attention, batch_size, seed, progress, checkpoint)
    res.info = {
        **res.info,
        **info,
        "complete": True,
        "runtime_s": time.perf_counter() - t_start,
        "cpu_total_s": time.process_time() - c_start,
    }
    if out is not None:
        write(res, out)
    return res
