"""Certified top-k: the bounds hold for every part, and the pruned search returns exactly the dense top-k.

References are written here from the weights and the cache (not through the library's lens or scorers):
``_ref_logits`` implements the three lens conventions, ``_ref_scores`` methods a, b and c of the neuron-level
paper by scoring every part densely, in float64, without the linearity shortcut.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENS, VARIANTS, _variant, run_cache
from tl_residual import decompose as D
from tl_residual import scorers as S
from tl_residual import topk as K
from tl_residual.decompose import PartGroup
from tl_residual.errors import DecompositionError, UnsupportedArchitectureError

METHODS = ("log_prob_increase", "log_prob", "prob_increase")
#: A representative subset of conftest.VARIANTS (LayerNorm unfolded and folded, RMSNorm with GQA, both APIs),
#: to keep this file's run time small; absent APIs skip.
SUBSET = ("hooked-gpt2", "hooked-llama-gqa", "bridge-gpt2", "bridge-gpt2-compat-nofoldln", "bridge-llama-gqa")
assert set(SUBSET) <= {name for name, _ in VARIANTS}


@pytest.fixture(params=SUBSET)
def model(request):
    return _variant(request.param)


CONVENTIONS = ("frozen", "recomputed", "none")
TOL = 1e-5


def _final_norm(model):
    ln = model.ln_final
    d = model.cfg.d_model
    w = next((getattr(ln, a) for a in ("w", "weight") if isinstance(getattr(ln, a, None), torch.Tensor)), None)
    b = next((getattr(ln, a) for a in ("b", "bias") if isinstance(getattr(ln, a, None), torch.Tensor)), None)
    w = torch.ones(d) if w is None else w.detach().double()
    if getattr(model.cfg, "rmsnorm_uses_offset", False):
        w = w + 1
    b = torch.zeros(d) if b is None else b.detach().double()
    return w.double(), b.double()


def _ref_logits(model, cache, convention, y, pos, batch=0):
    """Independent vocabulary projection of ``y`` ([..., d_model]) in float64."""
    y = y.double()
    W_U = model.W_U.detach().double()
    centre = model.cfg.normalization_type in ("LN", "LNPre")
    gamma, beta = _final_norm(model)
    if convention == "none":
        return y @ W_U
    if centre:
        y = y - y.mean(-1, keepdim=True)
    if convention == "frozen":
        scale = cache["ln_final.hook_scale"][batch, pos].double().squeeze()
        return (y / scale * gamma) @ W_U
    b_U = getattr(model, "b_U", None)
    b_U = torch.zeros(W_U.shape[1]) if not isinstance(b_U, torch.Tensor) else b_U.detach()
    eps = float(getattr(model.cfg, "eps", 1e-5))
    y = y / (y.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gamma + beta
    return y @ W_U + b_U.double()


def _ref_scores(model, cache, convention, method, base, vectors, target, pos, batch=0):
    """Methods a, b, c for each row of ``vectors`` added to ``base`` (float64, dense)."""
    if method == "log_prob":
        return torch.log_softmax(_ref_logits(model, cache, convention, vectors, pos, batch), -1)[:, target]
    lp0 = torch.log_softmax(_ref_logits(model, cache, convention, base, pos, batch), -1)[target]
    lp = torch.log_softmax(_ref_logits(model, cache, convention, base.double() + vectors.double(), pos, batch), -1)[
        :, target
    ]
    return lp - lp0 if method == "log_prob_increase" else lp.exp() - lp0.exp()


def _groups_with_bases(model, cache, pos, batch=0):
    """Every FFN-neuron, head x position subvalue and attention-neuron group, with its base residual."""
    out = []
    for l in range(model.cfg.n_layers):
        pre = cache[f"blocks.{l}.hook_resid_pre"][batch, pos].float()
        mid = cache[f"blocks.{l}.hook_resid_mid"][batch, pos].float()
        out.append((D.attention_parts(model, cache, l, pos, batch)[0], pre))
        out.append((D.attention_neuron_parts(model, cache, l, pos, batch), pre))
        out.append((D.ffn_parts(model, cache, l, pos, batch)[0], mid))
    return out


def _ref_top(model, cache, convention, method, groups, target, pos, k, batch=0):
    names, scores = [], []
    for g, base in groups:
        scores.append(_ref_scores(model, cache, convention, method, base, g.vectors, target, pos, batch))
        names += g.names
    scores = torch.cat(scores)
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return [names[i] for i in order.tolist()], scores[order], scores


def _assert_same_top(df, ref_names, ref_scores, all_scores, atol=TOL):
    """Same scores; same names, except that parts tied (within ``atol``) at the k-th score may swap."""
    got = torch.tensor(df["score"].to_numpy(), dtype=torch.float64)
    assert len(got) == len(ref_names)
    torch.testing.assert_close(got, ref_scores, rtol=1e-4, atol=atol)
    if len(ref_names) == 0:
        return
    kth = float(ref_scores[-1])
    n_ties_all = int(((all_scores - kth).abs() <= atol).sum())
    strict = [n for n, s in zip(ref_names, ref_scores.tolist()) if s > kth + atol]
    got_names = list(df["name"])
    assert set(strict) <= set(got_names)
    if n_ties_all == int(((ref_scores - kth).abs() <= atol).sum()):  # no tie straddles the cut
        assert set(got_names) == set(ref_names)


# ---------------------------------------------------------------------------------------------- bounds


def test_bounds_hold_for_every_part(model):
    """bound >= exact for every FFN neuron, subvalue and attention neuron, methods a/b/c, every lens."""
    _, cache = run_cache(model)
    pos = TOKENS.shape[1] - 1
    groups = _groups_with_bases(model, cache, pos)
    for convention in CONVENTIONS:
        ctx = S.make_context(model, cache, target=7, convention=convention)
        for (g, base), method in ((gb, m) for gb in groups for m in METHODS):
            bound = S.get_scorer(method).bound(ctx, g, base)
            exact = _ref_scores(model, cache, convention, method, base, g.vectors, 7, pos)
            slack = TOL * (1 + exact.abs())
            assert bool((bound + slack >= exact).all()), (method, g.kind, g.layer, float((exact - bound).max()))


def test_bound_is_exact_with_the_whole_vocabulary_in_the_head(model):
    """With every token in the head there is no tail and no Jensen step: bound (1) equals Imp exactly."""
    _, cache = run_cache(model)
    pos = TOKENS.shape[1] - 1
    for convention in ("frozen", "recomputed"):
        ctx = S.make_context(model, cache, target=3, convention=convention)
        ctx.n_head = model.cfg.d_vocab
        for g, base in _groups_with_bases(model, cache, pos)[:3]:
            bound = S.log_prob_increase_bound(ctx, g, base)
            exact = _ref_scores(model, cache, convention, "log_prob_increase", base, g.vectors, 3, pos)
            torch.testing.assert_close(bound, exact, rtol=1e-4, atol=1e-5)


def test_plain_jensen_is_looser_than_head_tail():
    """Bound (1) with only the target in the head is tighter than Jensen's ``u . (W_U[:, t] - W_U p)``; a larger
    head tightens it further, down to equality with the whole vocabulary."""
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(16, 50, generator=g, dtype=torch.float64)
    base_logits = 3 * torch.randn(1, 50, generator=g, dtype=torch.float64)
    u = torch.randn(200, 16, generator=g, dtype=torch.float64)
    exact = torch.log_softmax(base_logits + u @ W_U, -1)[:, 5] - torch.log_softmax(base_logits, -1)[0, 5]
    previous = None
    for h in (0, 1, 4, 16, 50):
        pr = K.bound_probes(W_U, base_logits, 5, n_head=h)
        b = K.head_tail_bound(u @ pr.probes[0], pr.log_weights[0])
        assert bool((b >= exact - 1e-10).all())
        if h == 0:
            assert bool((b <= u @ K.jensen_direction(W_U, base_logits[0], 5) + 1e-10).all())
        else:
            assert bool((b <= previous + 1e-10).all())
        previous = b
    torch.testing.assert_close(previous, exact)


# ---------------------------------------------------------------------------------------------- pruned == dense


def test_pruned_equals_dense_on_random_models(model):
    _, cache = run_cache(model)
    pos = TOKENS.shape[1] - 1
    groups = _groups_with_bases(model, cache, pos)
    n = sum(len(g) for g, _ in groups)
    for method, convention, ks in (
        ("log_prob_increase", "frozen", (1, 7, 50, n - 3, n + 10)),
        ("log_prob_increase", "recomputed", (1, 50)),
        ("log_prob", "frozen", (1, 50)),
        ("log_prob", "recomputed", (7,)),
        ("prob_increase", "frozen", (1, 50)),
        ("prob_increase", "recomputed", (7,)),
    ):
        ctx = S.make_context(model, cache, target=9, convention=convention, chunk_size=64)
        ref_names, ref_scores, all_scores = _ref_top(model, cache, convention, method, groups, 9, pos, n)
        for k in ks:
            df = S.score_groups(ctx, [g for g, _ in groups], method, top_k=k, n_top_tokens=0)
            assert df.attrs["n_candidates"] == n and df.attrs["n_scored"] <= n
            _assert_same_top(df, ref_names[:k], ref_scores[:k], all_scores)


def test_ties_from_duplicated_parts(model):
    """Duplicated neurons tie exactly; the pruned search still returns the dense top-k (lower index first)."""
    _, cache = run_cache(model)
    pos = TOKENS.shape[1] - 1
    ctx = S.make_context(model, cache, chunk_size=8)
    ffn = D.ffn_parts(model, cache, model.cfg.n_layers - 1, pos)[0]
    dup = PartGroup(
        "ffn_neuron",
        ffn.layer,
        torch.cat([ffn.coefficients] * 3),
        torch.cat([ffn.directions] * 3),
        {"neuron": torch.arange(3 * len(ffn))},
        [f"{n}#{c}" for c in range(3) for n in ffn.names],
    )
    dense = S.score_groups(ctx, [dup], top_k=None, n_top_tokens=0)
    for k in (1, 2, 3, 4, 5, 10, 3 * len(ffn)):
        pruned = S.score_groups(ctx, [dup], top_k=k, n_top_tokens=0)
        torch.testing.assert_close(
            torch.tensor(pruned["score"].to_numpy()),
            torch.tensor(dense["score"].head(k).to_numpy()),
            rtol=1e-5,
            atol=1e-6,
        )
        base = [n.split("#")[0] for n in pruned["name"]]
        assert set(base) == {n.split("#")[0] for n in dense["name"].head(k)}
        assert len(set(pruned["name"])) == k and all(base.count(b) <= 3 for b in base)
        # a tied triple is either wholly in or cut only at the k-th row
        full = [b for b in set(base) if base.count(b) < 3 and b != base[-1]]
        assert full == [], full


def test_certified_top_k_contract():
    g = torch.Generator().manual_seed(1)
    exact_all = torch.randn(1000, generator=g, dtype=torch.float64)
    bounds = exact_all + torch.rand(1000, generator=g, dtype=torch.float64)
    calls = []

    def exact(idx):
        calls.append(len(idx))
        return exact_all[idx]

    res = K.certified_top_k(bounds, exact, 10, chunk_size=32)
    ref = torch.argsort(exact_all, descending=True)[:10]
    assert res.indices.tolist() == ref.tolist()
    assert res.n_scored < 1000 and max(calls) <= 32
    assert K.certified_top_k(bounds, exact, 5000, chunk_size=64).indices.shape[0] == 1000
    assert K.certified_top_k(bounds[:0], exact, 3).n_scored == 0
    with pytest.raises(ValueError, match="one-dimensional"):
        K.certified_top_k(bounds[None], exact, 3)


# ---------------------------------------------------------------------------------------------- dtype


def test_bf16_cache_is_scored_in_float32(model):
    """A bfloat16 cache is scored in float32: the pruned top-k equals dense scoring of the same bf16 activations.
    The safety net accepts it at the bfloat16 tolerance, and refuses the same rounded numbers passed off as a
    float32 cache of a float32 model (they no longer sum to 1e-4)."""
    _, cache = run_cache(model)
    c16 = {k: v.to(torch.bfloat16) for k, v in cache.items()}
    c32 = {k: v.to(torch.bfloat16).float() for k, v in cache.items()}
    with pytest.raises((DecompositionError, UnsupportedArchitectureError)):
        S.make_context(model, c32, target=4)
    ctx16 = S.make_context(model, c16, target=4)
    a = S.score_ffn_neurons(ctx16, top_k=5, n_top_tokens=0)
    b = S.score_ffn_neurons(ctx16, top_k=5, n_top_tokens=0, pruned=False)
    assert list(a["name"]) == list(b["name"])
    torch.testing.assert_close(torch.tensor(a["score"].to_numpy()), torch.tensor(b["score"].to_numpy()))


# ---------------------------------------------------------------------------------------------- the real model


def test_smollm2_pruned_equals_dense(paris):
    """Top-10 and top-100 over FFN neurons of layers 24, 28, 29, layer 29's attention neurons and every head x
    position subvalue, against a dense reference written out here."""
    model, cache, tokens = paris
    pos = tokens.shape[1] - 1
    ctx = S.make_context(model, cache)
    assert ctx.lens.token_str(ctx.target) == " Paris"
    groups = [(D.ffn_parts(model, cache, l, pos)[0], cache[f"blocks.{l}.hook_resid_mid"][0, pos]) for l in (24, 28, 29)]
    groups += [
        (D.attention_parts(model, cache, l, pos)[0], cache[f"blocks.{l}.hook_resid_pre"][0, pos]) for l in range(30)
    ]
    groups += [(g, cache["blocks.29.hook_resid_pre"][0, pos]) for g in D.attention_neuron_groups(model, cache, 29, pos)]
    W_U = model.W_U.detach()
    # dense reference in float32 using the frozen lens written out, one layer at a time
    scale = cache["ln_final.hook_scale"][0, pos].squeeze()
    gamma, _ = _final_norm(model)
    names, scores = [], []
    for g, base in groups:
        z0 = (base / scale * gamma.float()) @ W_U
        lp0 = torch.log_softmax(z0, -1)[ctx.target]
        out = []
        for s in range(0, len(g), 512):
            z = z0 + (g.vectors[s : s + 512] / scale * gamma.float()) @ W_U
            out.append(torch.log_softmax(z, -1)[:, ctx.target] - lp0)
        scores.append(torch.cat(out).double())
        names += g.names
    all_scores = torch.cat(scores)
    for k in (10, 100):
        order = torch.argsort(all_scores, descending=True, stable=True)[:k]
        df = S.score_groups(ctx, [g for g, _ in groups], top_k=k, n_top_tokens=0)
        _assert_same_top(df, [names[i] for i in order.tolist()], all_scores[order], all_scores)
        assert df.attrs["n_scored"] <= 1024, df.attrs["n_scored"]
    assert "L24.N1005" in set(df["name"].head(5))  # the neuron-level paper's kind of "Paris" value neuron


def test_fused_bounds_equal_per_group_bounds(model):
    """The pruned search's blocked evaluation of every registered IncreaseBound gives the per-group values."""
    _, cache = run_cache(model)
    pos = TOKENS.shape[1] - 1
    ctx = S.make_context(model, cache, target=5)
    groups, bases = zip(*_groups_with_bases(model, cache, pos))
    declared = [s for s in S.SCORERS.values() if isinstance(s.bound, S.IncreaseBound)]
    assert {s.name for s in declared} >= {"log_prob_increase", "log_prob", "prob_increase"}
    for scorer in declared:
        fused = S._fused_bounds(ctx, list(groups), list(bases), scorer.bound, S.ProjectionCache())
        for g, b, f in zip(groups, bases, fused):
            torch.testing.assert_close(f, scorer.bound(ctx, g, b).double().cpu(), rtol=1e-12, atol=1e-12)


