"""Dataset-scale runs: attribution over many prompts, streamed to Parquet shards, resumable, data-parallel.

:func:`run` scores every prompt of a data set (JSONL, CSV, Parquet, a ``datasets`` dataset saved with
``save_to_disk`` or a hub name, or the built-in factual prompts ``"builtin:factual"``) with one batched forward
pass and one ``ActivationCache`` per batch, reused by every method and every kind of part:

* ``layer``: the log-probability increase (or any registered method) of every layer's attention and FFN output
  (residual-stream paper Eq. 19; table ``layers``);
* ``stream``: the target's log-probability, probability and rank along the residual stream ``Lin0, Lres0, Lout0,
  Lres1, ...`` (residual-stream paper Eq. 1; table ``stream``);
* ``ffn_neuron``, ``attn_neuron``, ``attn_subvalue``: the certified exact top-k per kind
  (:func:`tl_residual.scorers.score_groups`; neuron-level paper section 3), and ``head``: every head (table
  ``parts``);
* ``query``: for the top FFN value neurons (``query_values``) and the top attention value neurons
  (``query_attn_values``), by log-probability increase, the query parts that switched each on, scored
  ``Imp(a) * contribution / input(a)`` (neuron-level paper section 3.4; :func:`tl_residual.query.query_neuron_scores`):
  per value neuron its ``query_top_k`` best parts (table ``query``), and, from the same pass, the exact sums over all
  the value neurons of a kind: the ``query_totals_k`` best parts per query kind (table ``query_totals``) and the
  sum over every part of each query kind and layer (table ``query_layers``).

Names are in prompt coordinates (source position 0 is the prompt's first token, BOS where the tokenizer prepends
one): batches are padded on the right, so under the causal mask the real tokens of a prompt see exactly the
activations they would see alone, and every position index is the prompt's own. Names are those of
:mod:`tl_residual.names` and mean the same component in :func:`tl_residual.interventions.intervene`.

Output layout under ``out_dir`` (the contract of ``docs/studies.md``): ``manifest.json`` and one folder per table
(``parts/``, ``layers/``, ``stream/``, ``query/``, ``query_totals/``, ``query_layers/``, ``prompts/``) of Parquet
shards named ``rank{R}-{K:05d}.parquet``,
one shard per batch and rank. Every file is written to a temporary name and moved into place with
:func:`os.replace`; the ``prompts`` shard of a batch is written last and is the batch's commit record:
:func:`load` and resumption only see batches whose ``prompts`` shard exists. A run interrupted in any way (Ctrl-C,
SIGTERM, ``kill -9``) therefore loses at most the batch in progress and never leaves a partial file under a final
name; rerunning the same call skips every prompt already committed. Rerunning with different options (or
different data, or another model) into the same folder raises :class:`~tl_residual.errors.InvalidInputError`.

Data parallel: launched under Hugging Face Accelerate (``accelerate launch -m tl_residual study ...``) each
process (``accelerate.PartialState``: rank ``R`` of ``N``) takes every ``N``-th pending prompt and writes its own
shards; rank 0 writes the manifest. One process needs no launcher.

Peak memory (beyond the model): one batch's ``ActivationCache`` (``batch_size * n_pos * (5 * n_layers + ...) *
d_model`` floats for the residual hooks plus ``batch_size * n_layers * n_heads * n_pos**2`` for the attention
patterns); what the prompts of a batch share, computed for all of them at once: the lens logits and bound probes
of every base and stream residual (``batch_size * (2 * n_layers + 2) * (d_vocab + (n_head + 3) * d_model)``
floats; SmolLM2, batch 16: 250 MB), the bound projections of every neuron direction on every prompt's probes
(``batch_size * n_layers * (d_mlp + n_heads * d_head) * (n_head + 2)`` float64; 80 MB) and the vocabulary
projections of the neuron directions the searches score (at most 1 GiB,
:class:`tl_residual.scorers.DirectionLogits`); plus for the prompt being scored the pruned search's per-part
bounds (8 bytes per candidate part, ``n_layers * (d_mlp + n_heads * n_pos * (d_head + 1))``) and
``3 * max(chunk_size, top_k) * d_vocab`` floats for the exact scores. The head x source-position subvalues of
every layer (``n_layers * n_heads * n_pos * d_model`` floats) are built once per prompt, checked by the safety
net and scored by the subvalue search; every head of every layer is scored in one call (``n_layers * n_heads``
rows, up to ``4 * chunk_size`` rows per product: ``3 * 4 * chunk_size * d_vocab`` floats).

Speed (``docs/studies.md``, Throughput): per batch, one safety net per prompt, one finiteness pass, the products
against ``W_U`` of the prompts' base residuals together, and the vocabulary projection of each distinct FFN or
attention neuron scored exactly (the union over the prompts), after which a (prompt, neuron) exact score is one
log-softmax over the vocabulary. Same names, ranks and scores as the per-prompt scorers up to float32 rounding.
Rows are written per batch and never accumulated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tl_residual import model as tlm
from tl_residual import names as N
from tl_residual._io import atomic_write, atomic_write_text
from tl_residual.decompose import (
    PartGroup,
    head_outputs,
    iter_parts,
    layer_outputs,
    residual_stream,
)
from tl_residual.errors import InvalidInputError, TLResidualError
from tl_residual.query import STREAM_KINDS as Q_STREAM_KINDS

#: What a study can compute per prompt (``kinds=``).
KINDS: tuple[str, ...] = ("layer", "stream", "ffn_neuron", "attn_neuron", "attn_subvalue", "head", "query")
DEFAULT_KINDS: tuple[str, ...] = ("layer", "stream", "ffn_neuron", "attn_neuron", "attn_subvalue", "head")
#: Parts kept per prompt, method and kind (``None``: all of them; heads are few).
DEFAULT_TOP_K: dict[str, int | None] = {"ffn_neuron": 100, "attn_neuron": 200, "attn_subvalue": 20, "head": None}
#: Relative error of the decomposition of the final ``resid_post`` above which a prompt is marked failed
#: (float32 gives about 1e-7 to 1e-6).
MAX_DECOMPOSITION_ERROR = 1e-4
TABLES: tuple[str, ...] = ("parts", "layers", "stream", "query", "query_totals", "query_layers", "prompts")
BUILTIN_FACTUAL = "builtin:factual"
SCHEMA_VERSION = 1

_INT = pa.int64()

#: The columns that name a query part and its score (tables ``query`` and ``query_totals``).
_QUERY_PART: list[tuple[str, pa.DataType]] = [
    ("query_name", pa.string()),
    ("query_kind", pa.string()),
    ("layer", _INT),
    ("head", _INT),
    ("src_pos", _INT),
    ("neuron", _INT),
    ("position", _INT),
    ("score", pa.float64()),
    ("rank", _INT),
]

SCHEMAS: dict[str, pa.Schema] = {
    "parts": pa.schema(
        [
            ("prompt_id", _INT),
            ("group", pa.string()),
            ("method", pa.string()),
            ("kind", pa.string()),
            ("name", pa.string()),
            ("layer", _INT),
            ("head", _INT),
            ("dim", _INT),
            ("src_pos", _INT),
            ("neuron", _INT),
            ("expert", _INT),
            ("score", pa.float64()),
            ("coefficient", pa.float64()),
            ("rank", _INT),
        ]
    ),
    "layers": pa.schema(
        [
            ("prompt_id", _INT),
            ("group", pa.string()),
            ("method", pa.string()),
            ("name", pa.string()),
            ("layer", _INT),
            ("sublayer", pa.string()),
            ("score", pa.float64()),
        ]
    ),
    "stream": pa.schema(
        [
            ("prompt_id", _INT),
            ("group", pa.string()),
            ("stream", pa.string()),
            ("index", _INT),
            ("log_prob", pa.float64()),
            ("prob", pa.float64()),
            ("rank", _INT),
        ]
    ),
    "query": pa.schema(
        [("prompt_id", _INT), ("group", pa.string()), ("value_name", pa.string()), ("value_score", pa.float64())]
        + _QUERY_PART
    ),
    "query_totals": pa.schema([("prompt_id", _INT), ("group", pa.string()), ("value_kind", pa.string())] + _QUERY_PART),
    "query_layers": pa.schema(
        [
            ("prompt_id", _INT),
            ("group", pa.string()),
            ("value_kind", pa.string()),
            ("query_kind", pa.string()),
            ("layer", _INT),
            ("score", pa.float64()),
            ("total_imp", pa.float64()),
            ("n_value", _INT),
            ("n_skipped", _INT),
        ]
    ),
    "prompts": pa.schema(
        [
            ("prompt_id", _INT),
            ("group", pa.string()),
            ("prompt", pa.string()),
            ("tokens", pa.list_(pa.string())),
            ("n_tokens", _INT),
            ("position", _INT),
            ("target", pa.string()),
            ("target_id", _INT),
            ("target_prob", pa.float64()),
            ("target_rank", _INT),
            ("target_log_prob", pa.float64()),
            ("decomposition_error", pa.float64()),
            ("status", pa.string()),
            ("reason", pa.string()),
        ]
    ),
}


@dataclass
class StudyResults:
    """What :func:`load` returns: one DataFrame per table (columns as in :data:`SCHEMAS`) and the manifest."""

    parts: pd.DataFrame
    layers: pd.DataFrame
    stream: pd.DataFrame
    query: pd.DataFrame
    query_totals: pd.DataFrame
    query_layers: pd.DataFrame
    prompts: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def _resolve_top_k(top_k: int | Mapping[str, int | None] | None) -> dict[str, int | None]:
    out = dict(DEFAULT_TOP_K)
    if top_k is None:
        return out
    if isinstance(top_k, Mapping):
        unknown = sorted(set(top_k) - set(DEFAULT_TOP_K))
        if unknown:
            raise InvalidInputError(f"top_k has unknown kind(s) {unknown}; kinds are {', '.join(DEFAULT_TOP_K)}")
        out.update(top_k)
    elif isinstance(top_k, int) and not isinstance(top_k, bool):
        out.update({k: top_k for k in ("ffn_neuron", "attn_neuron", "attn_subvalue")})
    else:
        raise InvalidInputError(f"top_k must be an integer or a mapping kind -> integer, got {top_k!r}")
    for k, v in out.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidInputError(f"top_k[{k!r}] must be a positive integer or None, got {v!r}")
    return out


def parse_top_k(text: str) -> int | dict[str, int | None]:
    """``"100"`` (every neuron kind) or ``"ffn_neuron=100,attn_neuron=200,head=all"`` (the CLI's ``--top-k``).

    Raises:
        InvalidInputError: a malformed entry.
    """
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    out: dict[str, int | None] = {}
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+|all)\s*", item)
        if m is None:
            raise InvalidInputError(f"--top-k entry {item!r} is not KIND=N or KIND=all (e.g. ffn_neuron=100)")
        out[m.group(1)] = None if m.group(2) == "all" else int(m.group(2))
    _resolve_top_k(out)
    return out


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRecord:
    """One input prompt: ``prompt_id`` is its row number in the data (0-based, stable across runs)."""

    prompt_id: int
    prompt: Any
    target: Any = None
    group: str | None = None


def read_data(data: Any) -> pd.DataFrame:
    """The data as a DataFrame: a DataFrame, a list of dicts or strings, a ``datasets.Dataset``, ``"builtin:factual"``
    (:func:`tl_residual.datasets.load_factual_prompts`), a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder
    written by ``Dataset.save_to_disk`` (or a ``DatasetDict``: its ``train`` split), or a hub dataset name (needs the
    hub; ``name`` or ``name:split``). Files are read with ``datasets``/pyarrow.

    Raises:
        InvalidInputError: a missing file, an unknown format, or a hub name that cannot be loaded.
    """
    if isinstance(data, pd.DataFrame):
        return data.reset_index(drop=True)
    if isinstance(data, (list, tuple)):
        rows = [{"prompt": r} if isinstance(r, str) else dict(r) for r in data]
        return pd.DataFrame(rows)
    if not isinstance(data, (str, os.PathLike)):
        if hasattr(data, "to_pandas"):
            return data.to_pandas().reset_index(drop=True)
        raise InvalidInputError(
            f"data must be a file, folder, dataset name, DataFrame or list, got {type(data).__name__}"
        )
    text = os.fspath(data)
    if text == BUILTIN_FACTUAL:
        from tl_residual.datasets import load_factual_prompts

        return load_factual_prompts()
    import datasets

    datasets.disable_progress_bars()
    path = Path(text)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # not a save_to_disk folder
            raise InvalidInputError(f"{text!r} is a folder but not a dataset written by save_to_disk: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return ds.to_pandas().reset_index(drop=True)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _read_jsonl(path)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path).to_pandas()
        raise InvalidInputError(f"unknown data format {suffix!r} of {text!r}; use .jsonl, .csv, .parquet or a folder")
    if os.sep in text or text.startswith(".") or re.search(r"\.(jsonl|json|csv|parquet)$", text):
        raise InvalidInputError(f"data file {text!r} does not exist")
    name, _, split = text.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise InvalidInputError(f"could not load dataset {text!r} from the hub: {type(exc).__name__}: {exc}") from exc
    return ds.to_pandas().reset_index(drop=True)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """A JSON Lines file (one object per line; blank lines skipped), or a JSON array of objects."""
    raw = path.read_text(encoding="utf-8")
    if raw.lstrip().startswith("["):
        rows = json.loads(raw)
    else:
        rows = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{i} is not valid JSON: {exc}") from exc
    rows = [{"prompt": r} if isinstance(r, str) else r for r in rows if not (isinstance(r, dict) and r.get("_header"))]
    return pd.DataFrame(rows)


def _records(
    df: pd.DataFrame, prompt_column: str, target_column: str | None, group_column: str | None
) -> list[PromptRecord]:
    for label, col in (
        ("prompt_column", prompt_column),
        ("target_column", target_column),
        ("group_column", group_column),
    ):
        if col is not None and col not in df.columns:
            raise InvalidInputError(
                f"{label} {col!r} is not a column of the data; columns: {', '.join(map(str, df.columns))}"
            )

    def clean(v: Any) -> Any:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if hasattr(v, "item") and not isinstance(v, str):
            v = v.item()
        return v

    out = []
    for i, d in enumerate(df.to_dict("records")):
        target = clean(d[target_column]) if target_column else None
        group = clean(d[group_column]) if group_column else None
        out.append(PromptRecord(i, clean(d[prompt_column]), target, None if group is None else str(group)))
    return out


def fingerprint(records: Sequence[PromptRecord]) -> str:
    """SHA-256 of the prompts, targets and groups (the data as the study sees it)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt_id, r.prompt, r.target, r.group], ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _write_table(path: Path, table: str, rows: list[dict[str, Any]]) -> None:
    schema = SCHEMAS[table]
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    tbl = pa.Table.from_pydict(cols, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(tbl, tmp))


