"""``dqtool eval`` end to end: pairing layouts, tables written, bad input reported, exit codes."""

import csv
import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from dqtool.evaluation import metrics
from dqtool.data.naming import label_key
from dqtool.evaluation.folders import find_label_files, pair_folders
from dqtool.data.io import read_labels
from dqtool_cli.main import cli
from factories import touching_cells


def cells(shape, n, seed):
    return touching_cells(shape, n, seed, background="gaps", dtype=np.uint16, gap=0.3)


def damaged(y, seed):
    rng = np.random.default_rng(seed)
    pred = np.roll(y, int(rng.integers(1, 3)), axis=1).copy()
    pred[np.isin(pred, rng.choice(np.unique(y)[1:], 3, replace=False))] = 0
    return pred


def png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def tif(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, photometric="minisblack")


def run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args), "--quiet"])


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_pairing_keys_of_the_usual_layouts():
    assert label_key("001_masks") == "001"
    assert label_key("001_img_cp_masks") == "001"
    assert label_key("cell_00001_label") == "cell_00001"
    assert label_key("GOWT1_t01") == "GOWT1_t01"
    assert label_key("_img") == "_img"


def test_cellpose_layout_with_domains(tmp_path):
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    arrays = {}
    for k, domain in enumerate(["fluo", "fluo", "histo"]):
        y = cells((60, 70), 20, seed=k)
        p = damaged(y, seed=10 + k)
        png(gt / domain / "test" / f"{k:03d}_masks.png", y)
        png(gt / domain / "test" / f"{k:03d}_img.png", np.zeros((60, 70), np.uint8))  # an image, ignored
        png(pred / domain / f"{k:03d}_img_cp_masks.png", p)
        tif(pred / domain / f"{k:03d}_img_flows.tif", np.zeros((3, 60, 70), np.float32))  # ignored
        arrays[f"{domain}/{k:03d}"] = (y, p)
    res = run("--gt", gt, "--pred", pred, "--thresholds", "0.5:0.75:0.25", "--out", out)
    assert res.exit_code == 0, res.output
    assert "| fluo | 2 |" in res.output and "| histo | 1 |" in res.output and "| all | 3 |" in res.output
    rows = read_csv(out / "per_image.csv")
    assert sorted(r["name"] for r in rows) == sorted(arrays)
    for row in rows:
        y, p = arrays[row["name"]]
        want = metrics.instance_scores(y, p, (0.5, 0.75))
        assert int(row["tp@0.50"]) == want[0].tp and int(row["fn@0.75"]) == want[1].fn
        assert float(row["panoptic_quality@0.75"]) == pytest.approx(want[1].panoptic_quality, rel=1e-12)
        assert float(row["iou"]) == pytest.approx(metrics.pixel_scores(y, p).iou, rel=1e-12)
    summary = {r["domain"]: r for r in read_csv(out / "summary.csv")}
    assert set(summary) == {"fluo", "histo", "all"}
    f1 = [float(r["f1@0.50"]) for r in rows if r["domain"] == "fluo"]
    assert float(summary["fluo"]["f1@0.50_mean"]) == pytest.approx(np.mean(f1))
    assert float(summary["fluo"]["f1@0.50_std"]) == pytest.approx(np.std(f1, ddof=1))
    doc = json.loads((out / "summary.json").read_text())
    assert doc["thresholds"] == [0.5, 0.75] and doc["problems"] == []
    assert (out / "summary.md").read_text().startswith("Scored 3 image pairs")
    assert not (out / "problems.csv").exists()


@pytest.mark.parametrize("style", ["label_suffix", "same_stem"])
def test_neurips_layout_on_real_labels(real_data, tmp_path, style):
    labels = sorted((real_data / "multi_neurips" / "labels").glob("*_label.tiff"))
    pred = tmp_path / "pred"
    truth = {}
    for k, path in enumerate(labels):
        y = read_labels(path)
        p = damaged(y, seed=k).astype(np.uint16)
        tif(pred / (path.name if style == "label_suffix" else path.name.replace("_label.tiff", ".tif")), p)
        truth[path.name.removesuffix("_label.tiff")] = (y, p)
    res = run("--gt", real_data / "multi_neurips", "--pred", pred, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in read_csv(tmp_path / "out" / "per_image.csv")}
    assert set(rows) == set(truth)
    for name, (y, p) in truth.items():
        assert float(rows[name]["f1@0.50"]) == pytest.approx(metrics.instance_scores(y, p)[0].f1, rel=1e-12)
        assert rows[name]["domain"] == "all"


def test_bad_pairs_are_reported_and_good_ones_scored(tmp_path):
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    y = cells((40, 40), 10, seed=1)
    for name in ("good", "shape", "float", "negative", "volume", "junk", "lonely"):
        tif(gt / f"{name}_label.tiff", y)
    tif(pred / "good_label.tiff", damaged(y, 2))
    tif(pred / "shape_label.tiff", y[:, :30])
    tif(pred / "float_label.tiff", y.astype(np.float32))
    tif(pred / "negative_label.tiff", y.astype(np.int16) - 1)
    tif(pred / "volume_label.tiff", np.stack([y, y, y]))
    (pred / "junk_label.tiff").write_bytes(b"not a tiff")
    tif(pred / "orphan_label.tiff", y)
    res = run("--gt", gt, "--pred", pred, "--out", out)
    assert res.exit_code == 3, res.output
    rows = read_csv(out / "per_image.csv")
    assert [r["name"] for r in rows] == ["good"]
    problems = {r["file"]: r for r in read_csv(out / "problems.csv")}
    assert problems[str(gt / "lonely_label.tiff")]["kind"] == "no prediction"
    assert problems[str(pred / "orphan_label.tiff")]["kind"] == "no ground truth"
    expected = {"shape": "shape mismatch", "float": "floating point", "negative": "negative",
                "volume": "2-D", "junk": "cannot read"}
    for name, words in expected.items():
        message = problems[name]["message"]
        assert words in message and f"{name}_label.tiff" in message, message
    assert "lonely_label.tiff" in res.output  # stderr is mixed into CliRunner's output


