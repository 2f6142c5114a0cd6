"""Patches and the HDF5 patch cache: window counts, schema, reuse, crash safety, bad input."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

import dqtool.data.cache as cache_mod
import dqtool.data.cache_build as cache_build_mod
from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import (PatchOptions, build_cache, build_cache_from_arrays, build_cache_from_folders,
                                     prepare_image)
from dqtool.data.datasets import open_dataset
from dqtool.data.io import relabel_consecutive
from dqtool.common.errors import InputError
from dqtool.data.patches import iter_patches, window_starts


def _independent_count(h, w, size=224, stride=112, edge="drop"):
    """Window count written from the rule, not from the patch code."""
    def axis(n):
        if edge == "drop":
            return 0 if n < size else (n - size) // stride + 1
        if n <= size:
            return 1
        k = (n - size) // stride + 1
        return k + (1 if (n - size) % stride else 0)
    return axis(h) * axis(w)


def test_cyto_ctc_window_counts_match_the_rule(real_data, tmp_path):
    ds = open_dataset(real_data / "cyto_ctc")
    shapes = [s.image.shape[:2] for s in ds]
    want_drop = sum(_independent_count(h, w, edge="drop") for h, w in shapes)
    want_shift = sum(_independent_count(h, w, edge="shift") for h, w in shapes)
    assert (want_drop, want_shift) == (544, 702)  # 6 x 8^2 + 4 x 5x8; 6 x 9^2 + 4 x 6x9
    r = build_cache(ds, tmp_path / "drop.h5", PatchOptions(edge="drop"), quiet=True)
    assert r.n_patches == want_drop
    r = build_cache(ds, tmp_path / "shift.h5", PatchOptions(), quiet=True)
    assert r.n_patches == want_shift
    with PatchCache(tmp_path / "shift.h5") as c:
        assert len(c) == want_shift
        # every pixel of every source is covered by some window
        for si, (h, w) in enumerate(c.source_shape):
            cover = np.zeros((h, w), bool)
            for y, x in c.offsets[c.patch_source == si]:
                cover[y:y + 224, x:x + 224] = True
            assert cover.all()


def test_window_starts_rules():
    assert window_starts(336, 224, 112, "drop") == [0, 112]
    assert window_starts(700, 224, 112, "drop") == [0, 112, 224, 336, 448]
    assert window_starts(700, 224, 112, "shift") == [0, 112, 224, 336, 448, 476]
    assert window_starts(100, 224, 112, "drop") == []
    assert window_starts(100, 224, 112, "shift") == [0]
    assert window_starts(300, 224, 112, "pad") == [0, 112]
    assert window_starts(224, 224, 112, "shift") == [0]


def test_patch_contents_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 260), dtype=np.uint8)
    lab = np.zeros((300, 260), np.int32)
    lab[10:50, 10:50] = 17
    lab[250:290, 200:250] = 5
    path = build_cache_from_arrays(tmp_path / "a.h5", [img], [lab], ["a"], size=224, stride=112)
    with PatchCache(path) as c:
        assert c.has_labels and len(c) == 4  # 300 -> [0, 76]; 260 -> [0, 36]
        prepared = prepare_image(img)
        for i, (y, x) in enumerate(c.offsets):
            assert np.array_equal(c.images([i])[0, ..., 0], prepared[..., 0][y:y + 224, x:x + 224])
            lp = c.labels([i])[0]
            ref = lab[y:y + 224, x:x + 224]
            assert np.array_equal(lp > 0, ref > 0)
            assert lp.max() == len(np.unique(ref)) - 1  # renumbered per patch, consecutive
        # reader API: any order, repeats, torch
        batch = c.images([3, 0, 3])
        assert np.array_equal(batch[0], batch[2]) and batch.shape == (3, 224, 224, 1)
        t = c.torch_images([1, 2])
        assert tuple(t.shape) == (2, 1, 224, 224) and float(t.max()) <= 1.0
        with pytest.raises(InputError, match="outside the cache"):
            c.images([4])


def test_small_image_is_padded_not_dropped(tmp_path):
    img = np.full((100, 150), 200, np.uint8)
    img[0, 0] = 0
    lab = np.zeros((100, 150), np.uint8)
    lab[20:40, 20:40] = 1
    path = build_cache_from_arrays(tmp_path / "s.h5", [img], [lab], ["s"])
    with PatchCache(path) as c:
        assert len(c) == 1
        patch = c.images([0])[0, ..., 0]
        assert patch.shape == (224, 224) and (patch[100:, :] == 0).all() and (patch[:, 150:] == 0).all()
    # --edge drop (the paper's code) gives no patch from a small image: refused, never silently skipped
    with pytest.raises(InputError, match="smaller than the 224-px window with --edge drop"):
        build_cache_from_arrays(tmp_path / "d.h5", [img], [lab], ["s"], edge="drop")
    assert not (tmp_path / "d.h5").exists()


def test_rgba_and_16bit_are_normalised(tmp_path):
    rgba = np.zeros((224, 224, 4), np.uint8)
    rgba[..., 0] = np.arange(224)[None, :]
    rgba[..., 3] = 255
    sixteen = (np.arange(224 * 224).reshape(224, 224) * 1.3).astype(np.uint16)
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(rgba).save(d / "a.png")
    Image.fromarray(sixteen).save(d / "b.png")
    report = build_cache(open_dataset(d), tmp_path / "c.h5", PatchOptions(channels="rgb"), quiet=True)
    with PatchCache(report.path) as c:
        a, b = c.images([0, 1])
        assert a.shape == (224, 224, 3) and a[..., 0].max() == 255
        assert b[..., 0].max() == 255 and b[..., 0].min() == 0 and not c.has_labels


def test_reuse_and_rebuild_with_reason(real_data, tmp_path):
    src = real_data / "multi_neurips"
    out = tmp_path / "m.h5"
    r1 = build_cache_from_folders([src], out, quiet=True)
    assert r1.action == "built"
    mtime = os.stat(out).st_mtime_ns
    r2 = build_cache_from_folders([src], out, quiet=True)
    assert r2.action == "reused" and os.stat(out).st_mtime_ns == mtime
    r3 = build_cache_from_folders([src], out, options=PatchOptions(stride=100), quiet=True)
    assert r3.action == "rebuilt" and "stride 112 -> 100" in r3.reason
    r4 = build_cache_from_folders([src], out, domains=["other"], options=PatchOptions(stride=100), quiet=True)
    assert r4.action == "rebuilt" and "input" in r4.reason
    with PatchCache(out) as c:
        assert set(c.domain_of_patch) == {"other"}


def test_killed_build_leaves_no_complete_cache_and_keeps_the_old_one(real_data, tmp_path, monkeypatch):
    src = real_data / "multi_neurips"
    out = tmp_path / "m.h5"
    build_cache_from_folders([src], out, quiet=True)
    before = out.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt  # stands in for a kill in the middle of writing

    monkeypatch.setattr(cache_build_mod, "iter_patches", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cache_from_folders([src], out, options=PatchOptions(stride=64), quiet=True)
    assert out.read_bytes() == before  # the old cache survives untouched
    assert not list(tmp_path.glob("*.tmp-*"))  # and the partial file is cleaned up


def test_incomplete_and_truncated_files_are_rejected(real_data, tmp_path):
    out = tmp_path / "m.h5"
    build_cache_from_folders([real_data / "multi_neurips"], out, quiet=True)
    partial = tmp_path / "partial.h5"
    partial.write_bytes(out.read_bytes())
    with h5py.File(partial, "r+") as h5:
        h5.attrs["complete"] = 0  # what a killed writer leaves behind in its temp file
    with pytest.raises(InputError, match="incomplete"):
        PatchCache(partial)
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(out.read_bytes()[: os.path.getsize(out) // 3])
    with pytest.raises(InputError, match="truncated or corrupt"):
        PatchCache(truncated)
    # a file dqtool cannot read is not recognisably its own: refused, never overwritten (issue 19)
    before = truncated.read_bytes()
    with pytest.raises(InputError, match="not written by dqtool"):
        build_cache_from_folders([real_data / "multi_neurips"], truncated, quiet=True)
    assert truncated.read_bytes() == before
    r = build_cache_from_folders([real_data / "multi_neurips"], partial, quiet=True)
    assert r.action == "rebuilt" and "incomplete" in r.reason


def test_shape_mismatch_and_mixed_labels(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(d / "000_img.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(d / "000_masks.png")
    with pytest.raises(InputError, match="does not match image"):
        build_cache(open_dataset(d), tmp_path / "x.h5", quiet=True)
    assert not (tmp_path / "x.h5").exists()


def test_output_in_missing_folder(real_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        build_cache_from_folders([real_data / "multi_neurips"], tmp_path / "nope" / "c.h5", quiet=True)


def test_derived_group_roundtrip_and_incomplete_group(tmp_path):
    path = build_cache_from_arrays(tmp_path / "a.h5", [np.zeros((224, 224), np.uint8)], None, ["a"])
    with PatchCache(path) as c:
        assert c.read_group("features") is None
        c.write_group("features", {"features": np.ones((1, 4), np.float32)}, {"encoder_hash": "abc", "cfg": {"a": 1}})
        arrays, attrs = c.read_group("features")
        assert arrays["features"].shape == (1, 4) and attrs["encoder_hash"] == "abc"
        assert json.loads(attrs["cfg"]) == {"a": 1}
        assert len(c) == 1  # reopened for reading after the write
    with h5py.File(path, "r+") as h5:
        h5["derived/features"].attrs["complete"] = 0
    with PatchCache(path) as c:
        assert c.read_group("features") is None


def test_iter_patches_labels_consecutive():
    lab = np.zeros((10, 10), np.uint32)
    lab[0:3, 0:3] = 50
    lab[6:9, 6:9] = 90
    out = list(iter_patches(np.zeros((10, 10)), lab, size=5, stride=5, edge="drop"))
    assert len(out) == 4
    assert out[0][3].max() == 1 and out[3][3].max() == 1


# ----------------------------------------------------------------------------------------------
# label storage dtype and the raw-chunk read path (checked against h5py's own reads)


def _labelled_pair(shape=(300, 260), seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, shape, dtype=np.uint8)
    lab = np.zeros(shape, np.int32)
    for k in range(1, 40):
        y, x = rng.integers(0, shape[0] - 20), rng.integers(0, shape[1] - 20)
        lab[y:y + 20, x:x + 20] = k
    return img, lab


@pytest.mark.parametrize("codec", ["gzip", "lzf", "none"])
def test_reads_match_h5py_for_every_codec(tmp_path, codec, monkeypatch):
    from dqtool.data.datasets import ArraySample, Dataset

    img, lab = _labelled_pair()
    samples = [ArraySample(name=f"s{i}", domain="d", array=np.roll(img, 7 * i, axis=1),
                           label_array=relabel_consecutive(np.roll(lab, 7 * i, axis=1))) for i in range(3)]
    raw_reads = []
    take_raw = PatchCache._take_raw
    monkeypatch.setattr(PatchCache, "_take_raw", lambda self, d, *a: raw_reads.append(d.name) or take_raw(self, d, *a))
    out = tmp_path / f"{codec}.h5"
    build_cache([Dataset(samples=samples, root=tmp_path, format="arrays")], out,
                PatchOptions(size=64, stride=48, compression=codec), quiet=True)
    with h5py.File(out, "r") as h5:
        ref_img, ref_lab = h5["images"][()], h5["labels"][()]
        assert h5["labels"].dtype == np.uint16  # 64 * 64 < 65536
        assert h5["images"].compression == (None if codec == "none" else codec)
    n = ref_img.shape[0]
    assert n > 30 and ref_lab.max() > 5
    rng = np.random.default_rng(1)
    orders = [rng.permutation(n), rng.integers(0, n, 3 * n), np.array([5, 5, 0, n - 1, 5]), np.arange(n),
              np.array([], np.int64)]
    with PatchCache(out) as c:
        for idx in orders:
            got_img, got_lab = c.images(idx), c.labels(idx)
            assert got_img.dtype == np.uint8 and got_lab.dtype == np.uint32
            assert np.array_equal(got_img, ref_img[idx]) and np.array_equal(got_lab, ref_lab[idx].astype(np.uint32))
    # the raw-chunk path serves gzip and uncompressed caches; lzf goes through h5py
    assert bool(raw_reads) == (codec != "lzf") and set(raw_reads) <= {"/images", "/labels"}


def test_raw_path_is_taken_only_where_it_applies(tmp_path):
    data = np.random.default_rng(0).integers(0, 9, (5, 16, 16), dtype=np.uint16)
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        kw = dict(data=data, chunks=(1, 16, 16))
        h5.create_dataset("gzip", compression="gzip", **kw)
        h5.create_dataset("none", **kw)
        h5.create_dataset("lzf", compression="lzf", **kw)
        h5.create_dataset("shuffle", compression="gzip", shuffle=True, **kw)
        h5.create_dataset("two_per_chunk", data=data, chunks=(2, 16, 16), compression="gzip")
        h5.create_dataset("contiguous", data=data)
        assert cache_mod._raw_codec(h5["gzip"]) == "gzip" and cache_mod._raw_codec(h5["none"]) == "none"
        for name in ("lzf", "shuffle", "two_per_chunk", "contiguous"):
            assert cache_mod._raw_codec(h5[name]) is None, name


def _copy_cache_with_labels(src, dst, labels_data, **create):
    """A copy of cache ``src`` whose /labels dataset is rewritten from ``labels_data`` with ``create`` options."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as h5:
        del h5["labels"]
        h5.create_dataset("labels", data=labels_data, **create)


