"""The Cellpose GUI's ``<name>_seg.npy`` as a label file, in every reader (issue 14, the annotation loop).

The files are written by Cellpose 3.1.1's own ``cellpose.io.masks_flows_to_seg``, as the GUI saves them.
"""

from __future__ import annotations

import numpy as np
import pytest
from factories import touching_cells
from PIL import Image

from dqtool.common.errors import InputError
from dqtool.data.datasets import open_dataset
from dqtool.data.io import read_labels
from dqtool.data.naming import LabelFolder, is_input_image, is_label_file, label_key


def _seg_file(path_stem, masks):
    """Write ``<path_stem>_seg.npy`` with Cellpose's own writer (flows as eval returns them)."""
    from cellpose.io import masks_flows_to_seg

    h, w = masks.shape
    flows = [np.zeros((h, w, 3), np.uint8), np.zeros((2, h, w), np.float32), np.zeros((h, w), np.float32)]
    image = np.zeros((h, w), np.float32)
    masks_flows_to_seg(image, masks, flows, str(path_stem), diams=30.0, channels=[0, 0])
    return path_stem.parent / (path_stem.name + "_seg.npy")


def _annotated_folder(folder, n=3, size=48, empty=()):
    """A Cellpose-layout folder NNN_img.png + NNN_img_seg.npy (what the GUI leaves after annotating)."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = []
    for i in range(n):
        lab = np.zeros((size, size), np.uint16) if i in empty else touching_cells((size, size), 6, seed=i,
                                                                                    dtype=np.uint16)
        img = np.where(lab > 0, 200, 20).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}_img.png")
        _seg_file(folder / f"{i:03d}_img", lab)
        truth.append(lab)
    return truth


def test_seg_npy_is_a_label_file_with_the_image_key(tmp_path):
    assert is_label_file("001_img_seg.npy") and is_label_file("x_seg.npy")
    assert not is_label_file(".x_seg.npy") and not is_label_file("_seg.npy") and not is_label_file("x.npy")
    assert not is_input_image("001_img_seg.npy")
    assert label_key("001_img_seg") == "001" and label_key("cell_7_seg") == "cell_7"
    _annotated_folder(tmp_path, n=1)
    assert LabelFolder(tmp_path).find(tmp_path / "000_img.png") == tmp_path / "000_img_seg.npy"


def test_read_labels_reads_what_cellpose_writes(tmp_path):
    lab = touching_cells((40, 36), 7, seed=3, dtype=np.uint16)
    lab[lab == 2] = 0  # a gap: the reader renumbers to consecutive ids
    got = read_labels(_seg_file(tmp_path / "a_img", lab))
    assert got.dtype == np.uint32 and got.shape == lab.shape
    assert np.array_equal(got > 0, lab > 0) and got.max() == len(np.unique(lab)) - 1


def test_empty_masks_read_as_background(tmp_path):
    got = read_labels(_seg_file(tmp_path / "empty", np.zeros((20, 24), np.uint16)))
    assert got.shape == (20, 24) and got.max() == 0


def test_not_a_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "x_seg.npy"
    np.save(path, np.zeros((5, 5), np.uint16))
    with pytest.raises(InputError, match=r"x_seg\.npy: not a Cellpose GUI _seg\.npy file.*dict") as info:
        read_labels(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("masks, what", [(np.zeros((2, 5, 5), np.uint16), "shape"),
                                         (np.zeros((5, 5), np.float32), "dtype")])
def test_masks_that_are_not_a_2d_integer_map_are_refused(tmp_path, masks, what):
    path = tmp_path / "y_seg.npy"
    np.save(path, {"masks": masks, "outlines": masks})
    with pytest.raises(InputError, match=r"y_seg\.npy: 'masks' has shape"):
        read_labels(path)


def test_dict_without_masks_and_garbage_file_are_refused(tmp_path):
    np.save(tmp_path / "a_seg.npy", {"outlines": np.zeros((3, 3))})
    with pytest.raises(InputError, match="not a Cellpose GUI _seg.npy file"):
        read_labels(tmp_path / "a_seg.npy")
    (tmp_path / "b_seg.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="b_seg.npy: cannot read"):
        read_labels(tmp_path / "b_seg.npy")


def test_seg_and_masks_for_one_image_are_refused_naming_both(tmp_path):
    _annotated_folder(tmp_path, n=1)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "000_masks.png")
    with pytest.raises(InputError, match=r"000_img_seg\.npy.*000_masks\.png|000_masks\.png.*000_img_seg\.npy"):
        open_dataset(tmp_path)


def test_patches_reads_an_annotated_folder(tmp_path):
    from dqtool.data.cache import PatchCache
    from dqtool.data.cache_build import PatchOptions, build_cache

    truth = _annotated_folder(tmp_path / "ann", n=3, size=48, empty=(1,))
    ds = open_dataset(tmp_path / "ann")
    assert ds.format == "cellpose" and all(s.has_labels for s in ds)
    build_cache(ds, tmp_path / "c.h5", PatchOptions(size=48, stride=48), quiet=True)
    cache = PatchCache(tmp_path / "c.h5")
    labels = cache.labels(np.arange(3))
    for got, lab in zip(labels, truth):
        assert np.array_equal(got > 0, lab > 0)
    assert labels[1].max() == 0


def test_eval_and_rank_truth_take_seg_npy(tmp_path):
    from dqtool.evaluation.folders import evaluate_folders
    from dqtool.ranking.rank import _read_truth

    truth = _annotated_folder(tmp_path / "gt", n=2)
    (tmp_path / "pred").mkdir()
    for i, lab in enumerate(truth):
        Image.fromarray(lab).save(tmp_path / "pred" / f"{i:03d}_img_cp_masks.png")
    res = evaluate_folders(tmp_path / "gt", tmp_path / "pred", tmp_path / "ev")
    rows = res.result.per_image
    assert len(rows) == 2 and not res.result.errors
    assert all(r["gt_file"].endswith("_seg.npy") for r in rows)
    assert all(v == 1.0 for r in rows for k, v in r.items() if k.startswith("f1"))
    images = [tmp_path / "gt" / f"{i:03d}_img.png" for i in range(2)]
    got, notes = _read_truth(tmp_path / "gt", images, [np.zeros(t.shape) for t in truth])
    assert not notes and all(np.array_equal(g > 0, t > 0) for g, t in zip(got, truth))
