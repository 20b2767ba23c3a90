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
from typing import TYPE_CHECKING, Annotated, Any, cast

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from tl_residual import __version__
from tl_residual.errors import TLResidualError

if TYPE_CHECKING:
    from tl_residual.interventions import Mode
    from tl_residual.lens import Convention

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


#: Columns a table may drop, in this order, when the terminal is too narrow (the name already encodes them).
_DROPPABLE = ("kind", "layer", "neuron", "head", "src_pos", "coefficient", "activation", "src_token")
_RIGHT = {"score", "coefficient", "activation", "contribution", "layer", "head", "src_pos", "neuron", "rank", "prob"}


def table(
    title: str,
    df: pd.DataFrame,
    columns: list[str],
    n: int | None = None,
    tokens: list[str] | None = None,
    headers: dict[str, str] | None = None,
    width: int | None = None,
) -> Table:
    """A rich table of ``df``'s ``columns`` that fits the terminal without wrapping inside a token.

    Cells come from :func:`tl_residual.visualize.display_table` (tokens quoted, 4 decimals, blanks instead of
    ``-1``/``NaN`` placeholders, ``src_token`` added from ``tokens`` where the table has ``src_pos``). When the
    columns are wider than the terminal, the columns the component name already encodes (kind, layer, neuron,
    head, src_pos) are dropped first, then cells are cut with an ellipsis; no cell wraps.
    """
    from tl_residual.visualize import display_table

    width = width or console.width
    rows = df if n is None else df.head(n)
    shown = display_table(rows, columns, tokens)
    cols = list(shown.columns)
    widths = {c: max([len((headers or {}).get(c, c))] + [len(x) for x in shown[c]]) + 3 for c in cols}

    def fixed() -> int:  # the columns other than top_tokens, plus 24 characters of top_tokens
        return sum(widths[k] for k in cols if k != "top_tokens") + 1 + (27 if "top_tokens" in cols else 0)

    for c in _DROPPABLE:
        if fixed() <= width:
            break
        if c in cols and len(cols) > 2:
            cols.remove(c)
    room = width - sum(widths[k] for k in cols if k != "top_tokens") - 1 - 3  # borders and padding
    t = Table(title=title, title_justify="left", header_style="bold", expand=False)
    for c in cols:
        t.add_column(
            (headers or {}).get(c, c),
            justify="right" if c in _RIGHT else "left",
            no_wrap=True,
            overflow="ellipsis",
            min_width=min(widths[c] - 3, 12) if c != "top_tokens" else 10,
            max_width=max(room, 10) if c == "top_tokens" else None,
        )
    for row in shown[cols].itertuples(index=False):
        t.add_row(*row)
    return t


def _read_prompts(path: str) -> list[tuple[str, str | None]]:
    """``--prompts FILE``: one prompt per line, or JSON Lines with a ``"prompt"`` and an optional ``"target"``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --prompts {path!r}: {exc}")
    out: list[tuple[str, str | None]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                fail(f"--prompts {path!r} line {i} is not valid JSON: {exc}")
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                fail(f'--prompts {path!r} line {i}: a JSON line needs a non-empty "prompt" string')
            target = rec.get("target")
            if target is not None and not isinstance(target, str):
                fail(f'--prompts {path!r} line {i}: "target" must be a string (one token, e.g. " Paris")')
            out.append((rec["prompt"], target))
        else:
            out.append((line, None))
    if not out:
        fail(f'--prompts {path!r} has no prompts: write one prompt per line (or JSON Lines with a "prompt")')
    return out


def _parse_layers(text: str | None) -> list[int] | None:
    """``--graph-layers``: ``23,24`` or ``22-25`` (or a mix); ``None`` when not given."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        fail(f"--graph-layers {text!r} is not understood: give layers like 23,24 or 22-25")
    if not out:
        fail("--graph-layers is empty: give layers like 23,24 or 22-25")
    return out


def _check_target_early(model: str, target: str | None) -> None:
    """Check a target is one token with the tokenizer alone (cheap where the model is cached), before loading."""
    if target is None or target.lstrip("-").isdigit():
        return
    from tl_residual.model import load_tokenizer

    tok = load_tokenizer(model)
    if tok is None:
        return
    ids = tok.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tok.decode([i]) for i in ids]
        fail(
            f"target {target!r} is {len(ids)} tokens {pieces!r}, not one; give a single token (e.g. ' Paris', "
            f"with its leading space) or a token id"
        )


