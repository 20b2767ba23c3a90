"""Attention neurons (neuron-level paper section 3.2): exact sums, fold_value_biases, and every scorer vs dense."""

from __future__ import annotations

import einops
import pytest
import torch

from conftest import TOKENS, _variant, run_cache
from tl_residual import decompose as D
from tl_residual import model as tlm
from tl_residual import scorers as S
from tl_residual.errors import InvalidInputError

TOL = dict(rtol=1e-4, atol=1e-5)


def _dense_neurons(model, cache, layer, pos):
    """Independent: coefficient[h, p, d] = pattern[h, pos, p] * v[p, h // rep, d]; direction W_O[h, d]."""
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, pos, : pos + 1]
    v = cache[f"blocks.{layer}.attn.hook_v"][0, : pos + 1]
    n_heads = model.cfg.n_heads
    v = v.repeat_interleave(n_heads // v.shape[1], dim=1)  # [src, head, d_head]
    coef = pattern[:, :, None] * v.permute(1, 0, 2)  # [head, src, d_head]
    return coef, model.blocks[layer].attn.W_O.detach()


def test_attention_neurons_exact(variant_model):
    _, cache = run_cache(variant_model)
    n_heads, d_head = variant_model.cfg.n_heads, variant_model.cfg.d_head
    for layer in range(variant_model.cfg.n_layers):
        for pos in (0, 3, TOKENS.shape[1] - 1):
            g = D.attention_neuron_parts(variant_model, cache, layer, pos)
            assert g.kind == "attn_neuron" and len(g) == n_heads * (pos + 1) * d_head
            coef, w_o = _dense_neurons(variant_model, cache, layer, pos)
            torch.testing.assert_close(g.coefficients, coef.reshape(-1), **TOL)
            h, d = g.index["head"], g.index["dim"]
            torch.testing.assert_close(g.directions, w_o[h, d], **TOL)
            assert g.names[0] == f"L{layer}.H0.d0.p0" and g.names[-1] == f"L{layer}.H{n_heads - 1}.d{d_head - 1}.p{pos}"
            # sum over d == attention_parts' subvalue; over everything + b_O == hook_attn_out
            sub, bias = D.attention_parts(variant_model, cache, layer, pos)
            agg = D.aggregate_attention_neurons(g, "subvalue")
            assert agg.names == sub.names
            torch.testing.assert_close(agg.vectors, sub.vectors, **TOL)
            heads = D.aggregate_attention_neurons(g, "head")
            z = cache[f"blocks.{layer}.attn.hook_z"][0, pos]
            torch.testing.assert_close(heads.total(), einops.einsum(z, w_o, "h k, h k m -> m"), **TOL)
            whole = D.aggregate_attention_neurons(g, "layer").total()
            torch.testing.assert_close(g.total(), whole, **TOL)
            torch.testing.assert_close(whole + bias.total(), cache[f"blocks.{layer}.hook_attn_out"][0, pos], **TOL)


def _pairs():
    return [("hooked-gpt2", "hooked-gpt2-foldvb"), ("bridge-gpt2-compat-nofoldvb", "bridge-gpt2-compat")]


@pytest.mark.parametrize("unfolded,folded", _pairs())
def test_fold_value_biases_moves_bv_share_into_bias(unfolded, folded):
    """Folding b_V into b_O subtracts pattern * b_V[d] from each coefficient; sums stay exact."""
    a, b = _variant(unfolded), _variant(folded)
    _, ca = run_cache(a)
    _, cb = run_cache(b)
    pos = TOKENS.shape[1] - 1
    b_v = tlm.b_V(a, 0)  # per kv head, [n_kv, d_head]
    assert b_v.abs().max() > 0 and tlm.b_V(b, 0).abs().max() == 0
    ga = D.attention_neuron_parts(a, ca, 0, pos)
    gb = D.attention_neuron_parts(b, cb, 0, pos)
    pattern = ca["blocks.0.attn.hook_pattern"][0, :, pos, : pos + 1]
    share = pattern[:, :, None] * b_v[:, None, :]
    torch.testing.assert_close(ga.coefficients - gb.coefficients, share.reshape(-1), **TOL)
    _, bias_b = D.attention_parts(b, cb, 0, pos)
    torch.testing.assert_close(gb.total() + bias_b.total(), ca["blocks.0.hook_attn_out"][0, pos], **TOL)


# ---------------------------------------------------------------- scorers vs an independent dense computation


def _dense_scores(model, cache, method, layer, pos, target):
    """Frozen lens written out: z(v) = (centre(v) * gamma / scale) @ W_U; base x = resid_pre of the layer."""
    coef, w_o = _dense_neurons(model, cache, layer, pos)
    dirs = einops.repeat(w_o, "h k m -> (h s k) m", s=pos + 1)
    coef = coef.reshape(-1)
    vecs = coef[:, None] * dirs
    scale = cache["ln_final.hook_scale"][0, pos].reshape(-1)[0]
    gamma = tlm.norm_weight(model, "final")
    W_U = model.W_U.detach()
    centre = model.cfg.normalization_type in ("LN", "LNPre")

    def z(v):
        if centre:
            v = v - v.mean(-1, keepdim=True)
        return (v * gamma / scale) @ W_U

    x = cache[f"blocks.{layer}.hook_resid_pre"][0, pos]
    zx = z(x)

    def rank(zz):
        return 1.0 + (zz > zz[:, target : target + 1]).sum(-1).float()

    if method == "log_prob_increase":
        return torch.log_softmax(zx + z(vecs), -1)[:, target] - torch.log_softmax(zx, -1)[target]
    if method == "log_prob":
        return torch.log_softmax(z(vecs), -1)[:, target]
    if method == "prob_increase":
        return torch.softmax(zx + z(vecs), -1)[:, target] - torch.softmax(zx, -1)[target]
    if method == "norm":
        return dirs.norm(dim=-1)
    if method == "coefficient":
        return coef.abs()
    if method == "inverse_rank":
        return 1.0 / rank(z(dirs))
    if method == "coefficient_norm":
        return coef.abs() * dirs.norm(dim=-1)
    if method == "coefficient_inverse_rank":
        return coef.abs() / rank(z(dirs))
    raise AssertionError(method)


@pytest.mark.parametrize("name", ["hooked-gpt2", "hooked-llama-gqa", "bridge-gpt2-compat-nofoldvb", "bridge-llama-gqa"])
def test_score_attention_neurons_matches_dense(name):
    model = _variant(name)
    _, cache = run_cache(model)
    ctx = S.make_context(model, cache, target=7, position=-1)
    pos = TOKENS.shape[1] - 1
    names = D.attention_neuron_parts(model, cache, 1, pos).names
    for method in S.PAPER_METHODS:
        df = S.score_attention_neurons(ctx, method, top_k=None, layers=[1], n_top_tokens=0)
        assert len(df) == model.cfg.n_heads * model.cfg.d_head * (pos + 1)
        assert {"dim", "head", "src_pos"} <= set(df.columns) and (df["kind"] == "attn_neuron").all()
        by_name = dict(zip(names, _dense_scores(model, cache, method, 1, pos, 7).tolist()))
        got = torch.tensor(df["score"].tolist())
        want = torch.tensor([by_name[n] for n in df["name"]])
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=method)
        assert df["score"].is_monotonic_decreasing


