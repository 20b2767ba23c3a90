"""Vocabulary projection (logit lens): a vector's bs-values (before-softmax values) over the vocabulary.

Three conventions, chosen by name (REFERENCE.md, "Log-probability increase"):

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual import model as tlm
from tl_residual.decompose import n_positions, resolve_position
from tl_residual.errors import InvalidInputError

Convention = Literal["frozen", "recomputed", "none"]
CONVENTIONS: tuple[str, ...] = ("frozen", "recomputed", "none")


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

    def transform(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The linear map applied before ``W_U`` (``frozen``: centre for LayerNorm, times gamma / scale).

        Raises:
            InvalidInputError: for ``"recomputed"``, which is not linear.
        """
        if self.convention == "none":
            return v
        if self.convention == "recomputed":
            raise InvalidInputError("the 'recomputed' lens is not linear; use logits() on whole vectors")
        if self.center:
            v = v - v.mean(dim=-1, keepdim=True)
        return v * (self.gamma / self.scale)

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
        return tlm.decode(self._model, token)

    def top_tokens(self, v: Float[Tensor, " d_model"], k: int = 5, largest: bool = True) -> list[str]:
        """The ``k`` tokens with the largest (or smallest) bs-values of ``v``."""
        ids = torch.topk(self.logits(v), k, largest=largest).indices.tolist()
        return [self.token_str(t) for t in ids]


def model_logits(model: Any, cache: Any, position: int = -1, batch: int = 0) -> Float[Tensor, " d_vocab"]:
    """The model's own next-token logits at ``position``, recomputed from the cached final residual.

    Equal to the model's forward output (to float precision) for the architectures :func:`model_spec` accepts.
    """
    spec = tlm.model_spec(model)
    lens = Lens(model, cache, position, batch, "recomputed")
    resid = tlm.cached(cache, tlm.hook_name("resid_post", spec.n_layers - 1), batch)[lens.position]
    return lens.logits(resid)


def resolve_target(model: Any, target: int | str | None, logits: Float[Tensor, " d_vocab"] | None = None) -> int:
    """A target token id from an id, a one-token string, or ``None`` (the top-1 of ``logits``).

    Raises:
        InvalidInputError: a string that is not exactly one token (the message lists its tokens), an id out of
            range, or ``None`` without logits.
    """
    d_vocab = tlm.d_vocab(model)
    if target is None:
        if logits is None:
            raise InvalidInputError("no target given and no logits to take the top-1 prediction from")
        return int(logits.argmax())
    if isinstance(target, bool):
        raise InvalidInputError(f"target must be a token id or a string, got {target!r}")
    if isinstance(target, int):
        if not 0 <= target < d_vocab:
            raise InvalidInputError(f"target token id {target} is out of range (0..{d_vocab - 1})")
        return target
    if not isinstance(target, str) or target == "":
        raise InvalidInputError(f"target must be a non-empty string or a token id, got {target!r}")
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
    return int(ids[0])


# ----------------------------------------------------------------------------------------------
# bs-values of parts and vectors (residual-stream paper section 3.1, Figures 9 and 10)
# ----------------------------------------------------------------------------------------------


def token_ids(model: Any, tokens: Sequence[int | str]) -> list[int]:
    """Token ids of ``tokens`` (ids, or one-token strings such as ``" Paris"``), via :func:`resolve_target`.

    Raises:
        InvalidInputError: an empty list, or an entry that is not exactly one token or out of range.
    """
    if isinstance(tokens, (str, int)) or len(tokens) == 0:
        raise InvalidInputError(f"give a non-empty list of tokens, e.g. [' Paris', ' London'], got {tokens!r}")
    return [resolve_target(model, t) for t in tokens]


def _token_bs(lens: Lens, vectors: Float[Tensor, "n d_model"], ids: list[int]) -> Float[Tensor, "n k"]:
    """bs-values of ``vectors`` on the tokens ``ids`` only (``k`` columns of ``W_U``; no full projection)."""
    cols = lens.W_U[:, ids]
    if lens.convention == "recomputed":
        return lens.normalize(vectors.float()) @ cols + lens.b_U[ids]
    return lens.transform(vectors.float()) @ cols


