"""The active-learning round of a study (``"active"`` in a ``dqtool experiment`` config; issue 15, section 2).

A lab holds a model M and annotates a budget of new patches; which patches? The round measures it on the
source domain's patch cache:

1. M is a *start* model: the redundancy model trained from scratch on a random ``start_rate`` of the source
   patches (those patches count as already annotated), or a model of another domain (its from-scratch model
   on all of that domain's patches; no source patch is annotated yet);
2. for each selection method and seed s, a fraction ``rate`` of the source patches is chosen (by the study's
   selection code, given to :func:`plan_round`): ``random``; ``dq`` (eq. 1 bins, eq. 2 sampling); ``kcenter``; ``uncertain`` (in each
   DQ bin, the patches on which M is least consistent under the ranking's perturbations,
   :mod:`dqtool.selection.uncertain`); ``uncertain_nobins`` (the least consistent overall);
3. M is finetuned on the annotated set, A = (start patches) U (chosen patches), with the study's step budget
   and training seed s, and scored on the source test split.

Selection is over the whole cache, as ``dqtool select`` does for a lab: a chosen patch that is already
annotated adds nothing, and the table says how many were new (``new``). The uncertainty of every patch under
M is computed once per start model and stored in the cache (the selection seed only breaks ties), so the
three seeds of ``uncertain`` differ in ties and in the training seed. Table ``active``: one row per (start,
method, seed); table ``active_seeds``: mean and std over seeds per (start, method) (:func:`round_tables`).

This module plans the round and writes its tables; the experiment runs it (``_active_step`` in
:mod:`dqtool.studies.experiment`: the selections, the uncertainty scores on the study's workers, the trainings as
one batch of tasks), so it imports no selection, ranking or training code itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.tables import seed_spread

__all__ = ["ACTIVE_METHODS", "ACTIVE_DEFAULTS", "ActiveStart", "ActiveRun", "check_active", "plan_round", "round_tables"]

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
    from dqtool.ranking.rank import SCORES  # the ranking's consistency scores

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


@dataclass(frozen=True)
class ActiveRun:
    """One model of the round: its start, selection method and seed, the chosen patches (``added``), the patches it
    trains on (``indices`` = the start's annotated ones U ``added``) and its name (model file and stage)."""

    start: ActiveStart
    method: str
    seed: int
    added: np.ndarray
    indices: np.ndarray
    name: str


def plan_round(starts: list[ActiveStart], spec: dict, select: Callable[[str, int, ActiveStart], np.ndarray]) -> list:
    """The :class:`ActiveRun` of every (start, seed, method), in that order; ``select(method, seed, start)`` gives the
    chosen patch indices (the caller's selection code: random, DQ, k-center, uncertain with the start's model)."""
    runs = []
    for start in starts:
        for seed in spec["seeds"]:
            for method in spec["methods"]:
                added = np.asarray(select(method, int(seed), start), np.int64)
                runs.append(ActiveRun(start, method, int(seed), added, np.union1d(start.labelled, added).astype(np.int64),
                                      f"{start.slug}__{method}_{spec['rate']:g}_seed{seed}"))
    if not runs:
        raise InputError("active: nothing to train (no start model, method or seed)")
    return runs


def round_tables(runs: list, results: list, source: str, metrics: Sequence[str]) -> dict[str, list]:
    """{"active": one row per run, "active_seeds": mean and std over seeds per (start, method)}; ``results`` are the
    runs' (TrainResult, scores, stds), scores and stds by domain then metric."""
    rows = []
    for run, (result, scores, stds) in zip(runs, results):
        row = {"start": run.start.name, "method": run.method, "seed": run.seed,
               "labelled before": int(run.start.labelled.size), "chosen": int(run.added.size),
               "new": int(np.setdiff1d(run.added, run.start.labelled).size), "patches": int(run.indices.size),
               "trained_on": result.n_patches}
        for m in metrics:
            row[m] = scores[source][m]
            row[f"{m} std"] = stds[source].get(m, float("nan"))
        rows.append(row)
    return {"active": rows, "active_seeds": seed_spread(rows, ("start", "method"), metrics)}
