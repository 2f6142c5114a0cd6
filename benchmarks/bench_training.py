"""Training benchmarks (pytest-benchmark), each a ratio against Cellpose measured in the same run.

* Overhead: ``dqtool.training.train`` from the patch cache (reading patches, preparing arrays, flows,
  seeding, the JSON/CSV/PNG record) against ``cellpose.train.train_seg`` on the same patches already in
  memory, same settings and seed: 16 patches of 224 px from the real cyto_ctc images, bsize 64, 5 epochs.
  Target: at most 5 % more time.
* Loading a subset: ``dqtool.training.load_patches`` (HDF5 cache, 10 % random subset of cyto_ctc's
  patches) against Cellpose's ``io.load_train_test_data`` (a) on the same patches written as a Cellpose
  training folder (``NNNN.tif`` + ``NNNN_masks.tif``, uncompressed) and (b) on the source images' own
  files in a Cellpose folder, then slicing the windows. Target: at least 10x faster.

Both use one torch thread: the 2 shared cores are oversubscribed here and OpenMP spinning makes torch's
2-thread runs erratic (up to 20x slower). Timings are the best of interleaved rounds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import PatchOptions, build_cache
from dqtool.data.datasets import open_dataset
from dqtool.segmentation.train import TrainConfig, load_patches, train
from dqtool.segmentation.model_files import build_net

ROUNDS = 3


@pytest.fixture(scope="module")
def cyto_cache(real_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "cyto.h5"
    return build_cache(open_dataset(real_data / "cyto_ctc"), path, PatchOptions(), quiet=True).path


def _best(fn, rounds=ROUNDS):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def test_training_overhead_vs_train_seg(benchmark, cyto_cache, tmp_path):
    """dqtool train (cache -> model + record) vs Cellpose train_seg on in-memory arrays, same work."""
    from cellpose.train import train_seg

    import json

    with PatchCache(cyto_cache) as c:
        labels = c.labels(range(len(c)))
        rich = np.nonzero([np.unique(lb).size > 6 for lb in labels])[0][:16]
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"indices": rich.tolist()}))
    images, labels, _ = load_patches(cyto_cache, rich)
    config = TrainConfig(n_epochs=5, bsize=64, batch_size=8, save_every=1000, min_train_masks=5)
    counter = iter(range(10 ** 6))

    def ours():
        train(cyto_cache, tmp_path / f"ours{next(counter)}", subset=subset, config=config, quiet=True)

    def theirs():
        torch.manual_seed(0)
        net = build_net(None)
        with torch.backends.mkldnn.flags(enabled=False):
            train_seg(net, train_data=[im[..., 0] for im in images], train_labels=[lb.copy() for lb in labels],
                      channels=[0, 0], normalize=True, SGD=True, learning_rate=0.1, weight_decay=1e-4,
                      n_epochs=config.n_epochs, bsize=config.bsize, batch_size=config.batch_size,
                      save_path=str(tmp_path), model_name=f"cp{next(counter)}", min_train_masks=5,
                      save_every=1000)

    ours(), theirs()  # warm-up: imports, numba, first-call kernels
    t_ours, t_theirs = [], []
    for _ in range(ROUNDS):  # interleaved, so both see the same machine load
        t_ours.append(_best(ours, 1))
        t_theirs.append(_best(theirs, 1))
    ratio = min(t_ours) / min(t_theirs)
    benchmark.extra_info.update(train_seg_s=round(min(t_theirs), 2), dqtool_s=round(min(t_ours), 2),
                                overhead_pct=round(100 * (ratio - 1), 1))
    print(f"\ntrain_seg {min(t_theirs):.2f} s, dqtool train {min(t_ours):.2f} s, overhead {100 * (ratio - 1):+.1f} %")
    benchmark.pedantic(ours, rounds=1, iterations=1)


def test_subset_load_vs_cellpose_io(benchmark, cyto_cache, real_data, tmp_path):
    """Read a 10 % subset from the cache vs Cellpose's load_train_test_data (a) on the same patches as
    files, (b) on the source images (their original files, copied into a Cellpose folder) + slicing."""
    import shutil

    import tifffile
    from cellpose import io as cpio

    with PatchCache(cyto_cache) as c:
        n = len(c)
        idx = np.sort(np.random.default_rng(0).choice(n, n // 10, replace=False))
        images, labels = c.images(idx), c.labels(idx)
        sources, offsets, size = c.patch_source[idx], c.offsets[idx], c.patch_size
    patches = tmp_path / "patches"
    patches.mkdir()
    for k, (im, lb) in enumerate(zip(images, labels)):
        tifffile.imwrite(patches / f"{k:04d}.tif", im[..., 0])
        tifffile.imwrite(patches / f"{k:04d}_masks.tif", lb.astype(np.uint16))
    originals = tmp_path / "sources"
    originals.mkdir()
    for k, sample in enumerate(open_dataset(real_data / "cyto_ctc")):
        shutil.copy(sample.image_path, originals / f"{k:03d}.tif")
        shutil.copy(sample.label_path, originals / f"{k:03d}_masks.tif")

    def ours():
        return load_patches(cyto_cache, idx)

    def cellpose_patches():
        return cpio.load_train_test_data(str(patches), mask_filter="_masks")

    def cellpose_sources():
        imgs, labs = cpio.load_train_test_data(str(originals), mask_filter="_masks")[:2]
        return ([imgs[s][y:y + size, x:x + size] for s, (y, x) in zip(sources, offsets)],
                [labs[s][y:y + size, x:x + size] for s, (y, x) in zip(sources, offsets)])

    got, ref = ours(), cellpose_patches()
    cellpose_sources()
    assert len(ref[0]) == len(got[0]) == idx.size
    assert all(np.array_equal(a[..., 0], b) for a, b in zip(got[0], ref[0]))
    times = {"dqtool": [], "patches": [], "sources": []}
    for _ in range(5):  # interleaved, so all see the same machine load
        times["dqtool"].append(_best(ours, 1))
        times["patches"].append(_best(cellpose_patches, 1))
        times["sources"].append(_best(cellpose_sources, 1))
    best = {k: min(v) for k, v in times.items()}
    benchmark.extra_info.update(n_patches=int(idx.size), **{f"{k}_s": round(v, 4) for k, v in best.items()},
                                speedup_vs_patch_files=round(best["patches"] / best["dqtool"], 2),
                                speedup_vs_source_images=round(best["sources"] / best["dqtool"], 2))
    print(f"\n{idx.size} patches: cache {best['dqtool'] * 1e3:.1f} ms; cellpose io on patch files "
          f"{best['patches'] * 1e3:.1f} ms ({best['patches'] / best['dqtool']:.1f}x); cellpose io on the source "
          f"images + slicing {best['sources'] * 1e3:.1f} ms ({best['sources'] / best['dqtool']:.1f}x)")
    benchmark(ours)
