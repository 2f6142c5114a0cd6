"""Tiled Cellpose prediction (issue 17): tiles with overlap, stitched by ownership, against whole-image
prediction with the same trained Cellpose model on real images small enough to do both."""

from __future__ import annotations

import numpy as np
import pytest

from dqtool.evaluation.metrics import instance_scores

zarr = pytest.importorskip("zarr", reason="needs the extra dqtool[zarr]")
ome_writer = pytest.importorskip("ome_zarr.writer", reason="needs the extra dqtool[zarr]")

#: Real nuclei (Cell Tracking Challenge GOWT1 and HeLa): trained on these, predicted on the other two.
TRAIN = ["GOWT1_t01", "GOWT1_t21", "GOWT1_t31", "GOWT1_t39", "GOWT1_t52", "HeLa_t13", "HeLa_t52", "HeLa_t75"]
HELD_OUT = ["GOWT1_t72", "HeLa_t79"]


@pytest.mark.slow
def test_tiled_prediction_of_real_nuclei_matches_the_whole_image(real_data, tmp_path):
    """A model trained here as the real study trains (100 SGD steps of 8 patches at bsize 64 on 224-px patches
    of 8 real CTC images, ~3 min on 2 cores); ``dqtool predict`` on each held-out image as OME-Zarr, in tiles of
    384 overlapping by 128, against Cellpose on the whole image: >= 95 % of the instances matched at IoU >= 0.9
    both ways, over the instances of both images (issue 17's target). Measured 2026-12-07 (README, OME-Zarr):
    GOWT1_t72 13 of 14 whole-image nuclei matched (15 tiled), HeLa_t79 289 of 293 (291 tiled): 98.4 % / 98.7 %.

    (A model that learned little, or tiles smaller than Cellpose's own 224-px tiles, fall short: a 100-step
    model on a 336-px synthetic image in tiles of 160-256 matched 92-94 %; the network's context, not the
    stitching, decides the borderline cells.)"""
    from click.testing import CliRunner

    from dqtool.data.cache_build import PatchOptions, build_cache
    from dqtool.data.datasets import open_dataset, write_split
    from dqtool.data.io import read_image
    from dqtool.data.ome_zarr import open_ome_zarr
    from dqtool.segmentation.predict import load_model, segment
    from dqtool.segmentation.train import TrainConfig, load_patches, train_patches
    from dqtool_cli.main import cli

    root = real_data / "cyto_ctc"
    split = write_split(tmp_path / "train.json", root, TRAIN)
    cache = tmp_path / "ctc.h5"
    build_cache(open_dataset(split), cache, PatchOptions(size=224, stride=112), quiet=True)
    images, labels, provenance = load_patches(cache)
    config = TrainConfig(n_epochs=100, bsize=64, batch_size=8, nimg_per_epoch=8, save_every=100,
                         min_train_masks=3, seed=0)
    model = tmp_path / "model"
    train_patches(list(images), list(labels), model, config, provenance=provenance, quiet=True)
    net = load_model(model)
    found = []
    for name in HELD_OUT:
        image = read_image(root / "images" / f"{name}.tif")
        whole = segment(net, image)
        group = zarr.open_group(str(tmp_path / f"{name}.ome.zarr"), mode="w")
        ome_writer.write_image(image, group, axes="yx", storage_options=dict(chunks=(256, 256)))
        result = CliRunner().invoke(cli, ["--quiet", "predict", str(model), str(tmp_path / f"{name}.ome.zarr"),
                                          "--out", str(tmp_path / f"out_{name}"), "--tile", "384",
                                          "--tile-overlap", "128"])
        assert result.exit_code == 0, result.output
        tiled = open_ome_zarr(tmp_path / f"out_{name}" / f"{name}_cp_masks.ome.zarr").read()
        (at_09,) = instance_scores(whole, tiled, 0.9)  # matched at IoU >= 0.9, both ways
        found.append((name, at_09.n_true, at_09.n_pred, at_09.tp))
    # the measure is over instances: every held-out instance counts once (the model finds ~15 large nuclei in
    # GOWT1_t72, ~290 small ones in HeLa_t79; one GOWT1 nucleus is 7 % of that image alone)
    n_whole, n_tiled, matched = (sum(f[k] for f in found) for k in (1, 2, 3))
    assert n_whole >= 250, found  # the model segments the nuclei at all
    assert matched / n_whole >= 0.95 and matched / n_tiled >= 0.95, found
