"""The fault suite, input half (issue 19, items 4 and 5): every ambiguous, out-of-range or broken input is
refused through the CLI with exit 1 and one line naming the file or value, and nothing on disk changes.

Each case builds a tiny folder (32 x 32 images), runs one dqtool command in a subprocess in it and
checks the refusal with ``faultkit`` (exit code, one line, no traceback, named file/value, every file
byte-identical, nothing added). Cases that need torch and Cellpose (a model file, training) are ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
SIZE = ["--size", "16", "--stride", "16"]


# ----------------------------------------------------------------------------------------------
# tiny inputs


def _pixels(shape=(32, 32), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 255 if np.dtype(dtype) == np.uint8 else 4000
    return rng.integers(0, top, size=shape).astype(dtype)


def _instances(shape=(32, 32)) -> np.ndarray:
    lab = np.zeros(shape, np.uint16)
    lab[3:10, 3:10] = 1
    lab[15:25, 15:25] = 2
    lab[3:8, 20:30] = 3
    return lab


def _mask(shape=(32, 32), value=1) -> np.ndarray:
    """A binary mask: three separate blobs with one value."""
    return (_instances(shape) > 0).astype(np.uint8) * value


def tif(path: Path, arr, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(str(path), arr, **kw)
    return path


def png(path: Path, arr, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr), mode=mode).save(path)
    return path


def generic(root: Path, names=("a",), label=True) -> Path:
    """``root/images/<name>.tif`` (+ ``root/labels/<name>.tif``)."""
    for k, name in enumerate(names):
        tif(root / "images" / f"{name}.tif", _pixels(seed=k))
        if label:
            tif(root / "labels" / f"{name}.tif", _instances())
    return root


def cellpose(root: Path, n=2) -> Path:
    for k in range(n):
        png(root / f"{k:03d}_img.png", _pixels(seed=k))
        png(root / f"{k:03d}_masks.png", _instances())
    return root


def neurips(root: Path) -> Path:
    tif(root / "images" / "cell_1.tif", _pixels())
    tif(root / "labels" / "cell_1_label.tiff", _instances())
    return root


def monuseg(root: Path) -> Path:
    tif(root / "Tissue Images" / "t1.tif", _pixels((32, 32, 3)))
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "t1.xml").write_text(
        '<Annotations><Annotation><Regions><Region><Vertices><Vertex X="3" Y="3"/><Vertex X="12" Y="3"/>'
        '<Vertex X="12" Y="12"/></Vertices></Region></Regions></Annotation></Annotations>')
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garble(path: Path, start: float = 0.4, n: int = 64, seed: int = 0) -> Path:
    data = bytearray(path.read_bytes())
    at = int(len(data) * start)
    data[at:at + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def patches(src="d", *more):
    return ["patches", src, *more, "--out", "out.h5", *SIZE]


# ----------------------------------------------------------------------------------------------
# cases: (id, build(root), args, names that the line must hold)


CASES = []


def case(id, args, names, slow=False):
    def register(build):
        CASES.append(pytest.param(build, args, names, id=id, marks=[pytest.mark.slow] if slow else []))
        return build
    return register


# -- ambiguous names ----------------------------------------------------------------------------

@case("two-images-one-stem-generic", patches(), ["a.png", "a.tif", "two images"])
def _(r):
    generic(r / "d")
    png(r / "d" / "images" / "a.png", _pixels())


@case("two-images-one-stem-bare-folder", patches(), ["a.png", "a.tif"])
def _(r):
    tif(r / "d" / "a.tif", _pixels())
    png(r / "d" / "a.png", _pixels())


@case("two-images-one-stem-cellpose", patches(), ["000_img.png", "000_img.tif"])
def _(r):
    cellpose(r / "d")
    tif(r / "d" / "000_img.tif", _pixels())


@case("two-images-one-key-img-suffix", patches(), ["000.tif", "000_img.png", "'000'"])
def _(r):
    cellpose(r / "d")
    tif(r / "d" / "000.tif", _pixels())


@case("two-images-one-stem-neurips", patches(), ["cell_1.png", "cell_1.tif"])
def _(r):
    neurips(r / "d")
    png(r / "d" / "images" / "cell_1.png", _pixels())


@case("two-images-one-stem-monuseg", patches(), ["t1.png", "t1.tif"])
def _(r):
    monuseg(r / "d")
    png(r / "d" / "Tissue Images" / "t1.png", _pixels((32, 32, 3)))


@case("two-labels-masks-and-label", patches(), ["a_masks.tif", "a_label.tif", "2 label files"])
def _(r):
    generic(r / "d", label=False)
    tif(r / "d" / "labels" / "a_masks.tif", _instances())
    tif(r / "d" / "labels" / "a_label.tif", _instances())


@case("two-labels-cellpose-png-and-tif", patches(), ["000_masks.png", "000_masks.tif"])
def _(r):
    cellpose(r / "d")
    tif(r / "d" / "000_masks.tif", _instances())


@case("two-labels-neurips-tiff-and-png", patches(), ["cell_1_label.png", "cell_1_label.tiff"])
def _(r):
    neurips(r / "d")
    png(r / "d" / "labels" / "cell_1_label.png", _instances())


@case("two-labels-plain-two-extensions", patches(), ["labels/a.png", "labels/a.tif"])
def _(r):
    generic(r / "d")
    png(r / "d" / "labels" / "a.png", _instances())


@case("two-labels-bare-folder", patches(), ["a_gt.png", "a_mask.png"])
def _(r):
    tif(r / "d" / "a.tif", _pixels())
    png(r / "d" / "a_mask.png", _instances())
    png(r / "d" / "a_gt.png", _instances())


@case("two-annotations-monuseg", patches(), ["t1.XML", "t1.xml", "two annotation files"])
def _(r):
    monuseg(r / "d")
    shutil.copy(r / "d" / "Annotations" / "t1.xml", r / "d" / "Annotations" / "t1.XML")


@case("missing-label-in-labelled-folder", patches(), ["b.tif", "missing label file"])
def _(r):
    generic(r / "d", names=("a",))
    tif(r / "d" / "images" / "b.tif", _pixels())


# -- sources given twice ------------------------------------------------------------------------

@case("same-source-twice", patches("d", "d"), ["a.tif", "given twice"])
def _(r):
    generic(r / "d")


@case("same-source-other-spelling", patches("d", "./d/"), ["a.tif", "given twice"])
def _(r):
    generic(r / "d")


@case("same-source-through-symlink", patches("d", "e"), ["a.tif", "read twice"])
def _(r):
    generic(r / "d")
    os.symlink("d", r / "e")


@case("same-source-root-and-split", patches("d", "d/train"), ["000_img.png", "read twice"])
def _(r):
    cellpose(r / "d" / "train")


@case("same-source-twice-with-domains", patches("d", "d", "--domain", "x", "--domain", "y"), ["given twice"])
def _(r):
    generic(r / "d")


# -- --format that hides labels -----------------------------------------------------------------

@case("format-neurips-on-cellpose", patches("d", "--format", "neurips"), ["--format neurips", "cellpose", "000_masks"])
def _(r):
    cellpose(r / "d")


@case("format-generic-on-monuseg", patches("d", "--format", "generic"), ["--format generic", "monuseg", "t1.xml"])
def _(r):
    monuseg(r / "d")


@case("format-monuseg-on-neurips", patches("d", "--format", "monuseg"), ["--format monuseg", "neurips",
                                                                          "cell_1_label.tiff"])
def _(r):
    neurips(r / "d")


@case("format-monuseg-on-generic", patches("d", "--format", "monuseg"), ["--format monuseg", "generic"])
def _(r):
    generic(r / "d")


@case("format-cellpose-finds-no-images", patches("d", "--format", "cellpose"), ["no images found", "cellpose"])
def _(r):
    generic(r / "d")


# -- pixel values and channels ------------------------------------------------------------------

def _float_with(value):
    def build(r):
        img = _pixels().astype(np.float32)
        img[5, 7] = value
        tif(r / "d" / "images" / "a.tif", img)
        tif(r / "d" / "labels" / "a.tif", _instances())
    return build


case("nan-pixel", patches(), ["a.tif", "NaN or inf", "(5, 7)"])(_float_with(np.nan))
case("inf-pixel", patches(), ["a.tif", "NaN or inf"])(_float_with(np.inf))
case("minus-inf-pixel", patches(), ["a.tif", "NaN or inf"])(_float_with(-np.inf))


@case("nan-pixel-float64-rgb", patches(), ["a.tif", "NaN or inf"])
def _(r):
    img = _pixels((32, 32, 3)).astype(np.float64)
    img[..., 1] = np.nan
    tif(r / "d" / "images" / "a.tif", img, photometric="rgb")
    tif(r / "d" / "labels" / "a.tif", _instances())


def _channels(arr_shape, **kw):
    def build(r):
        tif(r / "d" / "images" / "a.tif", _pixels(arr_shape), **kw)
        tif(r / "d" / "labels" / "a.tif", _instances())
    return build


case("4-channels-minisblack", patches(), ["a.tif", "4 channels", "RGBA"])(
    _channels((32, 32, 4), photometric="minisblack"))
case("4-channels-unspecified-extra", patches(), ["a.tif", "4 channels"])(
    _channels((32, 32, 4), photometric="rgb", extrasamples=["unspecified"]))
case("4-channels-imagej", patches(), ["a.tif", "4 channels"])(
    _channels((4, 32, 32), imagej=True, metadata={"axes": "CYX"}))
case("z-stack", patches(), ["a.tif", "3 Z planes"])(_channels((3, 32, 32), imagej=True, metadata={"axes": "ZYX"}))
case("time-series", patches(), ["a.tif", "2 time points"])(
    _channels((2, 32, 32), imagej=True, metadata={"axes": "TYX"}))
case("5-channels", patches(), ["a.tif", "(5, 32, 32)"])(_channels((5, 32, 32)))
case("4-d-volume", patches(), ["a.tif", "(2, 3, 32, 32)"])(_channels((2, 3, 32, 32), photometric="minisblack"))


@case("cmyk-jpeg", patches(), ["a.jpg", "CMYK"])
def _(r):
    (r / "d" / "images").mkdir(parents=True)
    Image.fromarray(_pixels((32, 32, 3))).convert("CMYK").save(r / "d" / "images" / "a.jpg")
    tif(r / "d" / "labels" / "a.tif", _instances())


@case("one-row-image", patches(), ["a.tif", "2-D image"])
def _(r):
    tif(r / "d" / "a.tif", _pixels((1, 32)))


# -- label maps ---------------------------------------------------------------------------------

def _labels_file(write):
    def build(r):
        tif(r / "d" / "images" / "a.tif", _pixels())
        write(r / "d" / "labels")
    return build


case("binary-mask-0-1", patches(), ["labels/a.tif", "binary mask", "3 separate regions"])(
    _labels_file(lambda d: tif(d / "a.tif", _mask())))
case("binary-mask-0-255-png", patches(), ["labels/a.png", "binary mask"])(
    _labels_file(lambda d: png(d / "a.png", _mask(value=255))))
case("binary-mask-bool", patches(), ["labels/a.tif", "binary mask"])(
    _labels_file(lambda d: tif(d / "a.tif", _mask().astype(bool))))
case("float-labels", patches(), ["labels/a.tif", "floating point"])(
    _labels_file(lambda d: tif(d / "a.tif", _instances().astype(np.float32))))
case("negative-labels", patches(), ["labels/a.tif", "negative ids", "-3"])(
    _labels_file(lambda d: tif(d / "a.tif", _instances().astype(np.int16) * -1 + 0)))
case("rgb-labels", patches(), ["labels/a.png", "(32, 32, 3)"])(
    _labels_file(lambda d: png(d / "a.png", np.stack([_instances().astype(np.uint8) * 40] * 3, -1))))
case("label-shape-mismatch", patches(), ["labels/a.tif", "(32, 30)", "does not match"])(
    _labels_file(lambda d: tif(d / "a.tif", _instances((32, 30)))))
case("label-truncated", patches(), ["labels/a.tif", "cannot read"])(
    _labels_file(lambda d: truncate(tif(d / "a.tif", _instances()), 0.3)))
case("label-empty-file", patches(), ["labels/a.png", "cannot read"])(
    _labels_file(lambda d: (d.mkdir(parents=True), (d / "a.png").write_bytes(b""))))
case("label-not-an-image", patches(), ["labels/a.png", "cannot read"])(
    _labels_file(lambda d: (d.mkdir(parents=True), (d / "a.png").write_text("x,y\n1,2\n"))))


# -- broken image files -------------------------------------------------------------------------

def _image_file(write, name="a.tif"):
    def build(r):
        write(r / "d" / "images")
        tif(r / "d" / "labels" / "a.tif", _instances())
    return build


case("image-truncated-tif", patches(), ["images/a.tif", "cannot read"])(
    _image_file(lambda d: truncate(tif(d / "a.tif", _pixels((64, 64))), 0.5)))
case("image-truncated-png", patches(), ["images/a.png", "cannot read"])(
    _image_file(lambda d: truncate(png(d / "a.png", _pixels((64, 64))), 0.5)))
case("image-truncated-jpg", patches(), ["images/a.jpg", "cannot read"])(
    _image_file(lambda d: truncate(d.mkdir(parents=True) or (Image.fromarray(_pixels((64, 64))).save(
        d / "a.jpg", quality=95), d / "a.jpg")[1], 0.5)))
case("image-empty-file", patches(), ["images/a.tif", "cannot read"])(
    _image_file(lambda d: (d.mkdir(parents=True), (d / "a.tif").write_bytes(b""))))
case("image-random-bytes-bmp", patches(), ["images/a.bmp", "cannot read"])(
    _image_file(lambda d: (d.mkdir(parents=True), (d / "a.bmp").write_bytes(bytes(range(256)) * 4))))
case("image-html-named-tif", patches(), ["images/a.tif", "cannot read"])(
    _image_file(lambda d: (d.mkdir(parents=True), (d / "a.tif").write_text("<html>404 Not Found</html>\n"))))
case("image-corrupt-deflate-tif", patches(), ["images/a.tif", "cannot read"])(
    _image_file(lambda d: garble(tif(d / "a.tif", _pixels((64, 64)), compression="zlib"), 0.3, 200)))


@case("image-real-ctc-truncated", patches(), ["GOWT1_t01.tif", "cannot read"])
def _(r):
    src = REAL / "cyto_ctc"
    (r / "d" / "images").mkdir(parents=True)
    (r / "d" / "labels").mkdir(parents=True)
    data = (src / "images" / "GOWT1_t01.tif").read_bytes()
    (r / "d" / "images" / "GOWT1_t01.tif").write_bytes(data[: len(data) // 3])
    shutil.copy(src / "labels" / "GOWT1_t01.tif", r / "d" / "labels" / "GOWT1_t01.tif")


@case("monuseg-xml-truncated", patches(), ["t1.xml", "cannot parse"])
def _(r):
    monuseg(r / "d")
    truncate(r / "d" / "Annotations" / "t1.xml", 0.5)


@case("image-unreadable-permissions", patches(), ["images/a.tif", "ermission"])
def _(r):
    if os.geteuid() == 0:
        pytest.skip("root reads a file whatever its permissions: this case needs an ordinary user")
    generic(r / "d")
    (r / "d" / "images" / "a.tif").chmod(0)


# -- names --------------------------------------------------------------------------------------

_LATIN1 = os.fsdecode(b"caf\xe9")  # 'café' in Latin-1: not UTF-8, so Python holds it as a surrogate


@case("non-utf8-image-name", patches(), ["caf\\xe9.tif", "not valid UTF-8"])
def _(r):
    generic(r / "d", label=False)
    os.remove(r / "d" / "images" / "a.tif")
    tif(r / "d" / "images" / f"{_LATIN1}.tif", _pixels())


@case("non-utf8-label-name", patches(), ["caf\\xe9.tif", "not valid UTF-8"])
def _(r):
    tif(r / "d" / "images" / f"{_LATIN1}.tif", _pixels())
    (r / "d" / "labels").mkdir()
    tif(r / "d" / "labels" / f"{_LATIN1}_masks.tif", _instances())


@case("non-utf8-folder-name", patches(_LATIN1), ["caf\\xe9", "not valid UTF-8"])
def _(r):
    tif(r / _LATIN1 / "a.tif", _pixels())


@case("non-utf8-eval-name", ["eval", "--gt", "gt", "--pred", "pred", "--out", "ev"], ["caf\\xe9", "UTF-8"])
def _(r):
    tif(r / "gt" / f"{_LATIN1}_masks.tif", _instances())
    tif(r / "pred" / f"{_LATIN1}_cp_masks.tif", _instances())


# -- windows ------------------------------------------------------------------------------------

@case("image-smaller-than-window-drop", ["patches", "d", "--out", "out.h5", "--size", "64", "--edge", "drop"],
      ["a.tif", "32x32", "smaller than the 64-px window"])
def _(r):
    generic(r / "d")


@case("one-small-image-among-many-drop", ["patches", "d", "--out", "out.h5", "--size", "48", "--edge", "drop"],
      ["b.tif", "smaller than the 48-px window"])
def _(r):
    tif(r / "d" / "images" / "a.tif", _pixels((64, 64)))
    tif(r / "d" / "labels" / "a.tif", _instances((64, 64)))
    tif(r / "d" / "images" / "b.tif", _pixels())
    tif(r / "d" / "labels" / "b.tif", _instances())


@case("empty-folder", patches(), ["d", "no images found"])
def _(r):
    (r / "d").mkdir()


# -- eval ---------------------------------------------------------------------------------------

def _eval_dirs(r):
    tif(r / "gt" / "a_masks.tif", _instances())
    tif(r / "pred" / "a_cp_masks.tif", _instances())


case("eval-same-folder", ["eval", "--gt", "gt", "--pred", "gt", "--out", "ev"], ["gt", "both"])(_eval_dirs)
case("eval-same-folder-other-spelling", ["eval", "--gt", "gt", "--pred", "./gt/", "--out", "ev"], ["both"])(_eval_dirs)


@case("eval-same-folder-symlink", ["eval", "--gt", "gt", "--pred", "g2", "--out", "ev"], ["both"])
def _(r):
    _eval_dirs(r)
    os.symlink("gt", r / "g2")


@case("eval-pred-inside-gt", ["eval", "--gt", "gt", "--pred", "gt/pred", "--out", "ev"], ["inside", "--pred"])
def _(r):
    tif(r / "gt" / "a_masks.tif", _instances())
    tif(r / "gt" / "pred" / "a_cp_masks.tif", _instances())


@case("eval-gt-inside-pred", ["eval", "--gt", "p/gt", "--pred", "p", "--out", "ev"], ["inside", "--gt"])
def _(r):
    tif(r / "p" / "gt" / "a_masks.tif", _instances())
    tif(r / "p" / "a_cp_masks.tif", _instances())


@case("eval-two-predictions-one-image", ["eval", "--gt", "gt", "--pred", "pred", "--out", "ev"],
      ["a_cp_masks.png", "a_cp_masks.tif", "two predicted files"])
def _(r):
    _eval_dirs(r)
    png(r / "pred" / "a_cp_masks.png", _instances())


@case("eval-no-label-images", ["eval", "--gt", "gt", "--pred", "pred", "--out", "ev"], ["pred", "no label images"])
def _(r):
    tif(r / "gt" / "a_masks.tif", _instances())
    (r / "pred").mkdir()
    (r / "pred" / "notes.txt").write_text("nothing\n")


# -- predict (refused before any model is loaded) ------------------------------------------------

def _predict_inputs(r):
    (r / "m.pt").write_bytes(b"not read")
    tif(r / "imgs" / "a.tif", _pixels())


for _value in ("0", "-5", "nan", "inf", "-0.0"):
    case(f"predict-diameter-{_value}", ["predict", "m.pt", "imgs", "--out", "pr", "--diameter", _value],
         ["--diameter", _value.lstrip("-").replace("0.0", "0")])(_predict_inputs)
case("predict-flow-threshold-nan", ["predict", "m.pt", "imgs", "--out", "pr", "--flow-threshold", "nan"],
     ["--flow-threshold", "nan"])(_predict_inputs)


@case("predict-two-images-one-stem", ["predict", "m.pt", "imgs", "--out", "pr"], ["a.png", "a.tif"])
def _(r):
    _predict_inputs(r)
    png(r / "imgs" / "a.png", _pixels())


@case("predict-not-an-image", ["predict", "m.pt", "notes.txt", "--out", "pr"], ["notes.txt", "not an image"])
def _(r):
    _predict_inputs(r)
    (r / "notes.txt").write_text("x\n")


# -- the table ----------------------------------------------------------------------------------


@pytest.mark.parametrize("build, args, names", CASES)
def test_input_fault(tmp_path, build, args, names, refused):
    build(tmp_path)
    line = refused(args, names=names)  # exit 1, one stderr line naming each of names, every file unchanged
    assert line.startswith("error: ") and all(str(name) in line for name in names)


# -- the patch cache, subsets and features --------------------------------------------------------

def _cache(r: Path, compression="gzip", labels=True) -> Path:
    """``r/c.h5``: 2 images of 32 x 32 cut into 8 patches of 16 x 16."""
    from dqtool.data.cache_build import PatchOptions, build_cache
    from dqtool.data.datasets import ArraySample, Dataset

    samples = [ArraySample(f"s{k}", "dom", _pixels(seed=k), _instances() if labels else None) for k in range(2)]
    build_cache(Dataset(samples, r), r / "c.h5", PatchOptions(size=16, stride=16, compression=compression),
                quiet=True)
    return r / "c.h5"


def _subset(r: Path, indices=(0, 3), cache="c.h5", name="s.json") -> Path:
    text = json.dumps({"version": 1, "indices": list(indices), "cache": cache})
    (r / name).write_text(text)
    return r / name


def _garble_chunk(cache: Path, index: int = 0, dataset: str = "images") -> None:
    """Overwrite the stored bytes of one patch's chunk (HDF5 itself still opens the file)."""
    import h5py

    with h5py.File(cache, "r") as h5:
        info = h5[dataset].id.get_chunk_info_by_coord((index,) + (0,) * (h5[dataset].ndim - 1))
    data = bytearray(cache.read_bytes())
    data[info.byte_offset:info.byte_offset + info.size] = b"\x07" * info.size
    cache.write_bytes(bytes(data))


