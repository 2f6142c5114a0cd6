"""Patch cache benchmarks (pytest-benchmark): building, and reading random batches of 8 patches.

The outside alternative for reading is what a training loop does without a cache: decode the source
image (and its label file) and slice the window, for each of the 8 patches. Both run in the same session
on the real Cell Tracking Challenge images (../shared/data/real/cyto_ctc, LZW TIFFs) and on the embedded
default data. The codec benchmarks pick the cache's default compression: same batches, lzf vs gzip vs none.
"""

from __future__ import annotations

import numpy as np
import pytest

from dqtool.cache import PatchCache, PatchOptions, build_cache, prepare_image
from dqtool.datasets import open_dataset
from dqtool.io import read_image, read_labels, relabel_consecutive
from dqtool.synthetic import generate

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
