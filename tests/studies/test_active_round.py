"""``experiment`` with ``active`` (issue 15 section 2): a start model finetuned on the patches each selection adds."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from dqtool.common.errors import InputError
from dqtool.selection.subsets import random_subset
from dqtool.common.tables import seed_spread
from dqtool.studies.active import ACTIVE_METHODS
from dqtool.studies.experiment import check_config
from dqtool_cli.main import cli
from factories import disc_folder

TRAIN = {"n_epochs": 2, "bsize": 32, "batch_size": 4, "min_train_masks": 1, "save_every": 50}
BASE = {"domains": {"a": {"train": "x", "test": "y"}, "b": {"train": "x", "test": "y"}}, "source": "a"}


@pytest.mark.parametrize("active, message", [
    ({"rate": 0}, "rate 0 is not a rate"),
    ({"start_rate": 1.5}, "start_rate 1.5"),
    ({"methods": ["dq", "entropy"]}, "methods: 'entropy'"),
    ({"methods": []}, "methods must be a non-empty list"),
    ({"starts": ["a"]}, "starts: 'a'"),  # the source is not a start of its own
    ({"starts": ["c"]}, "starts: 'c'"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"seeds": [-1]}, "seeds must be distinct integers >= 0"),
    ({"score": "dice"}, "score 'dice'"),
    ({"bins": 0}, "bins 0"),
    ({"budget": 3}, "unknown key 'budget'"),
    ([0.1], "expected an object"),
])
def test_a_wrong_active_entry_is_refused_in_one_line(active, message):
    with pytest.raises(InputError, match=message):
        check_config({**BASE, "active": active})


def test_the_defaults_are_the_issues_round():
    active = check_config({**BASE, "active": {}})["active"]
    assert active["start_rate"] == 0.01 and active["rate"] == 0.1 and active["seeds"] == [0, 1, 2]
    assert tuple(active["methods"]) == ACTIVE_METHODS and active["starts"] == ["random"]
    assert "active" not in check_config(dict(BASE))  # absent: the step is not run


def test_seed_spread_is_the_sample_std_of_the_per_seed_means():
    rows = [{"start": "s", "method": "dq", "f1": v} for v in (0.2, 0.4, 0.9)] + [{"start": "s", "method": "x", "f1": 1}]
    assert [r["method"] for r in seed_spread(rows, ("start", "method"), ["f1"], min_rows=2)] == ["dq"]
    row, single = seed_spread(rows, ("start", "method"), ["f1"])
    assert single["seeds"] == 1 and math.isnan(single["f1 std over seeds"])
    assert row["seeds"] == 3 and row["f1 mean over seeds"] == pytest.approx(0.5)
    assert row["f1 std over seeds"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))


def _sha(indices) -> str:
    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tiny domains; the round from the random start and from the other domain's model, every method, one seed (not the study's)."""
    root = tmp_path_factory.mktemp("active")
    domains = {}
    for name, radius, seed in (("small", (4.0, 6.0), 1), ("big", (7.0, 9.0), 5)):
        disc_folder(root / name / "train", 4, n_cells=5, radius=radius, seed=seed)
        disc_folder(root / name / "test", 1, n_cells=5, radius=radius, seed=seed + 2)
        domains[name] = {"train": str(root / name / "train"), "test": str(root / name / "test")}
    config = {"domains": domains, "patch": {"size": 32, "stride": 32}, "source": "small", "targets": ["big"],
              "rates": [], "methods": ["random"], "replay_rates": [], "sequences": [], "embed_epochs": 1,
              "train": TRAIN, "active": {"start_rate": 0.125, "rate": 0.25, "seeds": [1], "bins": 2,
                                         "starts": ["random", "big"]}}
    path = root / "study.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["--quiet", "experiment", str(path), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out", path


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_model_of_the_round_starts_from_its_start_and_trains_on_the_annotated_set(study):
    from dqtool.selection.quantize import select_subset
    from dqtool.selection.uncertain import PatchScorer

    out, _ = study
    rows = json.loads((out / "tables" / "active.json").read_text())
    assert [(r["start"], r["seed"], r["method"]) for r in rows] == [
        (start, seed, method) for start in ("random 0.125", "big model") for seed in (1,) for method in ACTIVE_METHODS]
    cache = out / "caches" / "small.h5"
    redundancy = {r["method"]: r for r in json.loads((out / "tables" / "redundancy.json").read_text())}
    assert redundancy["random"]["rate"] == 0.125  # the random start model joined Table I
    start_model = out / "models" / "redundancy" / "small_random_0.125"
    labelled = random_subset(16, 2, 0)  # 4 images of 64 x 64 give 16 patches; 12.5 % of them, seed 0
    assert json.loads(start_model.parent.joinpath(f"{start_model.name}.json").read_text())["provenance"]["indices_sha256"] == _sha(labelled)
    for r in rows:
        slug = "random_0.125" if r["start"].startswith("random") else "from_big"
        name = f"{slug}__{r['method']}_0.25_seed{r['seed']}"
        record = json.loads((out / "models" / "active" / f"{name}.json").read_text())
        init = start_model if r["start"].startswith("random") else out / "models" / "scratch" / "big_all"
        assert record["provenance"]["init"]["path"] == str(init)
        before = labelled if r["start"].startswith("random") else np.zeros(0, int)
        method, bins = ("uncertain", None if r["method"] == "uncertain_nobins" else 2) \
            if r["method"].startswith("uncertain") else (r["method"], 2)
        if method == "random":
            added = np.sort(np.random.default_rng(r["seed"]).choice(16, size=4, replace=False))
        else:
            added = select_subset(cache, 0.25, method=method, bins=bins, seed=r["seed"],
                                  scorer=PatchScorer(str(init)) if method == "uncertain" else None).indices
        assert record["provenance"]["indices_sha256"] == _sha(np.union1d(before, added)), name
        assert r["chosen"] == 4 and r["new"] == np.setdiff1d(added, before).size
        assert r["labelled before"] == before.size and r["patches"] == np.union1d(before, added).size
        assert 0 <= r["f1@0.50"] <= 1
    seeds = json.loads((out / "tables" / "active_seeds.json").read_text())
    assert len(seeds) == 2 * len(ACTIVE_METHODS) and all(s["seeds"] == 1 for s in seeds)
    assert "Active-learning round" in (out / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_rerun_retrains_nothing_and_writes_the_same_tables(study):
    out, path = study
    before = {p.name: p.read_bytes() for p in (out / "tables").iterdir()}
    models = {p: p.stat().st_mtime_ns for p in (out / "models" / "active").iterdir()
              if p.is_file() and not p.name.startswith(".")}  # not the lock files
    result = CliRunner().invoke(cli, ["--quiet", "experiment", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in (out / "tables").iterdir()} == before
    assert {p: p.stat().st_mtime_ns for p in models} == models
