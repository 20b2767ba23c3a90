"""Mixture-of-experts FFNs (issue 11, item 5): Mixtral, OLMoE, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE.

Tiny random models (2 layers, d_model 64, 4 experts, top-2: ``tiny_families.MOE_FAMILIES``) are built offline
from the ``transformers`` config classes and wrapped with ``TransformerBridge.boot_transformers(<real repo id>,
hf_model=..., tokenizer=...)``, and, where TransformerLens 3.x has a loader (Mixtral, OLMoE), as a
``HookedTransformer`` through TransformerLens' own config and weight conversion (the builders of ``tiny_families``).
Every check compares with an independent computation written here from the raw Hugging Face weights
(``gate_up_proj``, ``down_proj``, the router) and the cache, not the library's code path.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import tiny_families as F
import torch
from tiny_families import D_EXPERT, D_SHARED, N_EXPERTS, N_LAYERS, TOP_K

from conftest import HAS_BRIDGE, VOCAB
from tl_residual import decompose as D
from tl_residual import model as tlm

PROMPT = "t1 t5 t9 t12 t3 t40 t7"
hf_moe = F.hf_model  # the random Hugging Face model (the bridges wrap a copy: the references read this original)
build = F.build

#: (family, api, processed): the four bridges first (the single-variant tests take ``VARIANTS[:4]``), then
#: ``HookedTransformer`` (Mixtral first), then the bridges in compatibility mode.
VARIANTS = (
    [(f, "bridge", False) for f in F.MOE_FAMILIES]
    + [(f, "hooked", p) for f, fam in F.MOE_FAMILIES.items() if not fam.no_hooked for p in (False, True)]
    + [(f, "bridge", True) for f in F.MOE_FAMILIES]
)
IDS = [f"{f}-{api}{'-processed' if p else ''}" for f, api, p in VARIANTS]


@functools.cache
def run(family: str, api: str, processed: bool) -> tuple[Any, Any, Any]:
    model = build(family, api, processed)
    with torch.no_grad():
        logits, cache = model.run_with_cache(PROMPT)
    return model, logits, cache


# ----------------------------------------------------------------------------------------------
# Independent reference: the MoE output from the raw Hugging Face weights
# ----------------------------------------------------------------------------------------------


def reference_layer(family: str, layer: int, x: torch.Tensor) -> dict[str, Any]:
    """From the raw HF weights and the MoE input ``x`` [pos, d_model]: routing, per-expert activations, the
    gate/up pre-activations and the MoE output, written out here independently of tl_residual."""
    hf = hf_moe(family)
    block = hf.model.layers[layer].mlp
    act = torch.nn.functional.silu
    logits = x @ block.gate.weight.detach().T
    probs = torch.softmax(logits, -1)
    top_w, top_i = torch.topk(probs, TOP_K, -1)
    if family == "mixtral" or hf.config.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    gu = block.experts.gate_up_proj.detach()  # [E, 2 * d_expert, d_model]
    down = block.experts.down_proj.detach()  # [E, d_model, d_expert]
    gate_pre = torch.einsum("pd,efd->pef", x, gu[:, :D_EXPERT])
    up_pre = torch.einsum("pd,efd->pef", x, gu[:, D_EXPERT:])
    h = act(gate_pre) * up_pre  # [pos, E, d_expert]
    weight = torch.zeros(x.shape[0], N_EXPERTS).scatter(1, top_i, top_w)  # 0 for experts not routed
    coef = weight[:, :, None] * h
    out = torch.einsum("pef,edf->pd", coef, down)
    ref = {
        "top_i": top_i,
        "weight": weight,
        "coef": coef,
        "gate_pre": gate_pre,
        "up_pre": up_pre,
        "down": down,
        "out": out,
    }
    if family == "qwen2_moe":
        se = block.shared_expert
        s_gate = x @ se.gate_proj.weight.detach().T
        s_h = act(s_gate) * (x @ se.up_proj.weight.detach().T)
        s_coef = torch.sigmoid(x @ block.shared_expert_gate.weight.detach().T) * s_h
        ref.update(s_coef=s_coef, s_down=se.down_proj.weight.detach(), s_gate_pre=s_gate)
        ref["out"] = out + s_coef @ se.down_proj.weight.detach().T
    return ref


def hf_moe_input(family: str, cache: Any, layer: int) -> torch.Tensor:
    """The MoE input from the cache: ``ln2(resid_mid)`` written out with the HF norm weight (unprocessed models)."""
    resid = cache[f"blocks.{layer}.hook_resid_mid"][0].float()
    w = hf_moe(family).model.layers[layer].post_attention_layernorm
    return resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + w.variance_epsilon) * w.weight.detach()


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,api,processed", VARIANTS, ids=IDS)
def test_spec_accepts_moe(family: str, api: str, processed: bool) -> None:
    model = build(family, api, processed)
    spec = tlm.model_spec(model)
    assert (spec.n_experts, spec.experts_per_token, spec.d_expert) == (N_EXPERTS, TOP_K, D_EXPERT)
    assert spec.shared_expert == (family == "qwen2_moe")
    assert spec.d_shared_expert == (D_SHARED if family == "qwen2_moe" else 0)


@pytest.mark.parametrize("family,api,processed", VARIANTS, ids=IDS)
def test_reconstruction_every_layer_stream_position(family: str, api: str, processed: bool) -> None:
    model, _, cache = run(family, api, processed)
    n_pos = cache["blocks.0.hook_resid_pre"].shape[1]
    for layer in range(N_LAYERS):
        for stream in D.STREAMS:
            for pos in range(n_pos):
                err = D.reconstruction_error(model, cache, layer, pos, stream)
                assert err < 1e-5, (layer, stream, pos, err)


@pytest.mark.parametrize("family,api,processed", VARIANTS, ids=IDS)
def test_expert_parts_sum_to_mlp_out_and_match_raw_weights(family: str, api: str, processed: bool) -> None:
    model, _, cache = run(family, api, processed)
    n_pos = cache["blocks.0.hook_resid_pre"].shape[1]
    for layer in range(N_LAYERS):
        mlp_out = cache[f"blocks.{layer}.hook_mlp_out"][0].float()
        ref = reference_layer(family, layer, hf_moe_input(family, cache, layer))
        # the raw-weight reference itself reproduces the model's MLP output
        torch.testing.assert_close(ref["out"], mlp_out, rtol=1e-4, atol=1e-5)
        for pos in range(n_pos):
            groups = D.mlp_parts(model, cache, layer, pos)
            total = sum(g.coefficients.double() @ g.directions.double() for g in groups)
            assert float((total - mlp_out[pos].double()).norm() / mlp_out[pos].double().norm()) < 1e-5
            experts = [g for g in groups if g.kind == "expert_neuron"]
            # only the routed experts yield groups, in expert order
            assert [int(g.index["expert"][0]) for g in experts] == sorted(ref["top_i"][pos].tolist())
            for g in experts:
                e = int(g.index["expert"][0])
                assert g.names[3] == f"L{layer}.E{e}.N3"
                if not processed:  # processed (fold_ln) weights differ from the raw HF ones by the folded gamma
                    torch.testing.assert_close(g.coefficients, ref["coef"][pos, e], rtol=1e-4, atol=1e-6)
                    torch.testing.assert_close(g.directions, ref["down"][e].T, rtol=0, atol=0)
            shared = [g for g in groups if g.kind == "shared_neuron"]
            assert len(shared) == (family == "qwen2_moe")
            if shared:
                torch.testing.assert_close(shared[0].coefficients, ref["s_coef"][pos], rtol=1e-4, atol=1e-6)
                assert shared[0].names[0] == f"L{layer}.shared.N0"


@pytest.mark.parametrize("family,api,processed", VARIANTS[:5], ids=IDS[:5])
def test_scorer_topk_pruned_equals_dense(family: str, api: str, processed: bool) -> None:
    from tl_residual.scorers import make_context, score_ffn_neurons, score_neurons

    model, _, cache = run(family, api, processed)
    ctx = make_context(model, cache)
    dense = score_ffn_neurons(ctx, top_k=None, n_top_tokens=0)
    assert set(dense["kind"]) >= {"expert_neuron"}
    n_routed = N_LAYERS * TOP_K * D_EXPERT + (N_LAYERS * D_SHARED if family == "qwen2_moe" else 0)
    assert len(dense) == n_routed
    for k in (1, 10, 40):
        pruned = score_ffn_neurons(ctx, top_k=k, n_top_tokens=0)
        assert pruned["name"].tolist() == dense["name"].head(k).tolist()
        torch.testing.assert_close(
            torch.tensor(pruned["score"].to_numpy()), torch.tensor(dense["score"].head(k).to_numpy())
        )
    mixed = score_neurons(ctx, top_k=20, n_top_tokens=0)
    mixed_dense = score_neurons(ctx, top_k=20, n_top_tokens=0, pruned=False)
    assert mixed["name"].tolist() == mixed_dense["name"].tolist()


def _frozen_lens_logits(family: str, cache: Any, resid: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm with the cached scale frozen, then the unembedding, from the Hugging Face weights."""
    hf = hf_moe(family)
    scale = cache["ln_final.hook_scale"][0, -1].float()
    return (resid / scale * hf.model.norm.weight.detach()) @ hf.lm_head.weight.detach().T


