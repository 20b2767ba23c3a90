"""The factual-prompt dataset, the paper's filter, and a reduced faithfulness benchmark on SmolLM2-135M."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from tl_residual import datasets as DS
from tl_residual.decompose import ffn_parts
from tl_residual.errors import InvalidInputError
from tl_residual.scorers import SCORERS, make_context

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("faithfulness_benchmark", ROOT / "benchmarks" / "faithfulness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dataset_loads_with_header():
    df = DS.load_factual_prompts()
    assert len(df) == 442 and list(df.columns) == ["type", "prompt", "answer"]
    assert set(df["type"]) == set(DS.KNOWLEDGE_TYPES)
    assert all(a.startswith(" ") for a in df["answer"])
    header = DS.dataset_header()
    for t in DS.KNOWLEDGE_TYPES:
        assert header["types"][t]["source"] and " " + "x" not in header["types"][t]["candidates"]
        # every answer of a type is one of its candidates (the filter compares against them)
        assert set(df.loc[df["type"] == t, "answer"]) <= set(header["types"][t]["candidates"])
    assert len(DS.load_factual_prompts("month")) == 72
    with pytest.raises(InvalidInputError, match="unknown knowledge type"):
        DS.load_factual_prompts(["planets"])


def test_filter_known_answers(smollm2):
    prompts = pd.DataFrame(
        {
            "type": ["capital", "capital", "capital", "month"],
            "prompt": [
                "The capital of France is",
                "The capital of France is",
                "The capital of France is",
                "The capital of France is",
            ],
            "answer": [" Paris", " Rome", " Parisian", " May"],
        }
    )
    df = DS.filter_prompts(smollm2, prompts)
    assert df["keep"].tolist() == [True, False, False, False]
    assert df.loc[0, "answer_rank"] == 1 and 0.6 < df.loc[0, "answer_prob"] < 0.9
    assert bool(df.loc[0, "beats_candidates"]) and not bool(df.loc[1, "beats_candidates"])
    assert df["single_token"].tolist() == [True, True, False, True]
    assert df.loc[3, "answer_rank"] > 10
    assert df.attrs["survivors"]["capital"] == 1 and df.attrs["survivors"]["total"] == 1
    with pytest.raises(InvalidInputError, match="lacks column"):
        DS.filter_prompts(smollm2, prompts.drop(columns=["answer"]))


@pytest.mark.slow
def test_rank_table_matches_registry_inverse_rank(paris):
    """The per-target rank table (computed once for all prompts) gives the registry's 1/rank scores."""
    F = _benchmark_module()
    model, cache, _ = paris
    ctx = make_context(model, cache, " Paris")
    table = F.target_rank_table(model, ctx.lens, [ctx.target], layers=[29])[ctx.target]
    group = ffn_parts(model, cache, 29, ctx.position)[0]
    expected = SCORERS["inverse_rank"].fn(ctx, group, ctx.base_for(group))
    torch.testing.assert_close(1.0 / table[29 * 1536 :].double(), expected.double())
    coefs = F.ffn_coefficients(model, cache, ctx.position, 0)
    only_29 = table.clone()
    only_29[: 29 * 1536] = 10**9  # layers not computed: rank "infinity", score 0
    names = F.rank_method_top_k(model, coefs, only_29, "coefficient_inverse_rank", 5)
    dense = SCORERS["coefficient_inverse_rank"].fn(ctx, group, ctx.base_for(group))
    assert names == [f"L29.N{int(i)}" for i in torch.argsort(dense, descending=True, stable=True)[:5]]


