"""Saving plots: PNG through a temp file and an atomic rename, with no timestamp so the bytes are repeatable."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write ``fig`` to ``path`` (PNG) via ``.<name>.tmp<pid>.png`` + rename, close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