@case("export-corrupt-gzip-chunk", ["export", "s.json", "--out", "exp"], ["c.h5", "corrupt", "patch 0"])
def _(r):
    _garble_chunk(_cache(r))
    _subset(r)


@case("export-corrupt-gzip-label-chunk", ["export", "s.json", "--out", "exp"], ["c.h5", "/labels", "patch 0"])
def _(r):
    _garble_chunk(_cache(r), dataset="labels")
    _subset(r)


@case("export-truncated-cache", ["export", "s.json", "--out", "exp"], ["c.h5", "not a readable HDF5"])
def _(r):
    truncate(_cache(r), 0.6)
    _subset(r)


@case("info-truncated-cache", ["info", "c.h5"], ["c.h5", "not a readable HDF5"])
def _(r):
    truncate(_cache(r), 0.6)


@case("info-text-named-h5", ["info", "c.h5"], ["c.h5", "not a readable HDF5"])
def _(r):
    (r / "c.h5").write_text("not a cache\n")


@case("info-hdf5-not-a-cache", ["info", "c.h5"], ["c.h5", "not a dqtool patch cache"])
def _(r):
    import h5py

    with h5py.File(r / "c.h5", "w") as h5:
        h5["x"] = np.zeros(3)


@case("export-subset-duplicate-indices", ["export", "s.json", "--out", "exp"], ["s.json", "index 3", "more than once"])
def _(r):
    _cache(r)
    _subset(r, indices=(0, 3, 3))


