"""Segmentation scores per image and over a dataset: the seed paper's pixel metrics and the field's
instance metrics.

Pixel level, binary foreground (label > 0), from the pixel counts TP, FP, FN, TN:

    IoU = TP / (TP + FP + FN)            dice = 2 TP / (2 TP + FP + FN)
    precision = TP / (TP + FP)           recall = TP / (TP + FN)
    accuracy = (TP + TN) / (TP + FP + FN + TN)
    pq_proxy = (IoU + dice) / 2          (the seed's "panoptic quality"; not PQ)

When both maps are empty nothing is wrong: IoU, dice, precision, recall (and pq_proxy) take
``empty_value`` (1.0 by default; 0.0 reproduces the seed's released code). A ratio whose denominator is
zero otherwise (e.g. precision of an empty prediction against true cells) is 0.

Instance level at an IoU threshold t (matching in ``dqtool_kernels.matching``; a pair matches when
IoU >= t, the assignment maximises the number of matches, ties broken by IoU):

    tp, fp = n_pred - tp, fn = n_true - tp
    precision = tp / (tp + fp)   recall = tp / (tp + fn)   f1 = 2 tp / (2 tp + fp + fn)
    accuracy = tp / (tp + fp + fn)          (what Cellpose calls AP)
    mean_matched_iou = sum of matched IoUs / tp
    panoptic_quality = sum of matched IoUs / (tp + fp/2 + fn/2)   (Kirillov et al. 2019, Eq. 1)

Every ratio is 0 when tp == 0 (stardist's ``matching`` convention); for empty-vs-empty the ratios
take ``empty_value`` (0.0 by default, as stardist; cellpose's AP is NaN there).

Over a dataset: mean and sample standard deviation (ddof=1; NaN for a single image) over images, per
domain and for 'all'; micro-averaged instance scores from counts pooled over images (stardist's
``matching_dataset(by_image=False)``).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Iterable, Sequence

import numpy as np

from dqtool_kernels import matching as _matching

from dqtool.common.errors import InputError
from dqtool.common.progress import bar as progress_bar
from dqtool.data.io import check_label_array

PIXEL_METRICS = ("iou", "dice", "precision", "recall", "accuracy", "pq_proxy")
INSTANCE_RATIOS = ("precision", "recall", "f1", "accuracy", "mean_matched_iou", "panoptic_quality")
INSTANCE_COUNTS = ("tp", "fp", "fn")


@dataclass(frozen=True)
class PixelScores:
    """Pixel scores of one image on binary foreground (see the module docstring for the formulas)."""

    iou: float
    dice: float
    precision: float
    recall: float
    accuracy: float
    pq_proxy: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InstanceScores:
    """Instance scores of one image at one IoU threshold."""

    thresh: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    mean_matched_iou: float
    panoptic_quality: float
    n_true: int
    n_pred: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def pixel_scores_from_counts(tp: int, fp: int, fn: int, tn: int, empty_value: float = 1.0) -> PixelScores:
    """Pixel scores from foreground pixel counts (formulas in the module docstring)."""
    total = tp + fp + fn + tn
    accuracy = _ratio(tp + tn, total) if total else float(empty_value)
    if tp + fp + fn == 0:
        e = float(empty_value)
        return PixelScores(e, e, e, e, accuracy, e)
    iou = _ratio(tp, tp + fp + fn)
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    return PixelScores(iou, dice, _ratio(tp, tp + fp), _ratio(tp, tp + fn), accuracy, 0.5 * (iou + dice))


def instance_scores_from_counts(thresh: float, tp: int, fp: int, fn: int, sum_matched_iou: float,
                                empty_value: float = 0.0) -> InstanceScores:
    """Instance scores from matching counts; every ratio is derived here and nowhere else."""
    tp, fp, fn = int(tp), int(fp), int(fn)
    n_true, n_pred = tp + fn, tp + fp
    if n_true == 0 and n_pred == 0:
        e = float(empty_value)
        return InstanceScores(float(thresh), 0, 0, 0, e, e, e, e, e, e, 0, 0)
    if tp == 0:
        return InstanceScores(float(thresh), 0, fp, fn, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, n_true, n_pred)
    return InstanceScores(
        thresh=float(thresh), tp=tp, fp=fp, fn=fn,
        precision=tp / (tp + fp), recall=tp / (tp + fn), f1=2 * tp / (2 * tp + fp + fn),
        accuracy=tp / (tp + fp + fn), mean_matched_iou=float(sum_matched_iou) / tp,
        panoptic_quality=float(sum_matched_iou) / (tp + fp / 2 + fn / 2), n_true=n_true, n_pred=n_pred)


def _check_pair(y_true, y_pred, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """2-D integer maps of one shape. Negative ids are found by the kernels' own pass (no extra pass)."""
    where = f"{name}: " if name else ""
    checked = [check_label_array(arr, f"{where}{which}", negative_ids=False)
               for arr, which in ((y_true, "y_true"), (y_pred, "y_pred"))]
    if checked[0].shape != checked[1].shape:
        raise InputError(f"{where}shape mismatch: y_true {checked[0].shape} vs y_pred {checked[1].shape}; "
                         "expected the same 2-D shape")
    return checked[0], checked[1]


