"""Readers: each layout on the real samples where one exists, and on small files the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.draw import polygon as draw_polygon

from dqtool.data.datasets import detect_format, open_dataset, rasterise_monuseg, read_monuseg_polygons
from dqtool.common.errors import InputError
from dqtool.data.io import read_image, read_labels, relabel_consecutive


def _png(path, arr):
    Image.fromarray(arr).save(path)


def _cellpose_folder(root, n=2, shape=(40, 50), rgba=False, sixteen=False):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        if sixteen:
            img = rng.integers(0, 65535, shape, dtype=np.uint16)
        elif rgba:
            img = rng.integers(0, 255, shape + (4,), dtype=np.uint8)
        else:
            img = rng.integers(0, 255, shape, dtype=np.uint8)
        lab = np.zeros(shape, np.uint16)
        lab[5:15, 5:15] = 7
        lab[20:30, 30:45] = 300
        _png(root / f"{i:03d}_img.png", img)
        _png(root / f"{i:03d}_masks.png", lab)
    return root


def test_cellpose_layout_with_splits(tmp_path):
    _cellpose_folder(tmp_path / "dom" / "train", n=3)
    _cellpose_folder(tmp_path / "dom" / "test", n=1)
    ds = open_dataset(tmp_path / "dom")
    assert ds.format == "cellpose" and len(ds) == 3 and ds.domains == ["dom"]
    assert open_dataset(tmp_path / "dom", split="test").samples[0].name == "000"
    lab = ds[0].labels
    assert lab.dtype == np.uint32 and sorted(np.unique(lab)) == [0, 1, 2]


def test_rgba_and_16bit_images(tmp_path):
    ds = open_dataset(_cellpose_folder(tmp_path / "rgba", rgba=True))
    assert ds[0].image.shape == (40, 50, 3)  # alpha dropped
    ds16 = open_dataset(_cellpose_folder(tmp_path / "s16", sixteen=True))
    img = ds16[0].image
    assert img.dtype == np.uint16 and img.max() > 255


def test_generic_layout_on_real_cyto(real_data):
    ds = open_dataset(real_data / "cyto_ctc")
    assert ds.format == "generic" and len(ds) == 10 and ds.has_labels
    hela = [s for s in ds if s.name == "HeLa_t75"][0]
    lab = hela.labels
    raw = tifffile.imread(hela.label_path)
    # ids become consecutive 1..n; the number of instances is kept (349 per SOURCE.md)
    assert lab.dtype == np.uint32 and lab.max() == len(np.unique(raw)) - 1 == 349
    assert np.array_equal(lab > 0, raw > 0)
    assert hela.image.dtype == np.uint16


def test_neurips_layout_on_real(real_data):
    ds = open_dataset(real_data / "multi_neurips")
    assert ds.format == "neurips" and [s.name for s in ds] == ["cell_00225", "cell_00528", "cell_00849"]
    counts = [int(s.labels.max()) for s in ds]
    assert counts == [6, 44, 187]  # SOURCE.md; int16 labels read as uint32
    assert ds[1].image.dtype == np.uint16 and ds[1].image.shape == (200, 200)


def test_monuseg_every_nonempty_polygon_is_one_instance(real_data):
    ds = open_dataset(real_data / "histo_monuseg")
    assert ds.format == "monuseg" and len(ds) == 3
    for sample in ds:
        shape = sample.image.shape[:2]
        polys = read_monuseg_polygons(sample.label_path)
        # independent of the rasteriser: which polygons cover at least one pixel centre inside the image
        nonempty = [p for p in polys if draw_polygon(p[:, 0], p[:, 1], shape=shape)[0].size > 0]
        lab = sample.labels
        assert lab.shape == shape and lab.dtype == np.uint32
        assert lab.max() == len(nonempty) == len(np.unique(lab)) - 1


def test_monuseg_overlap_goes_to_smaller_polygon(tmp_path):
    xml = tmp_path / "a.xml"
    big = [(0, 0), (0, 20), (20, 20), (20, 0)]
    small = [(5, 5), (5, 9), (9, 9), (9, 5)]
    outside = [(-5, -5), (-5, -1), (-1, -1), (-1, -5)]  # clipped away entirely

    def region(pts):
        return "<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}"/>' for y, x in pts) + "</Vertices></Region>"

    xml.write_text("<Annotations><Annotation><Regions>" + region(small) + region(big) + region(outside)
                   + "</Regions></Annotation></Annotations>")
    lab = rasterise_monuseg(xml, (30, 30))
    assert lab.max() == 2
    assert lab[7, 7] != lab[15, 15] and lab[7, 7] > 0 and lab[15, 15] > 0
    assert lab[25, 25] == 0


def test_corrupt_xml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region>")
    with pytest.raises(InputError, match="bad.xml"):
        read_monuseg_polygons(bad)


def test_missing_label_file(tmp_path):
    root = _cellpose_folder(tmp_path / "d", n=2)
    (root / "001_masks.png").unlink()
    with pytest.raises(InputError, match="001_img.png: missing label file"):
        open_dataset(root)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        open_dataset(tmp_path / "empty")


def test_unlabelled_bare_folder(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    _png(root / "a.png", np.zeros((10, 10), np.uint8))
    ds = open_dataset(root)
    assert ds.format == "generic" and not ds.has_labels and ds[0].labels is None


def test_corrupt_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(InputError, match="broken.png: cannot read image"):
        read_image(bad)


def test_float_and_negative_labels(tmp_path):
    f = tmp_path / "float_label.tif"
    tifffile.imwrite(f, np.ones((5, 5), np.float32))
    with pytest.raises(InputError, match="floating point"):
        read_labels(f)
    n = tmp_path / "neg_label.tif"
    tifffile.imwrite(n, -np.ones((5, 5), np.int16))
    with pytest.raises(InputError, match="negative"):
        read_labels(n)


def test_relabel_consecutive_keeps_order_and_input():
    lab = np.array([[0, 9, 9], [4_000_000_000, 0, 4]], dtype=np.uint64)
    before = lab.copy()
    out = relabel_consecutive(lab)
    assert out.dtype == np.uint32
    assert out.tolist() == [[0, 2, 2], [3, 0, 1]]
    assert np.array_equal(lab, before)


def test_format_override(real_data):
    assert detect_format(real_data / "cyto_ctc") == "generic"
    with pytest.raises(InputError, match="unknown dataset format"):
        open_dataset(real_data / "cyto_ctc", format="zarr")
