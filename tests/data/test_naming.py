"""The one label-naming rule (dqtool.data.naming) and the readers and commands that use it.

Each ``test_*_was_*`` test is a disagreement between the four copies the rule replaced (datasets,
eval, predict, rank); it fails on the old copies.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dqtool.common.errors import InputError
from dqtool.data.datasets import open_dataset
from dqtool.data.naming import (LABEL_SUFFIXES, find_label_file, image_key, is_input_image, is_label_file,
                                label_key, list_input_images)


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _labelled_pair(folder, image_name, label_name):
    lab = np.zeros((12, 12), np.uint8)
    lab[2:6, 2:6] = 1
    _png(folder / image_name, np.full((12, 12), 50, np.uint8))
    _png(folder / label_name, lab)


def test_keys_of_the_usual_layouts():
    assert label_key("001_masks") == "001"
    assert label_key("001_img_cp_masks") == "001"
    assert label_key("cell_00001_label") == "cell_00001"
    assert label_key("x_Mask") == "x"  # suffixes ignore case; keys keep it
    assert label_key("GOWT1_t01") == "GOWT1_t01"
    assert label_key("_img") == "_img" and label_key("_masks") == "_masks"
    assert image_key("001_img") == "001" and image_key("cell_00001") == "cell_00001"
    assert set(LABEL_SUFFIXES) == {"_cp_masks", "_masks", "_mask", "_labels", "_label", "_gt"}


def test_labels_outputs_and_input_images():
    for name in ("a_masks.png", "a_cp_masks.tif", "a_mask.png", "a_label.tiff", "a_labels.png", "a_gt.tif",
                 "A_MASKS.PNG", "a_seg.npy"):  # a_seg.npy: the Cellpose GUI's annotation (issue 14)
        assert is_label_file(name) and not is_input_image(name), name
    for name in ("a_flows.tif", "a_seg.png", "a_cellprob.tif", "a_cp_output.png"):
        assert not is_label_file(name) and not is_input_image(name), name
    for name in ("a.png", "001_img.tif", "masks_a.png", "a_masked_cells.png"):
        assert is_input_image(name) and not is_label_file(name), name
    assert not is_input_image(".a.png") and not is_input_image("a.txt")


def test_find_label_file_in_the_image_folder_and_another(tmp_path):
    _touch(tmp_path / "both", "000_img.png", "000_masks.png", "plain.png", "plain.tif")
    assert find_label_file(tmp_path / "both" / "000_img.png", tmp_path / "both").name == "000_masks.png"
    # in the image's own folder another file of the same stem is an image, not its label
    assert find_label_file(tmp_path / "both" / "plain.png", tmp_path / "both") is None
    _touch(tmp_path / "labels", "a.tif", "b_label.tiff", "c_masks.png", "e_img_cp_masks.tif")
    labels = tmp_path / "labels"
    assert find_label_file(tmp_path / "images" / "a.png", labels).name == "a.tif"
    assert find_label_file(tmp_path / "images" / "b.tif", labels).name == "b_label.tiff"
    assert find_label_file(tmp_path / "images" / "c_img.png", labels).name == "c_masks.png"
    assert find_label_file(tmp_path / "images" / "e_img.png", labels).name == "e_img_cp_masks.tif"
    assert find_label_file(tmp_path / "images" / "d.tif", labels) is None


def test_two_label_files_for_one_image_are_refused_with_both_names(tmp_path):
    _touch(tmp_path, "a.png", "a_masks.png", "a_label.tif")
    with pytest.raises(InputError, match=r"a_label\.tif and .*a_masks\.png: 2 label files for the image a\.png"):
        find_label_file(tmp_path / "a.png", tmp_path)
    _touch(tmp_path / "lab", "b.png", "b.tif")  # two plain candidates in a labels folder
    with pytest.raises(InputError, match=r"b\.png and .*b\.tif"):
        find_label_file(tmp_path / "images" / "b.png", tmp_path / "lab")


# -- the disagreements of the old copies ------------------------------------------------------------


def test_label_files_and_cellpose_outputs_are_no_input_images(tmp_path):
    """predict and rank segmented x_mask.png and x_gt.tif (tested on the commands in test_predict/test_rank)."""
    _touch(tmp_path, "x.png", "x_mask.png", "x_gt.tif", "x_cellprob.tif", "x_cp_output.png", "x_flows.tif")
    assert [p.name for p in list_input_images(tmp_path)] == ["x.png"]


def test_generic_labels_folder_was_case_and_img_blind(tmp_path):
    """The generic reader matched labels/ by exact suffix (no _cp_masks, no case, no _img): images stayed unlabelled."""
    root = tmp_path / "d"
    _labelled_pair(root, "images/001_img.png", "labels/001_masks.png")
    _labelled_pair(root, "images/002_img.png", "labels/002_img_cp_masks.png")
    _labelled_pair(root, "images/003_img.png", "labels/003_Mask.png")
    ds = open_dataset(root)
    assert ds.format == "generic" and ds.has_labels
    assert [s.label_path.name for s in ds] == ["001_masks.png", "002_img_cp_masks.png", "003_Mask.png"]


def test_bare_folder_read_label_files_as_images(tmp_path):
    """A bare folder's x_mask.png and x_flows.tif were unlabelled images; now x.png's label and skipped."""
    root = tmp_path / "bare"
    _labelled_pair(root, "x.png", "x_mask.png")
    _png(root / "x_flows.tif", np.zeros((12, 12), np.uint8))
    ds = open_dataset(root)
    assert [s.name for s in ds] == ["x"] and ds[0].label_path.name == "x_mask.png"
    assert int(ds[0].labels.max()) == 1


def test_cellpose_layout_knew_only_masks(tmp_path):
    """The Cellpose-layout reader paired NNN_img only with NNN_masks: NNN_label or NNN_img_masks left it unlabelled."""
    root = tmp_path / "cp"
    _labelled_pair(root, "000_img.png", "000_masks.png")
    _labelled_pair(root, "001_img.png", "001_img_masks.png")
    _labelled_pair(root, "002_img.png", "002_label.png")
    ds = open_dataset(root)
    assert ds.format == "cellpose" and ds.has_labels and [s.name for s in ds] == ["000", "001", "002"]


def test_cellpose_predictions_beside_ground_truth_are_refused(tmp_path):
    """Both 000_masks.png and 000_img_cp_masks.png name 000's label: refused with both names, not one picked."""
    root = tmp_path / "cp"
    _labelled_pair(root, "000_img.png", "000_masks.png")
    _png(root / "000_img_cp_masks.png", np.zeros((12, 12), np.uint8))
    with pytest.raises(InputError, match=r"000_img_cp_masks\.png and .*000_masks\.png"):
        open_dataset(root)
