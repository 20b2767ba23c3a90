"""tl_residual.study: dataset-scale runs on a tiny random GPT-2 saved to disk (loaded by path, as the CLI does).

Checks: every input format gives the same results; a run killed with SIGKILL (and one interrupted by Ctrl-C)
resumes to exactly the results of an uninterrupted run; other options into the same folder are refused; failing
prompts are recorded; names mean the same component to ``intervene`` (checked against a computation from the
weights and the single-prompt cache); scores equal the single-prompt scorers; two processes (accelerate launch, gloo)
give the same merged results as one. The SmolLM2 end-to-end run of ``--data builtin:factual`` is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tl_residual import study as st
from tl_residual.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"t{i}" for i in range(3, 10)]


def _prompts(n: int, seed: int = 0) -> list[dict]:
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(g.integers(1, 7))
        row = {"prompt": " ".join(g.choice(WORDS, length)), "kind": "ab"[i % 2]}
        if i % 3 == 0:
            row["target"] = str(g.choice(WORDS))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random GPT-2 (2 layers, d_model 32) and the tests' word-level tokenizer, saved as a Hugging Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import VOCAB, _randomize, tiny_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64, bos_token_id=1, eos_token_id=2
    )
    hf = GPT2LMHeadModel(cfg)
    _randomize(hf, 0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    from tl_residual.model import load_model

    try:
        return load_model(model_dir)
    except Exception as exc:  # noqa: BLE001 - a TransformerLens without a loader for local folders
        pytest.skip(f"this TransformerLens cannot load a saved model folder: {exc}")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _prompts(9)), encoding="utf-8")
    return path


FAST = {
    "target_column": "target",
    "group_column": "kind",
    "batch_size": 4,
    "progress": False,
    "top_k": {"ffn_neuron": 10, "attn_neuron": 10, "attn_subvalue": 5, "head": None},
}


def _fast_cli_args(data: Path, model_dir: str, kinds: tuple[str, ...], batch_size: int) -> list[str]:
    """The ``tl-residual study`` options that give the run of ``st.run(..., kinds=kinds, **FAST)`` at that batch
    size."""
    top_k = ",".join(f"{k}={'all' if v is None else v}" for k, v in FAST["top_k"].items())
    return [
        "--data",
        str(data),
        "--model",
        model_dir,
        "--target-column",
        FAST["target_column"],
        "--group-column",
        FAST["group_column"],
        "--batch-size",
        str(batch_size),
        "--kinds",
        ",".join(kinds),
        "--top-k",
        top_k,
        "--quiet",
    ]


def assert_same_results(a: st.StudyResults, b: st.StudyResults, tol: float = 1e-5) -> None:
    """Equal tables, up to float noise; parts whose scores tie (within ``tol``) at the top-k cut may differ."""
    pd.testing.assert_frame_equal(
        a.prompts.drop(columns=["target_prob", "target_log_prob", "decomposition_error"]),
        b.prompts.drop(columns=["target_prob", "target_log_prob", "decomposition_error"]),
    )
    for col in ("target_prob", "target_log_prob"):
        np.testing.assert_allclose(a.prompts[col].astype(float), b.prompts[col].astype(float), rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(a.layers, b.layers, check_exact=False, rtol=1e-4, atol=tol)
    pd.testing.assert_frame_equal(
        a.stream.drop(columns="rank"), b.stream.drop(columns="rank"), check_exact=False, rtol=1e-4, atol=tol
    )
    assert_same_parts(a.parts, b.parts, tol)


def assert_same_parts(x: pd.DataFrame, y: pd.DataFrame, tol: float = 1e-5) -> None:
    keys = ["prompt_id", "method", "kind"]
    assert x.groupby(keys).size().to_dict() == y.groupby(keys).size().to_dict()
    for key, gx in x.groupby(keys):
        gy = y.set_index(keys).loc[key].reset_index()
        np.testing.assert_allclose(gx["score"].to_numpy(), gy["score"].to_numpy(), rtol=1e-4, atol=tol)
        m = gx.merge(gy, on="name", suffixes=("_x", "_y"))
        np.testing.assert_allclose(m["score_x"], m["score_y"], rtol=1e-4, atol=tol)
        cut = min(gx["score"].min(), gy["score"].min())
        only = set(gx["name"]) ^ set(gy["name"])
        both = pd.concat([gx, gy])
        assert all(abs(both.loc[both["name"] == n, "score"].iloc[0] - cut) <= tol for n in only), (key, only)


# ----------------------------------------------------------------------------------------------
# Formats, schema, resumption in process
# ----------------------------------------------------------------------------------------------


def test_formats_give_the_same_results(model, data_file, tmp_path):
    import datasets

    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    df = pd.DataFrame(rows)
    csv = tmp_path / "p.csv"
    df.to_csv(csv, index=False)
    parquet = tmp_path / "p.parquet"
    df.to_parquet(parquet)
    disk = tmp_path / "ds"
    datasets.Dataset.from_pandas(df).save_to_disk(str(disk))
    kinds = ("layer", "ffn_neuron", "attn_subvalue")
    ref = None
    for i, src in enumerate((data_file, csv, parquet, disk, df)):
        out = tmp_path / f"out{i}"
        summary = st.run(model, src, out, kinds=kinds, **FAST)
        assert summary["ok"] == len(rows)
        res = st.load(out)
        if ref is None:
            ref = res
            continue
        assert_same_parts(res.parts, ref.parts)
        pd.testing.assert_frame_equal(res.layers, ref.layers, check_exact=False, rtol=1e-4, atol=1e-5)
        assert res.prompts["prompt"].tolist() == ref.prompts["prompt"].tolist()
        assert res.manifest["data_fingerprint"] == ref.manifest["data_fingerprint"]


def test_schema_and_contents(model, data_file, tmp_path):
    st.run(model, data_file, tmp_path / "s", kinds=st.KINDS, methods=("log_prob_increase", "norm"), **FAST)
    res = st.load(tmp_path / "s")
    for table in st.TABLES:
        df = getattr(res, table)
        assert list(df.columns) == st.SCHEMAS[table].names, table
        assert len(df), table
    n_layers = res.manifest["model"]["n_layers"]
    ok = res.prompts[res.prompts["status"] == "ok"]
    assert len(ok) == 9 and set(res.prompts["group"]) == {"a", "b"}
    # one stream row per Lin0, Lres_l, Lout_l; one layer row per sublayer and method
    assert (res.stream.groupby("prompt_id").size() == 2 * n_layers + 1).all()
    assert (res.layers.groupby(["prompt_id", "method"]).size() == 2 * n_layers).all()
    sizes = res.parts.groupby(["prompt_id", "method", "kind"]).size()
    assert (sizes.xs("ffn_neuron", level="kind") == 10).all() and (sizes.xs("head", level="kind") == 8).all()
    for _, g in res.parts.groupby(["prompt_id", "method", "kind"]):
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
        assert (np.diff(g["score"].to_numpy()) <= 1e-12).all()
    sub = res.parts[res.parts["kind"] == "attn_subvalue"].merge(res.prompts[["prompt_id", "n_tokens"]], on="prompt_id")
    assert (sub["src_pos"] < sub["n_tokens"]).all()  # prompt coordinates, never a padding position
    # targets: the given one where there is one, else the model's top-1 (rank 1)
    no_target = [i for i, r in enumerate(_prompts(9)) if "target" not in r]
    assert (ok.set_index("prompt_id").loc[no_target, "target_rank"] == 1).all()
    assert (ok["decomposition_error"] < 1e-5).all()
    ffn_value = res.query["value_name"].str.match(r"^L\d+\.N\d+$")
    assert ffn_value.any() and res.query.loc[~ffn_value, "value_name"].str.match(r"^L\d+\.H\d+\.d\d+\.p\d+$").all()
    assert set(res.query_totals["value_kind"]) == set(res.query_layers["value_kind"]) == {"ffn_neuron", "attn_neuron"}
    assert res.manifest["options"]["methods"] == ["log_prob_increase", "norm"]
    assert {"torch", "transformer-lens", "tl-residual"} <= set(res.manifest["versions"])


def test_refuses_other_options_in_the_same_folder(model, data_file, tmp_path):
    out = tmp_path / "r"
    st.run(model, data_file, out, kinds=("layer",), **FAST)
    st.run(model, data_file, out, kinds=("layer",), **FAST)  # same options: resumes (nothing left to do)
    with pytest.raises(InvalidInputError, match="other settings.*kinds"):
        st.run(model, data_file, out, kinds=("layer", "head"), **FAST)
    with pytest.raises(InvalidInputError, match="data_fingerprint"):
        st.run(model, data_file, out, kinds=("layer",), max_prompts=3, **FAST)
    assert len(st.load(out).prompts) == 9
    # a folder written before an option existed (absent from its manifest) resumes while the option is unused (None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"].pop("query_attn_values") is None
    (out / "manifest.json").write_text(json.dumps(manifest))
    st.run(model, data_file, out, kinds=("layer",), **FAST)
    with pytest.raises(InvalidInputError, match="query_attn_values was None, now 3"):
        st.run(model, data_file, out, kinds=("layer", "query"), query_attn_values=3, **FAST)


def test_failed_prompts_are_recorded(model, tmp_path):
    rows = [
        {"prompt": "t3 t4 t5", "target": "t6"},
        {"prompt": "t3 t4", "target": "t6 t7"},  # target: 2 tokens
        {"prompt": "   ", "target": None},
        {"prompt": " ".join(["t5"] * 40), "target": None},  # empty; too long
        {"prompt": "t8", "target": 999},
    ]  # id out of range
    summary = st.run(model, rows, tmp_path / "f", kinds=("layer", "ffn_neuron"), **{**FAST, "group_column": None})
    assert summary == {**summary, "ok": 1, "failed": 4}
    p = st.load(tmp_path / "f").prompts.set_index("prompt_id")
    assert p["status"].tolist() == ["ok", "failed", "failed", "failed", "failed"]
    assert "not one" in p.at[1, "reason"] and "empty" in p.at[2, "reason"]
    assert "too long" in p.at[3, "reason"] and "out of range" in p.at[4, "reason"]
    res = st.load(tmp_path / "f")
    assert set(res.parts["prompt_id"]) == {0}
    with pytest.raises(InvalidInputError, match="position"):
        st.run(model, rows, tmp_path / "g", position=1.5, **FAST)  # type: ignore[arg-type]
    st.run(model, rows[:1], tmp_path / "h", position=7, kinds=("layer",), **{**FAST, "group_column": None})
    assert "outside the prompt" in st.load(tmp_path / "h").prompts.at[0, "reason"]


def test_interrupted_in_process_resumes_to_the_same_results(model, data_file, tmp_path, monkeypatch):
    kw = dict(FAST, batch_size=2, kinds=("layer", "ffn_neuron", "attn_neuron"))
    st.run(model, data_file, tmp_path / "full", **kw)
    calls = {"n": 0}
    real = st._write_table

    def flaky(path, table, rows):
        calls["n"] += 1
        if calls["n"] == len(st.TABLES) + 2:  # the middle of the second batch's files: Ctrl-C
            raise KeyboardInterrupt
        real(path, table, rows)

    monkeypatch.setattr(st, "_write_table", flaky)
    with pytest.raises(KeyboardInterrupt):
        st.run(model, data_file, tmp_path / "cut", **kw)
    monkeypatch.setattr(st, "_write_table", real)
    partial = st.load(tmp_path / "cut")
    assert len(partial.prompts) == 2  # the first batch only
    assert not [f for f in (tmp_path / "cut").rglob("*") if ".tmp-" in f.name]
    summary = st.run(model, data_file, tmp_path / "cut", **kw)
    assert summary["skipped"] == 2 and summary["ok"] == 7
    assert_same_results(st.load(tmp_path / "cut"), st.load(tmp_path / "full"))


# ----------------------------------------------------------------------------------------------
# Correctness: single-prompt scorers, names vs intervene
# ----------------------------------------------------------------------------------------------


def test_scores_equal_the_single_prompt_scorers(model, data_file, tmp_path):
    from tl_residual import scorers as S

    kw = dict(FAST, methods=("log_prob_increase", "coefficient"))
    st.run(model, data_file, tmp_path / "s", kinds=st.DEFAULT_KINDS, **kw)
    res = st.load(tmp_path / "s")
    fns = {
        "ffn_neuron": (S.score_ffn_neurons, 10),
        "attn_neuron": (S.score_attention_neurons, 10),
        "attn_subvalue": (S.score_attention_subvalues, 5),
    }
    for row in res.prompts.itertuples():
        tokens = model.to_tokens(row.prompt)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        lp = torch.log_softmax(logits[0, -1].double(), -1)
        assert row.target_log_prob == pytest.approx(float(lp[row.target_id]), abs=1e-5)  # the model's own forward
        assert row.tokens.tolist() == [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
        ctx = S.make_context(model, cache, int(row.target_id))
        for method in kw["methods"]:
            mine = res.parts[(res.parts["prompt_id"] == row.prompt_id) & (res.parts["method"] == method)]
            for kind, (fn, k) in fns.items():
                ref = fn(ctx, method, top_k=k, n_top_tokens=0)
                assert_same_parts(
                    mine[mine["kind"] == kind].assign(method="m", kind="k"),
                    ref.assign(prompt_id=row.prompt_id, method="m", kind="k"),
                )
            heads = S.score_heads(ctx, method, n_top_tokens=0)
            assert_same_parts(
                mine[mine["kind"] == "head"].assign(method="m", kind="k"),
                heads.assign(prompt_id=row.prompt_id, method="m", kind="k"),
            )
        layers = S.score_layers(ctx, n_top_tokens=0)
        got = res.layers[(res.layers["prompt_id"] == row.prompt_id) & (res.layers["method"] == "log_prob_increase")]
        both = got.merge(layers, on="name", suffixes=("", "_ref"))
        assert len(both) == len(got) == len(layers) == 2 * model.cfg.n_layers
        np.testing.assert_allclose(both["score"].to_numpy(), both["score_ref"].to_numpy(), rtol=1e-4, atol=1e-6)


def _reference_rows(model, prompt: str, target: str | None) -> tuple[int, dict[str, pd.DataFrame]]:
    """Every part of every kind of one prompt, run alone (no padding), scored densely in float64 from the raw
    weights and the prompt's own cache, independently of tl_residual: the frozen-scale lens of conftest, the
    log-probability increase ``log p(t | x + v) - log p(t | x)`` against the stream the part is added to."""
    from conftest import raw_frozen_logits

    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    t = int(logits[0, -1].argmax()) if target is None else model.tokenizer.encode(target, add_special_tokens=False)[0]

    def c(name: str) -> torch.Tensor:
        return cache[name][0].detach().double()

    def increase(x: torch.Tensor, vectors: torch.Tensor) -> np.ndarray:
        z0 = raw_frozen_logits(model, cache, x[None])
        z = z0 + raw_frozen_logits(model, cache, vectors)  # the frozen lens is linear
        return (torch.log_softmax(z, -1)[:, t] - torch.log_softmax(z0, -1)[:, t]).numpy()

    rows: dict[str, list[tuple[str, float]]] = {k: [] for k in ("ffn_neuron", "attn_neuron", "attn_subvalue", "head")}
    layers = []
    for l in range(model.cfg.n_layers):
        pre, mid = c(f"blocks.{l}.hook_resid_pre")[-1], c(f"blocks.{l}.hook_resid_mid")[-1]
        pattern = c(f"blocks.{l}.attn.hook_pattern")[:, -1]  # [head, src]
        v = c(f"blocks.{l}.attn.hook_v")  # [src, head, d_head]
        w_o = model.blocks[l].attn.W_O.detach().double()  # [head, d_head, d_model]
        n_heads, d_head, _ = w_o.shape
        coef = pattern.T[:, :, None] * v  # [src, head, d_head]
        neurons = coef[..., None] * w_o[None]  # [src, head, d_head, d_model]
        s = increase(pre, neurons.reshape(-1, neurons.shape[-1]))
        rows["attn_neuron"] += [
            (f"L{l}.H{h}.d{d}.p{p}", s[(p * n_heads + h) * d_head + d])
            for p in range(v.shape[0])
            for h in range(n_heads)
            for d in range(d_head)
        ]
        sub = neurons.sum(2)  # [src, head, d_model]
        s = increase(pre, sub.reshape(-1, sub.shape[-1]))
        rows["attn_subvalue"] += [
            (f"L{l}.H{h}.p{p}", s[p * n_heads + h]) for p in range(v.shape[0]) for h in range(n_heads)
        ]
        s = increase(pre, sub.sum(0))
        rows["head"] += [(f"L{l}.H{h}", s[h]) for h in range(n_heads)]
        m = c(f"blocks.{l}.mlp.hook_post")[-1]
        s = increase(mid, m[:, None] * model.blocks[l].mlp.W_out.detach().double())
        rows["ffn_neuron"] += [(f"L{l}.N{k}", s[k]) for k in range(len(m))]
        layers += [
            (f"L{l}.attn", increase(pre, c(f"blocks.{l}.hook_attn_out")[-1:])[0]),
            (f"L{l}.mlp", increase(mid, c(f"blocks.{l}.hook_mlp_out")[-1:])[0]),
        ]
    out = {k: pd.DataFrame(r, columns=["name", "score"]) for k, r in rows.items()}
    out["layer"] = pd.DataFrame(layers, columns=["name", "score"])
    return t, out


def test_one_padded_batch_equals_each_prompt_alone_scored_densely(model, tmp_path):
    """The batched runner (one right-padded batch of prompts of different lengths; lens logits, bound probes,
    bound projections and neuron projections shared by the batch) gives, for every prompt, the rows of that
    prompt run alone and scored densely from the raw weights: same names, ranks (score order) and scores (float32
    rounding), for the certified top-k of every neuron kind, all heads and every layer."""
    prompts = ["t3", "t4 t5 t6 t7 t8 t9", "t5 t5 t3", "t9 t8 t7 t6", "t6 t7"]
    targets = [None, " t4", None, " t3", None]
    data = [{"prompt": p, "target": t} for p, t in zip(prompts, targets)]
    top = {"ffn_neuron": 12, "attn_neuron": 15, "attn_subvalue": 6, "head": None}
    st.run(
        model,
        data,
        tmp_path / "b",
        kinds=("layer", "ffn_neuron", "attn_neuron", "attn_subvalue", "head"),
        top_k=top,
        batch_size=len(data),
        target_column="target",
        progress=False,
        sort_by_length=False,
    )
    res = st.load(tmp_path / "b")
    assert (res.prompts["status"] == "ok").all() and len(set(res.prompts["n_tokens"])) == len(data)
    for pid, (p, tgt) in enumerate(zip(prompts, targets)):
        t, ref = _reference_rows(model, p, None if tgt is None else tgt)
        assert int(res.prompts.loc[pid, "target_id"]) == t
        mine = res.parts[res.parts["prompt_id"] == pid]
        for kind, k in top.items():
            want = ref[kind].sort_values("score", ascending=False, kind="stable").head(k or len(ref[kind]))
            got = mine[mine["kind"] == kind].sort_values("rank")
            assert got["rank"].tolist() == list(range(1, len(want) + 1)), kind
            assert_same_parts(
                got.assign(method="m", kind="k"), want.assign(prompt_id=pid, method="m", kind="k"), tol=2e-5
            )
            names = got["name"].tolist()  # ranks: where the reference scores differ, the same order
            gaps = np.diff(want["score"].to_numpy())
            for i, (a, b) in enumerate(zip(names, want["name"].tolist())):
                if a != b:
                    assert abs(gaps[min(i, len(gaps) - 1)]) < 2e-5 or abs(gaps[max(i - 1, 0)]) < 2e-5, (kind, a, b)
        got = res.layers[res.layers["prompt_id"] == pid].merge(ref["layer"], on="name", suffixes=("", "_ref"))
        assert len(got) == len(ref["layer"]) == 2 * model.cfg.n_layers
        np.testing.assert_allclose(got["score"], got["score_ref"], rtol=1e-4, atol=2e-5)


def test_head_top_k_equals_the_library(model, data_file, tmp_path):
    """Heads with a top-k (certified search) are the best rows of ``score_heads``."""
    from tl_residual import scorers as S

    st.run(model, data_file, tmp_path / "q", kinds=("head",), max_prompts=4, **{**FAST, "top_k": {"head": 3}})
    res = st.load(tmp_path / "q")
    for row in res.prompts.itertuples():
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(row.prompt))
        ctx = S.make_context(model, cache, int(row.target_id))
        heads = S.score_heads(ctx, n_top_tokens=0).head(3)
        mine = res.parts[(res.parts["prompt_id"] == row.prompt_id)]
        assert_same_parts(
            mine.assign(method="m", kind="k"), heads.assign(prompt_id=row.prompt_id, method="m", kind="k")
        )


QUERY_OPTS = {"query_values": 5, "query_attn_values": 6, "query_top_k": 100_000, "query_totals_k": 100_000}


@pytest.fixture(scope="module")
def query_run(model, data_file, tmp_path_factory) -> st.StudyResults:
    """Kind ``query`` with both value kinds, every query part kept (4 prompts)."""
    out = tmp_path_factory.mktemp("query") / "q"
    st.run(model, data_file, out, kinds=("query",), max_prompts=4, **FAST, **QUERY_OPTS)
    return st.load(out)


def _raw_frozen_log_probs(model, cache, pos: int, vecs: torch.Tensor) -> torch.Tensor:
    """log softmax of ``vecs`` [n, d_model] under the frozen-scale final norm, from the raw weights."""
    v = vecs.double()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        v = v - v.mean(-1, keepdim=True)
    gamma = model.ln_final.w if isinstance(getattr(model.ln_final, "w", None), torch.Tensor) else None
    gamma = torch.ones(v.shape[-1]) if gamma is None else gamma.detach()
    scale = cache["ln_final.hook_scale"][0, pos].double().reshape(-1)[0]
    return torch.log_softmax((v * gamma.double() / scale) @ model.W_U.detach().double(), -1)


def _raw_imp(model, cache, pos: int, target: int, name: str) -> float:
    """Imp = log p(target | x + vec) - log p(target | x) written from the cache and the raw weights: an FFN neuron
    ``m_k * W_out[k]`` added to ``resid_mid``, an attention neuron ``pattern[h, pos, p] * v[p, h, d] * W_O[h, d]``
    added to ``resid_pre`` of its layer."""
    from tl_residual import names

    ref = names.parse(name)
    l = ref.layer
    if ref.kind == "ffn_neuron":
        x = cache[f"blocks.{l}.hook_resid_mid"][0, pos]
        vec = cache[f"blocks.{l}.mlp.hook_post"][0, pos, ref.neuron] * model.blocks[l].mlp.W_out.detach()[ref.neuron]
    else:
        x = cache[f"blocks.{l}.hook_resid_pre"][0, pos]
        a = cache[f"blocks.{l}.attn.hook_pattern"][0, ref.head, pos, ref.src_pos]
        v = cache[f"blocks.{l}.attn.hook_v"][0, ref.src_pos, ref.head, ref.dim]
        vec = a * v * model.blocks[l].attn.W_O.detach()[ref.head, ref.dim]
    lp = _raw_frozen_log_probs(model, cache, pos, torch.stack([x + vec, x]))
    return float(lp[0, target] - lp[1, target])


def test_query_rows_are_exact_shares_of_each_value_neurons_imp(model, query_run):
    """(1) Per value neuron (FFN and attention), its query scores plus its key-bias share sum to its Imp, computed
    here from the cache and the raw weights; (2) each attention value neuron's contributions ``score / Imp * v``
    sum to the cached ``hook_v`` entry, and its embedding's contribution equals ``centre(W_E[token] + W_pos[p]) *
    gamma / sigma . W_V[:, d]`` (ln1 weight and cached ln1 scale)."""
    res = query_run
    q = res.query
    assert set(q["value_name"].str.count(r"\.")) == {1, 3}  # both value kinds
    checked_embed = 0
    for row in res.prompts[res.prompts["status"] == "ok"].itertuples():
        tokens = model.to_tokens(row.prompt)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        pos, target = int(row.position), int(row.target_id)
        mine = q[q["prompt_id"] == row.prompt_id]
        per_value = mine.groupby("value_name").agg(total=("score", "sum"), imp=("value_score", "first"))
        assert len(per_value) == 5 + 6
        for name, r in per_value.iterrows():
            imp = _raw_imp(model, cache, pos, target, name)
            assert r["imp"] == pytest.approx(imp, rel=1e-4, abs=1e-6), name
            assert r["total"] == pytest.approx(imp, rel=1e-4, abs=1e-6), name
        for name, rows in mine[mine["value_name"].str.count(r"\.") == 3].groupby("value_name"):
            _, h, d, p = (int(x[1:]) for x in name.split("."))
            l = int(name.split(".")[0][1:])
            v = float(cache[f"blocks.{l}.attn.hook_v"][0, p, h, d])
            assert (rows["position"] == p).all()  # read at the source position
            imp = rows["value_score"].iloc[0]
            assert float((rows["score"] / imp * v).sum()) == pytest.approx(v, rel=1e-4, abs=1e-6)
            emb = rows[rows["query_kind"] == "embed"]
            if len(emb):
                x = model.W_E.detach()[int(tokens[0, p])].double()
                pe = rows[rows["query_kind"] == "pos_embed"]
                gamma = (
                    model.blocks[l].ln1.w if isinstance(getattr(model.blocks[l].ln1, "w", None), torch.Tensor) else None
                )
                gamma = torch.ones(x.shape[0]) if gamma is None else gamma.detach()
                sigma = cache[f"blocks.{l}.ln1.hook_scale"][0, p].double().reshape(-1)[0]
                col = model.blocks[l].attn.W_V.detach()[h][:, d].double()
                centred = x - x.mean()
                expect = float(centred * gamma.double() / sigma @ col)
                assert float(emb["score"].iloc[0] / imp * v) == pytest.approx(expect, rel=1e-4, abs=1e-6)
                assert len(pe) <= 1
                checked_embed += 1
    assert checked_embed


def test_query_totals_and_layers_equal_the_library(model, query_run):
    """(3) ``query_totals`` equals ``query.query_neuron_scores`` (name, position, score) for both value kinds, and
    each ``query_layers`` row is the sum of every part of its kind and layer (they sum to ``total_imp``)."""
    from tl_residual import query as Q
    from tl_residual import scorers as S

    res = query_run
    for row in res.prompts[res.prompts["status"] == "ok"].itertuples():
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(row.prompt))
        ctx = S.make_context(model, cache, int(row.target_id))
        for kind, n in (("ffn_neuron", 5), ("attn_neuron", 6)):
            ref = Q.query_neuron_scores(ctx, n_value=n, value_kind=kind)
            got = res.query_totals[
                (res.query_totals["prompt_id"] == row.prompt_id) & (res.query_totals["value_kind"] == kind)
            ]
            assert len(got) == len(ref)
            m = got.merge(ref, left_on=["query_name", "position"], right_on=["name", "position"], how="outer")
            assert not m["score_x"].isna().any() and not m["score_y"].isna().any()
            np.testing.assert_allclose(m["score_x"], m["score_y"], rtol=1e-4, atol=1e-6)  # batched vs alone
            for _, g in got.groupby("query_kind"):
                assert g.sort_values("rank")["score"].is_monotonic_decreasing
            layers = res.query_layers[
                (res.query_layers["prompt_id"] == row.prompt_id) & (res.query_layers["value_kind"] == kind)
            ]
            sums = ref.groupby(["kind", "layer"])["score"].sum()
            mine = layers.set_index(["query_kind", "layer"])["score"]
            assert sorted(sums.index) == sorted(mine.index)
            np.testing.assert_allclose(mine.loc[sums.index], sums, rtol=1e-4, atol=1e-6)
            assert layers["total_imp"].iloc[0] == pytest.approx(ref.attrs["total_imp"], rel=1e-4, abs=1e-6)
            assert layers["score"].sum() == pytest.approx(layers["total_imp"].iloc[0], rel=1e-6, abs=1e-8)
            assert (layers["n_value"] == n).all() and (layers["n_skipped"] == len(ref.attrs["skipped"])).all()


def test_query_totals_k_cuts_each_query_kind(model, data_file, tmp_path):
    """``query_totals_k`` keeps the best ``k`` per (prompt, value kind, query kind); ``query_top_k`` per value
    neuron; ``query_attn_values=0`` splits FFN value neurons only."""
    opts = {**QUERY_OPTS, "query_top_k": 3, "query_totals_k": 4, "query_attn_values": 0}
    st.run(model, data_file, tmp_path / "c", kinds=("query",), max_prompts=2, **FAST, **opts)
    res = st.load(tmp_path / "c")
    assert (res.query.groupby(["prompt_id", "value_name"]).size() == 3).all()
    assert (res.query_totals.groupby(["prompt_id", "value_kind", "query_kind"]).size() <= 4).all()
    assert set(res.query_totals["value_kind"]) == {"ffn_neuron"}
    assert res.manifest["options"]["query_totals_k"] == 4 and res.manifest["options"]["query_attn_values"] == 0
    with pytest.raises(InvalidInputError, match="query_attn_values"):
        st.run(model, data_file, tmp_path / "d", kinds=("query",), query_values=0, query_attn_values=0, **FAST)
    with pytest.raises(InvalidInputError, match="query_totals_k"):
        st.run(model, data_file, tmp_path / "d", kinds=("query",), query_totals_k=0, **FAST)


def test_names_mean_the_same_component_to_intervene(model, tmp_path):
    """The shortest prompt of a right-padded batch: zeroing its top last-layer parts with ``intervene`` gives the
    target the log-probability that subtracting the part's vector (rebuilt here from the weights and the prompt's
    own cache) from its sublayer's output (``hook_attn_out`` / ``hook_mlp_out``) gives. (On a TransformerBridge,
    editing ``hook_resid_mid`` changes the FFN's input but not the residual skip path, so the outputs are edited.)"""
    from tl_residual import model as tlm
    from tl_residual.interventions import intervene

    rows = [{"prompt": "t3 t4 t5 t6 t7 t8 t9"}, {"prompt": "t5 t4 t9"}, {"prompt": "t7 t7 t3 t5 t6"}]
    st.run(
        model,
        rows,
        tmp_path / "n",
        kinds=("ffn_neuron", "attn_neuron", "attn_subvalue"),
        batch_size=3,
        progress=False,
        top_k=400,
    )
    res = st.load(tmp_path / "n")
    last = model.cfg.n_layers - 1
    p = res.prompts.set_index("prompt_id").loc[1]
    tokens = model.to_tokens(p.prompt)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    pos = tokens.shape[1] - 1
    assert p.position == pos and p.n_tokens == pos + 1
    pattern = cache[f"blocks.{last}.attn.hook_pattern"][0]
    v = cache[f"blocks.{last}.attn.hook_v"][0]
    w_o, w_out = tlm.W_O(model, last), tlm.W_out(model, last)

    def logp_without(hook: str, vec: torch.Tensor) -> float:
        def sub(x, hook):
            x = x.clone()
            x[0, pos] -= vec.to(x.dtype)
            return x

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{last}.{hook}", sub)])
        return float(torch.log_softmax(logits[0, pos].double(), -1)[int(p.target_id)])

    parts = res.parts[(res.parts["prompt_id"] == 1) & (res.parts["layer"] == last)]
    for kind in ("ffn_neuron", "attn_neuron", "attn_subvalue"):
        r = parts[parts["kind"] == kind].iloc[0]
        h, src, d, n = (None if pd.isna(r[c]) else int(r[c]) for c in ("head", "src_pos", "dim", "neuron"))
        if kind == "ffn_neuron":
            vec, hook = cache[f"blocks.{last}.mlp.hook_post"][0, pos, n] * w_out[n], "hook_mlp_out"
        elif kind == "attn_neuron":
            vec, hook = pattern[h, pos, src] * v[src, h, d] * w_o[h, d], "hook_attn_out"
        else:
            vec, hook = pattern[h, pos, src] * (v[src, h] @ w_o[h]), "hook_attn_out"
        after = intervene(model, p.prompt, [r["name"]], int(p.target_id)).to_dataframe().iloc[0]
        expected = logp_without(hook, vec)
        assert after.logp_after == pytest.approx(expected, abs=1e-4), r["name"]
        assert abs(after.logp_after - after.logp_before) > 1e-3  # the part matters, so a wrong one would show