@pytest.mark.parametrize("family,api,processed", VARIANTS[:4] + [VARIANTS[4]], ids=IDS[:5])
def test_zeroing_an_expert_neuron_changes_final_logits_by_its_contribution(
    family: str, api: str, processed: bool
) -> None:
    from tl_residual.lens import Lens

    model, _, cache = run(family, api, processed)
    layer = N_LAYERS - 1
    x = hf_moe_input(family, cache, layer)
    ref = reference_layer(family, layer, x)
    e = int(ref["top_i"][-1, 0])
    k = int(ref["coef"][-1, e].abs().argmax())
    contribution = ref["coef"][-1, e, k] * ref["down"][e][:, k]  # written into the residual at the last position
    name = f"L{layer}.E{e}.N{k}"
    for mode, factor, expect in (("zero", None, -1.0), ("scale", 3.0, 2.0)):
        after_resid = _resid_after(model, [name], layer, mode, factor)[-1]
        # the last layer's residual moves by exactly (factor - 1) x the neuron's contribution ...
        before_resid = cache[f"blocks.{layer}.hook_resid_post"][0, -1].float()
        moved = after_resid - before_resid
        torch.testing.assert_close(moved, expect * contribution, rtol=1e-4, atol=1e-5)
        # ... so the frozen-lens logits (tl_residual's Lens) move by its contribution through the frozen final
        # norm and the unembedding
        lens = Lens(model, cache, -1, 0, "frozen")
        direct = _frozen_lens_logits(family, cache, expect * contribution)
        torch.testing.assert_close(lens.logits(after_resid) - lens.logits(before_resid), direct, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            lens.logits(before_resid), _frozen_lens_logits(family, cache, before_resid), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("family,api,processed", VARIANTS[:5], ids=IDS[:5])
def test_query_split_of_expert_neuron_sums_to_its_gate_and_up(family: str, api: str, processed: bool) -> None:
    from tl_residual.query import split_neuron

    model, _, cache = run(family, api, processed)
    layer = N_LAYERS - 1
    x = hf_moe_input(family, cache, layer)
    ref = reference_layer(family, layer, x)
    pos = 3
    e = int(ref["top_i"][pos, 1])
    k = 5
    split = split_neuron(model, cache, f"L{layer}.E{e}.N{k}", position=pos)
    assert set(split.columns) >= {"gate", "up"}
    assert float(split["gate"].sum()) == pytest.approx(float(ref["gate_pre"][pos, e, k]), rel=1e-4, abs=1e-5)
    assert float(split["up"].sum()) == pytest.approx(float(ref["up_pre"][pos, e, k]), rel=1e-4, abs=1e-5)
    if family == "qwen2_moe":
        split = split_neuron(model, cache, f"L{layer}.shared.N{k}", position=pos)
        assert float(split["gate"].sum()) == pytest.approx(float(ref["s_gate_pre"][pos, k]), rel=1e-4, abs=1e-5)


def test_cache_from_another_model_raises() -> None:
    from tl_residual.errors import TLResidualError

    model = run("mixtral", "bridge", False)[0] if HAS_BRIDGE else run("mixtral", "hooked", False)[0]
    cache = run("qwen3_moe", "bridge", False)[2] if HAS_BRIDGE else run("olmoe", "hooked", False)[2]
    with pytest.raises(TLResidualError, match="do not sum"):
        D.expert_parts(model, cache, 1, -1)


def _resid_after(
    model: Any,
    names: list[str],
    layer: int,
    mode: str = "zero",
    factor: float | None = None,
    value: float | None = None,
) -> torch.Tensor:
    from tl_residual.interventions import (
        intervention_hooks,
        parse_components,
        tokenize_batch,
    )

    batch = tokenize_batch(model, [PROMPT])
    hooks = intervention_hooks(model, [parse_components(model, names)], batch, mode, factor, value)
    grabbed: list[torch.Tensor] = []
    with torch.no_grad():
        model.run_with_hooks(
            batch.tokens,
            fwd_hooks=hooks
            + [(f"blocks.{layer}.hook_resid_post", lambda t, hook: grabbed.append(t.detach().clone()) or t)],
        )
    return grabbed[0][0].float()


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_expert_interventions_unrouted_replace_and_shared(family: str) -> None:
    model, _, cache = run(family, "bridge", False) if HAS_BRIDGE else run(family, "hooked", False)
    layer = N_LAYERS - 1
    ref = reference_layer(family, layer, hf_moe_input(family, cache, layer))
    before = cache[f"blocks.{layer}.hook_resid_post"][0].float()
    routed = ref["weight"] > 0  # [pos, E]
    # an expert not routed at the last position: zeroing its neuron leaves that position untouched, and moves
    # every other position by minus its contribution there (0 where it is not routed either)
    e = int((~routed[-1]).nonzero()[0])
    moved = _resid_after(model, [f"L{layer}.E{e}.N2"], layer) - before
    expect = -ref["coef"][:, e, 2][:, None] * ref["down"][e][:, 2]
    torch.testing.assert_close(moved, expect, rtol=1e-4, atol=1e-5)
    assert float(moved[-1].abs().max()) == 0.0
    # replace: the coefficient becomes the value at every position, routed or not
    moved = _resid_after(model, [f"L{layer}.E{e}.N2"], layer, "replace", value=0.5) - before
    expect = (0.5 - ref["coef"][:, e, 2])[:, None] * ref["down"][e][:, 2]
    torch.testing.assert_close(moved, expect, rtol=1e-4, atol=1e-5)
    if family == "qwen2_moe":
        moved = _resid_after(model, [f"L{layer}.shared.N7"], layer, "scale", factor=0.5) - before
        expect = -0.5 * ref["s_coef"][:, 7][:, None] * ref["s_down"][:, 7]
        torch.testing.assert_close(moved, expect, rtol=1e-4, atol=1e-5)
    else:
        from tl_residual.errors import InvalidInputError
        from tl_residual.interventions import parse_components

        with pytest.raises(InvalidInputError, match="no shared expert"):
            parse_components(model, [f"L{layer}.shared.N7"])
        with pytest.raises(InvalidInputError):
            parse_components(model, [f"L{layer}.E{N_EXPERTS}.N0"])


def test_decompose_table_and_explain_run_on_moe() -> None:
    from tl_residual import explain

    model, _, cache = run("qwen2_moe", "bridge", False) if HAS_BRIDGE else run("mixtral", "hooked", False)
    df = D.decompose(model, cache)
    assert df.attrs["rel_error"] < 1e-5
    assert {"expert_neuron"} <= set(df["kind"])
    result = explain(model, PROMPT, top_k=5)
    assert len(result.ffn_neurons) == 5
    assert all(".E" in n or ".shared." in n for n in result.ffn_neurons["name"])


@pytest.mark.parametrize("family,api", [("mixtral", "bridge"), ("mixtral", "hooked"), ("qwen2_moe", "bridge")])
def test_batched_cache_uses_each_prompts_own_routing(family: str, api: str) -> None:
    """Both APIs flatten (batch, pos) in the routing hooks; prompt 1 of a batch decomposes as when run alone."""
    model = build(family, api, False)
    own = model.to_tokens(PROMPT)
    other = own.clone()
    other[:, 2:] = (other[:, 2:] + 11) % VOCAB
    tokens = torch.cat([other, own])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    _, _, alone = run(family, api, False)
    n_pos = tokens.shape[1]
    for layer in range(N_LAYERS):
        for pos in range(n_pos):
            assert D.reconstruction_error(model, cache, layer, pos, "resid_post", batch=1) < 1e-5
            assert D.reconstruction_error(model, cache, layer, pos, "resid_post", batch=0) < 1e-5
            got = [(g.names[0], g.coefficients) for g in D.expert_parts(model, cache, layer, pos, batch=1)]
            ref = [(g.names[0], g.coefficients) for g in D.expert_parts(model, alone, layer, pos)]
            assert [n for n, _ in got] == [n for n, _ in ref]
            for (_, a), (_, b) in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unknown_router_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A router whose convention is not known (e.g. GPT-OSS, DeepSeek) raises, naming the router class."""
    from tl_residual.errors import UnsupportedArchitectureError

    model = build("mixtral", "bridge", False)
    monkeypatch.delitem(tlm._KNOWN_ROUTERS, "MixtralTopKRouter")
    with pytest.raises(UnsupportedArchitectureError, match="router MixtralTopKRouter"):
        tlm.model_spec(model)
