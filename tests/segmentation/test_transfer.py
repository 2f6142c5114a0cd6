"""dqtool.transfer: finetune / replay / sequence stages, evaluation, forgetting matrix, nothing lost on failure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.common.errors import InputError
from dqtool.data.io import write_image_png
from dqtool.segmentation.train import TrainConfig
from dqtool.segmentation.model_files import build_net
from dqtool.segmentation.transfer import Stage, finetune, forgetting_matrix, replay, sequence, source_subset
from dqtool.selection.subsets import Subset, random_subset, subset_total
from factories import disc_images as discs

CONFIG = TrainConfig(n_epochs=2, bsize=32, batch_size=4, min_train_masks=1, save_every=50)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny domains (caches + Cellpose-layout test folders) and a seeded random Cellpose model."""
    root = tmp_path_factory.mktemp("world")
    out = {}
    for k, (name, radius) in enumerate([("small", (4.0, 6.0)), ("large", (7.0, 10.0))]):
        images, labels = discs(n_images=1, size=128, n_cells=16, radius=radius, seed=10 + k)
        out[name] = build_cache_from_arrays(root / f"{name}.h5", images, labels, ["train"], domain=name,
                                            size=64, stride=64)
        test = root / name / "test"
        test.mkdir(parents=True)
        t_img, t_lab = discs(n_images=2, size=64, n_cells=5, radius=radius, seed=20 + k)
        for i, (im, lb) in enumerate(zip(t_img, t_lab)):
            write_image_png(test / f"{i:03d}_img.png", im)
            write_image_png(test / f"{i:03d}_masks.png", lb.astype(np.uint16))
        out[f"{name}_test"] = root / name
    torch.manual_seed(0)
    net = build_net(None)
    out["model"] = root / "init_model"
    net.save_model(str(out["model"]))
    return out


def test_forgetting_matrix_change_is_against_the_best_earlier_stage():
    scores = [{"A": {"f1": 0.8}, "B": {"f1": 0.1}}, {"A": {"f1": 0.5}, "B": {"f1": 0.7}},
              {"A": {"f1": 0.6}, "B": {"f1": 0.9}}]
    stages = [Stage(name=f"s{i}", model=None, scores=s) for i, s in enumerate(scores)]
    rows = forgetting_matrix(stages, metrics=("f1",))
    values = np.array([[s["A"]["f1"], s["B"]["f1"]] for s in scores])
    for k in range(1, 3):
        expected = values[k] - values[:k].max(axis=0)
        assert rows[k]["A f1 change"] == pytest.approx(expected[0])
        assert rows[k]["B f1 change"] == pytest.approx(expected[1])
    assert math.isnan(rows[0]["A f1 change"])
    assert rows[2]["A f1 change"] == pytest.approx(-0.2)  # forgetting of A against stage 0


def _stardist_mean_f1(model, test_dir):
    """Independent reference: Cellpose's own eval + stardist's matching, mean F1@0.5 over test images."""
    from cellpose.models import CellposeModel
    from stardist.matching import matching

    from dqtool.data.datasets import open_dataset

    cp = CellposeModel(gpu=False, pretrained_model=str(model))
    f1 = [matching(s.labels, cp.eval(s.image, channels=[0, 0])[0], thresh=0.5).f1
          for s in open_dataset(test_dir, split="test")]
    return float(np.mean(f1))


def test_finetune_evaluates_every_stage(world, tmp_path):
    evals = {"small": str(world["small_test"]), "large": str(world["large_test"])}
    out = tmp_path / "ft"
    result = finetune(world["model"], world["large"], out, evals=evals, config=CONFIG, quiet=True)
    assert [s.name for s in result.stages] == ["init", "finetune"]
    assert (out / "models" / "01_finetune").exists()
    assert [r["stage"] for r in result.matrix] == ["init", "finetune"]
    for ext in ("csv", "md", "json", "png"):
        assert (out / f"forgetting.{ext}").exists()
    header = (out / "forgetting.csv").read_text().splitlines()[0].split(",")
    assert "small f1@0.50" in header and "large iou change" in header
    for stage in result.stages:
        assert stage.scores["small"]["f1@0.50"] == pytest.approx(_stardist_mean_f1(stage.model, world["small_test"]))
    # same command again: nothing retrained, evaluations reused
    mtime = (out / "models" / "01_finetune").stat().st_mtime_ns
    again = finetune(world["model"], world["large"], out, evals=evals, config=CONFIG, quiet=True)
    assert (out / "models" / "01_finetune").stat().st_mtime_ns == mtime
    assert again.matrix == result.matrix or json.dumps(again.matrix) == json.dumps(result.matrix)
    with pytest.raises(InputError, match="different config"):
        finetune(world["model"], world["large"], out, evals=evals, config=TrainConfig(n_epochs=3, bsize=32),
                 quiet=True)


