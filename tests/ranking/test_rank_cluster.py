"""``dqtool rank`` on Dask (issue 16): one task per (model, image), every perturbation included; the ranking
tables, per-image tables, validation and the outputs cache are the serial run's, byte for byte, also when a
worker dies mid-task; the workers read the cache and the client alone writes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.data.io import write_image_png, write_labels
from dqtool.segmentation.model_files import build_net
from dqtool_cli.main import cli

#: The files a ranking writes whose bytes must not depend on where it ran (rank.json records run times).
TABLES = ("ranking.csv", "ranking.md", "ranking.json", "per_image.csv", "per_image.md", "per_image.json",
          "validation.csv", "validation.json")
KINDS = ("dropout", "noise")


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """Two seeded random Cellpose networks (cell probability biased so that about a third of a field is
    foreground: the NHD and EI scores then depend on every bit of it; their flows make no mask, so adapted Rand
    is NaN, the same either way), one model that fails (three input channels), and three images, one of two
    tiles, two of them labelled."""
    root = tmp_path_factory.mktemp("rank_cluster")
    models = root / "models"
    models.mkdir()
    for seed in (3, 4):
        torch.manual_seed(seed)
        net = build_net(None).eval()
        with torch.no_grad():
            cellprob = net(torch.rand(1, 2, 96, 96))[0][0, 2]
            net.output[-1].bias[2] -= torch.quantile(cellprob.flatten(), 0.7)
        net.save_model(str(models / f"net{seed}.pth"))
    torch.manual_seed(0)
    from cellpose.resnet_torch import CPnet

    torch.save(CPnet([3, 32, 64, 128, 256], 3, sz=3, mkldnn=False).state_dict(), models / "rgb3.pth")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in (("a", (80, 80)), ("b", (96, 72)), ("c", (240, 100))):
        yy, xx = np.mgrid[:h, :w]
        img = rng.normal(30, 5, (h, w))
        lab = np.zeros((h, w), np.uint16)
        for k, (cy, cx) in enumerate(rng.uniform(12, min(h, w) - 12, (5, 2)), 1):
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 50
            img[disc] += 150
            lab[disc] = k
        write_image_png(images / f"{name}.png", np.clip(img, 0, 255).astype(np.uint8))
        if name != "b":
            write_labels(labels / f"{name}_masks.tif", lab)
    return root


def run_rank(bank, out, *extra):
    result = CliRunner().invoke(cli, ["--quiet", "rank", str(bank / "models"), "--images", str(bank / "images"),
                                      "--labels", str(bank / "labels"), "--perturb", ",".join(KINDS),
                                      "--seed", "7", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    files = {f"{k}/{name}": (out / k / name).read_bytes() for k in KINDS for name in TABLES}
    files.update({f"cache/{p.name}": p.read_bytes() for p in sorted((out / "cache").glob("*.npz"))})
    return files, result.output


@pytest.fixture(scope="module")
def serial(bank, tmp_path_factory):
    files, output = run_rank(bank, tmp_path_factory.mktemp("serial") / "out")
    assert "2 ranked, 1 failed" in output and "6 written" in output
    return files


def test_rank_on_two_workers_writes_the_serial_bytes(bank, serial, dask_scheduler, tmp_path):
    out = tmp_path / "out"
    files, output = run_rank(bank, out, "--scheduler", dask_scheduler)
    assert files == serial
    assert len([k for k in files if k.startswith("cache/")]) == 6
    per_image = json.loads(files["noise/per_image.json"])
    assert len({r["nhd"] for r in per_image}) == 6 and all(0 < r["nhd"] < 1 for r in per_image)  # not trivial
    doc = json.loads((out / "dropout" / "rank.json").read_text())
    assert len(doc["failed"]) == 1 and "rgb3.pth" in doc["failed"][0]["model"]
    # again into the same folder: the workers read every unperturbed prediction from the cache
    again, output = run_rank(bank, out, "--scheduler", dask_scheduler)
    assert again == serial and "6 unperturbed predictions reused, 0 written" in output


def test_a_worker_that_dies_mid_task_changes_nothing(bank, serial, dask_scheduler, worker_death, tmp_path):
    flag = worker_death("rank")
    files, _ = run_rank(bank, tmp_path / "out", "--scheduler", dask_scheduler)
    assert flag.exists() and files == serial
