"""How well a subset covers the feature space: the numbers behind the paper's t-SNE claim (Fig. 3).

For features f(x) of all N patches and a selected subset S:

    nearest(x)       = min_{s in S} ||f(x) - f(s)||            (Euclidean, not squared)
    covering radius  = max_{x in D} nearest(x)
    mean distance    = (1/N) sum_{x in D} nearest(x)

Selected patches count with nearest = 0. Smaller is better on both: a subset that spreads over the
feature space leaves no patch far from a selected one. The distances come from the fused distance +
row-min kernel (``dqtool_kernels.distances.min_sq_distances``), so no N x |S| matrix is held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dqtool_kernels.distances import min_sq_distances, sq_distances_reference


@dataclass(frozen=True)
class Coverage:
    n_selected: int
    covering_radius: float
    mean_distance: float

    def to_dict(self) -> dict:
        return asdict(self)


def nearest_selected_distances(features: np.ndarray, selected, device: str | None = "auto") -> np.ndarray:
    """nearest(x) for every row of ``features`` (float64 array of N Euclidean distances)."""
    idx = np.asarray(selected, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("coverage needs at least one selected patch")
    sq, _ = min_sq_distances(features, features[idx], device=device)
    near = np.sqrt(np.asarray(sq, dtype=np.float64))
    near[idx] = 0.0  # exact by definition; the expanded form leaves ~1e-8 of rounding there
    return near


def coverage(features: np.ndarray, selected, device: str | None = "auto") -> Coverage:
    """Covering radius and mean nearest-selected distance of ``selected`` (indices into ``features``)."""
    near = nearest_selected_distances(features, selected, device)
    return Coverage(n_selected=int(np.unique(np.asarray(selected)).size),
                    covering_radius=float(near.max()), mean_distance=float(near.mean()))


def coverage_reference(features: np.ndarray, selected) -> Coverage:
    """The same numbers from the full float64 distance matrix (small N only; defines the result)."""
    idx = np.asarray(selected, dtype=np.int64)
    near = np.sqrt(sq_distances_reference(features, features[idx]).min(axis=1))
    return Coverage(n_selected=int(np.unique(idx).size), covering_radius=float(near.max()),
                    mean_distance=float(near.mean()))
