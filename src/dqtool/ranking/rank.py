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
from dqtool.common.files import file_sha256
from dqtool.ranking.consistency import adapted_rand, cellprob_to_probability, semantic_consistency
from dqtool.common.errors import InputError
from dqtool.data.io import read_image, read_labels, to_gray
from dqtool.data.naming import LabelFolder, list_input_images
from dqtool.ranking.outputs_cache import OutputsCache
from dqtool.ranking.passes import EvalSettings, ModelPasses, Prediction
from dqtool.ranking.perturb import PERTURBATIONS, bottleneck_dropout, default_strength, perturb_image
from dqtool.common.progress import bar
from dqtool.common.tables import format_markdown, write_json, write_table
from dqtool.segmentation.model_files import builtin_models, discover_models

__all__ = ["rank_models", "rank_bank", "BankRanking", "parse_perturbations", "RankResult", "ModelScore", "discover_models", "SCORES", "correlations"]

SCORES = ("adapted_rand", "nhd", "effective_invariance")
FEATURE_PERTURBATIONS = ("dropout",)  # act inside the network: they reuse the unperturbed encoder pass
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
    """Read every target image; sizes may differ (each image is normalised and scored on its own),
    bit depths may not (a folder mixing them is usually two acquisitions)."""
    images = [read_image(f) for f in files]
    first = images[0]
    for f, img in zip(files, images):
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
    from dqtool.common.notices import known_notices_hidden

    with known_notices_hidden():  # torch's sparse-invariant notice from Cellpose's dynamics
        masks, flows, _ = model.eval(x, channels=[0, 0], normalize={"normalize": False}, diameter=diameter,
                                     batch_size=batch_size)
    return np.asarray(masks), np.asarray(flows[2], np.float32)