def _report_path(path: str, i: int, n: int) -> str:
    if n == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{i}{ext or '.html'}"


# Options that several commands declare alike (typer copies an option's declaration for every command using it).
# Options shared by explain, query and ablate, declared once (typer's Annotated form; the default stays in the
# signature: ``model: ModelOption = DEFAULT_MODEL``).
DEFAULT_MODEL = "smollm2-135m"
PromptOption = Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name; default: the embedded SmolLM2-135M.")]
TargetIdOption = Annotated[int | None, typer.Option("--target-id", help="Target as a token id (instead of --target).")]
JsonOption = Annotated[str | None, typer.Option("--json", help="Write the result as one JSON object to this path.")]


@app.command()
def explain(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The prompt text."),
    prompts_file: str | None = typer.Option(
        None,
        "--prompts",
        help="A file of prompts: one per line, or JSON "
        'Lines with "prompt" and an optional "target"; all explained '
        "with one model load.",
    ),
    target: str | None = typer.Option(
        None, "--target", "-t", help="Target token (one token, e.g. ' Paris'); default: top-1."
    ),
    target_id: TargetIdOption = None,
    model: ModelOption = DEFAULT_MODEL,
    position: int = typer.Option(-1, "--position", help="Destination position (default -1, the last token)."),
    top_k: int = typer.Option(20, "--top-k", "-k", help="Rows in the layer, subvalue and neuron tables."),
    method: str = typer.Option("log_prob_increase", "--method", help="Scoring method (see `tl-residual methods`)."),
    convention: str = typer.Option("frozen", "--lens", help="Lens convention: frozen (default), recomputed, none."),
    json_path: str | None = typer.Option(
        None,
        "--json",
        help="Write the result as one JSON object to this path (with --prompts: a JSON array, one object per prompt).",
    ),
    html_path: str | None = typer.Option(
        None,
        "--html",
        help="Write a self-contained HTML report to this path (with --prompts: PATH-1.html, PATH-2.html, ...).",
    ),
    graph_layers: str | None = typer.Option(
        None,
        "--graph-layers",
        help="Layers of the report's flow graph, "
        "e.g. 23,24 or 22-25; default: the two layers whose attention or FFN "
        "output scores highest (|score|).",
    ),
) -> None:
    """Explain the next-token prediction of PROMPT: layers, head x position subvalues and FFN neurons."""
    from tl_residual.explanation import explain as run_explain

    if (prompt is None) == (prompts_file is None):
        fail("give exactly one of --prompt TEXT or --prompts FILE")
    check_options(prompt, top_k, {"--json": json_path, "--html": html_path}, method, convention, target, target_id)
    layers = _parse_layers(graph_layers)
    if layers is not None and not html_path:
        fail("--graph-layers applies to the --html report: add --html report.html")
    if prompt is not None:
        jobs = [(prompt, target)]
    else:
        jobs = [(p, t if t is not None else target) for p, t in _read_prompts(prompts_file)]  # type: ignore[arg-type]
    for _, t in dict.fromkeys(jobs):
        _check_target_early(model, t)
    m = load(model)
    results = []
    for i, (text, tgt) in enumerate(jobs, 1):
        if len(jobs) > 1:
            console.rule(f"prompt {i}/{len(jobs)}")
        try:
            with console.status("running and attributing ..."), hints():
                result = run_explain(
                    m,
                    text,
                    target=tgt if target_id is None else target_id,
                    position=position,
                    top_k=top_k,
                    method=method,
                    convention=cast("Convention", convention),  # checked by check_options
                    model_name=model,
                )
        except TLResidualError as exc:
            fail(str(exc) if len(jobs) == 1 else f"prompt {i} ({text!r}): {exc}")
        _print_explanation(result, top_k)
        results.append(result)
        if html_path:
            _write_html(m, result, _report_path(html_path, i, len(jobs)), layers)
    if json_path:
        write_json(json_path, results[0].to_dict() if prompt is not None else [r.to_dict() for r in results])