def _kernel_call(func, *args, name: str = ""):
    """Run a kernel; its ValueError for negative ids becomes an InputError naming the pair."""
    try:
        return func(*args)
    except ValueError as exc:
        if "negative" not in str(exc):
            raise
        raise InputError(f"{name + ': ' if name else ''}{exc}") from None


def pixel_scores(y_true: np.ndarray, y_pred: np.ndarray, empty_value: float = 1.0) -> PixelScores:
    """Pixel IoU, dice, precision, recall, accuracy and pq_proxy on binary foreground (label > 0).

    ``empty_value`` is the score when both maps have no foreground (0.0 reproduces the seed's code).
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    counts = _kernel_call(_matching.foreground_counts, y_true, y_pred)
    return pixel_scores_from_counts(*counts, empty_value=empty_value)


def instance_scores(y_true: np.ndarray, y_pred: np.ndarray, thresholds: Sequence[float] | float = (0.5,),
                    empty_value: float = 0.0, threads: int | None = None) -> list[InstanceScores]:
    """Instance scores at each IoU threshold (one record per threshold, in the given order).

    Label ids need not be consecutive; 0 is background. Equal to stardist's ``matching`` and to
    cellpose's ``average_precision`` (on consecutive ids: cellpose counts max id as the instance count).
    ``threads`` (default: the CPUs available) split one image of >= 2^20 pixels into parallel chunks.
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    threads = _matching.cpu_count() if threads is None else threads
    _, matches = _kernel_call(_matching.match_instances, y_true, y_pred, parse_thresholds(thresholds),
                              "numba", threads)
    return [instance_scores_from_counts(m.thresh, m.tp, m.fp, m.fn, m.sum_matched_iou, empty_value)
            for m in matches]


def parse_thresholds(spec: str | float | Sequence[float]) -> tuple[float, ...]:
    """IoU thresholds from "0.5", "0.5,0.75" or an inclusive range "start:stop:step" ("0.5:0.95:0.05"
    gives the ten COCO thresholds). Values are rounded to 10 decimals, so a range yields 0.6, not
    0.6000000000000001 (which would reject an IoU of exactly 3/5)."""
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                parts = [float(x) for x in text.split(":")]
                if len(parts) != 3:
                    raise ValueError
                start, stop, step = parts
                if step <= 0 or stop < start:
                    raise ValueError
                n = int(math.floor((stop - start) / step + 1e-9)) + 1
                values = [start + k * step for k in range(n)]
            else:
                values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"thresholds {spec!r}: expected a number, a comma list like 0.5,0.75 or a "
                             "range start:stop:step like 0.5:0.95:0.05") from None
    else:
        values = [float(x) for x in np.atleast_1d(np.asarray(spec, dtype=float))]
    values = tuple(round(v, 10) for v in values)
    if not values or any(not (0.0 < v <= 1.0) for v in values):
        raise ValueError(f"thresholds {spec!r}: expected IoU thresholds in (0, 1], got {values}")
    return values


def threshold_suffix(thresh: float) -> str:
    """Column suffix of a threshold: '@0.50', '@0.75', '@0.525'."""
    text = f"{thresh:.2f}"
    return "@" + (text if float(text) == thresh else repr(float(thresh)))


# ---------------------------------------------------------------------------------------------
# Dataset evaluation


@dataclass
class EvaluationResult:
    """``per_image``: one flat row per image; ``summary``: one row per domain and 'all';
    ``errors``: (name, message) of pairs that could not be scored."""

    thresholds: tuple[float, ...]
    per_image: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "per_image": self.per_image, "summary": self.summary,
                "errors": [{"name": n, "error": e} for n, e in self.errors]}


def _score_pair(item, thresholds, empty_value, instance_empty_value) -> dict:
    name, domain, y_true, y_pred = item
    y_true = y_true() if callable(y_true) else y_true  # lazy loaders are read in the worker thread
    y_pred = y_pred() if callable(y_pred) else y_pred
    y_true, y_pred = _check_pair(y_true, y_pred, name=str(name))
    ov, matches = _kernel_call(_matching.match_instances, y_true, y_pred, thresholds, name=str(name))
    row = {"name": str(name), "domain": str(domain)}
    row.update(pixel_scores_from_counts(*ov.foreground_counts(), empty_value=empty_value).to_dict())
    row["n_true"], row["n_pred"] = ov.n_true, ov.n_pred
    for m in matches:
        s = instance_scores_from_counts(m.thresh, m.tp, m.fp, m.fn, m.sum_matched_iou, instance_empty_value)
        sfx = threshold_suffix(m.thresh)
        for key in INSTANCE_COUNTS + INSTANCE_RATIOS:
            row[key + sfx] = getattr(s, key)
        row["sum_matched_iou" + sfx] = m.sum_matched_iou
    return row


