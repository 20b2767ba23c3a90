"""Every decoder-only family of ``tiny_families``: exact decomposition through both TransformerLens APIs, or a
clear refusal; and the safety net that turns any inexact number into an error (issue 11).

Independent checks: reconstruction against the cached residual at every layer, stream and position; the
post-norm FFN parts against the cached ``hook_mlp_out`` and a ``sigma`` recomputed here from the raw MLP output;
the lens' log-probabilities against the model's own forward output; zeroing a last-layer neuron in a real forward
pass (post-norm scale held at its cached value) against the part's vector.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import tiny_families as F
import torch

from conftest import HAS_BRIDGE, HAS_HOOKED, make_bridge, tiny_tokenizer
from tl_residual import decompose as D
from tl_residual import model as tlm
from tl_residual import scorers as S
from tl_residual.errors import (
    DecompositionError,
    TLResidualError,
    UnsupportedArchitectureError,
)
from tl_residual.lens import Lens, model_logits

TOKENS = torch.tensor([[1, 5, 17, 33, 8, 42]])
VARIANTS = [v for v in F.variants() if (v[1] == "bridge" and HAS_BRIDGE) or (v[1] == "hooked" and HAS_HOOKED)]
IDS = [f"{fam}-{api}{'-processed' if proc else ''}" for fam, api, proc in VARIANTS]


@functools.cache
def _run(family: str, api: str, processed: bool) -> tuple[Any, torch.Tensor, Any]:
    model = F.build(family, api, processed)
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
    return model, logits, cache


@pytest.fixture(params=VARIANTS, ids=IDS)
def run(request: pytest.FixtureRequest) -> tuple[str, Any, torch.Tensor, Any]:
    family, api, processed = request.param
    return (family, *_run(family, api, processed))


RAW = [(v, i) for v, i in zip(VARIANTS, IDS) if not v[2]]


@pytest.fixture(params=[v for v, _ in RAW], ids=[i for _, i in RAW])
def raw_run(request: pytest.FixtureRequest) -> tuple[str, Any, torch.Tensor, Any]:
    """The unprocessed variants only (for the end-to-end tests; weight processing is covered by the others)."""
    family, api, processed = request.param
    return (family, *_run(family, api, processed))


def _streams(spec: tlm.ModelSpec) -> list[str]:
    return [s for s in D.STREAMS if s != "resid_mid" or spec.has_resid_mid]


def test_spec_reads_the_family(run):
    """Same verdict from both APIs: the features come from the model's modules and architecture name."""
    family, model, _, _ = run
    spec = tlm.model_spec(model)
    features = F.FAMILIES[family].features
    assert spec.parallel_attn_mlp == ("parallel" in features)
    assert spec.post_attn_norm == spec.post_mlp_norm == ("post_norm" in features)
    assert (spec.logit_softcap > 0) == ("softcap" in features)
    assert spec.embed_norm == ("embed_norm" in features)


def test_reconstruction_every_layer_stream_position(run):
    family, model, _, cache = run
    spec = tlm.model_spec(model)
    worst = max(
        D.reconstruction_error(model, cache, layer, pos, stream)
        for layer in range(spec.n_layers)
        for stream in _streams(spec)
        for pos in range(TOKENS.shape[1])
    )
    assert worst < 1e-5, f"{family}: {worst}"


def test_lens_log_probs_equal_the_model(run):
    _, model, logits, cache = run
    for pos in range(TOKENS.shape[1]):
        ours = torch.log_softmax(model_logits(model, cache, pos), -1)
        theirs = torch.log_softmax(logits[0, pos].float(), -1)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_explain_runs(raw_run):
    from tl_residual.explanation import explain

    _, model, _, _ = raw_run
    out = explain(model, "t5 t17 t33 t8", top_k=3)
    assert out.decomposition_rel_error < 1e-5
    assert len(out.ffn_neurons) == 3 and len(out.attention_subvalues) == 3


def test_pruned_top_k_equals_dense(raw_run):
    _, model, _, cache = raw_run
    ctx = S.make_context(model, cache)
    pruned = S.score_neurons(ctx, top_k=8, n_top_tokens=0)
    dense = S.score_neurons(ctx, top_k=8, n_top_tokens=0, pruned=False)
    assert list(pruned["name"]) == list(dense["name"])
    torch.testing.assert_close(torch.tensor(pruned["score"].to_numpy()), torch.tensor(dense["score"].to_numpy()))
    if tlm.model_spec(model).logit_softcap:
        assert not ctx.lens.certifiable and "n_scored" not in pruned.attrs  # scored densely, never pruned