def _print_explanation(result: Any, top_k: int) -> None:
    toks = list(result.tokens)
    console.print(
        f"[bold]{result.model}[/bold]  prompt {result.prompt!r}  position {result.position} "
        f"(token {toks[result.position]!r})",
        highlight=False,
    )
    console.print(
        f"prediction: [bold green]{result.predictions[0][0]!r}[/bold green] p={result.predictions[0][1]:.4f}   "
        f"target: [bold]{result.target_token!r}[/bold] p={result.target_prob:.4f}",
        highlight=False,
    )
    console.print("top-5: " + ",  ".join(f"{t!r}\u00a0{p:.3f}" for t, p in result.predictions), highlight=False)
    from tl_residual.scorers import get_scorer

    unit = get_scorer(result.method).units or "score units"  # the units of the scorer that produced the tables
    console.print(
        f"decomposition of the final resid_post: relative error {result.decomposition_rel_error:.2e}", highlight=False
    )
    console.print(f"scores: {result.method} ({unit}), {result.convention} lens", highlight=False)
    n_layers = len(result.layers)
    headers = {
        "score": f"score ({unit})" if unit == "nats" else "score",
        "src_token": "source token",
        "coefficient": "coefficient",
    }
    console.print(
        table(
            f"Layer outputs: top {min(top_k, n_layers)} of {n_layers} by score (as in --json)",
            result.layers,
            ["name", "kind", "score", "top_tokens"],
            top_k,
            toks,
            headers,
        )
    )
    console.print(
        table(
            f"Top {top_k} attention subvalues (head x source position)",
            result.attention_subvalues,
            ["name", "layer", "head", "src_pos", "src_token", "score", "coefficient", "top_tokens"],
            tokens=toks,
            headers=dict(headers, coefficient="attn weight"),
        )
    )
    console.print(
        table(
            f"Top {top_k} FFN neurons",
            result.ffn_neurons,
            ["name", "layer", "neuron", "score", "coefficient", "top_tokens"],
            tokens=toks,
            headers=dict(headers, coefficient="activation"),
        )
    )


def _write_html(m: Any, result: Any, path: str, layers: list[int] | None) -> None:
    from tl_residual.visualize import write_report

    try:
        with console.status("drawing the flow graph and plots ..."):
            write_report(m, result, path, layers=layers)
    except OSError as exc:
        fail(f"cannot write --html {path!r}: {exc}")
    except TLResidualError as exc:
        fail(str(exc))
    console.print(f"wrote {path}")


@app.command()
def query(
    prompt: PromptOption,
    neuron: Annotated[
        str,
        typer.Option(
            "--neuron",
            "-n",
            help="FFN neuron L{layer}.N{index} (e.g. L24.N1005) or attention "
            "value neuron L{layer}.H{head}.d{dim}.p{source position} (e.g. L23.H4.d55.p4).",
        ),
    ],
    model: ModelOption = DEFAULT_MODEL,
    position: int = typer.Option(-1, "--position", help="Position of the FFN neuron (default -1, the last token)."),
    top_k: int = typer.Option(20, "--top-k", "-k", help="Query parts listed per input (largest |contribution|)."),
    json_path: JsonOption = None,
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
        + (f" (token {token_strs[pos]!r})" if token_strs else ""),
        highlight=False,
    )
    activation, what = _neuron_activation(m, cache, neuron, position)
    console.print(f"{what} = [bold]{activation:.4f}[/bold]", highlight=False)
    bias_rows = split[split["kind"] == "key_bias"]
    out: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "tokens": token_strs,
        "neuron": split.attrs["neuron"],
        "position": pos,
        "activation": activation,
        "activation_is": what,
        "norm": split.attrs["norm"],
        "stream": split.attrs["stream"],
        "inputs": {},
    }
    for col, top in tops.items():
        cached, err = split.attrs["cached"][col], split.attrs["abs_error"][col]
        bias = float(bias_rows[col].sum())
        console.print(
            f"input [bold]{col}[/bold] ({split.attrs['hooks'][col]}) = {cached:.4f}: key bias B = {bias:.4f}, "
            f"parts sum = {cached - bias:.4f}, |split - cached| = {err:.1e}"
        )
        shown = top.rename(columns={col: "contribution"})
        console.print(
            table(
                f"Top {top_k} query parts by |contribution| to {col}",
                shown,
                ["name", "kind", "layer", "head", "src_pos", "src_token", "neuron", "contribution"],
                tokens=token_strs,
                headers={"src_token": "source token"},
            )
        )
        out["inputs"][col] = {
            "hook": split.attrs["hooks"][col],
            "cached": cached,
            "key_bias": bias,
            "abs_error": err,
            "top": [_query_record(r, col, token_strs) for r in shown.to_dict(orient="records")],
        }
    if json_path:
        write_json(json_path, out)


