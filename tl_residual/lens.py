"""Vocabulary projection (logit lens): a vector's bs-values (before-softmax values) over the vocabulary.

Three conventions, chosen by name (residual-stream paper section 3.1, Eq. 11-15; neuron-level paper section 3.2,
Eq. 12; ``docs/logit_lens.md``):

``"frozen"`` (default, the authors' code)
    The final norm's scale is frozen at the value it had on the final residual at the chosen position
    (``ln_final.hook_scale``); LayerNorm models also subtract the vector's own mean; the norm's weight gamma is
    applied; the final norm's bias and ``b_U`` are not added; then ``W_U``. This is linear:
    ``z(x + v) = z(x) + z(v)`` (residual-stream paper Eq. 15; neuron-level paper Eq. 12).
``"recomputed"``
    The model's own head applied to each vector as a whole: the final norm recomputed from the vector
    (with its bias), ``W_U`` and ``b_U``. Applied to the final residual it gives the model's logits. Not linear.
``"none"``
    ``W_U`` as TransformerLens exposes it, no scale, no centring, no bias (residual-stream paper Eq. 11). With
    ``fold_ln=True`` TransformerLens has folded gamma into ``W_U``; without it, ``W_U`` is the raw unembedding.

Final logit soft-capping (Gemma-2, ``ModelSpec.logit_softcap = c``): the ``frozen`` and ``recomputed`` lenses apply
``c * tanh(z / c)`` to the logits ``z`` of the whole vector, as the model does, so the log-probabilities of the final
residual equal the model's and the log-probability increase ``log p(t | x + v) - log p(t | x)`` stays exact
(``z(x + v) = z(x) + z(v)`` before the cap). The capped lens is not additive in logits, so :attr:`Lens.linear` is
False there and the scorers score such models densely (:attr:`Lens.certifiable`). ``"none"`` stays uncapped.

Units: logits (nats before softmax). Probabilities from :func:`torch.softmax` over them.

The bs-value tables (``bs_values``, ``bs_minus_layers``, ``bs_minus_parts``, ``bs_trajectory``) live in
:mod:`tl_residual.bsvalues`; importing them from here still works.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import model as tlm
from tl_residual.decompose import n_positions, resolve_position
from tl_residual.errors import InvalidInputError

Convention = Literal["frozen", "recomputed", "none"]
CONVENTIONS: tuple[str, ...] = ("frozen", "recomputed", "none")

#: Rows projected per matmul against ``W_U``; peak extra memory is about ``chunk_size * d_vocab`` floats per
#: tensor a chunk function keeps.
DEFAULT_CHUNK_SIZE = 256


class Lens:
    """The vocabulary projection at one position of one cached prompt.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        cache: its ``ActivationCache`` (needs ``ln_final.hook_scale`` for ``"frozen"``).
        position: the position whose final-norm scale is frozen (default: last).
        batch: which prompt of a batched cache.
        convention: ``"frozen"``, ``"recomputed"`` or ``"none"``.

    Raises:
        InvalidInputError: an unknown convention or a bad position.
        MissingHookError: the cache lacks ``ln_final.hook_scale``.
    """

    def __init__(
        self, model: Any, cache: Any, position: int = -1, batch: int = 0, convention: Convention = "frozen"
    ) -> None:
        if convention not in CONVENTIONS:
            raise InvalidInputError(f"lens convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
        spec = tlm.model_spec(model)
        self.convention: Convention = convention
        self.position = resolve_position(position, n_positions(cache))
        self.center = spec.final_norm == "LN"
        self.softcap = spec.logit_softcap if convention != "none" else 0.0
        self.W_U: Float[Tensor, "d_model d_vocab"] = tlm.W_U(model)
        self.b_U: Float[Tensor, " d_vocab"] = tlm.b_U(model)
        self.gamma: Float[Tensor, " d_model"] = tlm.norm_weight(model, "final")
        self.beta: Float[Tensor, " d_model"] = tlm.norm_bias(model, "final")
        self.eps = spec.eps
        self.scale = float(tlm.cached(cache, tlm.hook_name("final_scale"), batch)[self.position].reshape(-1)[0])
        self.tokenizer = getattr(model, "tokenizer", None)
        self._model = model

    @property
    def linear(self) -> bool:
        """True where ``logits(x + v) = logits(x) + logits(v)``: ``frozen`` and ``none`` without soft-capping."""
        return self.convention != "recomputed" and not self.softcap

    @property
    def certifiable(self) -> bool:
        """Whether the certified top-k bounds of :mod:`tl_residual.topk` hold for this lens (not under final logit
        soft-capping, where scorers fall back to dense scoring)."""
        return not self.softcap

    def cap(self, z: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "... d_vocab"]:
        """The final soft-capping ``c * tanh(z / c)`` (identity without soft-capping), logits."""
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def _centred(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The first step of the ``frozen`` linear map: ``v`` centred for LayerNorm (as is for RMSNorm).

        Raises:
            InvalidInputError: for ``"recomputed"``, which is not linear.
        """
        if self.convention == "recomputed":
            raise InvalidInputError("the 'recomputed' lens is not linear; use logits() on whole vectors")
        return v - v.mean(dim=-1, keepdim=True) if self.center else v

    def transform(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The linear map applied before ``W_U`` (``frozen``: centre for LayerNorm, times gamma / scale).

        Raises:
            InvalidInputError: for ``"recomputed"``, which is not linear.
        """
        if self.convention == "none":
            return v
        return self._centred(v) * (self.gamma / self.scale)

    @property
    def prompt_factor(self) -> float:
        """The part of :meth:`transform` that depends on the prompt: ``1 / scale`` (``frozen``), ``1`` (``none``).
        ``transform(v) = prompt_free_transform(v) * prompt_factor`` (up to float rounding), so a direction's
        logits ``prompt_free_transform(w) @ W_U`` serve every prompt of the same model (neuron-level paper Eq. 12:
        the frozen scale is one number per prompt and position)."""
        if self.convention == "recomputed":
            raise InvalidInputError("the 'recomputed' lens is not linear; it has no prompt factor")
        return 1.0 if self.convention == "none" else 1.0 / self.scale

    def prompt_free_transform(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """:meth:`transform` without the prompt's frozen scale: centre (LayerNorm), times gamma (``frozen``);
        identity (``none``).

        Raises:
            InvalidInputError: for ``"recomputed"``, which is not linear.
        """
        if self.convention == "none":
            return v
        return self._centred(v) * self.gamma

    def transform_transpose(self, g: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Adjoint of :meth:`transform`: ``transform(v) . g == v . transform_transpose(g)``."""
        if self.convention == "none":
            return g
        g = g * (self.gamma / self.scale)
        if self.center:
            g = g - g.mean(dim=-1, keepdim=True)
        return g

    def normalize(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The final norm recomputed on ``v`` itself (with gamma and beta)."""
        if self.center:
            v = v - v.mean(dim=-1, keepdim=True)
        scale = (v.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
        return v / scale * self.gamma + self.beta

    def logits(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """bs-values of ``v`` over the vocabulary under this lens's convention (logits)."""
        v = v.float()
        if self.convention == "recomputed":
            return self.cap(self.normalize(v) @ self.W_U + self.b_U)
        return self.cap(self.transform(v) @ self.W_U)

    def log_probs(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """``log softmax(logits(v))`` (nats)."""
        return torch.log_softmax(self.logits(v), dim=-1)

    def token_str(self, token: int) -> str:
        """A token id as text (``repr``-free; the raw decoded string)."""
        if self.tokenizer is None:
            return f"<{token}>"
        text = self.tokenizer.decode([int(token)])
        return text if "\ufffd" not in text else _partial_bytes(self.tokenizer, int(token), text)

    def top_tokens(self, v: Float[Tensor, " d_model"], k: int = 5, largest: bool = True) -> list[str]:
        """The ``k`` tokens with the largest (or smallest) bs-values of ``v``."""
        ids = torch.topk(self.logits(v), k, largest=largest).indices.tolist()
        return [self.token_str(t) for t in ids]


def stacked_logits(
    lenses: list[Lens], vectors: list[Float[Tensor, "n_i d_model"]], chunk_size: int = 1024
) -> list[Float[Tensor, "n_i d_vocab"]]:
    """``lenses[i].logits(vectors[i])`` for every ``i`` (logits): where every lens is linear and they share one
    ``W_U`` (the prompts of one batch), each lens's :meth:`Lens.transform` is applied to its own rows and all rows
    go through ``W_U`` together, ``chunk_size`` rows per matmul (fewer, larger products); otherwise one call each.
    Same values as the separate calls up to float32 rounding of the matmul."""
    if not lenses:
        return []
    W_U = lenses[0].W_U
    shared = all(
        lens.linear and lens.W_U.data_ptr() == W_U.data_ptr() and lens.W_U.shape == W_U.shape for lens in lenses
    )
    if not shared:
        return [lens.logits(v) for lens, v in zip(lenses, vectors)]
    rows = torch.cat([lens.transform(v.float()) for lens, v in zip(lenses, vectors)])
    z = map_chunks(lambda sl: rows[sl] @ W_U, rows.shape[0], chunk_size)
    return list(torch.split(z, [v.shape[0] for v in vectors]))  # type: ignore[arg-type]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for byte in range(256):
        if byte not in bs:
            bs.append(byte)
            cs.append(256 + n)
            n += 1
    return {chr(c): byte for byte, c in zip(bs, cs)}


def _partial_bytes(tokenizer: Any, token: int, text: str) -> str:
    """A token that is part of a UTF-8 character (``decode`` gives U+FFFD): its bytes, e.g. ``' \\xe2\\x80'`` for a
    byte-level BPE token, else the tokenizer's own piece (e.g. ``<0xE2>``)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(piece, str):
        return text
    table = _byte_decoder()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return piece


def model_logits(model: Any, cache: Any, position: int = -1, batch: int = 0) -> Float[Tensor, " d_vocab"]:
    """The model's own next-token logits at ``position``, recomputed from the cached final residual.

    Equal to the model's forward output (to float precision) for the architectures :func:`model_spec` accepts.
    """
    spec = tlm.model_spec(model)
    lens = Lens(model, cache, position, batch, "recomputed")
    resid = tlm.cached(cache, tlm.hook_name("resid_post", spec.n_layers - 1), batch)[lens.position]
    return lens.logits(resid)


def resolve_target(model: Any, target: Any, logits: Float[Tensor, " d_vocab"] | None = None) -> int:
    """A target token id from an id, a one-token string, or ``None`` (the top-1 of ``logits``).

    Ids may be a Python ``int``, a NumPy integer or a 0-d (or one-element) integer tensor. With ``logits``, a
    string without a leading space whose spaced form (``"Paris"`` vs ``" Paris"``) is at least 10x more likely
    gets a hint (a ``UserWarning``): most words inside a sentence are the spaced tokens.

    Raises:
        InvalidInputError: a string that is not exactly one token (the message lists its tokens), a word the
            tokenizer does not know (it would become the unknown token), an id out of range, a non-integer id
            (a float, a bool), or ``None`` without logits.
    """
    d_vocab = tlm.d_vocab(model)
    if target is None:
        if logits is None:
            raise InvalidInputError("no target given and no logits to take the top-1 prediction from")
        if not bool(torch.isfinite(logits).all()):
            raise InvalidInputError("the model's logits are not finite (nan/inf): no top-1 prediction to explain")
        return int(logits.argmax())
    if isinstance(target, Tensor):
        if target.numel() != 1 or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InvalidInputError(
                f"a target tensor must hold one integer token id, got shape {tuple(target.shape)} {target.dtype}"
            )
        target = int(target.item())
    if isinstance(target, (bool, np.bool_)):
        raise InvalidInputError(f"target must be a token id or a string, got {target!r}")
    if isinstance(target, np.integer):
        target = int(target)
    if isinstance(target, int):
        if not 0 <= target < d_vocab:
            raise InvalidInputError(f"target token id {target} is out of range (0..{d_vocab - 1})")
        return target
    if not isinstance(target, str) or target == "":
        raise InvalidInputError(
            f"target must be a non-empty string or an integer token id (int, NumPy integer, 0-d tensor), got "
            f"{target!r} of type {type(target).__name__}"
        )
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InvalidInputError("the model has no tokenizer: give the target as a token id")
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise InvalidInputError(
            f"target {target!r} is {len(ids)} tokens {pieces!r}, not one; give a single token "
            f"(mind the leading space, e.g. ' Paris') or a token id"
        )
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    if unk_id is not None and int(ids[0]) == int(unk_id) and target != unk:
        raise InvalidInputError(
            f"target {target!r} is not in the vocabulary: the tokenizer maps it to the unknown token {unk!r} "
            f"(id {unk_id}); give a word the tokenizer knows or a token id"
        )
    if logits is not None and not target.startswith((" ", "\u0120")):
        spaced = tokenizer.encode(" " + target, add_special_tokens=False)
        if len(spaced) == 1 and int(spaced[0]) != int(ids[0]):
            logp = torch.log_softmax(logits.float(), -1)
            gap = float(logp[int(spaced[0])] - logp[int(ids[0])])
            if gap > math.log(10.0):
                warnings.warn(
                    f"hint: target {target!r} (id {int(ids[0])}) has no leading space; ' {target}' (id "
                    f"{int(spaced[0])}) is {math.exp(min(gap, 700.0)):.3g}x more likely here. Inside a sentence "
                    f"words are usually the spaced tokens: use target=' {target}'",
                    UserWarning,
                    stacklevel=2,
                )
    return int(ids[0])


def target_rank(logits: Float[Tensor, "n d_vocab"], target: int | Tensor) -> Float[Tensor, " n"]:
    """Rank of ``target`` in each row of ``logits``: 1 + the number of tokens with a strictly larger value
    (1 = top; ties counted in the target's favour). ``target`` is one id or one id per row. Returned as float."""
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1, 1)
    t = t.expand(logits.shape[0], 1) if t.shape[0] == 1 else t
    return 1.0 + (logits > logits.gather(-1, t)).sum(-1).float()


def map_chunks(fn: Callable[[slice], Any], n: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor | tuple[Tensor, ...]:
    """The one chunk loop: ``fn(rows)`` for consecutive slices of ``range(n)`` of ``chunk_size`` rows, results
    concatenated along the first dimension (elementwise when ``fn`` returns a tuple of tensors). Callers project a
    chunk on the vocabulary inside ``fn``, so peak extra memory is a few ``chunk_size * d_vocab`` floats."""
    outs = [fn(slice(s, s + chunk_size)) for s in range(0, n, chunk_size)]
    if not outs:
        return torch.zeros(0)
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


_MOVED_TO_BSVALUES = ("token_ids", "bs_values", "bs_minus_layers", "bs_minus_parts", "bs_trajectory")


def __getattr__(name: str) -> Any:
    """Compatibility: the bs-value tables moved to :mod:`tl_residual.bsvalues`."""
    if name in _MOVED_TO_BSVALUES:
        import tl_residual.bsvalues as bsvalues  # noqa: PLC0415 - lazy: bsvalues imports this module

        return getattr(bsvalues, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
