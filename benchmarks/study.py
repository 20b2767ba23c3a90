"""Throughput of dataset-scale runs (tl_residual.study) against the batched forward pass (docs/studies.md).

One run measures, in the same process, on the same prompts and with the same batching (right padding, prompts
sorted by length, ``--batch-size`` per forward), side by side:

* ``forward``: ``model.run_with_cache(tokens)`` over every batch (the cache every attribution needs);
* ``study``: :func:`tl_residual.study.run` with one method (log-probability increase): layer-level scores, the
  certified top-100 FFN neurons, top-200 attention neurons, top-20 head x position subvalues and all heads per
  prompt, written to Parquet shards (its own forward pass included);

then the study's cost per kind (each kind alone, on a subset), and how the cost grows with the batch size and
the prompt length (prompts made longer by prefixing other prompts of the set).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/study.py                  # all 442 shipped prompts
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/study.py --n 32 --quick   # a subset while developing

Results: ``benchmarks/results/study.json`` and ``study.md`` (``--quick``: ``study-quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tl_residual

import pandas as pd
import torch

from tl_residual import study as st
from tl_residual.datasets import load_factual_prompts
from tl_residual.model import load_model

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("layer", "ffn_neuron", "attn_neuron", "attn_subvalue", "head")
TOP_K = {"ffn_neuron": 100, "attn_neuron": 200, "attn_subvalue": 20, "head": None}


#: CPU time (all threads of this process) of the last measurement: less sensitive than wall time to other
#: processes on a shared machine.
CPU: dict[str, float] = {}
#: The summary of the last study run (tl_residual.study.run's return value).
LAST: dict[str, Any] = {}


def forward_seconds(model: Any, prompts: list[str], batch_size: int) -> float:
    """Wall time of ``run_with_cache`` over right-padded, length-sorted batches (tokenization excluded)."""
    toks = sorted((model.to_tokens(p, truncate=False)[0] for p in prompts), key=len)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batches = []
    for s in range(0, len(toks), batch_size):
        chunk = toks[s : s + batch_size]
        t = torch.full((len(chunk), max(len(x) for x in chunk)), pad, dtype=torch.long)
        for i, x in enumerate(chunk):
            t[i, : len(x)] = x
        batches.append(t)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in batches:
        with torch.no_grad():
            _, cache = model.run_with_cache(t)
        del cache
    CPU["last"] = time.process_time() - c0
    return time.perf_counter() - t0


def study_seconds(model: Any, df: pd.DataFrame, batch_size: int, kinds: tuple[str, ...] = KINDS) -> float:
    out = Path(tempfile.mkdtemp(prefix="tlres-study-bench-"))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = st.run(
            model,
            df,
            out / "s",
            kinds=kinds,
            top_k=TOP_K,
            batch_size=batch_size,
            progress=False,
            target_column="answer",
            group_column="type",
        )
        seconds = time.perf_counter() - t0
        CPU["last"] = time.process_time() - c0
        LAST.clear()
        LAST.update(summary)
        if summary["failed"]:  # a multi-token answer is a recorded failure (as in `tl-residual study`); others are bugs
            reasons = st.load(out / "s").prompts["reason"].dropna()
            other = reasons[~reasons.str.contains(r"is \d+ tokens", regex=True)]
            if len(other):
                raise RuntimeError(f"{len(other)} prompts failed: {other}")
        return seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def side_by_side(model: Any, df: pd.DataFrame, batch_size: int) -> dict[str, Any]:
    prompts = df["prompt"].tolist()
    fwd = forward_seconds(model, prompts, batch_size)
    fwd_cpu = CPU["last"]
    stu = study_seconds(model, df, batch_size)
    stu_cpu = CPU["last"]
    n_tok = [len(model.to_tokens(p, truncate=False)[0]) for p in prompts]
    return {
        "n_prompts": len(df),
        "batch_size": batch_size,
        "mean_tokens": sum(n_tok) / len(n_tok),
        "forward_s": fwd,
        "study_s": stu,
        "ratio": stu / fwd,
        "study_ok": LAST.get("ok"),
        "study_failed_multi_token_target": LAST.get("failed"),
        "study_prompts_per_s": len(df) / stu,
        "forward_prompts_per_s": len(df) / fwd,
        "forward_cpu_s": fwd_cpu,
        "study_cpu_s": stu_cpu,
        "cpu_ratio": stu_cpu / fwd_cpu,
        "neuron_rows_requested": LAST.get("neuron_rows_requested"),
        "neuron_rows_projected": LAST.get("neuron_rows_projected"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="first N shipped prompts (default all 442)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="smaller sweeps; results to study-quick.*")
    ap.add_argument("--no-sweeps", action="store_true", help="only the side-by-side measurement (and --per-kind)")
    ap.add_argument("--per-kind", type=int, default=None, help="time each kind alone on the first N prompts")
    ap.add_argument("--skip-per-kind", action="store_true", help="sweeps without the per-kind timings")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default torch's; 1 on a loaded shared machine)"
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    df = load_factual_prompts()
    if args.n:
        df = df.head(args.n)
    sub = df.head(args.per_kind or (16 if args.quick else 32))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_start": load,
        },
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32, TransformerBridge)",
        "kinds": list(KINDS),
        "top_k": TOP_K,
        "method": "log_prob_increase",
    }
    study_seconds(model, df.head(2), 2)  # warm-up (lazy imports, first-call overheads)
    print("side by side ...", flush=True)
    result["main"] = side_by_side(model, df, args.batch_size)
    print(json.dumps(result["main"], indent=1), flush=True)
    if (not args.no_sweeps and not args.skip_per_kind) or args.per_kind:
        print("per kind ...", flush=True)
        fwd = forward_seconds(model, sub["prompt"].tolist(), args.batch_size)
        per_kind = {"forward_s": fwd, "n_prompts": len(sub)}
        cpu = {"forward_s": CPU["last"]}
        for kind in ("layer", "ffn_neuron", "attn_neuron", "attn_subvalue", "head", "stream", "query"):
            per_kind[kind] = study_seconds(model, sub, args.batch_size, (kind,))
            cpu[kind] = CPU["last"]
            print(kind, per_kind[kind], cpu[kind], flush=True)
        result["per_kind"] = per_kind
        result["per_kind_cpu"] = cpu
    if not args.no_sweeps:
        print("batch size ...", flush=True)
        result["batch_sizes"] = [side_by_side(model, sub, b) for b in ((1, 8, 32) if not args.quick else (1, 16))]
        print("prompt length ...", flush=True)
        lengths = []
        for n_prefix in (0, 3, 12) if not args.quick else (0, 4):
            longer = sub.copy()
            prefix = " ".join(df["prompt"].iloc[-n_prefix:].tolist()) + " " if n_prefix else ""
            longer["prompt"] = [prefix + p for p in sub["prompt"]]
            lengths.append(side_by_side(model, longer, args.batch_size))
        result["lengths"] = lengths
    result["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import resource

    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    stem = ("study-quick" if args.quick or args.n else "study") + (f"-threads{args.threads}" if args.threads else "")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    m = r["main"]
    lines = [
        "# Study throughput (benchmarks/study.py)",
        "",
        (
            f"{r['model']}; {r['machine']['cpus']} CPUs, torch {r['machine']['torch']} "
            f"({r['machine']['torch_threads']} threads), "
            f"1-min load average {r['machine']['load_average_1min_at_start']:.1f} "
            f"at start, {r.get('load_average_1min_at_end', float('nan')):.1f} at end (shared machine)."
        ),
        "",
        (
            "| prompts | batch | mean tokens | forward with cache (s) | study (s) | **study / forward** "
            "| study prompts/s | CPU time: forward (s) | study (s) | study / forward "
            "| neuron rows scored / projected | load |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(x: dict[str, Any]) -> str:
        return (
            f"| {x['n_prompts']} | {x['batch_size']} | {x['mean_tokens']:.1f} | {x['forward_s']:.2f} | "
            f"{x['study_s']:.2f} | **{x['ratio']:.2f}** | {x['study_prompts_per_s']:.2f} | {x['forward_cpu_s']:.2f} | "
            f"{x['study_cpu_s']:.2f} | {x['cpu_ratio']:.2f} | {x.get('neuron_rows_requested')} / "
            f"{x.get('neuron_rows_projected')} | {x.get('load_average_1min', float('nan')):.1f} |"
        )

    lines.append(row(m))
    if m.get("study_failed_multi_token_target"):
        lines += [
            "",
            f"{m['study_ok']} prompts scored; {m['study_failed_multi_token_target']} recorded as failed (an answer of "
            "several tokens; forwarded in both columns, not scored).",
        ]
    if "per_kind" in r:
        pk = r["per_kind"]
        lines += [
            "",
            (
                f"Each kind alone ({pk['n_prompts']} prompts; the study's own forward and writes included; "
                f"forward with cache alone {pk['forward_s']:.2f} s):"
            ),
            "",
            "| kind | seconds | / forward | CPU seconds | / forward (CPU) |",
            "|---|---|---|---|---|",
        ]
        cpu = r.get("per_kind_cpu", {})
        for k, v in pk.items():
            if k not in ("forward_s", "n_prompts"):
                c = cpu.get(k, float("nan"))
                lines.append(
                    f"| {k} | {v:.2f} | {v / pk['forward_s']:.2f} | {c:.2f} | "
                    f"{c / cpu.get('forward_s', float('nan')):.2f} |"
                )
    if "peak_rss_gib" in r:
        lines += ["", f"Peak resident memory of the benchmark process (model included): {r['peak_rss_gib']:.2f} GiB."]
    lines += [
        "",
        "Target (issue 13): study / forward at most 2 on all 442 prompts; "
        + ("met" if m["ratio"] <= 2 else f"not met ({m['ratio']:.2f})")
        + f" in this run ({m['n_prompts']} prompts).",
    ]
    if "batch_sizes" in r:
        lines += ["", "Batch size:", "", lines[4], lines[5]] + [row(x) for x in r["batch_sizes"]]
        lines += ["", "Prompt length:", "", lines[4], lines[5]] + [row(x) for x in r["lengths"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
