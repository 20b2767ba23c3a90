"""The corpus analyses (tl_residual.analyses) on SmolLM2-135M-Instruct over the shipped factual prompts.

Builds study-layout tables (``layers``, ``stream``, ``parts`` of kinds ``head`` and ``ffn_neuron``, ``prompts``)
with the single-prompt API (the dataset runner of tl_residual.study writes the same tables), then prints the
analyses as markdown and writes ``benchmarks/results/analyses_smollm2.md`` (and the tables under
``benchmarks/results/analyses_smollm2/`` for ``tl-residual study-report``).

Reproduce::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/analyses_smollm2.py [--neurons-per-type 5] [--max-prompts N]

Layer, head and stream tables use every prompt that survives the neuron-level paper's filter; the FFN-neuron
tables (top-300 by log-probability increase, certified pruned search) a seeded sample of ``--neurons-per-type``
prompts per knowledge type.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import pandas as pd
import torch

from tl_residual import analyses as A
from tl_residual.datasets import filter_prompts, load_factual_prompts
from tl_residual.decompose import residual_stream
from tl_residual.model import load_model
from tl_residual.scorers import (
    make_context,
    score_ffn_neurons,
    score_heads,
    score_layers,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def md(df: pd.DataFrame, index: bool = False) -> str:
    """A DataFrame as a markdown table (no tabulate dependency)."""
    if index:
        df = df.reset_index()

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def build(model, kept: pd.DataFrame, neurons_per_type: int, k: int = 300) -> SimpleNamespace:
    parts, layers, stream, prompts = [], [], [], []
    neuron_ids = set(kept.groupby("type").head(neurons_per_type).index)
    for pid, row in kept.iterrows():
        tokens = model.to_tokens(row["prompt"])
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        ctx = make_context(model, cache, int(row["answer_id"]))
        lp = torch.log_softmax(logits[0, -1].float(), -1)
        prompts.append(
            {
                "prompt_id": pid,
                "group": row["type"],
                "prompt": row["prompt"],
                "target": row["answer"],
                "target_id": int(row["answer_id"]),
                "target_prob": float(lp[ctx.target].exp()),
                "status": "ok",
            }
        )
        ld = score_layers(ctx, n_top_tokens=0)
        layers.append(
            pd.DataFrame(
                {
                    "prompt_id": pid,
                    "group": row["type"],
                    "method": "log_prob_increase",
                    "name": ld["name"],
                    "layer": ld["layer"],
                    "sublayer": ld["kind"],
                    "score": ld["score"],
                }
            )
        )
        for i, (name, vec) in enumerate(residual_stream(model, cache)):
            v = float(ctx.lens.log_probs(vec.float())[ctx.target])
            stream.append(
                {"prompt_id": pid, "group": row["type"], "stream": name, "index": i, "log_prob": v, "prob": math.exp(v)}
            )
        frames = [("head", score_heads(ctx, n_top_tokens=0))]
        if pid in neuron_ids:
            frames.append(("ffn_neuron", score_ffn_neurons(ctx, "log_prob_increase", top_k=k, n_top_tokens=0)))
        for kind, df in frames:
            df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
            parts.append(
                df.assign(
                    prompt_id=pid, group=row["type"], method="log_prob_increase", kind=kind, rank=range(1, len(df) + 1)
                )[["prompt_id", "group", "method", "kind", "name", "layer", "head", "neuron", "score", "rank"]]
            )
        del cache
        print(f"prompt {len(prompts)}/{len(kept)}", file=sys.stderr, flush=True)
    return SimpleNamespace(
        parts=pd.concat(parts, ignore_index=True),
        layers=pd.concat(layers, ignore_index=True),
        stream=pd.DataFrame(stream),
        query=pd.DataFrame(),
        prompts=pd.DataFrame(prompts),
        manifest={"model": "smollm2-135m", "options": {"top_k": k}},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--neurons-per-type", type=int, default=5)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument(
        "--sample-per-type",
        type=int,
        default=None,
        help="filter only a seeded sample of this many raw prompts per type (faster)",
    )
    p.add_argument("--from-tables", action="store_true", help="reuse the tables written by an earlier run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "analyses_smollm2"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    model = load_model("smollm2-135m")
    raw = load_factual_prompts()
    if a.sample_per_type:
        raw = raw.sample(frac=1.0, random_state=0).groupby("type").head(a.sample_per_type).reset_index(drop=True)
    filtered = filter_prompts(model, raw) if not a.from_tables else raw.assign(keep=True)
    kept = filtered[filtered["keep"]].sample(frac=1.0, random_state=0).reset_index(drop=True)
    if a.max_prompts:
        kept = kept.head(a.max_prompts)
    if a.from_tables:
        res = A.load_study(a.out)
        res.manifest = {"model": "smollm2-135m", "options": {"top_k": 300}}
    else:
        res = build(model, kept, a.neurons_per_type)
        os.makedirs(a.out, exist_ok=True)
        for name in ("parts", "layers", "stream", "prompts"):
            os.makedirs(os.path.join(a.out, name), exist_ok=True)
            getattr(res, name).to_parquet(os.path.join(a.out, name, "rank0-00000.parquet"))
    t3, _ = A.layer_contributions(res)
    t4 = A.top_layers(res)
    t10 = A.top_heads(res)
    t5 = A.neuron_importance(res, ks=(100, 200), kinds=("ffn_neuron",))
    f5, _ = A.stream_log_prob(res)
    seg, _ = A.segment_curves(model, res)
    n_ffn = res.parts.loc[res.parts["kind"] == "ffn_neuron", "prompt_id"].nunique()
    lines = [
        f"# Corpus analyses on SmolLM2-135M-Instruct ({len(res.prompts)} prompts that survive the filter; "
        f"FFN neurons (top-300) on {n_ffn} of them; {time.perf_counter() - t0:.0f} s)",
        "",
        f"Command: `benchmarks/analyses_smollm2.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "## Neuron-level Table 3 (nats, mean per prompt)",
        "",
        md(t3.round(2)),
        "",
        "## Neuron-level Table 4 (top-10 layers)",
        "",
        md(A._wide(t4, "label"), index=True),
        "",
        "## Neuron-level Table 10 (top-10 heads)",
        "",
        md(A._wide(t10, "name"), index=True),
        "",
        "## Neuron-level Table 5/12, FFN neurons (top-300 stored: 'all' not available)",
        "",
        md(t5.round(2)),
        "",
        "## Residual-stream Figure 5: mean log p(target) at Lin0, Lout0, Lout14, Lout29",
        "",
        md(
            f5[f5["stream"].isin(["Lin0", "Lout0", "Lout14", "Lout29"])]
            .pivot(index="group", columns="stream", values="log_prob")
            .round(2),
            index=True,
        ),
        "",
        "## Neuron-level Figure 3: log p / p at segments 0, 20, 40, 60 (all prompts)",
        "",
        md(seg[(seg.group == "all") & seg.segment.isin([0, 20, 40, 60])].round(4)),
        "",
    ]
    text = "\n".join(lines)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