def test_base_rule(raw_run):
    """FFN parts are added to resid_mid, or to resid_pre where attention and MLP run in parallel."""
    _, model, _, cache = raw_run
    spec = tlm.model_spec(model)
    ctx = S.make_context(model, cache)
    group = D.ffn_parts(model, cache, 1, -1)[0]
    stream = "resid_mid" if spec.has_resid_mid else "resid_pre"
    torch.testing.assert_close(ctx.base_for(group), cache[f"blocks.1.hook_{stream}"][0, -1].float())
    if not spec.has_resid_mid:
        with pytest.raises(UnsupportedArchitectureError, match="no resid_mid"):
            D.decompose(model, cache, 1, -1, "resid_mid")


def _scale_hook(model: Any, layer: int) -> str:
    return tlm.hook_name("post_mlp_scale", layer, model)


def test_post_norm_parts_are_frozen_scale_times_raw_parts(run):
    """With a norm after the MLP, the FFN parts sum to the cached hook_mlp_out, and each is W_out[k] * w / sigma with
    sigma recomputed here from the raw MLP output m @ W_out + b_out."""
    _, model, _, cache = run
    spec = tlm.model_spec(model)
    if not spec.post_mlp_norm:
        pytest.skip("no post-MLP norm")
    layer, pos = 1, 3
    neurons, bias = D.ffn_parts(model, cache, layer, pos)
    torch.testing.assert_close(
        neurons.total() + bias.total(), cache[f"blocks.{layer}.hook_mlp_out"][0, pos].float(), atol=1e-5, rtol=1e-5
    )
    m = cache[f"blocks.{layer}.mlp.hook_post"][0, pos].float()
    mlp = model.blocks[layer].mlp
    w_out = mlp.W_out.detach().float()
    b_out = getattr(mlp, "b_out", None)
    raw = m @ w_out + (b_out.detach().float() if isinstance(b_out, torch.Tensor) else 0.0)
    sigma = (raw.pow(2).mean() + spec.eps).sqrt()
    gain = tlm.post_norm_weight(model, layer, "mlp")
    torch.testing.assert_close(neurons.directions, w_out * gain / sigma, atol=1e-5, rtol=1e-4)


def test_zeroing_a_last_layer_neuron_removes_exactly_its_part(run):
    """A real forward pass with neuron k of the last layer zeroed at the last position (and any post-MLP norm's
    scale held at its cached value, the frozen convention): the final residual drops by exactly the part, and the
    frozen lens' logits by exactly the part's logits."""
    _, model, _, cache = run
    spec = tlm.model_spec(model)
    layer, pos = spec.n_layers - 1, TOKENS.shape[1] - 1
    neurons, _ = D.ffn_parts(model, cache, layer, pos)
    k = int(neurons.coefficients.abs().argmax())
    part = neurons.coefficients[k] * neurons.directions[k]

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        act[0, pos, k] = 0.0
        return act

    hooks = [(tlm.hook_name("mlp_post", layer), zero)]
    if spec.post_mlp_norm:
        frozen = cache[_scale_hook(model, layer)]
        hooks.append((_scale_hook(model, layer), lambda act, hook: frozen.to(act.dtype)))
    resid = tlm.hook_name("resid_post", layer)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, edited = model.run_with_cache(TOKENS, names_filter=lambda n: n == resid)
    before = cache[resid][0, pos].float()
    after = edited[resid][0, pos].float()
    torch.testing.assert_close(before - after, part, atol=2e-5, rtol=1e-4)
    lens = Lens(model, cache, pos)
    torch.testing.assert_close(
        lens.transform(before) @ lens.W_U - lens.transform(after) @ lens.W_U,
        lens.transform(part) @ lens.W_U,
        atol=1e-4,
        rtol=1e-4,
    )


# ---------------------------------------------------------------------------------------------- the safety net


