"""Peak resident memory of ``explain`` against prompt length (issue 12; docs/performance.md, docs/reliability.md).

Each measurement runs in a fresh subprocess (so peaks do not mix) and reports the child's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the same number as ``/usr/bin/time -v``'s "Maximum resident set
size"), side by side in one run:

* ``load``: the embedded SmolLM2-135M loaded, nothing run (the floor);
* ``explain``: :func:`tl_residual.explain.explain` (caches only the hooks one position needs, the attention
  pattern's row of that position only: memory linear in the prompt length);
* ``full-cache``: what ``explain`` did before issue 12: ``model.run_with_cache(tokens)`` with every hook, then the
  same scoring (memory quadratic in the prompt length: attention patterns and scores).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py                       # 128, 512, 1024 tokens
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py --lengths 2048 --modes explain   # the 4 GB check

Results: printed as a table and appended to ``benchmarks/results/memory.json``. Do not run 2,048 tokens with
``full-cache`` on a small machine: it needs about 10 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXT = (
    "The capital of France is Paris. The capital of Spain is Madrid. Rivers flow to the sea, and the "
    "mountains rise above the clouds. "
)


def prompt_of(model, n_tokens: int) -> str:
    """A prompt of about ``n_tokens`` tokens (BOS included) cut from repeated text at a token boundary."""
    tok = model.tokenizer
    ids = tok.encode(TEXT * (n_tokens // 10 + 2), add_special_tokens=False)[: n_tokens - 1]
    return tok.decode(ids)


def child(mode: str, n_tokens: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from tl_residual import model as tlm
    from tl_residual.explain import explain
    from tl_residual.scorers import (
        make_context,
        score_attention_subvalues,
        score_ffn_neurons,
    )

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = tlm.load_model("smollm2-135m")
    prompt = prompt_of(model, n_tokens)
    n = int(tlm.to_tokens(model, prompt).shape[-1])
    t1 = time.perf_counter()
    if mode == "explain":
        explain(model, prompt, top_k=20)
    elif mode == "full-cache":
        _, cache = model.run_with_cache(tlm.to_tokens(model, prompt))
        ctx = make_context(model, cache)
        score_attention_subvalues(ctx, "log_prob_increase", 20)
        score_ffn_neurons(ctx, "log_prob_increase", 20)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "mode": mode,
        "n_tokens": n,
        "peak_rss_gb": peak_kb / 1024**2,
        "seconds": time.perf_counter() - t1,
        "load_seconds": t1 - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument(
        "--modes", nargs="+", default=["load", "explain", "full-cache"], choices=["load", "explain", "full-cache"]
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    rows = []
    for n in args.lengths:
        for mode in args.modes:
            if mode == "load" and n != args.lengths[0]:
                continue
            cmd = [sys.executable, __file__, "--child", mode, str(n)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.CalledProcessError as exc:
                row = {"mode": mode, "n_tokens": n, "error": exc.stderr.strip().splitlines()[-1:]}
            except subprocess.TimeoutExpired:
                row = {"mode": mode, "n_tokens": n, "error": f"timeout after {args.timeout} s"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| mode | tokens | peak RSS (GB) | seconds |\n|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['n_tokens']} | error: {r['error']} | |")
        else:
            print(f"| {r['mode']} | {r['n_tokens']} | {r['peak_rss_gb']:.2f} | {r['seconds']:.1f} |")
    results = Path(__file__).parent / "results" / "memory.json"
    results.parent.mkdir(exist_ok=True)
    old = json.loads(results.read_text()) if results.exists() else []
    old.append(
        {"machine": platform.platform(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    )
    from tl_residual._io import atomic_write_text

    atomic_write_text(str(results), json.dumps(old, indent=2))


if __name__ == "__main__":
    main()