def test_custom_scorer_with_increase_bound_gets_the_fast_path(model, monkeypatch):
    """A custom scorer declaring an IncreaseBound is pruned through the fused path and equals dense scoring."""
    _, cache = run_cache(model)
    ctx = S.make_context(model, cache, target=5)
    calls = []
    real = S._fused_bounds
    monkeypatch.setattr(S, "_fused_bounds", lambda *a: calls.append(1) or real(*a))
    S.register_scorer(
        "twice_lpi", "2 x log-prob increase", bound=S.IncreaseBound(post=lambda b, pr: 2 * b), units="nats"
    )(lambda c, g, base: 2 * S.SCORERS["log_prob_increase"].fn(c, g, base))
    try:
        pruned = S.score_ffn_neurons(ctx, "twice_lpi", top_k=5, n_top_tokens=0)
        dense = S.score_ffn_neurons(ctx, "twice_lpi", top_k=5, n_top_tokens=0, pruned=False)
    finally:
        S.unregister_scorer("twice_lpi")
    assert calls and list(pruned["name"]) == list(dense["name"])
    torch.testing.assert_close(torch.tensor(pruned["score"].values), torch.tensor(dense["score"].values))
    assert pruned.attrs["units"] == "nats" and pruned.attrs["n_scored"] <= pruned.attrs["n_candidates"]


