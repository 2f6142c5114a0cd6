"""Seed spread of the quick study's 10 % redundancy point: DQ vs random at seeds 1 and 2.

Uses the seed-0 quick study's data, fluo cache and MAE features (``dqtool experiment --quick --out
runs/quick`` first) and changes only the seed of the subset draw and of the training, so the spread is
what one seed cannot tell apart. Run: ``.venv/bin/python docs/quick_study/seed_spread.py [runs/quick] [rate]``.
Writes ``<study>/seed_spread/seeds_<rate>.json`` and prints one row per model.
"""

import json
import sys
from pathlib import Path

import numpy as np

from dqtool.segmentation.train import TrainConfig, load_patches, train_patches
from dqtool.segmentation.transfer import Stage, score_stage
from dqtool.selection.quantize import select_subset
from dqtool.selection.subsets import random_subset, subset_total
from dqtool.studies.experiment import QUICK


def main(study: Path, rate: float, seeds=(1, 2)) -> list[dict]:
    cache = study / "caches" / "fluo.h5"
    test = str(study / "data" / "fluo" / "test")
    out = study / "seed_spread"
    n = len(load_patches(cache)[0])
    rows = []
    for seed in seeds:
        for method in ("dq", "random"):
            if method == "dq":
                idx = select_subset(cache, rate, method="dq", seed=seed).index_array()
            else:
                idx = np.sort(random_subset(n, subset_total(n, rate), seed))
            images, labels, provenance = load_patches(cache, idx)
            provenance.update(method=method, rate=rate)
            config = TrainConfig(**{**QUICK["train"], "seed": seed})
            model = out / f"fluo_{method}_{rate:g}_seed{seed}"
            result = train_patches(list(images), list(labels), model, config, provenance=provenance, resume=True,
                                   quiet=True)
            stage = Stage(name=f"{method}_{rate:g}_s{seed}", model=model, train=result)
            score_stage(stage, {"fluo": test}, out, config.channels, quiet=True)
            rows.append({"seed": seed, "method": method, "rate": rate, **stage.scores["fluo"]})
            print(rows[-1], flush=True)
    (out / f"seeds_{rate:g}.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/quick"), float(sys.argv[2]) if len(sys.argv) > 2 else 0.1)
