"""Evidence for label-free ranking: a bank of Cellpose models of graded quality, ranked on a labelled target.

``rank_study`` writes the embedded default domains (:func:`dqtool.synthetic.generate`), builds one
patch cache per training domain, trains a bank of models that differ in training domain, epochs and
subset rate (:func:`dqtool.training.train_patches`), then ranks the bank on the target domain's test
images with :func:`dqtool.ranking.rank.rank_bank` with bottleneck dropout and an input perturbation in
one run (the unperturbed passes shared), with the target labels for validation. It reports, per perturbation and consistency
score (adapted Rand, NHD, effective invariance), Pearson (raw), Spearman and Kendall (ranks) against
each model's F1 at IoU 0.5 and mean accuracy over 0.5:0.95, with permutation-test p-values. Every random choice (data, subsets, training, dropout, noise) is seeded.

The budget comes from :data:`PRESETS`: ``"default"`` (the 8 models of :data:`DEFAULT_BANK`, 16 patches per
epoch, 6 target test images) or ``"quick"`` (the 6 models of :data:`QUICK_BANK`, 8 patches per epoch, 4 test
images); ``dqtool rank-study [--quick]`` is ``rank_study(out, quick=...)``.

The real-data study (:mod:`dqtool.studies.real_rank`, ``dqtool rank-study --config``) shares the parts after
the data: the study folder (:func:`study_folder`), the bank's trainings (:func:`train_bank`) and the rankings
with their tables, correlations and plot (:func:`rank_target`).

A member's patches at ``rate`` < 1 are the random baseline of :mod:`dqtool.selection.subsets`:
round(rate * N) patches, halves rounded up, drawn with ``default_rng(seed)``. (Until this was shared the
bank rounded with Python's ``round`` and took at least one patch, so N = 5 at rate 0.5 gave 2 patches,
now 3; the presets' banks, 48 patches per domain at rates 0.25 and 0.1, draw the same patches either way.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from scipy.stats import rankdata

from dqtool.common.cluster import Cluster, connect
from dqtool.common.errors import InputError
from dqtool.common.figures import pyplot, save_figure
from dqtool.common.files import atomic_write_bytes
from dqtool.common.outputs import kill_point, write_marker, writing
from dqtool.common.tables import write_json, write_table
from dqtool.data.synthetic import DOMAINS, generate
from dqtool.ranking.rank import rank_bank
from dqtool.segmentation.train import TrainConfig, load_patches, train_patches
from dqtool.selection.subsets import random_subset, subset_total
from dqtool.studies.trainings import parse_resources, train_models

__all__ = ["BankMember", "DEFAULT_BANK", "QUICK_BANK", "StudyBudget", "PRESETS", "RankStudyResult", "rank_study",
           "train_bank", "rank_target", "study_folder", "rank_options"]


@dataclass(frozen=True)
class BankMember:
    """One model of the bank: trained on ``domain`` patches, a ``rate`` fraction of them, ``epochs`` epochs."""

    domain: str
    epochs: int
    rate: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.domain}_r{int(round(100 * self.rate)):03d}_e{self.epochs:03d}"


# graded by design: the target's own domain with fewer epochs and fewer patches, then other domains
DEFAULT_BANK = (
    BankMember("fluo", 60), BankMember("fluo", 30), BankMember("fluo", 15), BankMember("fluo", 60, 0.25),
    BankMember("fluo", 60, 0.1), BankMember("multi", 60), BankMember("histo", 60), BankMember("histo", 20),
)


# the same grading on a smaller CPU budget (still past Cellpose's 10-epoch learning-rate warm-up)
QUICK_BANK = (
    BankMember("fluo", 30), BankMember("fluo", 15), BankMember("fluo", 30, 0.25), BankMember("multi", 30),
    BankMember("histo", 30), BankMember("histo", 15),
)


@dataclass(frozen=True)
class StudyBudget:
    """The size of a ranking study: the bank, its training budget and the embedded data generated."""

    members: tuple[BankMember, ...] = DEFAULT_BANK
    bsize: int = 64  # training crop (px)
    nimg_per_epoch: int = 16  # patches per epoch
    n_train: int = 12  # generated train images per domain
    n_test: int = 6  # generated test images per domain (the target's are ranked on)
    size: int = 336  # generated image side (px)


#: The two budgets of ``dqtool rank-study`` (``--quick``: a smaller CPU budget).
PRESETS = {
    "default": StudyBudget(),
    "quick": StudyBudget(members=QUICK_BANK, nimg_per_epoch=8, n_test=4),
}


@dataclass(frozen=True)
class RankStudyResult:
    """The study's summary; ``to_dict()`` is ``study_summary.json``."""

    target: str
    members: list[str]  # bank member names, in training order
    rows: list[dict]  # one per model, best F1 first: F1, accuracy, and per perturbation rank and scores
    correlations: list[dict]  # per perturbation and consistency score, against F1 and accuracy
    timing: dict  # perturbation -> the ranking's timing
    rankings: dict = field(default_factory=dict, repr=False)  # perturbation -> RankResult (not in to_dict)

    def to_dict(self) -> dict:
        return {"target": self.target, "members": self.members, "rows": self.rows,
                "correlations": self.correlations, "timing": self.timing}


