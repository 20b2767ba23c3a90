"""Faithfulness benchmark: the neuron-level paper's Table 2 (and Appendix C) on SmolLM2-135M-Instruct.

A thin caller of :mod:`tl_residual.faithfulness` (also ``tl-residual faithfulness --data ...``) on the built-in
factual prompts that survive the paper's filter for the model.

Reproduce::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faithfulness.py --batch-size 8

writes ``benchmarks/results/faithfulness.md`` and ``benchmarks/results/faithfulness.json`` (``--help`` for
options; ``--max-prompts N`` for a quick run): every method, the random control, k = 10/100/300 and Appendix C
on all filtered prompts, with wall-clock and CPU seconds per stage (``docs/faithfulness.md``, Speed).
"""

from __future__ import annotations

import argparse
import os
import sys

from tl_residual import model as tlm
from tl_residual.faithfulness import (  # noqa: F401 - re-exported for tests and notebooks
    BUILTIN,
    LABELS,
    PAPER_TABLE2,
    PAPER_TABLE13,
    RANDOM,
    RANK_METHODS,
    BenchmarkResult,
    ffn_coefficients,
    markdown,
    random_attention_neurons,
    rank_method_top_k,
    read,
    read_prompts,
    run,
    run_benchmark,
    summarise,
    target_rank_table,
    write,
)
from tl_residual.scorers import PAPER_METHODS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=BUILTIN, help="builtin:factual or a .jsonl/.csv/.parquet file")
    p.add_argument("--max-prompts", type=int, default=None, help="run only the first N surviving prompts")
    p.add_argument("--ks", default="10,100,300")
    p.add_argument("--methods", default=",".join(PAPER_METHODS))
    p.add_argument("--no-attention", action="store_true", help="skip Appendix C (attention neurons)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "faithfulness"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rewrite", action="store_true", help="only rewrite {out}.md from an existing {out}.json")
    a = p.parse_args(argv)
    if a.rewrite:
        write(read(a.out), a.out)
        return 0
    model = tlm.load_model(a.model)
    res = run(
        model,
        a.data,
        a.out,
        a.max_prompts,
        tuple(a.methods.split(",")),
        tuple(int(k) for k in a.ks.split(",")),
        not a.no_attention,
        a.batch_size,
        a.seed,
        not a.no_progress,
        model_name=a.model,
    )
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
