"""Interventions act exactly on the named components, batch like one-by-one runs, and reject bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENS, _variant, run_cache
from tl_residual import interventions as I
from tl_residual.errors import InvalidInputError

PROMPTS_TINY = ["t5 t17 t33 t8", "t9 t23", "t40 t41 t42 t43 t44 t45"]


def _final_resid_after(model, tokens, hooks, stream="resid_post"):
    """The last layer's ``stream`` [pos, d_model] of a run with ``hooks`` (captured by an extra hook)."""
    L = model.cfg.n_layers - 1
    box = {}

    def grab(x, hook):
        box["r"] = x.detach()[0].float()
        return x

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=list(hooks) + [(f"blocks.{L}.hook_{stream}", grab)])
    return box["r"]


def _one_prompt_batch(tokens):
    n = tokens.shape[1]
    return I.PromptBatch(["-"], tokens, torch.ones_like(tokens), torch.tensor([n]), torch.tensor([0]), "right")


def _frozen_logits(model, cache, v):
    """Independent frozen-scale lens: (centre for LN) * gamma / original scale, then W_U (no biases)."""
    ln = model.ln_final
    d = model.cfg.d_model
    gamma = next(
        (getattr(ln, a).detach().float() for a in ("w", "weight") if isinstance(getattr(ln, a, None), torch.Tensor)),
        torch.ones(d),
    )
    scale = cache["ln_final.hook_scale"][0, -1].float().squeeze()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        v = v - v.mean(-1, keepdim=True)
    return (v * gamma / scale) @ model.W_U.detach().float()


def _exact_change(model, name, expected_change, stream="resid_post"):
    """Zeroing ``name`` changes the last layer's ``stream`` at the last position by exactly ``expected_change``
    (attention components: ``resid_mid``, since the last FFN reads it)."""
    _, cache = run_cache(model)
    L = model.cfg.n_layers - 1
    comps = I.parse_components(model, [name])
    hooks = I.intervention_hooks(model, [comps], _one_prompt_batch(TOKENS))
    after = _final_resid_after(model, TOKENS, hooks, stream)[-1]
    before = cache[f"blocks.{L}.hook_{stream}"][0, -1].float()
    torch.testing.assert_close(after - before, expected_change, rtol=1e-4, atol=1e-5)
    return cache, before, after


def test_zero_last_layer_ffn_neuron_is_exact(variant_model):
    """z(x_after) == z(x) - z(m_k W_out[k]) under the frozen lens with the original final-norm scale."""
    model = variant_model
    _, cache = run_cache(model)
    L, k = model.cfg.n_layers - 1, 5
    m_k = cache[f"blocks.{L}.mlp.hook_post"][0, -1, k].float()
    contribution = m_k * model.blocks[L].mlp.W_out.detach().float()[k]
    cache, before, after = _exact_change(model, f"L{L}.N{k}", -contribution)
    torch.testing.assert_close(
        _frozen_logits(model, cache, after),
        _frozen_logits(model, cache, before) - _frozen_logits(model, cache, contribution),
        rtol=1e-4,
        atol=1e-4,
    )


