"""The documentation tells the truth and builds.

* every public function and class of every ``tl_residual`` module has a docstring (the API reference is
  generated from them), and every public module has an API page;
* ``mkdocs build --strict`` passes (broken links, missing pages and broken API references fail it);
* the unsupported-architecture errors listed in ``docs/architectures.md`` are the ones ``model_spec`` raises;
* the custom-scorer example of ``docs/extending.md`` runs as written: tables, top-k, ``explain``, the
  faithfulness benchmark and the CLI ``--method``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import tl_residual
from tl_residual.errors import UnsupportedArchitectureError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def public_modules() -> list[str]:
    """``tl_residual.*`` modules meant for users (``__main__`` runs the CLI on import, so it is left out)."""
    names = []
    for info in pkgutil.walk_packages(tl_residual.__path__, prefix="tl_residual."):
        short = info.name.split(".")[-1]
        if short.startswith("_"):
            continue
        names.append(info.name)
    return sorted(names)


def _missing_doc(obj: object) -> bool:
    doc = inspect.getdoc(obj)
    if not doc or not doc.strip():
        return True
    # A dataclass without a docstring gets its signature as __doc__: that is not documentation.
    return inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for name in public_modules():
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(f"{name} (module docstring)")
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue  # imported from elsewhere: checked where it is defined
            if _missing_doc(obj):
                missing.append(f"{name}.{attr}")
    assert not missing, "public functions/classes without a docstring: " + ", ".join(missing)


def test_every_public_module_has_an_api_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    problems = []
    for name in public_modules():
        short = name.split(".", 1)[1]
        page = DOCS / "api" / f"{short.replace('.', '/')}.md"
        if not page.exists():
            problems.append(f"{name}: no {page.relative_to(ROOT)}")
        elif f"::: {name}" not in page.read_text(encoding="utf-8"):
            problems.append(f"{name}: {page.relative_to(ROOT)} lacks '::: {name}'")
        if f"api/{short.replace('.', '/')}.md" not in nav:
            problems.append(f"{name}: api/{short}.md is not in the nav of mkdocs.yml")
    assert not problems, "; ".join(problems)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (pip install -e '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "api" / "scorers" / "index.html").exists()


def _fake_model(**cfg: object) -> SimpleNamespace:
    base = dict(normalization_type="RMS", n_heads=4, n_layers=2, d_model=8, d_head=2, d_mlp=16, d_vocab=10)
    base.update(cfg)
    return SimpleNamespace(cfg=SimpleNamespace(**base), blocks=[])


UNSUPPORTED = [  # parallel blocks, post-norms, post-embedding norm, soft-capping are covered since issue 11
    dict(num_experts=8),
    dict(attn_only=True),
    dict(attention_dir="bidirectional"),
    dict(normalization_type=None),
    dict(positional_embedding_type="shortformer"),
]


@pytest.mark.parametrize("cfg", UNSUPPORTED, ids=lambda c: next(iter(c)))
def test_architectures_page_quotes_the_real_errors(cfg):
    """Each unsupported feature raises, and the page quotes the message model_spec gives for it."""
    from tl_residual.model import model_spec

    page = " ".join((DOCS / "architectures.md").read_text(encoding="utf-8").split())
    with pytest.raises(UnsupportedArchitectureError) as info:
        model_spec(_fake_model(**cfg))
    message = str(info.value)
    prefix = "tl-residual's exact decomposition does not cover this model: "
    assert message.startswith(prefix)
    for problem in message[len(prefix) :].split("; "):
        if problem.startswith("positional_embedding_type="):
            continue  # the shortformer case adds a generic line besides its own
        assert problem in page, f"docs/architectures.md does not quote: {problem!r}"


def test_architectures_page_quotes_the_non_transformerlens_error():
    from tl_residual.model import model_spec

    page = " ".join((DOCS / "architectures.md").read_text(encoding="utf-8").split())
    with pytest.raises(UnsupportedArchitectureError, match="expected a TransformerLens HookedTransformer"):
        model_spec(object())
    assert "expected a TransformerLens HookedTransformer or TransformerBridge, got" in page


def _code_blocks(path: Path, section: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return [textwrap_dedent(b) for b in re.findall(r"```python\n(.*?)```", body, flags=re.S)]


def textwrap_dedent(block: str) -> str:
    import textwrap

    return textwrap.dedent(block)


@pytest.mark.real_model
@pytest.mark.slow
def test_extending_custom_scorer_example_runs(paris, monkeypatch, tmp_path):
    """The worked example of docs/extending.md: tables, top-k, explain, the faithfulness benchmark and the CLI."""
    import torch

    from tl_residual import scorers

    model, cache, _ = paris
    blocks = _code_blocks(DOCS / "extending.md", "Custom scorers")
    assert len(blocks) == 3, "expected the scorer module, the usage block and the CLI launcher"
    (tmp_path / "my_scorers.py").write_text(blocks[0], encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_scorers", None)
    try:
        importlib.import_module("my_scorers")
        assert "target_logit" in scorers.SCORERS
        ctx = scorers.make_context(model, cache, target=" Paris")

        # The scorer against an independent dense computation: z_t of each FFN subvalue of layer 24.
        table = scorers.score_ffn_neurons(ctx, method="target_logit", top_k=None, layers=[24], n_top_tokens=0)
        lens = ctx.lens
        m = cache["blocks.24.mlp.hook_post"][0, -1].float()
        w_out = model.blocks[24].mlp.W_out.detach().float()
        parts = m[:, None] * w_out
        centred = parts if not lens.center else parts - parts.mean(-1, keepdim=True)
        expected = (centred * lens.gamma / lens.scale) @ lens.W_U[:, ctx.target]
        got = torch.tensor(table.sort_values("neuron")["score"].to_numpy())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert table.attrs["method"] == "target_logit"

        top = scorers.score_ffn_neurons(ctx, method="target_logit", top_k=5, layers=[24], n_top_tokens=0)
        assert list(top["neuron"]) == [int(i) for i in torch.topk(expected, 5).indices]

        # The usage block as written (it loads the cached embedded model and runs explain).
        namespace: dict[str, object] = {}
        exec(compile(blocks[1], "extending.md", "exec"), namespace)  # noqa: S102
        assert namespace["ctx"].target == ctx.target

        with pytest.raises(Exception, match="linear lens"):
            recomputed = scorers.make_context(model, cache, target=" Paris", convention="recomputed")
            scorers.score_ffn_neurons(recomputed, method="target_logit", layers=[0])

        # The faithfulness benchmark accepts the registered name (one prompt, top-10, no attention part).
        bench_path = ROOT / "benchmarks" / "faithfulness.py"
        spec = importlib.util.spec_from_file_location("faithfulness_benchmark_docs", bench_path)
        bench = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bench
        spec.loader.exec_module(bench)
        prompts = pd.DataFrame({"type": ["capital"], "prompt": ["The capital of France is"], "answer_id": [ctx.target]})
        frame = bench.run_benchmark(
            model, prompts, methods=("target_logit",), ks=(10,), attention=False, batch_size=1, progress=False
        ).frame()
        row = frame[frame.method == "target_logit"].iloc[0]
        assert row["k"] == 10 and row["prob"] < row["prob_before"]

        # The command line, through the launcher's import order (in-process: the model is cached).
        from typer.testing import CliRunner

        from tl_residual.cli import app

        result = CliRunner().invoke(
            app, ["explain", "--prompt", "The capital of France is", "--method", "target_logit", "--top-k", "3"]
        )
        assert result.exit_code == 0, result.output
        assert "target_logit" in result.output and "Paris" in result.output
    finally:
        scorers.SCORERS.pop("target_logit", None)
        sys.modules.pop("my_scorers", None)
        sys.modules.pop("faithfulness_benchmark_docs", None)