def test_a_model_scored_on_a_split_elsewhere_is_not_scored_again(world, tmp_path, monkeypatch):
    """``known``: a record of the same model file on the same split, under another stage name in another
    study's folder, is reused (copied into this stage's own record); a different model file is evaluated."""
    import shutil

    from dqtool.segmentation import transfer

    evals = {"small": str(world["small_test"])}
    first = Stage(name="all_1", model=world["model"])
    transfer.score_stage(first, evals, tmp_path / "a", (0, 0))

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(transfer, "evaluate_model", refuse)
    again = Stage(name="init", model=world["model"])
    transfer.score_stage(again, evals, tmp_path / "b", (0, 0), known=[tmp_path / "a" / "evals"])
    assert again.scores == first.scores and again.stds == first.stds
    record = json.loads((tmp_path / "b" / "evals" / "init__small.json").read_text())
    assert record["summary"] == json.loads((tmp_path / "a" / "evals" / "all_1__small.json").read_text())["summary"]
    # the same file under another path is the same model; another file is not
    shutil.copy(world["model"], tmp_path / "copy")
    transfer.score_stage(Stage(name="copy", model=tmp_path / "copy"), evals, tmp_path / "c", (0, 0),
                         known=[tmp_path / "a" / "evals"])
    other = tmp_path / "other"
    torch.manual_seed(1)
    build_net(None).save_model(str(other))
    with pytest.raises(AssertionError, match="evaluated again"):
        transfer.score_stage(Stage(name="other", model=other), evals, tmp_path / "d", (0, 0),
                             known=[tmp_path / "a" / "evals", tmp_path / "b" / "evals"])
    with pytest.raises(AssertionError, match="evaluated again"):  # nothing known: evaluated
        transfer.score_stage(Stage(name="init", model=world["model"]), evals, tmp_path / "e", (0, 0))


def test_replay_mixes_a_source_subset_into_the_target(world, tmp_path):
    from dqtool.data.cache import PatchCache

    out = tmp_path / "rp"
    result = replay(world["model"], world["small"], world["large"], out, source_rate=0.5, source_method="random",
                    config=CONFIG, quiet=True)
    subset = json.loads((out / "source_subset.json").read_text())
    with PatchCache(world["small"]) as c:
        n_src = len(c)
    with PatchCache(world["large"]) as c:
        n_tgt = len(c)
    assert subset["n_selected"] == len(subset["indices"]) == subset_total(n_src, 0.5)
    assert len(set(subset["indices"])) == len(subset["indices"])
    record = json.loads((out / "models" / "01_replay_random_0.5.json").read_text())
    assert record["provenance"]["source"]["n_selected"] == subset["n_selected"]
    assert record["provenance"]["target"]["n_selected"] == n_tgt
    assert record["n_patches"] + record["n_dropped"] == subset["n_selected"] + n_tgt
    assert result.forgetting is None  # no --eval: no matrix
    with pytest.raises(InputError, match="different config"):
        replay(world["model"], world["small"], world["large"], out, source_rate=0.25, source_method="random",
               config=CONFIG, quiet=True)


def test_dq_replay_subset_uses_the_features_in_the_cache_and_keeps_them(tmp_path):
    """A DQ replay selects on the features already stored (e.g. a study's or `dqtool embed`'s) and never
    re-embeds over them (it once replaced a study's 2-epoch MAE features with 15-epoch ones)."""
    from dqtool.features.embed import embed_cache, load_features
    from dqtool.selection.quantize import features_hash

    images, labels = discs(n_images=3, size=128, n_cells=16, seed=3)
    src = build_cache_from_arrays(tmp_path / "src.h5", images, labels, ["a", "b", "c"], size=64, stride=64)
    feats = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    embed_cache(src, features_file=tmp_path / "feats.npy")
    subset = source_subset(src, 0.5, "dq", 0, tmp_path)
    np.testing.assert_array_equal(load_features(src), feats)
    assert subset.features_hash == features_hash(feats) and subset.n_selected == 6
    assert subset.config["seed"] == 0 and Subset.read(tmp_path / "source_subset.json") == subset


