"""Every corpus analysis of tl_residual.analyses on SmolLM2-135M-Instruct over the shipped factual prompts.

The studies are the dataset runner's folders under ``--runs`` (outside the repository; each resumable):

1. ``main/``: every one of the 442 built-in prompts with the neuron-level paper's filter (``filter="paper"``):
   layer scores, the residual stream, every head, the certified top-300 FFN neurons, top-200 attention neurons and
   top-20 subvalues per prompt (log-probability increase);
2. ``fig2/``: the same prompts, the top-100 FFN neurons by the three scorers of the neuron-level paper's Figure 2;
3. ``query/``: a seeded sample of ``--query-per-group`` filtered prompts per knowledge type, kind ``query`` for the
   top-100 FFN and top-200 attention value neurons (:data:`QUERY_OPTIONS`; the exact query totals and layer sums);
4. ``ffn_all/``: the dense sample (``--model-per-group`` per type), every FFN neuron's score (Figure 6).

Then the analyses: those over the studies' tables on every scored prompt (the query ones on the query sample), those
that need the model on every scored prompt where cheap, on a stated per-type sample where each prompt costs a dense
scoring of every FFN neuron (``--model-per-group``) or many forward passes (``--visit-per-group``).

Writes ``benchmarks/results/analyses_smollm2.md`` (every table, the papers' numbers beside them, the prompt counts,
the seconds per analysis) and one CSV per analysis under ``benchmarks/results/analyses_smollm2/`` (small files; the
study folders themselves stay outside the repository). ``tl-residual study-report RUNS/main --html report.html
--model smollm2-135m`` draws the main study's results with their figures.

Reproduce (the whole: about two hours of CPU time on this project's 2-core machine, most of it the Figure 2 study,
the ffn_all study (70 s per prompt) and Table 1)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/analyses_smollm2.py --runs /tmp/smollm2-runs

or in parts: ``--part studies`` first, then ``--part dense``, ``--part model``, ``--part query`` and ``--part rest``
side by side (``--no-run`` takes the studies as committed so far, ``--only KEY,...`` recomputes some analyses,
``--render-only`` rewrites the markdown from the result files). The header of
``benchmarks/results/analyses_smollm2.md`` names the prompts of every analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pandas as pd

from tl_residual import analyses as A
from tl_residual import study
from tl_residual.datasets import filter_prompts, load_factual_prompts
from tl_residual.model import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
#: Analyses that need only the model and the filtered prompts (no study).
MODEL_ONLY = {"neuron_f3", "resid_b", "visit_int", "visit_norm"}
#: Analyses of the query study (on its sample).
QUERY = {"neuron_t6", "neuron_t14", "neuron_t7", "neuron_t8", "neuron_t9", "neuron_f4"}
MAIN_TOP_K = {"ffn_neuron": 300, "attn_neuron": 200, "attn_subvalue": 20, "head": None}


def md(df: pd.DataFrame, index: bool = False, digits: int = 3) -> str:
    """A DataFrame as a markdown table (no tabulate dependency); floats to ``digits`` significant digits."""
    if index:
        df = df.reset_index()

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.{digits}g}"
        text = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        return text.replace("\n", "\\n").replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def per_group_sample(prompts: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` scored prompts per group (all of a smaller group), seeded, in prompt-id order."""
    ok = prompts[prompts["status"] == "ok"].sort_values("prompt_id")
    picked = ok.sample(frac=1.0, random_state=seed).groupby("group", sort=True).head(n)
    return picked.sort_values("prompt_id").reset_index(drop=True)


def filtered_sample(model: Any, n: int) -> pd.DataFrame:
    """``n`` prompts per type of those the neuron-level paper's filter keeps (:func:`filter_prompts`, the study's
    prompt ids: row numbers of the built-in data), seeded as :func:`per_group_sample`; needs no study."""
    kept = filter_prompts(model, load_factual_prompts())
    kept = kept[kept["keep"]]
    table = pd.DataFrame(
        {
            "prompt_id": kept.index,
            "group": kept["type"],
            "prompt": kept["prompt"],
            "target_id": kept["answer_id"],
            "status": "ok",
        }
    )
    return per_group_sample(table, n)


