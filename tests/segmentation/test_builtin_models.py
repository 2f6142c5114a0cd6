"""Cellpose's built-in models by name (issue 17): the files Cellpose itself would load from
CELLPOSE_LOCAL_MODELS_PATH, Cellpose's diameters and size model, and never a download."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from dqtool.common.errors import InputError
from dqtool.segmentation import model_files as mf
from factories import disc_images


@pytest.fixture
def no_network(monkeypatch):
    """Every way Cellpose (or anything else) could fetch a file raises."""
    import cellpose.models
    import cellpose.utils

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(cellpose.utils, "download_url_to_file", refuse)
    monkeypatch.setattr(cellpose.models, "cache_model_path", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _save_random_cpnet(path, seed, diam_labels=None):
    torch.manual_seed(seed)
    net = mf._new_net()
    if diam_labels is not None:
        net.diam_labels.data = torch.ones(1) * diam_labels
    net.save_model(str(path))
    return path


@pytest.fixture
def cellpose_folder(tmp_path, monkeypatch, no_network):
    """A Cellpose model folder with cyto3 (+ its size model) and nuclei as seeded random CPnets."""
    folder = tmp_path / "cellpose_models"
    folder.mkdir()
    _save_random_cpnet(folder / "cyto3", 0, diam_labels=25.0)
    _save_random_cpnet(folder / "nucleitorch_0", 1, diam_labels=14.0)
    np.save(folder / "size_cyto3.npy", {"A": np.zeros(256), "smean": np.zeros(256), "ymean": 0.0,
                                        "diam_mean": 30.0})
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(folder))
    return folder


def test_file_names_are_the_ones_cellpose_loads(tmp_path, monkeypatch, no_network):
    import cellpose.models

    monkeypatch.setattr(cellpose.models, "MODEL_DIR", tmp_path)
    names = mf.builtin_names()
    assert {"cyto3", "cyto2", "nuclei", "tissuenet_cp3", "livecell_cp3"} <= set(names)
    for name in names:  # every file present: Cellpose's own path functions return without downloading
        (tmp_path / mf.builtin_weight_name(name)).touch()
        if mf.builtin_size_name(name):
            (tmp_path / mf.builtin_size_name(name)).touch()
    monkeypatch.setattr(cellpose.models, "cache_model_path", lambda base: str(tmp_path / base))
    for name in names:
        assert cellpose.models.model_path(name) == str(tmp_path / mf.builtin_weight_name(name))
        if name in ("cyto", "cyto2", "cyto3", "nuclei"):
            assert cellpose.models.size_model_path(name) == str(tmp_path / mf.builtin_size_name(name))
        else:
            assert mf.builtin_size_name(name) is None


def test_builtin_models_load_as_cellpose_does(cellpose_folder):
    paths = mf.builtin_models("cyto3, nuclei")
    assert paths == [cellpose_folder / "cyto3", cellpose_folder / "nucleitorch_0"]
    assert [mf.builtin_name_of(p) for p in paths] == ["cyto3", "nuclei"]
    cyto3 = mf.load_cellpose_model(paths[0], device=torch.device("cpu"))
    nuclei = mf.load_cellpose_model(paths[1], device=torch.device("cpu"))
    assert isinstance(cyto3, mf.SizedCellposeModel) and cyto3.diam_mean == 30.0
    assert not isinstance(nuclei, mf.SizedCellposeModel) and nuclei.diam_mean == 17.0
    assert mf.training_diameters(paths[0]) == (30.0, 25.0)
    assert mf.training_diameters(paths[1]) == (17.0, 14.0)
    image = disc_images(n_images=1, size=64, n_cells=6)[0][0]
    masks = cyto3.eval(image, channels=[0, 0], diameter=None)[0]  # size model runs first, no download
    assert masks.shape == image.shape
    assert cyto3.estimate_diameter(image, channels=[0, 0]) > 0


def test_missing_weight_file_is_one_line_naming_it(cellpose_folder):
    with pytest.raises(InputError) as err:
        mf.builtin_models(["cyto3", "tissuenet_cp3"])
    message = str(err.value)
    assert "\n" not in message and str(cellpose_folder / "tissuenet_cp3") in message
    assert "never downloads" in message


def test_unknown_and_transformer_names_are_refused(cellpose_folder):
    with pytest.raises(InputError, match=r"'cyto9'.*known: cyto3, nuclei"):
        mf.builtin_models("cyto9")
    with pytest.raises(InputError, match="transformer"):
        mf.builtin_models("transformer_cp3")


@pytest.mark.slow
def test_a_model_from_cellpose_train_seg_needs_no_sidecar(tmp_path, no_network):
    """Cellpose's own train_seg writes a bare state dict; its diameters are read from there."""
    from cellpose import train
    from cellpose.models import CellposeModel

    images, labels = disc_images(n_images=2, size=64, n_cells=8, radius=(4.0, 6.0))
    model = CellposeModel(gpu=False, pretrained_model=None, model_type=None, device=torch.device("cpu"))
    path = train.train_seg(model.net, train_data=images, train_labels=labels, channels=[0, 0], n_epochs=1,
                           batch_size=2, bsize=32, min_train_masks=1, save_path=tmp_path, model_name="lab",
                           normalize=True)[0]
    assert not any(p.suffix == ".json" for p in tmp_path.rglob("*"))
    models, _ = mf.discover_models(path.parent)  # train_seg's <save_path>/models/<name>
    assert [m.name for m in models] == ["lab"]
    diam_mean, diam_labels = mf.training_diameters(models[0])
    assert diam_mean == 30.0 and 5.0 < diam_labels < 15.0
    loaded = mf.load_cellpose_model(models[0], device=torch.device("cpu"))
    assert float(loaded.diam_labels) == pytest.approx(diam_labels)


def test_rank_takes_builtin_models_by_name(cellpose_folder, tmp_path):
    """`dqtool rank DIR --builtin cyto3,nuclei` ranks the folder's models and the built-ins together."""
    from click.testing import CliRunner

    from dqtool.data.io import write_image_png
    from dqtool_cli.main import cli

    bank = tmp_path / "bank"
    bank.mkdir()
    _save_random_cpnet(bank / "mine.pth", 2)
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(disc_images(n_images=2, size=64, n_cells=5, seed=3)[0]):
        write_image_png(images / f"t{i}.png", img)
    res = CliRunner().invoke(cli, ["rank", str(bank), "--images", str(images), "--builtin", "cyto3,nuclei",
                                   "--perturb", "noise", "--score", "nhd", "--no-cache", "--quiet",
                                   "--out", str(tmp_path / "rank")])
    assert res.exit_code == 0, res.output
    assert "mine.pth" in res.output and "cyto3" in res.output and "nucleitorch_0" in res.output
    res = CliRunner().invoke(cli, ["rank", str(bank), "--images", str(images), "--builtin", "cyto9", "--quiet",
                                   "--out", str(tmp_path / "rank9")])
    assert res.exit_code == 1 and "cyto9" in res.output