def test_random_source_subset_is_a_whole_subset_record(world, tmp_path):
    """The random replay subset is written as the same record as `dqtool select`'s (it used to leave out
    version, bins and config, and kept the seed at the top), and reused on its config's seed."""
    from dqtool.data.cache import PatchCache

    with PatchCache(world["small"]) as c:
        n, chash = len(c), c.content_hash
    subset = source_subset(world["small"], 0.5, "random", 4, tmp_path)
    written = json.loads((tmp_path / "source_subset.json").read_text())
    assert list(written) == ["version", "indices", "bins", "rate", "method", "n_total", "n_selected", "cache",
                             "cache_hash", "features_hash", "config", "coverage"]
    assert written["version"] == 1 and written["bins"] is None and written["coverage"] is None
    assert written["config"] == {"rate": 0.5, "method": "random", "seed": 4,
                                 "rounding": "total round(rate*N) with halves up"}
    assert written["cache_hash"] == chash and written["n_total"] == n
    assert list(subset.indices) == random_subset(n, subset_total(n, 0.5), 4).tolist()
    # reused as long as method, rate, seed and cache agree; another seed draws again
    mtime = (tmp_path / "source_subset.json").stat().st_mtime_ns
    assert source_subset(world["small"], 0.5, "random", 4, tmp_path) == subset
    assert (tmp_path / "source_subset.json").stat().st_mtime_ns == mtime
    assert source_subset(world["small"], 0.5, "random", 5, tmp_path).config["seed"] == 5
    # a file in the old layout (no config: its seed is unknown) is drawn again, to the same patches
    old = {"indices": list(subset.indices), "rate": 0.5, "method": "random", "seed": 4, "n_total": n,
           "n_selected": subset.n_selected, "cache": subset.cache, "cache_hash": chash}
    (tmp_path / "source_subset.json").write_text(json.dumps(old))
    assert source_subset(world["small"], 0.5, "random", 4, tmp_path) == subset
    assert Subset.read(tmp_path / "source_subset.json") == subset


def test_sequence_keeps_finished_stages_when_a_later_one_fails(world, tmp_path):
    empty = build_cache_from_arrays(tmp_path / "empty.h5", [np.full((64, 64), 7, np.uint8)],
                                    [np.zeros((64, 64), np.uint32)], ["e"], size=64, stride=64)
    evals = {"small": str(world["small_test"])}
    out = tmp_path / "seq"
    with pytest.raises(InputError, match="no masks"):
        sequence([world["small"], empty], out, evals=evals, config=CONFIG, quiet=True)
    assert (out / "models" / "00_small").exists()
    rows = json.loads((out / "forgetting.json").read_text())
    assert [r["stage"] for r in rows] == ["small"]


def test_cli_sequence_and_finetune(world, tmp_path):
    from dqtool_cli.main import cli

    common = ["--epochs", "2", "--bsize", "32", "--batch-size", "4", "--min-train-masks", "1", "--quiet"]
    res = CliRunner().invoke(cli, ["sequence", str(world["small"]), str(world["large"]), "--out",
                                   str(tmp_path / "s"), "--eval", f"large={world['large_test']}", *common])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "s" / "forgetting.json").read_text())
    assert [r["stage"] for r in rows] == ["small", "large"]
    assert (tmp_path / "s" / "models" / "01_large").exists()
    res = CliRunner().invoke(cli, ["finetune", str(world["large"]), "--init", str(tmp_path / "missing"),
                                   "--out", str(tmp_path / "f"), *common])
    assert res.exit_code == 1 and "model not found" in res.output
    res = CliRunner().invoke(cli, ["finetune", str(world["large"]), "--init", str(world["model"]), "--out",
                                   str(tmp_path / "f"), "--eval", "nodir", *common])
    assert res.exit_code == 2


