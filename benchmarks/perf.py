"""Performance of exact top-k attribution against the forward pass and dense scoring (docs/performance.md).

One run times, in the same process and on the same prompts, side by side (median of ``--repeats``):

* ``forward``: ``model.run_with_cache(tokens)`` (the cache every attribution needs);
* ``dense``: scoring every FFN neuron and attention neuron by log-probability increase against the full
  vocabulary (:func:`tl_residual.scorers.score_neurons` with ``pruned=False``), the reference path;
* ``pruned``: the certified exact top-k (``k = 10, 100, 1000``) by the same score (the default path).

Models: SmolLM2-135M-Instruct (embedded, real weights) and random-weight GPT-2 small / medium / large shapes
(``transformers.GPT2Config`` + ``TransformerBridge``, as ``tests/conftest.make_bridge``). Where dense scoring of
every candidate would take too long, it is timed on a sample of layers and extrapolated linearly in the number
of candidates (its cost is one ``d_model x d_vocab`` projection per candidate); the report says which. Then cost
against sequence length (8 to 512 tokens) on SmolLM2.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf.py                # full run, writes benchmarks/results/perf.*
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf.py --quick        # SmolLM2 only, short sweep

Results: ``benchmarks/results/perf.json`` (every measurement) and ``perf.md`` (tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from tl_residual import scorers as S  # noqa: E402
from tl_residual.model import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KS = (10, 100, 1000)
GPT2_SHAPES = {  # n_layer, n_embd, n_head (n_inner = 4 * n_embd, vocab 50257)
    "gpt2-small-random": (12, 768, 12),
    "gpt2-medium-random": (24, 1024, 16),
    "gpt2-large-random": (36, 1280, 20),
}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median wall time (s) of ``repeats`` calls, all times, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def random_gpt2(name: str, seed: int = 0) -> Any:
    """A random-weight GPT-2 of the given shape as a TransformerBridge (no hub access)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, d, n_head = GPT2_SHAPES[name]
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=d,
        n_head=n_head,
        n_inner=4 * d,
        vocab_size=50257,
        n_positions=1024,
        attn_implementation="eager",
    )
    hf = GPT2LMHeadModel(cfg).eval()
    tok = load_model("smollm2-135m").tokenizer  # only for the bridge's bookkeeping; prompts are given as ids
    return TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok).eval()


def prompt_tokens(model: Any, name: str, n_prompts: int) -> list[torch.Tensor]:
    """SmolLM2: the first factual prompts of each knowledge type; random models: random ids (8 tokens)."""
    if name == "smollm2-135m":
        recs = [json.loads(line) for line in (ROOT / "tl_residual/data/factual_prompts.jsonl").open()][1:]
        seen, prompts = set(), []
        for r in recs:
            if r["type"] not in seen:
                seen.add(r["type"])
                prompts.append(r["prompt"])
        return [model.to_tokens(p) for p in prompts[:n_prompts]]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 49152, (1, 8), generator=g) for _ in range(n_prompts)]


def same_top(a: Any, b: Any, atol: float = 1e-5) -> dict[str, Any]:
    """Do two top-k tables agree (same names, scores within ``atol``)?"""
    sa, sb = a["score"].to_numpy(), b["score"].to_numpy()
    return {
        "same_names": list(a["name"]) == list(b["name"]),
        "same_set": set(a["name"]) == set(b["name"]),
        "max_abs_score_diff": float(abs(sa - sb).max()) if len(sa) and len(sa) == len(sb) else None,
        "identical": bool(set(a["name"]) == set(b["name"]) and len(sa) == len(sb) and abs(sa - sb).max() <= atol),
    }


