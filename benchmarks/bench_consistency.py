"""Consistency benchmarks (pytest-benchmark): each kernel against the outside alternative, same run.

* adapted Rand on a 2048 x 2048 pair with ~3,000 instances: dqtool's numba pass (boundary band,
  row/column sums, hashed contingency counts, no scipy.sparse) vs ``skimage.metrics.adapted_rand_error``
  on the full maps (no band; scikit-image's scipy.sparse contingency table), and vs scikit-image on the
  band-restricted pixels dqtool scores (``rand_pixels``; the same number to 1e-9).
* batched NHD + EI over (4 models x 2 perturbations x 8 images) of 512 x 512 in one call vs the
  per-image NumPy loop a user would write.
* ranking overhead: ``rank_models`` wall time beyond the two Cellpose inferences per model and image.

Speed-ups land in ``extra_info`` (``speedup``) and are printed; nothing asserts a wall-clock time.
The Triton paths need a CUDA device and are not benchmarked here (the interpreter is not a GPU).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.segmentation import expand_labels

from dqtool.ranking import consistency as C


def best_of(fn, rounds=5):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def cell_map(size=2048, n=3000, radius=14, seed=0):
    """Cellpose-like instance map: n cells of radius ~14 px, ~35% foreground, touching in places."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    seeds.flat[rng.choice(size * size, n, replace=False)] = np.arange(1, n + 1)
    return expand_labels(seeds, radius)


@pytest.fixture(scope="module")
def rand_pair():
    u = cell_map()
    # the "perturbed" prediction: shifted one pixel, eroded by one, every 10th cell split in two
    v = ndimage.shift(u, (1, -1), order=0)
    v = np.where(ndimage.binary_erosion(v > 0), v, 0).astype(np.int32)
    split = (v % 10 == 0) & (v > 0) & (np.arange(v.shape[1])[None, :] % 16 < 8)
    v[split] += u.max() + 1
    return u, v


def test_adapted_rand_2048(benchmark, rand_pair):
    u, v = rand_pair
    n_instances = len(np.unique(u)) - 1
    got = benchmark.pedantic(lambda: C.adapted_rand(u, v, device="cpu"), rounds=10, iterations=1, warmup_rounds=1)
    t_ours = benchmark.stats.stats.min
    t_full, full = best_of(lambda: adapted_rand_error(u, v, ignore_labels=None), rounds=5)

    def skimage_on_region():
        ur, vr = C.rand_pixels(u, v)
        return 1.0 - adapted_rand_error(ur, vr, ignore_labels=None)[0]

    t_region, want = best_of(skimage_on_region, rounds=5)
    assert got == pytest.approx(want, abs=1e-9)
    benchmark.extra_info.update({
        "instances": n_instances, "pixels": u.size, "skimage_full_s": t_full, "skimage_region_s": t_region,
        "speedup": t_full / t_ours, "speedup_vs_skimage_region": t_region / t_ours})
    print(f"\nadapted Rand 2048^2, {n_instances} instances: dqtool {t_ours * 1e3:.1f} ms, skimage full map "
          f"{t_full * 1e3:.1f} ms ({t_full / t_ours:.1f}x), skimage on R {t_region * 1e3:.1f} ms "
          f"({t_region / t_ours:.1f}x)")
    assert full[0] >= 0


def smooth_probabilities(shape, seed):
    rng = np.random.default_rng(seed)
    logits = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(0,) * (len(shape) - 2) + (6, 6))
    return (1 / (1 + np.exp(-40 * logits))).astype(np.float32)


@pytest.fixture(scope="module")
def semantic_batch():
    models, perts, images, size = 4, 2, 8, 512
    prob = smooth_probabilities((models, images, size, size), seed=1)
    noise = smooth_probabilities((models, perts, images, size, size), seed=2)
    pert = np.clip(0.85 * prob[:, None] + 0.15 * noise, 0, 1).astype(np.float32)
    return prob, pert


def numpy_loop(prob, pert):
    models, perts, images = pert.shape[:3]
    nhd = np.empty((models, perts, images))
    ei = np.empty_like(nhd)
    for m in range(models):
        for k in range(perts):
            for i in range(images):
                p, q = prob[m, i], pert[m, k, i]
                f, g = p > 0.5, q > 0.5
                union = f | g
                n = np.count_nonzero(union)
                nhd[m, k, i] = 1 - np.count_nonzero(f ^ g) / n
                ei[m, k, i] = np.sqrt(p * q, where=f & g, out=np.zeros_like(p)).sum() / n
    return nhd, ei


def test_semantic_batch(benchmark, semantic_batch):
    prob, pert = semantic_batch
    out = benchmark.pedantic(lambda: C.semantic_consistency(prob[:, None], pert, device="cpu"), rounds=10,
                             iterations=1, warmup_rounds=1)
    t_ours = benchmark.stats.stats.min
    t_loop, (nhd, ei) = best_of(lambda: numpy_loop(prob, pert), rounds=3)
    np.testing.assert_allclose(out.nhd, nhd, atol=1e-12)
    np.testing.assert_allclose(out.effective_invariance, ei, rtol=1e-5)
    benchmark.extra_info.update({"pairs": int(nhd.size), "pixels_per_pair": int(prob[0, 0].size),
                                 "numpy_loop_s": t_loop, "speedup": t_loop / t_ours})
    print(f"\nNHD+EI, {nhd.size} pairs of 512^2: dqtool {t_ours * 1e3:.1f} ms, NumPy loop {t_loop * 1e3:.1f} ms "
          f"({t_loop / t_ours:.1f}x)")


@pytest.fixture(scope="module")
def rank_bank(tmp_path_factory, real_data):
    """3 Cellpose networks (random weights, cellprob centred) and 6 real 256 x 256 crops (cyto_ctc)."""
    import tifffile
    import torch
    from cellpose.resnet_torch import CPnet

    from dqtool.data.io import read_image

    root = tmp_path_factory.mktemp("rank_bank")
    models, images = root / "models", root / "images"
    models.mkdir()
    images.mkdir()
    for s in range(3):
        torch.manual_seed(s)
        net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
        with torch.no_grad():
            net.output[2].bias[2] -= net(torch.rand(1, 2, 64, 64))[0][0, 2].median()
        torch.save(net.state_dict(), models / f"model{s}.pth")
    for path in sorted((real_data / "cyto_ctc" / "images").glob("*.tif"))[:6]:
        img = read_image(path)
        h, w = img.shape[:2]
        tifffile.imwrite(images / path.name, img[h // 2 - 128:h // 2 + 128, w // 2 - 128:w // 2 + 128])
    return root


def test_rank_overhead(benchmark, rank_bank, tmp_path):
    from dqtool.ranking.rank import rank_models

    result = benchmark.pedantic(lambda: rank_models(rank_bank / "models", rank_bank / "images", out=tmp_path / "out",
                                                    quiet=True), rounds=1, iterations=1)
    inference, total = result.timing["inference_s"], result.timing["total_s"]
    overhead = (total - inference) / inference
    benchmark.extra_info.update({"models": 3, "images": 6, "inference_s": inference, "total_s": total,
                                 "overhead_fraction": overhead})
    print(f"\nrank 3 models x 6 images 256^2 (dropout): total {total:.1f} s, Cellpose inferences {inference:.1f} s, "
          f"overhead {100 * overhead:.1f}%")
    assert len(result.ranked) == 3
