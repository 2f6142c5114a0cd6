"""Uncertainty sampling by label-free consistency: ``dqtool select --method uncertain --model M``.

A patch is worth annotating when the Cellpose model M is unsure of it. The ranking measures that
without labels (CTE, paper 004, section 2.3): M runs on the patch as it is and perturbed, and the two
predictions are compared. Here the ranking's own code scores every patch of the cache, as if the patch
were a target image of ``dqtool rank`` (:func:`dqtool.ranking.rank.score_model_passes`: the grayscale
patch normalised by Cellpose's ``normalize_img``, one shared unperturbed pass, the ranking's default
perturbations and strengths :data:`PERTURBATIONS`, dropout at the ranking's default site with its
channels drawn once for all patches (:data:`DROPOUT_DRAW`, 'run': every patch is judged under the same
perturbation, and a patch's channels do not depend on the batch its tile shares with other patches), noise seeded per patch by :func:`dqtool.ranking.rank.noise_seed` of :data:`PERTURBATION_SEED` and the
patch index). Per patch i and perturbation k it keeps the three consistencies of the ranking's per-image
record, s_k(i) in {adapted Rand F (eq. 6), NHD (eq. 5), effective invariance (eq. 4)}, and the cell
counts n(i) (unperturbed) and n_k(i) (perturbed).

The uncertainty of patch i under score s (adapted Rand by default)::

    u_k(i) = 0              if n(i) = 0 and n_k(i) = 0   (stable and empty)
           = 1              if n(i) = 0 and n_k(i) > 0   (cells appear only under perturbation)
           = 1 - s_k(i)     otherwise                    (an undefined s_k(i), NaN, counts as 0: u_k = 1)
    u(i)   = (1 / |K|) sum_{k in K} u_k(i),   K = {dropout, noise}

Stable and empty counts as certain: M predicts no cell and none appears under either perturbation, so M
is confident the patch is background; picking such patches would spend the annotation budget on empty
images. (The ranking's ``empty`` rule, :func:`dqtool.ranking.rank.apply_empty_rule`, exists for
comparing models on an image; for patches of one model we choose certainty.) A patch where cells appear
only under perturbation is as uncertain as a patch can be.

Selection (:func:`dqtool.selection.quantize.uncertainty_sampling`, given a :class:`PatchScorer`): within each
DQ bin S_n, the q_n patches of largest u (q_n the quotas of DQ's eq. 2 sampling, largest-remainder rounding);
without bins, the T = round(rate * N) patches of largest u overall. Ties go by one seeded random order of the
patches (``default_rng(seed).permutation``), so the same seed gives the same subset and another seed changes
only which of tied patches are taken.

The scores are computed once per (cache content, model file sha256, eval settings and perturbations) and
stored in the cache under ``/derived/uncertainty_<model sha256[:16]>_<settings digest[:16]>``
(:func:`load_or_score_patches`); a later selection with the same model reads them back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.files import file_sha256
from dqtool.data.cache import PatchCache

__all__ = ["PERTURBATIONS", "PERTURBATION_SEED", "SCORES", "PatchConsistency", "PatchScorer", "patch_uncertainty",
           "scorer_for", "load_or_score_patches", "check_scoring_model", "scoring_key", "uncertainty_group_name"]

#: The perturbations scored and their strengths: the ranking's defaults (:data:`dqtool.ranking.perturb.DEFAULT_STRENGTH`).
PERTURBATIONS = ("dropout", "noise")
#: The seed of the perturbations (dropout channels; noise per patch with ``noise_seed``): fixed, so the stored
#: scores do not depend on the selection's ``--seed``, which only breaks ties.
PERTURBATION_SEED = 0
#: When the dropout channels are drawn: once for all patches ('run'), not the ranking's default ('batch'). Patches
#: of one model are compared with each other, so each is judged under the same channels; under 'batch' a patch's
#: channels would depend on the patches its tile is batched with, so on :data:`CHUNK` and the workers.
DROPOUT_DRAW = "run"
#: The ranking's scores (``dqtool.ranking.rank.SCORES``), repeated so that turning stored scores into
#: uncertainties (:func:`patch_uncertainty`) needs no torch (finding and checking them does: the model's digest
#: and the eval settings' versions).
SCORES = ("adapted_rand", "nhd", "effective_invariance")
#: Patches per call of the shared passes (bounds the predictions held at once; changes no number).
CHUNK = 64
#: Part of the stored scores' key: raise it when a change to the scoring code (the consistencies, the mask step,
#: the input conversion) would give other numbers, so that scores stored by an older dqtool are recomputed.
SCORING_VERSION = 1


# ----------------------------------------------------------------------------------------------
# the uncertainty of stored scores


def patch_uncertainty(consistency: dict, n_cells: np.ndarray, n_cells_perturbed: dict) -> np.ndarray:
    """u(i) of the module docs: the mean over perturbations k of u_k(i).

    ``consistency[k]`` and ``n_cells_perturbed[k]``: (N,) arrays of s_k and n_k; ``n_cells``: (N,) n.
    Returns float64 (N,) in [0, 1].
    """
    n0 = np.asarray(n_cells) > 0
    terms = []
    for k, s in consistency.items():
        s = np.asarray(s, np.float64)
        appear = np.asarray(n_cells_perturbed[k]) > 0
        u = np.where(np.isnan(s), 1.0, 1.0 - s)
        u = np.where(n0, u, np.where(appear, 1.0, 0.0))
        terms.append(u)
    return np.mean(terms, axis=0) if terms else np.zeros(len(n0))


@dataclass
class PatchConsistency:
    """The per-patch consistencies of one model on a cache (what the derived group stores)."""

    model: str  # the model file, absolute
    model_sha256: str
    perturbations: dict  # kind -> strength
    scores: dict  # kind -> score name -> (N,) float64
    n_cells: np.ndarray  # (N,) cells in the unperturbed prediction
    n_cells_perturbed: dict  # kind -> (N,)
    group: str = ""
    reused: bool = False
    seconds: float | None = None
    key: dict = field(default_factory=dict, repr=False)

    def uncertainty(self, score: str = "adapted_rand") -> np.ndarray:
        """u(i) under ``score`` (:func:`patch_uncertainty`)."""
        if score not in SCORES:
            raise InputError(f"score {score!r}: expected one of {', '.join(SCORES)}")
        return patch_uncertainty({k: v[score] for k, v in self.scores.items()}, self.n_cells, self.n_cells_perturbed)

    def arrays(self) -> dict:
        """The datasets of the derived group: ``<kind>_<score>``, ``<kind>_n_cells_perturbed``, ``n_cells``."""
        out = {"n_cells": np.asarray(self.n_cells, np.int64)}
        for k in self.perturbations:
            for s in SCORES:
                out[f"{k}_{s}"] = np.asarray(self.scores[k][s], np.float64)
            out[f"{k}_n_cells_perturbed"] = np.asarray(self.n_cells_perturbed[k], np.int64)
        return out


# ----------------------------------------------------------------------------------------------
# bad input


def check_scoring_model(model, cache: PatchCache) -> str:
    """The model file as an absolute path, if Cellpose can run it on ``cache``'s patches; else one InputError line.

    The model file test is :func:`dqtool.segmentation.model_files.load_state_dict`'s (a missing path, a file
    that is not a Cellpose 3 model). Patches of any channel count reach the network as the ranking gives it
    images: grayscale in Cellpose's channels [0, 0], its two input channels; a model built for another
    number of input channels cannot read them.
    """
    from dqtool.segmentation.model_files import IncompatibleModel, check_model_path, load_state_dict

    try:
        load_state_dict(model)
    except IncompatibleModel as exc:
        raise InputError(f"{exc}; it cannot read the patches of {cache.path} ({cache.n_channels} channel(s), "
                         "given to the network as grayscale in Cellpose's 2 channels [0, 0])") from None
    return str(check_model_path(model))


# ----------------------------------------------------------------------------------------------
# scores stored in the cache


def _settings():
    from dqtool.ranking.passes import EvalSettings

    return EvalSettings()


def scoring_key() -> dict:
    """What decides the stored scores besides the cache and the model file: eval settings and versions
    (:meth:`~dqtool.ranking.passes.EvalSettings.key`), perturbations, strengths, sites, seed."""
    from dqtool.ranking.perturb import DEFAULT_DROPOUT_SITE, default_strength

    return {"eval": _settings().key(), "perturbations": {k: default_strength(k) for k in PERTURBATIONS},
            "dropout_site": DEFAULT_DROPOUT_SITE, "dropout_draw": DROPOUT_DRAW, "seed": PERTURBATION_SEED,
            "input": "patch to gray, Cellpose normalize_img (ranking.rank.normalise_for_model)",
            "noise_seed": "noise_seed(seed, patch index)", "scoring_version": SCORING_VERSION, "chunk": CHUNK}


def uncertainty_group_name(model_sha256: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"uncertainty_{model_sha256[:16]}_{digest[:16]}"


def _stored(cache: PatchCache, name: str, model_sha: str, key: dict) -> PatchConsistency | None:
    """The group's scores when they are whole and were computed for this cache content, model and key."""
    group = cache.read_group(name)
    if group is None:
        return None
    arrays, attrs = group
    n = len(cache)
    try:
        same = (attrs.get("cache_hash") == cache.content_hash and attrs.get("model_sha256") == model_sha
                and json.loads(attrs.get("key", "null")) == json.loads(json.dumps(key)))
    except ValueError:
        return None
    names = {"n_cells"} | {f"{k}_{s}" for k in PERTURBATIONS for s in SCORES} | \
            {f"{k}_n_cells_perturbed" for k in PERTURBATIONS}
    if not same or not names <= set(arrays) or any(arrays[a].shape != (n,) for a in names):
        return None
    return PatchConsistency(model=str(attrs.get("model", "")), model_sha256=model_sha,
                            perturbations=dict(key["perturbations"]),
                            scores={k: {s: arrays[f"{k}_{s}"] for s in SCORES} for k in PERTURBATIONS},
                            n_cells=arrays["n_cells"],
                            n_cells_perturbed={k: arrays[f"{k}_n_cells_perturbed"] for k in PERTURBATIONS},
                            group=name, reused=True, seconds=attrs.get("seconds"), key=key)