@case("export-subset-index-outside", ["export", "s.json", "--out", "exp"], ["s.json", "index 8", "outside"])
def _(r):
    _cache(r)
    _subset(r, indices=(0, 8))


@case("export-subset-negative-index", ["export", "s.json", "--out", "exp"], ["s.json", "-1"])
def _(r):
    _cache(r)
    _subset(r, indices=(-1, 2))


@case("export-subset-truncated-json", ["export", "s.json", "--out", "exp"], ["s.json", "not a JSON subset"])
def _(r):
    _cache(r)
    truncate(_subset(r), 0.5)


@case("export-subset-not-utf8", ["export", "s.json", "--out", "exp"], ["s.json", "not a JSON subset"])
def _(r):
    _cache(r)
    (r / "s.json").write_bytes(b'{"indices": [0], "cache": "c\xff.h5"}')


@case("export-subset-float-indices", ["export", "s.json", "--out", "exp"], ["s.json", "integers"])
def _(r):
    _cache(r)
    (r / "s.json").write_text('{"indices": [0, 1.5], "cache": "c.h5"}')


def _features(values, name="f.npy"):  # embed imports torch (~10 s a run on a loaded 2-core machine)
    def build(r):
        _cache(r)
        np.save(r / name, values)
    return build


_huge = np.full((8, 4), 1e19, np.float64)
_nan = np.ones((8, 4), np.float32)
_nan[2, 1] = np.nan
case("embed-features-squared-norm-overflow", ["embed", "c.h5", "--features", "f.npy"],
     ["f.npy", "squared norm", "overflow float32"])(_features(_huge))