def test_pruned_top_k_equals_dense(variant_model):
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache, target=11)
    dense = S.score_attention_neurons(ctx, "log_prob_increase", top_k=None, n_top_tokens=0)
    pruned = S.score_attention_neurons(ctx, "log_prob_increase", top_k=10, n_top_tokens=0)
    assert pruned.attrs["n_scored"] <= pruned.attrs["n_candidates"]
    assert list(pruned["name"]) == list(dense["name"].head(10))
    torch.testing.assert_close(
        torch.tensor(pruned["score"].tolist()), torch.tensor(dense["score"].head(10).tolist()), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name", ["hooked-gpt2-foldvb", "bridge-llama-compat"])
def test_every_registered_method_runs(name):
    model = _variant(name)
    _, cache = run_cache(model)
    ctx = S.make_context(model, cache)
    for method in S.SCORERS:
        df = S.score_attention_neurons(ctx, method, top_k=3, layers=[0], n_top_tokens=1)
        assert len(df) == 3 and df["score"].notna().all(), method


@pytest.mark.parametrize("name", ["hooked-gpt2", "bridge-llama-gqa"])
def test_bad_input(name):
    variant_model = _variant(name)
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache)
    with pytest.raises(InvalidInputError, match="unknown scoring method 'nope'"):
        S.score_attention_neurons(ctx, "nope")
    with pytest.raises(InvalidInputError, match="layer 9 is out of range"):
        S.score_attention_neurons(ctx, layers=[9])
    with pytest.raises(InvalidInputError, match="position 8 is out of range"):
        D.attention_neuron_parts(variant_model, cache, 0, 8)
    sub, _ = D.attention_parts(variant_model, cache, 0, 2)
    with pytest.raises(InvalidInputError, match="needs an 'attn_neuron' group"):
        D.aggregate_attention_neurons(sub)
    with pytest.raises(InvalidInputError, match="level 'neuron'"):
        D.aggregate_attention_neurons(D.attention_neuron_parts(variant_model, cache, 0, 2), "neuron")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the real model


def test_smollm2_attention_neurons(paris):
    model, cache, tokens = paris
    pos = tokens.shape[1] - 1
    for layer in (0, 29):
        g = D.attention_neuron_parts(model, cache, layer, pos)
        assert len(g) == 9 * 64 * 6
        sub, bias = D.attention_parts(model, cache, layer, pos)
        torch.testing.assert_close(D.aggregate_attention_neurons(g).vectors, sub.vectors, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            g.total() + bias.total(), cache[f"blocks.{layer}.hook_attn_out"][0, pos], rtol=1e-4, atol=1e-4
        )
    ctx = S.make_context(model, cache)
    assert ctx.lens.token_str(ctx.target) == " Paris"
    # known answer (docs/value.md; the pruned search equals the dense one, tested on the random models above):
    # the top attention neuron reads ' France' in head 4 of layer 23
    top = S.score_attention_neurons(ctx, "log_prob_increase", top_k=3, layers=[23, 29], n_top_tokens=0)
    assert top["name"][0] == "L23.H4.d55.p4" and top["score"][0] == pytest.approx(0.2429, abs=2e-3)


def test_explain_accepts_every_registered_method():
    from tl_residual import explain

    model = _variant("bridge-gpt2")
    for method in S.SCORERS:
        result = explain(model, "t5 t17 t33 t8", method=method, top_k=3)
        assert len(result.ffn_neurons) == 3 and len(result.attention_subvalues) == 3, method
        assert result.ffn_neurons["score"].is_monotonic_decreasing
