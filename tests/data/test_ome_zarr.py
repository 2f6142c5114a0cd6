"""OME-Zarr images (issue 17): read lazily at a level, cut into the same patches as in memory, labels from
the labels/ group, tiled prediction stitched like whole-image prediction, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from dqtool.common.errors import InputError
from dqtool.evaluation.metrics import instance_scores
from factories import disc_images

zarr = pytest.importorskip("zarr", reason="needs the extra dqtool[zarr]")
ome_writer = pytest.importorskip("ome_zarr.writer", reason="needs the extra dqtool[zarr]")


def write_ome_zarr(path, image, labels=None, axes="yx", chunks=64):
    group = zarr.open_group(str(path), mode="w")
    ome_writer.write_image(image, group, axes=axes, storage_options=dict(chunks=(chunks,) * image.ndim))
    if labels is not None:
        ome_writer.write_labels(labels.astype(np.uint32), group, name="cells", axes=axes)
    return path


@pytest.fixture
def discs(tmp_path):
    images, labels = disc_images(n_images=1, size=300, n_cells=30, seed=1)
    return write_ome_zarr(tmp_path / "discs.ome.zarr", images[0], labels[0]), images[0], labels[0]


def test_windows_equal_the_in_memory_patches(discs):
    from dqtool.data.cache_build import prepare_image
    from dqtool.data.ome_zarr import OmeZarrSample
    from dqtool.data.io import relabel_consecutive
    from dqtool.data.patches import iter_patches, window_starts

    path, image, labels = discs
    sample = OmeZarrSample("discs", "d", path)
    assert sample.shape == image.shape and sample.has_labels and sample.label_path.name == "cells"
    np.testing.assert_array_equal(sample.labels, labels)
    for edge in ("shift", "pad", "drop"):
        ys, xs = window_starts(300, 96, 48, edge), window_starts(300, 96, 48, edge)
        lazy = list(sample.iter_windows(ys, xs, 96, "gray", "percentile", relabel_consecutive))
        whole = list(iter_patches(prepare_image(image, "gray", "percentile"), labels, 96, 48, edge))
        assert [(y, x) for y, x, *_ in lazy] == [(y, x) for y, x, *_ in whole]
        for (_, _, a, la), (_, _, b, lb) in zip(lazy, whole):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding of the same formula
            np.testing.assert_array_equal(la, lb)


def test_patches_command_reads_a_level(discs, tmp_path):
    from click.testing import CliRunner

    from dqtool.data.cache import PatchCache
    from dqtool_cli.main import cli

    path, image, labels = discs
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(cli, ["--quiet", "patches", str(path), "--out", str(out), "--size", "64",
                                      "--stride", "64", "--level", "1"])
    assert result.exit_code == 0, result.output
    with PatchCache(out) as cache:
        assert cache.has_labels and len(cache) == 9  # level 1: 150 x 150 -> 3 x 3 windows of 64 (shift)
    result = CliRunner().invoke(cli, ["patches", str(path), "--out", str(out), "--level", "7"])
    assert result.exit_code == 1 and f"{path}: --level 7 does not exist; the image has levels 0..4" in result.output


def test_bad_ome_zarr_inputs_name_the_file(tmp_path):
    from dqtool.data.ome_zarr import OmeZarrSample, open_ome_zarr
    from dqtool.segmentation.tiled import predict_ome_zarr

    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", shape=(8, 8), dtype="uint8")
    with pytest.raises(InputError, match=f"{plain}: no OME-Zarr multiscales metadata"):
        open_ome_zarr(plain)
    rng = np.random.default_rng(0)
    five = write_ome_zarr(tmp_path / "five.ome.zarr", rng.integers(0, 255, (1, 4, 1, 64, 64), dtype=np.uint8),
                          axes="tczyx", chunks=32)
    with pytest.raises(InputError, match=f"{five}: image has 4 channels.*--channels"):
        predict_ome_zarr(None, five, tmp_path / "out")
    with pytest.raises(InputError, match=f"{five}: image has 4 channels"):
        OmeZarrSample("five", "d", five)
    stack = write_ome_zarr(tmp_path / "stack.ome.zarr", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8),
                           axes="zyx", chunks=32)
    with pytest.raises(InputError, match=f"{stack}: z has 3 elements"):
        open_ome_zarr(stack)
    with pytest.raises(InputError, match=f"{five}: --level 9 does not exist; the image has levels 0..4"):
        open_ome_zarr(five, level=9)


def test_tiles_stitch_to_the_whole_image_segmentation():
    """With a local segmenter (threshold + components), tiles + ownership reproduce the whole image."""
    from dqtool.segmentation.tiled import stitch_tiles, tile_cores

    image = disc_images(n_images=1, size=400, n_cells=60, radius=(5.0, 9.0), seed=2)[0][0]

    def segment(region):
        return ndi.label(ndi.gaussian_filter(region.astype(float), 1) > 80)[0]

    whole = segment(image)
    out = np.zeros(image.shape, np.uint32)
    n = stitch_tiles(segment, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], out, tile=128, overlap=48)
    assert len(tile_cores(400, 128, 48)) == 5
    assert n == len(np.unique(out)) - 1 == len(np.unique(whole)) - 1
    (at_09,) = instance_scores(whole, out, 0.9)  # matched at IoU >= 0.9: recall and precision
    assert at_09.recall >= 0.95 and at_09.precision >= 0.95


def test_tile_cores_partition_the_axis():
    from dqtool.segmentation.tiled import tile_cores

    for length, tile, overlap in [(400, 128, 48), (1000, 256, 64), (100, 128, 32), (257, 128, 1)]:
        cores = tile_cores(length, tile, overlap)
        assert cores[0][2] == 0 and cores[-1][3] == length
        assert all(a[3] == b[2] for a, b in zip(cores, cores[1:]))
        assert all(s <= lo < hi <= e for s, e, lo, hi in cores)


def test_predict_writes_an_ome_zarr_label_image(tmp_path):
    """``dqtool predict`` on an OME-Zarr image: tiled Cellpose, an OME-Zarr label image that reads back."""
    import torch
    from click.testing import CliRunner

    from dqtool.data.ome_zarr import open_ome_zarr
    from dqtool.segmentation.model_files import build_net
    from dqtool_cli.main import cli

    torch.manual_seed(3)
    net = build_net(None)
    with torch.no_grad():  # a cell probability bias, so that random weights still give masks
        net.output[-1].bias[2] += 3.0
    net.save_model(str(tmp_path / "net"))
    image = disc_images(n_images=1, size=128, n_cells=12, seed=4)[0][0][:64]
    src = write_ome_zarr(tmp_path / "img.ome.zarr", image, chunks=32)
    result = CliRunner().invoke(cli, ["--quiet", "predict", str(tmp_path / "net"), str(src), "--out",
                                      str(tmp_path / "out"), "--tile", "80", "--tile-overlap", "32"])
    assert result.exit_code == 0, result.output
    labels = open_ome_zarr(tmp_path / "out" / "img_cp_masks.ome.zarr")
    assert labels.shape == image.shape and labels.dtype == np.uint32
    ids = np.unique(labels.read())
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, ids.size))  # consecutive over the tiles
