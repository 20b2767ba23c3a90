"""Regenerate the family table of docs/architectures.md from measurements on tiny random-weight models.

For every family of ``tests/tiny_families.py`` and every TransformerLens API this environment has (the
``TransformerBridge``, and ``HookedTransformer`` under TransformerLens 3.x), unprocessed and with TransformerLens'
weight processing, it measures the worst relative reconstruction error over every layer, stream and position, and
the worst log-probability difference between the lens and the model's own output. Rows of an API this environment
lacks (or of another TransformerLens version) are kept from the current table, so run it once per environment:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/architectures_table.py        # TransformerLens 4.x: bridge rows
    HF_HUB_OFFLINE=1 .venv-tl3/bin/python scripts/architectures_table.py    # TransformerLens 3.x: hooked rows

The table is written between ``<!-- families:start -->`` and ``<!-- families:end -->`` (atomically).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import pytest
import tiny_families as F
import torch

from conftest import HAS_BRIDGE, HAS_HOOKED
from tl_residual import decompose as D
from tl_residual import model as tlm
from tl_residual.errors import TLResidualError
from tl_residual.lens import model_logits

DOC = os.path.join(ROOT, "docs", "architectures.md")
START, END = "<!-- families:start -->", "<!-- families:end -->"
HEADER = (
    "| family | repo id (adapter) | API | features | worst reconstruction error (raw / processed) | "
    "worst lens log-prob error | status |"
)
TOKENS = torch.tensor([[1, 5, 17, 33, 8, 42]])
TL_VERSION = ".".join(importlib.metadata.version("transformer-lens").split(".")[:2])
API_LABEL = {"bridge": f"TransformerBridge (TL {TL_VERSION})", "hooked": f"HookedTransformer (TL {TL_VERSION})"}


def measure(family: str, api: str, processed: bool) -> tuple[float, float, str] | str:
    """``(reconstruction error, log-prob error, features)`` or the reason the variant is not covered."""
    try:
        model = F.build(family, api, processed)
    except pytest.skip.Exception as exc:  # the reason tiny_families gives (e.g. no TransformerLens 3.x loader)
        return str(exc.msg).removeprefix(f"{family}: ")
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
    try:
        spec = tlm.model_spec(model)
        err = max(
            D.reconstruction_error(model, cache, layer, pos, stream)
            for layer in range(spec.n_layers)
            for pos in range(TOKENS.shape[1])
            for stream in D.STREAMS
            if stream != "resid_mid" or spec.has_resid_mid
        )
        lp = max(
            float(
                (torch.log_softmax(model_logits(model, cache, pos), -1) - torch.log_softmax(logits[0, pos].float(), -1))
                .abs()
                .max()
            )
            for pos in range(TOKENS.shape[1])
        )
    except TLResidualError as exc:
        return f"refused: {exc}"[:120]
    feats = [
        name
        for name, on in (
            ("parallel", spec.parallel_attn_mlp),
            ("post-norm", spec.post_mlp_norm),
            ("no pre-norm", not spec.pre_norm),
            ("embed norm", spec.embed_norm),
            (f"soft-cap {spec.logit_softcap:g}", spec.logit_softcap > 0),
            ("GQA", spec.n_kv_heads < spec.n_heads),
            (spec.final_norm, True),
            ("gated", spec.gated_mlp),
        )
        if on
    ]
    return err, lp, ", ".join(feats)


def row(family: str, api: str) -> str:
    raw, proc = measure(family, api, False), measure(family, api, True)
    repo = F.FAMILIES[family].repo
    if isinstance(raw, str):
        return f"| {family} | `{repo}` | {API_LABEL[api]} | | | | {raw} |"
    errs = f"{raw[0]:.1e} / {proc[0]:.1e}" if not isinstance(proc, str) else f"{raw[0]:.1e} / {proc}"
    lp = max(raw[1], proc[1]) if not isinstance(proc, str) else raw[1]
    ok = raw[0] < 1e-5 and (isinstance(proc, str) or proc[0] < 1e-5)
    return f"| {family} | `{repo}` | {API_LABEL[api]} | {raw[2]} | {errs} | {lp:.1e} | {'exact' if ok else 'ERROR'} |"


def main() -> None:
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read()
    head, rest = doc.split(START, 1)
    old, tail = rest.split(END, 1)
    rows: dict[tuple[str, str], str] = {}
    for line in old.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3:
            rows[(cells[0], cells[2])] = line.strip()
    apis = [a for a, has in (("bridge", HAS_BRIDGE), ("hooked", HAS_HOOKED)) if has]
    for family in F.FAMILIES:
        for api in apis:
            rows[(family, API_LABEL[api])] = row(family, api)
            print(rows[(family, API_LABEL[api])], flush=True)
    order = {f: i for i, f in enumerate(F.FAMILIES)}
    ordered = sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 999), kv[0][1]))
    table = "\n".join([HEADER, "|" + "---|" * 7] + [line for _, line in ordered])
    text = f"{head}{START}\n{table}\n{END}{tail}"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(DOC), suffix=".md")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, DOC)


if __name__ == "__main__":
    main()