def test_old_uint32_and_big_endian_label_caches_still_read(tmp_path):
    img, lab = _labelled_pair()
    path = build_cache_from_arrays(tmp_path / "a.h5", [img], [lab], ["a"], size=128, stride=64)
    with PatchCache(path) as c:
        want = c.labels(range(len(c)))
    assert want.dtype == np.uint32 and want.max() > 5
    size = want.shape[1]
    variants = {"u32_gzip": dict(dtype=np.uint32, compression="gzip", compression_opts=1),
                "u32_none": dict(dtype=np.uint32), "be_u16_gzip": dict(dtype=">u2", compression="gzip"),
                "u16_shuffle": dict(dtype=np.uint16, compression="gzip", shuffle=True)}
    for name, opts in variants.items():
        dst = tmp_path / f"{name}.h5"
        _copy_cache_with_labels(path, dst, want.astype(opts.pop("dtype")), chunks=(1, size, size), **opts)
        with PatchCache(dst) as c:
            idx = [3, 0, 3, len(c) - 1]
            got = c.labels(idx)
            assert got.dtype == np.uint32 and np.array_equal(got, want[idx]), name


def test_label_dtype_rule():
    assert cache_mod.label_dtype(224) == np.uint16 and cache_mod.label_dtype(255) == np.uint16
    assert cache_mod.label_dtype(256) == np.uint32  # 256 * 256 ids would overflow uint16