case("embed-features-value-overflows-float32", ["embed", "c.h5", "--features", "f.npy"],
     ["f.npy", "1e+39", "overflows float32"], slow=True)(_features(np.full((8, 4), 1e39)))
case("embed-features-nan", ["embed", "c.h5", "--features", "f.npy"], ["f.npy", "NaN or inf", "row 2"])(_features(_nan))
case("embed-features-wrong-rows", ["embed", "c.h5", "--features", "f.npy"], ["f.npy", "7 feature rows", "8 patches"],
     slow=True)(
    _features(np.ones((7, 4), np.float32)))
case("embed-features-3d", ["embed", "c.h5", "--features", "f.npy"], ["f.npy", "2-D"], slow=True)(
    _features(np.ones((8, 4, 2), np.float32)))


@case("embed-features-truncated-npy", ["embed", "c.h5", "--features", "f.npy"], ["f.npy"], slow=True)
def _(r):
    _features(np.ones((8, 64), np.float32))(r)
    truncate(r / "f.npy", 0.5)


# -- model files and checkpoints (torch and Cellpose load: slow) ----------------------------------

def _torch_file(path: Path, keep: float = 0.5) -> Path:
    import torch

    torch.save({"w": torch.zeros(4096)}, path)
    return truncate(path, keep)


@case("predict-model-truncated", ["predict", "m.pt", "imgs", "--out", "pr"], ["m.pt", "not a Cellpose model"],
      slow=True)
def _(r):
    tif(r / "imgs" / "a.tif", _pixels())
    _torch_file(r / "m.pt")


@case("train-init-truncated", ["train", "c.h5", "--init", "m.pt", "--out", "new", "--epochs", "1", "--bsize", "16",
                               "--min-train-masks", "0"], ["m.pt", "not a Cellpose model"], slow=True)
def _(r):
    _cache(r)
    _torch_file(r / "m.pt")


@case("train-corrupt-chunk", ["train", "c.h5", "--out", "new", "--epochs", "1", "--bsize", "16",
                              "--min-train-masks", "0"], ["c.h5", "corrupt"], slow=True)
def _(r):
    _garble_chunk(_cache(r), index=3)


@case("train-resume-truncated", ["train", "c.h5", "--out", "new", "--epochs", "2", "--bsize", "16",
                                 "--min-train-masks", "0", "--resume"], ["resume.pt", "truncated or corrupt"],
      slow=True)
def _(r):
    _cache(r)
    (r / "new_checkpoints").mkdir()
    _torch_file(r / "new_checkpoints" / "resume.pt")
