"""The embedded model's disk cache (tl_residual/model_cache.py): build once, reload bit-identical, rebuild when corrupt.

A tiny random Llama stands in for the dequantised SmolLM2 and a small file for its GGUF file, so this runs in seconds;
the real model's first and second loads are timed in the README (Timings).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_tokenizer
from tl_residual import model_cache as MC


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


class _Calls:
    def __init__(self) -> None:
        self.built = 0
        self.loaded = 0
        self.model = _tiny_llama()

    def build(self):
        self.built += 1
        return self.model, tiny_tokenizer()

    def load(self, entry: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.loaded += 1
        return AutoModelForCausalLM.from_pretrained(entry), AutoTokenizer.from_pretrained(entry)


def _entries(root: Path) -> list[Path]:
    """The cache entries (folders; ``hashes.json`` beside them remembers the GGUF file's hash)."""
    return [p for p in root.iterdir() if p.is_dir()]


@pytest.fixture()
def gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TL_RESIDUAL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(3 << 20))
    return str(path)


def test_second_load_reads_the_cache_bit_identical(gguf: str, tmp_path: Path) -> None:
    calls = _Calls()
    m1, _ = MC.load_or_build(gguf, "float32", calls.build, calls.load)
    assert (calls.built, calls.loaded) == (1, 0)
    entries = _entries(tmp_path / "cache")
    assert len(entries) == 1 and (entries[0] / "complete.json").is_file()  # no temporary folder left behind
    m2, tok = MC.load_or_build(gguf, "float32", calls.build, calls.load)
    assert (calls.built, calls.loaded) == (1, 1)
    s1, s2 = calls.model.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert tok("t3 t4")["input_ids"] == tiny_tokenizer()("t3 t4")["input_ids"]


def test_corrupt_entry_is_rebuilt(gguf: str, tmp_path: Path) -> None:
    calls = _Calls()
    MC.load_or_build(gguf, "float32", calls.build, calls.load)
    entry = _entries(tmp_path / "cache")[0]
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MC.load_or_build(gguf, "float32", calls.build, calls.load)
    assert calls.built == 2 and any("unreadable" in str(w.message) for w in caught)
    MC.load_or_build(gguf, "float32", calls.build, calls.load)  # the rebuilt entry loads
    assert calls.built == 2


def test_entry_without_marker_is_not_trusted(gguf: str, tmp_path: Path) -> None:
    entry = tmp_path / "cache" / MC.entry_key(gguf, "float32")
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"half written")
    calls = _Calls()
    MC.load_or_build(gguf, "float32", calls.build, calls.load)
    assert (calls.built, calls.loaded) == (1, 0) and (entry / "complete.json").is_file()


def test_key_follows_the_file_and_dtype(gguf: str, tmp_path: Path) -> None:
    import hashlib
    import shutil

    k = MC.entry_key(gguf, "float32")
    assert MC.entry_key(gguf, "float32") == k and MC.entry_key(gguf, "bfloat16") != k
    with open(gguf, "rb") as f:
        assert k.endswith(hashlib.sha256(f.read()).hexdigest()[:16])  # independent: the file's full SHA-256
    copy = tmp_path / "other-venv.gguf"  # the same wheel file in another environment: the same entry
    shutil.copyfile(gguf, copy)
    assert MC.entry_key(str(copy), "float32") == k
    with open(gguf, "r+b") as f:
        f.seek(1 << 20)  # a change in the middle of the file
        f.write(b"changed")
    assert MC.entry_key(gguf, "float32") != k


def test_cache_root_and_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gguf: str) -> None:
    monkeypatch.delenv("TL_RESIDUAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert MC.cache_root() == tmp_path / "xdg" / "tl-residual"
    monkeypatch.setenv("TL_RESIDUAL_CACHE", "off")
    assert MC.cache_root() is None
    calls = _Calls()
    MC.load_or_build(gguf, "float32", calls.build, calls.load)
    MC.load_or_build(gguf, "float32", calls.build, calls.load)
    assert calls.built == 2 and not (tmp_path / "xdg").exists()


def test_unwritable_cache_only_warns(gguf: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TL_RESIDUAL_CACHE", str(blocker / "sub"))
    calls = _Calls()
    with pytest.warns(UserWarning, match="could not write the model cache"):
        model, _ = MC.load_or_build(gguf, "float32", calls.build, calls.load)
    assert model is calls.model
