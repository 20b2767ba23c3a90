"""Issue 12: every bad input, fault and edge case gives a clear error (a TLResidualError subclass naming what was
wrong) or the correct number, in bounded memory. One test per case; property-based tests for names, positions,
targets and padding sides. Tiny random models (tests/conftest.py) except where the real model's numbers matter."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import HAS_BRIDGE, HAS_HOOKED, _variant, run_cache
from tl_residual import cli, explain, names
from tl_residual import decompose as D
from tl_residual import interventions as I
from tl_residual import model as tlm
from tl_residual import scorers as S
from tl_residual._io import atomic_write_text, check_writable
from tl_residual.errors import (
    InvalidInputError,
    MissingHookError,
    TLResidualError,
    UnsupportedArchitectureError,
)
from tl_residual.lens import model_logits, resolve_target

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
#: one HookedTransformer (TL3) or one bridge (TL4), Llama style (rotary, GQA) and GPT-2 style (learned positions)
TINY = ["hooked-llama-gqa", "hooked-gpt2"] if HAS_HOOKED else ["bridge-llama-gqa", "bridge-gpt2"]


def tiny(i: int = 0):
    return _variant(TINY[i])


# ----------------------------------------------------------------------------------------------
# Component names (property-based)
# ----------------------------------------------------------------------------------------------

_idx = st.integers(min_value=0, max_value=10**6)


@st.composite
def component_refs(draw):
    kind = draw(st.sampled_from(names.KINDS))
    fields = names.FIELDS[kind]
    return names.ComponentRef(kind, **{f: draw(_idx) for f in fields})


@SETTINGS
@given(component_refs())
def test_names_parse_format_round_trip(ref):
    assert names.parse(names.format(ref)) == ref
    assert names.parse(ref.name) == ref


@SETTINGS
@given(st.text(max_size=30))
def test_names_random_text_is_a_name_or_invalid_input(text):
    try:
        ref = names.parse(text)
    except InvalidInputError:
        return
    assert names.parse(names.format(ref)) == ref  # whatever parses means one component


@SETTINGS
@given(component_refs(), st.sampled_from(["x", "-", "..", " 7", "L", ".p", "#"]), st.data())
def test_names_malformed_strings_raise_invalid_input(ref, junk, data):
    name = names.format(ref)
    cut = data.draw(st.integers(min_value=1, max_value=len(name)))
    bad = name[:cut] + junk + name[cut:]
    for text in (bad, "L-1.N3", "L3.", "L3.H", "L3.N", "N5", "L3.H2.p", "L3.H2.d", ""):
        try:
            got = names.parse(text)
        except InvalidInputError as exc:
            assert repr(text.strip()) in str(exc) or "component name" in str(exc)
            continue
        assert names.format(got) != text or names.parse(names.format(got)) == got


# ----------------------------------------------------------------------------------------------
# Positions: resolved once, the same way, in every function
# ----------------------------------------------------------------------------------------------


@functools.cache
def _tiny_cache(i: int = 0):
    return run_cache(tiny(i))[1]


def test_attention_parts_negative_position_has_subvalues():
    model, cache = tiny(), _tiny_cache()
    n = D.n_positions(cache)
    sub, _ = D.attention_parts(model, cache, 0, -1)
    ref, _ = D.attention_parts(model, cache, 0, n - 1)
    assert len(sub) == model.cfg.n_heads * n  # was 0: n_src = position + 1 with position = -1
    assert sub.names == ref.names
    torch.testing.assert_close(sub.vectors, ref.vectors)


@SETTINGS
@given(st.integers(min_value=-12, max_value=12))
def test_positions_resolve_the_same_everywhere(position):
    model, cache = tiny(), _tiny_cache()
    n = D.n_positions(cache)
    fns = [
        lambda p: D.attention_parts(model, cache, 1, p)[0],
        lambda p: D.ffn_parts(model, cache, 1, p)[0],
        lambda p: D.attention_neuron_parts(model, cache, 1, p),
        lambda p: D.embedding_parts(model, cache, p)[0],
    ]
    if not -n <= position < n:
        for fn in fns:
            with pytest.raises(InvalidInputError, match=f"position {position} is out of range"):
                fn(position)
        return
    for fn in fns:
        a, b = fn(position), fn(position % n)
        assert a.names == b.names
        torch.testing.assert_close(a.vectors, b.vectors)


# ----------------------------------------------------------------------------------------------
# Prompts longer than n_ctx: refused, never truncated
# ----------------------------------------------------------------------------------------------

LONG = " ".join(f"t{5 + i % 50}" for i in range(40))  # 40 words + BOS > n_ctx = 32


def test_long_prompt_refused_everywhere():
    model = tiny()
    assert tlm.n_ctx(model) == 32
    for call in (
        lambda: tlm.to_tokens(model, LONG),
        lambda: explain(model, LONG),
        lambda: I.tokenize_batch(model, ["t5 t6", LONG]),
        lambda: I.intervene(model, LONG, "L0.N1"),
    ):
        with pytest.raises(InvalidInputError, match=r"the prompt is \d+ tokens long.*n_ctx=32"):
            call()
    assert tlm.to_tokens(model, "t5 t6").shape[-1] <= 3  # a short prompt is untouched


# ----------------------------------------------------------------------------------------------
# NaN / inf
# ----------------------------------------------------------------------------------------------


def _poisoned(hook: str, pos: int, value: float) -> dict:
    cache = {k: v.clone() for k, v in _tiny_cache().items()}
    cache[hook][0, pos, 3] = value
    return cache


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_activation_raises_naming_hook_layer_position(value):
    model = tiny()
    cache = _poisoned("blocks.1.mlp.hook_post", 2, value)
    with pytest.raises(InvalidInputError, match=r"blocks\.1\.mlp\.hook_post \(layer 1\).*position 2"):
        S.make_context(model, cache, None, -1)
    assert len(S.score_neurons(S.make_context(model, cache, None, 1), top_k=3)) == 3  # before the NaN: fine


def test_non_finite_after_destination_is_harmless():
    model = tiny()
    cache = _poisoned("blocks.0.hook_resid_mid", 5, float("nan"))
    ctx = S.make_context(model, cache, None, 3)  # causal: position 5 cannot reach position 3
    assert ctx.position == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "replace", "value": float("nan")},
        {"mode": "scale", "factor": float("inf")},
        {"mode": "scale", "factor": np.float32("nan")},
    ],
)
def test_non_finite_intervention_values_raise(kwargs):
    with pytest.raises(InvalidInputError, match="finite"):
        I.intervene(tiny(), "t5 t6 t7", "L0.N1", **kwargs)


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def test_unknown_word_target_raises():
    model = tiny()
    for target in ("zzzz", "Paris"):
        with pytest.raises(InvalidInputError, match=rf"{target}.*not in the vocabulary.*unknown token"):
            resolve_target(model, target)
    assert resolve_target(model, "t0") == 0  # the unknown token itself, asked for by name, is allowed


@SETTINGS
@given(st.integers(min_value=-100, max_value=200), st.sampled_from(["int", "np64", "np32", "tensor0d", "tensor1"]))
def test_target_ids_of_every_integer_type(token, kind):
    model = tiny()
    value = {
        "int": token,
        "np64": np.int64(token),
        "np32": np.int32(token),
        "tensor0d": torch.tensor(token),
        "tensor1": torch.tensor([token]),
    }[kind]
    d_vocab = model.cfg.d_vocab
    if 0 <= token < d_vocab:
        got = resolve_target(model, value)
        assert got == token and type(got) is int
    else:
        with pytest.raises(InvalidInputError, match=f"{token} is out of range"):
            resolve_target(model, value)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 3.0, torch.tensor(3.0), torch.tensor([1, 2]), [3], ""])
def test_bad_target_types_raise(bad):
    with pytest.raises(InvalidInputError, match="target"):
        resolve_target(tiny(), bad)


# ----------------------------------------------------------------------------------------------
# Left padding: names in prompt coordinates everywhere (property-based over prompts and padding sides)
# ----------------------------------------------------------------------------------------------


def _batched_cache(model, batch):
    kwargs = I._forward_kwargs(batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, **kwargs)
    return cache


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.lists(st.integers(min_value=3, max_value=60), min_size=1, max_size=6), min_size=2, max_size=3),
    st.sampled_from(["left", "right"]),
    st.integers(min_value=0, max_value=1),
)
def test_batched_names_match_single_prompts(words, side, which):
    model = tiny(which)
    prompts = [" ".join(f"t{w}" for w in ws) for ws in words]
    batch = I.tokenize_batch(model, prompts, side)
    cache = _batched_cache(model, batch)
    kinds = ("attn_subvalue", "ffn_neuron", "attn_neuron")
    df = S.score_neurons_batch(
        model,
        cache,
        top_k=8,
        positions=batch.last_index.tolist(),
        kinds=kinds,
        offsets=batch.offsets.tolist(),
        n_top_tokens=0,
    )
    for b, p in enumerate(prompts):
        _, single = run_cache(model, tlm.to_tokens(model, p))
        ref = S.score_neurons(
            S.make_context(model, single, int(df[df.prompt == b].target.iloc[0])), top_k=8, kinds=kinds, n_top_tokens=0
        )
        got = df[df.prompt == b].reset_index(drop=True)
        assert (got["position"] == int(batch.lengths[b]) - 1).all()
        assert set(got["name"]) == set(ref["name"]) or np.allclose(sorted(got.score), sorted(ref.score), atol=1e-4)
        np.testing.assert_allclose(got["score"].values, ref["score"].values, rtol=1e-3, atol=1e-4)
        assert (got["src_pos"] < int(batch.lengths[b])).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_padded_names_zero_the_same_component_tiny(side):
    model = tiny()
    prompts = ["t5 t17 t33 t8 t42 t9", "t9 t23"]
    batch = I.tokenize_batch(model, prompts, side)
    df = S.score_neurons_batch(
        model,
        _batched_cache(model, batch),
        top_k=2,
        kinds=("attn_subvalue",),
        offsets=batch.offsets.tolist(),
        n_top_tokens=0,
    )
    tops = [df[df.prompt == b]["name"].tolist() for b in range(len(prompts))]
    padded = I.intervene(model, prompts, tops, padding_side=side).to_dataframe()
    for b, p in enumerate(prompts):
        alone = I.intervene(model, p, tops[b]).to_dataframe().iloc[0]
        assert abs(padded.prob_after[b] - alone.prob_after) < 1e-5


def test_offsets_validated():
    model = tiny()
    batch = I.tokenize_batch(model, ["t5 t6 t7", "t5"], "left")
    cache = _batched_cache(model, batch)
    with pytest.raises(InvalidInputError, match="offsets has 3 entries"):
        S.score_neurons_batch(model, cache, top_k=2, offsets=[0, 1, 2])
    with pytest.raises(InvalidInputError, match="offset 9"):
        S.score_neurons_batch(model, cache, top_k=2, offsets=[0, 9])


@pytest.mark.slow
def test_smollm2_left_padding_zeroes_the_same_subvalues(smollm2):
    """The issue's case: zeroing the top-2 subvalues of "The capital of France is" moves p(' Paris') 0.749 ->
    0.2335 whatever the padding (was 0.7486 under left padding: names in padded coordinates)."""
    prompts = ["The capital of France is", "In Spain, most people in the big cities speak"]
    probs = {}
    for side in ("left", "right"):
        batch = I.tokenize_batch(smollm2, prompts, side)
        df = S.score_neurons_batch(
            smollm2,
            _batched_cache(smollm2, batch),
            top_k=2,
            kinds=("attn_subvalue",),
            positions=batch.last_index.tolist(),
            targets=[" Paris", None],
            offsets=batch.offsets.tolist(),
            n_top_tokens=0,
        )
        top2 = df[df.prompt == 0]["name"].tolist()
        res = I.intervene(smollm2, prompts[0], top2, targets=" Paris").to_dataframe().iloc[0]
        probs[side] = (top2, res.prob_before, res.prob_after)
    assert probs["left"][0] == probs["right"][0]
    assert abs(probs["left"][1] - 0.749) < 2e-3
    assert abs(probs["left"][2] - 0.2335) < 2e-3 and abs(probs["left"][2] - probs["right"][2]) < 1e-5


# ----------------------------------------------------------------------------------------------
# explain: bounded memory, same numbers
# ----------------------------------------------------------------------------------------------


def test_explain_position_cache_gives_the_full_cache_numbers():
    model = tiny()
    prompt = "t5 t17 t33 t8 t42"
    e = explain(model, prompt, top_k=6)
    _, full = run_cache(model, tlm.to_tokens(model, prompt))
    ctx = S.make_context(model, full, None, -1)
    for got, ref in (
        (e.attention_subvalues, S.score_attention_subvalues(ctx, "log_prob_increase", 6)),
        (e.ffn_neurons, S.score_ffn_neurons(ctx, "log_prob_increase", 6)),
    ):
        assert got["name"].tolist() == ref["name"].tolist()
        # the same numbers up to float32 rounding (the position cache sums in another order): ~5e-7 nats
        np.testing.assert_allclose(got["score"].values, ref["score"].values, rtol=1e-5, atol=1e-6)
    cache = e.cache
    assert isinstance(cache, tlm.PositionCache) and not any("attn_scores" in k for k in cache)
    assert cache["blocks.0.attn.hook_pattern"].stride()[2] == 0  # one row, repeated without memory
    with pytest.raises(MissingHookError, match=f"destination position {e.position} only"):
        D.attention_parts(model, cache, 0, 1)


def test_explain_streamed_subvalue_search_is_the_one_shot_top_k(monkeypatch):
    import sys

    E = sys.modules["tl_residual.explanation"]
    model = tiny()
    prompt = "t5 t17 t33 t8 t42 t9 t23"
    one_shot = explain(model, prompt, top_k=7).attention_subvalues
    monkeypatch.setattr(E, "STREAM_BYTES", 0)  # force the layer-by-layer search
    streamed = explain(model, prompt, top_k=7).attention_subvalues
    assert streamed["name"].tolist() == one_shot["name"].tolist()
    # float32 rounding of different matmul batches
    np.testing.assert_allclose(streamed["score"].values, one_shot["score"].values, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Models the decomposition cannot read
# ----------------------------------------------------------------------------------------------


def test_meta_device_model_raises():
    from conftest import make_bridge, make_hooked

    meta = (make_hooked("gpt2") if HAS_HOOKED else make_bridge("gpt2")).to("meta")  # a fresh model, not the shared
    with pytest.raises(InvalidInputError, match="'meta' device"):
        tlm.model_spec(meta)


def test_opt_post_layer_norm_raises():
    from conftest import make_bridge, make_hooked

    model = make_hooked("gpt2") if HAS_HOOKED else make_bridge("gpt2")
    model.cfg.do_layer_norm_before = False  # OPT-350m's config flag
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before=False"):
        tlm.model_spec(model)


@pytest.mark.skipif(not HAS_BRIDGE, reason="needs TransformerBridge")
def test_real_opt_post_layer_norm_raises():
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import OPTConfig, OPTForCausalLM

    from conftest import tiny_tokenizer

    hf = OPTForCausalLM(
        OPTConfig(
            vocab_size=61,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            do_layer_norm_before=False,
            word_embed_proj_dim=16,
        )
    ).eval()
    try:
        bridge = TransformerBridge.boot_transformers("facebook/opt-125m", hf_model=hf, tokenizer=tiny_tokenizer())
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - needs the hub config offline
        pytest.skip(f"cannot wrap a tiny OPT offline: {type(exc).__name__}")
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before=False"):
        tlm.model_spec(bridge)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_previous_file(tmp_path, monkeypatch, fault):
    path = tmp_path / "result.json"
    path.write_text("previous")

    def boom(*args):
        raise fault

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(type(fault)):
        atomic_write_text(str(path), "new " * 1000)
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left
    monkeypatch.undo()
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new"


def test_check_writable(tmp_path):
    for bad, what in (
        (str(tmp_path), "is a folder"),
        (str(tmp_path / "no" / "x.json"), "does not exist"),
        ("", "empty"),
    ):
        with pytest.raises(InvalidInputError, match=what):
            check_writable(bad, "--json")


# ----------------------------------------------------------------------------------------------
# The command line: validated before the model loads, exit status 2, no traceback; flags as flags
# ----------------------------------------------------------------------------------------------

runner = CliRunner()

BAD_COMMANDS = [
    (["explain", "-p", "x", "--json", "/nonexistent-dir/a.json"], "/nonexistent-dir"),
    (["explain", "-p", "x", "--html", "/"], "is a folder"),
    (["explain", "-p", "x", "--lens", "bogus"], "lens convention 'bogus'"),
    (["explain", "-p", "x", "--method", "bogus"], "unknown method 'bogus'"),
    (["explain", "-p", "x", "--top-k", "0"], "--top-k"),
    (["explain", "-p", "x", "--target", "a", "--target-id", "3"], "not both"),
    (["explain", "-p", "x", "--target-id", "-1"], "--target-id"),
    (["explain", "-p", "  "], "prompt is empty"),
    (["query", "-p", "x", "-n", "L3.X5"], "L3.X5"),
    (["query", "-p", "x", "-n", "L3.H1.p2"], "attn_subvalue"),
    (["query", "-p", "x", "-n", "L3.N1", "--json", "/nonexistent-dir/q.json"], "/nonexistent-dir"),
    (["ablate", "-p", "x", "-n", "L3.N4", "--mode", "replace", "--value", "nan"], "--value must be a finite"),
    (["ablate", "-p", "x", "-n", "L3.N4", "--mode", "scale", "--factor", "inf"], "--factor must be a finite"),
    (["ablate", "-p", "x", "-n", "L3.N4,L2"], "'L2'"),
    (["ablate", "-p", "x", "-n", "L3.N4", "--mode", "bogus"], "--mode 'bogus'"),
    (["explain", "-p", "x", "--top-k", "many"], "--top-k"),
]


@pytest.mark.parametrize("args,message", BAD_COMMANDS, ids=[" ".join(a[:1] + a[3:5]) for a, _ in BAD_COMMANDS])
def test_cli_rejects_bad_options_before_loading(monkeypatch, args, message):
    def no_load(name):
        raise AssertionError("the model was loaded before the options were validated")

    monkeypatch.setattr(cli, "load", no_load)
    result = runner.invoke(cli.app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert message in out
    assert "Traceback" not in out and not isinstance(result.exception, AssertionError)


@pytest.mark.parametrize("command", [[], ["explain"], ["query"], ["ablate"], ["methods"]])
def test_cli_help_shows_flags_as_flags(command):
    result = runner.invoke(cli.app, [*command, "--help"])
    assert result.exit_code == 0 and "--help" in result.output
    assert "<bool>" not in result.output


def test_library_errors_are_one_class():
    for cls in (InvalidInputError, MissingHookError, UnsupportedArchitectureError):
        assert issubclass(cls, TLResidualError)


@pytest.mark.slow
def test_cli_target_id_and_space_hint(paris, tmp_path):
    smollm2, cache, _ = paris
    paris_id = smollm2.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    out = tmp_path / "e.json"
    out.write_text("old")
    res = runner.invoke(
        cli.app,
        ["explain", "-p", "The capital of France is", "--target-id", str(paris_id), "-k", "2", "--json", str(out)],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["target_id"] == paris_id and abs(data["target_prob"] - 0.749) < 2e-3
    logits = model_logits(smollm2, cache, -1)
    bare = smollm2.tokenizer.encode("Paris", add_special_tokens=False)
    assert len(bare) == 1
    with pytest.warns(UserWarning, match=r"hint: target 'Paris'.*' Paris'"):
        assert resolve_target(smollm2, "Paris", logits) == bare[0]
    res = runner.invoke(cli.app, ["ablate", "-p", "The capital of France is", "-n", "L24.N1005", "-t", "Paris"])
    assert res.exit_code == 0 and "hint: target 'Paris'" in " ".join(res.output.split())
