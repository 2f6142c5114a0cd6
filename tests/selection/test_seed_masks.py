"""``dqtool export --seed-masks MODEL``: the DQ subset with a model's predictions as Cellpose GUI ``_seg.npy``
files, which dqtool reads back as labels (issue 14, the annotation loop)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from factories import noise_cache, store_features

from dqtool.common.errors import InputError
from dqtool.data.datasets import open_dataset
from dqtool.data.io import read_labels
from dqtool.selection.quantize import select_subset
from dqtool.selection.subsets import export_subset


@pytest.fixture()
def subset(tmp_path):
    cache = noise_cache(tmp_path / "c.h5", n_images=2, shape=(32, 32), size=16, stride=16, labels=False)
    store_features(cache, np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    path = tmp_path / "s.json"
    select_subset(cache, 0.5, bins=2).write(path)
    return path


def _square(image):
    masks = np.zeros(image.shape[:2], np.int32)
    masks[2:7, 3:9] = 5
    return masks


def test_seeded_export_is_a_labelled_folder_and_guards_the_corrections(subset, tmp_path):
    out = tmp_path / "ann"
    export_subset(subset, out, seed_masks=_square)
    files = sorted(p.name for p in out.iterdir())
    assert "000_img.png" in files and "000_img_seg.npy" in files and not any("_masks" in f for f in files)
    dat = np.load(out / "000_img_seg.npy", allow_pickle=True).item()
    assert dat["filename"] == "000_img.png" and dat["chan_choose"] == [0, 0] and dat["outlines"].max() == 1
    lab = read_labels(out / "000_img_seg.npy")
    assert lab.max() == 1 and lab[2:7, 3:9].all() and lab.sum() == 30
    ds = open_dataset(out)
    assert len(ds.samples) == 4 and all(s.label_path.name.endswith("_seg.npy") for s in ds)
    export_subset(subset, out, seed_masks=_square)  # unedited: replaced
    dat["masks"][0, 0] = 2  # the annotator corrects a seed in the GUI and saves
    np.save(out / "001_img_seg.npy", dat)
    with pytest.raises(InputError, match="001_img_seg.npy changed after the export"):
        export_subset(subset, out, seed_masks=_square)


def test_export_cli_seeds_with_a_cellpose_model(subset, tmp_path):
    import torch
    from cellpose.resnet_torch import CPnet
    from dqtool_cli.main import cli

    torch.manual_seed(0)
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False)
    with torch.no_grad():
        net.output[2].bias[2] -= 20.0  # predicts no object: a cheap, valid seed (the annotator draws them all)
    torch.save(net.state_dict(), tmp_path / "model")
    res = CliRunner().invoke(cli, ["export", str(subset), "--out", str(tmp_path / "ann"), "--seed-masks",
                                   str(tmp_path / "model"), "--quiet"])
    assert res.exit_code == 0, res.output
    seg = sorted((tmp_path / "ann").glob("*_img_seg.npy"))
    assert len(seg) == 4 and all(read_labels(p).max() == 0 for p in seg)