def bs_values(
    model: Any,
    cache: Any,
    vectors: Any,
    target: int | str | None = None,
    position: int = -1,
    k: int = 5,
    convention: Convention = "frozen",
    batch: int = 0,
) -> pd.DataFrame:
    """Logit lens of parts or vectors: top and bottom tokens with their bs-values, the target's rank and probability.

    Residual-stream paper Eq. 11-15: a vector ``v``'s bs-values (before-softmax values) are its vocabulary
    projection under the lens ``convention`` (logits); its distribution is their softmax.

    Args:
        vectors: a :class:`~tl_residual.decompose.PartGroup` (rows named by its part names), a mapping
            ``name -> Float[Tensor, "d_model"]``, or a ``Float[Tensor, "n d_model"]`` / ``"d_model"`` tensor
            (rows named ``v0, v1, ...``).
        target: token to report (id or one-token string); default the model's top-1 at ``position``.
        k: how many top and bottom tokens.

    Returns:
        One row per vector: ``name``, ``top_tokens``, ``top_bs`` (logits), ``bottom_tokens``, ``bottom_bs``,
        ``target_bs``, ``target_rank`` (1 = largest bs-value), ``target_prob`` (probability under ``softmax(bs)``).
        Projections are chunked (256 rows against ``W_U`` at a time).

    Raises:
        InvalidInputError: bad position, target, ``k`` or ``vectors``.
    """
    from tl_residual.decompose import PartGroup

    if isinstance(vectors, PartGroup):
        names, mat = list(vectors.names), vectors.vectors
    elif isinstance(vectors, Mapping):
        names, mat = [str(n) for n in vectors], torch.stack([torch.as_tensor(v).float() for v in vectors.values()])
    elif isinstance(vectors, Tensor):
        mat = vectors[None] if vectors.dim() == 1 else vectors
        names = [f"v{i}" for i in range(mat.shape[0])]
    else:
        raise InvalidInputError(f"vectors must be a PartGroup, a dict of name -> vector or a tensor, got {type(vectors).__name__}")
    lens = Lens(model, cache, position, batch, convention)
    d_vocab = lens.W_U.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_vocab:
        raise InvalidInputError(f"k must be an integer in 1..{d_vocab}, got {k!r}")
    if mat.dim() != 2 or mat.shape[1] != lens.W_U.shape[0]:
        raise InvalidInputError(f"vectors must have d_model={lens.W_U.shape[0]} columns, got shape {tuple(mat.shape)}")
    t = resolve_target(model, target, model_logits(model, cache, lens.position, batch) if target is None else None)
    rows = []
    for start in range(0, mat.shape[0], 256):
        z = lens.logits(mat[start : start + 256])
        top, bottom = torch.topk(z, k, dim=-1), torch.topk(z, k, dim=-1, largest=False)
        z_t = z[:, t]
        rank = 1 + (z > z_t[:, None]).sum(-1)
        prob = torch.exp(z_t - torch.logsumexp(z, dim=-1))
        for i in range(z.shape[0]):
            rows.append({
                "name": names[start + i],
                "top_tokens": [lens.token_str(x) for x in top.indices[i].tolist()],
                "top_bs": top.values[i].tolist(),
                "bottom_tokens": [lens.token_str(x) for x in bottom.indices[i].tolist()],
                "bottom_bs": bottom.values[i].tolist(),
                "target_bs": float(z_t[i]),
                "target_rank": int(rank[i]),
                "target_prob": float(prob[i]),
            })
    df = pd.DataFrame(rows, columns=["name", "top_tokens", "top_bs", "bottom_tokens", "bottom_bs", "target_bs",
                                     "target_rank", "target_prob"])
    df.attrs.update(target=t, target_token=lens.token_str(t), position=lens.position, convention=convention)
    return df


def bs_minus_layers(
    model: Any,
    cache: Any,
    token_a: int | str,
    token_b: int | str,
    position: int = -1,
    convention: Convention = "frozen",
    with_bias: bool = True,
    batch: int = 0,
) -> pd.DataFrame:
    """bs-value minus score ``bs_a(v) - bs_b(v)`` of each layer-level part (residual-stream paper Figure 10).

    Rows: ``embed`` (the layer-0 input), then ``L{l}.attn`` (``hook_attn_out``) and ``L{l}.mlp``
    (``hook_mlp_out``) for every layer. ``with_bias=False`` removes ``b_O`` / ``b_out`` from each layer's output,
    as the paper's Figure 10 does. Under a linear lens the rows sum to the minus score of the final
    ``resid_post`` (with biases).

    Returns:
        Columns ``name``, ``layer`` (-1 for the embedding), ``kind`` (``embed``/``attn``/``mlp``), ``bs_a``,
        ``bs_b``, ``minus`` (logits). ``df.attrs`` holds the token ids and texts.

    Raises:
        InvalidInputError: a token that is not exactly one token, a bad position or convention.
    """
    from tl_residual.decompose import layer_outputs

    ids = token_ids(model, [token_a, token_b])
    lens = Lens(model, cache, position, batch, convention)
    parts = layer_outputs(model, cache, lens.position, batch)
    vecs = []
    for _, layer, kind, vec in parts:
        if not with_bias and kind == "attn":
            vec = vec - tlm.b_O(model, layer)
        elif not with_bias and kind == "mlp":
            vec = vec - tlm.b_out(model, layer)
        vecs.append(vec)
    bs = _token_bs(lens, torch.stack(vecs), ids)
    df = pd.DataFrame({
        "name": [p[0] for p in parts], "layer": [p[1] for p in parts], "kind": [p[2] for p in parts],
        "bs_a": bs[:, 0].numpy(), "bs_b": bs[:, 1].numpy(), "minus": (bs[:, 0] - bs[:, 1]).numpy(),
    })
    df.attrs.update(token_a=lens.token_str(ids[0]), token_b=lens.token_str(ids[1]), ids=ids, position=lens.position,
                    convention=convention, with_bias=with_bias)
    return df