# ----------------------------------------------------------------------------------------------
# Subprocesses: the CLI, a killed run, two processes
# ----------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tl_residual", "study", *args]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


def test_cli_killed_run_resumes_to_the_same_results(model, model_dir, tmp_path):
    rows = _prompts(12, seed=1)
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    kinds = ("layer", "ffn_neuron", "attn_subvalue", "query")
    query = {"query_attn_values": 3, "query_totals_k": 50}  # the CLI's --query-attn-values / --query-totals-k
    st.run(model, data, tmp_path / "full", kinds=kinds, **{**FAST, "batch_size": 1}, **query)  # uninterrupted
    args = [*_fast_cli_args(data, model_dir, kinds, batch_size=1), "--out", str(tmp_path / "cut")]
    args += ["--query-attn-values", "3", "--query-totals-k", "50"]
    proc = subprocess.Popen(_cli(*args), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prompts_dir = tmp_path / "cut" / "prompts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(prompts_dir.glob("*.parquet")) if prompts_dir.exists() else []) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(st.load(tmp_path / "cut").prompts)
    assert 2 <= done < len(rows), done
    again = subprocess.run(_cli(*args), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert again.returncode == 0, again.stderr
    assert f"{done} already done" in " ".join(again.stdout.split())
    assert not [f for f in (tmp_path / "cut").rglob("*") if ".tmp-" in f.name]
    a, b = st.load(tmp_path / "cut"), st.load(tmp_path / "full")
    assert_same_results(a, b)
    pd.testing.assert_frame_equal(
        a.query.drop(columns=["score", "value_score"]), b.query.drop(columns=["score", "value_score"])
    )
    np.testing.assert_allclose(a.query["score"], b.query["score"], rtol=1e-4, atol=1e-6)
    assert a.manifest["options"]["query_totals_k"] == 50 and set(a.query_totals["value_kind"]) == {
        "ffn_neuron",
        "attn_neuron",
    }
    for t in ("query_totals", "query_layers"):
        x, y = getattr(a, t), getattr(b, t)
        pd.testing.assert_frame_equal(x.drop(columns="score"), y.drop(columns="score"), check_exact=False, rtol=1e-4)
        np.testing.assert_allclose(x["score"], y["score"], rtol=1e-4, atol=1e-6)


def test_two_processes_equal_one(model, model_dir, data_file, tmp_path):
    # the documented command: Accelerate's launcher (torch.distributed underneath; gloo CPU processes here)
    if shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("accelerate is not installed next to this Python")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    st.run(model, data_file, tmp_path / "one", kinds=("layer", "stream", "ffn_neuron", "attn_neuron"), **FAST)
    args = _fast_cli_args(data_file, model_dir, ("layer", "stream", "ffn_neuron", "attn_neuron"), batch_size=4)
    two = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "tl_residual",
            "study",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert two.returncode == 0, two.stderr + two.stdout
    ranks = {f.name.split("-")[0] for f in (tmp_path / "two" / "prompts").glob("*.parquet")}
    assert ranks == {"rank0", "rank1"}
    a, b = st.load(tmp_path / "two"), st.load(tmp_path / "one")
    assert a.manifest["run"]["world_size"] == 2 and b.manifest["run"]["world_size"] == 1
    assert_same_results(a, b)


def test_cli_bad_input_is_a_clear_error(tmp_path):
    res = subprocess.run(
        _cli("--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")),
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_parse_top_k():
    assert st.parse_top_k("50") == 50
    assert st.parse_top_k("ffn_neuron=100,head=all") == {"ffn_neuron": 100, "head": None}
    with pytest.raises(InvalidInputError):
        st.parse_top_k("ffn=3")
    with pytest.raises(InvalidInputError):
        st.parse_top_k("ffn_neuron=-1")


# ----------------------------------------------------------------------------------------------
# The real model, end to end
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_builtin_factual_end_to_end(smollm2, tmp_path):
    summary = st.run(
        smollm2,
        "builtin:factual",
        tmp_path / "f",
        max_prompts=6,
        batch_size=3,
        progress=False,
        filter="paper",
        top_k={"ffn_neuron": 20, "attn_neuron": 20, "attn_subvalue": 10, "head": None},
        model_name="smollm2-135m",
    )
    res = st.load(tmp_path / "f")
    assert summary["ok"] + summary["filtered"] == 6 and summary["ok"] >= 3
    assert set(res.prompts["status"]) <= {"ok", "filtered"}
    ok = res.prompts[res.prompts["status"] == "ok"]
    assert (ok["decomposition_error"] < 1e-5).all() and (ok["target_rank"] <= 10).all()
    assert (res.layers.groupby("prompt_id").size() == 60).all()
    assert res.manifest["model"]["name"] == "smollm2-135m" and res.manifest["options"]["filter"] == "paper"
    # the capital prompt "The capital of France is" style fact: the answer's top FFN neurons are named in the
    # prompt's coordinates and scored in nats
    assert res.parts["score"].notna().all() and res.parts["name"].str.match(r"^L\d+\.").all()


def test_hooked_transformer_llama_style(tmp_path):
    """The runner on a TransformerLens 3.x ``HookedTransformer`` (RMSNorm, gated MLP, rotary, grouped-query
    attention): every prompt scored, scores equal the single-prompt scorers (skipped where TransformerLens 4.x
    has no HookedTransformer)."""
    from conftest import make_hooked
    from tl_residual import scorers as S

    model = make_hooked("llama", n_kv_heads=2)
    rows = [{"prompt": "t3 t4 t5 t6"}, {"prompt": "t7 t8"}, {"prompt": "t9 t3 t4 t5 t6 t7"}]
    st.run(
        model,
        rows,
        tmp_path / "h",
        kinds=st.KINDS,
        progress=False,
        batch_size=3,
        top_k={"ffn_neuron": 10, "attn_neuron": 10, "attn_subvalue": 5, "head": None},
    )
    res = st.load(tmp_path / "h")
    assert (res.prompts["status"] == "ok").all() and (res.prompts["decomposition_error"] < 1e-5).all()
    assert len(res.query)
    for row in res.prompts.itertuples():
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(row.prompt))
        ctx = S.make_context(model, cache, int(row.target_id))
        for kind, ref in (
            ("ffn_neuron", S.score_ffn_neurons(ctx, top_k=10, n_top_tokens=0)),
            ("attn_neuron", S.score_attention_neurons(ctx, top_k=10, n_top_tokens=0)),
        ):
            mine = res.parts[(res.parts["prompt_id"] == row.prompt_id) & (res.parts["kind"] == kind)]
            assert_same_parts(
                mine.assign(method="m", kind="k"), ref.assign(prompt_id=row.prompt_id, method="m", kind="k")
            )
