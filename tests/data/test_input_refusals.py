"""What the readers accept for sure and refuse (issue 19, item 4), in process; the CLI side is tests/faults."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from dqtool.common.errors import InputError
from dqtool.data.datasets import open_dataset
from dqtool.data.io import check_instance_map, read_image, read_labels
from dqtool.data.naming import check_name, input_images, printable


def _img(shape, dtype=np.uint8):
    return (np.arange(int(np.prod(shape))) % 200).astype(dtype).reshape(shape)


def test_channels_named_for_sure_are_read(tmp_path):
    rgba = _img((8, 9, 4))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])
    la = _img((8, 9, 2))
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), la[..., 0])  # gray + alpha is gray
    tifffile.imwrite(tmp_path / "rgba.tif", rgba)  # tifffile tags a 4th sample as unassociated alpha
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), rgba[..., :3])
    two = _img((2, 8, 9))
    tifffile.imwrite(tmp_path / "two.tif", two, imagej=True, metadata={"axes": "CYX"})
    got = read_image(tmp_path / "two.tif")
    np.testing.assert_array_equal(got[..., :2], np.moveaxis(two, 0, -1))
    assert (got[..., 2] == 0).all()  # Cellpose's two-channel convention: B is zero


@pytest.mark.parametrize("shape, kw, match", [
    ((8, 9, 4), {"photometric": "minisblack"}, "4 channels that the file does not name as RGBA"),
    ((4, 8, 9), {"imagej": True, "metadata": {"axes": "CYX"}}, "4 channels"),
    ((3, 8, 9), {"imagej": True, "metadata": {"axes": "ZYX"}}, "a stack of 3 Z planes"),
])
def test_channels_not_named_for_sure_are_refused(tmp_path, shape, kw, match):
    tifffile.imwrite(tmp_path / "x.tif", _img(shape), **kw)
    with pytest.raises(InputError, match=match):
        read_image(tmp_path / "x.tif")


def test_one_bit_colour_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "b.tif", np.ones((4, 5, 3), bool), photometric="rgb")
    with pytest.raises(InputError, match="1 bit"):
        read_image(tmp_path / "b.tif")


def test_non_finite_pixels_are_refused(tmp_path):
    img = _img((8, 9)).astype(np.float32)
    img[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "n.tif", img)
    with pytest.raises(InputError, match=r"n\.tif: 1 NaN or inf pixel values \(first at \(2, 3\)"):
        read_image(tmp_path / "n.tif")


def test_binary_masks_are_refused_and_single_cells_read(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:3] = 255
    mask[6:9, 6:9] = 255
    tifffile.imwrite(tmp_path / "m.tif", mask)
    with pytest.raises(InputError, match="binary mask .one id, 2 separate regions"):
        read_labels(tmp_path / "m.tif")
    mask[3:6, 3:6] = 255  # diagonal neighbours join the two squares: one region, one cell
    tifffile.imwrite(tmp_path / "one.tif", mask)
    assert read_labels(tmp_path / "one.tif").max() == 1
    instances = mask.astype(np.uint16)
    instances[6:9, 6:9] = 7  # two ids: an instance map, even with one id in two pieces elsewhere
    assert check_instance_map(instances) is instances


def test_two_images_with_one_key_are_refused(tmp_path):
    Image.fromarray(_img((8, 8))).save(tmp_path / "001_img.png")
    tifffile.imwrite(tmp_path / "001.tif", _img((8, 8)))
    with pytest.raises(InputError, match=r"001\.tif and .*001_img\.png: two images with the key '001'"):
        input_images(tmp_path)


def test_format_that_hides_labels_is_refused(tmp_path):
    Image.fromarray(_img((8, 8))).save(tmp_path / "000_img.png")
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "000_masks.png")
    assert open_dataset(tmp_path).has_labels
    with pytest.raises(InputError, match="--format neurips finds no labels.*cellpose layout.*000_masks.png"):
        open_dataset(tmp_path, format="neurips")


def test_names_that_are_not_utf8_are_refused():
    import os

    bad = os.fsdecode(b"caf\xe9.tif")
    assert printable(bad) == "caf\\xe9.tif"
    with pytest.raises(InputError, match=r"caf\\xe9\.tif: the file name is not valid UTF-8"):
        check_name(bad)
    assert check_name("café.tif").name == "café.tif"


def test_features_whose_squared_norms_overflow_are_refused():
    from dqtool.features.store import check_features

    assert check_features(np.full((4, 3), 1e17), "f").dtype == np.float32
    with pytest.raises(InputError, match="f: feature row 0 has squared norm 3e\\+38"):
        check_features(np.full((4, 3), 1e19), "f")
    with pytest.raises(InputError, match="overflows float32"):
        check_features(np.full((4, 3), 1e39), "f")


@pytest.mark.parametrize("diameter", [0.0, -1.0, float("nan"), float("inf")])
def test_predict_diameter_must_be_positive(diameter):
    from dqtool.segmentation.predict import PredictOptions

    with pytest.raises(InputError, match="--diameter"):
        PredictOptions(diameter=diameter)
    assert PredictOptions(diameter=17.5).diameter == 17.5
