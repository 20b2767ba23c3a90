"""The built-in factual-prompt dataset and the neuron-level paper's per-model filter.

``tl_residual/data/factual_prompts.jsonl`` (shipped as package data) holds 442 short prompts whose correct next
token is the answer (with its leading space), of six knowledge types: language, color, number, capital, country,
month. Its first line is a header object with, per type, the ``source`` of the facts and the ``candidates``: the
answers of that type the filter compares against.

The filter (neuron-level paper, section 4.1, "Dataset"; ``docs/faithfulness.md``): keep a prompt
for a model only where

1. the answer is a single token of the model's tokenizer,
2. it ranks in the model's top ``top_n`` (10) next-token predictions at the prompt's last token, and
3. it ranks above every other candidate of the same type (candidates that are not a single token are compared by
   their first token, which is an upper bound on the candidate word's probability).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd
import torch

from tl_residual.errors import InvalidInputError

DATASET_FILE = "factual_prompts.jsonl"
KNOWLEDGE_TYPES: tuple[str, ...] = ("language", "color", "number", "capital", "country", "month")


@lru_cache(maxsize=1)
def _read() -> tuple[dict[str, Any], tuple[dict[str, str], ...]]:
    text = resources.files("tl_residual").joinpath("data").joinpath(DATASET_FILE).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].get("_header"):
        raise InvalidInputError(f'{DATASET_FILE} has no header line (a first object with "_header": true)')
    return lines[0], tuple(lines[1:])


def dataset_header() -> dict[str, Any]:
    """The header object: ``description``, ``license`` and ``types`` (per type: ``source``, ``candidates``)."""
    return json.loads(json.dumps(_read()[0]))


def load_factual_prompts(types: str | list[str] | None = None) -> pd.DataFrame:
    """The built-in prompts as a DataFrame with columns ``type``, ``prompt``, ``answer`` (answer with its leading
    space), in file order.

    Args:
        types: keep only these knowledge types (default all six).

    Raises:
        InvalidInputError: an unknown knowledge type.
    """
    _, records = _read()
    df = pd.DataFrame(list(records), columns=["type", "prompt", "answer"])
    if types is not None:
        wanted = [types] if isinstance(types, str) else list(types)
        unknown = sorted(set(wanted) - set(KNOWLEDGE_TYPES))
        if unknown:
            raise InvalidInputError(f"unknown knowledge type(s) {unknown}; choose from {', '.join(KNOWLEDGE_TYPES)}")
        df = df[df["type"].isin(wanted)].reset_index(drop=True)
    return df


def filter_prompts(
    model: Any, prompts: pd.DataFrame | None = None, top_n: int = 10, batch_size: int = 32
) -> pd.DataFrame:
    """Apply the paper's filter for ``model`` and return every prompt with the reasons.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer.
        prompts: rows with ``type``, ``prompt``, ``answer`` (default :func:`load_factual_prompts`).
        top_n: the answer must rank within the model's top ``top_n``.
        batch_size: prompts per forward pass.

    Returns:
        ``prompts`` plus the columns ``answer_id`` (-1 if not one token), ``single_token``, ``answer_rank`` (1 = the
        model's top prediction; 0 if not one token), ``answer_prob``, ``beats_candidates``, ``keep``.
        ``df.attrs["survivors"]`` holds the number kept per type and in total.

    Raises:
        InvalidInputError: missing columns, an unknown type, a bad ``top_n``, or a model without a tokenizer.
    """
    from tl_residual.interventions import last_token_logits, target_metrics, tokenize_batch

    if prompts is None:
        prompts = load_factual_prompts()
    missing = {"type", "prompt", "answer"} - set(prompts.columns)
    if missing:
        raise InvalidInputError(f"prompts lacks column(s) {sorted(missing)}; it needs type, prompt, answer")
    if not isinstance(top_n, int) or top_n < 1:
        raise InvalidInputError(f"top_n must be a positive integer, got {top_n!r}")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InvalidInputError("the model has no tokenizer; the filter tokenizes answers and candidates")
    types = dataset_header()["types"]
    unknown = sorted(set(prompts["type"]) - set(types))
    if unknown:
        raise InvalidInputError(f"unknown knowledge type(s) {unknown}; the header lists {', '.join(types)}")

    def first_and_count(word: str) -> tuple[int, int]:
        ids = tok.encode(word, add_special_tokens=False)
        return (int(ids[0]) if ids else -1), len(ids)

    cand_ids = {t: sorted({first_and_count(w)[0] for w in spec["candidates"]} - {-1}) for t, spec in types.items()}
    df = prompts.reset_index(drop=True).copy()
    answer = [first_and_count(a) for a in df["answer"]]
    df["single_token"] = [n == 1 for _, n in answer]
    df["answer_id"] = [i if n == 1 else -1 for i, n in answer]
    ranks, probs, beats = [0] * len(df), [0.0] * len(df), [False] * len(df)
    for start in range(0, len(df), batch_size):
        rows = list(range(start, min(len(df), start + batch_size)))
        batch = tokenize_batch(model, [df.at[r, "prompt"] for r in rows])
        logits = last_token_logits(model, batch)
        targets = torch.tensor([max(int(df.at[r, "answer_id"]), 0) for r in rows])
        rank, prob, _ = target_metrics(logits, targets)
        for j, r in enumerate(rows):
            if not df.at[r, "single_token"]:
                continue
            ranks[r], probs[r] = int(rank[j]), float(prob[j])
            others = [c for c in cand_ids[df.at[r, "type"]] if c != int(targets[j])]
            beats[r] = bool((logits[j, targets[j]] > logits[j, others]).all()) if others else True
    df["answer_rank"], df["answer_prob"], df["beats_candidates"] = ranks, probs, beats
    df["keep"] = df["single_token"] & (df["answer_rank"] >= 1) & (df["answer_rank"] <= top_n) & df["beats_candidates"]
    survivors = {t: int(df.loc[df["type"] == t, "keep"].sum()) for t in types}
    survivors["total"] = int(df["keep"].sum())
    df.attrs["survivors"] = survivors
    return df
