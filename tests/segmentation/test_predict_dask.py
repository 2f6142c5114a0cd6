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


@pytest.fixture(scope="module")
def ome_zarr_image(tmp_path_factory):
    """A 200 x 170 OME-Zarr image of bright discs (cut into 3 x 3 tiles of 96 px, overlap 32)."""
    zarr = pytest.importorskip("zarr", reason="needs the extra dqtool[zarr]")
    ome_writer = pytest.importorskip("ome_zarr.writer", reason="needs the extra dqtool[zarr]")
    path = tmp_path_factory.mktemp("ome_zarr") / "slide.ome.zarr"
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:200, :170]
    img = rng.normal(30, 5, (200, 170))
    for cy, cx in rng.uniform(8, 162, (25, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 40] += 150
    group = zarr.open_group(str(path), mode="w")
    ome_writer.write_image(np.clip(img, 0, 255).astype(np.uint8), group, axes="yx",
                           storage_options=dict(chunks=(64, 64)))
    return path


def run_tiled(inputs, image, out, *extra):
    from dqtool.data.ome_zarr import open_ome_zarr

    model, _ = inputs
    result = CliRunner().invoke(cli, ["--quiet", "predict", str(model), str(image), "--out", str(out),
                                      "--flow-threshold", "0", "--tile", "96", "--tile-overlap", "32", *extra])
    assert result.exit_code == 0, result.output
    return open_ome_zarr(out / "slide_cp_masks.ome.zarr").read()


@pytest.fixture(scope="module")
def serial_tiled(inputs, ome_zarr_image, tmp_path_factory):
    return run_tiled(inputs, ome_zarr_image, tmp_path_factory.mktemp("serial_tiled") / "out")


def test_ome_zarr_tiles_on_workers_stitch_to_the_serial_labels(inputs, ome_zarr_image, serial_tiled,
                                                               dask_scheduler, tmp_path):
    """One tile a Dask task, stitched by this process: the serial label image, pixel for pixel."""
    from dqtool.segmentation.tiled import tile_boxes

    assert len(tile_boxes((200, 170), 96, 32)) == 9
    assert serial_tiled.max() > 3  # instances found, over several tiles
    tiled = run_tiled(inputs, ome_zarr_image, tmp_path / "out", "--scheduler", dask_scheduler)
    assert tiled.dtype == serial_tiled.dtype and np.array_equal(tiled, serial_tiled)


def test_a_worker_dying_on_a_tile_changes_no_label(inputs, ome_zarr_image, serial_tiled, dask_scheduler,
                                                   worker_death, tmp_path):
    flag = worker_death("predict-tile")
    tiled = run_tiled(inputs, ome_zarr_image, tmp_path / "out", "--scheduler", dask_scheduler)
    assert flag.exists() and np.array_equal(tiled, serial_tiled)