def view(res: Any, ids: Any, manifest: dict[str, Any] | None = None, **tables: pd.DataFrame) -> SimpleNamespace:
    """The run's tables restricted to the prompts ``ids`` (``tables`` replace some of them, ``manifest`` its
    manifest)."""
    keep = set(int(i) for i in ids)
    out: dict[str, Any] = {}
    for name in study.TABLES:
        df = tables.get(name, getattr(res, name))
        out[name] = df[df["prompt_id"].isin(keep)] if len(df) else df
    return SimpleNamespace(**out, manifest=res.manifest if manifest is None else manifest)


def sample_study(model: Any, sample: pd.DataFrame, directory: str, no_run: bool, **options: Any) -> SimpleNamespace:
    """A study of the prompts ``sample`` (:func:`per_group_sample`; their ``prompt_id`` are the main study's) into
    ``directory`` (created or resumed; ``no_run``: as committed so far), its tables in the main study's prompt ids."""
    answers = load_factual_prompts()["answer"]
    data = pd.DataFrame(
        {"prompt": sample["prompt"], "answer": answers[sample["prompt_id"]].to_numpy(), "type": sample["group"]}
    )
    if not no_run:
        study.run(
            model,
            data,
            directory,
            target_column="answer",
            group_column="type",
            batch_size=16,
            model_name="smollm2-135m",
            **options,
        )
    res = study.load(directory)
    to_main = dict(enumerate(sample["prompt_id"]))  # a sample study's prompt ids are row numbers of its data
    tables = {}
    for name in study.TABLES:
        df = getattr(res, name)
        tables[name] = df.assign(prompt_id=df["prompt_id"].map(to_main)) if len(df) else df
    return SimpleNamespace(**tables, manifest=res.manifest)


def main_study(model: Any, a: argparse.Namespace, which: str) -> Any:
    """The main study (``which="main"``) or the Figure 2 study (``"fig2"``) of every shipped prompt the
    neuron-level paper's filter keeps (same prompt ids: row numbers of the built-in data)."""
    options = (
        {"top_k": MAIN_TOP_K}
        if which == "main"
        else {"kinds": ("ffn_neuron",), "methods": A.FIGURE2_METHODS, "top_k": {"ffn_neuron": 100}}
    )
    directory = os.path.join(a.runs, which)
    if not a.no_run:
        study.run(
            model,
            study.BUILTIN_FACTUAL,
            directory,
            filter="paper",
            batch_size=16,
            model_name="smollm2-135m",
            **options,
        )
    return study.load(directory)