# ---------------------------------------------------------------------------------------------- batches


def test_batched_cache_one_top_k_per_prompt(model):
    """Each prompt of a batched cache gets the top-k of its own single-prompt cache, at its own position."""
    tokens = torch.cat([TOKENS, TOKENS.flip(-1)])
    _, cache = run_cache(model, tokens)
    df = S.score_neurons_batch(model, cache, top_k=5, positions=[7, 4], targets=[3, None], n_top_tokens=0)
    assert list(df["prompt"].unique()) == [0, 1] and list(df.groupby("prompt")["position"].first()) == [7, 4]
    for b, pos in ((0, 7), (1, 4)):
        _, single = run_cache(model, tokens[b : b + 1])
        tgt = 3 if b == 0 else None
        ref = S.score_neurons(S.make_context(model, single, tgt, pos), top_k=5, n_top_tokens=0, pruned=False)
        got = df[df.prompt == b]
        assert set(got["name"]) == set(ref["name"])
        torch.testing.assert_close(
            torch.tensor(got["score"].to_numpy()), torch.tensor(ref["score"].to_numpy()), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(S.InvalidInputError, match="positions has 3 entries but the cache holds 2 prompts"):
        S.score_neurons_batch(model, cache, positions=[1, 2, 3])
    with pytest.raises(S.InvalidInputError, match="kinds"):
        S.score_neurons(S.make_context(model, cache), kinds=["mlp"])


def test_attention_neuron_groups_match_attention_neuron_parts(model):
    """The per-source-position groups hold exactly the parts (names, coefficients, directions) of
    attention_neuron_parts, with directions shared views of W_O."""
    _, cache = run_cache(model)
    for layer in range(model.cfg.n_layers):
        ref = D.attention_neuron_parts(model, cache, layer, 6)
        groups = D.attention_neuron_groups(model, cache, layer, 6)
        assert len(groups) == 7 and all(g.directions is groups[0].directions for g in groups)
        by_name = {n: i for i, n in enumerate(ref.names)}
        for g in groups:
            idx = torch.tensor([by_name[g.names[j]] for j in range(len(g))])
            torch.testing.assert_close(g.coefficients, ref.coefficients[idx])
            torch.testing.assert_close(g.directions, ref.directions[idx])
            for key in ("head", "dim", "src_pos"):
                assert g.index[key].tolist() == ref.index[key][idx].tolist()
