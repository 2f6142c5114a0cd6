"""dqtool.predict: masks equal Cellpose's own eval on the same model; file naming; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.common.errors import InputError
from dqtool.data.io import read_labels, write_image_png
from dqtool.data.naming import list_input_images
from dqtool.segmentation.predict import PredictOptions, mask_name, predict
from dqtool.segmentation.model_files import build_net


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A Cellpose network with seeded random weights (what it predicts does not matter here)."""
    path = tmp_path_factory.mktemp("model") / "random_net"
    torch.manual_seed(3)
    net = build_net(None)
    with torch.no_grad():  # cell probability and a flow bias, so that random weights still give masks
        net.output[-1].bias[2] += 3.0
        net.output[-1].bias[0] += 2.0
    net.save_model(str(path))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    arrays = {}
    for name in ("001_img", "002_img"):
        img = rng.normal(30, 5, (96, 96))
        for cy, cx in rng.uniform(15, 80, (6, 2)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 60] += 150
        arrays[name] = np.clip(img, 0, 255).astype(np.uint8)
        write_image_png(folder / f"{name}.png", arrays[name])
    for label in ("001_masks.png", "002_mask.png", "001_gt.png"):  # label files: skipped (the old copy
        write_image_png(folder / label, np.zeros((96, 96), np.uint8))  # segmented _mask and _gt files)
    return folder, arrays


def test_predict_writes_cellpose_masks(model, images, tmp_path):
    from cellpose.models import CellposeModel

    folder, arrays = images
    options = PredictOptions(flow_threshold=0.0)  # random weights: keep masks whatever their flow error
    written = predict(model, folder, tmp_path / "out", options, quiet=True)
    assert [p.name for p in written] == ["001_img_cp_masks.tif", "002_img_cp_masks.tif"]
    reference = CellposeModel(gpu=False, pretrained_model=str(model))
    n_objects = 0
    for path in written:
        ours = read_labels(path)
        theirs = reference.eval(arrays[path.name[:7]], channels=[0, 0], flow_threshold=0.0)[0]
        # same partition of the image (our ids are renumbered consecutively)
        assert ours.shape == theirs.shape
        assert np.array_equal(ours > 0, theirs > 0)
        pairs = set(zip(ours.ravel().tolist(), theirs.ravel().tolist()))
        assert len(pairs) == len(np.unique(theirs)) == int(ours.max()) + 1
        n_objects += int(ours.max())
    assert n_objects > 0


def test_listing_and_names(images, tmp_path):
    folder, _ = images
    assert [p.name for p in list_input_images(folder)] == ["001_img.png", "002_img.png"]
    assert mask_name("a/b/cell_007.tif") == "cell_007_cp_masks.tif"
    (tmp_path / "x.txt").write_text("no image")
    with pytest.raises(InputError, match="not an image"):
        list_input_images(tmp_path / "x.txt")
    with pytest.raises(InputError, match="no images"):
        list_input_images(tmp_path)
    with pytest.raises(FileNotFoundError):
        list_input_images(tmp_path / "missing")


def test_errors(images, tmp_path, model):
    folder, _ = images
    with pytest.raises(InputError, match="model not found"):
        predict(tmp_path / "nope", folder, tmp_path / "o", quiet=True)
    with pytest.raises(InputError, match="model not found"):
        predict("cyto3", folder, tmp_path / "o", quiet=True)
    with pytest.raises(InputError, match="grayscale"):
        predict(model, folder, tmp_path / "o", PredictOptions(channels=(2, 1)), quiet=True)


def test_cli_predict(model, images, tmp_path):
    from dqtool_cli.main import cli

    folder, _ = images
    res = CliRunner().invoke(cli, ["predict", str(model), str(folder / "002_img.png"), "--out",
                                   str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "002_img_cp_masks.tif").exists()
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "none"), str(folder), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "model not found" in res.output
