"""``dqtool predict`` on Dask (issue 16): one image a task, the model loaded once per worker, the client
writes every mask; the label maps are the serial run's, byte for byte, also when a worker dies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.data.io import write_image_png
from dqtool.segmentation.model_files import build_net
from dqtool_cli.main import cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A Cellpose network with seeded random weights that still finds objects, and three images."""
    root = tmp_path_factory.mktemp("predict_dask")
    model = root / "random_net"
    torch.manual_seed(3)
    net = build_net(None)
    with torch.no_grad():
        net.output[-1].bias[2] += 3.0
        net.output[-1].bias[0] += 2.0
    net.save_model(str(model))
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:80, :80]
    for name in ("a", "b", "c"):
        img = rng.normal(30, 5, (80, 80))
        for cy, cx in rng.uniform(12, 68, (5, 2)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 50] += 150
        write_image_png(images / f"{name}.png", np.clip(img, 0, 255).astype(np.uint8))
    return model, images


def run_predict(inputs, out, *extra):
    model, images = inputs
    result = CliRunner().invoke(cli, ["--quiet", "predict", str(model), str(images), "--out", str(out),
                                      "--flow-threshold", "0", *extra])
    assert result.exit_code == 0, result.output
    masks = {p.name: p.read_bytes() for p in sorted(out.glob("*_cp_masks.tif"))}
    assert sorted(masks) == ["a_cp_masks.tif", "b_cp_masks.tif", "c_cp_masks.tif"]
    return masks


@pytest.fixture(scope="module")
def serial(inputs, tmp_path_factory):
    return run_predict(inputs, tmp_path_factory.mktemp("serial") / "out")


def test_masks_equal_the_serial_ones(inputs, serial, dask_scheduler, tmp_path):
    from dqtool.data.io import read_labels

    assert run_predict(inputs, tmp_path / "out", "--scheduler", dask_scheduler) == serial
    assert max(int(read_labels(tmp_path / "out" / name).max()) for name in serial) > 0  # objects found


def test_a_worker_that_dies_mid_task_changes_nothing(inputs, serial, dask_scheduler, worker_death, tmp_path):
    flag = worker_death("predict")
    assert run_predict(inputs, tmp_path / "out", "--scheduler", dask_scheduler) == serial
    assert flag.exists()
