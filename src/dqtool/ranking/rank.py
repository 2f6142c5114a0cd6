"""Label-free model ranking by consistency under perturbation (CTE, paper 004, section 2.3).

Every Cellpose model in a folder runs on the unlabelled target images twice, unperturbed and
perturbed (:mod:`dqtool.perturb`). Per image it gets three consistencies (:mod:`dqtool.consistency`):
the NHD score (eq. 5) and effective invariance (eq. 4) of p = sigmoid(cellprob), and the adapted
Rand F-score (eq. 6) of the two label maps. A model's score is the median over images (eq. 3 with
one perturbed run), NaNs (empty unions) left out and counted; models are ranked by descending score
(``score='adapted_rand'`` by default; Cellpose is an instance model).

Both runs see the same input: the image in grayscale (Cellpose channels [0, 0]) normalised by
Cellpose's own ``normalize_img`` (1st/99th percentile), then perturbed for input perturbations; the
model's normalisation is then switched off. With labels, each model's F1 at IoU 0.5 and mean
accuracy over IoU 0.5:0.95 (:mod:`dqtool.metrics`) are correlated with the scores: Pearson on raw
values, Spearman and Kendall on ranks, each with a permutation-test p-value.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dqtool.common.figures import pyplot, save_figure
from dqtool.ranking.consistency import adapted_rand, cellprob_to_probability, semantic_consistency
from dqtool.common.errors import InputError
from dqtool.data.io import read_image, read_labels, to_gray
from dqtool.data.naming import LabelFolder, list_input_images
from dqtool.ranking.perturb import PERTURBATIONS, bottleneck_dropout, default_strength, perturb_image
from dqtool.common.progress import bar
from dqtool.common.tables import format_markdown, write_json, write_table
from dqtool.segmentation.model_files import discover_models

__all__ = ["rank_models", "RankResult", "ModelScore", "discover_models", "SCORES", "correlations"]

SCORES = ("adapted_rand", "nhd", "effective_invariance")
THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # IoU 0.5:0.95


@dataclass
class ModelScore:
    """One model's ranking record (medians over images; ``n_*`` = images that counted)."""

    model: str
    status: str = "ok"  # ok | failed
    error: str = ""
    rank: int | None = None
    score: float = math.nan
    adapted_rand: float = math.nan
    nhd: float = math.nan
    effective_invariance: float = math.nan
    n_adapted_rand: int = 0
    n_nhd: int = 0
    n_effective_invariance: int = 0
    n_images: int = 0
    f1: float = math.nan  # with labels: mean over labelled images of F1 at IoU 0.5
    accuracy: float = math.nan  # with labels: mean over images of the mean accuracy at IoU 0.5:0.95
    n_labelled: int = 0
    seconds: float = 0.0
    per_image: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_image")
        return d


@dataclass
class RankResult:
    models: list  # ModelScore, best first, failed last
    score: str
    perturbation: str
    strength: float
    seed: int
    skipped: list  # (file, reason)
    notes: list
    correlations: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)

    @property
    def ranked(self) -> list:
        return [m for m in self.models if m.status == "ok"]

    def table(self) -> list[dict]:
        cols = ["rank", "model", "score", "adapted_rand", "nhd", "effective_invariance", "n_images",
                "n_adapted_rand", "n_nhd", "status"]
        if any(m.n_labelled for m in self.models):
            cols += ["f1", "accuracy", "n_labelled"]
        cols += ["error"]
        return [{c: m.to_dict()[c] for c in cols} for m in self.models]

    def to_dict(self) -> dict:
        return {"models": [m.model for m in self.ranked], "score": self.score, "perturbation": self.perturbation,
                "strength": self.strength, "seed": self.seed,
                "failed": [{"model": m.model, "error": m.error} for m in self.models if m.status != "ok"],
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped], "notes": list(self.notes),
                "ranking": [m.to_dict() for m in self.models], "correlations": self.correlations,
                "timing": self.timing}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def load_target_images(files: Sequence[Path]) -> list[np.ndarray]:
    """Read every target image; all must share one size and one bit depth (the batch is scored together)."""
    images = [read_image(f) for f in files]
    first = images[0]
    for f, img in zip(files, images):
        if img.shape[:2] != first.shape[:2]:
            raise InputError(f"{f}: image size {img.shape[:2]} differs from {files[0].name} {first.shape[:2]}; "
                             "rank images of one size (crop or split the folder)")
        if img.dtype != first.dtype:
            raise InputError(f"{f}: pixel type {img.dtype} differs from {files[0].name} ({first.dtype}); "
                             "rank images of one bit depth")
    return images


