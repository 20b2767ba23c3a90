"""Shared fixtures: small random-weight models through both TransformerLens APIs, and the real SmolLM2-135M.

Model builders (plain functions, usable from hypothesis tests):

* :func:`make_hooked` — a ``HookedTransformer`` (TransformerLens 2.x/3.x) from a ``HookedTransformerConfig``,
  GPT-2 style (LayerNorm, GELU, learned positions) or Llama style (RMSNorm, SwiGLU, rotary, GQA), with every
  parameter (norm weights and biases included) randomised, then optionally processed with ``fold_ln``,
  ``center_writing_weights`` and ``fold_value_biases``.
* :func:`make_bridge` — a TransformerLens ``TransformerBridge`` around a random Hugging Face ``GPT2LMHeadModel`` or
  ``LlamaForCausalLM`` built from a config, optionally in compatibility mode (``fold_ln`` / ``fold_value_biases``).

``BUILDERS`` lists what this TransformerLens version offers; tests parametrise over it and skip what is absent.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # TransformerLens <= 3.x

    HAS_HOOKED = True
except ImportError:  # TransformerLens 4.x removed HookedTransformer
    HAS_HOOKED = False

try:
    from transformer_lens.model_bridge import TransformerBridge

    HAS_BRIDGE = True
except ImportError:
    HAS_BRIDGE = False

VOCAB = 61


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_dir() -> str:
    """A word-level tokenizer ("t0".."t60", BOS "t1") saved to a temp folder (the bridge reloads it by path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t2")
    path = tempfile.mkdtemp(prefix="tlres-tok-")
    tok.save_pretrained(path)
    return path


def tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights with norm gains around 1 (so every norm matters), biases and embeddings around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("ln" in name or "norm" in name) and ("w" in name.split(".")[-1] or "weight" in name):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_hooked(
    arch: str = "gpt2",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int = 64,
    n_kv_heads: int | None = None,
    fold_ln: bool = False,
    fold_value_biases: bool = False,
    center_writing_weights: bool = False,
    seed: int = 0,
) -> Any:
    """A random-weight ``HookedTransformer``: ``arch`` is ``"gpt2"`` or ``"llama"``."""
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer is not in this TransformerLens version")
    common = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=32,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_vocab=VOCAB,
        d_mlp=d_mlp,
        seed=seed,
        tokenizer_name=None,
    )
    if arch == "gpt2":
        cfg = HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN", **common)
    else:
        cfg = HookedTransformerConfig(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            gated_mlp=True,
            n_key_value_heads=n_kv_heads or max(1, n_heads // 2),
            final_rms=True,
            **common,
        )
    model = HookedTransformer(cfg)
    _randomize(model, seed)
    model.set_tokenizer(tiny_tokenizer())
    if fold_ln or center_writing_weights or fold_value_biases:
        model.process_weights_(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=False)
        if fold_value_biases:
            model.load_and_process_state_dict(
                model.state_dict(),
                fold_ln=False,
                center_writing_weights=False,
                center_unembed=False,
                fold_value_biases=True,
            )
    return model.eval()


def make_bridge(
    arch: str = "gpt2",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int = 64,
    n_kv_heads: int | None = None,
    compat: bool = False,
    fold_ln: bool = True,
    fold_value_biases: bool = True,
    seed: int = 0,
) -> Any:
    """A ``TransformerBridge`` around a random HF model; ``compat=True`` applies ``enable_compatibility_mode``."""
    if not HAS_BRIDGE:
        pytest.skip("TransformerBridge is not in this TransformerLens version")
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
        )
        hf = GPT2LMHeadModel(cfg)
        name = "gpt2"
    else:
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or max(1, n_heads // 2),
            max_position_embeddings=32,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
        hf = LlamaForCausalLM(cfg)
        name = "meta-llama/Llama-3.2-1B"
    _randomize(hf, seed)
    hf.eval()
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tiny_tokenizer())
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=fold_ln, fold_value_biases=fold_value_biases)
    return bridge.eval()


