"""The active-learning round of a study (``"active"`` in a ``dqtool experiment`` config; issue 15, section 2).

A lab holds a model M and annotates a budget of new patches; which patches? The round measures it on the
source domain's patch cache:

1. M is a *start* model: the redundancy model trained from scratch on a random ``start_rate`` of the source
   patches (those patches count as already annotated), or a model of another domain (its from-scratch model
   on all of that domain's patches; no source patch is annotated yet);
2. for each selection method and seed s, a fraction ``rate`` of the source patches is chosen
   (:func:`select_added`): ``random``; ``dq`` (eq. 1 bins, eq. 2 sampling); ``kcenter``; ``uncertain`` (in each
   DQ bin, the patches on which M is least consistent under the ranking's perturbations,
   :mod:`dqtool.selection.uncertain`); ``uncertain_nobins`` (the least consistent overall);
3. M is finetuned on the annotated set, A = (start patches) U (chosen patches), with the study's step budget
   and training seed s, and scored on the source test split.

Selection is over the whole cache, as ``dqtool select`` does for a lab: a chosen patch that is already
annotated adds nothing, and the table says how many were new (``new``). The uncertainty of every patch under
M is computed once per start model and stored in the cache (the selection seed only breaks ties), so the
three seeds of ``uncertain`` differ in ties and in the training seed. Table ``active``: one row per (start,
method, seed); table ``active_seeds``: mean and std over seeds per (start, method).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dqtool.common.errors import InputError
from dqtool.segmentation.train import TrainConfig
from dqtool.selection.subsets import random_subset, subset_total

__all__ = ["ACTIVE_METHODS", "ACTIVE_DEFAULTS", "ActiveStart", "check_active", "select_added", "active_round"]

#: The selections compared; ``uncertain_nobins`` is ``dqtool select --method uncertain --no-bins``.
ACTIVE_METHODS = ("random", "dq", "kcenter", "uncertain", "uncertain_nobins")
#: The issue's round: start from 1 % random, add 10 %, every method, three seeds, starting from the 1 % model.
ACTIVE_DEFAULTS = {"start_rate": 0.01, "rate": 0.1, "methods": list(ACTIVE_METHODS), "seeds": [0, 1, 2],
                   "starts": ["random"], "score": "adapted_rand", "bins": 10}


def check_active(entry, domains: list[str], source: str, where: str = "config") -> dict:
    """The ``active`` entry with defaults filled, or one InputError line naming the key and value.

    ``starts``: ``"random"`` (the model on a random ``start_rate`` of the source patches) and/or other domains'
    names (their from-scratch models)."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: active: expected an object such as {{'rate': 0.1}}, got {entry!r}")
    unknown = sorted(set(entry) - set(ACTIVE_DEFAULTS))
    if unknown:
        raise InputError(f"{where}: active: unknown key {unknown[0]!r} (expected {', '.join(ACTIVE_DEFAULTS)})")
    spec = {**ACTIVE_DEFAULTS, **entry}
    for key in ("start_rate", "rate"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
            raise InputError(f"{where}: active: {key} {value!r} is not a rate in (0, 1]")
        spec[key] = float(value)
    for key, allowed in (("methods", ACTIVE_METHODS), ("starts", ("random", *[d for d in domains if d != source]))):
        if not isinstance(spec[key], list) or not spec[key]:
            raise InputError(f"{where}: active: {key} must be a non-empty list, got {spec[key]!r}")
        for item in spec[key]:
            if item not in allowed:
                raise InputError(f"{where}: active: {key}: {item!r}: expected one of {', '.join(allowed)}")
        if len(set(spec[key])) != len(spec[key]):
            raise InputError(f"{where}: active: {key} lists an item twice: {spec[key]!r}")
    seeds = spec["seeds"]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise InputError(f"{where}: active: seeds must be distinct integers >= 0, got {seeds!r}")
    if isinstance(spec["bins"], bool) or not isinstance(spec["bins"], int) or spec["bins"] < 1:
        raise InputError(f"{where}: active: bins {spec['bins']!r} is not an integer >= 1")
    from dqtool.selection.uncertain import SCORES

    if spec["score"] not in SCORES:
        raise InputError(f"{where}: active: score {spec['score']!r}: expected one of {', '.join(SCORES)}")
    return spec


@dataclass(frozen=True)
class ActiveStart:
    """A start model M of the round: its name in the tables, its file, and the source patches already annotated."""

    name: str
    model: Path
    labelled: np.ndarray

    @property
    def slug(self) -> str:
        """The start's part of the model file names: ``random_0.01``, ``from_histo``."""
        return self.name.replace(" model", "").replace(" ", "_") if self.labelled.size else \
            "from_" + self.name.removesuffix(" model")


def select_added(cache: Path, method: str, rate: float, seed: int, model: Path, spec: dict,
                 quiet: bool = True, cluster=None) -> np.ndarray:
    """The source patches chosen by ``method`` at ``rate`` with ``seed`` (sorted indices); ``uncertain*`` ranks them
    by ``model``'s consistency (scores computed once per model, on ``cluster`` if given, and stored in the cache)."""
    from dqtool.data.cache import PatchCache

    if method == "random":
        with PatchCache(cache) as c:
            n = len(c)
        return np.sort(random_subset(n, subset_total(n, rate), seed))
    from dqtool.selection.quantize import select_subset
    from dqtool.selection.uncertain import PatchScorer

    uncertain = method.startswith("uncertain")
    subset = select_subset(cache, rate, method="uncertain" if uncertain else method,
                           bins=None if method == "uncertain_nobins" else int(spec["bins"]), seed=seed,
                           scorer=PatchScorer(str(model), spec["score"], cluster) if uncertain else None, quiet=quiet)
    return np.asarray(subset.indices, dtype=np.int64)


def active_round(cache: Path, starts: list[ActiveStart], spec: dict, evals: dict, out: Path, tconf: TrainConfig,
                 metrics: tuple, cluster=None, quiet: bool = True, resources: dict | None = None) -> dict[str, list]:
    """Run the round (module docs) -> {"active": rows, "active_seeds": rows}.

    The selections run here, in the client (the uncertainty scores are written to the cache by it alone); the
    trainings are one batch of tasks (:func:`dqtool.studies.trainings.train_models`), each writing its own model
    ``out/models/active/<start slug>__<method>_<rate>_seed<s>`` and evaluation records."""
    from dqtool.studies.trainings import ModelJob, train_and_score, train_models

    source = next(iter(evals))
    jobs, keys = [], []
    for start in starts:
        for seed in spec["seeds"]:
            for method in spec["methods"]:
                added = select_added(cache, method, spec["rate"], int(seed), start.model, spec, quiet, cluster)
                indices = np.union1d(start.labelled, added).astype(np.int64)
                name = f"{start.slug}__{method}_{spec['rate']:g}_seed{seed}"
                jobs.append(ModelJob(
                    cache=str(cache), indices=indices, init=start.model, model=out / "models" / "active" / name,
                    config=dataclasses.replace(tconf, seed=int(seed)),
                    provenance={"active_start": start.name, "method": method, "rate": spec["rate"],
                                "selection_seed": int(seed)},
                    stage=name, evals=evals, eval_dir=out / "models" / "active", metrics=metrics,
                    quiet=quiet or bool(cluster is not None and cluster.active)))
                keys.append((start, method, int(seed), int(added.size),
                             int(np.setdiff1d(added, start.labelled).size)))
    if not jobs:
        raise InputError("active: nothing to train (no start model, method or seed)")
    results = train_models(train_and_score, jobs, cluster, desc="active round", quiet=quiet, resources=resources)
    rows = []
    for (start, method, seed, n_added, n_new), job, (result, scores, stds) in zip(keys, jobs, results):
        row = {"start": start.name, "method": method, "seed": seed, "labelled before": int(start.labelled.size),
               "chosen": n_added, "new": n_new, "patches": int(job.indices.size), "trained_on": result.n_patches}
        for m in metrics:
            row[m] = scores[source][m]
            row[f"{m} std"] = stds[source].get(m, float("nan"))
        rows.append(row)
    return {"active": rows, "active_seeds": seed_spread(rows, metrics)}


def seed_spread(rows: list[dict], metrics) -> list[dict]:
    """Per (start, method): mean and sample std (ddof 1) over seeds of the per-seed test means."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["start"], r["method"]), []).append(r)
    out = []
    for (start, method), group in groups.items():
        row = {"start": start, "method": method, "seeds": len(group)}
        for m in metrics:
            vals = np.array([g[m] for g in group], dtype=float)
            row[f"{m} mean over seeds"] = float(np.mean(vals))
            row[f"{m} std over seeds"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        out.append(row)
    return out