def member_indices(n: int, member: BankMember, seed: int = 0) -> np.ndarray:
    """The patches (of ``n``) a member trains on: all at rate 1, else the random baseline of
    round(rate * n) patches, halves up (:func:`dqtool.selection.subsets.subset_total`)."""
    if member.rate >= 1:
        return np.arange(n)
    total = subset_total(n, member.rate)
    if total == 0:
        raise InputError(f"bank member {member.name}: rate {member.rate} selects no patch of {n}")
    return random_subset(n, total, seed)


@dataclass(frozen=True)
class _MemberJob:
    """One bank member's training (a task of :func:`dqtool.studies.trainings.train_models`)."""

    member: BankMember
    model: str
    cache: str
    config: TrainConfig
    seed: int
    quiet: bool = True


def _train_member(job: _MemberJob) -> str:
    """Train one member on its domain's cache (read only) into its own model file (its one writer)."""
    images, labels, provenance = load_patches(job.cache)
    idx = member_indices(len(images), job.member, job.seed)
    provenance = {**provenance, "rate": job.member.rate, "n_selected": int(len(idx))}
    train_patches(images[idx], labels[idx], Path(job.model), job.config, provenance=provenance, resume=True,
                  quiet=job.quiet)
    return job.model


def train_bank(models: Path, members, cache: Callable, config: Callable, seed: int = 0, quiet: bool = True,
               cluster: Cluster | None = None, resources: dict | None = None) -> list[Path]:
    """Train each member whose model ``models/<name>.pth`` does not exist yet; returns every member's model path.

    ``cache(member)`` gives the member's patch cache and ``config(member)`` its :class:`TrainConfig`; both are
    called here, in this process, for the members still to train, before any training starts (the tasks only
    read the caches). A member trains on its cache's patches at its ``rate`` (:func:`member_indices`). The
    members train independently: one task each on ``cluster`` (``--workers``/``--scheduler``; serially
    without one), each asking for ``resources`` (e.g. {"GPU": 1}), :mod:`dqtool.studies.trainings`.
    """
    models.mkdir(parents=True, exist_ok=True)
    paths = [models / f"{member.name}.pth" for member in members]
    distributed = cluster is not None and cluster.active
    jobs = [_MemberJob(member, str(model), str(cache(member)), config(member), seed, quiet=quiet or distributed)
            for member, model in zip(members, paths) if not model.exists()]
    train_models(_train_member, jobs, cluster, desc="bank", quiet=quiet, serial_bar=True, resources=resources)
    return paths


def build_bank(data: Path, out: Path, members=DEFAULT_BANK, bsize: int = 64, nimg_per_epoch: int = 16,
               seed: int = 0, quiet: bool = True, cluster: Cluster | None = None,
               resources: dict | None = None) -> list[Path]:
    """The embedded domains' bank (:func:`train_bank`): one patch cache per training domain of the
    generated data ``data`` (``out/caches/<domain>.h5``), models in ``out/bank``."""
    from dqtool.data.cache_build import build_cache_from_folders  # h5py

    caches = out / "caches"
    caches.mkdir(parents=True, exist_ok=True)

    @functools.cache
    def cache(domain: str) -> Path:
        build_cache_from_folders([data / domain], caches / f"{domain}.h5", domains=[domain], split="train", quiet=True)
        return caches / f"{domain}.h5"

    return train_bank(out / "bank", members, lambda m: cache(m.domain),
                      lambda m: TrainConfig(n_epochs=m.epochs, save_every=m.epochs, bsize=bsize,
                                            nimg_per_epoch=nimg_per_epoch, seed=seed),
                      seed, quiet=quiet, cluster=cluster, resources=resources)


def _num(value) -> float:
    """A score as a float (NaN for a missing one: JSON writes NaN as null)."""
    return math.nan if value is None else float(value)


_SCORE_COLUMNS = (("score", "adapted Rand"), ("nhd", "NHD"), ("ei", "effective invariance"))


