"""Patch cache benchmarks (pytest-benchmark): building, and reading random batches of 8 patches.

The outside alternative for reading is what a training loop does without a cache: decode the source
image (and its label file) and slice the window, for each of the 8 patches. Both run in the same session
on the real Cell Tracking Challenge images (../shared/data/real/cyto_ctc, LZW TIFFs) and on the embedded
default data. The codec benchmarks pick the cache's default compression: same batches, lzf vs gzip vs none;
``test_codec_subset_70`` reads a 10 % subset (70 patches) with PatchCache and with h5py per-patch reads.
"""

from __future__ import annotations

import numpy as np
import pytest

from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import PatchOptions, build_cache, prepare_image
from dqtool.data.datasets import open_dataset
from dqtool.data.io import read_image, read_labels, relabel_consecutive
from dqtool.data.synthetic import generate

BATCH = 8


@pytest.fixture(scope="module")
def cyto(real_data):
    return open_dataset(real_data / "cyto_ctc")


@pytest.fixture(scope="module")
def caches(cyto, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for codec in ("lzf", "gzip", "none"):
        out[codec] = build_cache(cyto, root / f"{codec}.h5", PatchOptions(compression=codec), quiet=True).path
    return out


def _batches(n, rounds=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.choice(n, BATCH, replace=False) for _ in range(rounds)]


def test_build_cache_cyto(benchmark, cyto, tmp_path):
    """Build the cyto_ctc cache (10 images, 702 patches with labels)."""
    def run():
        return build_cache(cyto, tmp_path / "b.h5", PatchOptions(), force=True, quiet=True)

    report = benchmark.pedantic(run, rounds=3, iterations=1)
    assert report.n_patches == 702


@pytest.mark.parametrize("codec", ["lzf", "gzip", "none"])
def test_codec_random_batch(benchmark, caches, codec):
    """Random batches of 8 (images + labels) from a cache written with each codec."""
    path = caches[codec]
    benchmark.extra_info["file_mb"] = round(path.stat().st_size / 2**20, 1)
    with PatchCache(path) as c:
        batches = iter(_batches(len(c), rounds=10_000))

        def read():
            idx = next(batches)
            return c.images(idx), c.labels(idx)

        imgs, labs = benchmark(read)
    assert imgs.shape == (BATCH, 224, 224, 1) and labs.shape == (BATCH, 224, 224)


def test_decode_and_slice_random_batch(benchmark, caches, cyto):
    """The alternative: decode each patch's source image + labels, normalise, slice, renumber."""
    with PatchCache(caches["lzf"]) as c:
        sources, offsets = c.patch_source, c.offsets
    by_index = [cyto[i] for i in range(len(cyto))]
    batches = iter(_batches(len(sources), rounds=10_000))

    def read():
        idx = next(batches)
        imgs, labs = [], []
        for i in idx:
            s = by_index[sources[i]]
            y, x = offsets[i]
            img = prepare_image(read_image(s.image_path))
            lab = read_labels(s.label_path)
            pad = ((0, max(0, y + 224 - img.shape[0])), (0, max(0, x + 224 - img.shape[1])))
            imgs.append(np.pad(img[..., 0], pad)[y:y + 224, x:x + 224])
            labs.append(relabel_consecutive(np.pad(lab, pad)[y:y + 224, x:x + 224]))
        return np.stack(imgs), np.stack(labs)

    imgs, labs = benchmark.pedantic(read, rounds=5, iterations=1)
    assert imgs.shape == (BATCH, 224, 224)


def test_build_cache_default_data(benchmark, tmp_path_factory):
    """Build the cache of the embedded default train splits (3 domains)."""
    root = generate(tmp_path_factory.mktemp("d") / "default", seed=0)
    datasets = [open_dataset(root / d) for d in ("fluo", "histo", "multi")]
    out = tmp_path_factory.mktemp("c") / "train.h5"
    report = benchmark.pedantic(lambda: build_cache(datasets, out, force=True, quiet=True), rounds=3, iterations=1)
    assert report.n_patches > 100


def _h5py_per_patch(c, name, idx, dtype):
    """The previous read path: h5py decodes each patch (one chunk) with its serial filter pipeline."""
    dset = c._h5[name]
    out = np.empty((len(idx),) + dset.shape[1:], dtype)
    for k, i in enumerate(idx):
        dset.read_direct(out, np.s_[int(i)], np.s_[k])
    return out


@pytest.mark.parametrize("codec", ["lzf", "gzip", "none"])
def test_codec_subset_70(benchmark, caches, codec):
    """A 10 % random subset (70 patches, images + labels as uint32): PatchCache vs h5py per-patch reads of
    the same file (interleaved rounds; min and median printed)."""
    import time

    path = caches[codec]
    idx = np.sort(np.random.default_rng(0).choice(702, 70, replace=False))
    with PatchCache(path) as c:
        def ours():
            return c.images(idx), c.labels(idx)

        def h5py_reads():
            return _h5py_per_patch(c, "images", idx, np.uint8), _h5py_per_patch(c, "labels", idx, np.uint32)

        got, ref = ours(), h5py_reads()
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref))
        times = {"dqtool": [], "h5py": []}
        for _ in range(15):
            for key, fn in (("dqtool", ours), ("h5py", h5py_reads)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        mins = {k: min(v) for k, v in times.items()}
        meds = {k: float(np.median(v)) for k, v in times.items()}
        benchmark.extra_info.update(labels_dtype=str(c._h5["labels"].dtype),
                                    file_mb=round(path.stat().st_size / 2**20, 1),
                                    **{f"{k}_min_ms": round(v * 1e3, 2) for k, v in mins.items()},
                                    **{f"{k}_median_ms": round(v * 1e3, 2) for k, v in meds.items()},
                                    speedup_min=round(mins["h5py"] / mins["dqtool"], 2))
        print(f"\n{codec}: 70 patches, PatchCache {mins['dqtool'] * 1e3:.1f} ms (median {meds['dqtool'] * 1e3:.1f}); "
              f"h5py per patch {mins['h5py'] * 1e3:.1f} ms (median {meds['h5py'] * 1e3:.1f}); "
              f"{mins['h5py'] / mins['dqtool']:.1f}x")
        benchmark(ours)
