"""The retention study's seeds (issue 15, ``"retain_seeds"`` in a study config): once W is chosen on the
validation splits (:func:`dqtool.studies.experiment.choose_retain_weights`), naive finetuning, each
source-free method at its chosen W, and replay are trained again with each extra seed, from the same start
models, and scored on the test splits. This module plans those runs and summarises them; the experiment trains.

For a direction ``start -> end`` and a run r (naive, a method at its W, a replay), with S_r and T_r the means
over seeds of its test score on the start (source) and end (target) domains, S_0 the start model's score on
its own domain, and N the naive finetuning::

    drop removed (r) = (S_r - S_N) / (S_0 - S_N)        (NaN when naive lost nothing: S_0 <= S_N)
    target lost  (r) = T_N - T_r
    goal met     (r) = drop removed >= 0.5 and target lost <= 0.02     (issue 15's goal)

Only the finetuning's seed changes (batch order, augmentation, the replay subset's draw); the start models
are the study's (its ``seed``), so the spread is the finetuning's, not the start model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dqtool.common.tables import seed_spread

#: Issue 15's goal: a source-free run removes at least this share of naive finetuning's drop in source score ...
GOAL_REMOVED = 0.5
#: ... while losing at most this much target score against naive finetuning.
GOAL_TARGET_LOSS = 0.02


@dataclass(frozen=True)
class SeedRun:
    """One finetuning of the seeds step: ``run`` is ``"naive"``, ``"<method> <W>"`` or ``"replay <method> <rate>"``."""

    start: str
    end: str
    run: str
    seed: int
    folder: str  # the study subfolder it writes: ``<the seed-0 run's folder>_seed<s>``
    retain: str | None = None
    weight: float | None = None
    replay_method: str | None = None
    replay_rate: float | None = None


def plan_seed_runs(directions: list[dict], chosen: dict, seeds: list[int]) -> list[SeedRun]:
    """The runs of every seed, seed by seed, direction by direction: naive, the chosen (method, W) in the
    order given, then each replay.

    ``directions``: [{"start", "end", "folder" (the naive finetuning's study folder name), "replays":
    [(method, rate, folder), ...]}]; ``chosen``: {(start, end, method): W} (a method without a chosen W, for
    want of a validation split, is not run again).
    """
    runs = []
    for seed in seeds:
        for d in directions:
            start, end, folder = d["start"], d["end"], d["folder"]
            runs.append(SeedRun(start, end, "naive", seed, f"{folder}_seed{seed}"))
            for (s, e, method), w in chosen.items():
                if (s, e) == (start, end):
                    runs.append(SeedRun(start, end, f"{method} {w:g}", seed, f"{folder}_{method}_{w:g}_seed{seed}",
                                        retain=method, weight=w))
            for method, rate, rfolder in d.get("replays", []):
                runs.append(SeedRun(start, end, f"replay {method} {rate:g}", seed, f"{rfolder}_seed{seed}",
                                    replay_method=method, replay_rate=rate))
    return runs


def seed_row(start: str, end: str, run: str, seed: int, scores: dict, metric: str) -> dict:
    """One run's row: ``scores`` is a transfer row ({"<domain> <metric>": value, ...})."""
    return {"start": start, "end": end, "run": run, "seed": seed,
            f"source {metric}": float(scores.get(f"{start} {metric}", float("nan"))),
            f"target {metric}": float(scores.get(f"{end} {metric}", float("nan")))}


def seeds_table(rows: list[dict], start_scores: dict, metric: str) -> list[dict]:
    """Per (start, end, run): mean and std over seeds of the source and target scores, and the module's drop
    removed, target lost and goal met (computed on the means over seeds). ``start_scores[(start, end)]``: S_0."""
    src, tgt = f"source {metric}", f"target {metric}"
    out = seed_spread(rows, ("start", "end", "run"), (src, tgt))
    naive = {(r["start"], r["end"]): r for r in out if r["run"] == "naive"}
    for r in out:
        base = naive.get((r["start"], r["end"]))
        s0 = float(start_scores.get((r["start"], r["end"]), float("nan")))
        r[f"start model {src}"] = s0
        if base is None:
            r["drop removed"] = r["target lost"] = float("nan")
            r["goal met"] = None
            continue
        s_n, t_n = base[f"{src} mean over seeds"], base[f"{tgt} mean over seeds"]
        drop = s0 - s_n
        removed = (r[f"{src} mean over seeds"] - s_n) / drop if drop > 0 else float("nan")
        lost = t_n - r[f"{tgt} mean over seeds"]
        r["drop removed"] = float(removed)
        r["target lost"] = float(lost)
        r["goal met"] = None if r["run"] == "naive" or np.isnan(removed) else bool(
            removed >= GOAL_REMOVED and lost <= GOAL_TARGET_LOSS)
    return out
