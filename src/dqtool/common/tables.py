"""Tables on disk: one list of row dicts written as CSV, Markdown and JSON side by side.

Files are written to a temp name and renamed, so a crash never leaves a half-written table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from dqtool.common.files import atomic_write_text


def _fmt(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def format_markdown(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (floats rounded to ``digits``)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or _columns(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _columns(rows: Iterable[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_table(rows: Sequence[dict], stem: str | os.PathLike, columns: Sequence[str] | None = None,
                digits: int = 4) -> dict[str, Path]:
    """Write ``rows`` to ``stem.csv``, ``stem.md`` and ``stem.json``; returns the three paths.

    JSON keeps full precision (NaN becomes null); Markdown rounds to ``digits``.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or _columns(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    paths = {
        "csv": atomic_write_text(stem.with_suffix(".csv"), buf.getvalue()),
        "md": atomic_write_text(stem.with_suffix(".md"), format_markdown(rows, columns, digits)),
        "json": atomic_write_text(
            stem.with_suffix(".json"),
            json.dumps([{c: _jsonable(r.get(c)) for c in columns} for r in rows], indent=2) + "\n"),
    }
    return paths


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON through a temp file and rename (NaN becomes null)."""
    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if hasattr(o, "tolist"):
            return clean(o.tolist())
        return _jsonable(o)

    return atomic_write_text(path, json.dumps(clean(obj), indent=2) + "\n")
