"""Pictures of a selection: a 2-D embedding of all features with DQ and random picks (like the paper's
Fig. 3) and a grid of selected patches next to random ones (like Fig. 2).

The embedding is PCA (deterministic: SVD of the centred features, each axis' sign fixed so that its
largest-magnitude loading is positive), which keeps the picture reproducible byte for byte; the paper
uses t-SNE. Background points are coloured by DQ bin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dqtool.common.figures import pyplot, save_figure
from dqtool.data.cache import PatchCache


def pca_2d(features: np.ndarray) -> np.ndarray:
    """(N, 2) projection on the two leading principal axes (signs fixed for determinism)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    if x.shape[0] < 2 or x.shape[1] < 2:
        return np.column_stack([x[:, 0] if x.shape[1] else np.zeros(len(x)), np.zeros(len(x))])
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    return x @ (axes * np.where(signs == 0, 1.0, signs)[:, None]).T


def plot_embedding(features, dq, rnd, bin_of, path, label: str = "DQ") -> Path:
    """Scatter of all patches (coloured by bin) with the DQ (red; or ``label``'s) and random (gold) picks on top."""
    plt = pyplot()
    xy = pca_2d(features)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.scatter(xy[:, 0], xy[:, 1], c=bin_of, cmap="tab10", s=8, alpha=0.5, linewidths=0)
    ax.scatter(xy[rnd, 0], xy[rnd, 1], s=22, c="goldenrod", marker="o", label=f"random ({len(rnd)})")
    ax.scatter(xy[dq, 0], xy[dq, 1], s=22, c="red", marker="^", label=f"{label} ({len(dq)})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Features (PCA), background coloured by DQ bin")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    return save_figure(fig, path)


def _spread(indices: np.ndarray, k: int) -> np.ndarray:
    """Up to k indices evenly spaced through ``indices`` (deterministic)."""
    if len(indices) <= k:
        return np.asarray(indices)
    return np.asarray(indices)[np.linspace(0, len(indices) - 1, k).round().astype(int)]


def plot_patch_grid(cache: PatchCache, dq, rnd, path, per_side: int = 16, label: str = "DQ") -> Path:
    """DQ (or ``label``'s) patches (left) next to random patches (right), up to ``per_side`` each in a square grid."""
    plt = pyplot()
    a, b = _spread(dq, per_side), _spread(rnd, per_side)
    cols = int(np.ceil(np.sqrt(max(len(a), len(b), 1))))
    rows = int(np.ceil(max(len(a), len(b), 1) / cols))
    fig, axes = plt.subplots(rows, 2 * cols + 1, figsize=(2 * cols + 1, rows + 0.6), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for side, picks in ((0, a), (cols + 1, b)):
        imgs = cache.images(picks) if len(picks) else []
        for k, img in enumerate(imgs):
            ax = axes[k // cols, side + k % cols]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title(label, loc="left", fontsize=9)
    axes[0, cols + 1].set_title("random", loc="left", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    return save_figure(fig, path)


def plot_selection(cache_path, features, dq, rnd, bin_of, out_dir, suffix: str = "", label: str = "DQ") -> list[Path]:
    """Both pictures into ``out_dir``: ``embedding<suffix>.png`` and ``patches<suffix>.png`` (picks named ``label``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_embedding(features, dq, rnd, bin_of, out_dir / f"embedding{suffix}.png", label=label)]
    with PatchCache(cache_path) as cache:
        paths.append(plot_patch_grid(cache, dq, rnd, out_dir / f"patches{suffix}.png", label=label))
    return paths
