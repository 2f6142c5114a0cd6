"""The study configs in ``studies/`` run, in miniature, in CI: they cannot rot.

A miniature keeps every key and step of a config (every selection method, repeats, zero-shot, reverse and
joint training, replay, every sequence) but takes one or two images per split, big patches and two SGD steps,
so it checks that the config parses, its splits name real images, and each step runs to its table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def _data_root(config_path: Path, config: dict) -> Path:
    root = (config_path.parent / config["data_root"]).resolve()
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{root}: the shared development data is not here")
        pytest.skip(f"{root}: the shared development data is not here")
    return root


def miniature(config: dict, data_root: Path, n_train: int = 2) -> dict:
    """``config`` with one test image and ``n_train`` train images per domain, 2 steps per model."""
    from dqtool.data.datasets import open_dataset

    mini = json.loads(json.dumps(config))
    for name, spec in mini["domains"].items():
        test = spec["test"][:1]
        every = sorted(s.name for s in open_dataset(data_root / spec["root"], format=spec.get("format")))
        held = set(spec["test"]) | set(spec.get("val", []))
        spec["train"] = [n for n in every if n not in held][:n_train]
        spec["test"] = test
        if "val" in spec:
            spec["val"] = spec["val"][:1]
    mini["data_root"] = str(data_root)
    mini["patch"] = {"size": 224, "stride": 224}
    mini["train"] = {**mini["train"], "n_epochs": 2, "bsize": 32, "batch_size": 4, "nimg_per_epoch": 4,
                     "min_train_masks": 1, "save_every": 50}
    mini["embed_epochs"] = 1
    mini["rates"] = mini["rates"][-1:]
    mini["repeat_seeds"] = mini.get("repeat_seeds", [])[:1]
    mini["replay_rates"] = mini["replay_rates"][:1]
    return mini


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_study_config_runs_in_miniature(tmp_path):
    from dqtool.studies.experiment import load_config, run_experiment

    path = STUDIES / "real.json"
    raw = json.loads(path.read_text())
    config = load_config(path)  # the config as committed parses, its data_root resolves
    root = _data_root(path, raw)
    assert Path(config["data_root"]) == root
    mini = miniature(raw, root)
    result = run_experiment(mini, tmp_path / "study", quiet=True)
    tables = result.tables()
    methods = {(r["method"], r["seed"]) for r in tables["redundancy"]}
    assert {m for m, _ in methods} == {"all", *raw["methods"]}
    assert any(seed != raw["seed"] for _, seed in methods)  # the repeats ran
    assert {r["model"] for r in tables["zero_shot"]} >= {"cyto (all patches)", "cyto (DQ 0.3)"}
    models = [r["model"] for r in tables["transfer"]]
    assert "naive finetune histo -> cyto" in models and "joint cyto + histo" in models
    assert "replay random 0.1" in models
    assert {r["path"] for r in tables["sequences"]} == {" -> ".join(p) for p in raw["sequences"]}
    # the splits name the images of the shared folders, nothing is copied
    split = json.loads((tmp_path / "study" / "splits" / "cyto.test.json").read_text())
    assert Path(split["root"]) == root / raw["domains"]["cyto"]["root"] and split["names"] == mini["domains"]["cyto"]["test"]
    copied = [p for p in (tmp_path / "study").rglob("*") if p.suffix.lower() in (".tif", ".tiff", ".xml")]
    assert not copied, copied


def test_real_retention_config_parses_and_names_real_images_apart():
    """studies/real_retention.json: its val splits are images of the shared folders, apart from the test splits
    (real.json's) and so out of every train split; its finetunings run in tests/studies/test_retention_study.py."""
    from dqtool.data.datasets import open_dataset
    from dqtool.studies.experiment import load_config

    path = STUDIES / "real_retention.json"
    raw = json.loads(path.read_text())
    config = load_config(path)
    root = _data_root(path, raw)
    real = json.loads((STUDIES / "real.json").read_text())
    assert config["retain"] and {e["method"] for e in config["retain"]} == {"l2sp", "lwf"}
    assert config["retain_seeds"] == [1, 2] and config["replay_reverse"] is True  # three seeds, replay both ways
    for name, spec in raw["domains"].items():
        every = {s.name for s in open_dataset(root / spec["root"], format=spec.get("format"))}
        assert set(spec["val"]) <= every and set(spec["test"]) <= every, name
        assert not set(spec["val"]) & set(spec["test"]), name
        assert spec["test"] == real["domains"][name]["test"]  # the real study's test splits, unchanged


def test_real_active_config_is_real_jsons_cyto_split_and_budget():
    """studies/real_active.json: the round runs on the real study's Cyto split with its step budget and seed, so
    its start model is real.json's 1 % random redundancy model; the round itself runs in
    tests/studies/test_active_round.py."""
    from dqtool.studies.active import ACTIVE_METHODS
    from dqtool.studies.experiment import load_config

    path = STUDIES / "real_active.json"
    config = load_config(path)
    real = json.loads((STUDIES / "real.json").read_text())
    assert config["domains"]["cyto"] == real["domains"]["cyto"] and config["source"] == real["source"]
    assert (config["train"], config["patch"], config["seed"]) == (real["train"], real["patch"], real["seed"])
    active = config["active"]
    assert tuple(active["methods"]) == ACTIVE_METHODS and active["seeds"] == [0, 1, 2]
    assert active["start_rate"] in real["rates"] and "accuracy@0.50" in config["metrics"]


def test_real_active_histo_config_starts_from_the_real_studys_histo_model():
    """studies/real_active_histo.json: the same round from the Histo model (real.json's MoNuSeg train split)."""
    from dqtool.studies.experiment import load_config

    config = load_config(STUDIES / "real_active_histo.json")
    active = load_config(STUDIES / "real_active.json")
    real = json.loads((STUDIES / "real.json").read_text())
    assert config["domains"]["histo"] == real["domains"]["histo"] and config["active"]["starts"] == ["histo"]
    assert {k: v for k, v in config["active"].items() if k != "starts"} == \
        {k: v for k, v in active["active"].items() if k != "starts"}