def normalise_for_model(image: np.ndarray) -> np.ndarray:
    """Grayscale (Cellpose channels [0, 0]) normalised exactly as Cellpose's ``normalize_img`` does."""
    from cellpose import transforms

    gray = to_gray(image)
    return transforms.normalize_img(gray[..., None], axis=-1)[..., 0].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Running one model
# --------------------------------------------------------------------------------------------------

def _eval(model, x: np.ndarray, diameter, batch_size: int):
    masks, flows, _ = model.eval(x, channels=[0, 0], normalize={"normalize": False}, diameter=diameter,
                                 batch_size=batch_size)
    return np.asarray(masks), np.asarray(flows[2], np.float32)


def _instance_performance(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    from dqtool.evaluation.metrics import instance_scores

    records = instance_scores(y_true, y_pred, THRESHOLDS)
    return float(records[0].f1), float(np.mean([r.accuracy for r in records]))


def score_model(model, inputs: Sequence[np.ndarray], perturbation: str, strength: float, seed: int = 0,
                labels: Sequence[np.ndarray | None] | None = None, diameter: float | None = None,
                batch_size: int = 8, tick=None) -> tuple[list[dict], float]:
    """Per-image consistency records of one loaded ``CellposeModel`` and its inference seconds."""
    masks, masks_p, probs, probs_p = [], [], [], []
    inference = 0.0
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        m0, c0 = _eval(model, x, diameter, batch_size)
        if perturbation == "dropout":
            with bottleneck_dropout(model.net, p=strength, seed=seed):
                m1, c1 = _eval(model, x, diameter, batch_size)
        else:
            x_p = perturb_image(x, perturbation, strength, seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            m1, c1 = _eval(model, x_p, diameter, batch_size)
        inference += time.perf_counter() - t0
        masks.append(m0)
        masks_p.append(m1)
        probs.append(cellprob_to_probability(c0))
        probs_p.append(cellprob_to_probability(c1))
        if tick is not None:
            tick()
    semantic = semantic_consistency(np.stack(probs), np.stack(probs_p))  # one kernel call per model
    records = []
    for i in range(len(inputs)):
        rec = {"image": i, "adapted_rand": adapted_rand(masks[i], masks_p[i]), "nhd": float(semantic.nhd[i]),
               "effective_invariance": float(semantic.effective_invariance[i]), "union": int(semantic.union[i]),
               "n_cells": int(masks[i].max()), "n_cells_perturbed": int(masks_p[i].max())}
        if labels is not None and labels[i] is not None:
            rec["f1"], rec["accuracy"] = _instance_performance(labels[i], masks[i])
        records.append(rec)
    return records, inference


def _median(values) -> tuple[float, int]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    return (float(np.median(v)) if v.size else math.nan), int(v.size)


def _summarise(name: str, records: list[dict], score: str) -> ModelScore:
    ms = ModelScore(model=name, n_images=len(records), per_image=records)
    for key in SCORES:
        value, n = _median(r[key] for r in records)
        setattr(ms, key, value)
        setattr(ms, f"n_{key}", n)
    ms.score = getattr(ms, score)
    labelled = [r for r in records if "f1" in r]
    if labelled:
        ms.f1 = float(np.mean([r["f1"] for r in labelled]))
        ms.accuracy = float(np.mean([r["accuracy"] for r in labelled]))
        ms.n_labelled = len(labelled)
    return ms


# --------------------------------------------------------------------------------------------------
# Validation with labels
# --------------------------------------------------------------------------------------------------

def correlations(scores: Sequence[float], performance: Sequence[float], seed: int = 0,
                 n_resamples: int = 9999) -> dict:
    """Pearson (raw values), Spearman and Kendall (ranks) with two-sided permutation-test p-values.

    The permutation test shuffles which performance goes with which score (the scores are permuted,
    ``permutation_type='pairings'`` on one sample); it enumerates all n! pairings when n! <=
    n_resamples (n <= 7 models by default). p = 2 min(P(T >= t), P(T <= t)), capped at 1. Fewer
    than 3 models, or a constant column, give NaN.
    """
    from scipy import stats

    x = np.asarray(scores, np.float64)
    y = np.asarray(performance, np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    out = {"n_models": int(x.size)}
    tests = {"pearson": lambda a, b: stats.pearsonr(a, b).statistic,
             "spearman": lambda a, b: stats.spearmanr(a, b).statistic,
             "kendall": lambda a, b: stats.kendalltau(a, b).statistic}
    for name, fn in tests.items():
        if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            out[name], out[f"{name}_p"] = math.nan, math.nan
            continue
        res = stats.permutation_test((x,), lambda a, fn=fn: fn(a, y), permutation_type="pairings",
                                     n_resamples=n_resamples, alternative="two-sided",
                                     rng=np.random.default_rng(seed))
        out[name], out[f"{name}_p"] = float(res.statistic), float(res.pvalue)
    return out


def _validation_rows(ranked: list[ModelScore], seed: int) -> list[dict]:
    rows = []
    for consistency in SCORES:
        for performance, label in (("f1", "F1@0.5"), ("accuracy", "mean accuracy@0.5:0.95")):
            c = correlations([getattr(m, consistency) for m in ranked], [getattr(m, performance) for m in ranked],
                             seed=seed)
            rows.append({"consistency": consistency, "performance": label, **c})
    return rows


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def plot_ranking(result: RankResult, path: str | os.PathLike) -> Path:
    """Horizontal bar chart of each model's score, best at the top; with labels, F1 beside it."""
    plt = pyplot()

    ranked = result.ranked
    names = [Path(m.model).name for m in ranked][::-1]
    values = [0.0 if math.isnan(m.score) else m.score for m in ranked][::-1]
    with_labels = any(m.n_labelled for m in ranked)
    fig, axes = plt.subplots(1, 2 if with_labels else 1, figsize=(10 if with_labels else 6, 1 + 0.4 * len(names)),
                             squeeze=False)
    ax = axes[0, 0]
    ax.barh(names, values, color="tab:blue")
    ax.set_xlabel(f"median {result.score} ({result.perturbation}, strength {result.strength:g})")
    ax.set_xlim(0, 1)
    ax.set_title("label-free ranking (best at the top)")
    if with_labels:
        ax2 = axes[0, 1]
        ax2.scatter([m.score for m in ranked], [m.f1 for m in ranked], color="tab:orange")
        for m in ranked:
            ax2.annotate(Path(m.model).name, (m.score, m.f1), fontsize=7)
        ax2.set_xlabel(f"median {result.score}")
        ax2.set_ylabel("F1 at IoU 0.5 (labels)")
        ax2.set_title("consistency vs performance")
    fig.tight_layout()
    path = Path(path)
    return save_figure(fig, path, dpi=120)


def write_outputs(result: RankResult, out: str | os.PathLike, image_names: Sequence[str]) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {f"ranking_{k}": v for k, v in write_table(result.table(), out / "ranking").items()}
    per_image = [{"model": Path(m.model).name, "image": image_names[r["image"]],
                  **{k: v for k, v in r.items() if k != "image"}} for m in result.ranked for r in m.per_image]
    if per_image:
        paths.update({f"per_image_{k}": v for k, v in write_table(per_image, out / "per_image").items()})
    if result.correlations:
        paths.update({f"validation_{k}": v for k, v in write_table(result.correlations, out / "validation").items()})
    paths["rank_json"] = write_json(out / "rank.json", result.to_dict())
    if result.ranked:
        paths["plot"] = plot_ranking(result, out / "ranking.png")
    return paths


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------

def rank_models(models_dir: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike | None = None,
                perturbation: str = "dropout", strength: float | None = None, out: str | os.PathLike | None = None,
                score: str = "adapted_rand", seed: int = 0, diameter: float | None = None, batch_size: int = 8,
                quiet: bool = True) -> RankResult:
    """``dqtool rank``: rank every Cellpose model in ``models_dir`` on the unlabelled ``images``.

    Returns a :class:`RankResult` (models best first, failed ones last with their error); with
    ``out`` writes ranking.{csv,md,json}, per_image.*, rank.json, ranking.png and, with ``labels``,
    validation.*.
    """
    t_start = time.perf_counter()
    if perturbation not in PERTURBATIONS:
        raise InputError(f"perturbation {perturbation!r}: expected one of {', '.join(PERTURBATIONS)}")
    if score not in SCORES:
        raise InputError(f"score {score!r}: expected one of {', '.join(SCORES)}")
    strength = default_strength(perturbation) if strength is None else float(strength)
    if perturbation == "dropout" and not 0.0 < strength < 1.0:
        raise InputError(f"dropout strength {strength}: expected a rate in (0, 1)")
    model_files, skipped = discover_models(models_dir)
    if not model_files:
        detail = f"; skipped: {', '.join(Path(f).name + ' (' + r + ')' for f, r in skipped)}" if skipped else ""
        raise InputError(f"{models_dir}: no Cellpose model files found{detail}")
    files = list_input_images(images)
    targets = load_target_images(files)
    inputs = [normalise_for_model(img) for img in targets]
    notes = [f"skipped {Path(f).name}: {r}" for f, r in skipped]
    truth = None
    if labels is not None:
        truth, label_notes = _read_truth(labels, files, targets)
        notes += label_notes

    from dqtool.segmentation.predict import load_model  # validated loading, never a download

    results, inference = [], 0.0
    progress = bar(len(model_files) * len(inputs), desc="rank", quiet=quiet, unit="img")
    try:
        for path in model_files:
            t0 = time.perf_counter()
            try:
                model = load_model(path)
                records, secs = score_model(model, inputs, perturbation, strength, seed=seed, labels=truth,
                                            diameter=diameter, batch_size=batch_size,
                                            tick=lambda: progress.update(1))
                inference += secs
                ms = _summarise(str(path), records, score)
            except Exception as exc:  # one broken model must not stop the ranking of the others
                ms = ModelScore(model=str(path), status="failed", error=f"{type(exc).__name__}: {exc}")
                notes.append(f"failed {path.name}: {ms.error}")
            ms.seconds = time.perf_counter() - t0
            results.append(ms)
    finally:
        progress.close()

    ok = sorted((m for m in results if m.status == "ok"),
                key=lambda m: (math.isnan(m.score), -m.score if not math.isnan(m.score) else 0.0, m.model))
    for i, m in enumerate(ok, 1):
        m.rank = i
    ordered = ok + [m for m in results if m.status != "ok"]
    result = RankResult(models=ordered, score=score, perturbation=perturbation, strength=strength, seed=seed,
                        skipped=skipped, notes=notes)
    if truth is not None:
        result.correlations = _validation_rows(ok, seed)
    result.timing = {"inference_s": inference, "total_s": time.perf_counter() - t_start}
    if out is not None:
        result.paths = write_outputs(result, out, [f.name for f in files])
        result.timing["total_s"] = time.perf_counter() - t_start
        write_json(Path(out) / "rank.json", result.to_dict())
    return result


def _read_truth(labels_dir, files: Sequence[Path], targets: Sequence[np.ndarray]):
    root = Path(labels_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{labels_dir}: no such labels folder")
    truth, missing, notes = [], [], []
    folder = LabelFolder(root)
    for f, img in zip(files, targets):
        p = folder.find(f)
        if p is None:
            truth.append(None)
            missing.append(f.name)
            continue
        lab = read_labels(p)
        if lab.shape != img.shape[:2]:
            raise InputError(f"{p}: label map shape {lab.shape} differs from its image {f.name} {img.shape[:2]}")
        truth.append(lab)
    if len(missing) == len(files):
        raise InputError(f"{labels_dir}: no label file matches any image (looked for <name>_masks, _cp_masks, "
                         "_mask, _label(s), _gt or, in another folder, <name> itself; <name> without _img)")
    if missing:
        notes.append(f"labels missing for {len(missing)} of {len(files)} images ({', '.join(missing)}); "
                     "validation uses the other images")
    return truth, notes


def format_result(result: RankResult) -> str:
    """The ranking as a Markdown table plus notes and correlations (what the CLI prints)."""
    text = format_markdown(result.table(), digits=4)
    if result.correlations:
        text += "\n" + format_markdown(result.correlations, digits=3)
    for note in result.notes:
        text += f"\nnote: {note}"
    return text + "\n"