def bs_minus_parts(
    model: Any,
    cache: Any,
    token_a: int | str,
    token_b: int | str,
    position: int = -1,
    layer: int = -1,
    stream: str = "resid_post",
    convention: Convention = "frozen",
    top_k: int | None = None,
    batch: int = 0,
) -> pd.DataFrame:
    """bs-value minus score ``bs_a - bs_b`` of every part (embeddings, head x position subvalues, FFN neurons,
    biases, registered sources) of ``blocks.{layer}.hook_{stream}[position]`` (residual-stream paper section 5.2,
    Appendix C: the FFN subvalues with the largest ``bs_Paris - bs_Bordeaux``).

    Streams the parts layer by layer (:func:`~tl_residual.decompose.iter_parts`); under a linear lens each part
    costs two dot products (``coefficient * T(direction) . (W_U[:, a] - W_U[:, b])``, no vocabulary projection),
    and the minus scores of all parts sum to that of the cached vector.

    Returns:
        Columns ``name``, ``kind``, ``layer``, ``head``, ``src_pos``, ``neuron``, ``coefficient``, ``bs_a``,
        ``bs_b``, ``minus`` (logits), sorted by ``minus``, largest first; the ``top_k`` largest if given.

    Raises:
        InvalidInputError: bad tokens, layer, position, stream, convention or ``top_k``.
    """
    from tl_residual.decompose import iter_parts

    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")
    ids = token_ids(model, [token_a, token_b])
    lens = Lens(model, cache, position, batch, convention)
    frames = []
    for g in iter_parts(model, cache, layer, lens.position, stream, batch):  # type: ignore[arg-type]
        if lens.linear:
            bs = g.coefficients[:, None] * _token_bs(lens, g.directions, ids)
        else:
            bs = _token_bs(lens, g.vectors, ids)

        index = {key: g.index[key].numpy() if key in g.index else -1 for key in ("head", "src_pos", "neuron")}
        frames.append(pd.DataFrame({
            "name": g.names, "kind": g.kind, "layer": -1 if g.layer is None else g.layer, **index,
            "coefficient": g.coefficients.numpy(),
            "bs_a": bs[:, 0].numpy(), "bs_b": bs[:, 1].numpy(), "minus": (bs[:, 0] - bs[:, 1]).numpy(),
        }, index=range(len(g))))
    df = pd.concat(frames, ignore_index=True).sort_values("minus", ascending=False, kind="stable")
    df = (df.head(top_k) if top_k is not None else df).reset_index(drop=True)
    df.attrs.update(token_a=lens.token_str(ids[0]), token_b=lens.token_str(ids[1]), ids=ids, position=lens.position,
                    convention=convention)
    return df


def bs_trajectory(
    model: Any,
    cache: Any,
    tokens: Sequence[int | str],
    position: int = -1,
    convention: Convention = "frozen",
    value: Literal["bs", "prob", "rank"] = "bs",
    batch: int = 0,
) -> pd.DataFrame:
    """The chosen tokens' bs-values along the residual stream ``Lin0, Lres0, Lout0, Lres1, ...`` (Figure 9).

    ``value="bs"`` gives bs-values (logits), ``"prob"`` the probabilities under ``softmax`` of each stream
    vector's bs-values, ``"rank"`` the tokens' ranks (1 = top). Under the default ``frozen`` lens the final-norm
    scale of the last residual is used for every row, so successive rows differ by exactly the bs-values of the
    layer-level part added (``bs(Lout_l) - bs(Lres_l) = bs(FFN_l)``); ``"recomputed"`` is the classic logit lens
    (each stream vector normalised by itself, ``b_U`` added).

    Returns:
        One row per stream vector: ``stream`` (``Lin0``, ``Lres0``, ``Lout0``, ...), ``layer``, then one column per
        token, named by its text (e.g. ``" Paris"``).

    Raises:
        InvalidInputError: bad tokens, position, convention or ``value``.
    """
    from tl_residual.decompose import residual_stream

    if value not in ("bs", "prob", "rank"):
        raise InvalidInputError(f"value {value!r} is not one of 'bs', 'prob', 'rank'")
    ids = token_ids(model, tokens)
    lens = Lens(model, cache, position, batch, convention)
    stream = residual_stream(model, cache, lens.position, batch)
    mat = torch.stack([v for _, v in stream])
    if value == "bs":
        out = _token_bs(lens, mat, ids)
    else:
        z = lens.logits(mat)
        if value == "prob":
            out = torch.softmax(z, dim=-1)[:, ids]
        else:
            out = (1 + (z[:, None, :] > z[:, ids][:, :, None]).sum(-1)).float()
    names = [n for n, _ in stream]
    df = pd.DataFrame({"stream": names, "layer": [int(n[3:] if n.startswith("Lin") else n[4:]) for n in names]})
    for j, t in enumerate(ids):
        df[lens.token_str(t)] = out[:, j].numpy()
    df.attrs.update(ids=ids, value=value, position=lens.position, convention=convention)
    return df