@pytest.fixture(scope="module")
def gpt2_pair() -> tuple[Any, Any, Any]:
    """The GPT-2 family model, and the cache of another model of the same shapes (different weights)."""
    api = "bridge" if HAS_BRIDGE else "hooked"
    model, _, cache = _run("gpt2", api, False)
    other = make_bridge("gpt2", d_model=F.D_MODEL, d_mlp=F.D_MLP, n_heads=F.N_HEADS, seed=7) if HAS_BRIDGE else None
    if other is None:
        pytest.skip("needs TransformerBridge")
    with torch.no_grad():
        _, other_cache = other.run_with_cache(TOKENS)
    return model, cache, other_cache


def test_safety_net_catches_a_cache_from_another_model(gpt2_pair):
    from tl_residual import query as Q

    model, _, wrong = gpt2_pair
    with pytest.raises(DecompositionError, match="different model") as err:
        D.decompose(model, wrong, -1, -1)
    assert "TransformerBridge" in str(err.value) and "blocks.1.hook_resid_post" in str(err.value)
    with pytest.raises(DecompositionError):
        S.make_context(model, wrong)
    with pytest.raises(DecompositionError):
        S.score_neurons_batch(model, wrong, top_k=3)
    with pytest.raises(DecompositionError):
        Q.split_ffn_neuron(model, wrong, 1, 0)
    with pytest.raises(DecompositionError):
        D.check_reconstruction(model, wrong, 0, 2, "resid_mid")


def test_safety_net_catches_an_edited_hook(gpt2_pair):
    model, _, _ = gpt2_pair
    steer = torch.randn(F.D_MODEL)
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x + steer)]):
        _, edited = model.run_with_cache(TOKENS)
    with pytest.raises(DecompositionError, match="hooks? edited|hook edited"):
        D.decompose(model, edited, 1, -1)
    with pytest.raises(DecompositionError):
        S.make_context(model, edited)


def test_safety_net_catches_an_unsupported_feature_forced_through(monkeypatch):
    """Hide OLMo-2's post-sublayer norms from the detection: the parts no longer sum, and every entry point
    raises instead of reporting them."""
    api = "bridge" if HAS_BRIDGE else "hooked"
    model, _, cache = _run("olmo3" if api == "hooked" else "olmo2", api, False)
    monkeypatch.setattr(tlm, "_post_norm_modules", lambda model, arch: (None, None))
    assert not tlm.model_spec(model).post_mlp_norm
    with pytest.raises(DecompositionError):
        D.decompose(model, cache)
    with pytest.raises(DecompositionError):
        S.make_context(model, cache)


def test_unsupported_features_are_named(monkeypatch):
    api = "bridge" if HAS_BRIDGE else "hooked"
    model, *_ = _run("llama3", api, False)
    monkeypatch.setattr(model.cfg, "num_experts", 4, raising=False)
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        tlm.model_spec(model)
    monkeypatch.setattr(model.cfg, "num_experts", None, raising=False)
    monkeypatch.setattr(model.cfg, "attention_dir", "bidirectional", raising=False)
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional"):
        tlm.model_spec(model)


@pytest.mark.skipif(not HAS_BRIDGE, reason="needs TransformerBridge")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gpt2_is_accepted_with_a_dtype_tolerance(dtype):
    from transformer_lens.model_bridge import TransformerBridge

    hf = copy.deepcopy(F.hf_model("gpt2")).to(dtype)
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tiny_tokenizer(), dtype=dtype).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    spec = tlm.model_spec(model)
    assert spec.dtype == str(dtype).replace("torch.", "")
    err = D.check_reconstruction(model, cache)
    assert err <= tlm.tolerance(model, cache)
    assert len(S.score_neurons(S.make_context(model, cache), top_k=3)) == 3


def test_hook_names_and_adapter():
    api = "bridge" if HAS_BRIDGE else "hooked"
    model, _, cache = _run("llama3", api, False)
    for role in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "v", "z", "pattern", "mlp_post"):
        assert tlm.hook_name(role, 1) in cache
    assert tlm.hook_name("final_scale") in cache
    with pytest.raises(TLResidualError):
        tlm.hook_name("resid_pre")
    assert tlm.d_vocab(model) == F.VOCAB and tlm.n_layers(model) == F.N_LAYERS
    assert tlm.value_heads(model, int(cache["blocks.0.attn.hook_v"].shape[2])) in (1, 2)
    assert isinstance(tlm.decode(model, 5), str)