def plot_study(rows: list[dict], perturbations, path: Path) -> Path:
    """One panel per perturbation x consistency score: median consistency (x) against F1 at IoU 0.5 (y).

    Models are numbered by F1 (1 = best) and listed beside the panels; a model without a score for a
    panel (no objects to compare) is left out of it and counted in its title.
    """
    plt = pyplot()

    perturbations = list(perturbations)
    fig, axes = plt.subplots(len(perturbations), len(_SCORE_COLUMNS), squeeze=False,
                             figsize=(4.2 * len(_SCORE_COLUMNS) + 2.6, 3.4 * len(perturbations)))
    for i, pert in enumerate(perturbations):
        for j, (key, title) in enumerate(_SCORE_COLUMNS):
            ax = axes[i][j]
            pts = [(k + 1, _num(r.get(f"{pert}_{key}")), _num(r["f1"])) for k, r in enumerate(rows)]
            shown = [(n, x, y) for n, x, y in pts if not (math.isnan(x) or math.isnan(y))]
            ax.scatter([x for _, x, _ in shown], [y for _, _, y in shown], s=22)
            for n, x, y in shown:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 3 + 7 * (n % 3)), fontsize=8)
            missing = len(pts) - len(shown)
            ax.set_title(f"{pert}: {title}" + (f" ({missing} without a score)" if missing else ""), fontsize=9)
            ax.set_xlabel(f"median {title}", fontsize=8)
            if j == 0:
                ax.set_ylabel("F1 at IoU 0.5 (target labels)", fontsize=8)
            ax.tick_params(labelsize=7)
    legend = "\n".join(f"{k + 1}  {r['model']}  F1 {_num(r['f1']):.2f}" for k, r in enumerate(rows))
    right = 1 - 2.5 / fig.get_figwidth()
    fig.text(right + 0.01, 0.5, legend, ha="left", va="center", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0, right, 1))
    return save_figure(fig, path, dpi=110)


def rank_study(out: str | os.PathLike, target: str = "fluo", quick: bool = False, members=None,
               perturbations=("dropout", "noise"), bsize: int | None = None, nimg_per_epoch: int | None = None,
               seed: int = 0, n_train: int | None = None, n_test: int | None = None, size: int | None = None,
               quiet: bool = True, dropout_site: str | None = None, dropout_draw: str | None = None,
               empty: str | None = None, cluster: Cluster | None = None,
               train_resources: str | dict | None = None) -> RankStudyResult:
    """Build the bank, rank it on ``target``/test with each perturbation, correlate with F1.

    The budget is ``PRESETS["quick" if quick else "default"]``; ``members``, ``bsize``,
    ``nimg_per_epoch``, ``n_train``, ``n_test`` and ``size`` given here replace the preset's. Writes
    ``study.{csv,md,json}``, ``study_correlations.*``, ``study_summary.json`` and ``study.png`` in ``out``.
    ``dropout_site``, ``dropout_draw`` and ``empty`` go to every ranking (None: rank_bank's defaults;
    each ranking's rank.json records them); the bank is reused when its model files exist.

    ``cluster`` (``--workers``/``--scheduler``): the bank's trainings run as one Dask task per model (each
    asking for ``train_resources``, e.g. ``"GPU=1"``) and the rankings as (model, image) tasks, on one
    client; the files are those of a serial run with one torch thread (:mod:`dqtool.studies.trainings`).
    """
    overrides = {"members": members, "bsize": bsize, "nimg_per_epoch": nimg_per_epoch, "n_train": n_train,
                 "n_test": n_test, "size": size}
    budget = dataclasses.replace(PRESETS["quick" if quick else "default"],
                                 **{k: v for k, v in overrides.items() if v is not None})
    out = Path(out)
    if target not in DOMAINS:
        raise InputError(f"target {target!r}: expected one of the embedded domains {', '.join(DOMAINS)}")
    options = rank_options(dropout_site, dropout_draw, empty)
    with study_folder(out, quiet, cluster) as cluster:  # one client for the trainings and the rankings
        return _rank_study(out, target, budget, perturbations, seed, quiet, options, cluster,
                           parse_resources(train_resources))