def test_unfiltered_chunk_falls_back_to_h5py(tmp_path):
    """A chunk whose filter mask says 'deflate skipped' holds plain bytes: read through h5py."""
    data = np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8)
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as h5:
        d = h5.create_dataset("x", data=data, chunks=(1, 8, 8), compression="gzip")
        d.id.write_direct_chunk((2, 0, 0), data[2].tobytes(), filter_mask=1)
    with h5py.File(path, "r") as h5:
        ref = h5["x"][()]
        assert h5["x"].id.read_direct_chunk((2, 0, 0))[0] == 1
    assert np.array_equal(ref, data)
    with h5py.File(path, "r") as h5:
        holder = PatchCache.__new__(PatchCache)
        holder.path, holder._executor = path, None
        out = np.empty((4, 8, 8), np.uint8)
        try:
            holder._take_raw(h5["x"], "gzip", np.array([2, 1, 2, 3]), out)
        finally:
            holder._executor and holder._executor.shutdown()
    assert np.array_equal(out, data[[2, 1, 2, 3]])


def test_corrupt_chunk_is_one_input_error(tmp_path):
    img, lab = _labelled_pair()
    path = build_cache_from_arrays(tmp_path / "a.h5", [img], [lab], ["a"], size=64, stride=64)
    with h5py.File(path, "r+") as h5:
        h5["images"].id.write_direct_chunk((1, 0, 0, 0), b"not deflate data")
    with PatchCache(path) as c:
        assert c.images([0]).shape == (1, 64, 64, 1)
        with pytest.raises(InputError, match=r"a\.h5: cannot read /images \(patch 1\): a corrupt or truncated chunk"):
            c.images([0, 1])


def test_index_arrays_load_lazily_and_after_close(tmp_path):
    img, lab = _labelled_pair()
    path = build_cache_from_arrays(tmp_path / "a.h5", [img], [lab], ["a"], domain="dom", size=128, stride=64)
    with h5py.File(path, "r") as h5:
        want_offsets, want_src = h5["patch_offset"][()], h5["patch_source"][()]
    c = PatchCache(path)
    assert "offsets" not in vars(c)  # nothing read at open
    assert np.array_equal(c.offsets, want_offsets)
    c.close()
    # first use after close reopens the file for the read
    assert np.array_equal(c.patch_source, want_src) and list(c.domain_of_patch) == ["dom"] * len(want_src)
    assert list(c.source_shape[0]) == [300, 260]
