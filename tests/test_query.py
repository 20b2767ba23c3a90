"""Query side: exact LN-folded splits of neuron inputs, query-neuron importance, cross-layer scores."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENS, _variant, raw_norm, run_cache
from tl_residual import query as Q
from tl_residual import scorers as S
from tl_residual.errors import InvalidInputError

POS = TOKENS.shape[1] - 1


def _manual_input(model, cache, layer, ln, x_hook, pos, w, b):
    """Independent: the norm written out on the cached residual (weights read from its module), then the read
    weights."""
    x = cache[x_hook][0, pos].double()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean()
    sigma = cache[f"blocks.{layer}.{ln}.hook_scale"][0, pos].double().reshape(-1)[0]
    gamma, beta = raw_norm(model, f"{layer}.{ln}")
    normed = x / sigma * gamma.double() + beta.double()
    return normed @ w.double() + b.double()


def _rel(df, col):
    return df.attrs["abs_error"][col] / max(1e-3, float(df[col].abs().sum()))


def test_ffn_split_is_exact(variant_model):
    _, cache = run_cache(variant_model)
    gated = variant_model.cfg.gated_mlp
    for layer in range(variant_model.cfg.n_layers):
        for neuron in (17, 63):
            for pos in (0, POS) if neuron == 17 else (POS,):
                df = Q.split_ffn_neuron(variant_model, cache, layer, neuron, pos)
                assert df.attrs["inputs"] == (["gate", "up"] if gated else ["pre"])
                for col in df.attrs["inputs"]:
                    hook = "hook_pre_linear" if col == "up" else "hook_pre"
                    cached = float(cache[f"blocks.{layer}.mlp.{hook}"][0, pos, neuron])
                    assert df[col].sum() == pytest.approx(cached, rel=1e-5, abs=1e-5)
                    assert _rel(df, col) < 1e-5
                    w, b, _ = Q.ffn_key(variant_model, layer, [neuron], col)
                    manual = _manual_input(
                        variant_model, cache, layer, "ln2", f"blocks.{layer}.hook_resid_mid", pos, w[:, 0], b[0]
                    )
                    assert float(manual) == pytest.approx(cached, rel=1e-4, abs=1e-4), (col, "hook semantics")


def test_value_split_is_exact(variant_model):
    _, cache = run_cache(variant_model)
    for layer in range(variant_model.cfg.n_layers):
        for head in range(variant_model.cfg.n_heads):
            for src in (4,):
                df = Q.split_value_neuron(variant_model, cache, layer, head, 3, src)
                v = cache[f"blocks.{layer}.attn.hook_v"][0, src]
                v = v.repeat_interleave(variant_model.cfg.n_heads // v.shape[0], dim=0)
                assert df["value"].sum() == pytest.approx(float(v[head, 3]), rel=1e-5, abs=1e-5)
                assert df.attrs["neuron"] == f"L{layer}.H{head}.d3.p{src}"


def test_contribution_of_one_part_matches_dense(variant_model):
    """One attention subvalue's and one FFN neuron's contribution, recomputed from the raw cache by hand."""
    _, cache = run_cache(variant_model)
    layer, neuron = 1, 9
    df = Q.split_ffn_neuron(variant_model, cache, layer, neuron, POS).set_index("name")
    col = df.attrs["inputs"][0]
    w, _, _ = Q.ffn_key(variant_model, layer, [neuron], col)
    key = raw_norm(variant_model, f"{layer}.ln2")[0].double() * w[:, 0].double()
    sigma = cache[f"blocks.{layer}.ln2.hook_scale"][0, POS].double().reshape(-1)[0]

    def contrib(vec):
        vec = vec.double()
        if variant_model.cfg.normalization_type in ("LN", "LNPre"):
            vec = vec - vec.mean()
        return float(vec @ key / sigma)

    # FFN neuron 5 of layer 0: m * W_out[5]
    m = cache["blocks.0.mlp.hook_post"][0, POS, 5]
    assert df.loc["L0.N5", col] == pytest.approx(
        contrib(m * variant_model.blocks[0].mlp.W_out.detach()[5]), rel=1e-4, abs=1e-6
    )
    # attention subvalue L1.H2.p3: pattern * v[3, kv(2)] @ W_O[2]
    pattern = cache["blocks.1.attn.hook_pattern"][0, 2, POS, 3]
    v = cache["blocks.1.attn.hook_v"][0, 3]
    v = v.repeat_interleave(variant_model.cfg.n_heads // v.shape[0], dim=0)[2]
    vec = pattern * v @ variant_model.blocks[1].attn.W_O.detach()[2]
    assert df.loc["L1.H2.p3", col] == pytest.approx(contrib(vec), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["hooked-gpt2", "hooked-llama-gqa", "bridge-gpt2-compat", "bridge-llama-gqa"])
def test_query_neuron_scores(name):
    model = _variant(name)
    _, cache = run_cache(model)
    ctx = S.make_context(model, cache, target=7)
    for kind in ("ffn_neuron", "attn_neuron", "attn"):  # "attn": the former name, still accepted
        df = Q.query_neuron_scores(ctx, n_value=4, value_kind=kind)
        assert df["score"].sum() == pytest.approx(df.attrs["total_imp"], rel=1e-4, abs=1e-5)
        assert df["score"].is_monotonic_decreasing
    # one FFN value neuron: the FFN-neuron rows of layer 0 sum to Imp * (mlp_out_0 - b_out_0) . K' / input
    top = S.score_ffn_neurons(ctx, top_k=1, layers=[1], n_top_tokens=0)
    k, imp = int(top["neuron"][0]), float(top["score"][0])
    col = "up" if model.cfg.gated_mlp else "pre"
    df = Q.split_ffn_neuron(model, cache, 1, k, POS)
    w, _, _ = Q.ffn_key(model, 1, [k], col)
    key = raw_norm(model, "1.ln2")[0].double() * w[:, 0].double()  # c(gamma * W[:, k]) / sigma, written out
    if model.cfg.normalization_type in ("LN", "LNPre"):
        key = key - key.mean()
    key = key / cache["blocks.1.ln2.hook_scale"][0, POS].double().reshape(-1)[0]
    b_out = getattr(model.blocks[0].mlp, "b_out", None)
    b_out = b_out.detach().double() if isinstance(b_out, torch.Tensor) else 0.0
    mlp0 = cache["blocks.0.hook_mlp_out"][0, POS].double() - b_out
    expected = imp * float(mlp0 @ key) / df.attrs["cached"][col]
    ctx1 = S.make_context(model, cache, target=7)
    q = Q.query_neuron_scores(ctx1, n_value=1)
    if q.attrs["total_imp"] == pytest.approx(imp):  # the global top-1 is in layer 1
        got = q[(q["kind"] == "ffn_neuron") & (q["layer"] == 0)]["score"].sum()
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_cross_layer_scores_exact_and_dense(variant_model):
    _, cache = run_cache(variant_model)
    ctx = S.make_context(variant_model, cache, target=5)
    df = Q.cross_layer_scores(ctx)
    n_layers = variant_model.cfg.n_layers
    assert len(df) == sum(1 + 2 * lv + 1 for lv in range(n_layers))
    col = "gate" if variant_model.cfg.gated_mlp else "pre"
    hook = "hook_pre"
    assert df.attrs["which"] == col
    for lv in range(n_layers):
        sub = df[df["value_layer"] == lv]
        neurons = S.score_ffn_neurons(ctx, top_k=None, layers=[lv], n_top_tokens=0)
        c = torch.zeros(variant_model.cfg.d_mlp, dtype=torch.float64)
        c[torch.tensor(neurons["neuron"].tolist())] = torch.tensor(neurons["score"].tolist(), dtype=torch.float64)
        pre = cache[f"blocks.{lv}.mlp.{hook}"][0, POS].double()
        lhs = (sub["helpful_eq24"] + sub["unhelpful_eq24"]).sum() + df.attrs["key_bias"][lv]
        assert lhs == pytest.approx(float(pre[c != 0].sum()), rel=1e-4, abs=1e-4)
        # Eq. 25 for the embedding row, by hand
        w, _, _ = Q.ffn_key(variant_model, lv, torch.arange(variant_model.cfg.d_mlp), col)
        key = raw_norm(variant_model, f"{lv}.ln2")[0].double()[:, None] * w.double()
        emb = cache["blocks.0.hook_resid_pre"][0, POS].double()
        if variant_model.cfg.normalization_type in ("LN", "LNPre"):
            emb = emb - emb.mean()
        inner = emb @ key / cache[f"blocks.{lv}.ln2.hook_scale"][0, POS].double().reshape(-1)[0]
        row = sub[sub["query"] == "embed"].iloc[0]
        assert row["helpful_eq25"] == pytest.approx(float((inner * c)[c > 0].sum()), rel=1e-3, abs=1e-5)
        assert row["unhelpful_eq25"] == pytest.approx(float((inner * c)[c < 0].sum()), rel=1e-3, abs=1e-5)
    mat = Q.cross_layer_matrix(df, "helpful_eq24")
    assert list(mat.index)[:2] == ["embed", "L0.attn"] and list(mat.columns) == list(range(n_layers))


@pytest.mark.parametrize("name", ["hooked-gpt2", "bridge-llama-gqa"])
def test_bad_input(name):
    variant_model = _variant(name)
    _, cache = run_cache(variant_model)
    with pytest.raises(InvalidInputError, match="cannot parse component name"):
        Q.split_neuron(variant_model, cache, "L1.Nx")
    with pytest.raises(InvalidInputError, match="neuron 64 .* out of range"):
        Q.split_neuron(variant_model, cache, "L1.N64")
    with pytest.raises(InvalidInputError, match="layer 7 .* out of range"):
        Q.split_neuron(variant_model, cache, "L7.N1")
    with pytest.raises(InvalidInputError, match="head 4 .* out of range"):
        Q.split_neuron(variant_model, cache, "L1.H4.d0.p0")
    with pytest.raises(InvalidInputError, match="head dimension 8"):
        Q.split_neuron(variant_model, cache, "L1.H0.d8.p0")
    with pytest.raises(InvalidInputError, match="source position 8"):
        Q.split_neuron(variant_model, cache, "L1.H0.d0.p8")
    with pytest.raises(InvalidInputError, match="does not exist for this model's MLP"):
        Q.ffn_key(variant_model, 0, [0], "value")
    ctx = S.make_context(variant_model, cache)
    with pytest.raises(InvalidInputError, match="n_value"):
        Q.query_neuron_scores(ctx, n_value=0)
    with pytest.raises(InvalidInputError, match="column 'x'"):
        Q.cross_layer_matrix(Q.cross_layer_scores(ctx, value_layers=[0]), "x")


# ---------------------------------------------------------------- the real model


def test_smollm2_query_split(paris):
    model, cache, _ = paris
    df = Q.split_neuron(model, cache, "L24.N1005")
    assert df.attrs["inputs"] == ["gate", "up"]
    for col, hook in (("gate", "hook_pre"), ("up", "hook_pre_linear")):
        assert df[col].sum() == pytest.approx(float(cache[f"blocks.24.mlp.{hook}"][0, -1, 1005]), abs=1e-4)
        assert _rel(df, col) < 1e-6
    # known answer (computed once; see docs/query.md): the gate's largest query part is FFN neuron L22.N916
    assert Q.top_query_parts(df, "gate", 1)["name"][0] == "L22.N916"
    v = Q.split_neuron(model, cache, "L23.H4.d55.p4")
    assert v["value"].sum() == pytest.approx(float(cache["blocks.23.attn.hook_v"][0, 4, 4 // 3, 55]), abs=1e-4)


def _invoke(args):
    from typer.testing import CliRunner

    from tl_residual.cli import app

    result = CliRunner().invoke(app, args)
    text = result.output + (getattr(result, "stderr", "") if getattr(result, "stderr_bytes", None) else "")
    return result, text


def test_cli_query(paris, tmp_path):
    import json

    path = tmp_path / "q.json"
    result, text = _invoke(
        ["query", "--prompt", "The capital of France is", "--neuron", "L24.N1005", "--top-k", "3", "--json", str(path)]
    )
    assert result.exit_code == 0, text
    data = json.loads(path.read_text())
    assert data["neuron"] == "L24.N1005" and set(data["inputs"]) == {"gate", "up"}
    assert data["inputs"]["gate"]["top"][0]["name"] == "L22.N916"
    assert data["inputs"]["gate"]["abs_error"] < 1e-4 and len(data["inputs"]["up"]["top"]) == 3


@pytest.mark.parametrize(
    "neuron,message",
    [
        ("L24.Nx", "cannot parse"),
        ("L24.N1536", "neuron 1536"),
        ("L23.H9.d0.p4", "head 9"),
        ("L23.H1.d0.p6", "source position 6"),
    ],
)
def test_cli_query_bad_neuron(paris, neuron, message):
    result, text = _invoke(["query", "--prompt", "The capital of France is", "--neuron", neuron])
    assert result.exit_code == 2, text
    assert "error:" in text and message in text and "Traceback" not in text
