"""One-call answer to "which parts of the model produced this next token?".

(This module was ``tl_residual.explain``; it is ``tl_residual.explanation`` so that ``tl_residual.explain`` is
unambiguously the function.) :func:`explain` runs the model on a prompt, checks the decomposition is exact, and
scores the layer-level outputs, the attention head x position subvalues and the FFN neurons by log-probability
increase (or any registered method) for the target token. The result, :class:`Explanation`, holds pandas tables,
renders as HTML in a notebook, and serialises to the JSON that ``tl-residual explain --json`` writes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from tl_residual import model as tlm
from tl_residual.decompose import SOURCES, check_reconstruction, resolve_position
from tl_residual.errors import InvalidInputError
from tl_residual.lens import Convention, model_logits
from tl_residual.scorers import DEFAULT_TOP_K, make_context, score, score_layers


@dataclass
class Explanation:
    """What :func:`explain` found. Tables are sorted by score, highest first (``layers`` too).

    Attributes:
        model: model name.
        prompt: the prompt text.
        tokens: the prompt's tokens as strings (with BOS where the model prepends one).
        position: destination position (non-negative).
        target: target token id; ``target_token`` its text; ``target_prob`` the model's probability of it.
        predictions: the model's top-5 next tokens as ``(token, probability)``.
        decomposition_rel_error: relative error of the decomposition of the final ``resid_post``.
        method, convention: scoring method and lens convention.
        layers, attention_subvalues, ffn_neurons: score tables (columns of :mod:`tl_residual.scorers`).
        cache: the TransformerLens ``ActivationCache`` of the run (not serialised), for further analysis, e.g.
            ``flow_graph(model, explanation.cache)``.
        extra: free-form additions (not serialised).
    """

    model: str
    prompt: str
    tokens: list[str]
    position: int
    target: int
    target_token: str
    target_prob: float
    predictions: list[tuple[str, float]]
    decomposition_rel_error: float
    method: str
    convention: str
    layers: pd.DataFrame
    attention_subvalues: pd.DataFrame
    ffn_neurons: pd.DataFrame
    cache: Any = field(default=None, repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the schema of ``tl-residual explain --json``)."""

        def records(df: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
            out = []
            for row in df.sort_values("score", ascending=False, kind="stable").itertuples(index=False):
                rec = {k: getattr(row, k) for k in keys}
                rec = {k: (int(v) if k in ("layer", "head", "src_pos", "neuron") else v) for k, v in rec.items()}
                rec["score"] = float(row.score)
                if "coefficient" in keys:
                    rec["coefficient"] = float(row.coefficient)
                rec["top_tokens"] = list(row.top_tokens)
                out.append(rec)
            return out

        return {
            "model": self.model,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "position": self.position,
            "target_token": self.target_token,
            "target_id": self.target,
            "target_prob": self.target_prob,
            "predictions": [{"token": t, "prob": p} for t, p in self.predictions],
            "decomposition_rel_error": self.decomposition_rel_error,
            "method": self.method,
            "convention": self.convention,
            "units": {"score": self.ffn_neurons.attrs.get("units") or self.method},
            "layers": records(self.layers, ["name", "layer", "kind", "score"]),
            "attention_subvalues": records(
                self.attention_subvalues, ["name", "layer", "head", "src_pos", "score", "coefficient"]
            ),
            "ffn_neurons": records(self.ffn_neurons, ["name", "layer", "neuron", "score", "coefficient"]),
        }

    def _repr_html_(self) -> str:
        head = (
            f"<p><b>{html.escape(self.model)}</b>: {html.escape(repr(self.prompt))} &rarr; "
            f"<b>{html.escape(repr(self.target_token))}</b> (p = {self.target_prob:.3f}); decomposition relative "
            f"error {self.decomposition_rel_error:.1e}; scores: {html.escape(self.method)}, "
            f"{html.escape(self.convention)} lens</p>"
        )
        parts = [head]
        for title, df in (
            ("Layers", self.layers.head(10)),
            ("Attention subvalues (head x source position)", self.attention_subvalues),
            ("FFN neurons", self.ffn_neurons),
        ):
            if "top_tokens" in df:  # one readable cell per row instead of a Python list
                df = df.assign(top_tokens=[" ".join(repr(t) for t in tt) for tt in df["top_tokens"]])
            parts.append(f"<h4>{title}</h4>" + df.to_html(index=False, float_format=lambda x: f"{x:.4f}"))
        parts.append(
            "<p><i>Flow graph and plots: <code>tl_residual.visualize.write_report(model, explanation, "
            "'report.html')</code> or <code>flow_graph(model, explanation.cache)</code>.</i></p>"
        )
        return "\n".join(parts)


#: Above this many bytes of subvalue directions (``n_layers * n_heads * (position + 1) * d_model`` floats), the
#: subvalue top-k is searched one layer at a time and merged: the same exact top-k, peak memory one layer's parts.
STREAM_BYTES = 256 * 2**20


def _top_subvalues(ctx: Any, method: str, top_k: int) -> pd.DataFrame:
    """The exact top-k subvalues of all layers; for long prompts layer by layer (one layer's directions in memory,
    ``n_heads * (position + 1) * d_model`` floats), merged. The global top-k is contained in the union of the
    per-layer top-ks; a stable sort in layer order keeps the tie-breaking of the one-shot search."""
    spec = tlm.model_spec(ctx.model)
    size = 4 * spec.n_layers * spec.n_heads * (ctx.position + 1) * spec.d_model
    if size <= STREAM_BYTES:
        return score(ctx, "attn_subvalue", method, top_k)
    frames = [score(ctx, "attn_subvalue", method, top_k, layers=[layer]) for layer in range(spec.n_layers)]
    df = pd.concat(frames, ignore_index=True).sort_values("score", ascending=False, kind="stable")
    df = df.head(top_k).reset_index(drop=True)
    df.attrs.update(frames[0].attrs)
    for key in ("n_scored", "n_candidates"):
        if all(key in f.attrs for f in frames):
            df.attrs[key] = sum(int(f.attrs[key]) for f in frames)
    return df


def explain(
    model: Any,
    prompt: str,
    target: int | str | None = None,
    position: int = -1,
    top_k: int = DEFAULT_TOP_K,
    method: str = "log_prob_increase",
    convention: Convention = "frozen",
    model_name: str | None = None,
) -> Explanation:
    """Run ``model`` on ``prompt`` and attribute the prediction at ``position`` to layers, subvalues and neurons.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` with a tokenizer.
        prompt: the text (non-empty).
        target: the token to explain (one token: ``" Paris"`` or an id); default the model's top-1.
        position: destination position (default ``-1``, the last token).
        top_k: rows in the subvalue and neuron tables.
        method: a registered scorer (:data:`tl_residual.scorers.SCORERS`).
        convention: lens convention (``frozen``, ``recomputed``, ``none``).
        model_name: label for the output (default ``model.cfg.model_name``).

    Memory: one forward pass caching only the hooks position ``position`` needs, with the attention pattern's
    row ``position`` only (:func:`tl_residual.model.run_with_position_cache`): linear in the prompt length
    and the subvalue search streams one layer at a time for long prompts (:data:`STREAM_BYTES`); SmolLM2-135M,
    2,048 tokens: see the measured peak in docs/performance.md. ``extra["cache"]`` is
    that :class:`~tl_residual.model.PositionCache`: reading it at another destination position raises
    :class:`~tl_residual.errors.MissingHookError`. With registered sources every hook is cached.

    Raises:
        InvalidInputError: empty prompt, a prompt longer than the model's ``n_ctx``, a target that is not one
            token (or unknown to the tokenizer), a position out of range, bad top_k, a non-finite activation.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError("the prompt is empty: give some text, e.g. 'The capital of France is'")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
    tlm.model_spec(model)
    tokens = tlm.to_tokens(model, prompt)
    pos = resolve_position(position, int(tokens.shape[-1]))
    if SOURCES:  # a registered source may read any hook: cache them all (memory quadratic in the prompt length)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
    else:  # only the hooks position `pos` needs, the attention pattern's row `pos` only: memory linear
        cache = tlm.run_with_position_cache(model, tokens, pos)
    token_texts = [tlm.decode(model, t) for t in tokens[0].tolist()] if getattr(model, "tokenizer", None) else None
    ctx = make_context(model, cache, target, pos, convention=convention, tokens=token_texts)
    logits = model_logits(model, cache, ctx.position)
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, 5)
    n_layers = tlm.n_layers(model)
    explanation = Explanation(
        model=model_name or tlm.model_name(model),
        prompt=prompt,
        tokens=[ctx.lens.token_str(t) for t in tokens[0].tolist()],
        position=ctx.position,
        target=ctx.target,
        target_token=ctx.lens.token_str(ctx.target),
        target_prob=float(probs[ctx.target]),
        predictions=[(ctx.lens.token_str(t), float(p)) for p, t in zip(top.values.tolist(), top.indices.tolist())],
        decomposition_rel_error=check_reconstruction(model, cache, n_layers - 1, ctx.position, "resid_post"),
        method=method,
        convention=convention,
        layers=score_layers(ctx, method),
        attention_subvalues=_top_subvalues(ctx, method, top_k),
        ffn_neurons=score(ctx, "ffn_neuron", method, top_k),
        cache=cache,
    )
    return explanation