def _chunk_arrays(net, images, idx: np.ndarray, strengths: dict) -> dict:
    """The derived group's arrays (:meth:`PatchConsistency.arrays` names) for the patches ``idx``, from the ranking's
    shared passes (:func:`dqtool.ranking.rank.score_model_passes`) on their ``images``."""
    from dqtool.ranking.perturb import DEFAULT_DROPOUT_SITE
    from dqtool.ranking.rank import normalise_for_model, score_model_passes

    m = len(idx)
    out = {"n_cells": np.empty(m, np.int64)}
    for k in PERTURBATIONS:
        out.update({f"{k}_{s}": np.empty(m, np.float64) for s in SCORES})
        out[f"{k}_n_cells_perturbed"] = np.empty(m, np.int64)
    inputs = [normalise_for_model(img) for img in images]
    records, _ = score_model_passes(net, inputs, strengths, seed=PERTURBATION_SEED, settings=_settings(),
                                    dropout_site=DEFAULT_DROPOUT_SITE, dropout_draw=DROPOUT_DRAW,
                                    image_indices=idx.tolist())
    where = {int(i): j for j, i in enumerate(idx)}
    for k in PERTURBATIONS:
        for rec in records[k]:
            j = where[rec["image"]]  # the patch index (image_indices)
            for s in SCORES:
                out[f"{k}_{s}"][j] = rec[s]
            out[f"{k}_n_cells_perturbed"][j] = rec["n_cells_perturbed"]
            out["n_cells"][j] = rec["n_cells"]
    return out


