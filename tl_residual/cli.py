"""The ``tl-residual`` command line.

``tl-residual explain --prompt "The capital of France is"`` runs the embedded SmolLM2-135M-Instruct offline and
prints the prediction, the layer-level contributions, and the top attention subvalues and FFN neurons with their
top vocabulary tokens. Bad input prints ``error: ...`` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from tl_residual import __version__
from tl_residual.errors import TLResidualError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Which parts of a TransformerLens model produced this next token? Exact residual-stream attribution.",
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        console.print(f"tl-residual {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """tl-residual command line."""


def load(model_name: str) -> Any:
    """Load a model for the CLI, turning any loader failure into a clear error."""
    from tl_residual.model import load_model

    with console.status(f"loading {model_name} ..."):
        try:
            return load_model(model_name)
        except TLResidualError as exc:
            fail(str(exc))
        except Exception as exc:  # a hub loader's own failure (offline, unknown repo, ...)
            fail(f"could not load model {model_name!r}: {type(exc).__name__}: {exc}")


def table(title: str, df: pd.DataFrame, columns: list[str], n: int | None = None) -> Table:
    """A rich table of ``df``'s ``columns`` (scores with 4 decimals, token lists joined)."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in ("score", "coefficient", "layer", "head", "src_pos", "neuron") else "left")
    rows = df if n is None else df.head(n)
    for row in rows.itertuples(index=False):
        cells = []
        for c in columns:
            v = getattr(row, c)
            if c == "top_tokens":
                cells.append(" ".join(repr(x) for x in v))
            elif isinstance(v, float):
                cells.append(f"{v:.4f}")
            else:
                cells.append(str(v))
        t.add_row(*cells)
    return t


@app.command()
def explain(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target token (one token, e.g. ' Paris'); default: top-1."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name; default: the embedded SmolLM2-135M."),
    position: int = typer.Option(-1, "--position", help="Destination position (default -1, the last token)."),
    top_k: int = typer.Option(20, "--top-k", "-k", help="Rows in the subvalue and neuron tables."),
    method: str = typer.Option("log_prob_increase", "--method", help="Scoring method (see `tl-residual methods`)."),
    convention: str = typer.Option("frozen", "--lens", help="Lens convention: frozen (default), recomputed, none."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result as one JSON object to this path."),
    html_path: Optional[str] = typer.Option(None, "--html", help="Write a self-contained HTML report to this path."),
) -> None:
    """Explain the next-token prediction of PROMPT: layers, head x position subvalues and FFN neurons."""
    from tl_residual.explain import explain as run_explain

    if not prompt.strip():
        fail("the prompt is empty: give some text, e.g. --prompt 'The capital of France is'")
    if top_k < 1:
        fail(f"--top-k must be a positive integer, got {top_k}")
    from tl_residual.scorers import SCORERS

    if method not in SCORERS:
        fail(f"unknown method {method!r}; choose one of: {', '.join(sorted(SCORERS))}")
    m = load(model)
    try:
        with console.status("running and attributing ..."):
            result = run_explain(m, prompt, target=target, position=position, top_k=top_k, method=method,
                                 convention=convention, model_name=model)  # type: ignore[arg-type]
    except TLResidualError as exc:
        fail(str(exc))
    console.print(
        f"[bold]{result.model}[/bold]  prompt {result.prompt!r}  position {result.position} "
        f"(token {result.tokens[result.position]!r})"
    )
    console.print(
        f"prediction: [bold green]{result.predictions[0][0]!r}[/bold green] p={result.predictions[0][1]:.4f}   "
        f"target: [bold]{result.target_token!r}[/bold] p={result.target_prob:.4f}   "
        f"top-5: " + ", ".join(f"{t!r} {p:.3f}" for t, p in result.predictions)
    )
    console.print(
        f"decomposition of the final resid_post: relative error {result.decomposition_rel_error:.2e}; "
        f"scores: {result.method} (nats), {result.convention} lens"
    )
    layers = result.layers.sort_values(["layer", "kind"]).reset_index(drop=True)
    console.print(table("Layer-level contributions (log-prob increase of each layer's attention / FFN output)",
                        layers, ["name", "kind", "score", "top_tokens"]))
    console.print(table(f"Top {top_k} attention subvalues (head x source position)", result.attention_subvalues,
                        ["name", "layer", "head", "src_pos", "score", "coefficient", "top_tokens"]))
    console.print(table(f"Top {top_k} FFN neurons", result.ffn_neurons,
                        ["name", "layer", "neuron", "score", "coefficient", "top_tokens"]))
    if json_path:
        try:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(result.to_dict(), f, indent=2, ensure_ascii=False)
        except OSError as exc:
            fail(f"cannot write --json {json_path!r}: {exc}")
        console.print(f"wrote {json_path}")
    if html_path:
        try:
            from tl_residual.visualize import write_report
        except ImportError:
            fail("--html needs tl_residual.visualize, which this version does not have")
        try:
            write_report(m, result, html_path)
        except OSError as exc:
            fail(f"cannot write --html {html_path!r}: {exc}")
        console.print(f"wrote {html_path}")


@app.command()
def methods() -> None:
    """List the registered scoring methods."""
    from tl_residual.scorers import SCORERS

    t = Table(title="scoring methods", header_style="bold")
    t.add_column("name")
    t.add_column("description")
    for name in sorted(SCORERS):
        t.add_row(name, SCORERS[name].description)
    console.print(t)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="tl-residual")


if __name__ == "__main__":
    main()
    sys.exit(0)
