"""The decomposition is exact: parts sum to the cached residual vector, on every supported model."""

from __future__ import annotations

import einops
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HAS_BRIDGE, HAS_HOOKED, TOKENS, make_bridge, make_hooked, run_cache
from tl_residual import decompose as D
from tl_residual import model as tlm
from tl_residual.errors import InvalidInputError, MissingHookError, UnsupportedArchitectureError

TOL = 1e-5


@pytest.mark.parametrize("stream", D.STREAMS)
def test_parts_sum_to_cached_vector(variant_model, stream):
    _, cache = run_cache(variant_model)
    n_layers = variant_model.cfg.n_layers
    for layer in range(n_layers):
        for position in range(TOKENS.shape[1]):
            err = D.reconstruction_error(variant_model, cache, layer, position, stream)
            assert err < TOL, (layer, position, stream, err)


def test_attention_subvalues_match_hook_z(variant_model):
    """Independent check: per head, sum_p subvalue(h, p) == hook_z[h] @ W_O[h] (TransformerLens' own z)."""
    _, cache = run_cache(variant_model)
    pos = TOKENS.shape[1] - 1
    for layer in range(variant_model.cfg.n_layers):
        sub, bias = D.attention_parts(variant_model, cache, layer, pos)
        per_head = einops.reduce(sub.vectors, "(head src) d -> head d", "sum", head=variant_model.cfg.n_heads)
        z = cache[f"blocks.{layer}.attn.hook_z"][0, pos]
        expected = einops.einsum(z, variant_model.blocks[layer].attn.W_O.detach(), "h dh, h dh d -> h d")
        torch.testing.assert_close(per_head, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            per_head.sum(0) + bias.total(), cache[f"blocks.{layer}.hook_attn_out"][0, pos], rtol=1e-4, atol=1e-5
        )


def test_ffn_subvalues_match_mlp_out(variant_model):
    _, cache = run_cache(variant_model)
    for layer in range(variant_model.cfg.n_layers):
        neurons, bias = D.ffn_parts(variant_model, cache, layer, 3)
        dense = sum(neurons.coefficients[k] * neurons.directions[k] for k in range(len(neurons)))
        torch.testing.assert_close(
            dense + bias.total(), cache[f"blocks.{layer}.hook_mlp_out"][0, 3], rtol=1e-4, atol=1e-5
        )


def test_decompose_table(variant_model):
    _, cache = run_cache(variant_model)
    df = D.decompose(variant_model, cache, layer=-1, position=-1, stream="resid_post")
    spec = tlm.model_spec(variant_model)
    n_pos = TOKENS.shape[1]
    expected = 1 + spec.learned_pos + spec.n_layers * (spec.n_heads * n_pos + 1 + spec.d_mlp + 1)
    assert len(df) == expected
    assert df.attrs["rel_error"] < TOL
    assert "L1.H2.p7" in set(df["name"]) and "L0.N5" in set(df["name"])


def test_layer_stream_is_cumulative(variant_model):
    _, cache = run_cache(variant_model)
    parts = D.layer_outputs(variant_model, cache, position=-1)
    stream = D.residual_stream(variant_model, cache, position=-1)
    running = torch.zeros_like(parts[0][3])
    sums = []
    for _name, _, _, vec in parts:
        running = running + vec
        sums.append(running.clone())
    assert [n for n, _ in stream][:3] == ["Lin0", "Lres0", "Lout0"]
    for (_name, vec), s in zip(stream, sums):
        torch.testing.assert_close(vec, s, rtol=1e-4, atol=1e-5)


def test_smollm2_decomposition_exact(paris):
    model, cache, tokens = paris
    for stream in D.STREAMS:
        for layer in (0, 13, 29):
            assert D.reconstruction_error(model, cache, layer, -1, stream) < TOL
    assert D.reconstruction_error(model, cache, 29, 2, "resid_post") < TOL


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    api=st.sampled_from([a for a, ok in (("hooked", HAS_HOOKED), ("bridge", HAS_BRIDGE)) if ok]),
    arch=st.sampled_from(["gpt2", "llama"]),
    n_layers=st.integers(1, 3),
    n_heads=st.sampled_from([1, 2, 4]),
    d_head=st.sampled_from([4, 8]),
    kv_div=st.sampled_from([1, 2, 4]),
    d_mlp=st.sampled_from([8, 24]),
    seq=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_property_random_configs(api, arch, n_layers, n_heads, d_head, kv_div, d_mlp, seq, seed):
    n_kv = max(1, n_heads // kv_div)
    kw = dict(n_layers=n_layers, d_model=n_heads * d_head, n_heads=n_heads, d_mlp=d_mlp, n_kv_heads=n_kv, seed=seed)
    model = make_hooked(arch, **kw) if api == "hooked" else make_bridge(arch, **kw)
    tokens = torch.randint(3, 60, (1, seq), generator=torch.Generator().manual_seed(seed))
    _, cache = run_cache(model, tokens)
    for stream in D.STREAMS:
        assert D.reconstruction_error(model, cache, n_layers - 1, seq - 1, stream) < TOL
        assert D.reconstruction_error(model, cache, 0, 0, stream) < TOL


def test_iter_parts_streams_layer_by_layer(variant_model):
    _, cache = run_cache(variant_model)
    kinds = [(g.kind, g.layer) for g in D.iter_parts(variant_model, cache, layer=1, stream="resid_mid")]
    assert kinds[-2:] == [("attn_subvalue", 1), ("attn_bias", 1)]
    assert ("ffn_neuron", 1) not in kinds and ("ffn_neuron", 0) in kinds


# ---------------------------------------------------------------- errors


def test_bad_position_layer_stream(variant_model):
    _, cache = run_cache(variant_model)
    with pytest.raises(InvalidInputError, match="position 8 is out of range"):
        D.reconstruction_error(variant_model, cache, 0, 8)
    with pytest.raises(InvalidInputError, match="layer 5 is out of range"):
        D.reconstruction_error(variant_model, cache, 5, 0)
    with pytest.raises(InvalidInputError, match="stream 'resid_out'"):
        D.reconstruction_error(variant_model, cache, 0, 0, "resid_out")  # type: ignore[arg-type]


def test_missing_hook_is_named(variant_model):
    with torch.no_grad():
        _, cache = variant_model.run_with_cache(TOKENS, names_filter=lambda n: "hook_pattern" not in n)
    with pytest.raises(MissingHookError, match="hook_pattern"):
        D.reconstruction_error(variant_model, cache, 0, 0, "resid_mid")


@pytest.mark.skipif(not HAS_HOOKED, reason="needs HookedTransformer")
def test_unsupported_architecture_named():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=20, d_mlp=32, act_fn="gelu", attn_only=True
    )  # parallel attention+MLP is covered since issue 11
    with pytest.raises(UnsupportedArchitectureError, match="attention-only"):
        tlm.model_spec(HookedTransformer(cfg))
