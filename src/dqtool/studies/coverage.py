"""What DQ selects, measured on a cache's features (issue 12): its bins as shells, and coverage over seeds.

**Shells.** DQ's bins (eq. 1, formed greedily in order, :func:`dqtool.selection.quantize.load_or_form_bins`)
and, for every member i of bin k, its distance to the mean of all N features:

    r_i = || f_i - (1/N) sum_j f_j ||

With the paper's gain, bin k is the patches nearest a slowly moving centre (REFERENCE.md section 3), so the
bins are shells around the data's centre: bin 1 the patches nearest it, the last bin the outliers, and eq. 2
(the same rate from each bin) is stratified random sampling by centrality. :func:`shell_rows` gives per bin
its size and the quantiles of r; the figure draws them as one box per bin.

**Coverage** of a subset S (:mod:`dqtool.selection.coverage`): nearest(x) = min_{s in S} ||f(x) - f(s)||;
the covering radius max_x nearest(x), the mean of nearest(x) and its 95th percentile. DQ (eq. 2, seeded
within-bin draws) and random subsets of the same size (:func:`dqtool.selection.subsets.random_subset`) are
drawn with every seed; their rows give the mean and the standard deviation (ddof 1) over seeds. k-center
(farthest-first from the patch nearest the mean, :func:`dqtool_kernels.kcenter.kcenter`) does not depend on a
seed: one draw, std 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dqtool.common.errors import InputError

#: The paper's rates (Table I).
RATES = (0.01, 0.05, 0.1, 0.3)
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
STATS = ("covering radius", "mean distance", "p95 distance")


@dataclass
class CoverageStudy:
    shells: list[dict]
    coverage: list[dict]
    files: list[Path] = field(default_factory=list)


def distances_to_mean(features: np.ndarray) -> np.ndarray:
    """r_i = ||f_i - mean f|| for every row, in float64."""
    f = np.asarray(features, np.float64)
    return np.linalg.norm(f - f.mean(axis=0), axis=1)


def shell_rows(features: np.ndarray, bins: Sequence[np.ndarray], domains: np.ndarray | None = None) -> list[dict]:
    """Per bin (in the order DQ forms them): its size, the min, quartiles and max of its members' r, and (given
    each patch's ``domains``) how many of its patches come from each domain."""
    r = distances_to_mean(features)
    names = list(dict.fromkeys(domains.tolist())) if domains is not None else []
    rows = []
    for k, members in enumerate(bins, start=1):
        members = np.asarray(members, np.int64)
        q = np.quantile(r[members], QUANTILES)
        rows.append({"bin": k, "patches": int(len(members)), "min distance to mean": float(q[0]),
                     "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4]),
                     **{f"{d} patches": int(np.sum(domains[members] == d)) for d in names}})
    return rows


def subset_stats(features: np.ndarray, selected) -> dict:
    """Covering radius, mean and 95th-percentile nearest-selected distance of ``selected``."""
    from dqtool.selection.coverage import nearest_selected_distances

    near = nearest_selected_distances(features, selected)
    return {"covering radius": float(near.max()), "mean distance": float(near.mean()),
            "p95 distance": float(np.percentile(near, 95))}


