"""Label-free model ranking by consistency under perturbation (CTE, paper 004, section 2.3).

Every Cellpose model in a folder runs on the unlabelled target images twice, unperturbed and
perturbed (:mod:`dqtool.perturb`). Per image it gets three consistencies (:mod:`dqtool.consistency`):
the NHD score (eq. 5) and effective invariance (eq. 4) of p = sigmoid(cellprob), and the adapted
Rand F-score (eq. 6) of the two label maps. A model's score is the median over images (eq. 3 with
one perturbed run), NaNs (empty unions) left out and counted; models are ranked by descending score
(``score='adapted_rand'`` by default; Cellpose is an instance model). An image where the model's
unperturbed prediction holds no cell counts by the ``empty`` rule (:func:`apply_empty_rule`):
``worst`` (default) scores it 0 when another model finds cells there, ``skip`` (the paper's code)
leaves its adapted Rand out. Feature dropout acts at ``dropout_site`` with channels drawn per
``dropout_draw`` (:mod:`dqtool.ranking.perturb`).

Both runs see the same input: the image in grayscale (Cellpose channels [0, 0]) normalised by
Cellpose's own ``normalize_img`` (1st/99th percentile), then perturbed for input perturbations; the
model's normalisation is then switched off. With labels, each model's F1 at IoU 0.5 and mean
accuracy over IoU 0.5:0.95 (:mod:`dqtool.metrics`) are correlated with the scores: Pearson on raw
values, Spearman and Kendall on ranks, each with a permutation-test p-value.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from dqtool.common.cluster import Cluster, iter_tasks
from dqtool.common.figures import pyplot, save_figure
from dqtool.common.files import file_sha256
from dqtool.common.outputs import writes_folder
from dqtool.ranking.consistency import adapted_rand, cellprob_to_probability, semantic_consistency
from dqtool.common.errors import InputError
from dqtool.data.io import read_image, read_labels, to_gray
from dqtool.data.naming import LabelFolder, list_input_images
from dqtool.ranking.outputs_cache import OutputsCache
from dqtool.ranking.passes import EvalSettings, ModelPasses, Prediction
from dqtool.ranking.perturb import (DEFAULT_DROPOUT_DRAW, DEFAULT_DROPOUT_SITE, PERTURBATIONS, ChannelDropout,
                                   bottleneck_dropout, check_dropout_options, default_strength, perturb_image)
from dqtool.common.tables import format_markdown, write_json, write_table
from dqtool.segmentation.model_files import builtin_models, discover_models

__all__ = ["rank_models", "rank_bank", "BankRanking", "parse_perturbations", "RankResult", "ModelScore", "discover_models", "SCORES", "correlations",
           "target_files",
           "EMPTY_RULES", "DEFAULT_EMPTY", "apply_empty_rule", "rescore_empty", "read_ranking"]

SCORES = ("adapted_rand", "nhd", "effective_invariance")
FEATURE_PERTURBATIONS = ("dropout",)  # act inside the network: they reuse the unperturbed encoder pass
THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # IoU 0.5:0.95
EMPTY_RULES = ("worst", "skip")  # how an image where a model finds nothing counts (apply_empty_rule)
DEFAULT_EMPTY = "worst"  # recommended (see apply_empty_rule); the lead confirms it on the real bank


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
    n_empty: int = 0  # images where the unperturbed prediction holds no cell (n_cells == 0)
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
    options: dict = field(default_factory=dict)  # dropout_site, dropout_draw, empty
    inputs: str = ""  # ranking_inputs' digest: what decides every number (written to rank.json when known)

    @property
    def ranked(self) -> list:
        return [m for m in self.models if m.status == "ok"]

    def table(self) -> list[dict]:
        cols = ["rank", "model", "score", "adapted_rand", "nhd", "effective_invariance", "n_images",
                "n_adapted_rand", "n_nhd", "n_empty", "status"]
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
                "timing": self.timing, **self.options, **({"inputs": self.inputs} if self.inputs else {})}


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
                batch_size: int = 8, tick=None, dropout_site: str = DEFAULT_DROPOUT_SITE,
                dropout_draw: str = DEFAULT_DROPOUT_DRAW) -> tuple[list[dict], float]:
    """Per-image consistency records of one model and one perturbation, by two ``model.eval`` calls per
    image (the plain loop the shared passes of :func:`score_model_passes` are tested against).

    Dropout acts at ``dropout_site`` with one :class:`~dqtool.ranking.perturb.ChannelDropout` for the
    whole loop (its 'batch' draws follow ``eval``'s batches, image after image)."""
    masks, masks_p, cellprobs, cellprobs_p = [], [], [], []
    inference = 0.0
    check_dropout_options(dropout_site, dropout_draw)
    dropout = ChannelDropout(strength, seed, dropout_draw) if perturbation == "dropout" else None
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        m0, c0 = _eval(model, x, diameter, batch_size)
        if perturbation == "dropout":
            with bottleneck_dropout(model.net, site=dropout_site, dropout=dropout):
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
                       tick=None, dropout_site: str = DEFAULT_DROPOUT_SITE,
                       dropout_draw: str = DEFAULT_DROPOUT_DRAW,
                       image_indices: Sequence[int] = ()) -> tuple[dict[str, list[dict]], float]:
    """Per-image records of every perturbation in ``perturbations`` (kind -> strength) for one model.

    The passes are shared: one encoder pass per image and tile for the unperturbed prediction and
    every feature perturbation (a decoder pass each), one full pass per input perturbation, and no
    unperturbed pass at all for an image whose unperturbed prediction is in ``cache``. Both dropout
    sites act after the shared encoder pass (``bottleneck`` recomputes the style from the dropped
    features in the decoder's hook). Every number equals :func:`score_model`'s for each perturbation
    alone (tested) under ``dropout_draw='run'``; under 'batch' the channels are drawn anew for each
    of :meth:`ModelPasses.batches`' batches (tiles of several images packed together), one stream
    per call, so they differ from ``eval``'s per-image batches.

    ``image_indices``: the positions of ``inputs`` in the run (default 0, 1, ...), which give each
    image its noise seed (:func:`noise_seed`) and its records' ``image``; with them, a 'batch' dropout
    stream is seeded by the first image's :func:`noise_seed` (:func:`score_pair` passes one image, so
    every image of a ranking has a stream of its own, whatever task runs it).
    """
    check_dropout_options(dropout_site, dropout_draw)
    index = [int(i) for i in image_indices] or list(range(len(inputs)))
    t0 = time.perf_counter()
    passes = ModelPasses(model, settings or EvalSettings())
    n = len(inputs)
    names = list(image_names) or [str(i) for i in range(n)]
    plain: list = [None] * n
    if cache is not None:
        plain = [cache.load(model_sha, image_shas[i], f"{Path(str(getattr(model, 'pretrained_model', ''))).name} "
                                                      f"on {names[i]}") for i in range(n)]
    feature = [k for k in perturbations if k in FEATURE_PERTURBATIONS]
    stream_seed = noise_seed(seed, index[0]) if image_indices and dropout_draw == "batch" else seed
    dropouts = {k: ChannelDropout(perturbations[k], stream_seed, dropout_draw) for k in feature}  # one stream per call
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
                with bottleneck_dropout(passes.net, site=dropout_site, dropout=dropouts[kind]):
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
        tiled = [passes.tile(perturb_image(x, kind, perturbations[kind], seed=noise_seed(seed, index[i])))
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
    if image_indices:
        for recs in records.values():
            for rec in recs:
                rec["image"] = index[rec["image"]]
    return records, inference


# --------------------------------------------------------------------------------------------------
# One task of a ranking: one model on one image, every perturbation (serial or on Dask workers)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankPair:
    """What :func:`score_pair` needs to score one model on one image (small: paths, not arrays).

    The seeds come from the run's ``seed`` and the image's ``index`` alone (:func:`noise_seed`; dropout
    channels from ``seed``), never from the worker or the order the tasks run in.
    """

    model: str
    image: str
    index: int  # the image's position in the run
    perturbations: tuple  # ((kind, strength), ...)
    seed: int
    settings: EvalSettings
    dropout_site: str = DEFAULT_DROPOUT_SITE
    dropout_draw: str = DEFAULT_DROPOUT_DRAW
    label: str | None = None  # its label file (validation), read where the task runs
    labelled: bool = False  # the run has labels (an image without a label file has label None)
    model_sha: str = ""  # with the outputs cache: its key
    image_sha: str = ""
    cache: str | None = None  # the outputs cache folder: read by the task, written by the client only
    cache_settings: dict | None = None  # OutputsCache.settings, as the client computed them


@dataclass
class PairResult:
    """One :class:`RankPair`'s per-image records (kind -> record), or the error that stopped it."""

    records: dict = field(default_factory=dict)
    inference: float = 0.0
    seconds: float = 0.0
    error: str = ""
    plain: Prediction | None = None  # an unperturbed prediction the cache lacked: the client stores it
    hits: int = 0
    notes: list = field(default_factory=list)


class _PairCache:
    """The outputs cache as one task sees it: reads through :class:`OutputsCache`, and keeps what
    :func:`score_model_passes` would store for the client to write (the one writer of the cache)."""

    def __init__(self, reader: OutputsCache):
        self.reader = reader
        self.computed: Prediction | None = None

    def load(self, model_sha: str, image_sha: str, what: str) -> Prediction | None:
        return self.reader.load(model_sha, image_sha, what)

    def store(self, model_sha: str, image_sha: str, pred: Prediction) -> None:
        self.computed = pred


_LOADED: "OrderedDict[tuple, object]" = OrderedDict()  # the last models this process loaded (a worker's)
_KEEP_LOADED = 2


def _loaded_model(path: str, sha: str):
    """The model at ``path``, loaded once for the consecutive images a process scores with it.

    Keyed by the file's content (sha256, or size and mtime) and the thread, so a changed file is read
    again and threads of one worker never share a network (the dropout hooks sit on it).
    """
    from dqtool.segmentation.predict import load_model  # validated loading, never a download

    st = os.stat(path)
    key = (str(path), sha or (st.st_size, st.st_mtime_ns), threading.get_ident())
    if key not in _LOADED:
        _LOADED[key] = load_model(path)
        while len(_LOADED) > _KEEP_LOADED:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return _LOADED[key]


def score_pair(pair: RankPair) -> PairResult:
    """Rank task: one model on one image under every perturbation of the run (shared passes,
    :func:`score_model_passes`), records as the serial loop over the bank gives them, bit for bit.

    Reads the model, the image (normalised as :func:`normalise_for_model`), its label and the outputs
    cache; writes nothing. An error (a broken model) is returned, not raised: one broken model must
    not stop the ranking of the others.
    """
    t0 = time.perf_counter()
    reader = None
    try:
        model = _loaded_model(pair.model, pair.model_sha)
        x = normalise_for_model(read_image(pair.image))
        labels = [None if pair.label is None else read_labels(pair.label)] if pair.labelled else None
        reader = _PairCache(OutputsCache(Path(pair.cache), pair.cache_settings or {})) if pair.cache else None
        records, inference = score_model_passes(
            model, [x], dict(pair.perturbations), seed=pair.seed, labels=labels, settings=pair.settings,
            cache=reader, model_sha=pair.model_sha, image_shas=[pair.image_sha], image_names=[Path(pair.image).name],
            dropout_site=pair.dropout_site, dropout_draw=pair.dropout_draw, image_indices=[pair.index])
    except Exception as exc:  # noqa: BLE001 - the model fails, the ranking goes on
        return PairResult(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0,
                          hits=0 if reader is None else reader.reader.hits,
                          notes=[] if reader is None else list(reader.reader.notes))
    return PairResult(records={k: v[0] for k, v in records.items()}, inference=inference,
                      seconds=time.perf_counter() - t0, plain=None if reader is None else reader.computed,
                      hits=0 if reader is None else reader.reader.hits,
                      notes=[] if reader is None else list(reader.reader.notes))


def _median(values) -> tuple[float, int]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    return (float(np.median(v)) if v.size else math.nan), int(v.size)


def _found_nothing(record: dict) -> bool:
    """The unperturbed prediction of this image holds no cell (records without a count found some)."""
    return record.get("n_cells", 1) == 0


def _counted(record: dict, key: str, empty: str, found_elsewhere: bool) -> float:
    """The value of score ``key`` that enters the median under the ``empty`` rule (:func:`apply_empty_rule`)."""
    if not _found_nothing(record):
        return record[key]
    if empty == "worst" and found_elsewhere:
        return 0.0  # the worst value of every score (all three lie in [0, 1])
    return math.nan if key == "adapted_rand" else record[key]  # the paper's code: NaN on an empty map


def _summarise(name: str, records: list[dict], score: str, empty: str = DEFAULT_EMPTY,
               found_elsewhere: Sequence[bool] | None = None) -> ModelScore:
    """One model's medians over its per-image ``records`` under the ``empty`` rule.

    ``found_elsewhere[i]``: another model of the bank finds a cell on image i (None: not known, so no
    image scores 'worst'; :func:`apply_empty_rule` summarises again once the whole bank is known).
    """
    if empty not in EMPTY_RULES:
        raise InputError(f"empty {empty!r}: expected one of {', '.join(EMPTY_RULES)}")
    elsewhere = [False] * len(records) if found_elsewhere is None else list(found_elsewhere)
    ms = ModelScore(model=name, n_images=len(records), per_image=records)
    ms.n_empty = sum(_found_nothing(r) for r in records)
    for key in SCORES:
        value, n = _median(_counted(r, key, empty, e) for r, e in zip(records, elsewhere))
        setattr(ms, key, value)
        setattr(ms, f"n_{key}", n)
    ms.score = getattr(ms, score)
    labelled = [r for r in records if "f1" in r]
    if labelled:
        ms.f1 = float(np.mean([r["f1"] for r in labelled]))
        ms.accuracy = float(np.mean([r["accuracy"] for r in labelled]))
        ms.n_labelled = len(labelled)
    return ms


def apply_empty_rule(models: Sequence[ModelScore], score: str, empty: str = DEFAULT_EMPTY) -> list[ModelScore]:
    """The bank's models summarised again under the ``empty`` rule, now that every model's images are known.

    Model m "finds nothing" on image i when its unperturbed label map holds no cell (n_cells = 0), and
    "another model finds cells" there when some other ranked model m' has n_cells(m', i) > 0. The value
    of score s (adapted Rand, NHD, EI) that enters m's median is::

        s'(m, i) = s(m, i)                        if m finds cells on i
                 = 0                              if m finds nothing on i, another model does, empty = 'worst'
                 = NaN (left out), adapted Rand   otherwise (empty = 'skip', or no model finds cells on i)
                 = s(m, i), NHD and EI            otherwise (NaN where the union of foregrounds is empty)

        score(m) = median of s'(m, i) over the images i where s'(m, i) is not NaN   (n_<score> = their number)

    ``skip`` is the paper's code: the adapted Rand of an empty unperturbed map is NaN and the median
    runs over the other images, so a model that finds nothing on most images is ranked by the few where
    it found something (and often ranks high: a small, stable prediction). ``worst`` (the default)
    counts a failure as a failure: where the other models show that there are cells to find, finding
    none is the least consistent outcome a model can have, so the image scores the worst value of
    each score, 0, and the median runs over the same images for every model that could have found
    something. An image where no model finds a cell (truly empty, or too hard for the whole bank)
    stays out for everyone under both rules, as in the paper (which limits evaluation to non-empty
    images). ``ModelScore.n_empty`` reports the images where the model found nothing.
    """
    if empty not in EMPTY_RULES:
        raise InputError(f"empty {empty!r}: expected one of {', '.join(EMPTY_RULES)}")
    ok = [m for m in models if m.status == "ok" and m.per_image]
    n = max((len(m.per_image) for m in ok), default=0)
    finders = np.zeros(n, np.int64)
    for m in ok:
        finders[:len(m.per_image)] += [not _found_nothing(r) for r in m.per_image]
    ok_ids = {id(m) for m in ok}
    out = []
    for m in models:
        if id(m) not in ok_ids:
            out.append(m)
            continue
        elsewhere = [finders[i] - (not _found_nothing(r)) > 0 for i, r in enumerate(m.per_image)]
        new = _summarise(m.model, m.per_image, score, empty, elsewhere)
        new.seconds, new.rank = m.seconds, m.rank
        out.append(new)
    return out


def rescore_empty(result: RankResult, empty: str) -> RankResult:
    """The ranking ``result`` under the ``empty`` rule ``empty``, from its models' per-image records alone: no
    network pass (the rule only decides which per-image values enter each median, :func:`apply_empty_rule`),
    the same models, ranks, tables and correlations a :func:`rank_bank` run with ``empty`` gives."""
    if empty not in EMPTY_RULES:
        raise InputError(f"empty {empty!r}: expected one of {', '.join(EMPTY_RULES)}")
    models = apply_empty_rule(result.models, result.score, empty)
    labelled = any(m.n_labelled for m in models)
    out = _result(models, result.score, result.perturbation, result.strength, result.seed, result.skipped,
                  result.notes, True if labelled else None, result.timing)
    out.options = {**result.options, "empty": empty}
    out.inputs = result.inputs  # the same passes and files: only the options differ
    return out


def _nan(value):
    return math.nan if value is None else value  # write_json writes NaN as null


def read_ranking(folder: str | os.PathLike) -> RankResult:
    """A ranking :func:`rank_bank` wrote into ``folder`` (``rank.json``, ``per_image.json``) read back, with each
    model's per-image records (``image``: its index in the order the images were ranked), so that
    :func:`rescore_empty` can summarise it again. A folder without them is one clear error."""
    folder = Path(folder)
    try:
        record = json.loads((folder / "rank.json").read_text())
        rows = json.loads((folder / "per_image.json").read_text()) if (folder / "per_image.json").exists() else []
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a finished ranking (rank.json, per_image.json: {exc})") from None
    images: dict[str, int] = {}
    per_model: dict[str, list] = {}
    for row in rows:
        index = images.setdefault(row["image"], len(images))
        per_model.setdefault(row["model"], []).append(
            {"image": index, **{k: _nan(v) for k, v in row.items() if k not in ("model", "image")}})
    names = {f.name for f in fields(ModelScore)}
    models = []
    for entry in record["ranking"]:
        values = {k: _nan(v) if k not in ("rank", "error", "status", "model") else v
                  for k, v in entry.items() if k in names}
        models.append(ModelScore(**values, per_image=per_model.get(Path(entry["model"]).name, [])))
    options = {k: record[k] for k in ("dropout_site", "dropout_draw", "empty") if k in record}
    return RankResult(models=models, score=record["score"], perturbation=record["perturbation"],
                      strength=record["strength"], seed=record["seed"],
                      skipped=[(s["file"], s["reason"]) for s in record["skipped"]], notes=list(record["notes"]),
                      correlations=[{k: _nan(v) for k, v in c.items()} for c in record.get("correlations", [])],
                      timing=record.get("timing", {}), options=options, inputs=record.get("inputs", ""))


#: Part of :func:`ranking_inputs`: raise it when a change to the ranking's code would give other numbers from the
#: same inputs, so that a ranking written by an older dqtool is not reused.
RANKING_VERSION = 1


def ranking_inputs(models: Sequence[tuple[str, str]], images: Sequence[tuple[str, str]],
                   labels: Sequence[tuple[str, str] | None], settings: EvalSettings, perturbation: str,
                   strength: float, seed: int, score: str) -> str:
    """The digest (sha256 of a canonical JSON) of what decides a ranking's numbers besides its options (which
    rank.json records by name: ``dropout_site``, ``dropout_draw``, ``empty``): each model's (file name, sha256)
    in ranking order, each image's and label file's, the eval settings (their
    :meth:`~dqtool.ranking.passes.EvalSettings.key` and the batch size, which groups the tiles that one dropout
    draw covers under 'batch'), the perturbation, strength, seed, score and :data:`RANKING_VERSION`. Paths are
    left out: the same files elsewhere are the same ranking."""
    record = {"models": [list(m) for m in models], "images": [list(i) for i in images],
              "labels": [None if lab is None else list(lab) for lab in labels],
              "settings": {**settings.key(), "batch_size": settings.batch_size}, "perturbation": perturbation,
              "strength": float(strength), "seed": int(seed), "score": score, "version": RANKING_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


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
                quiet: bool = True, cache: bool = True, builtin=None, dropout_site: str = DEFAULT_DROPOUT_SITE,
                dropout_draw: str = DEFAULT_DROPOUT_DRAW, empty: str = DEFAULT_EMPTY,
                cluster: Cluster | None = None) -> RankResult:
    """``dqtool rank`` with one perturbation: the :class:`RankResult` of :func:`rank_bank`."""
    kinds = parse_perturbations(perturbation)
    if len(kinds) != 1:
        raise InputError(f"perturbation {perturbation!r}: rank_models takes one; rank_bank takes a list")
    bank = rank_bank(models_dir, images, labels=labels, perturbations=kinds, strength=strength, out=out,
                     score=score, seed=seed, diameter=diameter, batch_size=batch_size, quiet=quiet, cache=cache,
                     builtin=builtin, dropout_site=dropout_site, dropout_draw=dropout_draw, empty=empty,
                     cluster=cluster)
    return bank.results[kinds[0]]


@writes_folder("rank", out="out", inputs=("models_dir", "images", "labels"))  # refused, marked, locked
def rank_bank(models_dir: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike | None = None,
              perturbations="dropout", strength=None, out: str | os.PathLike | None = None,
              score: str = "adapted_rand", seed: int = 0, diameter: float | None = None, batch_size: int = 8,
              quiet: bool = True, cache: bool = True, builtin=None, dropout_site: str = DEFAULT_DROPOUT_SITE,
              dropout_draw: str = DEFAULT_DROPOUT_DRAW, empty: str = DEFAULT_EMPTY,
              cluster: Cluster | None = None, subfolders: bool = False,
              cache_dir: str | os.PathLike | None = None, reuse: bool = False) -> BankRanking:
    """``dqtool rank``: rank every Cellpose model in ``models_dir`` on the unlabelled ``images``, once per
    perturbation in ``perturbations`` (``"dropout,noise"`` or a list), all from shared network passes.

    ``images`` is an image file, a folder, or a split file naming images of a dataset folder
    (:func:`target_files`); ``labels`` a label folder, or a split file whose reader pairs each image with
    its label file (the same split file as ``images`` for a labelled split).

    Each :class:`RankResult` has its models best first, failed ones last with their error. With
    ``out``: one perturbation writes ranking.{csv,md,json}, per_image.*, rank.json, ranking.png and,
    with ``labels``, validation.* into ``out``; several (or one, with ``subfolders``) write them into
    ``out/<perturbation>/``, the same files a run with that perturbation alone writes. The unperturbed predictions are cached in
    ``out/cache/`` (or ``cache_dir``: a study's variants share one) unless ``cache`` is False. ``out`` is one of dqtool's output folders
    (:func:`dqtool.common.outputs.writing_folder`: never an input or a lab's non-empty folder; one writer at
    a time). ``builtin`` (``"cyto3,nuclei"`` or a list) adds Cellpose's
    built-in models by name, read from Cellpose's model folder and never downloaded
    (:func:`dqtool.segmentation.model_files.builtin_models`).

    ``dropout_site`` ('decoder' or 'bottleneck') and ``dropout_draw`` ('run' or 'batch') say where the
    dropout perturbation acts and when its channels are drawn (:mod:`dqtool.ranking.perturb`);
    ``empty`` ('worst' or 'skip') how an image where a model finds nothing counts
    (:func:`apply_empty_rule`). Each result records them in ``RankResult.options`` (and rank.json).

    ``cluster`` (:class:`dqtool.common.cluster.Cluster`, ``--workers``/``--scheduler``): the (model, image)
    tasks (:func:`score_pair`) run on Dask workers, which read the models, images, labels and the
    outputs cache (a shared file system) and write nothing; this process writes the cache and the
    tables, the same bytes as the serial run (the default).

    With ``out``, each rank.json records ``inputs`` (:func:`ranking_inputs`: a digest of the models', images' and
    labels' bytes and the settings) beside the options. ``reuse`` (what a study's rerun does): when every perturbation's folder
    already holds a finished ranking with the same ``inputs`` and options, it is read back (:func:`read_ranking`) and no
    network pass runs; any difference, a missing or older file (no ``inputs``) ranks again.
    """
    t_start = time.perf_counter()
    kinds = parse_perturbations(perturbations)
    if score not in SCORES:
        raise InputError(f"score {score!r}: expected one of {', '.join(SCORES)}")
    try:
        check_dropout_options(dropout_site, dropout_draw)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if empty not in EMPTY_RULES:
        raise InputError(f"empty {empty!r}: expected one of {', '.join(EMPTY_RULES)}")
    strengths = resolve_strengths(kinds, strength)
    model_files, skipped = discover_models(models_dir)
    if builtin:
        model_files += builtin_models(builtin)
    if not model_files:
        detail = f"; skipped: {', '.join(Path(f).name + ' (' + r + ')' for f, r in skipped)}" if skipped else ""
        raise InputError(f"{models_dir}: no Cellpose model files found{detail}")
    files = target_files(images)
    targets = load_target_images(files)
    notes = [f"skipped {Path(f).name}: {r}" for f, r in skipped]
    truth = None
    if labels is not None:
        truth, label_notes = _read_truth(labels, files, targets)
        notes += label_notes
    settings = EvalSettings(diameter=diameter, batch_size=batch_size)
    options = {"dropout_site": dropout_site, "dropout_draw": dropout_draw, "empty": empty}
    folders = {k: Path(out) if len(kinds) == 1 and not subfolders else Path(out) / k for k in kinds} if out else {}
    store = None
    label_files = _label_files(labels, files) if truth is not None else [None] * len(files)
    image_shas = [file_sha256(f) for f in files] if out is not None else [""] * len(files)
    model_shas = [_file_sha(path) for path in model_files] if out is not None else [""] * len(model_files)
    inputs = {}
    if out is not None:
        named = [(Path(f).name, sha) for f, sha in zip(model_files, model_shas)]
        named_images = [(Path(f).name, sha) for f, sha in zip(files, image_shas)]
        named_labels = [None if f is None else (Path(f).name, file_sha256(f)) for f in label_files]
        inputs = {k: ranking_inputs(named, named_images, named_labels, settings, k, strengths[k], seed, score)
                  for k in kinds}
        if reuse:
            done = _finished_rankings(folders, inputs, options)
            if done is not None:
                return BankRanking(results=done, notes=[f"reused the finished ranking in {folders[k]} (same inputs)"
                                                        for k in kinds],
                                   timing={"total_s": time.perf_counter() - t_start},
                                   paths={k: r.paths for k, r in done.items()})
    if cache and out is not None:
        store = OutputsCache(Path(cache_dir) if cache_dir is not None else Path(out) / "cache", settings.key())
    else:
        image_shas = [""] * len(files)

    # one task per (model, image), every perturbation included (score_pair), in this order: the results
    # come back in it, serially or from Dask workers, so the tables are the same bytes either way
    pairs = []
    for path, sha in zip(model_files, model_shas):
        model_sha = "" if store is None else sha
        pairs += [RankPair(model=_absolute(path), image=_absolute(f), index=i, perturbations=tuple(strengths.items()),
                           seed=seed, settings=settings, dropout_site=dropout_site, dropout_draw=dropout_draw,
                           label=None if label_files[i] is None else _absolute(label_files[i]),
                           labelled=truth is not None, model_sha=model_sha, image_sha=image_shas[i],
                           cache=None if store is None else _absolute(store.folder),
                           cache_settings=None if store is None else store.settings)
                  for i, f in enumerate(files)]
    per_pair: list[PairResult] = []
    try:
        for pair, res in zip(pairs, iter_tasks(score_pair, pairs, cluster, kind="rank", desc="rank", quiet=quiet,
                                               unit="img")):
            if res.plain is not None and store is not None:  # the client is the cache's one writer
                store.store(pair.model_sha, pair.image_sha, res.plain)
            res.plain = None
            per_pair.append(res)
    finally:
        _LOADED.clear()  # the serial path's models (a worker keeps its own)
    per_kind: dict[str, list[ModelScore]] = {k: [] for k in kinds}
    inference = 0.0
    cache_notes: list = []
    n = len(files)
    for m, path in enumerate(model_files):
        results = per_pair[m * n:(m + 1) * n]
        for res in results:
            inference += res.inference
            cache_notes += res.notes
            if store is not None:
                store.hits += res.hits
        error = next((res.error for res in results if res.error), "")
        if not error:
            try:
                scores = {k: _summarise(str(path), [res.records[k] for res in results], score) for k in kinds}
            except Exception as exc:  # one broken model must not stop the ranking of the others
                error = f"{type(exc).__name__}: {exc}"
        if error:
            scores = {k: ModelScore(model=str(path), status="failed", error=error) for k in kinds}
            notes.append(f"failed {path.name}: {error}")
        seconds = sum(res.seconds for res in results)
        for k in kinds:
            scores[k].seconds = seconds
            per_kind[k].append(scores[k])
    if store is not None:
        notes += cache_notes

    timing = {"inference_s": inference, "total_s": time.perf_counter() - t_start}
    per_kind = {k: apply_empty_rule(per_kind[k], score, empty) for k in kinds}  # needs the whole bank
    results = {k: _result(per_kind[k], score, k, strengths[k], seed, skipped, notes, truth, timing) for k in kinds}
    for k, result in results.items():
        result.options = dict(options)
        result.inputs = inputs.get(k, "")
    bank = BankRanking(results=results, notes=notes, timing=timing, cache={} if store is None else store.to_dict())
    if out is not None:
        for k, result in results.items():
            result.paths = write_outputs(result, folders[k], [f.name for f in files])
            bank.paths[k] = result.paths
        total = time.perf_counter() - t_start
        for k, result in results.items():
            result.timing["total_s"] = total
            write_json(result.paths["rank_json"], result.to_dict())
    bank.timing["total_s"] = time.perf_counter() - t_start
    return bank


def _finished_rankings(folders: dict, inputs: dict, options: dict) -> dict | None:
    """Each perturbation's finished ranking in ``folders`` when every one has the ``inputs`` digest and the
    ``options`` asked for (read back with its files' paths), else None."""
    done = {}
    for k, folder in folders.items():
        try:
            record = json.loads((folder / "rank.json").read_text())
        except (OSError, ValueError):
            return None
        if record.get("inputs") != inputs[k] or any(record.get(o) != v for o, v in options.items()):
            return None
        done[k] = read_ranking(folder)
        done[k].paths = _output_paths(folder)
    return done


def _output_paths(folder: Path) -> dict:
    """The paths :func:`write_outputs` returns, for the files of a finished ranking in ``folder``."""
    paths = {f"{stem}_{ext}": folder / f"{stem}.{ext}" for stem in ("ranking", "per_image", "validation")
             for ext in ("csv", "md", "json") if (folder / f"{stem}.{ext}").exists()}
    paths["rank_json"] = folder / "rank.json"
    if (folder / "ranking.png").exists():
        paths["plot"] = folder / "ranking.png"
    return paths


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


def _absolute(path) -> str:
    """A path a task reads, absolute: a worker's working folder is not this process's."""
    return str(Path(path).absolute())


def _file_sha(path) -> str:
    """The model file's sha256 (its outputs-cache key); "" when it cannot be read (its task fails then)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _is_split_file(path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() == ".json"


def target_files(images: str | os.PathLike) -> list[Path]:
    """The target images: one image file, a folder's input images, or the images a split file names
    (:func:`dqtool.data.datasets.write_split`: a fixed subset of a dataset folder, read in place)."""
    if _is_split_file(images):
        from dqtool.data.datasets import open_dataset  # the dataset readers (no cache builder)

        return [Path(s.image_path) for s in open_dataset(images)]
    return list_input_images(images)


def _label_finder(labels):
    """image file -> its label file (or None): by the naming rule in a labels folder, or as the dataset
    reader of a split file pairs them (its labels must be label images; polygons are not read here)."""
    if _is_split_file(labels):
        from dqtool.data.datasets import open_dataset

        samples = list(open_dataset(labels))
        odd = next((s for s in samples if s.has_labels and s.label_kind != "mask"), None)
        if odd is not None:
            raise InputError(f"{labels}: its labels are {odd.label_kind} annotations ({odd.label_path}); rank "
                             "validates against label images (instance maps)")
        by_image = {Path(s.image_path).resolve(): s.label_path for s in samples}
        return lambda image: by_image.get(Path(image).resolve())
    if Path(labels).is_file():
        raise InputError(f"{labels}: a file; expected a labels folder or a split file (.json)")
    if not Path(labels).is_dir():
        raise FileNotFoundError(f"{labels}: no such labels folder")
    return LabelFolder(Path(labels)).find


def _label_files(labels, files: Sequence[Path]) -> list:
    """Each image's label file (None without one), by the rule :func:`_read_truth` reads them with."""
    find = _label_finder(labels)
    return [find(f) for f in files]


def _read_truth(labels, files: Sequence[Path], targets: Sequence[np.ndarray]):
    """The label map of each image (None without one) and notes; ``labels`` is a folder or a split file."""
    truth, missing, notes = [], [], []
    find = _label_finder(labels)
    for f, img in zip(files, targets):
        p = find(f)
        if p is None:
            truth.append(None)
            missing.append(f.name)
            continue
        lab = read_labels(p)
        if lab.shape != img.shape[:2]:
            raise InputError(f"{p}: label map shape {lab.shape} differs from its image {f.name} {img.shape[:2]}")
        truth.append(lab)
    if len(missing) == len(files):
        raise InputError(f"{labels}: no label file matches any image (looked for <name>_masks, _cp_masks, "
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