@pytest.mark.slow
def test_reduced_benchmark_lowers_probability_more_than_random(smollm2):
    """CI version of Table 2: zeroing log_prob_increase's top-10 FFN neurons lowers the target's probability on
    every prompt, and by more than zeroing 10 random neurons."""
    F = _benchmark_module()
    tok = smollm2.tokenizer
    prompts = pd.DataFrame(
        {
            "type": ["capital", "language", "country"],
            "prompt": [
                "The capital of France is",
                "In Spain, most people speak",
                "The Eiffel Tower is located in the country of",
            ],
            "answer_id": [tok.encode(w, add_special_tokens=False)[0] for w in (" Paris", " Spanish", " France")],
        }
    )
    res = F.run_benchmark(
        smollm2, prompts, methods=("log_prob_increase",), ks=(10,), attention=False, batch_size=3, progress=False
    )
    df = res.frame()
    lpi = df[df.method == "log_prob_increase"].set_index("prompt_index")
    rnd = df[df.method == "random"].set_index("prompt_index")
    assert len(lpi) == 3 and (lpi["k"] == 10).all()
    assert (lpi["prob"] < lpi["prob_before"]).all()
    assert (lpi["prob_before"] - lpi["prob"]).mean() > (rnd["prob_before"] - rnd["prob"]).mean() + 0.05
    assert (lpi["logp"] < rnd["logp"]).all()
    summary = F.summarise(df, ["method", "k"]).set_index("method")
    assert summary.loc["log_prob_increase", "mrr"] <= summary.loc["none", "mrr"]
    assert "a) log-prob increase" in F.markdown(res)


# ----------------------------------------------------------------------------------------------
# The fast paths of tl_residual.faithfulness equal the reference computations (tiny random models)
# ----------------------------------------------------------------------------------------------

FAST_METHODS = ("log_prob_increase", "log_prob", "prob_increase", "norm", "coefficient", "coefficient_norm")


def _tiny_models() -> list[tuple[str, Any]]:
    from conftest import HAS_BRIDGE, HAS_HOOKED, make_bridge, make_hooked

    out = []
    if HAS_HOOKED:
        out.append(("hooked-llama", lambda: make_hooked("llama", n_kv_heads=2)))
        out.append(("hooked-gpt2", lambda: make_hooked("gpt2")))
    if HAS_BRIDGE:
        out.append(("bridge-llama", lambda: make_bridge("llama", n_kv_heads=2)))
    return out


@functools.cache
def _tiny(name: str) -> Any:
    return dict(_tiny_models())[name]()


