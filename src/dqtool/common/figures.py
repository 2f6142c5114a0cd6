"""Plots: one place that gives matplotlib's pyplot without touching the user's backend, and one PNG save.

:func:`pyplot` returns ``matplotlib.pyplot``; when pyplot has not been imported yet (a script or the CLI),
it selects the non-interactive Agg backend first, so no window opens and no display is needed; in a
notebook or GUI session that already imported pyplot, the user's backend is left as it is.
:func:`save_figure` writes PNG through a temp file and an atomic rename, with no timestamp, so the same
figure gives the same bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dqtool.common.files import atomic_write


def pyplot():
    """``matplotlib.pyplot``, on the Agg backend unless the caller already chose one."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write ``fig`` to ``path`` (PNG) via a temp file + rename, close it, return the path."""
    plt = pyplot()
    path = Path(path)
    try:
        with atomic_write(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