def _row(method: str, rate: float, n_selected: int, draws: list[dict]) -> dict:
    row = {"method": method, "rate": rate, "patches": n_selected, "seeds": len(draws)}
    for s in STATS:
        values = np.array([d[s] for d in draws], np.float64)
        row[f"{s} mean"] = float(values.mean())
        row[f"{s} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return row


def coverage_rows(features: np.ndarray, bins: Sequence[np.ndarray], rates: Sequence[float] = RATES,
                  seeds: Sequence[int] = tuple(range(20)), with_kcenter: bool = True, progress=None) -> list[dict]:
    """One row per (method, rate): DQ and random over ``seeds`` (mean and std), k-center once."""
    from dqtool.selection.quantize import sample_bins
    from dqtool.selection.subsets import random_subset
    from dqtool_kernels.kcenter import kcenter

    n = len(features)
    rows = []
    for rate in rates:
        dq_draws, rnd_draws, size = [], [], None
        for seed in seeds:
            dq = sample_bins(list(bins), float(rate), int(seed))
            if dq.size == 0:
                raise InputError(f"rate {rate} selects no patch of the {n}; use a rate >= {0.5 / n:.2g}")
            size = int(dq.size)
            dq_draws.append(subset_stats(features, dq))
            rnd_draws.append(subset_stats(features, random_subset(n, size, int(seed))))
            if progress is not None:
                progress.update(1)
        rows.append(_row("dq", float(rate), size, dq_draws))
        rows.append(_row("random", float(rate), size, rnd_draws))
        if with_kcenter:
            rows.append(_row("kcenter", float(rate), size, [subset_stats(features, kcenter(features, size))]))
    return rows


def plot_shells(features: np.ndarray, bins: Sequence[np.ndarray], path: Path, title: str) -> Path:
    """One box per bin of its members' distance to the features' mean."""
    from dqtool.common.figures import pyplot, save_figure

    plt = pyplot()
    r = distances_to_mean(features)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.boxplot([r[np.asarray(b, np.int64)] for b in bins], whis=(0, 100))
    ax.set_xlabel("DQ bin (in the order the greedy search forms them)")
    ax.set_ylabel("distance to the feature mean")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_coverage(rows: list[dict], path: Path, stat: str = "covering radius") -> Path:
    """``stat`` against the rate, one line per method, error bars = std over seeds."""
    from dqtool.common.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=100)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["rate"], r[f"{stat} mean"], r[f"{stat} std"]) for r in rows if r["method"] == method)
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("rate")
    ax.set_ylabel(f"{stat} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def coverage_study(cache: str | os.PathLike, out_dir: str | os.PathLike, rates: Sequence[float] = RATES,
                   seeds: int = 20, bins: int = 10, gain: str = "paper", quiet: bool = False) -> CoverageStudy:
    """``dqtool coverage``: the shells table and figure and the coverage table and figure of ``cache``'s stored
    features, written to ``out_dir`` (``shells.{csv,md,json,png}``, ``coverage.{csv,md,json}``,
    ``coverage_radius.png``, ``coverage_mean.png``). The bins are the cache's stored ones for (features, gain,
    bins), formed and stored once if missing, as ``dqtool select`` does."""
    from dqtool.common.outputs import writing_folder
    from dqtool.common.progress import bar
    from dqtool.common.tables import write_table
    from dqtool.data.cache import PatchCache
    from dqtool.features.store import load_features
    from dqtool.selection.quantize import check_rate, load_or_form_bins

    rates = [check_rate(r) for r in rates]
    if int(seeds) < 2:
        raise InputError(f"--seeds {seeds}: expected at least 2 (the table gives a std over seeds)")
    out = Path(out_dir)
    with writing_folder(out, "coverage", inputs=(cache,)):
        with PatchCache(cache) as c:
            features = load_features(c)
            if not 1 <= int(bins) <= len(c):
                raise InputError(f"--bins {bins}: expected between 1 and the number of patches ({len(c)})")
            dq_bins, _ = load_or_form_bins(c, features, int(bins), gain, quiet=quiet)
            name = Path(c.path).name
            domains = np.asarray(c.domain_of_patch).astype(str)
        shells = shell_rows(features, dq_bins, domains)
        progress = bar(len(rates) * int(seeds), desc="coverage", quiet=quiet, unit="draw")
        try:
            rows = coverage_rows(features, dq_bins, rates, range(int(seeds)), progress=progress)
        finally:
            progress.close()
        files = [*write_table(shells, out / "shells").values(), *write_table(rows, out / "coverage").values()]
        files.append(plot_shells(features, dq_bins, out / "shells.png",
                                 f"{name}: {len(features)} patches, {bins} DQ bins ({gain} gain)"))
        files.append(plot_coverage(rows, out / "coverage_radius.png", "covering radius"))
        files.append(plot_coverage(rows, out / "coverage_mean.png", "mean distance"))
    return CoverageStudy(shells=shells, coverage=rows, files=[Path(f) for f in files])
