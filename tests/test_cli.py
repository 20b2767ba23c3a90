"""`tl-residual explain` on the embedded model, its JSON, and its errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tl_residual.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_explain_prints_paris_and_writes_json(smollm2, tmp_path):
    out = tmp_path / "out.json"
    res = invoke("explain", "--prompt", "The capital of France is", "--top-k", "5", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "prediction: ' Paris'" in res.output
    assert "L24.N1005" in res.output and "L23.H4.p4" in res.output
    data = json.loads(out.read_text())
    for key in (
        "model",
        "prompt",
        "position",
        "target_token",
        "target_prob",
        "decomposition_rel_error",
        "layers",
        "attention_subvalues",
        "ffn_neurons",
    ):
        assert key in data
    assert data["target_token"] == " Paris" and 0.6 < data["target_prob"] < 0.9
    assert data["position"] == 5 and data["decomposition_rel_error"] < 1e-5
    assert len(data["layers"]) == 60 and len(data["ffn_neurons"]) == 5 and len(data["attention_subvalues"]) == 5
    assert set(data["layers"][0]) >= {"layer", "kind", "score"}
    assert set(data["attention_subvalues"][0]) >= {"layer", "head", "src_pos", "score"}
    assert set(data["ffn_neurons"][0]) >= {"layer", "neuron", "score"}
    for key in ("layers", "attention_subvalues", "ffn_neurons"):
        scores = [r["score"] for r in data[key]]
        assert scores == sorted(scores, reverse=True), key
    assert data["ffn_neurons"][0] == {**data["ffn_neurons"][0], "layer": 24, "neuron": 1005}


def test_explain_with_target_and_position(smollm2):
    res = invoke(
        "explain",
        "--prompt",
        "The capital of France is",
        "--target",
        " London",
        "--position",
        "-1",
        "--top-k",
        "3",
        "--method",
        "log_prob",
    )
    assert res.exit_code == 0, res.output
    assert "target: ' London'" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "The capital of France is", "--target", " Parisianism"], "not one"),
        (["--prompt", "The capital of France is", "--position", "6"], "position 6 is out of range"),
        (["--prompt", "The capital of France is", "--method", "magic"], "unknown method 'magic'"),
        (["--prompt", "The capital of France is", "--lens", "final"], "lens convention 'final'"),
        (["--prompt", "The capital of France is", "--top-k", "0"], "--top-k must be a positive integer"),
    ],
)
def test_bad_input_is_a_clear_error(smollm2, args, message):
    res = invoke("explain", *args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_unknown_model_no_traceback():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "tl_residual", "explain", "--prompt", "hi", "--model", "no-such-model-xyz"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "no-such-model-xyz" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and "tl-residual 0.1.0" in res.output