def score_range(bounds: tuple[int, int], cache: str, cache_hash: str, model_path: str, model_sha256: str,
                strengths: dict, threads: int = 1) -> dict:
    """Task: the arrays of patches ``range(*bounds)`` of ``cache`` (read only) under ``model_path``, with
    ``threads`` torch threads. Refuses a cache whose content changed since the run began."""
    from dqtool.features.embed import torch_threads
    from dqtool.segmentation.predict import worker_net

    with PatchCache(cache) as opened:
        if opened.content_hash != cache_hash:
            raise InputError(f"{cache}: the cache changed during the run; run the selection again")
        images = opened.images(np.arange(*bounds))
    with torch_threads(threads):
        return _chunk_arrays(worker_net(model_path, model_sha256), images, np.arange(*bounds), strengths)


def partial_path(cache: PatchCache, name: str) -> Path:
    """Where the chunks scored so far are kept while a scoring runs: ``.<cache file>.<group>.partial.npz`` beside
    the cache (dqtool's own file; removed once the whole group is in the cache)."""
    path = Path(cache.path)
    return path.parent / f".{path.name}.{name}.partial.npz"


def _read_partial(path: Path, stamp: str, n: int) -> tuple[int, dict]:
    """(patches done, their arrays) of a partial file written for ``stamp``; (0, {}) if none or another run's."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["stamp"]) != stamp:
                return 0, {}
            done = int(z["done"])
            arrays = {k: z[k] for k in z.files if k not in ("stamp", "done")}
    except (OSError, ValueError, KeyError):
        return 0, {}
    if not 0 < done <= n or any(a.shape != (done,) for a in arrays.values()):
        return 0, {}
    return done, arrays


def _write_partial(path: Path, stamp: str, done: int, arrays: dict) -> None:
    """Crash-safe: written under a temporary name, then renamed over the old one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, stamp=np.array(stamp), done=np.array(done), **{k: v[:done] for k, v in arrays.items()})
    os.replace(tmp, path)