def _query_record(r: dict[str, Any], col: str, tokens: list[str]) -> dict[str, Any]:
    """One query part for --json: only the fields that apply (no -1/NaN placeholders), with its source token."""
    rec: dict[str, Any] = {"name": r["name"], "kind": r.get("kind")}
    for k in ("layer", "head", "src_pos", "neuron"):
        v = r.get(k)
        if v is not None and v is not pd.NA and v == v and int(v) >= 0:
            rec[k] = int(v)
    if "src_pos" in rec and "src_token" not in r and 0 <= rec["src_pos"] < len(tokens):
        rec["src_token"] = tokens[rec["src_pos"]]
    elif r.get("src_token"):
        rec["src_token"] = r["src_token"]
    rec["contribution"] = float(r["contribution"])
    return rec


def _neuron_activation(m: Any, cache: Any, name: str, position: int) -> tuple[float, str]:
    """The queried neuron's own value: an FFN neuron's activation ``m`` (its coefficient, after the gate), or an
    attention value neuron's coefficient ``pattern × v`` at the destination ``position``."""
    from tl_residual import decompose as D
    from tl_residual import names

    ref = names.parse(name)
    assert ref.layer is not None  # names.parse gives every neuron kind a layer
    if ref.kind == "ffn_neuron":
        ffn, _ = D.ffn_parts(m, cache, ref.layer, position)
        pos = D.resolve_position(position, D.n_positions(cache))
        return float(ffn.coefficients[ref.neuron]), f"activation m of {name} at position {pos} (the MLP's hook_post)"
    neurons = D.attention_neuron_parts(m, cache, ref.layer, position)
    if name not in neurons.names:
        return float("nan"), f"coefficient of {name} (its source position is after the destination)"
    k = neurons.names.index(name)
    dest = D.resolve_position(position, D.n_positions(cache))
    return float(neurons.coefficients[k]), f"coefficient of {name} at destination position {dest} (attn weight × v)"


