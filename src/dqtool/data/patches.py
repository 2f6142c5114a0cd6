"""Sliding-window patches (the first paper, Section III.A: 224 x 224 windows, stride 112).

Window starts along one axis of length L, window size s, stride t:

- ``drop`` (the seed's released code): starts 0, t, 2t, ... while start + s <= L. The strip at the
  right/bottom that the stride misses is dropped, and an axis shorter than s gives no window.
- ``shift`` (default): the ``drop`` starts plus one edge-aligned window at L - s when the last start
  leaves pixels uncovered, so every pixel is in some window. An axis shorter than s gives one window at 0,
  and the image is zero-padded at the bottom/right to s (labels padded with background).
- ``pad``: starts 0, t, ..., (n - 1) t with n = ceil(max(L - s, 0) / t) + 1, and the image zero-padded at
  the bottom/right to (n - 1) t + s, so windows keep the stride exactly.

Label patches are renumbered to consecutive ids per patch (cells cut by the window stay partial).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from dqtool.data.io import relabel_consecutive

EDGE_MODES = ("shift", "drop", "pad")


def window_starts(length: int, size: int, stride: int, edge: str = "shift") -> list[int]:
    """Start offsets of the windows along one axis (see the module docstring for the rule)."""
    if size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be >= 1, got size={size}, stride={stride}")
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {EDGE_MODES}, got {edge!r}")
    if edge == "drop":
        return list(range(0, length - size + 1, stride)) if length >= size else []
    if edge == "pad":
        n = math.ceil(max(length - size, 0) / stride) + 1
        return [i * stride for i in range(n)]
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def padded_length(length: int, size: int, stride: int, edge: str) -> int:
    """The axis length after the bottom/right zero padding that ``edge`` implies."""
    if edge == "pad":
        n = math.ceil(max(length - size, 0) / stride) + 1
        return (n - 1) * stride + size
    if edge == "shift":
        return max(length, size)
    return length


def count_windows(shape: tuple[int, int], size: int, stride: int, edge: str = "shift") -> int:
    """Number of windows an (H, W) image gives."""
    return len(window_starts(shape[0], size, stride, edge)) * len(window_starts(shape[1], size, stride, edge))


def _pad_to(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    if arr.shape[0] >= height and arr.shape[1] >= width:
        return arr
    pad = [(0, max(height - arr.shape[0], 0)), (0, max(width - arr.shape[1], 0))]
    pad += [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant")


def iter_patches(image: np.ndarray, labels: np.ndarray | None, size: int = 224, stride: int = 112,
                 edge: str = "shift") -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """Yield (y, x, image_patch, label_patch) row by row; label patches renumbered 1..n per patch."""
    height, width = image.shape[:2]
    ys = window_starts(height, size, stride, edge)
    xs = window_starts(width, size, stride, edge)
    if not ys or not xs:
        return
    ph, pw = padded_length(height, size, stride, edge), padded_length(width, size, stride, edge)
    image = _pad_to(image, ph, pw)
    if labels is not None:
        labels = _pad_to(labels, ph, pw)
    for y in ys:
        for x in xs:
            img = image[y:y + size, x:x + size]
            lab = None if labels is None else relabel_consecutive(labels[y:y + size, x:x + size])
            yield y, x, img, lab