def score_patches(cache: PatchCache, model_path: str, key: dict, quiet: bool = True, cluster=None,
                  model_sha256: str | None = None, partial: Path | None = None,
                  threads: int | None = None) -> PatchConsistency:
    """Run the ranking's shared passes over every patch, :data:`CHUNK` patches at a time: here, or with an active
    ``cluster`` one Dask task a chunk (:func:`score_range`: the worker reads its chunk from the cache file and
    loads the model once; the client alone writes). The same numbers either way for the same ``threads``
    (default: torch's current count here, 1 on a worker).

    ``partial`` (a file, see :func:`partial_path`): the chunks finished so far are kept there after each one, and a
    run that finds it (same cache content, model and key) starts after them, so a killed scoring loses at most
    the chunks in flight."""
    import torch

    from dqtool.common.cluster import iter_tasks

    n = len(cache)
    strengths = dict(key["perturbations"])
    model_sha256 = model_sha256 or file_sha256(model_path)
    stamp = json.dumps({"cache": cache.content_hash, "model": model_sha256, "key": key}, sort_keys=True)
    arrays = PatchConsistency(model=model_path, model_sha256=model_sha256, perturbations=strengths,
                              scores={k: {s: np.empty(n, np.float64) for s in SCORES} for k in PERTURBATIONS},
                              n_cells=np.empty(n, np.int64),
                              n_cells_perturbed={k: np.empty(n, np.int64) for k in PERTURBATIONS}).arrays()
    done = 0
    if partial is not None:
        done, kept = _read_partial(partial, stamp, n)
        for k, v in kept.items():
            if k in arrays:
                arrays[k][:done] = v
    bounds = [(a, min(n, a + CHUNK)) for a in range(done, n, CHUNK)]
    desc = f"uncertainty ({os.path.basename(model_path)})"
    start = time.perf_counter()
    if cluster is not None and cluster.active:
        task = functools.partial(score_range, cache=str(Path(cache.path).absolute()), cache_hash=cache.content_hash,
                                 model_path=str(Path(model_path).absolute()), model_sha256=model_sha256,
                                 strengths=strengths, threads=int(threads or 1))
        stream = iter_tasks(task, bounds, cluster, kind="uncertainty", desc=desc, quiet=quiet, unit="patch",
                            total=n - done, progress_of=lambda b: b[1] - b[0])
    else:
        from dqtool.features.embed import torch_threads
        from dqtool.segmentation.predict import load_model

        net = load_model(model_path)
        local = int(threads or torch.get_num_threads())

        def run(b):
            with torch_threads(local):
                return _chunk_arrays(net, cache.images(np.arange(*b)), np.arange(*b), strengths)

        stream = iter_tasks(run, bounds, None, desc=desc, quiet=quiet, unit="patch", total=n - done,
                            progress_of=lambda b: b[1] - b[0])
    try:
        for (a, b), chunk in zip(bounds, stream):
            for k, v in chunk.items():
                arrays[k][a:b] = v
            if partial is not None:
                _write_partial(partial, stamp, b, arrays)
    finally:
        stream.close()
    return PatchConsistency(model=model_path, model_sha256=model_sha256, perturbations=strengths,
                            scores={k: {s: arrays[f"{k}_{s}"] for s in SCORES} for k in PERTURBATIONS},
                            n_cells=arrays["n_cells"],
                            n_cells_perturbed={k: arrays[f"{k}_n_cells_perturbed"] for k in PERTURBATIONS},
                            seconds=time.perf_counter() - start, key=key)


