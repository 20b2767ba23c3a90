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


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` (the ``--json`` option), failing cleanly on an I/O error."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    except OSError as exc:
        fail(f"cannot write --json {path!r}: {exc}")
    console.print(f"wrote {path}")


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
    from tl_residual.query import parse_neuron, split_neuron, top_query_parts

    if not prompt.strip():
        fail("the prompt is empty: give some text, e.g. --prompt 'The capital of France is'")
    if top_k < 1:
        fail(f"--top-k must be a positive integer, got {top_k}")
    m = load(model)
    try:
        tokens = m.to_tokens(prompt)
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
    mode: str = typer.Option("zero", "--mode", help="zero (default), scale (needs --factor) or replace (needs --value)."),
    factor: Optional[float] = typer.Option(None, "--factor", help="Multiplier for --mode scale."),
    value: Optional[float] = typer.Option(None, "--value", help="New coefficient for --mode replace."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result as one JSON object to this path."),
) -> None:
    """Zero (or scale, or replace) components at every position, rerun, and compare the target before and after.

    The neuron-level paper's intervention (section 4.1): the target's rank, probability and log-probability (nats).
    """
    from tl_residual.interventions import MODES, intervene

    if not prompt.strip():
        fail("the prompt is empty: give some text, e.g. --prompt 'The capital of France is'")
    if not [n for n in neurons.split(",") if n.strip()]:
        fail("--neurons is empty: name at least one component, e.g. --neurons L24.N1005,L27.N1392")
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
        with console.status("running with and without the intervention ..."):
            result = intervene(m, prompt, neurons, target, mode=mode, factor=factor, value=value)  # type: ignore[arg-type]
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


@app.command()
def faithfulness(
    data: str = typer.Option("builtin:factual", "--data", help="builtin:factual, or a .jsonl/.csv/.parquet file with "
                             "prompt, answer (or target / target_id) and optionally type (or group)."),
    model_name: str = typer.Option("smollm2-135m", "--model", help="Model to load."),
    out: str = typer.Option("faithfulness", "--out", help="Output prefix: writes OUT.json and OUT.md."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", min=1, help="Run only the first N prompts."),
    methods_: str = typer.Option("", "--methods", help="Comma-separated scorers (default: the paper's eight)."),
    ks: str = typer.Option("10,100,300", "--ks", help="Comma-separated numbers of FFN neurons to zero."),
    no_attention: bool = typer.Option(False, "--no-attention", help="Skip Appendix C (attention neurons)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    paper_filter: Optional[bool] = typer.Option(None, "--filter/--no-filter", help="Apply the neuron-level paper's "
                                                "prompt filter (default: only for builtin:factual)."),
) -> None:
    """Neuron-level paper Table 2 / Table 13: zero each method's top-k FFN neurons and measure MRR / prob / logp."""
    from tl_residual import faithfulness as F
    from tl_residual.scorers import PAPER_METHODS

    try:
        k_list = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        fail(f"--ks {ks!r} is not a comma-separated list of integers")
    m_list = tuple(m.strip() for m in methods_.split(",") if m.strip()) or PAPER_METHODS
    model = load(model_name)
    try:
        res = F.run(model, data, out, max_prompts, m_list, k_list, not no_attention, batch_size, seed,
                    progress=True, paper_filter=paper_filter, model_name=model_name)
    except TLResidualError as exc:
        fail(str(exc))
    console.print(F.markdown(res), highlight=False, soft_wrap=True)
    console.print(f"wrote {out}.json and {out}.md")


@app.command("study-report")
def study_report(
    directory: str = typer.Argument(..., help="A study run's output folder (tl_residual.study.run)."),
    html: str = typer.Option("report.html", "--html", help="Where to write the self-contained HTML report."),
    model_name: Optional[str] = typer.Option(None, "--model", help="Also compute the analyses that need the model "
                                             "(rerunning the prompts)."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", min=1, help="Prompts for model-based analyses."),
) -> None:
    """Write every table and figure of the three papers that the run allows into one offline HTML file."""
    from tl_residual.analyses import load_study, write_report

    try:
        results = load_study(directory)
        model = load(model_name) if model_name else None
        sections = write_report(results, html, model=model, max_prompts=max_prompts)
    except TLResidualError as exc:
        fail(str(exc))
    console.print(f"wrote {html} ({sections} analyses)")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="tl-residual")


if __name__ == "__main__":
    main()
    sys.exit(0)