@app.command()
def ablate(
    prompt: PromptOption,
    neurons: Annotated[
        str,
        typer.Option(
            "--neurons",
            "-n",
            help="Comma-separated components: FFN neurons L24.N1005, "
            "attention neurons L12.H3.d7 (or L12.H3.d7.p4), subvalues L12.H3.p4, heads L12.H3.",
        ),
    ],
    model: ModelOption = DEFAULT_MODEL,
    target: str | None = typer.Option(
        None,
        "--target",
        "-t",
        help="Target token (one token, e.g. ' Paris'); default: the top-1 before the intervention.",
    ),
    target_id: TargetIdOption = None,
    mode: str = typer.Option(
        "zero", "--mode", help="zero (default), scale (needs --factor) or replace (needs --value)."
    ),
    factor: float | None = typer.Option(None, "--factor", help="Multiplier for --mode scale."),
    value: float | None = typer.Option(None, "--value", help="New coefficient for --mode replace."),
    json_path: JsonOption = None,
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
            result = intervene(
                m,
                prompt,
                neurons,
                target if target_id is None else target_id,
                mode=cast("Mode", mode),  # checked against MODES above
                factor=factor,
                value=value,
            )
    except TLResidualError as exc:
        fail(str(exc))
    row = result.to_dataframe().iloc[0]
    comps = result.components[0]
    how = {"zero": "removed", "scale": f"scaled by {factor}", "replace": f"set to {value}"}[mode]
    console.print(
        f"[bold]{model}[/bold]  prompt {prompt!r}  target [bold]{row.target_token!r}[/bold] (id {int(row.target)})",
        highlight=False,
    )
    for c in comps:
        console.print(f"  {_scope(c, how)}", highlight=False)
    t = Table(header_style="bold")
    for c in ("", "target rank", "target prob", "target logp (nats)", "top-1 prediction"):
        t.add_column(c, justify="left" if c in ("", "top-1 prediction") else "right", no_wrap=True)
    top_after = getattr(row, "top1_after_token", None)
    top_after_prob = getattr(row, "top1_after_prob", float("nan"))
    top_before = getattr(row, "top1_before_token", None)
    t.add_row(
        "before",
        str(int(row.rank_before)),
        f"{row.prob_before:.4f}",
        f"{row.logp_before:.4f}",
        f"{top_before!r} {getattr(row, 'top1_before_prob', float('nan')):.4f}" if top_before is not None else "",
    )
    t.add_row(
        "after",
        str(int(row.rank_after)),
        f"{row.prob_after:.4f}",
        f"{row.logp_after:.4f}",
        f"{top_after!r} {top_after_prob:.4f}" if top_after is not None else "",
    )
    console.print(t)
    if json_path:
        out = {
            "model": model,
            "prompt": prompt,
            "target_token": row.target_token,
            "target_id": int(row.target),
            "mode": mode,
            "factor": factor,
            "value": value,
            "components": comps,
            "scope": [_scope(c, how) for c in comps],
            "before": {"rank": int(row.rank_before), "prob": float(row.prob_before), "logp": float(row.logp_before)},
            "after": {
                "rank": int(row.rank_after),
                "prob": float(row.prob_after),
                "logp": float(row.logp_after),
                **({"top1_token": top_after, "top1_prob": float(top_after_prob)} if top_after is not None else {}),
            },
        }
        write_json(json_path, out)


def _scope(name: str, how: str) -> str:
    """What an intervention on ``name`` does, in words (``how``: removed / scaled by f / set to v)."""
    from tl_residual import names

    try:
        r = names.parse(name)
    except TLResidualError:
        return f"{name}: {how} at every position"
    verb = {"removed": "removed from"}.get(how, f"{how} in")
    template = _SCOPES.get(r.kind, "{how} at every position")
    return f"{name}: " + template.format(r=r, how=how, verb=verb)


#: How far an intervention on each kind reaches (for ``ablate``'s report); ``r`` is the parsed name.
_SCOPES = {
    "attn_subvalue": "source position {r.src_pos}'s value {verb} head {r.head}'s output (layer {r.layer}) at every "
    "destination position",
    "ffn_neuron": "FFN neuron {r.neuron}'s activation (layer {r.layer}) {how} at every position",
    "attn_neuron": "dimension {r.dim} of head {r.head}'s value (layer {r.layer}) at source position {r.src_pos} "
    "{how}, at every destination position",
    "head_dim": "dimension {r.dim} of head {r.head}'s value (layer {r.layer}) {how} at every position",
    "head": "head {r.head}'s output (layer {r.layer}) {how} at every position",
}


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
def study(
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Prompts: a .jsonl/.csv/.parquet file, a save_to_disk folder, "
        "a hub dataset name (name or name:split), or builtin:factual (the 442 shipped prompts).",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Study folder (created; an existing one is resumed)."),
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        "-m",
        help="Model name or a saved Hugging Face model folder; default: the embedded SmolLM2-135M.",
    ),
    prompt_column: str = typer.Option("prompt", "--prompt-column", help="Column holding the prompt text."),
    target_column: str | None = typer.Option(
        None,
        "--target-column",
        help="Column holding the target (a one-token "
        "string or a token id); default: the model's top-1 (builtin: answer).",
    ),
    group_column: str | None = typer.Option(
        None, "--group-column", help="Column holding a group label (e.g. knowledge type; builtin: type)."
    ),
    filter_: str | None = typer.Option(
        None,
        "--filter",
        help="paper: keep the prompts passing the neuron-level paper's filter (needs target and group columns).",
    ),
    methods: str = typer.Option(
        "log_prob_increase",
        "--methods",
        help="Comma-separated scoring methods (`tl-residual methods`), all from one forward pass.",
    ),
    kinds: str | None = typer.Option(
        None,
        "--kinds",
        help="Comma-separated subset of layer,stream,ffn_neuron,"
        "attn_neuron,attn_subvalue,head,query (default: all but query).",
    ),
    top_k: str | None = typer.Option(
        None,
        "--top-k",
        help="Parts kept per prompt: N for every neuron kind, or "
        "ffn_neuron=100,attn_neuron=200,attn_subvalue=20,head=all (the default).",
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    position: int = typer.Option(
        -1, "--position", help="Destination position in each prompt (default -1, its last token)."
    ),
    max_prompts: int | None = typer.Option(None, "--max-prompts", help="Only the first N prompts of the data."),
    convention: str = typer.Option("frozen", "--lens", help="Lens convention: frozen (default), recomputed, none."),
    query_values: int = typer.Option(
        10, "--query-values", help="Kind query: FFN value neurons split per prompt (top by Imp; 0 = none)."
    ),
    query_attn_values: int = typer.Option(
        10, "--query-attn-values", help="Kind query: attention value neurons split per prompt (0 = none)."
    ),
    query_top_k: int = typer.Option(20, "--query-top-k", help="Kind query: query parts kept per value neuron."),
    query_totals_k: int = typer.Option(
        1000,
        "--query-totals-k",
        help="Kind query: query parts kept per prompt, value kind and query kind by their summed score.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Score every prompt of a data set and write Parquet shards to OUT (resumable; data-parallel under
    `accelerate launch -m tl_residual study ...`). Read the results with tl_residual.study.load(OUT)."""
    from tl_residual import study as st

    try:
        kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else st.DEFAULT_KINDS
        top = st.parse_top_k(top_k) if top_k else None
        method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
        if batch_size < 1:
            fail(f"--batch-size must be a positive integer, got {batch_size}")
        if max_prompts is not None and max_prompts < 1:
            fail(f"--max-prompts must be a positive integer, got {max_prompts}")
        from tl_residual.scorers import get_scorer

        for mth in method_list:
            get_scorer(mth)
        st.read_data(data)  # a missing or unreadable file fails before the model loads
    except TLResidualError as exc:
        fail(str(exc))
    state = st.distributed_state()  # before loading: each process of a launcher loads onto its own device
    if state.device.type == "cpu":
        m = load(model)
    else:
        from tl_residual.model import load_model

        try:
            m = load_model(model, device=str(state.device))
        except Exception as exc:
            fail(f"could not load model {model!r} on {state.device}: {type(exc).__name__}: {exc}")
    try:
        summary = st.run(
            m,
            data,
            out,
            methods=method_list,
            top_k=top,
            kinds=kind_list,
            batch_size=batch_size,
            position=position,
            prompt_column=prompt_column,
            target_column=target_column,
            group_column=group_column,
            filter=filter_,
            convention=convention,
            query_values=query_values,
            query_attn_values=query_attn_values,
            query_top_k=query_top_k,
            query_totals_k=query_totals_k,
            max_prompts=max_prompts,
            model_name=model,
            progress=not quiet,
        )
    except TLResidualError as exc:
        fail(str(exc))
    rank = f"rank {summary['rank']}/{summary['world_size']}: " if summary["world_size"] > 1 else ""
    console.print(
        f"{rank}{summary['ok']} prompts scored, {summary['failed']} failed, {summary['filtered']} filtered, "
        f"{summary['skipped']} already done, {summary['seconds']:.1f} s; results in {out}"
    )


def faithfulness(
    data: str = typer.Option(
        "builtin:factual",
        "--data",
        help="builtin:factual, or a .jsonl/.csv/.parquet file with "
        "prompt, answer (or target / target_id) and optionally type (or group).",
    ),
    model_name: str = typer.Option("smollm2-135m", "--model", help="Model to load."),
    out: str = typer.Option(
        "faithfulness",
        "--out",
        help="Output prefix: writes OUT.md, OUT.json, OUT.records.parquet and OUT.selections.parquet.",
    ),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=1, help="Run only the first N prompts."),
    methods_: str = typer.Option("", "--methods", help="Comma-separated scorers (default: the paper's eight)."),
    ks: str = typer.Option("10,100,300", "--ks", help="Comma-separated numbers of FFN neurons to zero."),
    no_attention: bool = typer.Option(False, "--no-attention", help="Skip Appendix C (attention neurons)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    paper_filter: bool | None = typer.Option(
        None,
        "--filter/--no-filter",
        help="Apply the neuron-level paper's prompt filter (default: only for builtin:factual).",
    ),
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
        res = F.run(
            model,
            data,
            out,
            max_prompts,
            m_list,
            k_list,
            not no_attention,
            batch_size,
            seed,
            progress=True,
            paper_filter=paper_filter,
            model_name=model_name,
        )
    except TLResidualError as exc:
        fail(str(exc))
    console.print(F.markdown(res), highlight=False, soft_wrap=True)
    console.print(f"wrote {out}.md, {out}.json, {out}.records.parquet and {out}.selections.parquet")


@app.command("study-report")
def study_report(
    directory: str = typer.Argument(..., help="A study run's output folder (tl_residual.study.run)."),
    html: str = typer.Option("report.html", "--html", help="Where to write the self-contained HTML report."),
    model_name: str | None = typer.Option(
        None, "--model", help="Also compute the analyses that need the model (rerunning the prompts)."
    ),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=1, help="Prompts for model-based analyses."),
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
