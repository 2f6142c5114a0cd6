"""Files dqtool writes: every write goes through a temp file in the same folder and an atomic rename.

A crash (or ``kill -9``) at any point leaves either the old file or the new one at ``path``, never half
of one. The temp file is named ``.<name>.tmp-<pid><suffix>`` (hidden, in the target's folder so the
rename never crosses a file system); ``suffix`` keeps an extension for writers that look at it (PNG,
TIFF). :func:`file_sha256` is the one file digest of the project.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The temp file :func:`atomic_write` writes before the rename onto ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write; on a clean exit rename it onto ``path``, on an error remove it.

    >>> with atomic_write("table.csv") as tmp:
    ...     tmp.write_text("a,b\\n")  # doctest: +SKIP
    """
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temp file and an atomic rename; returns ``path``."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file and an atomic rename; returns ``path``."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex, 64 characters), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
