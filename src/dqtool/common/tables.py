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

import numpy as np

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


def seed_spread(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str], min_rows: int = 1) -> list[dict]:
    """One row per distinct value of ``keys`` among ``rows`` (first-seen order) with ``min_rows`` rows or more:
    the keys, ``seeds`` (how many rows) and per metric m ``"m mean over seeds"`` and ``"m std over seeds"``, the
    mean and the sample standard deviation (ddof 1; NaN for one row) of the rows' values of m."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for values, group in groups.items():
        if len(group) < min_rows:
            continue
        row = {**dict(zip(keys, values)), "seeds": len(group)}
        for m in metrics:
            vals = np.array([g[m] for g in group], dtype=float)
            row[f"{m} mean over seeds"] = float(np.mean(vals))
            row[f"{m} std over seeds"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        out.append(row)
    return out
