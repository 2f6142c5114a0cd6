"""Property-based tests of the readers (issue 19): whatever the bytes, the only outcomes are a correct read
or dqtool's own InputError (never another exception, never a silently different array).

Inputs: random arrays written by tifffile and Pillow (random shapes, dtypes, photometric tags), random
bytes behind real file signatures, and truncations and byte flips of the real files of
``../shared/data/real`` (copied to a temporary folder, never changed in place). A few hundred examples run
in CI; ``-m slow`` runs a few thousand.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from dqtool.common.errors import InputError
from dqtool.data.datasets import open_dataset
from dqtool.data.io import read_image, read_labels, relabel_consecutive

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
#: Real files small enough for hundreds of reads: (path under REAL, reader).
REAL_FILES = [("multi_neurips/images/cell_00528.tif", "image"), ("multi_neurips/images/cell_00849.png", "image"),
              ("multi_neurips/labels/cell_00528_label.tiff", "labels"),
              ("multi_neurips/labels/cell_00849_label.tiff", "labels"),
              ("cyto_ctc/images/GOWT1_t21.tif", "image"), ("cyto_ctc/labels/HeLa_t13.tif", "labels")]

CI = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
SLOW = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def real_copies(tmp_path_factory):
    if not REAL.is_dir():
        pytest.skip(f"{REAL}: the real data set is not here")
    folder = tmp_path_factory.mktemp("real")
    out = []
    for rel, kind in REAL_FILES:
        target = folder / Path(rel).name
        shutil.copy(REAL / rel, target)
        target.chmod(0o644)
        out.append((target, kind, _read(target, kind)))
    return out


def _read(path: Path, kind: str) -> np.ndarray:
    return read_image(path) if kind == "image" else read_labels(path)


def _outcome(path: Path, kind: str):
    """The read array, or the InputError; any other exception fails the test."""
    try:
        return _read(path, kind)
    except InputError as exc:
        assert "\n" not in str(exc), f"an error of more than one line: {exc!r}"
        return exc


def _well_formed(arr, kind: str) -> None:
    assert isinstance(arr, np.ndarray)
    if kind == "image":
        assert arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3), arr.shape
        assert arr.dtype.kind in "uif"
        if arr.dtype.kind == "f":
            assert np.isfinite(arr).all()
    else:
        assert arr.ndim == 2 and arr.dtype == np.uint32
        ids = np.unique(arr)
        assert ids[0] >= 0 and (ids[ids > 0] == np.arange(1, (ids > 0).sum() + 1)).all()


# ----------------------------------------------------------------------------------------------
# real files, truncated and flipped


def _truncation(real, data, workdir: Path):
    path, kind, full = data.draw(st.sampled_from(real))
    raw = path.read_bytes()
    keep = data.draw(st.integers(0, len(raw)))
    target = workdir / f"t{path.suffix}"
    target.write_bytes(raw[:keep])
    got = _outcome(target, kind)
    if isinstance(got, np.ndarray):  # a truncation that lost no pixel (a PNG's IEND) must read the same
        np.testing.assert_array_equal(got, full)


def _flips(real, data, workdir: Path):
    path, kind, _ = data.draw(st.sampled_from(real))
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    target = workdir / f"f{path.suffix}"
    target.write_bytes(bytes(raw))
    got = _outcome(target, kind)
    if isinstance(got, np.ndarray):  # formats without checksums decode flipped pixels as pixels
        _well_formed(got, kind)


@CI
@given(data=st.data())
def test_truncated_real_files(real_copies, data):
    with tempfile.TemporaryDirectory() as tmp:
        _truncation(real_copies, data, Path(tmp))


@CI
@given(data=st.data())
def test_flipped_bytes_of_real_files(real_copies, data):
    with tempfile.TemporaryDirectory() as tmp:
        _flips(real_copies, data, Path(tmp))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_truncated_real_files_many(real_copies, data):
    with tempfile.TemporaryDirectory() as tmp:
        _truncation(real_copies, data, Path(tmp))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_flipped_bytes_of_real_files_many(real_copies, data):
    with tempfile.TemporaryDirectory() as tmp:
        _flips(real_copies, data, Path(tmp))


# ----------------------------------------------------------------------------------------------
# random bytes behind real signatures

SIGNATURES = {".tif": [b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00"], ".png": [b"\x89PNG\r\n\x1a\n"],
              ".bmp": [b"BM"], ".jpg": [b"\xff\xd8\xff\xe0"]}


def _random_bytes(data, workdir: Path):
    suffix = data.draw(st.sampled_from(sorted(SIGNATURES)))
    head = data.draw(st.sampled_from(SIGNATURES[suffix] + [b""]))
    body = data.draw(st.binary(max_size=512))
    target = workdir / f"r{suffix}"
    target.write_bytes(head + body)
    for kind in ("image", "labels"):
        got = _outcome(target, kind)
        if isinstance(got, np.ndarray):
            _well_formed(got, kind)


@CI
@given(data=st.data())
def test_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        _random_bytes(data, Path(tmp))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_random_bytes_many(data):
    with tempfile.TemporaryDirectory() as tmp:
        _random_bytes(data, Path(tmp))


# ----------------------------------------------------------------------------------------------
# random arrays written by tifffile and Pillow

DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_]


def _array(data) -> np.ndarray:
    dtype = np.dtype(data.draw(st.sampled_from(DTYPES)))
    shape = data.draw(st.sampled_from([(st.integers(1, 24), st.integers(1, 24)),
                                       (st.integers(1, 24), st.integers(1, 24), st.integers(1, 5)),
                                       (st.integers(1, 5), st.integers(5, 24), st.integers(5, 24)),
                                       (st.integers(1, 3), st.integers(1, 3), st.integers(2, 12),
                                        st.integers(2, 12))]))
    shape = tuple(data.draw(s) for s in shape)
    if dtype.kind == "f":
        elements = st.floats(-1e6, 1e6, width=dtype.itemsize * 8) | st.sampled_from([np.nan, np.inf, -np.inf])
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(int(info.min), -1000), min(int(info.max), 70000))
    return data.draw(hnp.arrays(dtype, shape, elements=elements))


def _write(data, arr: np.ndarray, workdir: Path) -> Path:
    """Write ``arr`` with tifffile (random photometric tags) or Pillow; returns the file."""
    pil_ok = (arr.ndim == 2 and arr.dtype in (np.uint8, np.bool_)) or (
        arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8)
    if pil_ok and data.draw(st.booleans()):
        path = workdir / "a.png"
        Image.fromarray(arr).save(path)
        return path
    kw = data.draw(st.sampled_from([{}, {"photometric": "minisblack"}, {"photometric": "rgb"}]))
    path = workdir / "a.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tifffile's notice about future defaults
        try:
            tifffile.imwrite(str(path), arr, **kw)
        except (ValueError, TypeError):  # tifffile refuses some combinations (rgb on 2-D): write plainly
            tifffile.imwrite(str(path), arr)
    return path


def _arrays(data, workdir: Path):
    arr = _array(data)
    path = _write(data, arr, workdir)
    got = _outcome(path, "image")
    if isinstance(got, InputError):
        return
    _well_formed(got, "image")
    want = arr.astype(np.uint8) * 255 if arr.dtype == np.bool_ else arr
    squeezed = np.squeeze(want)
    if squeezed.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3 and 1 not in arr.shape):
        np.testing.assert_array_equal(got, squeezed)  # gray and RGB read back exactly
    # (NaN/inf never come out: _well_formed; NaN only in a dropped alpha channel is no pixel of the image)


@CI
@given(data=st.data())
def test_random_arrays(data):
    with tempfile.TemporaryDirectory() as tmp:
        _arrays(data, Path(tmp))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_random_arrays_many(data):
    with tempfile.TemporaryDirectory() as tmp:
        _arrays(data, Path(tmp))


# ----------------------------------------------------------------------------------------------
# random label maps


def _labels(data, workdir: Path):
    from scipy import ndimage

    dtype = np.dtype(data.draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.uint32, np.int16])))
    shape = (data.draw(st.integers(2, 20)), data.draw(st.integers(2, 20)))
    top = data.draw(st.integers(1, 6))
    low = -1 if dtype.kind == "i" and data.draw(st.booleans()) else 0
    arr = data.draw(hnp.arrays(dtype, shape, elements=st.integers(low, top)))
    path = workdir / "l.tif"
    tifffile.imwrite(str(path), arr)
    got = _outcome(path, "labels")
    ids = np.unique(arr[arr != 0])
    if isinstance(got, InputError):
        binary = ids.size == 1 and ids[0] > 0 and ndimage.label(arr != 0, np.ones((3, 3)))[1] > 1
        assert arr.min() < 0 or binary, f"refused a valid instance map: {got}"
        return
    assert arr.min() >= 0
    _well_formed(got, "labels")
    np.testing.assert_array_equal(got, relabel_consecutive(arr))


@CI
@given(data=st.data())
def test_random_label_maps(data):
    with tempfile.TemporaryDirectory() as tmp:
        _labels(data, Path(tmp))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_random_label_maps_many(data):
    with tempfile.TemporaryDirectory() as tmp:
        _labels(data, Path(tmp))


# ----------------------------------------------------------------------------------------------
# random folders: which file is whose label


STEMS = ["a", "b", "001", "001_img", "a_masks", "a_label", "a_gt", "b_masks", "001_masks", "a_cp_masks",
         "a_flows", "b_label"]
FOLDERS = ["", "images/", "labels/"]


def _folders(data, workdir: Path):
    names = data.draw(st.sets(st.tuples(st.sampled_from(FOLDERS), st.sampled_from(STEMS),
                                        st.sampled_from([".tif", ".png"])), min_size=1, max_size=8))
    for folder, stem, suffix in names:
        (workdir / folder).mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8), 7, np.uint8)).save(workdir / f"{folder}{stem}{suffix}")
    try:
        ds = open_dataset(workdir)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    keys = [s.name for s in ds]
    assert len(set(keys)) == len(keys), f"two samples with one name: {keys}"
    labels = [s.label_path for s in ds if s.label_path is not None]
    assert len(set(labels)) == len(labels), f"one label file given to two images: {labels}"
    images = {Path(s.image_path) for s in ds}
    assert not images & set(labels), "a file read as both image and label"


@CI
@given(data=st.data())
def test_random_folders(data):
    with tempfile.TemporaryDirectory() as tmp:
        _folders(data, Path(tmp))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_random_folders_many(data):
    with tempfile.TemporaryDirectory() as tmp:
        _folders(data, Path(tmp))
