"""Synthetic test inputs shared by the test folders (one generator per kind of input).

Every generator is seeded and returns the same arrays for the same arguments. Import them as
``from factories import ...`` (``tests/`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import numpy as np


def label_map_pairs(dtype=np.int32, max_id=5, width=10, max_height=12):
    """Hypothesis strategy: pairs of small random label maps (same shape), ids 0..max_id."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    return st.integers(2, max_height).flatmap(
        lambda h: st.tuples(hnp.arrays(dtype, (h, width), elements=st.integers(0, max_id)),
                            hnp.arrays(dtype, (h, width), elements=st.integers(0, max_id))))


def touching_cells(shape, n, seed, background="holes", dtype=np.uint32, gap=0.25):
    """Voronoi-like touching instances from ``n`` random seeds (nearest-seed labelling), ids 1..n.

    ``background``: 'holes' sets 5 % of the pixels, at random, to 0; 'gaps' sets to 0 the pixels
    farther from their seed (squared distance) than ``gap`` times the mean cell area (background between cells).
    """
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, size=(n, 2)) * np.array(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    lab = (np.argmin(d, axis=-1) + 1).astype(dtype)
    if background == "holes":
        lab[rng.uniform(size=shape) < 0.05] = 0
    elif background == "gaps":
        lab[d.min(axis=-1) > (shape[0] * shape[1] / n) * gap] = 0
    else:
        raise ValueError(f"background must be 'holes' or 'gaps', got {background!r}")
    return lab


def grown_seeds(shape, n, seed, hole=0.05, radius=4):
    """Instance map of ``n`` random seed pixels grown by ``radius`` px (expand_labels), with background holes."""
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    idx = rng.choice(lab.size, n, replace=False)
    lab.flat[idx] = np.arange(1, n + 1)
    return (expand_labels(lab, radius) * (rng.random(shape) > hole)).astype(np.int32)


def disc_images(n_images=2, size=128, n_cells=24, radius=(5.0, 8.0), seed=0):
    """Bright non-overlapping discs on a noisy background (uint8 images) and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n_images):
        lab = np.zeros((size, size), np.uint32)
        img = rng.normal(20, 5, (size, size))
        k = 0
        for _ in range(n_cells * 6):
            r = rng.uniform(*radius)
            cy, cx = rng.uniform(r, size - r, 2)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if lab[m].any():
                continue
            k += 1
            lab[m] = k
            img[m] += rng.uniform(120, 200)
            if k == n_cells:
                break
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(lab)
    return images, labels


def disc_folder(folder, n_images, size=64, n_cells=5, radius=(4.0, 6.0), seed=0):
    """``folder`` (created) in Cellpose's layout, ``NNN_img.png`` and ``NNN_masks.png``, of :func:`disc_images`."""
    from dqtool.data.io import write_image_png

    folder.mkdir(parents=True)
    images, labels = disc_images(n_images=n_images, size=size, n_cells=n_cells, radius=radius, seed=seed)
    for i, (im, lb) in enumerate(zip(images, labels)):
        write_image_png(folder / f"{i:03d}_img.png", im)
        write_image_png(folder / f"{i:03d}_masks.png", lb.astype(np.uint16))
    return folder


def blob_image(seed, size=64):
    """Six Gaussian blobs in [0, 1] (float32): a soft fluorescence-like image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.float32)
    for _ in range(6):
        cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(4, 8)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 0, 1)


def noise_cache(path, n_images=3, shape=(48, 40), size=16, stride=8, labels=True, seed=0, names=None):
    """A small labelled patch cache of uniform-noise images (labels: thresholded noise, one id per image)."""
    from dqtool.data.cache_build import build_cache_from_arrays

    rng = np.random.default_rng(seed)
    imgs = [(rng.random(shape) * 255).astype(np.uint8) for _ in range(n_images)]
    labs = [(rng.random(shape) > 0.6).astype(np.uint16) * (k + 1) for k in range(n_images)] if labels else None
    names = names or [f"img{k}" for k in range(n_images)]
    return build_cache_from_arrays(path, imgs, labs, names, size=size, stride=stride)


def store_features(cache_path, features, npy_path=None):
    """Store a user feature matrix in the cache (``dqtool embed --features``); returns the cache path."""
    from dqtool.features.embed import embed_cache

    npy_path = npy_path or cache_path.with_suffix(".npy")
    np.save(npy_path, np.asarray(features))
    embed_cache(cache_path, features_file=npy_path)
    return cache_path
