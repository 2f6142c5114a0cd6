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
    from dqtool.common.files import file_sha256
    from dqtool.segmentation import transfer as transfer_module

    evaluate = transfer_module.evaluate_model

    def counted(model, test_dir, *args, **kwargs):
        SCORED.append((file_sha256(model), str(test_dir)))
        return evaluate(model, test_dir, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer_module, "evaluate_model", counted)
        return _micro_study(tmp_path_factory.mktemp("retention"), replay_rates=[],
                            retain=[{"method": "l2sp", "weight": 0}, {"method": "l2sp", "weight": 5}])


SCORED: list = []  # (model sha256, test split) of every evaluation the `study` fixture ran


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_scratch_model_the_reverse_runs_start_from_is_scored_once_per_split(study):
    """Its own task trains and scores it; the three reverse finetunings (naive, W = 0, W = 5), tasks of their own,
    reuse its records instead of scoring it again each."""
    from dqtool.common.files import file_sha256

    scratch = file_sha256(study / "models" / "scratch" / "big_all")
    splits = sorted(t for sha, t in SCORED if sha == scratch)
    assert splits and len(splits) == len(set(splits)) == 4, splits  # small and big, test and val: once each
    assert (study / "models" / "scratch" / "evals").is_dir()


def _micro_study(root, **config):
    """Two tiny domains (small and big discs) with train, val and test folders; the study ``config`` (over the
    defaults: source small, target big, both ways, no redundancy models, no sequences) run in ``root/out``."""
    domains = {}
    for name, radius, seed in (("small", (4.0, 6.0), 1), ("big", (7.0, 9.0), 5)):
        for split, (n, s) in {"train": (2, seed), "val": (1, seed + 1), "test": (1, seed + 2)}.items():
            disc_folder(root / name / split, n, n_cells=5, radius=radius, seed=s)
        domains[name] = {"train": str(root / name / "train"), "val": str(root / name / "val"),
                         "test": str(root / name / "test")}
    config = {"domains": domains, "patch": {"size": 32, "stride": 32}, "source": "small", "targets": ["big"],
              "rates": [], "methods": ["random"], "reverse": ["big"], "sequences": [], "train": TRAIN, **config}
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


# ---- retain_seeds and replay_reverse: the chosen W, naive finetuning and replay again with more seeds


def test_seed_runs_are_planned_per_seed_direction_and_chosen_weight():
    from dqtool.studies.retention_seeds import plan_seed_runs

    directions = [{"start": "a", "end": "b", "folder": "finetune_b", "replays": [("dq", 0.1, "replay_b_0.1")]},
                  {"start": "b", "end": "a", "folder": "finetune_b_to_a", "replays": []}]
    chosen = {("a", "b", "l2sp"): 0.01, ("b", "a", "lwf"): 3.0}
    runs = plan_seed_runs(directions, chosen, [1, 2])
    assert [(r.seed, r.start, r.run, r.folder) for r in runs] == [
        (1, "a", "naive", "finetune_b_seed1"), (1, "a", "l2sp 0.01", "finetune_b_l2sp_0.01_seed1"),
        (1, "a", "replay dq 0.1", "replay_b_0.1_seed1"),
        (1, "b", "naive", "finetune_b_to_a_seed1"), (1, "b", "lwf 3", "finetune_b_to_a_lwf_3_seed1"),
        (2, "a", "naive", "finetune_b_seed2"), (2, "a", "l2sp 0.01", "finetune_b_l2sp_0.01_seed2"),
        (2, "a", "replay dq 0.1", "replay_b_0.1_seed2"),
        (2, "b", "naive", "finetune_b_to_a_seed2"), (2, "b", "lwf 3", "finetune_b_to_a_lwf_3_seed2")]
    assert runs[1].retain == "l2sp" and runs[1].weight == 0.01 and runs[2].replay_rate == 0.1


