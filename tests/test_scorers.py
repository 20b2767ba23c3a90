"""Log-probability increase and the scorer tables, checked against independent dense computations."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TOKENS, raw_frozen_logits, raw_norm, run_cache
from tl_residual import scorers as S
from tl_residual.errors import InvalidInputError
from tl_residual.lens import Lens, model_logits


def _gamma_beta(model):
    """Final-norm weight and bias read straight from the module (ones / zeros where folded away)."""
    return raw_norm(model, "final")


def _dense_frozen_imp(model, cache, layer, target, pos=-1):
    """Independent dense log-prob increase of every FFN neuron of ``layer`` (frozen-scale convention)."""
    x = cache[f"blocks.{layer}.hook_resid_mid"][0, pos].float()
    m = cache[f"blocks.{layer}.mlp.hook_post"][0, pos].float()
    w_out = model.blocks[layer].mlp.W_out.detach().float()
    scale = cache["ln_final.hook_scale"][0, pos].float().squeeze()
    gamma, _ = _gamma_beta(model)
    centre = model.cfg.normalization_type in ("LN", "LNPre")
    W_U = model.W_U.detach().float()

    def logp(y):
        if centre:
            y = y - y.mean()
        return torch.log_softmax((y / scale * gamma) @ W_U, -1)[target]

    base = logp(x)
    return torch.stack([logp(x + m[k] * w_out[k]) - base for k in range(m.shape[0])])


def test_frozen_lens_plus_bias_is_model_logits(variant_model):
    logits, cache = run_cache(variant_model)
    lens = Lens(variant_model, cache, -1)
    r = cache[f"blocks.{variant_model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    _, beta = _gamma_beta(variant_model)
    b_U = getattr(variant_model, "b_U", None)
    b_U = torch.zeros(logits.shape[-1]) if not isinstance(b_U, torch.Tensor) else b_U.detach()
    torch.testing.assert_close(
        lens.logits(r) + beta @ variant_model.W_U.detach() + b_U, logits[0, -1], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(model_logits(variant_model, cache), logits[0, -1], rtol=1e-4, atol=1e-4)


def test_ffn_log_prob_increase_matches_dense(variant_model):
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    df = S.score_ffn_neurons(ctx, top_k=None, n_top_tokens=0)
    for layer in range(variant_model.cfg.n_layers):
        expected = _dense_frozen_imp(variant_model, cache, layer, ctx.target)
        got = df[df.layer == layer].sort_values("neuron")["score"].to_numpy()
        torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-4, atol=1e-5)


def test_pruned_top_k_equals_dense(variant_model):
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    dense = S.score_ffn_neurons(ctx, top_k=None, n_top_tokens=0)
    for k in (1, 5, 40):
        pruned = S.score_ffn_neurons(ctx, top_k=k, n_top_tokens=0)
        assert list(pruned["name"]) == list(dense["name"].head(k))
        torch.testing.assert_close(
            torch.tensor(pruned["score"].to_numpy()),
            torch.tensor(dense["score"].head(k).to_numpy()),
            rtol=1e-5,
            atol=1e-5,
        )
    sub_dense = S.score_attention_subvalues(ctx, top_k=None, n_top_tokens=0)
    sub_pruned = S.score_attention_subvalues(ctx, top_k=6, n_top_tokens=0)
    assert list(sub_pruned["name"]) == list(sub_dense["name"].head(6))


def test_layer_scores_telescope(variant_model):
    """Embedding log-prob plus every layer's log-prob increase = frozen-lens log-prob of the final residual."""
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    df = S.score_layers(ctx)
    r = cache[f"blocks.{variant_model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    final = float(ctx.lens.log_probs(r)[ctx.target])
    assert math.isclose(df.attrs["embed_log_prob"] + df["score"].sum(), final, rel_tol=1e-4, abs_tol=1e-4)


def test_recomputed_last_mlp_is_true_log_prob_change(variant_model):
    """Under the recomputed lens, the last FFN's score is log p_model(t) - log p(t | head(resid_mid))."""
    logits, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache, convention="recomputed")
    last = variant_model.cfg.n_layers - 1
    score = S.score_layers(ctx).set_index("name").loc[f"L{last}.mlp", "score"]
    mid = cache[f"blocks.{last}.hook_resid_mid"][0, -1]
    expected = torch.log_softmax(logits[0, -1], -1)[ctx.target] - ctx.lens.log_probs(mid)[ctx.target]
    assert math.isclose(score, float(expected), rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("method", S.PAPER_METHODS)
def test_every_paper_method_runs_and_tops_agree(variant_model, method):
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    full = S.score_ffn_neurons(ctx, method, top_k=None, n_top_tokens=0)
    top = S.score_ffn_neurons(ctx, method, top_k=7, n_top_tokens=0)
    assert len(full) == variant_model.cfg.n_layers * variant_model.cfg.d_mlp
    torch.testing.assert_close(
        torch.tensor(top["score"].to_numpy()), torch.tensor(full["score"].head(7).to_numpy()), rtol=1e-5, atol=1e-6
    )


def test_baselines_match_definitions(variant_model):
    """Methods b-h on one layer, against their definitions computed here from raw weights and the cache."""
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    layer, t = 0, ctx.target
    m = cache[f"blocks.{layer}.mlp.hook_post"][0, -1].float()
    w_out = variant_model.blocks[layer].mlp.W_out.detach().float()
    z_dir = raw_frozen_logits(variant_model, cache, w_out).float()
    z_vec = raw_frozen_logits(variant_model, cache, m[:, None] * w_out).float()
    rank = 1 + (z_dir > z_dir[:, t : t + 1]).sum(-1).float()
    x = cache[f"blocks.{layer}.hook_resid_mid"][0, -1]
    zx = raw_frozen_logits(variant_model, cache, x).float()
    expected = {
        "log_prob": torch.log_softmax(z_vec, -1)[:, t],
        "prob_increase": torch.softmax(zx + z_vec, -1)[:, t] - torch.softmax(zx, -1)[t],
        "norm": w_out.norm(dim=-1),
        "coefficient": m.abs(),
        "inverse_rank": 1 / rank,
        "coefficient_norm": m.abs() * w_out.norm(dim=-1),
        "coefficient_inverse_rank": m.abs() / rank,
    }
    for method, want in expected.items():
        df = S.score_ffn_neurons(ctx, method, top_k=None, layers=[layer], n_top_tokens=0).sort_values("neuron")
        torch.testing.assert_close(
            torch.tensor(df["score"].to_numpy()), want, rtol=1e-4, atol=1e-6, msg=lambda s, m=method: f"{m}: {s}"
        )


def test_score_heads_matches_dense(variant_model):
    """Each head's output (its subvalues summed over source positions), written out from the cache and W_O, and
    its log-probability increase over resid_pre under an independent frozen lens."""
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    cfg, t = variant_model.cfg, ctx.target
    df = S.score_heads(ctx)
    assert len(df) == cfg.n_layers * cfg.n_heads and df["score"].is_monotonic_decreasing
    assert list(df.columns) == ["name", "kind", "layer", "head", "score", "top_tokens"]  # only its own columns
    assert df.attrs["method"] == "log_prob_increase" and df.attrs["units"] == "nats"
    got = df.set_index("name")["score"]
    for layer in range(cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]  # [head, src]
        v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [src, kv_head, d_head]
        v = v.repeat_interleave(cfg.n_heads // v.shape[1], dim=1)
        w_o = variant_model.blocks[layer].attn.W_O.detach().float()  # [head, d_head, d_model]
        x = cache[f"blocks.{layer}.hook_resid_pre"][0, -1]
        base = torch.log_softmax(raw_frozen_logits(variant_model, cache, x), -1)[t]
        for h in range(cfg.n_heads):
            out = sum(pattern[h, p] * v[p, h] @ w_o[h] for p in range(pattern.shape[1]))
            want = torch.log_softmax(raw_frozen_logits(variant_model, cache, x + out), -1)[t] - base
            assert got[f"L{layer}.H{h}"] == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    top = S.score_heads(ctx, "norm", top_k=3, layers=[0])
    assert len(top) == 3 and set(top["layer"]) == {0} and top.attrs["method"] == "norm"


def test_score_layers_uses_the_method(variant_model):
    """score_layers scores by the method it is given (explain(method=...) labels its layer table truthfully)."""
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    df = S.score_layers(ctx, "norm", n_top_tokens=0).set_index("name")
    assert df.attrs["method"] == "norm" and "coefficient" not in df.columns and "neuron" not in df.columns
    for layer in range(variant_model.cfg.n_layers):
        for kind, hook in (("attn", "hook_attn_out"), ("mlp", "hook_mlp_out")):
            want = float(cache[f"blocks.{layer}.{hook}"][0, -1].norm())
            assert df.loc[f"L{layer}.{kind}", "score"] == pytest.approx(want, rel=1e-5)


def test_score_entry_point_and_table_schema(variant_model):
    """score() over several kinds equals the per-kind aliases; each table carries only its own columns, with the
    source token wherever a source position appears."""
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    both = S.score(ctx, ["ffn_neuron", "attn_subvalue"], top_k=None, layers=[1], n_top_tokens=0)
    ffn = S.score_ffn_neurons(ctx, top_k=None, layers=[1], n_top_tokens=0)
    sub = S.score_attention_subvalues(ctx, top_k=None, layers=[1], n_top_tokens=0)
    assert len(both) == len(ffn) + len(sub)
    assert set(ffn.columns) == {"name", "kind", "layer", "neuron", "score", "coefficient", "top_tokens"}
    assert {"head", "src_pos", "src_token"} <= set(sub.columns) and "neuron" not in sub.columns
    emb = cache["hook_embed"][0]
    w_e = variant_model.W_E.detach()
    for p, text in zip(sub["src_pos"], sub["src_token"]):  # the token whose embedding row is cached at p
        assert text == variant_model.tokenizer.decode([int(TOKENS[0, p])])
        assert torch.equal(w_e[int(TOKENS[0, p])], emb[p])
    assert len(S.score_ffn_neurons(ctx, layers=[1])) == S.DEFAULT_TOP_K


def test_register_scorer_guards(variant_model):
    """A name is registered once unless overwritten; a scorer's output is checked, naming the function."""
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    with pytest.raises(InvalidInputError, match="already registered"):
        S.register_scorer("norm")(lambda c, g, b: g.directions.norm(dim=-1))

    def bad_shape(c, g, b):
        return torch.zeros(len(g) + 1)

    def bad_value(c, g, b):
        return torch.full((len(g),), float("nan"))

    try:
        S.register_scorer("bad_shape")(bad_shape)
        S.register_scorer("bad_value")(bad_value)
        S.register_scorer("bad_value", overwrite=True)(bad_value)
        with pytest.raises(InvalidInputError, match="bad_shape.*shape"):
            S.score_ffn_neurons(ctx, "bad_shape", layers=[0])
        with pytest.raises(InvalidInputError, match="bad_value.*non-finite"):
            S.score_ffn_neurons(ctx, "bad_value", layers=[0])
    finally:
        S.unregister_scorer("bad_shape")
        S.unregister_scorer("bad_value")
    big = S.score_ffn_neurons(ctx, top_k=10**9, layers=[0], n_top_tokens=0)  # clamped to the candidates
    assert len(big) == variant_model.cfg.d_mlp


def test_smollm2_known_answers(paris):
    model, cache, _ = paris
    ctx = S.make_context(model, cache)
    assert model.tokenizer.decode([ctx.target]) == " Paris"
    assert 0.6 < math.exp(ctx.target_log_prob()) < 0.9
    neurons = S.score_ffn_neurons(ctx, top_k=10)
    assert neurons["name"].iloc[0] == "L24.N1005"
    assert neurons.attrs["n_scored"] < 2000
    subvalues = S.score_attention_subvalues(ctx, top_k=5)
    top = subvalues.iloc[0]
    assert (top["layer"], top["src_pos"]) == (23, 4)  # source position 4 is the ' France' token
    assert " France" in top["top_tokens"]


def test_dense_equals_pruned_on_smollm2_last_layers(paris):
    model, cache, _ = paris
    ctx = S.make_context(model, cache)
    dense = S.score_ffn_neurons(ctx, layers=[27, 28, 29], pruned=False, top_k=20, n_top_tokens=0)
    pruned = S.score_ffn_neurons(ctx, layers=[27, 28, 29], top_k=20, n_top_tokens=0)
    assert list(dense["name"]) == list(pruned["name"])
    torch.testing.assert_close(
        torch.tensor(pruned["score"].to_numpy()), torch.tensor(dense["score"].to_numpy()), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- errors


def test_target_must_be_one_token(paris):
    model, cache, _ = paris
    with pytest.raises(InvalidInputError, match="not one"):
        S.make_context(model, cache, target=" Parisianism")
    with pytest.raises(InvalidInputError, match="out of range"):
        S.make_context(model, cache, target=10**7)
    assert (
        S.make_context(model, cache, target=" London").target
        == model.tokenizer.encode(" London", add_special_tokens=False)[0]
    )


def test_bad_arguments(variant_model):
    _, cache = run_cache(variant_model)
    with pytest.raises(InvalidInputError, match="position 99"):
        S.make_context(variant_model, cache, position=99)
    with pytest.raises(InvalidInputError, match="lens convention"):
        S.make_context(variant_model, cache, convention="final")  # type: ignore[arg-type]
    ctx = S.make_context(variant_model, cache)
    with pytest.raises(InvalidInputError, match="unknown scoring method 'magic'"):
        S.score_ffn_neurons(ctx, "magic")
    with pytest.raises(InvalidInputError, match="top_k"):
        S.score_ffn_neurons(ctx, top_k=0)
    with pytest.raises(InvalidInputError, match="layer 9"):
        S.score_ffn_neurons(ctx, layers=[9])


def test_batch_shared_contexts_equal_dense(variant_model):
    """The study's batch path: contexts of several prompts of one cache primed together (``prime_contexts``),
    bound projections of shared directions for all prompts at once (``project_bounds``) and neuron projections
    shared across prompts (``DirectionLogits``, small enough to be cleared while scoring) give each prompt's dense
    top-k of FFN and attention neurons, scored alone."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.cat([TOKENS[:, :1].expand(3, 1), torch.randint(3, 61, (3, 6), generator=g)], dim=1)
    _, cache = run_cache(variant_model, tokens)
    kinds = ("ffn_neuron", "attn_neuron")
    ctxs = [S.make_context(variant_model, cache, None, pos, b) for b, pos in enumerate((6, 2, 4))]
    shared = S.DirectionLogits(max_bytes=50 * 61 * 4)  # room for 50 rows: cleared and refilled while scoring
    groups = [list(S.iter_groups(c, kinds)) for c in ctxs]
    for c in ctxs:
        c.projections, c.direction_logits = S.ProjectionCache(), shared
    S.prime_contexts(ctxs, [torch.stack([c.base_for(x) for x in gs]) for c, gs in zip(ctxs, groups)])
    S.project_bounds(ctxs, groups)
    S.prefetch_direction_logits(ctxs, groups, 25)  # more rows than the table holds: cleared while prefetching
    for c, gs in zip(ctxs, groups):
        got = S.score_groups(c, gs, top_k=25, n_top_tokens=0)
        alone = S.make_context(variant_model, cache, c.target, c.position, c.batch)
        dense = S.score(alone, kinds, top_k=None, n_top_tokens=0, pruned=False).head(25)
        assert list(got["name"]) == list(dense["name"])
        torch.testing.assert_close(
            torch.tensor(got["score"].to_numpy()), torch.tensor(dense["score"].to_numpy()), rtol=1e-5, atol=1e-5
        )
    assert 0 < shared.n_projected and shared.n_requested > 0