#: The query study's options: the neuron-level paper's top-100 FFN and top-200 attention value neurons (Tables 6,
#: 14), the top-1500 query parts per kind (parts are neurons at a position: Table 7 needs 1000 distinct FFN neurons).
QUERY_OPTIONS: dict[str, Any] = {
    "kinds": ("query",),
    "query_values": 100,
    "query_attn_values": 200,
    "query_top_k": 20,
    "query_totals_k": 1500,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="folder of the studies (main/, fig2/, ffn_all/, query/; resumed)")
    p.add_argument(
        "--query-per-group", type=int, default=10**6, help="prompts per type for the query study (default: all)"
    )
    p.add_argument("--model-per-group", type=int, default=4, help="prompts per type for the dense FFN analyses")
    p.add_argument(
        "--visit-per-group", type=int, default=10**6, help="prompts per type for VISIT and Appendix B (default: all)"
    )
    p.add_argument("--out", default=os.path.join(HERE, "results", "analyses_smollm2"))
    p.add_argument(
        "--no-run",
        action="store_true",
        help="use the studies as they are (the batches committed so far: a stated subset) instead of completing them",
    )
    p.add_argument("--render-only", action="store_true", help="only write the markdown from the result files")
    p.add_argument("--only", default=None, help="comma-separated analysis keys to (re)compute")
    p.add_argument(
        "--part",
        choices=("all", "studies", "dense", "model", "query", "rest"),
        default="all",
        help="studies: only the main and Figure 2 studies; dense: the analyses that score every FFN neuron (on the "
        "dense sample); model: the other analyses that need only the model and the filter; query: the query study "
        "and its analyses; rest: the analyses of the main and Figure 2 studies' tables; the parts may run side by "
        "side once the studies are done",
    )
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    if a.render_only:
        return render(a, study.load(os.path.join(a.runs, "main")), t_start, argv)
    model = load_model("smollm2-135m")
    if a.part in ("all", "studies"):
        for which in ("main", "fig2"):
            main_study(model, a, which)
        if a.part == "studies":
            return 0
    kept = filtered_sample(model, 10**9)  # every prompt the filter keeps, in the main study's prompt ids
    dense = per_group_sample(kept, a.model_per_group)
    visit = per_group_sample(kept, a.visit_per_group)
    qsample = per_group_sample(kept, a.query_per_group)
    no_study = SimpleNamespace(prompts=kept.assign(status="ok"))
    res = fig2 = qview = ffn_all = no_study
    if a.part in ("all", "rest", "query"):
        a_no_run, a.no_run = a.no_run, True  # the main studies were completed above or by --part studies
        res, fig2 = main_study(model, a, "main"), main_study(model, a, "fig2")
        a.no_run = a_no_run
    if a.part in ("all", "query"):
        q = sample_study(model, qsample, os.path.join(a.runs, "query"), a.no_run, **QUERY_OPTIONS)
        qopts = {k: v for k, v in q.manifest["options"].items() if k.startswith("query")}
        manifest = {**res.manifest, "options": {**res.manifest["options"], **qopts}}
        qtables = {t: getattr(q, t) for t in study.TABLES if t.startswith("query")}
        qview = view(res, qsample["prompt_id"], manifest=manifest, **qtables)
    if a.part in ("all", "dense"):
        ffn_all = sample_study(
            model, dense, os.path.join(a.runs, "ffn_all"), a.no_run, kinds=("ffn_neuron",), top_k={"ffn_neuron": None}
        )
    ok = res.prompts[res.prompts["status"] == "ok"]
    every_third = list(range(0, 30, 3)) + [29]
    n_all, n_dense = len(ok), len(dense)

    def sample_text(sample: pd.DataFrame, per_group: int) -> str:
        return f"all {n_all}" if len(sample) == len(kept) else f"sample {len(sample)} ({per_group} per type)"

    n_q, n_visit = sample_text(qsample, a.query_per_group), sample_text(visit, a.visit_per_group)
    why_dense = (
        f"{n_dense} prompts ({a.model_per_group} per type): each scores every FFN neuron of every layer "
        "(30 x 1536 vocabulary projections, about 50 s of CPU per prompt here), once, in the ffn_all study whose "
        "stored scores the analyses read"
    )
    roles: dict[str, pd.DataFrame] = {}

    def role_table() -> pd.DataFrame:
        if "df" not in roles:
            roles["df"] = A.ffn_value_query_roles(model, ffn_all)
        return roles["df"]

    def by_layer(col: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
        return lambda t: t.pivot(index="group", columns="layer", values=col).loc[A._group_order(t["group"])]

    # key, title, prompts (text), call, shape for the markdown (the paper and its table: ORDER)
    items: list[tuple[str, str, str, Callable[[], Any], Any]] = [
        (
            "neuron_t3",
            "Table 3: sum of Imp over attention / FFN layers (nats)",
            f"all {n_all}",
            lambda: A.layer_contributions(res),
            None,
        ),
        (
            "neuron_t4",
            "Table 4: top-10 layers",
            f"all {n_all}",
            lambda: A.top_layers(res),
            lambda t: A._wide(t, "label"),
        ),
        (
            "neuron_t10",
            "Table 10: top-10 heads",
            f"all {n_all}",
            lambda: A.top_heads(res),
            lambda t: A._wide(t, "name"),
        ),
        (
            "neuron_t5_12",
            "Tables 5 / 12: top-100 / top-200 neuron sums (the run stored the top-300 FFN and top-200 "
            "attention neurons, so 'all' and 'positive' are not available)",
            f"all {n_all}",
            lambda: A.neuron_importance(res),
            lambda t: t.drop(columns=["all", "positive"]),
        ),
        (
            "neuron_t6",
            "Table 6: top-10 query layers of the top-100 FFN value neurons",
            n_q,
            lambda: A.top_query_layers(qview, "ffn_neuron"),
            lambda t: A._wide(t, "label"),
        ),
        (
            "neuron_t14",
            "Table 14: top-10 query layers of the top-200 attention value neurons",
            n_q,
            lambda: A.top_query_layers(qview, "attn_neuron"),
            lambda t: A._wide(t, "label"),
        ),
        (
            "neuron_t7",
            "Table 7: zeroing each prompt's top-1000 query FFN neurons of the attention value neurons, against 1000 "
            "random FFN neurons (MRR / probability decrease %)",
            n_q,
            lambda: A.query_neuron_ablation(model, qview, k=1000),
            None,
        ),
        (
            "neuron_t8",
            "Table 8: shared value / query neurons (top-300 in > 50% of a type's prompts)",
            n_q,
            lambda: A.shared_neurons(qview),
            lambda t: t.assign(
                shared=t["shared"].map(lambda x: ", ".join(x[:8]) + (" ..." if len(x) > 8 else ""))
            ).drop(columns=["frequency"]),
        ),
        (
            "neuron_t9",
            "Table 9: vocabulary projections of the most shared neurons (top-5 tokens)",
            n_q,
            lambda: A.shared_neuron_projections(model, qview, k=5, n_per_group=2),
            lambda t: t.drop(columns=["bottom_tokens"]),
        ),
        (
            "neuron_f2",
            "Figures 2 / 5: share of the top-10 FFN neurons per layer, by method (layers 20-29)",
            f"all {n_all}",
            lambda: A.neuron_layer_distribution(fig2),
            lambda t: t[(t.group == "all") & (t.layer >= 20)].pivot(index="method", columns="layer", values="share"),
        ),
        (
            "neuron_f4",
            "Figure 4: top-300 query FFN neurons per layer that are also top-300 value neurons "
            "(mean per prompt; layers with any)",
            n_q,
            lambda: A.query_neuron_counts(qview, k=300),
            lambda t: t[(t.group == "all") & ((t.query_value + t.query_only) > 0.5)].drop(columns=["group"]),
        ),
        (
            "neuron_f3",
            "Figures 3 / 6: log p and p along h0 -> hL (segments 0, 10, ..., 60)",
            f"all {n_all}",
            lambda: A.segment_curves(model, kept),
            lambda t: t[(t.group == "all") & (t.segment % 10 == 0)].drop(columns=["group"]),
        ),
        (
            "neuron_t11",
            "Table 11: zeroing the top 1% heads of each type (3 heads), MRR / probability decrease %",
            f"all {n_all}",
            lambda: A.head_ablation(model, res),
            lambda t: t.assign(heads=t["heads"].map(", ".join))[
                ["heads_of", "prompts_of", "heads", "n_prompts", "mrr_decrease_pct", "prob_decrease_pct"]
            ],
        ),
        (
            "resid_t1",
            "Table 1: Imp of the sum of the top-10 FFN subvalues per selection rule (nats; mean over the 30 layers)",
            why_dense,
            lambda: A.subvalue_selection(model, ffn_all),
            lambda t: t.pivot(index="group", columns="method", values="score"),
        ),
        (
            "resid_f3",
            "Figure 3: C(sum of helpful) against sum of C (per prompt and layer: mean ratio)",
            why_dense,
            lambda: A.subvalue_additivity(model, ffn_all),
            lambda t: (
                t.assign(ratio=t.score_of_sum / t.sum_of_scores)
                .groupby("layer")[["n_helpful", "sum_of_scores", "score_of_sum", "ratio"]]
                .mean()
                .reset_index()
            ),
        ),
        (
            "resid_f5",
            "Figure 5: mean log p(target) along the residual stream (every sixth point)",
            f"all {n_all}",
            lambda: A.stream_log_prob(res),
            lambda t: t[(t.group == "all") & (t["index"] % 6 == 0)][["stream", "log_prob", "prob"]],
        ),
        (
            "resid_f6",
            "Figure 6: helpful / unhelpful FFN subvalues per layer (mean per prompt; every third layer and the last)",
            why_dense,
            lambda: A.ffn_subvalue_counts(ffn_all),
            lambda t: t[(t.group == "all") & t.layer.isin(every_third)].drop(columns=["group"]),
        ),
        (
            "resid_f7",
            "Figure 7: share of the top-10 in the layer's helpful / unhelpful sum (every third layer and the last)",
            why_dense,
            lambda: A.top10_share(model, ffn_all),
            lambda t: t[(t.group == "all") & t.layer.isin(every_third)].drop(columns=["group"]),
        ),
        (
            "resid_f8",
            "Figure 8: cross-layer scores of the last FFN layer (Eq. 24, helpful / unhelpful; every "
            "sixth query vector)",
            why_dense,
            lambda: A.cross_layer_average(model, ffn_all),
            lambda t: t[t.group == "all"].iloc[::6][
                ["query", "helpful_eq24", "unhelpful_eq24", "helpful_eq25", "unhelpful_eq25"]
            ],
        ),
        (
            "resid_d_t3",
            "Appendix D, Table 3: top-10 helpful / unhelpful FFN subvalues that are also top-20 queries "
            "of an upper FFN layer",
            why_dense,
            lambda: A.value_query_overlap(model, dense, roles=role_table()),
            by_layer("proportion"),
        ),
        (
            "resid_d_t4",
            "Appendix D, Table 4: union of the top-5 subvalues activated by each lower FFN layer",
            why_dense,
            lambda: A.query_union(model, dense, roles=role_table()),
            by_layer("union_share"),
        ),
        (
            "resid_d_f19",
            "Appendix D, Figure 19: top-100 FFN subvalues as value / as query per layer (mean per prompt)",
            why_dense,
            lambda: A.value_query_layers(model, dense, roles=role_table()),
            lambda t: t[t.group == "all"].set_index("layer")[["value", "query"]].T,
        ),
        (
            "resid_b",
            "Appendix B, Figures 11 / 12: drop of the attention subvalue's bs-value minus score when M is "
            "removed (method 1 / method 2; M with the largest |drop|)",
            n_visit,
            lambda: A.bs_removal_average(model, visit),
            lambda t: (
                t[t.group == "all"]
                .assign(a=lambda d: d[["drop_method1", "drop_method2"]].abs().max(axis=1))
                .sort_values("a", ascending=False)
                .head(8)
                .drop(columns=["a", "group"])
            ),
        ),
        (
            "visit_int",
            "Intersections of the top-50 tokens with the final prediction (best head, memory values)",
            n_visit,
            lambda: A.visit_intersections(model, visit),
            lambda t: (
                t[t.group == "all"]
                .assign(kind=lambda d: d.component.where(d.component == "memory values", "head"))
                .groupby(["layer", "kind"])["with_final"]
                .max()
                .unstack()
                .iloc[::3]
            ),
        ),
        (
            "visit_norm",
            "Layer norm as a filter: top-5 promoted / suppressed tokens of some norms",
            n_visit,
            lambda: A.norm_filter(model, visit, k=5),
            lambda t: t.iloc[[0, 1, 29, 30, 58, 59, 60]],
        ),
        (
            "visit_reg",
            "Regularisation neurons of the last two layers (largest |entropy change|)",
            why_dense,
            lambda: A.regularisation_neurons(model, ffn_all, k=5, layers=[28, 29]),
            None,
        ),
    ]
    os.makedirs(a.out, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    for key, title, n, fn, shape in items:
        if only is not None and key not in only:
            continue
        part = "dense" if n == why_dense else "model" if key in MODEL_ONLY else "query" if key in QUERY else "rest"
        if a.part != "all" and part != a.part:
            continue
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            entry = {"title": title, "prompts": n, "error": f"{type(exc).__name__}: {exc}"}
        else:
            table = out[0] if isinstance(out, tuple) else out
            table.to_csv(os.path.join(a.out, f"{key}.csv"), index=False)
            shown = shape(table) if shape else table
            entry = {
                "title": title,
                "prompts": n,
                "seconds": round(time.perf_counter() - t0, 1),
                "load": os.getloadavg()[0],
                "markdown": md(shown, index=not isinstance(shown.index, pd.RangeIndex)),
            }
        print(f"{key}: {entry.get('seconds', entry.get('error'))}", file=sys.stderr, flush=True)
        path = os.path.join(a.out, f"{key}.json")  # one file per analysis: parts may run side by side
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=1)
        os.replace(path + ".tmp", path)
    if a.part in ("dense", "model", "query"):
        return 0  # the markdown is written by --part rest, all or --render-only
    return render(a, res, t_start, argv)


#: The analyses in the order of the markdown: key, paper (N neuron-level, R residual-stream, V VISIT), paper table.
ORDER: list[tuple[str, str, str | None]] = [
    ("neuron_t3", "N", "neuron_table3"),
    ("neuron_t4", "N", None),
    ("neuron_t10", "N", None),
    ("neuron_t5_12", "N", "neuron_table5_12"),
    ("neuron_t6", "N", None),
    ("neuron_t14", "N", None),
    ("neuron_t7", "N", "neuron_table7"),
    ("neuron_t8", "N", "neuron_table8"),
    ("neuron_t9", "N", None),
    ("neuron_f2", "N", None),
    ("neuron_f4", "N", None),
    ("neuron_f3", "N", None),
    ("neuron_t11", "N", None),
    ("resid_t1", "R", "residual_table1"),
    ("resid_f3", "R", None),
    ("resid_f5", "R", None),
    ("resid_f6", "R", None),
    ("resid_f7", "R", None),
    ("resid_f8", "R", None),
    ("resid_d_t3", "R", "residual_table3"),
    ("resid_d_t4", "R", "residual_table4"),
    ("resid_d_f19", "R", None),
    ("resid_b", "R", None),
    ("visit_int", "V", None),
    ("visit_norm", "V", None),
    ("visit_reg", "V", None),
]


def render(a: argparse.Namespace, res: Any, t_start: float, argv: list[str] | None) -> int:
    """Write ``{out}.md`` from the per-analysis result files (``{out}/{key}.json``) and the main study's counts."""
    ok = res.prompts[res.prompts["status"] == "ok"]
    n_all = len(ok)
    paper = A.paper_numbers()
    done = {
        key: json.load(open(os.path.join(a.out, f"{key}.json"), encoding="utf-8"))
        for key, _, _ in ORDER
        if os.path.exists(os.path.join(a.out, f"{key}.json"))
    }
    counts = ok.groupby("group").size()
    lines = [
        "# Corpus analyses on SmolLM2-135M-Instruct over the shipped factual prompts",
        "",
        f"{len(res.prompts)} of the 442 shipped prompts in the main study, {n_all} scored after the "
        "neuron-level paper's filter ("
        + ", ".join(f"{g} {c}" for g, c in counts.items())
        + "); the prompts of each analysis are named under it."
        + (
            " The main study was used as committed so far (`--no-run`): the runner batches prompts by length, so "
            "its prompts are the shortest ones."
            if len(res.prompts) < len(load_factual_prompts())
            else ""
        ),
        "",
        "Command: `benchmarks/analyses_smollm2.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
        f" ({time.perf_counter() - t_start:.0f} s this call; seconds per analysis and the 1-minute load average "
        "below; the machine is shared).",
        "",
    ]
    names = {"N": "Neuron-level paper", "R": "Residual-stream paper", "V": "VISIT"}
    for key, which, pkey in ORDER:
        if key not in done:
            continue
        d = done[key]
        lines += [f"## {names[which]}: {d['title']}", "", f"Prompts: {d['prompts']}."]
        if "error" in d:
            lines += ["", f"Not computed: {d['error']}", ""]
            continue
        lines += [f"({d['seconds']} s, load {d['load']:.1f})", "", d["markdown"], ""]
        if pkey:
            lines += ["The paper's numbers:", "", md(paper[pkey], index=True), ""]
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