def test_attention_components_are_exact(variant_model):
    """Head, attention neuron, head x position subvalue and attention neuron at one source position, each
    checked against its contribution computed from the cache (pattern, v, z, W_O)."""
    model = variant_model
    _, cache = run_cache(model)
    L, h, d, p = model.cfg.n_layers - 1, 1, 3, 2
    W_O = model.blocks[L].attn.W_O.detach().float()  # [head, d_head, d_model]
    z = cache[f"blocks.{L}.attn.hook_z"][0, -1].float()  # [head, d_head]
    pattern = cache[f"blocks.{L}.attn.hook_pattern"][0, :, -1].float()  # [head, src]
    v = cache[f"blocks.{L}.attn.hook_v"][0].float()  # [src, kv_heads, d_head]
    v_h = v[:, h // (model.cfg.n_heads // v.shape[1])]  # [src, d_head]
    _exact_change(model, f"L{L}.H{h}", -(z[h] @ W_O[h]), "resid_mid")
    _exact_change(model, f"L{L}.H{h}.d{d}", -(z[h, d] * W_O[h, d]), "resid_mid")
    _exact_change(model, f"L{L}.H{h}.p{p}", -(pattern[h, p] * (v_h[p] @ W_O[h])), "resid_mid")
    _exact_change(model, f"L{L}.H{h}.d{d}.p{p}", -(pattern[h, p] * v_h[p, d] * W_O[h, d]), "resid_mid")


def test_scale_and_replace_ffn_neuron(variant_model):
    model = variant_model
    _, cache = run_cache(model)
    L, k = model.cfg.n_layers - 1, 7
    m_k = cache[f"blocks.{L}.mlp.hook_post"][0, -1, k].float()
    w = model.blocks[L].mlp.W_out.detach().float()[k]
    before = cache[f"blocks.{L}.hook_resid_post"][0, -1].float()
    comps = I.parse_components(model, f"L{L}.N{k}")
    for mode, kw, new in (("scale", {"factor": 2.5}, 2.5 * m_k), ("replace", {"value": 3.0}, torch.tensor(3.0))):
        hooks = I.intervention_hooks(model, [comps], _one_prompt_batch(TOKENS), mode, **kw)
        after = _final_resid_after(model, TOKENS, hooks)[-1]
        torch.testing.assert_close(after - before, (new - m_k) * w, rtol=1e-4, atol=1e-5)


def test_smollm2_last_layer_neuron_exact(paris):
    model, cache, tokens = paris
    L, k = 29, 1005
    m_k = cache[f"blocks.{L}.mlp.hook_post"][0, -1, k].float()
    contribution = m_k * model.blocks[L].mlp.W_out.detach().float()[k]
    hooks = I.intervention_hooks(model, [I.parse_components(model, f"L{L}.N{k}")], _one_prompt_batch(tokens))
    after = _final_resid_after(model, tokens, hooks)[-1]
    before = cache[f"blocks.{L}.hook_resid_post"][0, -1].float()
    torch.testing.assert_close(after - before, -contribution, rtol=1e-4, atol=1e-4)
    dz = _frozen_logits(model, cache, after) - _frozen_logits(model, cache, before)
    torch.testing.assert_close(dz, -_frozen_logits(model, cache, contribution), rtol=1e-3, atol=1e-4)


def _check_batched_equals_single(model, prompts, comps, side):
    batched = I.intervene(model, prompts, comps, padding_side=side, batch_size=len(prompts)).to_dataframe()
    single = I.intervene(model, prompts, comps, batch_size=1).to_dataframe()
    assert batched["target"].tolist() == single["target"].tolist()
    assert batched["rank_after"].tolist() == single["rank_after"].tolist()
    for col in ("logp_before", "logp_after"):
        torch.testing.assert_close(
            torch.tensor(batched[col].values), torch.tensor(single[col].values), rtol=1e-4, atol=2e-4
        )


BATCH_VARIANTS = ["hooked-gpt2", "hooked-llama-gqa", "bridge-gpt2", "bridge-llama-gqa"]


@pytest.mark.parametrize("variant", BATCH_VARIANTS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_by_one_random(variant, side):
    """Left padding shifts positions (learned and rotary) and needs the attention mask; right padding not."""
    variant_model = _variant(variant)
    L = variant_model.cfg.n_layers - 1
    comps = [["L0.N3", f"L{L}.H1.p1"], [f"L{L}.H0.d2", "L0.H2"], [f"L{L}.H1.d1.p4", f"L{L}.N10"]]
    _check_batched_equals_single(variant_model, PROMPTS_TINY, comps, side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_by_one_smollm2(smollm2, side):
    prompts = ["The capital of France is", "In Spain, most people speak", "The color of the sky on a clear day is"]
    comps = [["L24.N1005", "L27.N1392", "L20.H3.p2"], ["L29.H0.d5", "L15.H4"], ["L28.H2.d7.p3", "L10.N7"]]
    _check_batched_equals_single(smollm2, prompts, comps, side)


def test_intervene_result_and_summary(smollm2):
    res = I.intervene(smollm2, "The capital of France is", "L24.N1005,L27.N1392", targets=" Paris")
    df = res.to_dataframe()
    assert df.loc[0, "target_token"] == " Paris" and df.loc[0, "rank_before"] == 1
    assert 0.6 < df.loc[0, "prob_before"] < 0.9
    s = res.summary()
    assert s["mrr_before"] == 1.0 and s["n_prompts"] == 1.0
    assert res.to_dict()["prompts"][0]["components"] == ["L24.N1005", "L27.N1392"]


def test_random_components_seeded(smollm2):
    a = I.random_components(smollm2, 10, seed=3)
    assert a == I.random_components(smollm2, 10, seed=3) and a != I.random_components(smollm2, 10, seed=4)
    assert len(set(a)) == 10 and all(c.kind == "ffn_neuron" for c in I.parse_components(smollm2, a))
    att = I.random_components(smollm2, 5, kind="head_dim", seed=0)
    assert all(c.kind == "head_dim" for c in I.parse_components(smollm2, att))
    with pytest.raises(InvalidInputError, match="head_dim"):  # attn_neuron names one source position
        I.random_components(smollm2, 5, kind="attn_neuron")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("L24.X1005", "cannot parse"),
        ("24.N5", "cannot parse"),
        ("L30.N5", "layer 30 is out of range"),
        ("L3.N1536", "neuron 1536 is out of range"),
        ("L3.H9", "head 9 is out of range"),
        ("L3.H2.d64", "head dimension 64 is out of range"),
        ("", "no components"),
    ],
)
def test_bad_names(smollm2, name, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        I.parse_components(smollm2, name)


def test_bad_input(smollm2):
    with pytest.raises(InvalidInputError, match="source position 9 is beyond"):
        I.intervene(smollm2, "The capital of France is", "L3.H2.p9")
    with pytest.raises(InvalidInputError, match="mode 'scale' needs a factor"):
        I.intervene(smollm2, "The capital of France is", "L3.N2", mode="scale")
    with pytest.raises(InvalidInputError, match="not one of"):
        I.intervene(smollm2, "The capital of France is", "L3.N2", mode="ablate")
    with pytest.raises(InvalidInputError, match="one list per prompt"):
        I.intervene(smollm2, ["a b", "c d"], [["L3.N2"], ["L3.N3"], ["L3.N4"]])
    with pytest.raises(InvalidInputError, match="not one"):
        I.intervene(smollm2, "The capital of France is", "L3.N2", targets=" Parisian city")
    with pytest.raises(InvalidInputError, match="padding_side"):
        I.intervene(smollm2, "The capital of France is", "L3.N2", padding_side="middle")


def test_cli_ablate(smollm2, tmp_path):
    from typer.testing import CliRunner

    from tl_residual.cli import app

    runner = CliRunner()
    out = tmp_path / "ablate.json"
    res = runner.invoke(
        app, ["ablate", "--prompt", "The capital of France is", "--neurons", "L24.N1005,L27.N1392", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "' Paris'" in res.output and "before" in res.output and "after" in res.output
    import json

    data = json.loads(out.read_text())
    assert data["components"] == ["L24.N1005", "L27.N1392"] and data["before"]["rank"] == 1
    assert data["after"]["prob"] < data["before"]["prob"]
    for args, fragment in (
        (["--neurons", "L24.Q5"], "cannot parse component name"),
        (["--neurons", "L24.N99999"], "out of range"),
        (["--neurons", "L24.N5", "--mode", "scale"], "needs --factor"),
        (["--neurons", "L24.N5", "--mode", "melt"], "not one of"),
        (["--neurons", "L24.N5", "--target", " Parisian city"], "not one"),
    ):
        res = runner.invoke(app, ["ablate", "--prompt", "The capital of France is", *args])
        assert res.exit_code == 2, (args, res.output)
        assert "error:" in res.output and "Traceback" not in res.output and fragment in res.output, res.output