#: (id, builder) pairs for the model variants of the exactness tests; absent APIs skip.
VARIANTS = [
    ("hooked-gpt2", lambda: make_hooked("gpt2")),
    ("hooked-gpt2-foldln", lambda: make_hooked("gpt2", fold_ln=True, center_writing_weights=True)),
    (
        "hooked-gpt2-foldln-foldvb",
        lambda: make_hooked("gpt2", fold_ln=True, center_writing_weights=True, fold_value_biases=True),
    ),
    ("hooked-gpt2-foldvb", lambda: make_hooked("gpt2", fold_value_biases=True)),
    ("hooked-llama-gqa", lambda: make_hooked("llama", n_kv_heads=2)),
    ("hooked-llama-foldln", lambda: make_hooked("llama", n_kv_heads=2, fold_ln=True)),
    ("bridge-gpt2", lambda: make_bridge("gpt2")),
    ("bridge-gpt2-compat", lambda: make_bridge("gpt2", compat=True)),
    ("bridge-gpt2-compat-nofoldvb", lambda: make_bridge("gpt2", compat=True, fold_value_biases=False)),
    ("bridge-gpt2-compat-nofoldln", lambda: make_bridge("gpt2", compat=True, fold_ln=False)),
    ("bridge-llama-gqa", lambda: make_bridge("llama", n_kv_heads=2)),
    ("bridge-llama-compat", lambda: make_bridge("llama", n_kv_heads=2, compat=True)),
]


@functools.cache
def _variant(name: str) -> Any:
    return dict(VARIANTS)[name]()


@pytest.fixture(params=[v[0] for v in VARIANTS])
def variant_model(request: pytest.FixtureRequest) -> Any:
    """Each random model variant (cached per session)."""
    return _variant(request.param)


TOKENS = torch.tensor([[1, 5, 17, 33, 8, 42, 9, 23]])


def run_cache(model: Any, tokens: torch.Tensor = TOKENS) -> tuple[torch.Tensor, Any]:
    with torch.no_grad():
        return model.run_with_cache(tokens)


def raw_norm(model: Any, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent of tl_residual: a norm's weight and bias read straight from its module (``"final"`` or
    ``"{layer}.ln1"`` / ``"{layer}.ln2"``); ones / zeros where the norm has none (folded away)."""
    if which == "final":
        mod = model.ln_final
    else:
        layer, name = which.split(".")
        mod = getattr(model.blocks[int(layer)], name)
    d = model.cfg.d_model

    def first(*attrs: str) -> torch.Tensor | None:
        return next((getattr(mod, a) for a in attrs if isinstance(getattr(mod, a, None), torch.Tensor)), None)

    w, b = first("w", "weight"), first("b", "bias")
    return (torch.ones(d) if w is None else w.detach().float(), torch.zeros(d) if b is None else b.detach().float())


def raw_frozen_logits(model: Any, cache: Any, v: torch.Tensor, pos: int = -1) -> torch.Tensor:
    """Independent frozen-scale lens from raw weights: ``(centre(v) * gamma / ln_final.hook_scale[pos]) @ W_U``."""
    v = v.double()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        v = v - v.mean(-1, keepdim=True)
    scale = cache["ln_final.hook_scale"][0, pos].double().reshape(-1)[0]
    gamma, _ = raw_norm(model, "final")
    return (v * gamma.double() / scale) @ model.W_U.detach().double()


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The embedded SmolLM2-135M-Instruct (TransformerBridge), loaded once per session."""
    from tl_residual.model import load_model

    try:
        return load_model("smollm2-135m")
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"embedded model unavailable: {exc}")


@pytest.fixture(scope="session")
def paris(smollm2: Any) -> tuple[Any, Any, torch.Tensor]:
    """``(model, cache, tokens)`` for "The capital of France is" on SmolLM2-135M."""
    tokens = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens)
    return smollm2, cache, tokens
