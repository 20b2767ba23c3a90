"""Terminal output of `tl-residual explain/query/ablate` on a tiny random model (the loader is swapped for it):
tables fit 80 and 160 columns without wrapping, --prompts explains several prompts with one load, --graph-layers
chooses the report's layers, and the option errors are clear. The real-model output is in tests/test_cli.py."""

from __future__ import annotations

import functools
import json
import re

import pytest
from typer.testing import CliRunner

from conftest import HAS_HOOKED, make_bridge, make_hooked
from tl_residual import cli

runner = CliRunner()


@functools.lru_cache(maxsize=1)
def _tiny():
    return make_hooked("llama", n_layers=3) if HAS_HOOKED else make_bridge("llama", n_layers=3)


@pytest.fixture()
def tiny(monkeypatch):
    loads = []
    monkeypatch.setattr(cli, "load", lambda name: loads.append(name) or _tiny())
    return loads


def _run(monkeypatch, width, *args):
    monkeypatch.setattr(cli.console, "width", width)
    res = runner.invoke(cli.app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("width", [80, 160])
def test_explain_tables_fit_the_terminal(tiny, monkeypatch, width):
    out = _run(monkeypatch, width, "explain", "--prompt", "t5 t33 t42 t8 t9", "--top-k", "5")
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    # one line per table row: five rows in each of the three tables, each starting with its name
    rows = [line for line in lines if line.startswith("│ L")]
    assert len(rows) == 15
    assert "(as in --json)" in out and "-1 " not in out and "nan" not in out.lower()
    # layer rows in the order of the JSON (score, highest first)
    scores = [float(re.search(r"[+-]\d+\.\d{4}", r).group()) for r in rows[:5]]
    assert scores == sorted(scores, reverse=True)
    if width == 160:  # wide enough for the source-token column, with visible quotes
        assert "source token" in out and "'t" in out


def test_prompts_file_one_load(tiny, monkeypatch, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text('t5 t33 t42\n\n{"prompt": "t7 t8 t9", "target": "t9"}\n', encoding="utf-8")
    out_json = tmp_path / "out.json"
    out = _run(
        monkeypatch, 120, "explain", "--prompts", str(f), "--top-k", "2", "--json", str(out_json), "--model", "tiny"
    )
    assert len(tiny) == 1 and "prompt 1/2" in out and "prompt 2/2" in out
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert [d["prompt"] for d in data] == ["t5 t33 t42", "t7 t8 t9"] and data[1]["target_token"] == "t9"


def test_graph_layers_choose_the_report_graphs(tiny, monkeypatch, tmp_path):
    page = tmp_path / "r.html"
    _run(
        monkeypatch,
        120,
        "explain",
        "--prompt",
        "t5 t33 t42",
        "--top-k",
        "2",
        "--html",
        str(page),
        "--graph-layers",
        "0-1",
    )
    text = page.read_text(encoding="utf-8")
    assert 'id="flow-graph-L0"' in text and 'id="flow-graph-L1"' in text and 'id="flow-graph-L2"' not in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "t5", "--prompts", "x.txt"], "exactly one of"),
        ([], "exactly one of"),
        (["--prompt", "t5", "--graph-layers", "1"], "--html"),
        (["--prompt", "t5", "--html", "r.html", "--graph-layers", "a,b"], "not understood"),
    ],
)
def test_explain_option_errors(tiny, args, message):
    res = runner.invoke(cli.app, ["explain", *args])
    assert res.exit_code == 2 and message in res.output and not tiny


def test_target_is_checked_with_the_tokenizer_before_loading(tiny, monkeypatch):
    from conftest import tiny_tokenizer
    from tl_residual import model as tlm

    monkeypatch.setattr(tlm, "load_tokenizer", lambda name, dtype="float32": tiny_tokenizer())
    res = runner.invoke(cli.app, ["explain", "--prompt", "t5 t33", "--target", "t5 t6"])
    assert res.exit_code == 2 and "is 2 tokens" in res.output and not tiny  # the model was never loaded


def test_bad_prompts_file_is_a_clear_error(tiny, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"target": " Paris"}\n', encoding="utf-8")
    res = runner.invoke(cli.app, ["explain", "--prompts", str(f)])
    assert res.exit_code == 2 and "line 1" in res.output and not tiny


def test_ablate_words_the_scope_and_shows_top1(tiny, monkeypatch):
    out = _run(monkeypatch, 120, "ablate", "--prompt", "t5 t33 t42 t8", "--neurons", "L1.H0.p2,L2.N3")
    assert "L1.H0.p2: source position 2's value removed from head 0's output (layer 1) at every destination" in out
    assert "L2.N3: FFN neuron 3's activation (layer 2) removed at every position" in out
    assert "top-1 prediction" in out and out.count("'t") >= 3


def test_query_shows_the_activation(tiny, monkeypatch):
    import torch

    model = _tiny()
    out = _run(monkeypatch, 120, "query", "--prompt", "t5 t33 t42 t8", "--neuron", "L2.N3", "--top-k", "3")
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens("t5 t33 t42 t8"))
    m = float(cache["blocks.2.mlp.hook_post"][0, -1, 3])  # independent: the cached activation
    assert f"activation m of L2.N3 at position 4 (the MLP's hook_post) = {m:.4f}" in out


def test_intervention_result_html(tiny):
    from tl_residual.interventions import intervene

    result = intervene(_tiny(), ["t5 t33 t42", "t7 t8"], "L1.H0.p1,L2.N3")
    page = result._repr_html_()
    assert "2 component(s) zeroed at every position" in page and "L1.H0.p1" in page and "MRR" in page
    df = result.to_dataframe()
    assert {"top1_before_token", "top1_after_token", "top1_after_prob"} <= set(df.columns)
    assert repr(df["top1_after_token"].iloc[0]) in page.replace("&#x27;", "'")
