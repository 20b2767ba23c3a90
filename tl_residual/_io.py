"""Atomic file writes: every result file tl-residual writes (``--json``, ``--html``, reports, study outputs).

The text goes to a temporary file in the destination's folder, is flushed and fsynced, then renamed over the
destination with :func:`os.replace` (atomic on POSIX and Windows within one file system). A failure at any point
(full disk, file-size limit, permission, Ctrl-C) removes the temporary file and leaves the previous file, if any,
exactly as it was: a reader sees the old file or the whole new one, never a truncated one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from tl_residual.errors import InvalidInputError


def check_writable(path: str, option: str = "output") -> str:
    """Check, before any work, that ``path`` can be written: not a folder, its folder exists and is writable.

    Returns:
        ``path`` unchanged.

    Raises:
        InvalidInputError: naming ``option`` and what is wrong with ``path``.
    """
    if not isinstance(path, str) or not path.strip():
        raise InvalidInputError(f"{option} path is empty: give a file name, e.g. result.json")
    if os.path.isdir(path):
        raise InvalidInputError(f"{option} {path!r} is a folder: give a file name inside it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidInputError(f"{option} {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(f"{option} {path!r}: the folder {folder!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InvalidInputError(f"{option} {path!r} exists and is not writable")
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Write ``path`` atomically through ``write(tmp_path)`` (e.g. ``pyarrow.parquet.write_table``): the file is
    written to a temporary name in the same folder, fsynced, then renamed over ``path`` with :func:`os.replace`.

    Raises:
        OSError: the write or the rename failed; ``path`` is then unchanged and no temporary file is left.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.exists(path):  # keep the destination's permissions, not mkstemp's 0600
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a temporary file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`).

    Raises:
        OSError: the write or the rename failed; ``path`` is then unchanged and no temporary file is left.
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)

    atomic_write(path, write)
