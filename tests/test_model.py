"""Model access: the same quantities from both TransformerLens APIs, folding respected, clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_HOOKED, make_bridge, make_hooked
from tl_residual import model as tlm
from tl_residual.errors import InvalidInputError, UnsupportedArchitectureError


def test_spec_and_shapes(variant_model):
    spec = tlm.model_spec(variant_model)
    assert tlm.W_O(variant_model, 0).shape == (spec.n_heads, spec.d_head, spec.d_model)
    assert tlm.W_V(variant_model, 0).shape == (spec.n_kv_heads, spec.d_model, spec.d_head)
    assert tlm.b_V(variant_model, 0).shape == (spec.n_kv_heads, spec.d_head)
    assert tlm.b_O(variant_model, 1).shape == (spec.d_model,)
    assert tlm.W_in(variant_model, 0).shape == (spec.d_model, spec.d_mlp)
    assert tlm.b_in(variant_model, 0).shape == (spec.d_mlp,)
    assert tlm.W_out(variant_model, 0).shape == (spec.d_mlp, spec.d_model)
    assert tlm.b_out(variant_model, 0).shape == (spec.d_model,)
    assert tlm.W_U(variant_model).shape == (spec.d_model, spec.d_vocab)
    assert tlm.b_U(variant_model).shape == (spec.d_vocab,)
    for which in ("final", "0.ln1", "1.ln2"):
        assert tlm.norm_weight(variant_model, which).shape == (spec.d_model,)
        assert tlm.norm_bias(variant_model, which).shape == (spec.d_model,)
    if spec.gated_mlp:
        assert tlm.W_gate(variant_model, 0).shape == (spec.d_model, spec.d_mlp)
    else:
        with pytest.raises(UnsupportedArchitectureError, match="not gated"):
            tlm.W_gate(variant_model, 0)
    with pytest.raises(InvalidInputError, match="layer 7 is out of range"):
        tlm.W_O(variant_model, 7)


def test_bridge_absent_biases_are_zeros():
    model = make_bridge("llama", n_kv_heads=2)  # Llama: no biases at all; the bridge raises AttributeError
    assert torch.count_nonzero(tlm.b_O(model, 0)) == 0
    assert torch.count_nonzero(tlm.b_in(model, 0)) == 0
    assert torch.count_nonzero(tlm.b_V(model, 0)) == 0
    assert tlm.model_spec(model).n_kv_heads == 2 and tlm.model_spec(model).norm == "RMS"


@pytest.mark.skipif(not HAS_HOOKED, reason="needs HookedTransformer")
def test_folding_is_visible_through_model_access():
    plain = make_hooked("gpt2")
    folded = make_hooked("gpt2", fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    assert torch.count_nonzero(tlm.norm_bias(plain, "0.ln1")) > 0
    assert torch.allclose(tlm.norm_weight(folded, "0.ln1"), torch.ones(32))
    assert torch.count_nonzero(tlm.norm_bias(folded, "final")) == 0
    assert torch.count_nonzero(tlm.b_V(plain, 0)) > 0 and torch.count_nonzero(tlm.b_V(folded, 0)) == 0
    assert tlm.model_spec(folded).norm == "LN"


def test_load_model_rejects_bad_names():
    with pytest.raises(InvalidInputError, match="empty"):
        tlm.load_model("  ")
    with pytest.raises(InvalidInputError, match="dtype"):
        tlm.load_model("smollm2-135m", dtype="int8")


def test_smollm2_is_the_embedded_model(smollm2):
    spec = tlm.model_spec(smollm2)
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_mlp) == (30, 576, 9, 3, 1536)
    assert spec.norm == "RMS" and spec.gated_mlp and not spec.learned_pos and spec.is_bridge
    assert tlm.load_model("SmolLM2") is smollm2  # loaded once per process


def test_every_weight_getter_routes_to_the_scoring_device(variant_model, monkeypatch):
    """With a model split over devices (``device_map``), scoring runs on the unembedding's device: every weight
    getter must return its tensor there. No second device exists on the CPU test machines, so the scoring device
    is redirected to ``meta`` and every getter must follow it."""
    spec = tlm.model_spec(variant_model)
    monkeypatch.setattr(tlm, "scoring_device", lambda model: torch.device("meta"))
    got = {
        "W_U": tlm.W_U(variant_model),
        "b_U": tlm.b_U(variant_model),
        "W_E": tlm.W_E(variant_model),
        "W_O": tlm.W_O(variant_model, 0),
        "b_O": tlm.b_O(variant_model, 0),
        "W_V": tlm.W_V(variant_model, 0),
        "b_V": tlm.b_V(variant_model, 0),
        "W_in": tlm.W_in(variant_model, 0),
        "b_in": tlm.b_in(variant_model, 0),
        "W_out": tlm.W_out(variant_model, 0),
        "b_out": tlm.b_out(variant_model, 0),
        "norm_weight": tlm.norm_weight(variant_model, "final"),
        "norm_bias": tlm.norm_bias(variant_model, "0.ln1"),
    }
    if spec.gated_mlp:
        got["W_gate"] = tlm.W_gate(variant_model, 0)
    bad = {k: str(v.device) for k, v in got.items() if v.device.type != "meta" or v.dtype != torch.float32}
    assert not bad, bad


def test_cache_to_scoring_device_is_free_on_one_device(variant_model):
    from conftest import run_cache

    _, cache = run_cache(variant_model)
    assert tlm.cache_to_scoring_device(variant_model, cache) is cache