def _chunks(iterable, size):
    it = iter(iterable)
    while chunk := list(islice(it, size)):
        yield chunk


def evaluate(pairs: Iterable[tuple[str, str, np.ndarray, np.ndarray]], thresholds=(0.5,), quiet: bool = True,
             empty_value: float = 1.0, instance_empty_value: float = 0.0, on_error: str = "raise",
             workers: int | None = None, total: int | None = None) -> EvaluationResult:
    """Score every (name, domain, y_true, y_pred) pair and aggregate per domain and over 'all'.

    Pairs are consumed lazily, a few at a time, and scored in parallel threads (the numba kernels
    release the GIL); ``y_true``/``y_pred`` may also be zero-argument callables that load the arrays,
    called in the worker thread. ``on_error='raise'`` stops at the first bad pair (InputError naming it);
    ``'collect'`` records it in ``.errors`` and scores the rest.
    """
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    thresholds = parse_thresholds(thresholds)
    workers = workers or _matching.cpu_count()
    if total is None and hasattr(pairs, "__len__"):
        total = len(pairs)
    result = EvaluationResult(thresholds)

    def score(item):
        try:
            return _score_pair(item, thresholds, empty_value, instance_empty_value)
        except (ValueError, OSError) as exc:  # InputError, unreadable or missing files
            if on_error == "raise":
                raise
            return exc

    bar = progress_bar(total, desc="scoring", quiet=quiet, unit="image")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for chunk in _chunks(pairs, 2 * max(1, workers)):
            for item, row in zip(chunk, pool.map(score, chunk)):
                if isinstance(row, Exception):
                    result.errors.append((str(item[0]), str(row)))
                else:
                    result.per_image.append(row)
                bar.update(1)
    bar.close()
    result.summary = summarise(result.per_image, thresholds)
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan
    return float(np.mean(arr)), std


def summarise(rows: Sequence[dict], thresholds: Sequence[float]) -> list[dict]:
    """One row per domain (in first-seen order) and 'all': ``<metric>_mean``/``<metric>_std`` (ddof=1)
    over images; pooled ``tp/fp/fn@t``; micro-averaged ``micro_<ratio>@t`` from the pooled counts."""
    domains: dict[str, list[dict]] = {}
    for row in rows:
        domains.setdefault(row["domain"], []).append(row)
    groups = list(domains.items())
    if len(groups) != 1 or groups[0][0] != "all":
        groups.append(("all", list(rows)))
    ratio_keys = list(PIXEL_METRICS) + [k + threshold_suffix(t) for t in thresholds for k in INSTANCE_RATIOS]
    out = []
    for domain, group in groups:
        summary = {"domain": domain, "n_images": len(group)}
        for key in ratio_keys:
            summary[key + "_mean"], summary[key + "_std"] = _mean_std([r[key] for r in group])
        summary["n_true"] = int(sum(r["n_true"] for r in group))
        summary["n_pred"] = int(sum(r["n_pred"] for r in group))
        for t in thresholds:
            sfx = threshold_suffix(t)
            tp, fp, fn = (int(sum(r[k + sfx] for r in group)) for k in INSTANCE_COUNTS)
            pooled = instance_scores_from_counts(t, tp, fp, fn, sum(r["sum_matched_iou" + sfx] for r in group))
            summary.update({"tp" + sfx: tp, "fp" + sfx: fp, "fn" + sfx: fn})
            for key in INSTANCE_RATIOS:
                summary["micro_" + key + sfx] = getattr(pooled, key)
        out.append(summary)
    return out


def summary_tables(result: EvaluationResult) -> tuple[list[dict], list[dict]]:
    """Two compact tables for printing: pixel scores per domain, and instance scores per domain and
    threshold; each cell "mean ± std" (std over images, ddof=1)."""
    def cell(row, key):
        mean, std = row[key + "_mean"], row[key + "_std"]
        if math.isnan(mean):
            return "nan"
        return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"

    pixel, instance = [], []
    for row in result.summary:
        pixel.append({"domain": row["domain"], "images": row["n_images"],
                      **{k: cell(row, k) for k in PIXEL_METRICS}})
        for t in result.thresholds:
            sfx = threshold_suffix(t)
            instance.append({
                "domain": row["domain"], "thresh": f"{t:g}",
                "f1": cell(row, "f1" + sfx), "accuracy (AP)": cell(row, "accuracy" + sfx),
                "panoptic_quality": cell(row, "panoptic_quality" + sfx),
                "micro f1": f"{row['micro_f1' + sfx]:.3f}",
                "micro PQ": f"{row['micro_panoptic_quality' + sfx]:.3f}",
                "tp/fp/fn": f"{row['tp' + sfx]}/{row['fp' + sfx]}/{row['fn' + sfx]}"})
    return pixel, instance