def test_nothing_scored_and_nothing_paired_fail(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    tif(gt / "a_label.tiff", cells((20, 20), 4, 0))
    tif(pred / "a_label.tiff", np.zeros((20, 21), np.uint16))
    assert run("--gt", gt, "--pred", pred, "--out", tmp_path / "o1").exit_code == 1
    tif(pred / "a_label.tiff", np.zeros((20, 20), np.uint16))
    (pred / "a_label.tiff").rename(pred / "b_label.tiff")
    res = run("--gt", gt, "--pred", pred, "--out", tmp_path / "o2")
    assert res.exit_code == 1 and "no prediction pairs" in res.output


def test_usage_errors_exit_2(tmp_path):
    (tmp_path / "gt").mkdir()
    res = run("--gt", tmp_path / "gt", "--pred", tmp_path / "missing", "--out", tmp_path / "o")
    assert res.exit_code == 2
    res = run("--gt", tmp_path / "gt", "--pred", tmp_path / "gt", "--out", tmp_path / "o", "--thresholds", "0:1")
    assert res.exit_code == 2 and "thresholds" in res.output


def test_two_files_for_one_image_is_an_error(tmp_path):
    tif(tmp_path / "gt" / "a_masks.tif", cells((20, 20), 4, 0))
    tif(tmp_path / "gt" / "a_label.tiff", cells((20, 20), 4, 0))
    tif(tmp_path / "pred" / "a_cp_masks.tif", cells((20, 20), 4, 0))
    res = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "a_masks.tif" in res.output and "a_label.tiff" in res.output


def test_find_label_files_skips_images_next_to_labels(tmp_path):
    png(tmp_path / "001_img.png", np.zeros((4, 4), np.uint8))
    png(tmp_path / "001_masks.png", np.zeros((4, 4), np.uint8))
    found = find_label_files(tmp_path)
    assert [f.path.name for f in found] == ["001_masks.png"]
    assert pair_folders(tmp_path, tmp_path).pairs[0][0] == "001"


# -- disagreements with the other readers, resolved by dqtool.data.naming ----------------------------


def test_gt_suffix_is_a_label(tmp_path):
    """eval's list lacked _gt (a label to the dataset readers): a_gt.tif did not pair with a_cp_masks.tif."""
    y = cells((20, 20), 4, 0)
    tif(tmp_path / "gt" / "a_gt.tif", y)
    png(tmp_path / "gt" / "a.png", np.zeros((20, 20), np.uint8))  # the image beside it: not a label
    tif(tmp_path / "pred" / "a_cp_masks.tif", y)
    res = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in read_csv(tmp_path / "o" / "per_image.csv")] == ["a"]


def test_cellpose_outputs_are_never_labels(tmp_path):
    """In a folder of plain-stem label maps, Cellpose's a_flows.tif was a second (unpaired) prediction."""
    y = cells((20, 20), 4, 0)
    tif(tmp_path / "gt" / "a.tif", y)
    tif(tmp_path / "pred" / "a.tif", y)
    tif(tmp_path / "pred" / "a_flows.tif", np.zeros((3, 20, 20), np.float32))
    tif(tmp_path / "pred" / "a_cellprob.tif", np.zeros((20, 20), np.float32))
    res = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output


def test_every_images_folder_name_holds_no_labels(tmp_path):
    """eval skipped images/ only; the dataset readers also know imgs/ and img/, whose images were scored as GT."""
    y = cells((20, 20), 4, 0)
    tif(tmp_path / "gt" / "imgs" / "a.tif", np.zeros((20, 20), np.uint8))
    tif(tmp_path / "gt" / "masks" / "a.tif", y)
    tif(tmp_path / "pred" / "a.tif", y)
    res = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert [f.path.parent.name for f in find_label_files(tmp_path / "gt")] == ["masks"]


def test_stale_problems_are_removed_only_from_evals_own_folder(tmp_path):
    """A clean rerun drops the problems files an earlier eval wrote there, never a user's file of that name."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    y = cells((40, 50), 10, seed=1)
    png(gt / "000_masks.png", y)
    png(pred / "000_cp_masks.png", y)
    png(gt / "001_masks.png", y)  # unpaired: a problem on the first run
    out = tmp_path / "out"
    assert run("--gt", gt, "--pred", pred, "--out", out).exit_code == 3
    assert (out / "problems.csv").exists()
    (gt / "001_masks.png").unlink()
    assert run("--gt", gt, "--pred", pred, "--out", out).exit_code == 0
    assert not (out / "problems.csv").exists()  # eval's own folder: the stale list is gone
    users = tmp_path / "users"
    users.mkdir()
    (users / "problems.csv").write_text("my notes\n")
    res = run("--gt", gt, "--pred", pred, "--out", users)  # a user's folder: refused, nothing written
    assert res.exit_code == 1 and "not written by dqtool" in res.output
    assert [p.name for p in users.iterdir()] == ["problems.csv"]
    from dqtool.common.outputs import write_marker

    write_marker(users, "data")  # another command's folder: eval writes there, and leaves the file alone
    assert run("--gt", gt, "--pred", pred, "--out", users).exit_code == 0
    assert (users / "problems.csv").read_text() == "my notes\n"  # not eval's folder: left alone