@contextlib.contextmanager
def study_folder(out: Path, quiet: bool, cluster: Cluster | None = None, inputs=()) -> Iterator[Cluster]:
    """``out`` opened as a rank-study folder (refused if a lab's or one of ``inputs``, locked, marked, one-line
    faults) and the one cluster client its trainings and rankings share."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, "rank-study", inputs, kind="folder"):
        out.mkdir(exist_ok=True)
        write_marker(out, "rank-study")
        with connect(cluster, quiet=quiet) as cluster:
            yield cluster


def rank_options(dropout_site: str | None, dropout_draw: str | None, empty: str | None) -> dict:
    """The ranking options given (None: rank_bank's defaults, recorded in each rank.json)."""
    return {k: v for k, v in (("dropout_site", dropout_site), ("dropout_draw", dropout_draw), ("empty", empty))
            if v is not None}


def _rank_study(out: Path, target: str, budget, perturbations, seed: int, quiet: bool,
                options: dict | None = None, cluster: Cluster | None = None,
                resources: dict | None = None) -> RankStudyResult:
    data = generate(out / "data", seed=seed, n_train=budget.n_train, n_test=budget.n_test, size=budget.size,
                    quiet=quiet)
    bank_options = {"cluster": cluster, "resources": resources} if cluster is not None and cluster.active else {}
    build_bank(data, out, budget.members, bsize=budget.bsize, nimg_per_epoch=budget.nimg_per_epoch, seed=seed,
               quiet=quiet, **bank_options)
    kill_point("rank-study:bank")  # tests: the bank trained, nothing ranked yet
    images = data / target / "test"
    target_images = out / "target" / "images"
    target_labels = out / "target" / "labels"
    target_images.mkdir(parents=True, exist_ok=True)
    target_labels.mkdir(parents=True, exist_ok=True)
    for p in sorted(images.glob("*_img.png")):  # the unlabelled view a user has, and its labels apart
        atomic_write_bytes(target_images / p.name, p.read_bytes())
        atomic_write_bytes(target_labels / p.name.replace("_img", "_masks"),
                           (images / p.name.replace("_img", "_masks")).read_bytes())
    return rank_target(out, target_images, target_labels, target, [m.name for m in budget.members], perturbations,
                       seed, quiet, options, cluster)


def rank_target(out: Path, images: Path, labels: Path, target: str, members: list[str], perturbations, seed: int,
                quiet: bool, options: dict | None = None, cluster: Cluster | None = None) -> RankStudyResult:
    """Rank the bank ``out/bank`` on ``images`` with every perturbation in one :func:`rank_bank` run (one
    unperturbed pass per model and image shared by all; ``out/rank/<perturbation>/``, the cache in
    ``out/rank/cache/``), validated with ``labels`` (a folder, or a split file as ``images`` may be too), and
    write the study's tables. A ranking already written there from the same bank, images and options is read
    back, not computed again (``rank_bank(reuse=True)``: a rerun after a kill resumes after the ranking).

    Per model: F1 at IoU 0.5, mean accuracy over 0.5:0.95 and, per perturbation, its rank and median scores
    (``study.*``, best F1 first, ``f1_rank`` with ties sharing the best rank); per perturbation and
    consistency score: Pearson, Spearman and Kendall against F1 and accuracy with permutation p-values
    (``study_correlations.*``); ``study_summary.json``; and the panel plot ``study.png`` (:func:`plot_study`).
    """
    # one ranking run for every perturbation: one unperturbed pass per model and image, shared
    bank = rank_bank(out / "bank", images, labels=labels, perturbations=list(perturbations), out=out / "rank",
                     seed=seed, quiet=quiet, subfolders=True, reuse=True, **(options or {}),
                     **({"cluster": cluster} if cluster is not None and cluster.active else {}))
    kill_point("rank-study:ranked")  # tests: the rankings written, the study tables not yet
    results = bank.results
    by_model: dict[str, dict] = {}
    for pert, res in results.items():
        for m in res.ranked:
            name = Path(m.model).stem
            row = by_model.setdefault(name, {"model": name, "f1": m.f1, "accuracy": m.accuracy})
            row[f"{pert}_rank"] = m.rank
            row[f"{pert}_score"] = m.score
            row[f"{pert}_nhd"] = m.nhd
            row[f"{pert}_ei"] = m.effective_invariance
    rows = sorted(by_model.values(), key=lambda r: -r["f1"] if not math.isnan(r["f1"]) else math.inf)
    f1 = np.array([r["f1"] for r in rows], np.float64)
    # ties share the best rank (several models with F1 = 0 are all last, not ordered arbitrarily)
    f1_rank = rankdata(np.where(np.isnan(f1), np.inf, -f1), method="min") if len(rows) else []
    for r, k in zip(rows, f1_rank):
        r["f1_rank"] = int(k)
    correlations = []
    for pert, res in results.items():
        for c in res.correlations:  # every consistency score (the ranking uses res.score) against F1 and accuracy
            correlations.append({"perturbation": pert, **c})
    write_table(rows, out / "study")
    kill_point("rank-study:tables")  # tests: one study table written, the others not yet
    write_table(correlations, out / "study_correlations")
    summary = RankStudyResult(target=target, members=list(members), rows=rows, correlations=correlations,
                              timing={p: r.timing for p, r in results.items()}, rankings=dict(results))
    write_json(out / "study_summary.json", summary.to_dict())
    plot_study(rows, list(perturbations), out / "study.png")
    return summary
