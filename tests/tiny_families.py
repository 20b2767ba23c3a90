"""Tiny random-weight models of the decoder-only families TransformerLens loads, built offline.

Each family is a ``transformers`` config (2 layers, d_model 64, the 61-word tokenizer of ``conftest``) and the real
Hugging Face repo id TransformerLens keys its adapters on. Two ways to wrap it:

* :func:`bridge` — ``TransformerBridge.boot_transformers(repo_id, hf_model=..., tokenizer=...)`` (TransformerLens
  4.x; also in 3.x), optionally in compatibility mode (TransformerLens' weight processing).
* :func:`hooked` — a TransformerLens 3.x ``HookedTransformer`` through TransformerLens' own loading code: the HF
  config is saved to a temporary folder, ``loading_from_pretrained.get_pretrained_model_config`` converts it (so the
  flags are the real ones) and ``get_pretrained_state_dict(hf_model=...)`` converts the weights; with or without
  ``fold_ln`` / ``center_writing_weights`` / ``fold_value_biases``.

``FAMILIES`` is a registry (name -> :class:`Family`); the mixture-of-experts tests add theirs to it. Every model is
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

from conftest import HAS_BRIDGE, HAS_HOOKED, VOCAB, tiny_tokenizer

D_MODEL, N_HEADS, N_LAYERS, D_MLP, N_CTX = 64, 4, 2, 256, 32  # d_mlp = 4 d_model: TL3 assumes it for GPT-Neo/J
COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@dataclass(frozen=True)
class Family:
    """One family: ``config`` builds its HF config (``transformers`` module -> config), ``repo`` is the real repo id.

    ``features`` lists the architecture facts tests check against ``model_spec`` (e.g. ``parallel``, ``post_norm``,
    ``softcap``, ``embed_norm``); ``hooked`` is False where TransformerLens 3.x has no loader for the family.
    """

    config: Callable[[Any], Any]
    repo: str
    model_class: str = "AutoModelForCausalLM"
    features: frozenset[str] = field(default_factory=frozenset)
    hooked: bool = True


def _llama_like(cls: str, **extra: Any) -> Callable[[Any], Any]:
    def make(tf: Any) -> Any:
        kw = dict(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=2,
            max_position_embeddings=N_CTX,
            tie_word_embeddings=False,
            **COMMON,
        )
        kw.update(extra)
        return getattr(tf, cls)(**kw)

    return make


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        lambda tf: tf.GPT2Config(
            n_positions=N_CTX, n_ctx=N_CTX, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, **COMMON
        ),
        "gpt2",
    ),
    "gpt-neo": Family(
        lambda tf: tf.GPTNeoConfig(
            max_position_embeddings=N_CTX,
            hidden_size=D_MODEL,
            num_layers=N_LAYERS,
            num_heads=N_HEADS,
            intermediate_size=D_MLP,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            **COMMON,
        ),
        "EleutherAI/gpt-neo-125M",
    ),
    "gpt-j": Family(
        lambda tf: tf.GPTJConfig(
            n_positions=N_CTX,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_inner=D_MLP,
            rotary_dim=8,
            tie_word_embeddings=False,
            **COMMON,
        ),
        "EleutherAI/gpt-j-6B",
        features=frozenset({"parallel"}),
    ),
    "pythia": Family(
        lambda tf: tf.GPTNeoXConfig(
            max_position_embeddings=N_CTX,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            intermediate_size=D_MLP,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            **COMMON,
        ),
        "EleutherAI/pythia-70m",
        features=frozenset({"parallel"}),
    ),
    "neox-sequential": Family(
        lambda tf: tf.GPTNeoXConfig(
            max_position_embeddings=N_CTX,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            intermediate_size=D_MLP,
            rotary_pct=0.25,
            use_parallel_residual=False,
            tie_word_embeddings=False,
            **COMMON,
        ),
        "EleutherAI/pythia-70m",
    ),
    "opt": Family(
        lambda tf: tf.OPTConfig(
            max_position_embeddings=N_CTX,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            ffn_dim=D_MLP,
            word_embed_proj_dim=D_MODEL,
            **COMMON,
        ),
        "facebook/opt-125m",
    ),
    "bloom": Family(
        lambda tf: tf.BloomConfig(hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, **COMMON),
        "bigscience/bloom-560m",
        features=frozenset({"embed_norm"}),
    ),
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
    "gemma": Family(_llama_like("GemmaConfig", head_dim=D_MODEL // N_HEADS), "google/gemma-2b"),
    "gemma2": Family(
        _llama_like(
            "Gemma2Config",
            head_dim=D_MODEL // N_HEADS,
            sliding_window=4,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
        "google/gemma-2-2b",
        features=frozenset({"post_norm", "softcap"}),
    ),
    "gemma3": Family(
        _llama_like("Gemma3TextConfig", head_dim=D_MODEL // N_HEADS, sliding_window=4),
        "google/gemma-3-1b-pt",
        model_class="Gemma3ForCausalLM",
        features=frozenset({"post_norm"}),
    ),
    "phi": Family(
        lambda tf: tf.PhiConfig(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            max_position_embeddings=N_CTX,
            partial_rotary_factor=0.5,
            **COMMON,
        ),
        "microsoft/phi-2",
        features=frozenset({"parallel"}),
    ),
    "phi3": Family(_llama_like("Phi3Config", num_key_value_heads=N_HEADS), "microsoft/Phi-3-mini-4k-instruct"),
    "olmo": Family(_llama_like("OlmoConfig", num_key_value_heads=N_HEADS), "allenai/OLMo-1B-hf"),
    "olmo2": Family(
        _llama_like("Olmo2Config", num_key_value_heads=N_HEADS),
        "allenai/OLMo-2-0425-1B",
        features=frozenset({"post_norm"}),
    ),
    "olmo3": Family(
        _llama_like("Olmo3Config", num_key_value_heads=N_HEADS, sliding_window=4),
        "allenai/Olmo-3-1025-7B",
        features=frozenset({"post_norm"}),
    ),
    "stablelm": Family(
        _llama_like("StableLmConfig", num_key_value_heads=N_HEADS, partial_rotary_factor=0.25),
        "stabilityai/stablelm-2-1_6b",
    ),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights with norm gains around 1 (so every norm matters), biases and embeddings around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            last = name.split(".")[-1]
            if p.dim() == 1 and ("ln" in name or "norm" in name) and last in ("weight", "w"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@functools.cache
def hf_model(name: str, seed: int = 0) -> Any:
    """The random Hugging Face model of family ``name`` (cached; skips if ``transformers`` lacks the config)."""
    import transformers

    fam = FAMILIES[name]
    try:
        cfg = fam.config(transformers)
        cls = getattr(transformers, fam.model_class)
    except AttributeError as exc:  # config class missing in this transformers version
        pytest.skip(f"{name}: {exc}")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls.from_config(cfg) if fam.model_class.startswith("Auto") else cls(cfg)
    model.config.architectures = [type(model).__name__]  # TransformerLens picks its adapter from this
    _randomize(model, seed)
    return model.eval()


@functools.cache
def bridge(name: str, compat: bool = False) -> Any:
    """``TransformerBridge`` around :func:`hf_model` (``compat``: ``enable_compatibility_mode``, weights processed)."""
    if not HAS_BRIDGE:
        pytest.skip("TransformerBridge is not in this TransformerLens version")
    from transformer_lens.model_bridge import TransformerBridge

    hf = copy.deepcopy(hf_model(name))  # the bridge takes the HF modules over: one copy per bridge
    model = TransformerBridge.boot_transformers(FAMILIES[name].repo, hf_model=hf, tokenizer=tiny_tokenizer())
    if compat:
        model.enable_compatibility_mode(disable_warnings=True)
    return model.eval()


@functools.cache
def hooked(name: str, processed: bool = False) -> Any:
    """A ``HookedTransformer`` of family ``name`` through TransformerLens' own config and weight conversion.

    ``processed``: ``fold_ln``, ``center_writing_weights`` and ``fold_value_biases`` (TransformerLens turns
    ``fold_ln`` off by itself for post-norm architectures).
    """
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer is not in this TransformerLens version")
    if not FAMILIES[name].hooked:
        pytest.skip(f"{name}: TransformerLens 3.x has no HookedTransformer loader for this family")
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lfp

    hf = hf_model(name)
    folder = os.path.join(tempfile.mkdtemp(prefix="tlres-fam-"), "model")  # no family word: TL keys names on them
    hf.config.save_pretrained(folder)
    try:
        cfg = lfp.get_pretrained_model_config(folder, hf_cfg=hf.config.to_dict(), fold_ln=processed, device="cpu")
    except NotImplementedError as exc:  # TL3 builds these families from fixed, name-keyed configs only
        pytest.skip(f"{name}: TransformerLens 3.x has no config-based HookedTransformer loader ({exc})")
    except AttributeError as exc:  # e.g. Phi: TL3 reads hf_config.partial_rotary_factor, moved by transformers 5
        pytest.skip(f"{name}: TransformerLens 3.x's config conversion fails on this transformers version ({exc})")
    state = lfp.get_pretrained_state_dict(folder, cfg, hf_model=hf)
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=processed,
        center_writing_weights=processed,
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
