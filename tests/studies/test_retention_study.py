"""``experiment`` with ``retain`` (issue 15 part 1): the finetunings again with each source-free retention
method and weight, scored on validation splits where W is chosen, never on the test splits."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dqtool.common.errors import InputError
from dqtool.studies.experiment import check_config, choose_retain_weights
from dqtool_cli.main import cli
from factories import disc_folder

TRAIN = {"n_epochs": 4, "bsize": 32, "batch_size": 4, "min_train_masks": 1, "save_every": 50}
METRIC = "f1@0.50"


def _row(start, end, method, weight, val_start, val_end):
    return {"start": start, "end": end, "method": method, "weight": weight,
            f"{start}_val {METRIC}": val_start, f"{end}_val {METRIC}": val_end}


def test_w_is_the_best_source_among_the_weights_that_keep_the_target():
    naive = {("a", "b"): {f"a_val {METRIC}": 0.2, f"b_val {METRIC}": 0.80}}
    rows = [_row("a", "b", "l2sp", 0.01, 0.30, 0.79),   # keeps b (0.79 >= 0.78), source 0.30
            _row("a", "b", "l2sp", 0.1, 0.50, 0.785),   # keeps b, source 0.50: chosen
            _row("a", "b", "l2sp", 1.0, 0.70, 0.70),    # best source, but loses 0.10 of b
            _row("a", "b", "lwf", 1.0, 0.25, 0.60),     # no lwf weight keeps b: the best b is chosen
            _row("a", "b", "lwf", 3.0, 0.40, 0.50)]
    out = choose_retain_weights(rows, naive, METRIC, tolerance=0.02)
    assert [r["chosen"] for r in out] == [False, True, False, True, False]
    assert all(r[f"naive b_val {METRIC}"] == 0.80 for r in out)
    assert rows[0].get("chosen") is None  # the input rows are left as they were


def test_ties_take_the_smaller_weight_and_no_val_split_chooses_nothing():
    naive = {("a", "b"): {f"a_val {METRIC}": 0.2, f"b_val {METRIC}": 0.80}}
    tie = [_row("a", "b", "l2sp", 1.0, 0.5, 0.8), _row("a", "b", "l2sp", 0.1, 0.5, 0.8)]
    assert [r["chosen"] for r in choose_retain_weights(tie, naive, METRIC)] == [False, True]
    no_val = [{"start": "a", "end": "b", "method": "l2sp", "weight": 0.1}]
    assert choose_retain_weights(no_val, {("a", "b"): {}}, METRIC)[0]["chosen"] is None


@pytest.mark.parametrize("retain, message", [
    ([{"method": "ewc", "weight": 1}], "method 'ewc'"),
    ([{"method": "l2sp", "weight": -1}], "retain_weight = -1"),
    ([{"method": "lwf", "weight": "a lot"}], "weight 'a lot'"),
    ([{"method": "lwf"}], "expected {'method'"),
])
def test_a_wrong_retain_entry_is_refused(retain, message):
    config = {"domains": {"a": {"train": "x", "test": "y"}}, "source": "a", "retain": retain}
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("(", r"\(")):
        check_config(config)


def test_no_retain_key_leaves_the_config_as_it_was():
    config = check_config({"domains": {"a": {"train": "x", "test": "y"}}, "source": "a"})
    assert "retain" not in config  # a study recorded before the key resumes with its own experiment.json


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tiny domains with train, val and test folders; the source model, naive finetuning both ways, and
    L2-SP at W = 0 (naive, bit for bit) and W = 5, both ways."""
    root = tmp_path_factory.mktemp("retention")
    domains = {}
    for name, radius, seed in (("small", (4.0, 6.0), 1), ("big", (7.0, 9.0), 5)):
        for split, (n, s) in {"train": (2, seed), "val": (1, seed + 1), "test": (1, seed + 2)}.items():
            disc_folder(root / name / split, n, n_cells=5, radius=radius, seed=s)
        domains[name] = {"train": str(root / name / "train"), "val": str(root / name / "val"),
                         "test": str(root / name / "test")}
    config = {"domains": domains, "patch": {"size": 32, "stride": 32}, "source": "small", "targets": ["big"],
              "rates": [], "methods": ["random"], "reverse": ["big"], "replay_rates": [], "sequences": [],
              "train": TRAIN, "retain": [{"method": "l2sp", "weight": 0}, {"method": "l2sp", "weight": 5}]}
    path = root / "study.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["--quiet", "experiment", str(path), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_retention_rows_are_scored_on_val_and_test_and_one_w_is_chosen_per_direction(study):
    rows = json.loads((study / "tables" / "retention.json").read_text())
    assert [(r["start"], r["end"], r["weight"]) for r in rows] == [
        ("small", "big", 0.0), ("small", "big", 5.0), ("big", "small", 0.0), ("big", "small", 5.0)]
    for r in rows:
        for d in ("small", "big"):
            assert f"{d} {METRIC}" in r and f"{d}_val {METRIC}" in r  # test and validation scores
    for direction in (("small", "big"), ("big", "small")):
        assert sum(r["chosen"] for r in rows if (r["start"], r["end"]) == direction) == 1
    transfer = json.loads((study / "tables" / "transfer.json").read_text())
    assert "finetune + l2sp 5 small -> big" in [r["model"] for r in transfer]
    # W = 0 adds nothing: the same model bytes as naive finetuning, so the same scores
    for naive, zero in (("finetune_big", "finetune_big_l2sp_0"), ("finetune_big_to_small", "finetune_big_to_small_l2sp_0")):
        assert (study / naive / "models" / "01_finetune").read_bytes() == \
            (study / zero / "models" / "01_finetune").read_bytes()
    heavy = json.loads((study / "finetune_big_l2sp_5" / "models" / "01_finetune.json").read_text())
    assert heavy["config"]["retain"] == "l2sp" and heavy["config"]["retain_weight"] == 5.0
    naive_row = next(r for r in transfer if r["model"] == "naive finetune small -> big")
    zero_row = next(r for r in rows if r["start"] == "small" and r["weight"] == 0.0)
    assert all(naive_row[k] == zero_row[k] or (math.isnan(naive_row[k]) and math.isnan(zero_row[k]))
               for k in naive_row if k.startswith(("small", "big")))
    # the scratch model the reverse finetunings start from trained without retention
    scratch = json.loads((study / "models" / "scratch" / "big_all.json").read_text())
    assert "retain" not in scratch["config"]