def bench_prompt(
    model: Any,
    tokens: torch.Tensor,
    repeats: int,
    dense_layers: list[int] | None,
    dense_full: bool,
    dense_kinds: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Forward, dense and pruned timings for one prompt (same process, side by side)."""
    n_layers = int(model.cfg.n_layers)
    t_fwd, fwd_all, (_, cache) = timed(lambda: model.run_with_cache(tokens), repeats)
    rec: dict[str, Any] = {"n_tokens": int(tokens.shape[1]), "forward_s": t_fwd, "forward_all_s": fwd_all}
    ctx = S.make_context(model, cache)
    rec["target"] = ctx.target
    pruned = {}
    for k in KS:
        t, ts, df = timed(lambda k=k: S.score_neurons(S.make_context(model, cache), top_k=k, n_top_tokens=0), repeats)
        pruned[k] = df
        rec[f"pruned_top{k}_s"] = t
        rec[f"pruned_top{k}_all_s"] = ts
        rec[f"pruned_top{k}_n_scored"] = int(df.attrs["n_scored"])
        rec["n_candidates"] = int(df.attrs["n_candidates"])
    t, _, df5 = timed(lambda: S.score_neurons(S.make_context(model, cache), top_k=100, n_top_tokens=5), repeats)
    rec["pruned_top100_with_tokens_s"] = t
    if dense_full:
        t, _, dense = timed(
            lambda: S.score_neurons(S.make_context(model, cache), top_k=1000, pruned=False, n_top_tokens=0), 1
        )
        rec["dense_s"] = t
        rec["dense_measured"] = "all layers"
        for k in KS:
            rec[f"check_top{k}"] = same_top(pruned[k], dense.head(k))
    else:
        layers = dense_layers or list(range(n_layers))
        kinds = dense_kinds or ("ffn_neuron", "attn_neuron")
        t, _, dense = timed(
            lambda: S.score_neurons(
                S.make_context(model, cache), top_k=1000, layers=layers, kinds=kinds, pruned=False, n_top_tokens=0
            ),
            1,
        )
        sub = S.score_neurons(S.make_context(model, cache), top_k=100, layers=layers, kinds=kinds, n_top_tokens=0)
        n_cand_sub = int(sub.attrs["n_candidates"])
        rec["dense_s"] = t * rec["n_candidates"] / n_cand_sub
        rec["dense_measured"] = (
            f"{'+'.join(kinds)} of layers {layers} ({n_cand_sub} candidates, {t:.2f} s), extrapolated linearly"
        )
        rec["check_top100_on_dense_layers"] = same_top(sub, dense.head(100))
    rec["pruned_top100_over_forward"] = rec["pruned_top100_s"] / t_fwd
    rec["dense_over_pruned_top100"] = rec["dense_s"] / rec["pruned_top100_s"]
    for k in KS:
        rec[f"pruned_top{k}_over_forward"] = rec[f"pruned_top{k}_s"] / t_fwd
        rec[f"dense_over_pruned_top{k}"] = rec["dense_s"] / rec[f"pruned_top{k}_s"]
    rec["dense_over_forward"] = rec["dense_s"] / t_fwd
    return rec


def bench_seq_len(model: Any, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    """Forward and pruned top-100 cost against sequence length; dense estimated from a timed sample."""
    out = []
    g = torch.Generator().manual_seed(2)
    text = model.to_tokens("The capital of France is Paris. " * 200)[0]
    for n in lengths:
        tokens = text[:n][None] if text.shape[0] >= n else torch.randint(0, 49152, (1, n), generator=g)
        t_fwd, _, (_, cache) = timed(lambda tokens=tokens: model.run_with_cache(tokens), repeats)
        t_top, _, df = timed(
            lambda cache=cache: S.score_neurons(S.make_context(model, cache), top_k=100, n_top_tokens=0), repeats
        )
        # dense cost per candidate from the last layer's FFN neurons, times all candidates
        sample_layers = [int(model.cfg.n_layers) - 1]
        t_d, _, _ = timed(
            lambda cache=cache, sample_layers=sample_layers: S.score_neurons(
                S.make_context(model, cache),
                top_k=10,
                layers=sample_layers,
                kinds=("ffn_neuron",),
                pruned=False,
                n_top_tokens=0,
            ),
            1,
        )
        n_sample = int(model.cfg.d_mlp)
        dense_est = t_d / n_sample * int(df.attrs["n_candidates"])
        out.append(
            {
                "n_tokens": n,
                "forward_s": t_fwd,
                "pruned_top100_s": t_top,
                "n_candidates": int(df.attrs["n_candidates"]),
                "n_scored": int(df.attrs["n_scored"]),
                "dense_estimated_s": dense_est,
                "pruned_over_forward": t_top / t_fwd,
                "dense_over_pruned": dense_est / t_top,
                "dense_sample": f"FFN neurons of layer {sample_layers[0]} ({n_sample} candidates, {t_d:.2f} s)",
            }
        )
        print(
            f"  seq {n}: forward {t_fwd:.3f}s top-100 {t_top:.3f}s ({t_top / t_fwd:.1f}x) scored "
            f"{df.attrs['n_scored']}/{df.attrs['n_candidates']} dense~{dense_est:.0f}s",
            flush=True,
        )
    return out


def environment() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformer_lens

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "?"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "loadavg_start": os.getloadavg(),
    }


def write_md(res: dict[str, Any], path: Path) -> None:
    L = [
        "# Exact top-k attribution: performance",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['env']['cpu']}, {res['env']['cpu_count']} CPUs, torch {res['env']['torch']} "
        f"({res['env']['torch_threads']} threads), TransformerLens {res['env']['transformer_lens']}, "
        f"CUDA: {res['env']['cuda']}. Load average at start {res['env']['loadavg_start']}, at end "
        f"{res['env'].get('loadavg_end')}.",
        "",
        "Times are medians of repeats, in seconds, measured side by side in one process. `top-k` is the certified "
        "exact top-k over every FFN neuron and attention neuron by log-probability increase (frozen lens, "
        "`n_top_tokens=0`); `dense` scores every candidate against the full vocabulary.",
        "",
    ]
    for model, recs in res["models"].items():
        L += [
            f"## {model}",
            "",
            "| tokens | candidates | forward | top-10 | top-100 | top-1000 | scored (k=10/100/1000) | dense | "
            "top-100 / forward | dense / top-100 | identical to dense | dense measured |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            chk = r.get("check_top100") or r.get("check_top100_on_dense_layers")
            ident = "yes" if chk and chk["identical"] else f"NO {chk}"
            L.append(
                f"| {r['n_tokens']} | {r['n_candidates']} | {r['forward_s']:.3f} | {r['pruned_top10_s']:.3f} | "
                f"{r['pruned_top100_s']:.3f} | {r['pruned_top1000_s']:.3f} | {r['pruned_top10_n_scored']}/"
                f"{r['pruned_top100_n_scored']}/{r['pruned_top1000_n_scored']} | {r['dense_s']:.1f} | "
                f"{r['pruned_top100_over_forward']:.2f}x | {r['dense_over_pruned_top100']:.0f}x | {ident} | "
                f"{r['dense_measured']} |"
            )
        L.append("")
    if res.get("seq_len"):
        L += [
            "## Sequence length (SmolLM2-135M, top-100 over FFN + attention neurons)",
            "",
            "| tokens | candidates | scored | forward | top-100 | top-100 / forward | dense (estimated) | "
            "dense / top-100 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["seq_len"]:
            L.append(
                f"| {r['n_tokens']} | {r['n_candidates']} | {r['n_scored']} | {r['forward_s']:.3f} | "
                f"{r['pruned_top100_s']:.3f} | {r['pruned_over_forward']:.2f}x | {r['dense_estimated_s']:.0f} | "
                f"{r['dense_over_pruned']:.0f}x |"
            )
        L += [
            "",
            "Dense at these lengths is estimated: the time to score the last layer's FFN neurons densely, "
            "per candidate, times all candidates (dense cost is linear in the candidate count).",
        ]
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, 1 prompt, lengths 8 and 64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3, help="prompts for SmolLM2")
    ap.add_argument("--random-prompts", type=int, default=1, help="prompts (random ids) per random GPT-2 shape")
    ap.add_argument("--models", default="smollm2-135m," + ",".join(GPT2_SHAPES))
    ap.add_argument("--seq-lens", default="8,32,128,512")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.prompts, args.seq_lens = "smollm2-135m", 1, "8,64"
    torch.set_grad_enabled(False)
    res: dict[str, Any] = {
        "command": "python benchmarks/perf.py " + " ".join(sys.argv[1:]),
        "env": environment(),
        "models": {},
    }
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        model = load_model(name) if name == "smollm2-135m" else random_gpt2(name)
        n_layers = int(model.cfg.n_layers)
        recs = []
        real = name == "smollm2-135m"
        for i, tokens in enumerate(prompt_tokens(model, name, args.prompts if real else args.random_prompts)):
            full = real and i == 0 and not args.quick  # one full dense run on the real model
            # dense sample: SmolLM2 every neuron of 3 layers; random GPT-2 shapes the last layer's FFN neurons
            sample = None if full else ([0, n_layers // 2, n_layers - 1] if real else [n_layers - 1])
            r = bench_prompt(model, tokens, args.repeats, sample, full, None if real else ("ffn_neuron",))
            recs.append(r)
            print(
                f"  prompt {i}: forward {r['forward_s']:.3f}s top-100 {r['pruned_top100_s']:.3f}s "
                f"({r['pruned_top100_over_forward']:.2f}x forward), dense {r['dense_s']:.1f}s "
                f"({r['dense_over_pruned_top100']:.0f}x top-100), scored {r['pruned_top100_n_scored']}/"
                f"{r['n_candidates']}",
                flush=True,
            )
        res["models"][name] = recs
        if name == "smollm2-135m" and args.seq_lens:
            res["seq_len"] = bench_seq_len(model, [int(x) for x in args.seq_lens.split(",")], args.repeats)
        del model
    res["env"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"perf{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    write_md(res, out / f"perf{suffix}.md")
    print(f"wrote {out / f'perf{suffix}.md'}")


if __name__ == "__main__":
    main()