def _shard_files(out: Path, table: str) -> list[Path]:
    d = out / table
    return sorted(d.glob("rank*-*.parquet")) if d.is_dir() else []


def _shard_rank_index(path: Path) -> tuple[int, int]:
    m = re.fullmatch(r"rank(\d+)-(\d+)\.parquet", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _committed_ids(out: Path) -> set[int]:
    done: set[int] = set()
    for f in _shard_files(out, "prompts"):
        done.update(pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return done


def _clean_rank(out: Path, rank: int) -> int:
    """Remove this rank's temp files and uncommitted shards (no ``prompts`` shard); return the next shard index."""
    committed = {f.name for f in _shard_files(out, "prompts")}
    last = -1
    for table in TABLES:
        d = out / table
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if f.name.startswith(f".rank{rank}-") and ".tmp-" in f.name:
                f.unlink(missing_ok=True)
                continue
            r, k = _shard_rank_index(f)
            if r != rank:
                continue
            if f.name not in committed:
                f.unlink(missing_ok=True)
            else:
                last = max(last, k)
    return last + 1


def load(out_dir: str | os.PathLike[str]) -> StudyResults:
    """Read a study folder written by :func:`run` (complete or not): every committed batch of every rank.

    Tables are sorted by ``prompt_id`` (then method, kind, rank). Batches without a ``prompts`` shard (the one in
    progress when a run was killed) are ignored.

    Raises:
        InvalidInputError: ``out_dir`` has no ``manifest.json``.
    """
    out = Path(out_dir)
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise InvalidInputError(f"{out} is not a study folder: it has no manifest.json (write one with study.run)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    committed = [f.name for f in _shard_files(out, "prompts")]
    frames: dict[str, pd.DataFrame] = {}
    sort_keys = {
        "parts": ["prompt_id", "method", "kind", "rank"],
        "layers": ["prompt_id", "method", "layer", "sublayer"],
        "stream": ["prompt_id", "index"],
        "query": ["prompt_id", "value_name", "rank"],
        "query_totals": ["prompt_id", "value_kind", "query_kind", "rank"],
        "query_layers": ["prompt_id", "value_kind", "layer", "query_kind"],
        "prompts": ["prompt_id"],
    }
    for table in TABLES:
        files = [out / table / n for n in committed if (out / table / n).is_file()]
        if files:
            tbl = pa.concat_tables([pq.read_table(f, schema=SCHEMAS[table]) for f in files])
        else:
            tbl = SCHEMAS[table].empty_table()
        df = tbl.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
        if table != "prompts":
            for col in ("prompt_id", "index", "layer", "rank"):
                if col in df and not df[col].isna().any():
                    df[col] = df[col].astype("int64")
        else:
            df["prompt_id"] = df["prompt_id"].astype("int64")
        frames[table] = df.sort_values(sort_keys[table], kind="stable").reset_index(drop=True)
    return StudyResults(**frames, manifest=manifest)


# ----------------------------------------------------------------------------------------------
# Scoring one prompt
# ----------------------------------------------------------------------------------------------


def _int(v: Any) -> int | None:
    if v is None:
        return None
    v = int(v)
    return None if v < 0 else v


def _parts_rows(df: pd.DataFrame, pid: int, group: str | None, method: str, kind: str) -> list[dict[str, Any]]:
    rows = []
    coefs = df["coefficient"].tolist() if "coefficient" in df.columns else [None] * len(df)
    for rank, (name, score, coef) in enumerate(zip(df["name"].tolist(), df["score"].tolist(), coefs), 1):
        ref = N.parse(name)
        rows.append(
            {
                "prompt_id": pid,
                "group": group,
                "method": method,
                "kind": kind,
                "name": N.format(ref),
                "layer": ref.layer,
                "head": ref.head,
                "dim": ref.dim,
                "src_pos": ref.src_pos,
                "neuron": ref.neuron,
                "expert": ref.expert,
                "score": float(score),
                "coefficient": None if coef is None or pd.isna(coef) else float(coef),
                "rank": rank,
            }
        )
    return rows


def _head_groups(ctx: Any) -> list[PartGroup]:
    """Every head's output at ``ctx.position`` (its subvalues summed over source positions), one group per layer,
    as :func:`tl_residual.scorers.score_heads` builds them; with a ``top_k`` they go through the certified search."""
    from tl_residual.decompose import attention_parts

    spec = tlm.model_spec(ctx.model)
    out = []
    for l in range(spec.n_layers):
        sub, _ = attention_parts(ctx.model, ctx.cache, l, ctx.position, ctx.batch)
        per_head = sub.vectors.reshape(spec.n_heads, -1, spec.d_model).sum(1)
        out.append(
            PartGroup(
                "head",
                l,
                torch.ones(spec.n_heads, device=per_head.device),
                per_head,
                {"head": torch.arange(spec.n_heads)},
                [N.head(l, h) for h in range(spec.n_heads)],
            )
        )
    return out


def _decomposition_error(
    model: Any, cache: Any, position: int, batch: int, keep: dict[str, list[PartGroup]] | None = None
) -> float:
    """The safety net: relative error ``||sum(parts) - cached|| / ||cached||`` of the decomposition of the final
    ``resid_post`` at ``position`` (every part of :func:`~tl_residual.decompose.iter_parts`: embeddings, head x
    source-position subvalues, ``b_O``, FFN neurons, ``b_out``, registered sources).

    The same sum as :func:`~tl_residual.decompose.reconstruction_error`, but each group's
    ``coefficients @ directions`` is one float32 matrix-vector product (no float64 copy of ``W_out`` per layer
    and prompt), accumulated over groups in float64: float32 rounding (about 1e-7 relative) stays far below
    :data:`MAX_DECOMPOSITION_ERROR`. The groups whose kind is a key of ``keep`` are appended to its lists (in
    stream order), so that the scorers reuse the very parts that were checked instead of rebuilding them.
    """
    total: torch.Tensor | None = None
    for g in iter_parts(model, cache, -1, position, "resid_post", batch):
        if keep is not None and g.kind in keep:
            keep[g.kind].append(g)
        part = (g.coefficients.float() @ g.directions.float()).double()
        total = part if total is None else total + part
    assert total is not None  # iter_parts always yields the embedding
    target = tlm.cached(cache, f"blocks.{tlm.model_spec(model).n_layers - 1}.hook_resid_post", batch)[position]
    target = target.double().to(total.device)
    return float((total - target).norm() / target.norm().clamp_min(1e-30))


def _all_head_rows(ctx: Any, scorer: Any, pid: int, group: str | None, method: str) -> list[dict[str, Any]]:
    """Every head of every layer scored in one call with one base (its layer's ``resid_pre``) per head: the rows of
    :func:`tl_residual.scorers.score_heads` (same vectors, :func:`~tl_residual.decompose.head_outputs`; same
    order: score descending, ties in layer-then-head order), for a scorer that takes one base per part (those
    with a bound). One batch of full-vocabulary products instead of one call per layer."""
    vecs, bases, refs = [], [], []
    for l in range(ctx.n_layers):
        v = head_outputs(ctx.model, ctx.cache, l, ctx.position, ctx.batch)
        vecs.append(v)
        bases.append(ctx.resid(f"blocks.{l}.hook_resid_pre").expand(v.shape[0], -1))
        refs += [(l, h) for h in range(v.shape[0])]
    vectors = torch.cat(vecs)
    mixed = PartGroup("mixed", None, torch.ones(len(vectors), device=vectors.device), vectors)
    # every head in one product against W_U where the chunk size allows it (a second, narrow product would
    # read all of W_U again for a few rows)
    whole = dataclasses.replace(ctx, chunk_size=max(ctx.chunk_size, min(len(vectors), 4 * ctx.chunk_size)))
    scores = scorer(whole, mixed, torch.cat(bases).to(vectors.device)).float().cpu()  # float32, as score tables keep
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [
        {
            "prompt_id": pid,
            "group": group,
            "method": method,
            "kind": "head",
            "name": N.head(*refs[i]),
            "layer": refs[i][0],
            "head": refs[i][1],
            "dim": None,
            "src_pos": None,
            "neuron": None,
            "expert": None,
            "score": float(scores[i]),
            "coefficient": None,
            "rank": rank,
        }
        for rank, i in enumerate(order, 1)
    ]


def _sublayer_group(layer: int, kind: str, vec: torch.Tensor) -> PartGroup:
    return PartGroup(kind, layer, torch.ones(1, device=vec.device), vec[None, :], {}, [N.layer_output(layer, kind)])  # type: ignore[arg-type]


@dataclass
class _Prompt:
    """One prompt of a batch, checked and ready to score: its context, the safety net's relative error, the
    checked groups kept for the searches, and the rows to prime (every base and stream residual)."""

    ctx: Any
    error: float
    keep: dict[str, list[PartGroup]]
    attn_neurons: list[PartGroup]
    stream: list[tuple[str, torch.Tensor]]
    sub_groups: list[PartGroup]
    bases: torch.Tensor


def _prepare(
    model: Any,
    cache: Any,
    batch: int,
    position: int,
    target: int | str | None,
    *,
    kinds: Sequence[str],
    convention: str,
    chunk_size: int | None,
    tokens: Sequence[str] | None = None,
    finite: bool = False,
) -> _Prompt:
    """Build prompt ``batch``'s context and run the safety net once (never twice: the context is built without
    its own check, and the checked parts of two kinds are kept for the scorers). ``finite``: the whole batch's
    cache is known to be finite (:func:`tl_residual.model.all_finite`), else the prompt is checked here.

    Raises:
        InvalidInputError: a bad target or position, or a decomposition error above
            :data:`MAX_DECOMPOSITION_ERROR`; UnsupportedArchitectureError: a model outside the decomposition.
    """
    from tl_residual import scorers as S
    from tl_residual.decompose import attention_neuron_groups

    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    ctx = S.make_context(model, cache, target, position, batch, convention, tokens=tokens, check=False, **kw)  # type: ignore[arg-type]
    if not finite:
        tlm.check_finite(cache, ctx.position, batch)  # a NaN/inf activation would enter the top-k
    ctx.projections = S.ProjectionCache()  # kept for the prompt: shared by its searches and filled per batch
    # the checked parts of two kinds are kept and scored below: the same groups, in the same (layer) order, as
    # tl_residual.scorers.iter_groups builds (attention_parts; ffn_parts for dense MLPs; a mixture of experts'
    # FFN groups differ from iter_parts' and are rebuilt by the scorers)
    spec = tlm.model_spec(model)
    keep: dict[str, list[PartGroup]] = {k: [] for k in ("attn_subvalue", "ffn_neuron") if k in kinds}
    if "ffn_neuron" in keep and any(tlm.is_moe_layer(model, l) for l in range(spec.n_layers)):
        del keep["ffn_neuron"]
    err = _decomposition_error(model, cache, ctx.position, batch, keep)
    if not err <= MAX_DECOMPOSITION_ERROR:
        raise InvalidInputError(
            f"the parts miss the cached final resid_post by {err:.2e} (relative), above {MAX_DECOMPOSITION_ERROR:g}; "
            f"scores would not be exact"
        )
    attn_neurons = (
        [g for l in range(spec.n_layers) for g in attention_neuron_groups(model, cache, l, ctx.position, batch)]
        if "attn_neuron" in kinds
        else []
    )  # the groups of scorers.score_attention_neurons (iter_groups), built once
    stream = residual_stream(model, cache, ctx.position, batch)
    sub_groups = [
        _sublayer_group(l, k, v) for _, l, k, v in layer_outputs(model, cache, ctx.position, batch) if k != "embed"
    ]
    bases = torch.stack([ctx.base_for(g) for g in sub_groups] + [v for _, v in stream])
    return _Prompt(ctx, err, keep, attn_neurons, stream, sub_groups, torch.cat([bases, torch.zeros_like(bases[:1])]))


def _prime(prompts: Sequence[_Prompt], methods: Sequence[str], top_k: Mapping[str, int | None]) -> Any:
    """Everything the prompts of a batch share, computed for all of them at once: the lens logits and bound
    probes of every base and stream residual (:func:`tl_residual.scorers.prime_contexts`), and the bound
    projections of the directions shared by every prompt (FFN ``W_out``, attention ``W_O`` rows;
    :func:`tl_residual.scorers.project_bounds`), and the vocabulary projections of the neurons each prompt's
    search will score first (:func:`tl_residual.scorers.prefetch_direction_logits`). Returns the batch's
    :class:`~tl_residual.scorers.DirectionLogits` (its counters: neuron rows asked for and projected)."""
    from tl_residual import scorers as S

    ctxs = [p.ctx for p in prompts]
    S.prime_contexts(ctxs, [p.bases for p in prompts])
    for method in methods:
        S.project_bounds(ctxs, [p.keep.get("ffn_neuron", []) + p.attn_neurons for p in prompts], method)
    shared = S.DirectionLogits()  # neuron directions' vocabulary projections, once per batch for all prompts
    for c in ctxs:
        c.direction_logits = shared
    for kind, groups in (
        ("ffn_neuron", [p.keep.get("ffn_neuron", []) for p in prompts]),
        ("attn_neuron", [p.attn_neurons for p in prompts]),
    ):
        k = top_k.get(kind)
        if k is None:
            continue
        for method in methods:
            S.prefetch_direction_logits(ctxs, groups, k, method)
    return shared


def score_prompt(
    model: Any,
    cache: Any,
    batch: int,
    position: int,
    target: int | str | None,
    *,
    methods: Sequence[str],
    kinds: Sequence[str],
    top_k: Mapping[str, int | None],
    convention: str = "frozen",
    chunk_size: int | None = None,
    query_values: int = 10,
    query_top_k: int = 20,
    query_attn_values: int = 10,
    query_totals_k: int = 1000,
    pid: int = 0,
    group: str | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every requested quantity for prompt ``batch`` of a right-padded batched ``cache`` at ``position`` (an index
    into the prompt's own tokens): ``(prompt facts, rows per table)``. (:func:`run` prepares the prompts of a
    batch together; same rows.)

    Raises:
        InvalidInputError: a bad target or position; UnsupportedArchitectureError: a model outside the
            decomposition; also when the decomposition of the final ``resid_post`` misses the cached vector by more
            than :data:`MAX_DECOMPOSITION_ERROR` (relative; the safety net).
    """
    prompt = _prepare(model, cache, batch, position, target, kinds=kinds, convention=convention, chunk_size=chunk_size)
    _prime([prompt], methods, top_k)
    return _score_prepared(
        prompt,
        methods=methods,
        kinds=kinds,
        top_k=top_k,
        query_values=query_values,
        query_top_k=query_top_k,
        query_attn_values=query_attn_values,
        query_totals_k=query_totals_k,
        pid=pid,
        group=group,
    )


def _score_prepared(
    prompt: _Prompt,
    *,
    methods: Sequence[str],
    kinds: Sequence[str],
    top_k: Mapping[str, int | None],
    query_values: int,
    query_top_k: int,
    query_attn_values: int,
    query_totals_k: int,
    pid: int,
    group: str | None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The rows of :func:`score_prompt` for a prepared (and primed) prompt."""
    from tl_residual import scorers as S

    ctx, keep, sub_groups = prompt.ctx, prompt.keep, prompt.sub_groups
    model, cache, batch = ctx.model, ctx.cache, ctx.batch
    logits = S.model_logits(model, cache, ctx.position, batch)
    logp = torch.log_softmax(logits.double(), -1)
    facts = {
        "target_id": ctx.target,
        "target_log_prob": float(logp[ctx.target]),
        "target_prob": float(logp[ctx.target].exp()),
        "target_rank": int(1 + (logits > logits[ctx.target]).sum()),
        "decomposition_error": prompt.error,
    }
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES if t != "prompts"}
    base = {"prompt_id": pid, "group": group}
    if "stream" in kinds:
        z = ctx.base_logits(torch.stack([v for _, v in prompt.stream]))  # primed: ctx.lens.logits of each
        lp = torch.log_softmax(z.double(), -1)[:, ctx.target]
        rk = 1 + (z > z[:, ctx.target : ctx.target + 1]).sum(-1)
        for i, (name, _) in enumerate(prompt.stream):
            rows["stream"].append(
                {
                    **base,
                    "stream": name,
                    "index": i,
                    "log_prob": float(lp[i]),
                    "prob": float(lp[i].exp()),
                    "rank": int(rk[i]),
                }
            )
    # every base residual (resid_pre and resid_mid of each layer, and zero) was primed for the whole batch; the
    # layer scores and every pruned search below reuse them
    bases = torch.stack([ctx.base_for(g) for g in sub_groups])
    for method in methods:
        scorer = S.get_scorer(method)
        if "layer" in kinds:
            if scorer.bound is not None:  # such scorers take one base per part: all sublayers in one call
                mixed = PartGroup(
                    "mixed",
                    None,
                    torch.ones(len(sub_groups), device=bases.device),
                    torch.stack([g.directions[0] for g in sub_groups]),
                )
                layer_scores = scorer.fn(ctx, mixed, bases).reshape(-1).tolist()
            else:
                layer_scores = [float(scorer.fn(ctx, g, ctx.base_for(g)).reshape(-1)[0]) for g in sub_groups]
            for g, score in zip(sub_groups, layer_scores):
                rows["layers"].append(
                    {
                        **base,
                        "method": method,
                        "name": g.names[0],
                        "layer": g.layer,
                        "sublayer": g.kind,
                        "score": float(score),
                    }
                )
        tables = {
            "ffn_neuron": lambda m: (
                S.score_groups(ctx, keep["ffn_neuron"], m, top_k["ffn_neuron"], n_top_tokens=0)
                if "ffn_neuron" in keep
                else S.score_ffn_neurons(ctx, m, top_k=top_k["ffn_neuron"], n_top_tokens=0)
            ),
            "attn_neuron": lambda m: S.score_groups(ctx, prompt.attn_neurons, m, top_k["attn_neuron"], n_top_tokens=0),
            "attn_subvalue": lambda m: S.score_groups(
                ctx, keep["attn_subvalue"], m, top_k["attn_subvalue"], n_top_tokens=0
            ),
            "head": lambda m: (
                S.score_heads(ctx, m, n_top_tokens=0)
                if top_k.get("head") is None
                else S.score_groups(ctx, _head_groups(ctx), m, top_k["head"], n_top_tokens=0)
            ),
        }
        for kind, fn in tables.items():
            if kind not in kinds:
                continue
            if kind == "head" and top_k.get("head") is None and scorer.bound is not None:
                rows["parts"].extend(_all_head_rows(ctx, scorer, pid, group, method))
                continue
            df = fn(method)
            rows["parts"].extend(_parts_rows(df, pid, group, method, kind))
    if "query" in kinds:
        n_values = {"ffn_neuron": query_values, "attn_neuron": query_attn_values}
        rows.update(_query_rows(prompt, n_values, query_top_k, query_totals_k, base))
    return facts, rows


#: The value kinds of kind ``query`` and the option giving how many of each are split.
QUERY_VALUE_KINDS: tuple[str, ...] = ("ffn_neuron", "attn_neuron")
#: The query kinds of ``query_totals`` / ``query_layers``: the part kinds of a residual stream and the key bias.
QUERY_KINDS: tuple[str, ...] = (*Q_STREAM_KINDS, "key_bias")


def _index_cols(group: PartGroup, i: int) -> dict[str, int | None]:
    return {c: (int(group.index[c][i]) if c in group.index else None) for c in ("head", "src_pos", "neuron")}


def _value_neurons(prompt: _Prompt, kind: str, n: int) -> pd.DataFrame:
    """The ``n`` value neurons of ``kind`` with the largest log-probability increase, as
    :func:`tl_residual.query.query_neuron_scores` picks them (certified exact top-k); the groups the prompt already
    built are reused."""
    from tl_residual import scorers as S

    ctx = prompt.ctx
    if kind == "ffn_neuron" and "ffn_neuron" in prompt.keep:
        return S.score_groups(ctx, prompt.keep["ffn_neuron"], "log_prob_increase", n, n_top_tokens=0)
    if kind == "attn_neuron" and prompt.attn_neurons:
        return S.score_groups(ctx, prompt.attn_neurons, "log_prob_increase", n, n_top_tokens=0)
    return S.score(ctx, (kind,), "log_prob_increase", top_k=n, n_top_tokens=0)


def _query_rows(
    prompt: _Prompt, n_values: Mapping[str, int], top_k: int, totals_k: int, base: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """The rows of tables ``query``, ``query_totals`` and ``query_layers`` of one prompt (neuron-level paper
    section 3.4), in one pass over the parts of the stream per position the value neurons read.

    For each value kind (``n_values``: ``ffn_neuron`` -> ``query_values``, ``attn_neuron`` ->
    ``query_attn_values``; 0 = none), the value neurons ``a`` with the largest log-probability increase
    ``Imp(a)`` are split over the parts ``j`` of the stream vector they read (:func:`tl_residual.query.value_reads`:
    FFN neurons at the prompt's position, input ``pre`` or ``up`` for gated MLPs; attention value neurons at their
    source position, input ``v``) and part ``j`` scores ``Imp(a) * contribution_j(a) / input(a)`` (nats), the key
    bias ``Imp(a) * B(a) / input(a)`` (:class:`tl_residual.query._QueryScores`, the accumulator of
    :func:`tl_residual.query.query_neuron_scores`; value neurons with ``|input| < 1e-6`` are skipped, as there).

    * ``query``: per value neuron, its ``top_k`` best query parts (the key bias competes as the part
      ``L{l}.key_bias``);
    * ``query_totals``: per value kind and query kind, the ``totals_k`` query parts with the largest score summed
      over all the value neurons (exactly the rows of ``query_neuron_scores``), ranked;
    * ``query_layers``: per value kind, query kind and layer, the sum over every part (with ``total_imp``,
      ``n_value`` and ``n_skipped`` of the value kind on each row: the ``score`` column sums to ``total_imp``).

    Memory: the running per-part sums of ``_QueryScores`` (one float64 per part of each stream vector read) and
    one layer's groups at a time.
    """
    from tl_residual import query as Q

    ctx = prompt.ctx
    out: dict[str, list[dict[str, Any]]] = {"query": [], "query_totals": [], "query_layers": []}
    for kind in QUERY_VALUE_KINDS:
        n = n_values.get(kind, 0)
        if not n:
            continue
        top = _value_neurons(prompt, kind, n)
        acc = Q._QueryScores(ctx, 1e-6)
        for position, reads in Q.reads_by_position(Q.value_reads(ctx, kind, top)):  # type: ignore[arg-type]
            per_read: list[list[tuple[PartGroup, torch.Tensor, torch.Tensor]]] = [[] for _ in reads]

            def each(i: int, group: PartGroup, scores: torch.Tensor, per_read: list[Any] = per_read) -> None:
                vals, idx = torch.topk(scores.cpu(), min(top_k, scores.shape[0]), dim=0)
                per_read[i].append((Q._labels_only(group), vals, idx))  # the group's best parts for each neuron

            for (layer, _, _, _), kept, cands in zip(reads, acc.add_many(kind, position, reads, each), per_read):
                if kept is None:
                    continue
                _emit_query_rows(out["query"], base, layer, position, kept, cands, top_k)
        out["query_totals"].extend(_totals_rows(acc, kind, totals_k, base))
        out["query_layers"].extend(_layer_rows(acc, kind, base))
    return out


def _emit_query_rows(
    out: list[dict[str, Any]],
    base: dict[str, Any],
    layer: int,
    position: int,
    kept: tuple[pd.DataFrame, torch.Tensor],
    cands: list[tuple[PartGroup, torch.Tensor, torch.Tensor]],
    top_k: int,
) -> None:
    """Append the ``query`` rows of one read's value neurons: per neuron its ``top_k`` best parts among the
    groups' candidates ``cands`` (``(group, best scores [c, k], their part indices [c, k])``) and its key bias."""
    kept_rows, bias_share = kept
    all_scores = torch.cat([v for _, v, _ in cands] + [bias_share[None, :]])  # [candidates, kept neurons]
    owner = [(g, idx, r) for g, v, idx in cands for r in range(v.shape[0])] + [(None, None, 0)]
    for j, r in enumerate(kept_rows.itertuples(index=False)):
        order = torch.argsort(all_scores[:, j], descending=True, stable=True)[:top_k].tolist()
        for rank, c in enumerate(order, 1):
            g, gidx, local = owner[c]
            if g is None or gidx is None:
                ident = {"query_name": N.key_bias(layer), "query_kind": "key_bias", "layer": layer}
                cols: dict[str, int | None] = {"head": None, "src_pos": None, "neuron": None}
            else:
                i = int(gidx[local, j])
                ident = {"query_name": g.names[i], "query_kind": g.kind, "layer": g.layer}
                cols = _index_cols(g, i)
            out.append(
                {
                    **base,
                    "value_name": r.name,
                    "value_score": float(r.score),
                    **ident,
                    **cols,
                    "position": position,
                    "score": float(all_scores[c, j]),
                    "rank": rank,
                }
            )


def _totals_rows(acc: Any, value_kind: str, k: int, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``k`` best query parts of each query kind by their summed score (``query_totals``)."""
    rows = []
    by_kind: dict[str, list[tuple[PartGroup, int, torch.Tensor]]] = {}
    for (qkind, _, position), (group, scored) in acc.parts.items():
        by_kind.setdefault(qkind, []).append((group, position, scored.cpu()))
    for qkind, entries in by_kind.items():
        scores = torch.cat([s for _, _, s in entries])
        ends = torch.tensor([len(s) for _, _, s in entries]).cumsum(0)  # entry e holds [ends[e-1], ends[e])
        vals, idx = torch.topk(scores, min(k, len(scores)))
        order = torch.argsort(vals, descending=True, stable=True)
        for rank, o in enumerate(order.tolist(), 1):
            flat = int(idx[o])
            e = int(torch.searchsorted(ends, flat, right=True))
            g, p, _ = entries[e]
            i = flat - (int(ends[e - 1]) if e else 0)
            rows.append(
                {
                    **base,
                    "value_kind": value_kind,
                    "query_name": g.names[i],
                    "query_kind": qkind,
                    "layer": -1 if g.layer is None else int(g.layer),
                    **_index_cols(g, i),
                    "position": p,
                    "score": float(vals[o]),
                    "rank": rank,
                }
            )
    bias = sorted(acc.key_bias.items(), key=lambda kv: -kv[1])[:k]
    for rank, ((layer, p), value) in enumerate(bias, 1):
        rows.append(
            {
                **base,
                "value_kind": value_kind,
                "query_name": N.key_bias(layer),
                "query_kind": "key_bias",
                "layer": layer,
                "position": p,
                "score": float(value),
                "rank": rank,
            }
        )
    return rows


def _layer_rows(acc: Any, value_kind: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The sum over every query part of each (query kind, layer), key bias included (``query_layers``)."""
    sums: dict[tuple[str, int], float] = {}
    for (qkind, layer, _), (_, scored) in acc.parts.items():
        key = (qkind, -1 if layer is None else int(layer))
        sums[key] = sums.get(key, 0.0) + float(scored.sum())
    for (layer, _), value in acc.key_bias.items():
        sums[("key_bias", layer)] = sums.get(("key_bias", layer), 0.0) + value
    facts = {"total_imp": acc.total_imp, "n_value": acc.n_value, "n_skipped": len(acc.skipped)}
    return [
        {**base, "value_kind": value_kind, "query_kind": qkind, "layer": layer, "score": value, **facts}
        for (qkind, layer), value in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("tl-residual", "transformer-lens", "torch", "transformers", "accelerate", "datasets", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _model_info(model: Any, model_name: str | None) -> dict[str, Any]:
    spec = tlm.model_spec(model)
    cfg = model.cfg
    return {
        "name": model_name or str(getattr(cfg, "model_name", "") or type(model).__name__),
        "class": type(model).__name__,
        "n_layers": spec.n_layers,
        "d_model": spec.d_model,
        "n_heads": spec.n_heads,
        "d_head": spec.d_head,
        "d_mlp": spec.d_mlp,
        "d_vocab": int(getattr(cfg, "d_vocab", 0)),
        "n_ctx": int(getattr(cfg, "n_ctx", 0) or 0),
        "dtype": str(getattr(cfg, "dtype", "")),
    }


def _set_options(options: Any) -> Any:
    """A manifest entry with its None-valued keys dropped (options that do not apply or did not exist yet)."""
    return {k: v for k, v in options.items() if v is not None} if isinstance(options, dict) else options


def _check_or_write_manifest(out: Path, manifest: dict[str, Any], is_main: bool) -> None:
    path = out / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        # An option that does not apply is None; one added in a later version is absent from older manifests: the
        # two mean the same, so a folder written before an option existed resumes while the option stays unused.
        entries = ("options", "data_fingerprint", "model")
        diffs = [k for k in entries if _set_options(old.get(k)) != _set_options(manifest.get(k))]
        if diffs:
            detail = []
            for k in diffs:
                a, b = _set_options(old.get(k) or {}), _set_options(manifest.get(k) or {})
                if isinstance(a, dict) and isinstance(b, dict):
                    keys = sorted(k2 for k2 in set(a) | set(b) if a.get(k2) != b.get(k2))
                    detail.append(f"{k}: " + ", ".join(f"{k2} was {a.get(k2)!r}, now {b.get(k2)!r}" for k2 in keys))
                else:
                    detail.append(f"{k} differs")
            raise InvalidInputError(
                f"{out} holds a study with other settings ({'; '.join(detail)}); rerun with the same options "
                f"to resume, or write to a new folder"
            )
        return
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=2, ensure_ascii=False, default=str)
        atomic_write_text(path, text)


def distributed_state() -> Any:
    """The process's ``accelerate.PartialState``: rank, world size and device under ``accelerate launch`` or
    ``torchrun`` (gloo on CPU-only machines, NCCL on GPUs); a single process without a launcher.

    CPU is forced where CUDA is absent or ``ACCELERATE_USE_CPU`` is set (``accelerate launch --cpu``), so that CPU
    processes started by a launcher form a gloo group instead of running alone.
    """
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def run(
    model: Any,
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    methods: Sequence[str] = ("log_prob_increase",),
    top_k: int | Mapping[str, int | None] | None = None,
    kinds: Iterable[str] = DEFAULT_KINDS,
    batch_size: int = 16,
    position: int = -1,
    prompt_column: str = "prompt",
    target_column: str | None = None,
    group_column: str | None = None,
    filter: str | None = None,
    convention: str = "frozen",
    chunk_size: int | None = None,
    query_values: int = 10,
    query_top_k: int = 20,
    query_attn_values: int = 10,
    query_totals_k: int = 1000,
    max_prompts: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    sort_by_length: bool = True,
) -> dict[str, Any]:
    """Score every prompt of ``data`` and write the results to ``out_dir`` (see the module doc for the layout).

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (with a tokenizer). For a model split over devices
            (``device_map``), the cache of each batch is moved to the device of ``W_U`` before scoring.
        data: see :func:`read_data` (``"builtin:factual"`` implies ``target_column="answer"``, ``group_column="type"``).
        out_dir: the study folder (created; an existing one is resumed).
        methods: registered scorer names (:data:`tl_residual.scorers.SCORERS`), all computed from the same cache.
        top_k: parts kept per prompt, method and kind: an integer for the three neuron kinds, or a mapping such as
            ``{"ffn_neuron": 100, "attn_neuron": 200, "attn_subvalue": 20, "head": None}`` (the default;
            :data:`DEFAULT_TOP_K`). Found by the certified exact search where the method has a bound.
        kinds: any of :data:`KINDS` (default all but ``query``).
        batch_size: prompts per forward pass (memory grows linearly with it; results do not depend on it).
        position: destination position in the prompt's own tokens (``-1``: its last token).
        prompt_column: the column holding the prompt text.
        target_column: the column holding the target (a one-token string or a token id); none: the model's top-1.
        group_column: the column holding a group label (e.g. the knowledge type).
        filter: ``"paper"``: keep only prompts passing the neuron-level paper's filter
            (:func:`tl_residual.datasets.filter_prompts`; needs a target and a group column of its six knowledge
            types); the others are recorded with status ``filtered``.
        convention: lens convention (``frozen``, ``recomputed``, ``none``).
        chunk_size: parts per matmul against ``W_U`` (default :data:`tl_residual.scorers.DEFAULT_CHUNK_SIZE`).
        query_values: for kind ``query``: the FFN value neurons split per prompt (the top ones by
            log-probability increase; 0 = none).
        query_attn_values: for kind ``query``: the attention value neurons ``L{l}.H{h}.d{d}.p{p}`` split per
            prompt (0 = none).
        query_top_k: for kind ``query``: the query parts kept per value neuron (table ``query``).
        query_totals_k: for kind ``query``: the query parts kept per prompt, value kind and query kind by their
            score summed over all the value neurons (table ``query_totals``).
        max_prompts: only the first ``max_prompts`` rows of the data (part of the data fingerprint).
        model_name: the name recorded in the manifest (default: ``model.cfg.model_name``).
        progress: show a tqdm progress bar (rank 0) with rate and ETA.
        sort_by_length: batch prompts of similar length together (less padding; the results are the same).

    Returns:
        A summary: ``{"ok", "failed", "filtered", "skipped" (already done), "seconds", "rank", "world_size"}`` of
        this process, and ``"neuron_rows_requested"`` / ``"neuron_rows_projected"``: the FFN and attention neurons
        scored exactly, summed over prompts, and the vocabulary projections that cost (the union per batch).

    Raises:
        InvalidInputError: bad options, unreadable data, a missing column, or ``out_dir`` holding a study with
            other options, data or model.
    """
    from tl_residual.scorers import get_scorer

    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InvalidInputError(f"kinds {bad or list(kinds)} are not a non-empty subset of {', '.join(KINDS)}")
    methods = tuple(dict.fromkeys([methods] if isinstance(methods, str) else methods))
    if not methods:
        raise InvalidInputError("give at least one method")
    for m in methods:
        get_scorer(m)
    top = _resolve_top_k(top_k)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(position, int) or isinstance(position, bool):
        raise InvalidInputError(f"position must be an integer, got {position!r}")
    if filter not in (None, "paper"):
        raise InvalidInputError(f"filter {filter!r} is not supported; use 'paper' or none")
    if convention not in ("frozen", "recomputed", "none"):
        raise InvalidInputError(f"lens convention {convention!r} is not one of frozen, recomputed, none")
    for label, v, low in (
        ("query_values", query_values, 0),
        ("query_attn_values", query_attn_values, 0),
        ("query_top_k", query_top_k, 1),
        ("query_totals_k", query_totals_k, 1),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            what = "a non-negative" if low == 0 else "a positive"
            raise InvalidInputError(f"{label} must be {what} integer, got {v!r}")
    if "query" in kinds and query_values == 0 and query_attn_values == 0:
        raise InvalidInputError(
            "kind 'query' needs value neurons to split: set query_values (FFN) or query_attn_values (attention) > 0"
        )
    if getattr(model, "tokenizer", None) is None:
        raise InvalidInputError("the model has no tokenizer; a study tokenizes text prompts")
    is_builtin = isinstance(data, str) and data == BUILTIN_FACTUAL
    if is_builtin:
        target_column = target_column or "answer"
        group_column = group_column or "type"
    df = read_data(data)
    if max_prompts is not None:
        df = df.head(max_prompts)
    records = _records(df, prompt_column, target_column, group_column)
    if filter == "paper" and (target_column is None or group_column is None):
        raise InvalidInputError("filter 'paper' needs a target column and a group column (knowledge type)")

    state = distributed_state()
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    options = {
        "methods": list(methods),
        "kinds": list(kinds),
        "top_k": top,
        "position": position,
        "prompt_column": prompt_column,
        "target_column": target_column,
        "group_column": group_column,
        "filter": filter,
        "convention": convention,
        "query_values": query_values if "query" in kinds else None,
        "query_top_k": query_top_k if "query" in kinds else None,
        "query_attn_values": query_attn_values if "query" in kinds else None,
        "query_totals_k": query_totals_k if "query" in kinds else None,
        "max_decomposition_error": MAX_DECOMPOSITION_ERROR,
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": _model_info(model, model_name),
        "versions": _versions(),
        "options": options,
        "data": data if isinstance(data, str) else type(data).__name__,
        "data_fingerprint": fingerprint(records),
        "n_prompts": len(records),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"batch_size": batch_size, "chunk_size": chunk_size, "world_size": world},
    }
    if state.is_main_process:
        _check_or_write_manifest(out, manifest, True)
    state.wait_for_everyone()
    _check_or_write_manifest(out, manifest, False)
    for t in TABLES:
        (out / t).mkdir(parents=True, exist_ok=True)
    done = _committed_ids(out)
    state.wait_for_everyone()  # every rank has read the same committed set before anyone writes
    next_shard = _clean_rank(out, rank)
    pending = [r for r in records if r.prompt_id not in done]
    mine = pending[rank::world]
    summary = {
        "ok": 0,
        "failed": 0,
        "filtered": 0,
        "neuron_rows_requested": 0,
        "neuron_rows_projected": 0,
        "skipped": len(records) - len(pending),
        "rank": rank,
        "world_size": world,
        "seconds": 0.0,
    }
    t0 = time.perf_counter()

    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    tokenized: list[tuple[PromptRecord, torch.Tensor | None, str | None]] = []
    for r in mine:
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            tokenized.append((r, None, f"empty or non-text prompt {r.prompt!r}"))
            continue
        toks = model.to_tokens(r.prompt, truncate=False)[0].cpu()  # never cut silently: too long = failed
        if n_ctx and len(toks) > n_ctx:
            tokenized.append((r, toks, f"too long: {len(toks)} tokens, the model's context is {n_ctx}"))
            continue
        tokenized.append((r, toks, None))
    if sort_by_length:
        tokenized.sort(key=lambda t: (0 if t[1] is None else len(t[1]), t[0].prompt_id))

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(tokenized),
        disable=not (progress and state.is_main_process),
        unit="prompt",
        desc=f"study rank {rank}/{world}" if world > 1 else "study",
        dynamic_ncols=True,
    )
    try:
        for start in range(0, len(tokenized), batch_size):
            chunk = tokenized[start : start + batch_size]
            with _spec_scope(model):
                counts = _run_batch(
                    model,
                    chunk,
                    out,
                    rank,
                    next_shard,
                    methods=methods,
                    kinds=kinds,
                    top=top,
                    position=position,
                    convention=convention,
                    chunk_size=chunk_size,
                    query_values=query_values,
                    query_top_k=query_top_k,
                    query_attn_values=query_attn_values,
                    query_totals_k=query_totals_k,
                    filter=filter,
                )
            next_shard += 1
            for k, v in counts.items():
                summary[k] += v
            bar.update(len(chunk))
    finally:
        bar.close()
    summary["seconds"] = time.perf_counter() - t0
    state.wait_for_everyone()
    return summary


def _spec_scope(model: Any) -> ExitStack:
    """:func:`tl_residual.model.spec_scope` for one batch (the model's spec read once, not per part group); for
    an unsupported model no scope, and each prompt fails with the reason, as without it."""
    stack = ExitStack()
    try:
        stack.enter_context(tlm.spec_scope(model))
    except TLResidualError:
        pass
    return stack


def _token_strs(model: Any, toks: torch.Tensor | None) -> list[str]:
    if toks is None:
        return []
    return [model.tokenizer.decode([int(t)]) for t in toks.tolist()]


def _target_text(model: Any, target: Any, target_id: int | None) -> str | None:
    if isinstance(target, str):
        return target
    if target_id is not None:
        return model.tokenizer.decode([int(target_id)])
    return None


def _run_batch(
    model: Any,
    chunk: list[tuple[PromptRecord, torch.Tensor | None, str | None]],
    out: Path,
    rank: int,
    shard: int,
    *,
    methods: Sequence[str],
    kinds: Sequence[str],
    top: Mapping[str, int | None],
    position: int,
    convention: str,
    chunk_size: int | None,
    query_values: int,
    query_top_k: int,
    query_attn_values: int,
    query_totals_k: int,
    filter: str | None,
) -> dict[str, int]:
    """Forward one right-padded batch with cache, score each prompt, write the shards (prompts last)."""
    counts = {"ok": 0, "failed": 0, "filtered": 0, "neuron_rows_requested": 0, "neuron_rows_projected": 0}
    prompt_rows: list[dict[str, Any]] = []
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES if t != "prompts"}
    runnable = [(r, t) for r, t, why in chunk if why is None and t is not None]
    reasons = {r.prompt_id: why for r, _, why in chunk if why is not None}
    statuses: dict[int, str] = {pid: "failed" for pid in reasons}
    if filter == "paper" and runnable:
        from tl_residual.datasets import filter_prompts

        fdf = pd.DataFrame(
            {
                "type": [r.group for r, _ in runnable],
                "prompt": [r.prompt for r, _ in runnable],
                "answer": [r.target for r, _ in runnable],
            }
        )
        fres = filter_prompts(model, fdf, batch_size=max(1, len(runnable)))
        keep = []
        for (r, t), row in zip(runnable, fres.itertuples(index=False)):
            if bool(row.keep):
                keep.append((r, t))
            else:
                why = (
                    "answer is not one token"
                    if not row.single_token
                    else f"answer rank {row.answer_rank} > 10"
                    if row.answer_rank > 10
                    else "another candidate ranks higher"
                )
                reasons[r.prompt_id] = f"paper filter: {why}"
                statuses[r.prompt_id] = "filtered"
        runnable = keep
    facts: dict[int, dict[str, Any]] = {}
    if runnable:
        width = max(len(t) for _, t in runnable)
        pad = getattr(model.tokenizer, "pad_token_id", None)
        pad = int(pad if pad is not None else (getattr(model.tokenizer, "eos_token_id", None) or 0))
        tokens = torch.full((len(runnable), width), pad, dtype=torch.long)
        for i, (_, t) in enumerate(runnable):
            tokens[i, : len(t)] = t  # right padding: under the causal mask real tokens never see the pads
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens.to(tlm.scoring_device(model)))
        cache = tlm.cache_to_scoring_device(model, cache)  # a model split by device_map: score on W_U's device
        prepared: list[tuple[PromptRecord, int, _Prompt]] = []
        finite = tlm.all_finite(cache)  # one pass for the batch (else each prompt is checked, naming the place)
        for b, (r, t) in enumerate(runnable):
            n = len(t)
            pos = position + n if position < 0 else position
            try:
                if not 0 <= pos < n:
                    raise InvalidInputError(f"position {position} is outside the prompt's {n} tokens")
                prepared.append(
                    (
                        r,
                        pos,
                        _prepare(
                            model,
                            cache,
                            b,
                            pos,
                            r.target,
                            kinds=kinds,
                            convention=convention,
                            chunk_size=chunk_size,
                            tokens=_token_strs(model, t[: pos + 1]),  # the prompt's own tokens, not decoded again
                            finite=finite,
                        ),
                    )
                )
            except TLResidualError as exc:
                reasons[r.prompt_id], statuses[r.prompt_id] = str(exc), "failed"
        shared = None
        try:
            shared = _prime([p for _, _, p in prepared], methods, top) if prepared else None  # shared by the prompts
        except TLResidualError as exc:  # what the batch shares could not be computed: every prompt of it fails
            for r, _, _ in prepared:
                reasons[r.prompt_id], statuses[r.prompt_id] = str(exc), "failed"
            prepared = []
        for r, pos, prompt in prepared:
            try:
                f, prow = _score_prepared(
                    prompt,
                    methods=methods,
                    kinds=kinds,
                    top_k=top,
                    query_values=query_values,
                    query_top_k=query_top_k,
                    query_attn_values=query_attn_values,
                    query_totals_k=query_totals_k,
                    pid=r.prompt_id,
                    group=r.group,
                )
            except TLResidualError as exc:
                reasons[r.prompt_id], statuses[r.prompt_id] = str(exc), "failed"
                continue
            facts[r.prompt_id] = {**f, "position": pos}
            statuses[r.prompt_id] = "ok"
            for table, trows in prow.items():
                rows[table].extend(trows)
        if shared is not None:
            counts["neuron_rows_requested"] += shared.n_requested
            counts["neuron_rows_projected"] += shared.n_projected
        del prepared, shared
        del cache
    for r, prompt_tokens, _ in chunk:
        f = facts.get(r.prompt_id, {})
        status = statuses[r.prompt_id]
        counts[status] += 1
        prompt_rows.append(
            {
                "prompt_id": r.prompt_id,
                "group": r.group,
                "prompt": r.prompt if isinstance(r.prompt, str) else repr(r.prompt),
                "tokens": _token_strs(model, prompt_tokens),
                "n_tokens": None if prompt_tokens is None else len(prompt_tokens),
                "position": f.get("position"),
                "target": _target_text(model, r.target, f.get("target_id")),
                "target_id": f.get("target_id"),
                "target_prob": f.get("target_prob"),
                "target_rank": f.get("target_rank"),
                "target_log_prob": f.get("target_log_prob"),
                "decomposition_error": f.get("decomposition_error"),
                "status": status,
                "reason": reasons.get(r.prompt_id),
            }
        )
    name = f"rank{rank}-{shard:05d}.parquet"
    for table, trows in rows.items():
        _write_table(out / table / name, table, trows)
    _write_table(out / "prompts" / name, "prompts", prompt_rows)  # last: commits the batch
    return counts


# The papers' corpus analyses over a run (issue: "one call each"), defined in tl_residual.analyses.
from tl_residual.analyses import (  # noqa: E402
    bs_removal_average,
    cross_layer_average,
    ffn_subvalue_counts,
    ffn_value_query_roles,
    head_ablation,
    layer_contributions,
    neuron_importance,
    neuron_layer_distribution,
    neuron_projections,
    norm_filter,
    query_neuron_ablation,
    query_neuron_counts,
    query_union,
    regularisation_neurons,
    segment_curves,
    shared_neuron_projections,
    shared_neurons,
    stream_log_prob,
    subvalue_additivity,
    subvalue_selection,
    top10_share,
    top_heads,
    top_layers,
    top_query_layers,
    value_query_layers,
    value_query_overlap,
    visit_intersections,
)

__all__ = [
    "layer_contributions",
    "top_layers",
    "top_heads",
    "neuron_importance",
    "shared_neurons",
    "neuron_layer_distribution",
    "top_query_layers",
    "query_neuron_counts",
    "stream_log_prob",
    "ffn_subvalue_counts",
    "segment_curves",
    "head_ablation",
    "query_neuron_ablation",
    "neuron_projections",
    "shared_neuron_projections",
    "subvalue_selection",
    "subvalue_additivity",
    "top10_share",
    "cross_layer_average",
    "visit_intersections",
    "norm_filter",
    "regularisation_neurons",
    "ffn_value_query_roles",
    "value_query_overlap",
    "query_union",
    "value_query_layers",
    "bs_removal_average",
    "DEFAULT_KINDS",
    "DEFAULT_TOP_K",
    "KINDS",
    "SCHEMAS",
    "StudyResults",
    "distributed_state",
    "fingerprint",
    "load",
    "parse_top_k",
    "read_data",
    "run",
    "score_prompt",
]
