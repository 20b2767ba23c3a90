"""The ``tl-residual`` command line.

``tl-residual explain --prompt "The capital of France is"`` runs the embedded SmolLM2-135M-Instruct offline and
prints the prediction, the layer-level contributions, and the top attention subvalues and FFN neurons with their
top vocabulary tokens. Bad input prints ``error: ...`` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
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
    rich_markup_mode=None,  # click's help layout: flags shown as flags (--flag / --no-flag), never as "<bool>"
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


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` (the ``--json`` option) atomically (temporary file and
    rename: a failed write leaves the previous file intact), failing cleanly on an I/O error."""
    from tl_residual._io import atomic_write_text

    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
        atomic_write_text(path, text)
    except (OSError, ValueError) as exc:
        fail(f"cannot write --json {path!r}: {exc}")
    console.print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Validation before the model loads (a bad option costs no model load)
# ----------------------------------------------------------------------------------------------


def check_options(
    prompt: str | None = None,
    top_k: int | None = None,
    paths: dict[str, str | None] | None = None,
    method: str | None = None,
    convention: str | None = None,
    target: str | None = None,
    target_id: int | None = None,
) -> None:
    """Validate the options every command shares; :func:`fail` (exit 2) on the first bad one."""
    from tl_residual._io import check_writable

    if prompt is not None and not prompt.strip():
        fail("the prompt is empty: give some text, e.g. --prompt 'The capital of France is'")
    if top_k is not None and top_k < 1:
        fail(f"--top-k must be a positive integer, got {top_k}")
    if method is not None:
        from tl_residual.scorers import SCORERS

        if method not in SCORERS:
            fail(f"unknown method {method!r}; choose one of: {', '.join(sorted(SCORERS))}")
    if convention is not None:
        from tl_residual.lens import CONVENTIONS

        if convention not in CONVENTIONS:
            fail(f"--lens: lens convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    if target is not None and target_id is not None:
        fail(f"give --target or --target-id, not both (got {target!r} and {target_id})")
    if target is not None and target == "":
        fail("--target is empty: give one token, e.g. --target ' Paris', or a token id with --target-id")
    if target_id is not None and target_id < 0:
        fail(f"--target-id must be a non-negative token id, got {target_id}")
    for option, path in (paths or {}).items():
        if path is not None:
            try:
                check_writable(path, option)
            except TLResidualError as exc:
                fail(str(exc))


def check_names(text: str, option: str, kinds: tuple[str, ...] | None = None) -> list[str]:
    """Parse the comma-separated component names of ``option`` (syntax and kind; ranges need the model)."""
    from tl_residual import names

    items = [n.strip() for n in text.split(",") if n.strip()]
    if not items:
        fail(f"{option} is empty: name at least one component, e.g. {option} L24.N1005")
    for item in items:
        try:
            ref = names.parse(item)
        except TLResidualError as exc:
            fail(f"{option}: {exc}")
        if kinds is not None and ref.kind not in kinds:
            fail(f"{option}: {item!r} is of kind {ref.kind}; this command takes {' or '.join(kinds)}")
    return items


def check_number(value: float | None, option: str) -> None:
    """Refuse a NaN or infinite ``--factor`` / ``--value``."""
    if value is not None and not math.isfinite(value):
        fail(f"{option} must be a finite number, got {value}")


@contextlib.contextmanager
def hints() -> Iterator[None]:
    """Print the library's warnings (e.g. a target without its leading space) as ``hint: ...`` on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, UserWarning) and str(w.message).startswith("hint:"):
                    err_console.print(f"[yellow]{w.message}[/yellow]", highlight=False)


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
    target_id: int | None = typer.Option(None, "--target-id", help="Target as a token id (instead of --target)."),
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

    check_options(prompt, top_k, {"--json": json_path, "--html": html_path}, method, convention, target, target_id)
    m = load(model)
    try:
        with console.status("running and attributing ..."), hints():
            result = run_explain(m, prompt, target=target if target_id is None else target_id, position=position,
                                 top_k=top_k, method=method, convention=convention,
                                 model_name=model)  # type: ignore[arg-type]
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
        write_json(json_path, result.to_dict())
    if html_path:
        try:
            from tl_residual.visualize import write_report
        except ImportError:
            fail("--html needs tl_residual.visualize, which this version does not have")
        try:
            with console.status("drawing the flow graph and plots ..."):
                write_report(m, result, html_path)
        except OSError as exc:
            fail(f"cannot write --html {html_path!r}: {exc}")
        except TLResidualError as exc:
            fail(str(exc))
        console.print(f"wrote {html_path}")


@app.command()
def query(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    neuron: str = typer.Option(..., "--neuron", "-n", help="FFN neuron L{layer}.N{index} (e.g. L24.N1005) or attention "
                               "value neuron L{layer}.H{head}.d{dim}.p{source position} (e.g. L23.H4.d55.p4)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name; default: the embedded SmolLM2-135M."),
    position: int = typer.Option(-1, "--position", help="Position of the FFN neuron (default -1, the last token)."),
    top_k: int = typer.Option(20, "--top-k", "-k", help="Query parts listed per input (largest |contribution|)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result as one JSON object to this path."),
) -> None:
    """Which upstream parts switched NEURON on: the exact split of its input(s) at one position.

    Each part's contribution is its dot product with the neuron's read weights, with the cached LayerNorm/RMSNorm
    scale and centring folded in (residual-stream paper Eq. 20-23); the contributions plus the key bias B sum to
    the cached pre-activation (gate and up separately for gated MLPs).
    """
    from tl_residual.model import to_tokens
    from tl_residual.query import parse_neuron, split_neuron, top_query_parts

    check_options(prompt, top_k, {"--json": json_path})
    if "," in neuron:
        fail(f"--neuron takes one neuron, got {neuron!r}")
    check_names(neuron, "--neuron", ("ffn_neuron", "attn_neuron"))
    m = load(model)
    try:
        tokens = to_tokens(m, prompt)
        parse_neuron(m, neuron, int(tokens.shape[1]))  # a bad name fails before the forward pass
        with console.status("running and splitting ..."):
            import torch

            with torch.no_grad():
                _, cache = m.run_with_cache(tokens)
            split = split_neuron(m, cache, neuron, position)
            tops = {col: top_query_parts(split, col, top_k) for col in split.attrs["inputs"]}
    except TLResidualError as exc:
        fail(str(exc))
    token_strs = [m.tokenizer.decode([t]) for t in tokens[0].tolist()] if getattr(m, "tokenizer", None) else []
    pos = split.attrs["position"]
    console.print(
        f"[bold]{model}[/bold]  prompt {prompt!r}  neuron [bold]{split.attrs['neuron']}[/bold] at position {pos}"
        + (f" (token {token_strs[pos]!r})" if token_strs else "")
    )
    bias_rows = split[split["kind"] == "key_bias"]
    out: dict[str, Any] = {"model": model, "prompt": prompt, "tokens": token_strs, "neuron": split.attrs["neuron"],
                           "position": pos, "norm": split.attrs["norm"], "stream": split.attrs["stream"], "inputs": {}}
    for col, top in tops.items():
        cached, err = split.attrs["cached"][col], split.attrs["abs_error"][col]
        bias = float(bias_rows[col].sum())
        console.print(f"input [bold]{col}[/bold] ({split.attrs['hooks'][col]}) = {cached:.4f}: key bias B = {bias:.4f}, "
                      f"parts sum = {cached - bias:.4f}, |split - cached| = {err:.1e}")
        shown = top.rename(columns={col: "contribution"})
        console.print(table(f"Top {top_k} query parts by |contribution| to {col}", shown,
                            ["name", "kind", "layer", "head", "src_pos", "neuron", "contribution"]))
        out["inputs"][col] = {
            "hook": split.attrs["hooks"][col], "cached": cached, "key_bias": bias, "abs_error": err,
            "top": [{"name": r.name, "kind": r.kind, "layer": int(r.layer), "head": int(r.head),
                     "src_pos": int(r.src_pos), "neuron": int(r.neuron), "contribution": float(getattr(r, col))}
                    for r in top.itertuples(index=False)],
        }
    if json_path:
        write_json(json_path, out)


@app.command()
def ablate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    neurons: str = typer.Option(..., "--neurons", "-n", help="Comma-separated components: FFN neurons L24.N1005, "
                                "attention neurons L12.H3.d7 (or L12.H3.d7.p4), subvalues L12.H3.p4, heads L12.H3."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name; default: the embedded SmolLM2-135M."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target token (one token, e.g. ' Paris'); "
                                         "default: the top-1 before the intervention."),
    target_id: int | None = typer.Option(None, "--target-id", help="Target as a token id (instead of --target)."),
    mode: str = typer.Option("zero", "--mode", help="zero (default), scale (needs --factor) or replace (needs --value)."),
    factor: Optional[float] = typer.Option(None, "--factor", help="Multiplier for --mode scale."),
    value: Optional[float] = typer.Option(None, "--value", help="New coefficient for --mode replace."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result as one JSON object to this path."),
) -> None:
    """Zero (or scale, or replace) components at every position, rerun, and compare the target before and after.

    The neuron-level paper's intervention (section 4.1): the target's rank, probability and log-probability (nats).
    """
    from tl_residual.interventions import MODES, intervene

    check_options(prompt, None, {"--json": json_path}, target=target, target_id=target_id)
    check_names(neurons, "--neurons", ("ffn_neuron", "attn_neuron", "attn_subvalue", "head_dim", "head"))
    check_number(factor, "--factor")
    check_number(value, "--value")
    if mode not in MODES:
        fail(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "scale" and factor is None:
        fail("--mode scale needs --factor (e.g. --factor 0.5)")
    if mode == "replace" and value is None:
        fail("--mode replace needs --value (the new coefficient)")
    if mode != "scale" and factor is not None:
        fail(f"--factor only applies to --mode scale (got --mode {mode})")
    if mode != "replace" and value is not None:
        fail(f"--value only applies to --mode replace (got --mode {mode})")
    m = load(model)
    try:
        with console.status("running with and without the intervention ..."), hints():
            result = intervene(m, prompt, neurons, target if target_id is None else target_id, mode=mode,
                               factor=factor, value=value)  # type: ignore[arg-type]
    except TLResidualError as exc:
        fail(str(exc))
    row = result.to_dataframe().iloc[0]
    comps = result.components[0]
    how = {"zero": "zeroed", "scale": f"scaled by {factor}", "replace": f"replaced by {value}"}[mode]
    console.print(f"[bold]{model}[/bold]  prompt {prompt!r}  target [bold]{row.target_token!r}[/bold] "
                  f"(id {int(row.target)}); {len(comps)} component(s) {how} at every position: {', '.join(comps)}")
    t = Table(header_style="bold")
    for c in ("", "rank", "prob", "logp (nats)"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("before", str(int(row.rank_before)), f"{row.prob_before:.4f}", f"{row.logp_before:.4f}")
    t.add_row("after", str(int(row.rank_after)), f"{row.prob_after:.4f}", f"{row.logp_after:.4f}")
    console.print(t)
    if json_path:
        out = {"model": model, "prompt": prompt, "target_token": row.target_token, "target_id": int(row.target),
               "mode": mode, "factor": factor, "value": value, "components": comps,
               "before": {"rank": int(row.rank_before), "prob": float(row.prob_before), "logp": float(row.logp_before)},
               "after": {"rank": int(row.rank_after), "prob": float(row.prob_after), "logp": float(row.logp_after)}}
        write_json(json_path, out)


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
    """Console-script entry point: bad input exits with status 2 and one ``error:`` line, never a traceback
    (click's own usage errors are status 2 too). Ctrl-C stops with click's "Aborted!" (status 1); result files
    are written atomically, so an interrupted write leaves the previous file intact."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(prog_name="tl-residual")
    except TLResidualError as exc:  # raised outside a command's own try (e.g. while printing a result)
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
    sys.exit(0)