def load_or_score_patches(cache: PatchCache, model, quiet: bool = True, cluster=None) -> PatchConsistency:
    """The per-patch consistencies of ``model`` on ``cache``: read from the cache's derived group, or
    computed now (:func:`score_patches`, on ``cluster`` if one is given, resuming from and keeping a partial file
    :func:`partial_path`) and stored there (written whole under a temporary name, then swapped in:
    :meth:`~dqtool.data.cache.PatchCache.write_group`; the partial file is then removed). ``reused`` says which."""
    model_path = check_scoring_model(model, cache)
    model_sha = file_sha256(model_path)
    key = scoring_key()
    name = uncertainty_group_name(model_sha, key)
    stored = _stored(cache, name, model_sha, key)
    if stored is not None:
        stored.model = model_path
        return stored
    partial = partial_path(cache, name)
    scored = score_patches(cache, model_path, key, quiet, cluster=cluster, model_sha256=model_sha, partial=partial)
    scored.model_sha256, scored.group = model_sha, name
    cache.write_group(name, scored.arrays(),
                      {"model": model_path, "model_sha256": model_sha, "key": key, "cache_hash": cache.content_hash,
                       "seconds": float(scored.seconds), "formula": "u = mean_k u_k; u_k = 1 - s_k, 0 if stable and "
                       "empty, 1 if cells appear only perturbed (dqtool.selection.uncertain)"})
    partial.unlink(missing_ok=True)
    return scored


# ----------------------------------------------------------------------------------------------
# the scorer a selection is given


@dataclass(frozen=True)
class PatchScorer:
    """What ranks the patches of ``method='uncertain'`` (:func:`dqtool.selection.quantize.select_subset`):
    the uncertainty u of ``model`` on each patch under ``score`` (module docs); ``cluster`` (``--workers`` /
    ``--scheduler``): the network passes of the scoring as Dask tasks (:func:`score_patches`), the same numbers."""

    model: str
    score: str = "adapted_rand"
    cluster: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.score not in SCORES:
            raise InputError(f"score {self.score!r}: expected one of {', '.join(SCORES)}")

    def check(self, cache: PatchCache) -> None:
        """One InputError line unless ``model`` is a Cellpose model that can read ``cache``'s patches."""
        check_scoring_model(self.model, cache)

    def __call__(self, cache: PatchCache, quiet: bool = True) -> tuple[np.ndarray, dict]:
        """(u, record): the (N,) uncertainties (stored scores reused or computed) and what the subset records."""
        scored = load_or_score_patches(cache, self.model, quiet, cluster=self.cluster)
        return scored.uncertainty(self.score), {
            "model": scored.model, "model_sha256": scored.model_sha256, "score": self.score,
            "uncertainty": f"mean over perturbations of 1 - {self.score}; 0 if no cell unperturbed and perturbed, 1 if "
                           "cells appear only perturbed (dqtool.selection.uncertain)",
            "perturbations": dict(scored.perturbations), "scoring": scored.key, "uncertainty_group": scored.group,
            "uncertainty_reused": bool(scored.reused)}


def scorer_for(model=None, score: str | None = None, cluster=None) -> PatchScorer | None:
    """``dqtool select``'s ``--model``/``--score`` (and ``--workers``/``--scheduler``) as a :class:`PatchScorer`
    (None without ``--model``)."""
    if model is None:
        if score is not None:
            raise InputError(f"--score {score}: only --method uncertain scores patches, and it needs --model MODEL")
        if cluster is not None and cluster.active:
            raise InputError("--workers/--scheduler: only --method uncertain runs work on a cluster (the network "
                             "passes of its scores); DQ, random and k-center run here")
        return None
    return PatchScorer(str(model), score or "adapted_rand", cluster)
