"""bs-values (logit lens) of parts and vectors; bs-value minus scores; the residual-stream trajectory."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENS, _variant, raw_frozen_logits, raw_norm, run_cache
from tl_residual import bsvalues as L
from tl_residual import decompose as D
from tl_residual import lens
from tl_residual.errors import InvalidInputError

POS = TOKENS.shape[1] - 1


def _frozen(model, cache, v):
    """Independent frozen lens: (centre(v) * gamma / scale) @ W_U."""
    return raw_frozen_logits(model, cache, v, POS)


def _recomputed(model, v):
    """Independent recomputed lens: the final norm written out on ``v`` itself, then ``W_U`` and ``b_U``."""
    v = v.double()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        v = v - v.mean(-1, keepdim=True)
    gamma, beta = raw_norm(model, "final")
    normed = v / (v.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt() * gamma.double() + beta.double()
    b_u = getattr(model, "b_U", None)
    b_u = 0.0 if not isinstance(b_u, torch.Tensor) else b_u.detach().double()
    return normed @ model.W_U.detach().double() + b_u


def _subvalues(model, cache, layer):
    """Independent: every head x source-position subvalue at POS, from the cached pattern and values and W_O."""
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, POS, : POS + 1]
    v = cache[f"blocks.{layer}.attn.hook_v"][0, : POS + 1]
    v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)
    w_o = model.blocks[layer].attn.W_O.detach().float()
    return {
        f"L{layer}.H{h}.p{p}": pattern[h, p] * v[p, h] @ w_o[h]
        for h in range(model.cfg.n_heads)
        for p in range(POS + 1)
    }


def test_bs_values_match_dense(variant_model):
    _, cache = run_cache(variant_model)
    g, _ = D.attention_parts(variant_model, cache, 1, POS)
    df = L.bs_values(variant_model, cache, g, target=7, n_top_tokens=3)
    z = _frozen(variant_model, cache, g.vectors)
    assert list(df["name"]) == g.names
    for i in range(len(g)):
        row = df.iloc[i]
        top = torch.topk(z[i], 3)
        assert row["top_bs"] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-5)
        assert row["bottom_bs"][0] == pytest.approx(float(z[i].min()), rel=1e-4, abs=1e-5)
        assert row["target_bs"] == pytest.approx(float(z[i, 7]), rel=1e-4, abs=1e-5)
        assert row["target_rank"] == 1 + int((z[i] > z[i, 7]).sum())
        assert row["target_prob"] == pytest.approx(float(torch.softmax(z[i], -1)[7]), rel=1e-4, abs=1e-7)
    vec = cache["blocks.1.hook_mlp_out"][0, POS]
    assert L.bs_values(variant_model, cache, vec)["name"][0] == "v0"
    assert list(L.bs_values(variant_model, cache, {"mlp1": vec})["name"]) == ["mlp1"]


def test_minus_scores_are_additive(variant_model):
    """Layer rows sum to the final residual's minus score; part rows sum to the same (frozen lens, linear)."""
    _, cache = run_cache(variant_model)
    layers = L.bs_minus_layers(variant_model, cache, 7, 9)
    final = cache[f"blocks.{variant_model.cfg.n_layers - 1}.hook_resid_post"][0, POS]
    z = _frozen(variant_model, cache, final)
    assert layers["minus"].sum() == pytest.approx(float(z[7] - z[9]), rel=1e-4, abs=1e-4)
    parts = L.bs_minus_parts(variant_model, cache, 7, 9)
    assert parts["minus"].sum() == pytest.approx(float(z[7] - z[9]), rel=1e-4, abs=1e-4)
    assert parts["minus"].is_monotonic_decreasing
    # one FFN neuron by hand
    m = cache["blocks.0.mlp.hook_post"][0, POS, 3]
    zn = _frozen(variant_model, cache, m * variant_model.blocks[0].mlp.W_out.detach()[3])
    row = parts.set_index("name").loc["L0.N3"]
    assert row["minus"] == pytest.approx(float(zn[7] - zn[9]), rel=1e-4, abs=1e-5)
    nob = L.bs_minus_layers(variant_model, cache, 7, 9, with_bias=False)
    b_out = getattr(variant_model.blocks[0].mlp, "b_out", None)  # none on a bias-free MLP
    b_out = b_out.detach() if isinstance(b_out, torch.Tensor) else torch.zeros(variant_model.cfg.d_model)
    zb = _frozen(variant_model, cache, b_out)
    got = float(layers.set_index("name").loc["L0.mlp", "minus"] - nob.set_index("name").loc["L0.mlp", "minus"])
    assert got == pytest.approx(float(zb[7] - zb[9]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["hooked-gpt2", "hooked-llama-gqa", "bridge-gpt2-compat-nofoldln", "bridge-llama-gqa"])
def test_recomputed_minus_parts_match_dense(name):
    variant_model = _variant(name)
    _, cache = run_cache(variant_model)
    parts = L.bs_minus_parts(variant_model, cache, 7, 9, layer=0, stream="resid_mid", convention="recomputed")
    got = parts.set_index("name")["minus"]
    for part, vec in _subvalues(variant_model, cache, 0).items():
        z = _recomputed(variant_model, vec)
        assert got[part] == pytest.approx(float(z[7] - z[9]), rel=1e-4, abs=1e-5)
    assert parts.attrs["units"] == "logits" and {"src_pos", "src_token"} <= set(parts.columns)


def test_trajectory(variant_model):
    _, cache = run_cache(variant_model)
    tr = L.bs_trajectory(variant_model, cache, [7, 9])
    n = variant_model.cfg.n_layers
    assert list(tr["stream"]) == ["Lin0"] + [f"{k}{l}" for l in range(n) for k in ("Lres", "Lout")]
    cols = list(tr.columns[2:])
    assert len(cols) == 2
    final = cache[f"blocks.{n - 1}.hook_resid_post"][0, POS]
    z = _frozen(variant_model, cache, final)
    assert tr[cols[0]].iloc[-1] == pytest.approx(float(z[7]), rel=1e-4, abs=1e-4)
    # successive rows differ by the layer-level part (linear lens)
    layers = L.bs_minus_layers(variant_model, cache, 7, 9)
    diffs = (tr[cols[0]] - tr[cols[1]]).diff().iloc[1:].to_numpy()
    assert diffs == pytest.approx(layers["minus"].iloc[1:].to_numpy(), rel=1e-3, abs=1e-4)
    rank = L.bs_trajectory(variant_model, cache, [7], convention="recomputed", value="rank")
    logits = cache_logits = lens.model_logits(variant_model, cache)
    assert rank.iloc[-1, 2] == 1 + int((cache_logits > logits[7]).sum())
    prob = L.bs_trajectory(variant_model, cache, [7], convention="recomputed", value="prob")
    assert prob.iloc[-1, 2] == pytest.approx(float(torch.softmax(logits, -1)[7]), rel=1e-4)


@pytest.mark.parametrize("name", ["hooked-gpt2", "bridge-llama-gqa"])
def test_bad_input(name):
    variant_model = _variant(name)
    _, cache = run_cache(variant_model)
    with pytest.raises(InvalidInputError, match="out of range"):
        L.bs_minus_layers(variant_model, cache, 7, 999)
    with pytest.raises(InvalidInputError, match="non-empty list of tokens"):
        L.bs_trajectory(variant_model, cache, [])
    with pytest.raises(InvalidInputError, match="value 'logit'"):
        L.bs_trajectory(variant_model, cache, [7], value="logit")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="d_model=32 columns"):
        L.bs_values(variant_model, cache, torch.zeros(3, 5))
    with pytest.raises(InvalidInputError, match="vectors must be"):
        L.bs_values(variant_model, cache, [1, 2])
    with pytest.raises(InvalidInputError, match="top_k"):
        L.bs_minus_parts(variant_model, cache, 7, 9, top_k=0)


def test_smollm2_paris_vs_london(paris):
    model, cache, _ = paris
    layers = L.bs_minus_layers(model, cache, " Paris", " London")
    # known answer (docs/logit_lens.md): layer 23's attention separates Paris from London the most
    assert layers.sort_values("minus")["name"].iloc[-1] == "L23.attn"
    parts = L.bs_minus_parts(model, cache, " Paris", " London", top_k=3)
    assert parts["name"][0] == "L23.H4.p4"  # head 4 of layer 23 reading " France" (position 4)
    tr = L.bs_trajectory(model, cache, [" Paris", " London"])
    assert tr[" Paris"].iloc[-1] > tr[" London"].iloc[-1]
    df = L.bs_values(model, cache, {"final": cache["blocks.29.hook_resid_post"][0, -1]}, target=" Paris")
    assert df["top_tokens"][0][0] == " Paris" and df["target_rank"][0] == 1