def _instance_performance(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    from dqtool.evaluation.metrics import instance_scores

    records = instance_scores(y_true, y_pred, THRESHOLDS)
    return float(records[0].f1), float(np.mean([r.accuracy for r in records]))


def noise_seed(seed: int, image_index: int) -> int:
    """The seed of image ``image_index``'s input perturbation (one stream per image, from the run's seed)."""
    return int(np.random.SeedSequence([seed, image_index]).generate_state(1)[0])


def score_model(model, inputs: Sequence[np.ndarray], perturbation: str, strength: float, seed: int = 0,
                labels: Sequence[np.ndarray | None] | None = None, diameter: float | None = None,
                batch_size: int = 8, tick=None) -> tuple[list[dict], float]:
    """Per-image consistency records of one model and one perturbation, by two ``model.eval`` calls per
    image (the plain loop the shared passes of :func:`score_model_passes` are tested against)."""
    masks, masks_p, cellprobs, cellprobs_p = [], [], [], []
    inference = 0.0
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        m0, c0 = _eval(model, x, diameter, batch_size)
        if perturbation == "dropout":
            with bottleneck_dropout(model.net, p=strength, seed=seed):
                m1, c1 = _eval(model, x, diameter, batch_size)
        else:
            m1, c1 = _eval(model, perturb_image(x, perturbation, strength, seed=noise_seed(seed, i)), diameter,
                           batch_size)
        inference += time.perf_counter() - t0
        masks.append(m0)
        masks_p.append(m1)
        cellprobs.append(c0)
        cellprobs_p.append(c1)
        if tick is not None:
            tick()
    performance = _performance(labels, masks)
    return _records(masks, cellprobs, masks_p, cellprobs_p, performance), inference


def _performance(labels, masks) -> list:
    if labels is None:
        return [None] * len(masks)
    return [None if t is None else _instance_performance(t, m) for t, m in zip(labels, masks)]


def _records(masks, cellprobs, masks_p, cellprobs_p, performance) -> list[dict]:
    """Per-image scores of one perturbation; NHD and EI in one kernel call per image size."""
    n = len(masks)
    nhd_, ei_, union_ = [0.0] * n, [0.0] * n, [0] * n
    by_shape: dict[tuple, list[int]] = {}
    for i, c in enumerate(cellprobs):
        by_shape.setdefault(np.shape(c), []).append(i)
    for members in by_shape.values():
        semantic = semantic_consistency(np.stack([cellprob_to_probability(cellprobs[i]) for i in members]),
                                        np.stack([cellprob_to_probability(cellprobs_p[i]) for i in members]))
        for k, i in enumerate(members):
            nhd_[i], ei_[i] = float(semantic.nhd[k]), float(semantic.effective_invariance[k])
            union_[i] = int(semantic.union[k])
    records = []
    for i in range(n):
        rec = {"image": i, "adapted_rand": adapted_rand(masks[i], masks_p[i]), "nhd": nhd_[i],
               "effective_invariance": ei_[i], "union": union_[i],
               "n_cells": int(masks[i].max()), "n_cells_perturbed": int(masks_p[i].max())}
        if performance[i] is not None:
            rec["f1"], rec["accuracy"] = performance[i]
        records.append(rec)
    return records


def score_model_passes(model, inputs: Sequence[np.ndarray], perturbations: dict[str, float], seed: int = 0,
                       labels: Sequence[np.ndarray | None] | None = None,
                       settings: EvalSettings | None = None, cache: OutputsCache | None = None,
                       model_sha: str = "", image_shas: Sequence[str] = (), image_names: Sequence[str] = (),
                       tick=None) -> tuple[dict[str, list[dict]], float]:
    """Per-image records of every perturbation in ``perturbations`` (kind -> strength) for one model.

    The passes are shared: one encoder pass per image and tile for the unperturbed prediction and
    every feature perturbation (a decoder pass each), one full pass per input perturbation, and no
    unperturbed pass at all for an image whose unperturbed prediction is in ``cache``. Every number
    equals :func:`score_model`'s for each perturbation alone (tested).
    """
    t0 = time.perf_counter()
    passes = ModelPasses(model, settings or EvalSettings())
    n = len(inputs)
    names = list(image_names) or [str(i) for i in range(n)]
    plain: list = [None] * n
    if cache is not None:
        plain = [cache.load(model_sha, image_shas[i], f"{Path(str(getattr(model, 'pretrained_model', ''))).name} "
                                                      f"on {names[i]}") for i in range(n)]
    feature = [k for k in perturbations if k in FEATURE_PERTURBATIONS]
    missing = [i for i in range(n) if plain[i] is None]
    outputs: dict[str, dict[int, Prediction]] = {k: {} for k in perturbations}

    # the unperturbed stream: one encoder pass, decoded as is and under every feature perturbation
    stream = list(range(n)) if feature else missing
    if stream:
        tiled = [passes.tile(inputs[i]) for i in stream]
        decode_plain = bool(missing)

        def heads(encoded):
            ys = {"": passes.decode(encoded)} if decode_plain else {}
            for kind in feature:
                with bottleneck_dropout(passes.net, p=perturbations[kind], seed=seed):
                    ys[kind] = passes.decode(encoded)
            return ys

        for i, t, ys in zip(stream, tiled, passes.run(tiled, heads)):
            if plain[i] is None:
                plain[i] = passes.masks(t, *passes.untile(t, ys[""]))
                if cache is not None:
                    cache.store(model_sha, image_shas[i], plain[i])
            for kind in feature:
                outputs[kind][i] = passes.masks(t, *passes.untile(t, ys[kind]))

    # every input perturbation: one full pass of the perturbed images
    for kind in (k for k in perturbations if k not in FEATURE_PERTURBATIONS):
        tiled = [passes.tile(perturb_image(x, kind, perturbations[kind], seed=noise_seed(seed, i)))
                 for i, x in enumerate(inputs)]
        for i, (t, ys) in enumerate(zip(tiled, passes.run(tiled, lambda encoded: {"": passes.decode(encoded)}))):
            outputs[kind][i] = passes.masks(t, *passes.untile(t, ys[""]))
    inference = time.perf_counter() - t0
    if tick is not None:
        for _ in range(n):
            tick()

    masks = [p.masks for p in plain]
    cellprobs = [p.cellprob for p in plain]
    performance = _performance(labels, masks)
    records = {kind: _records(masks, cellprobs, [outputs[kind][i].masks for i in range(n)],
                              [outputs[kind][i].cellprob for i in range(n)], performance)
               for kind in perturbations}
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

def parse_perturbations(perturbation) -> tuple[str, ...]:
    """``"dropout,noise"`` or a sequence of names -> the names, each known and listed once."""
    text = perturbation if isinstance(perturbation, str) else ",".join(perturbation)
    kinds = tuple(k.strip() for k in text.split(","))
    for k in kinds:
        if k not in PERTURBATIONS:
            raise InputError(f"perturbation {k!r} in {text!r}: expected one of {', '.join(PERTURBATIONS)}")
        if kinds.count(k) > 1:
            raise InputError(f"perturbation {k!r} is listed twice in {text!r}; list each once")
    return kinds


def resolve_strengths(kinds: Sequence[str], strength) -> dict[str, float]:
    """One strength per perturbation: None (the defaults), one number (one perturbation only), or a
    list (``"0.2,0.1"``) in the order of the perturbations."""
    if strength is None:
        values = [default_strength(k) for k in kinds]
    else:
        items = strength.split(",") if isinstance(strength, str) else \
            list(strength) if isinstance(strength, (list, tuple)) else [strength]
        if len(items) != len(kinds):
            raise InputError(f"strength {strength!r}: {len(items)} value(s) for {len(kinds)} perturbation(s) "
                             f"({','.join(kinds)}); give one per perturbation, in the same order")
        try:
            values = [default_strength(k) if str(v).strip() == "" else float(v) for k, v in zip(kinds, items)]
        except ValueError:
            raise InputError(f"strength {strength!r}: expected numbers") from None
    for k, v in zip(kinds, values):
        if k == "dropout" and not 0.0 < v < 1.0:
            raise InputError(f"dropout strength {v}: expected a rate in (0, 1)")
        if not math.isfinite(v):
            raise InputError(f"{k} strength {v}: expected a finite number")
    return dict(zip(kinds, values))


@dataclass
class BankRanking:
    """One ranking per perturbation, from one run whose passes they share."""

    results: dict  # perturbation -> RankResult
    notes: list
    timing: dict
    cache: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def rank_models(models_dir: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike | None = None,
                perturbation: str = "dropout", strength: float | None = None, out: str | os.PathLike | None = None,
                score: str = "adapted_rand", seed: int = 0, diameter: float | None = None, batch_size: int = 8,
                quiet: bool = True, cache: bool = True, builtin=None) -> RankResult:
    """``dqtool rank`` with one perturbation: the :class:`RankResult` of :func:`rank_bank`."""
    kinds = parse_perturbations(perturbation)
    if len(kinds) != 1:
        raise InputError(f"perturbation {perturbation!r}: rank_models takes one; rank_bank takes a list")
    bank = rank_bank(models_dir, images, labels=labels, perturbations=kinds, strength=strength, out=out,
                     score=score, seed=seed, diameter=diameter, batch_size=batch_size, quiet=quiet, cache=cache,
                     builtin=builtin)
    return bank.results[kinds[0]]


def rank_bank(models_dir: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike | None = None,
              perturbations="dropout", strength=None, out: str | os.PathLike | None = None,
              score: str = "adapted_rand", seed: int = 0, diameter: float | None = None, batch_size: int = 8,
              quiet: bool = True, cache: bool = True, builtin=None) -> BankRanking:
    """``dqtool rank``: rank every Cellpose model in ``models_dir`` on the unlabelled ``images``, once per
    perturbation in ``perturbations`` (``"dropout,noise"`` or a list), all from shared network passes.

    Each :class:`RankResult` has its models best first, failed ones last with their error. With
    ``out``: one perturbation writes ranking.{csv,md,json}, per_image.*, rank.json, ranking.png and,
    with ``labels``, validation.* into ``out``; several write them into ``out/<perturbation>/``, the
    same files a run with that perturbation alone writes. The unperturbed predictions are cached in
    ``out/cache/`` unless ``cache`` is False. ``builtin`` (``"cyto3,nuclei"`` or a list) adds Cellpose's
    built-in models by name, read from Cellpose's model folder and never downloaded
    (:func:`dqtool.segmentation.model_files.builtin_models`).
    """
    t_start = time.perf_counter()
    kinds = parse_perturbations(perturbations)
    if score not in SCORES:
        raise InputError(f"score {score!r}: expected one of {', '.join(SCORES)}")
    strengths = resolve_strengths(kinds, strength)
    model_files, skipped = discover_models(models_dir)
    if builtin:
        model_files += builtin_models(builtin)
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
    settings = EvalSettings(diameter=diameter, batch_size=batch_size)
    store = None
    if cache and out is not None:
        store = OutputsCache(Path(out) / "cache", settings.key())
        image_shas = [file_sha256(f) for f in files]
    else:
        image_shas = [""] * len(files)

    from dqtool.segmentation.predict import load_model  # validated loading, never a download

    per_kind: dict[str, list[ModelScore]] = {k: [] for k in kinds}
    inference = 0.0
    progress = bar(len(model_files) * len(inputs), desc="rank", quiet=quiet, unit="img")
    try:
        for path in model_files:
            t0 = time.perf_counter()
            try:
                model = load_model(path)
                model_sha = "" if store is None else file_sha256(path)
                records, secs = score_model_passes(model, inputs, strengths, seed=seed, labels=truth,
                                                   settings=settings, cache=store, model_sha=model_sha,
                                                   image_shas=image_shas, image_names=[f.name for f in files],
                                                   tick=lambda: progress.update(1))
                inference += secs
                scores = {k: _summarise(str(path), records[k], score) for k in kinds}
            except Exception as exc:  # one broken model must not stop the ranking of the others
                error = f"{type(exc).__name__}: {exc}"
                scores = {k: ModelScore(model=str(path), status="failed", error=error) for k in kinds}
                notes.append(f"failed {path.name}: {error}")
            seconds = time.perf_counter() - t0
            for k in kinds:
                scores[k].seconds = seconds
                per_kind[k].append(scores[k])
    finally:
        progress.close()
    if store is not None:
        notes += store.notes

    timing = {"inference_s": inference, "total_s": time.perf_counter() - t_start}
    results = {k: _result(per_kind[k], score, k, strengths[k], seed, skipped, notes, truth, timing) for k in kinds}
    bank = BankRanking(results=results, notes=notes, timing=timing, cache={} if store is None else store.to_dict())
    if out is not None:
        for k, result in results.items():
            folder = Path(out) if len(kinds) == 1 else Path(out) / k
            result.paths = write_outputs(result, folder, [f.name for f in files])
            bank.paths[k] = result.paths
        total = time.perf_counter() - t_start
        for k, result in results.items():
            result.timing["total_s"] = total
            write_json(result.paths["rank_json"], result.to_dict())
    bank.timing["total_s"] = time.perf_counter() - t_start
    return bank


def _result(models: list, score, perturbation, strength, seed, skipped, notes, truth, timing) -> RankResult:
    ok = sorted((m for m in models if m.status == "ok"),
                key=lambda m: (math.isnan(m.score), -m.score if not math.isnan(m.score) else 0.0, m.model))
    for i, m in enumerate(ok, 1):
        m.rank = i
    ordered = ok + [m for m in models if m.status != "ok"]
    result = RankResult(models=ordered, score=score, perturbation=perturbation, strength=strength, seed=seed,
                        skipped=skipped, notes=list(notes), timing=dict(timing))
    if truth is not None:
        result.correlations = _validation_rows(ok, seed)
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



def format_bank(bank: BankRanking) -> str:
    """Every perturbation's ranking (what the CLI prints), then where the files are."""
    parts = []
    for kind, result in bank.results.items():
        head = f"## {kind} (strength {result.strength:g})\n\n" if len(bank.results) > 1 else ""
        parts.append(head + format_result(result))
        where = Path(result.paths["rank_json"]) if result.paths else None
        if where is not None:
            parts.append(f"{where}: {len(result.ranked)} ranked, {len(result.models) - len(result.ranked)} failed, "
                         f"{len(result.skipped)} skipped\n")
    if bank.cache:
        parts.append(f"cache {bank.cache['folder']}: {bank.cache['hits']} unperturbed predictions reused, "
                     f"{bank.cache['written']} written\n")
    return "".join(parts)
