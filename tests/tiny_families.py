"""Tiny random-weight models of the decoder-only families TransformerLens loads, built offline.

Each family is a ``transformers`` config (2 layers, d_model 64, the 61-word tokenizer of ``conftest``; one builder,
:func:`_config`, over a table of how each config class names the shared sizes) and the real Hugging Face repo id
TransformerLens keys its adapters on. Two ways to wrap it:

* :func:`bridge` — ``TransformerBridge.boot_transformers(repo_id, hf_model=..., tokenizer=...)`` (TransformerLens
  4.x; also in 3.x), optionally in compatibility mode (TransformerLens' weight processing).
* :func:`hooked` — a TransformerLens 3.x ``HookedTransformer`` through TransformerLens' own loading code: the HF
  config is saved to a temporary folder, ``loading_from_pretrained.get_pretrained_model_config`` converts it (so the
  flags are the real ones) and ``get_pretrained_state_dict(hf_model=...)`` converts the weights; with or without
  ``fold_ln`` / ``center_writing_weights`` / ``fold_value_biases``. Families TL3 converts only for the official
  repo id (Gemma 1/2/3, OLMo 1/2; Phi, whose conversion fails on a ``transformers`` 5 config) get TL3's config for
  that id with the sizes shrunk (:func:`_named_config`).

``FAMILIES`` is a registry (name -> :class:`Family`) of the dense families; ``MOE_FAMILIES`` holds the
mixture-of-experts ones (4 experts, top-2), built by the same functions (``tests/test_moe.py``). Every model is
built once per session (``lru_cache``). A family whose config class is missing from the installed ``transformers``
raises ``pytest.skip`` with the reason.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from conftest import HAS_BRIDGE, HAS_HOOKED, VOCAB, _randomize, tiny_tokenizer

D_MODEL, N_HEADS, N_LAYERS, D_MLP, N_CTX = 64, 4, 2, 256, 32  # d_mlp = 4 d_model: TL3 assumes it for GPT-Neo/J
N_EXPERTS, TOP_K, D_EXPERT, D_SHARED = 4, 2, 32, 48  # the mixture-of-experts families: experts, top-k, sizes
COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

#: How each kind of ``transformers`` config names the shared sizes (d_model, n_layers, n_heads, d_mlp, n_ctx);
#: ``None``: the config has no such keyword (BLOOM: d_mlp = 4 d_model, ALiBi).
SIZE_KEYS: dict[str, tuple[str | None, ...]] = {
    "hf": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings"),
    "gpt2": ("n_embd", "n_layer", "n_head", "n_inner", "n_positions"),
    "gpt-neo": ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"),
    "opt": ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings"),
    "bloom": ("hidden_size", "n_layer", "n_head", None, None),
}


def _config(cls: str, keys: str = "hf", **extra: Any) -> Callable[[Any], Any]:
    """``transformers`` module -> config ``cls`` with the shared sizes under the names of ``keys``, plus ``extra``."""
    sizes = (D_MODEL, N_LAYERS, N_HEADS, D_MLP, N_CTX)
    kw = {k: v for k, v in zip(SIZE_KEYS[keys], sizes) if k is not None} | COMMON | extra
    return lambda tf: getattr(tf, cls)(**kw)


def _llama_like(cls: str, **extra: Any) -> Callable[[Any], Any]:
    """The Llama-style configs (grouped-query attention, untied unembedding); ``extra`` overrides."""
    return _config(cls, **{"num_key_value_heads": 2, "tie_word_embeddings": False, **extra})


def _moe(cls: str, **extra: Any) -> Callable[[Any], Any]:
    """A mixture-of-experts config: Llama-style, ``N_EXPERTS`` experts of ``D_EXPERT`` neurons, top-``TOP_K``."""
    return _llama_like(cls, max_position_embeddings=64, num_experts_per_tok=TOP_K, **extra)


def _neox(parallel: bool) -> Callable[[Any], Any]:
    """GPT-NeoX / Pythia: the same config with parallel or sequential attention+MLP blocks."""
    return _config("GPTNeoXConfig", rotary_pct=0.25, use_parallel_residual=parallel, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    """One family: ``config`` builds its HF config (``transformers`` module -> config), ``repo`` is the real repo id.

    ``features`` lists the architecture facts tests check against ``model_spec`` (e.g. ``parallel``, ``post_norm``,
    ``softcap``, ``embed_norm``); ``no_hooked`` says why, where TransformerLens 3.x has no loader for the family;
    ``named`` is True where TransformerLens 3.x converts the config only for the official repo name (fixed,
    full-size configs: Gemma 1/2/3, OLMo 1/2) or fails on the local config (Phi): see :func:`_named_config`.
    ``seed`` seeds the random weights (``conftest._randomize``).
    """

    config: Callable[[Any], Any]
    repo: str
    model_class: str = "AutoModelForCausalLM"
    features: frozenset[str] = field(default_factory=frozenset)
    no_hooked: str = ""
    named: bool = False
    seed: int = 0


FAMILIES: dict[str, Family] = {
    "gpt2": Family(_config("GPT2Config", "gpt2", n_ctx=N_CTX), "gpt2"),
    "gpt-neo": Family(
        _config("GPTNeoConfig", "gpt-neo", attention_types=[[["global", "local"], 1]], window_size=4),
        "EleutherAI/gpt-neo-125M",
    ),
    "gpt-j": Family(
        _config("GPTJConfig", "gpt2", rotary_dim=8, tie_word_embeddings=False),
        "EleutherAI/gpt-j-6B",
        features=frozenset({"parallel"}),
    ),
    "pythia": Family(_neox(parallel=True), "EleutherAI/pythia-70m", features=frozenset({"parallel"})),
    "neox-sequential": Family(_neox(parallel=False), "EleutherAI/pythia-70m"),
    "opt": Family(_config("OPTConfig", "opt", word_embed_proj_dim=D_MODEL), "facebook/opt-125m"),
    "bloom": Family(_config("BloomConfig", "bloom"), "bigscience/bloom-560m", features=frozenset({"embed_norm"})),
    "llama2": Family(_llama_like("LlamaConfig", num_key_value_heads=N_HEADS), "meta-llama/Llama-2-7b-hf"),
    "llama3": Family(
        _llama_like(
            "LlamaConfig",
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "meta-llama/Llama-3.2-1B",
    ),
    "mistral": Family(_llama_like("MistralConfig", sliding_window=None), "mistralai/Mistral-7B-v0.1"),
    "qwen2": Family(_llama_like("Qwen2Config"), "Qwen/Qwen2-0.5B"),
    "qwen3": Family(_llama_like("Qwen3Config", head_dim=D_MODEL // N_HEADS), "Qwen/Qwen3-0.6B"),
    "gemma": Family(_llama_like("GemmaConfig", head_dim=D_MODEL // N_HEADS), "google/gemma-2b", named=True),
    "gemma2": Family(
        _llama_like(
            "Gemma2Config",
            head_dim=D_MODEL // N_HEADS,
            sliding_window=4,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=D_MODEL // N_HEADS,  # = head_dim, as in the real model (TL3 scales by d_head)
        ),
        "google/gemma-2-2b",
        features=frozenset({"post_norm", "softcap"}),
        named=True,
    ),
    "gemma3": Family(
        _llama_like(
            "Gemma3TextConfig", head_dim=D_MODEL // N_HEADS, sliding_window=4, query_pre_attn_scalar=D_MODEL // N_HEADS
        ),
        "google/gemma-3-1b-pt",
        model_class="Gemma3ForCausalLM",
        features=frozenset({"post_norm"}),
        named=True,
    ),
    "phi": Family(
        _config("PhiConfig", partial_rotary_factor=0.5), "microsoft/phi-2", features=frozenset({"parallel"}), named=True
    ),
    "phi3": Family(_llama_like("Phi3Config", num_key_value_heads=N_HEADS), "microsoft/Phi-3-mini-4k-instruct"),
    "olmo": Family(_llama_like("OlmoConfig", num_key_value_heads=N_HEADS), "allenai/OLMo-1B-hf", named=True),
    "olmo2": Family(
        _llama_like("Olmo2Config", num_key_value_heads=N_HEADS, rope_theta=500000.0, rms_norm_eps=1e-6),  # as TL3
        "allenai/OLMo-2-0425-1B",
        features=frozenset({"post_norm"}),
        named=True,
    ),
    "olmo3": Family(
        _llama_like("Olmo3Config", num_key_value_heads=N_HEADS, sliding_window=4),
        "allenai/Olmo-3-1025-7B",
        features=frozenset({"post_norm"}),
    ),
    "stablelm": Family(
        _llama_like("StableLmConfig", num_key_value_heads=N_HEADS, partial_rotary_factor=0.25),
        "stabilityai/stablelm-2-1_6b",
        no_hooked="TransformerLens 3.x's convert_hf_model_config has no StableLmForCausalLM branch and "
        "stablelm-2 is not among its official model names (its StableLM entries are the GPT-NeoX stablelm-alpha)",
    ),
}

_NO_MOE_LOADER = "TransformerLens 3.x has no HookedTransformer loader"

#: The mixture-of-experts families (issue 11, item 5; ``tests/test_moe.py``): a registry of their own, so the dense
#: family tests and the architectures table do not take them up. Qwen2-MoE adds a sigmoid-gated shared expert;
#: ``intermediate_size`` 96 is the Qwen configs' dense-MLP size (unused: every layer is sparse).
MOE_FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        _moe("MixtralConfig", num_local_experts=N_EXPERTS, intermediate_size=D_EXPERT),
        "mistralai/Mixtral-8x7B-v0.1",
        model_class="MixtralForCausalLM",
        seed=1,
    ),
    "olmoe": Family(
        _moe("OlmoeConfig", num_experts=N_EXPERTS, intermediate_size=D_EXPERT, norm_topk_prob=False),
        "allenai/OLMoE-1B-7B-0924",
        model_class="OlmoeForCausalLM",
        seed=1,
    ),
    "qwen2_moe": Family(
        _moe(
            "Qwen2MoeConfig",
            num_experts=N_EXPERTS,
            moe_intermediate_size=D_EXPERT,
            intermediate_size=96,
            shared_expert_intermediate_size=D_SHARED,
            norm_topk_prob=False,
        ),
        "Qwen/Qwen1.5-MoE-A2.7B",
        model_class="Qwen2MoeForCausalLM",
        no_hooked=_NO_MOE_LOADER,
        seed=1,
    ),
    "qwen3_moe": Family(
        _moe(
            "Qwen3MoeConfig",
            num_experts=N_EXPERTS,
            moe_intermediate_size=D_EXPERT,
            intermediate_size=96,
            norm_topk_prob=True,
        ),
        "Qwen/Qwen3-30B-A3B",
        model_class="Qwen3MoeForCausalLM",
        no_hooked=_NO_MOE_LOADER,
        seed=1,
    ),
}


def family(name: str) -> Family:
    """The :class:`Family` called ``name``, dense (``FAMILIES``) or mixture-of-experts (``MOE_FAMILIES``)."""
    return FAMILIES[name] if name in FAMILIES else MOE_FAMILIES[name]


@functools.cache
def hf_model(name: str) -> Any:
    """The random Hugging Face model of family ``name`` (cached; skips if ``transformers`` lacks the config)."""
    import transformers

    fam = family(name)
    try:
        cfg = fam.config(transformers)
        cls = getattr(transformers, fam.model_class)
    except AttributeError as exc:  # config class missing in this transformers version
        pytest.skip(f"{name}: {exc}")
    cfg._attn_implementation = "eager"
    torch.manual_seed(fam.seed)
    model = cls.from_config(cfg) if fam.model_class.startswith("Auto") else cls(cfg)
    model.config.architectures = [type(model).__name__]  # TransformerLens picks its adapter from this
    _randomize(model, fam.seed)
    return model.eval()


@functools.cache
def bridge(name: str, compat: bool = False) -> Any:
    """``TransformerBridge`` around :func:`hf_model` (``compat``: ``enable_compatibility_mode``, weights processed)."""
    if not HAS_BRIDGE:
        pytest.skip("TransformerBridge is not in this TransformerLens version")
    from transformer_lens.model_bridge import TransformerBridge

    hf = copy.deepcopy(hf_model(name))  # the bridge takes the HF modules over: one copy per bridge
    model = TransformerBridge.boot_transformers(family(name).repo, hf_model=hf, tokenizer=tiny_tokenizer())
    if compat:
        model.enable_compatibility_mode(disable_warnings=True)
    return model.eval()


def _shrink(cfg: dict[str, Any], hf_cfg: Any) -> dict[str, Any]:
    """A full-size TransformerLens config dict resized to the tiny HF model: every flag kept, only sizes changed."""
    cfg = dict(cfg)
    d_head = getattr(hf_cfg, "head_dim", None) or D_MODEL // N_HEADS
    if "rotary_dim" in cfg:  # keep the rotary fraction of the head
        cfg["rotary_dim"] = round(cfg["rotary_dim"] * d_head / cfg["d_head"])
    cfg.update(n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, d_head=d_head, d_mlp=D_MLP, d_vocab=VOCAB)
    cfg["n_ctx"] = N_CTX
    if "n_key_value_heads" in cfg:
        cfg["n_key_value_heads"] = hf_cfg.num_key_value_heads
    if "attn_types" in cfg:
        cfg["attn_types"] = cfg["attn_types"][:N_LAYERS]
    if "window_size" in cfg:
        cfg["window_size"] = hf_cfg.sliding_window  # 4: the local layers really mask within the 6-token prompt
    return cfg


def _named_config(name: str, processed: bool) -> Any:
    """TransformerLens 3.x's own ``get_pretrained_model_config`` for the official repo name, offline.

    Its ``convert_hf_model_config`` fetches the hub config (OLMo, Phi) through ``AutoConfig.from_pretrained``: that
    call returns the tiny HF config instead. Phi: TL3 reads ``hf_config.partial_rotary_factor``, which
    ``transformers`` 5 keeps in ``rope_parameters``; it is set on (a copy of) the config object. The fixed,
    full-size configs (Gemma 1/2/3, OLMo 1/2) are resized by :func:`_shrink`; everything else is TL3's.
    """
    from unittest import mock

    from transformer_lens import loading_from_pretrained as lfp

    hf_cfg = copy.deepcopy(hf_model(name).config)
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if "partial_rotary_factor" in rope and not hasattr(hf_cfg, "partial_rotary_factor"):
        hf_cfg.partial_rotary_factor = rope["partial_rotary_factor"]
    convert = lfp.convert_hf_model_config
    with (
        mock.patch.object(lfp.AutoConfig, "from_pretrained", lambda *a, **k: hf_cfg),
        mock.patch.object(lfp, "convert_hf_model_config", lambda *a, **k: _shrink(convert(*a, **k), hf_cfg)),
    ):
        return lfp.get_pretrained_model_config(
            family(name).repo, hf_cfg=hf_cfg.to_dict(), fold_ln=processed, device="cpu"
        )


@functools.cache
def hooked(name: str, processed: bool = False) -> Any:
    """A ``HookedTransformer`` of family ``name`` through TransformerLens' own config and weight conversion.

    ``processed``: ``fold_ln``, ``center_writing_weights`` and ``fold_value_biases``; for TL3's post-norm
    architectures (OLMo-2/3) ``fold_ln`` and ``center_writing_weights`` are turned off, as
    ``HookedTransformer.from_pretrained`` does (folding them there would build a different model).
    """
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer is not in this TransformerLens version")
    fam = family(name)
    if fam.no_hooked:
        pytest.skip(f"{name}: no HookedTransformer: {fam.no_hooked}")
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lfp

    hf = hf_model(name)
    if fam.named:
        cfg = _named_config(name, processed)
        state = lfp.get_pretrained_state_dict(fam.repo, cfg, hf_model=hf)
    else:
        folder = os.path.join(tempfile.mkdtemp(prefix="tlres-fam-"), "model")  # no family word: TL keys on names
        hf.config.save_pretrained(folder)
        try:
            cfg = lfp.get_pretrained_model_config(folder, hf_cfg=hf.config.to_dict(), fold_ln=processed, device="cpu")
        except NotImplementedError as exc:  # TL3 builds these families from fixed, name-keyed configs only
            pytest.skip(f"{name}: TransformerLens 3.x has no config-based HookedTransformer loader ({exc})")
        state = lfp.get_pretrained_state_dict(folder, cfg, hf_model=hf)
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    fold = processed and cfg.original_architecture not in POST_NORM_ARCHITECTURES
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=fold,
        center_writing_weights=fold,
        center_unembed=False,
        fold_value_biases=processed,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def variants(families: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """``(family, api, processed)`` triples: ``api`` is ``"bridge"`` or ``"hooked"``."""
    out = []
    for fam in families or list(FAMILIES):
        for api in ("bridge", "hooked"):
            for processed in (False, True):
                out.append((fam, api, processed))
    return out


def build(family: str, api: str, processed: bool) -> Any:
    """The model of one variant (cached)."""
    return bridge(family, processed) if api == "bridge" else hooked(family, processed)