@pytest.fixture(params=[n for n, _ in _tiny_models()] or ["none"])
def tiny_cached(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    from conftest import run_cache

    if request.param == "none":
        pytest.skip("no model API in this TransformerLens version")
    model = _tiny(request.param)
    return model, run_cache(model)[1]


@pytest.mark.parametrize("target", [5, 17])
def test_ffn_selector_equals_library_top_k(tiny_cached, target):
    """FfnSelector (exact scores shared by a, b, c; one sort for d, e, g) gives the library's top-k, in order, for
    every k, and its top-30 prefixes are the library's top-3 and top-10."""
    from tl_residual.faithfulness import FfnSelector
    from tl_residual.scorers import score_ffn_neurons

    model, cache = tiny_cached
    sel = FfnSelector(make_context(model, cache, target))
    for m in FAST_METHODS:
        fast = sel.top_k(m, 30)
        for k in (3, 10, 30):
            ref = score_ffn_neurons(make_context(model, cache, target), m, top_k=k, n_top_tokens=0)["name"].tolist()
            assert fast[:k] == ref, (m, k)
    assert sel.n_exact > 0
    # the shared exact scores are the library's pruned scores, bit for bit (the table's float32 column)
    index = {sel.name(i): i for i in range(len(sel.known))}
    for m in ("log_prob_increase", "log_prob", "prob_increase"):
        df = score_ffn_neurons(make_context(model, cache, target), m, top_k=30, n_top_tokens=0)
        mine = torch.stack([sel.exact[m][index[n]] for n in df["name"]]).float()
        assert torch.equal(mine, torch.tensor(df["score"].to_numpy())), m


@pytest.mark.parametrize("cap", [1, 3, 61])
def test_rank_table_equals_full_table_and_raw_ranks(tiny_cached, cap):
    """RankTable's known ranks equal the full table (target_rank_table) and ranks counted from raw weights;
    its top-k for methods f and h equal rank_method_top_k on the full table, for caps that force re-counting."""
    from conftest import raw_frozen_logits
    from tl_residual import faithfulness as F
    from tl_residual.lens import Lens

    model, cache = tiny_cached
    lens = Lens(model, cache, -1, 0, "frozen")
    targets = [5, 17, 17, 40]
    table = F.RankTable(model, lens, targets, cap=cap, chunk_rows=16)
    full = F.target_rank_table(model, lens, targets, chunk_rows=16)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    W_out = torch.cat([model.blocks[layer].mlp.W_out.detach() for layer in range(n_layers)])
    z = raw_frozen_logits(model, cache, W_out)  # [n_neurons, d_vocab], float64, from raw weights
    for tok in sorted(set(targets)):
        col = table.ranks[:, table.column[tok]].long()
        raw = 1 + (z > z[:, tok : tok + 1]).sum(1)
        known = col > 0
        assert torch.equal(col[known], full[tok][known]) and torch.equal(col[known], raw[known])
        assert bool((full[tok][~known] > min(cap, z.shape[1])).all())
    coefs = F.ffn_coefficients(model, cache, -1 % cache["blocks.0.hook_resid_pre"].shape[1], 0)
    for tok in (5, 17, 40):
        for m in F.RANK_METHODS:
            for k in (1, 7, 50):
                want = F.rank_method_top_k(model, coefs, full[tok], m, k)
                assert table.top_k(coefs, tok, m, k) == want, (tok, m, k)
    if cap == 1:
        assert table.n_resolved > 0  # the certification had to re-count some chunks
    assert len(table.targets) == 3 and n_layers * d_mlp == table.ranks.shape[0]


@pytest.mark.parametrize("rank_cap", [None, 2])
def test_run_benchmark_selections_equal_reference(tiny_cached, rank_cap, tmp_path):
    """End to end: run_benchmark's selected names (fast paths: FfnSelector, RankTable with a small cap) equal the
    reference computations written out here (the library's scorers per method at the largest k, the full rank
    table), for every method, and the Appendix C lists."""
    from conftest import run_cache
    from tl_residual import faithfulness as F
    from tl_residual.lens import Lens
    from tl_residual.scorers import PAPER_METHODS, score_attention_neurons, score_ffn_neurons

    model, _ = tiny_cached
    prompts = pd.DataFrame(
        {
            "type": ["a", "b", "a"],
            "prompt": ["t5 t17 t33 t8", "t9 t23 t4", "t40 t41 t3 t12 t30"],
            "answer_id": [7, 11, 7],
        }
    )
    res = F.run_benchmark(
        model, prompts, PAPER_METHODS, ks=(2, 12), attention=True, batch_size=1, progress=False, rank_cap=rank_cap
    )
    got = {(s["prompt_index"], s["method"]): s["components"] for s in res.selections}
    first = run_cache(model, F.I.tokenize_batch(model, [prompts.prompt[0]]).tokens)[1]
    full = F.target_rank_table(model, Lens(model, first, -1, 0, "frozen"), [7, 11])
    for i, row in prompts.iterrows():
        cache = run_cache(model, F.I.tokenize_batch(model, [row.prompt]).tokens)[1]
        ctx = make_context(model, cache, int(row.answer_id))
        coefs = F.ffn_coefficients(model, cache, ctx.position, 0)
        for m in PAPER_METHODS:
            if m in F.RANK_METHODS:
                want = F.rank_method_top_k(model, coefs, full[int(row.answer_id)], m, 12)
            else:
                want = score_ffn_neurons(ctx, m, top_k=12, n_top_tokens=0)["name"].tolist()
            assert got[(i, m)] == want, (i, m)
        att = score_attention_neurons(ctx, "log_prob_increase", top_k=200, n_top_tokens=0)["name"].tolist()
        assert got[(i, "appendix_c")] == att + got[(i, "log_prob_increase")][:100]
    assert res.info["n_exact"] > 0 and set(res.info["cpu_s"]) >= {"rank_table", "interventions"}
    # written and read back: the same records and selections (Parquet beside the JSON summaries)
    F.write(res, str(tmp_path / "faith"))
    back = F.read(str(tmp_path / "faith"))
    assert back.selections == res.selections
    pd.testing.assert_frame_equal(back.frame(), res.frame(), check_dtype=False)
    assert back.info == res.info and (tmp_path / "faith.md").exists()


def test_read_names_the_missing_files(tmp_path):
    from tl_residual import faithfulness as F

    (tmp_path / "run.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"run\.records\.parquet.*run\.selections\.parquet"):
        F.read(str(tmp_path / "run"))