def test_the_seeds_table_measures_the_issue_goal_on_the_means_over_seeds():
    from dqtool.studies.retention_seeds import seed_row, seeds_table

    def row(run, seed, src, tgt):
        return seed_row("a", "b", run, seed, {f"a {METRIC}": src, f"b {METRIC}": tgt}, METRIC)

    rows = [row("naive", 0, 0.20, 0.80), row("naive", 1, 0.30, 0.70),           # S_N 0.25, T_N 0.75
            row("l2sp 0.1", 0, 0.60, 0.74), row("l2sp 0.1", 1, 0.50, 0.75),     # S 0.55, T 0.745
            row("lwf 1", 0, 0.90, 0.50), row("lwf 1", 1, 0.80, 0.60)]           # S 0.85, T 0.55
    out = {r["run"]: r for r in seeds_table(rows, {("a", "b"): 0.85}, METRIC)}  # S_0 0.85: naive drops 0.6
    assert out["l2sp 0.1"]["seeds"] == 2
    assert out["l2sp 0.1"][f"source {METRIC} mean over seeds"] == pytest.approx(0.55)
    assert out["l2sp 0.1"][f"source {METRIC} std over seeds"] == pytest.approx(0.1 / math.sqrt(2))
    assert out["l2sp 0.1"]["drop removed"] == pytest.approx(0.30 / 0.60)      # half the drop: enough
    assert out["l2sp 0.1"]["target lost"] == pytest.approx(0.005)
    assert out["l2sp 0.1"]["goal met"] is True
    assert out["lwf 1"]["drop removed"] == pytest.approx(1.0) and out["lwf 1"]["target lost"] == pytest.approx(0.2)
    assert out["lwf 1"]["goal met"] is False                                  # keeps the source, loses the target
    assert out["naive"]["drop removed"] == 0 and out["naive"]["goal met"] is None
    no_drop = seeds_table(rows, {("a", "b"): 0.1}, METRIC)                    # naive lost nothing: no goal to meet
    assert all(math.isnan(r["drop removed"]) and r["goal met"] is None for r in no_drop)


@pytest.mark.parametrize("extra, message", [
    ({"retain_seeds": [1]}, "no 'retain' entries"),
    ({"retain": [{"method": "l2sp", "weight": 1}], "retain_seeds": [0, 1]}, "other than the study's seed 0"),
    ({"retain": [{"method": "l2sp", "weight": 1}], "retain_seeds": [1, 1]}, "distinct integer seeds"),
    ({"retain": [{"method": "l2sp", "weight": 1}], "retain_seeds": "1,2"}, "distinct integer seeds"),
    ({"replay_reverse": "yes"}, "expected true or false"),
    ({"replay_reverse": True}, "no 'reverse' targets"),
])
def test_a_wrong_seeds_or_reverse_replay_key_is_refused(extra, message):
    config = {"domains": {"a": {"train": "x", "test": "y"}}, "source": "a", **extra}
    with pytest.raises(InputError, match=message):
        check_config(config)


@pytest.fixture(scope="module")
def seeded_study(tmp_path_factory):
    """The micro study with retain = [l2sp W=0] (so W = 0 is chosen and must equal naive finetuning bit for bit at
    every seed), random replay at 0.5 both ways (``replay_reverse``), and ``retain_seeds`` [1]."""
    return _micro_study(tmp_path_factory.mktemp("retention_seeds"), replay_rates=[0.5], replay_method="random",
                        replay_reverse=True, retain=[{"method": "l2sp", "weight": 0}], retain_seeds=[1])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_chosen_weight_naive_and_replay_run_again_with_each_seed(seeded_study):
    out = seeded_study
    rows = json.loads((out / "tables" / "retention_seeds.json").read_text())
    assert [(r["start"], r["end"], r["run"], r["seeds"]) for r in rows] == [
        ("small", "big", "naive", 2), ("small", "big", "l2sp 0", 2), ("small", "big", "replay random 0.5", 2),
        ("big", "small", "naive", 2), ("big", "small", "l2sp 0", 2), ("big", "small", "replay random 0.5", 2)]

    def model(folder, stage):
        return (out / folder / "models" / stage).read_bytes()

    # the seed is the finetuning's: seed 1 gives another model than seed 0 ...
    assert model("finetune_big_seed1", "01_finetune") != model("finetune_big", "01_finetune")
    # ... W = 0 is still naive finetuning bit for bit at seed 1, both ways, so its row is naive's
    for naive, zero in (("finetune_big_seed1", "finetune_big_l2sp_0_seed1"),
                        ("finetune_big_to_small_seed1", "finetune_big_to_small_l2sp_0_seed1")):
        assert model(naive, "01_finetune") == model(zero, "01_finetune")
    for a, b in ((rows[0], rows[1]), (rows[3], rows[4])):
        assert all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
                   for k in a if k.endswith("over seeds"))
    # the reverse replay starts from the big domain's scratch model and replays big patches onto small
    spec = json.loads((out / "replay_big_to_small_0.5_seed1" / "study.json").read_text())
    assert spec["init"].endswith("scratch/big_all") and spec["source"]["path"].endswith("big.h5")
    assert json.loads((out / "replay_big_to_small_0.5_seed1" / "models" / "01_replay_random_0.5.json").read_text()
                      )["config"]["seed"] == 1
    # the seed-0 runs in the means are the study's own: the transfer table's rows
    transfer = {r["model"]: r for r in json.loads((out / "tables" / "transfer.json").read_text())}
    assert "replay random 0.5 big -> small" in transfer
    seed1 = json.loads((out / "finetune_big_seed1" / "stages.json").read_text())
    assert rows[0][f"target {METRIC} mean over seeds"] == pytest.approx(
        (transfer["naive finetune small -> big"][f"big {METRIC}"] + seed1[-1]["scores"]["big"][METRIC]) / 2,
        nan_ok=True)