def test_experiment_runs_a_micro_study(world, tmp_path, monkeypatch):
    """The whole chain on two tiny domains (random selection, so no feature training)."""

    config = {"domains": {"small": {"train": str(world["small_test"] / "test"), "test": str(world["small_test"])},
                          "large": {"train": str(world["large_test"] / "test"), "test": str(world["large_test"])}},
              "patch": {"size": 64, "stride": 64}, "source": "small", "targets": ["large"], "rates": [0.5],
              "methods": ["random"], "replay_rates": [0.5], "replay_method": "random",
              "sequences": [["small", "large"]],
              "train": {"n_epochs": 2, "bsize": 32, "batch_size": 4, "min_train_masks": 1, "save_every": 50}}
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps(config))
    from dqtool.common.files import file_sha256
    from dqtool.segmentation import transfer as transfer_module
    from dqtool_cli.main import cli

    scored, evaluate = [], transfer_module.evaluate_model

    def counted(model, test_dir, *args, **kwargs):
        scored.append((file_sha256(model), str(test_dir)))
        return evaluate(model, test_dir, *args, **kwargs)

    monkeypatch.setattr(transfer_module, "evaluate_model", counted)
    res = CliRunner().invoke(cli, ["experiment", str(cfg), "--out", str(tmp_path / "study"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "study"
    # every model file is scored once per test split: the source model's records (its own task scores it on
    # every domain) serve zero-shot and the init stage of the finetuning, the replay and the sequence
    assert len(scored) == len(set(scored)), scored
    source_sha = file_sha256(out / "models" / "redundancy" / "small_all_1")
    assert sorted(t for sha, t in scored if sha == source_sha) == sorted(
        [str(world["small_test"]), str(world["large_test"])])
    red = json.loads((out / "tables" / "redundancy.json").read_text())
    assert [(r["method"], r["rate"]) for r in red] == [("all", 1.0), ("random", 0.5)]
    assert red[1]["patches"] == red[0]["patches"] // 2
    transfer = json.loads((out / "tables" / "transfer.json").read_text())
    assert [r["model"] for r in transfer] == ["small model", "naive finetune small -> large", "replay random 0.5"]
    assert "small f1@0.50 std" in transfer[0]
    assert "small f1@0.50" in transfer[0]
    seq = json.loads((out / "tables" / "sequences.json").read_text())
    assert [r["after"] for r in seq] == ["small", "large"]
    assert (out / "fig1_rate_curve.png").exists() and "Zero-shot" in (out / "report.md").read_text()
    # the zero-shot row of the source equals the all-patches redundancy row (same model, same test set)
    zero = json.loads((out / "tables" / "zero_shot.json").read_text())
    assert zero[0]["f1@0.50"] == red[0]["f1@0.50"]
    # from Python: the same study again reuses everything, rewrites the same bytes and returns the tables
    from dqtool.studies.experiment import ExperimentResult, run_experiment

    before = {p: p.read_bytes() for p in [out / "report.md", *sorted((out / "tables").iterdir())]}
    result = run_experiment(config, out, quiet=True)
    assert isinstance(result, ExperimentResult) and result.source_model == out / "models" / "redundancy" / "small_all_1"
    assert {p: p.read_bytes() for p in before} == before
    assert list(result.tables()) == ["redundancy", "zero_shot", "transfer", "sequences"]
    assert [(r["method"], r["rate"], r["patches"]) for r in result.redundancy] == \
        [(r["method"], r["rate"], r["patches"]) for r in red]
    assert [r["model"] for r in result.transfer] == [r["model"] for r in transfer]
    config["rates"] = [0.25]
    cfg.write_text(json.dumps(config))
    res = CliRunner().invoke(cli, ["experiment", str(cfg), "--out", str(out), "--quiet"])
    assert res.exit_code == 1 and "different config" in res.output


@pytest.mark.slow
def test_quick_study(tmp_path):
    """The built-in quick study (27 min on 2 idle CPU cores): every table is filled."""
    from dqtool.studies.experiment import run_experiment

    result = run_experiment(None, tmp_path / "quick", quick=True, quiet=True)
    assert len(result.redundancy) == 5 and len(result.transfer) == 6 and len(result.sequences) == 3
    assert all(np.isfinite(r["f1@0.50"]) for r in result.redundancy)
