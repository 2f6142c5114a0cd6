"""Consistency between an unperturbed and a perturbed prediction (CTE, paper 004, section 2.3).

Semantic scores compare foreground probabilities p (Cellpose: p = sigmoid(cellprob)) thresholded at
0.5, over the union U of the two foregrounds f = [p > 0.5], f' = [p' > 0.5]:

* NHD score (eq. 5): ``1 - |{x in U : f(x) != f'(x)}| / |U|`` (one minus the normalised Hamming
  distance, i.e. the fraction of union pixels that did not flip).
* Effective invariance (eq. 4): ``(1/|U|) sum_{x in U} [f(x) == f'(x)] sqrt(p(x) p'(x))``.

The instance score (eq. 6) is the adapted Rand F-score between the unperturbed map u and the
perturbed map v, restricted to R = (u > 0 or v > 0) minus the boundary band of u, the band the
paper's code removes::

    band(u) = {x : grey_dilation(u, cross)(x) != grey_erosion(u, cross)(x)}

(the inner boundary of every instance and the one-pixel ring of background just outside it, so a
perturbed prediction that grows or shrinks every cell by one pixel scores 1); a background pixel in
R gets its own singleton id. With n_ij the contingency counts on R and a_i, b_j its row and column
sums (pixel pairs)::

    F = sum_ij n_ij (n_ij - 1) / (0.5 sum_i a_i (a_i - 1) + 0.5 sum_j b_j (b_j - 1))

which equals ``1 - skimage.metrics.adapted_rand_error(u_R, v_R, ignore_labels=None)[0]`` on the
pixels of R (see :func:`rand_pixels`). An empty union (or a region with no pixel pairs) gives NaN;
an empty u against a non-empty v gives 0 (the formula). How a ranking counts an image where the
unperturbed map is empty is the ranking's rule (``empty`` of :func:`dqtool.ranking.rank.rank_bank`).

Single pairs: :func:`nhd`, :func:`effective_invariance`, :func:`adapted_rand`. Batched forms:
:func:`semantic_consistency` (any leading dims, broadcast, one kernel call) and
:func:`adapted_rand_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dqtool_kernels.consistency import boundary_band_reference, rand_pair_counts, semantic_counts

__all__ = [
    "nhd", "effective_invariance", "adapted_rand", "semantic_consistency", "adapted_rand_batch",
    "SemanticConsistency", "cellprob_to_probability", "rand_region", "rand_pixels",
]

THRESHOLD = 0.5


def cellprob_to_probability(cellprob: np.ndarray) -> np.ndarray:
    """Cellpose's cell-probability logit to a probability, ``p = 1 / (1 + exp(-cellprob))`` (float32)."""
    from scipy.special import expit

    return expit(np.asarray(cellprob, np.float32))


@dataclass(frozen=True)
class SemanticConsistency:
    """Batched semantic consistency: arrays of the broadcast leading shape."""

    nhd: np.ndarray
    effective_invariance: np.ndarray
    union: np.ndarray  # pixels in the union of both foregrounds (0 -> scores are NaN)

    def to_dict(self) -> dict:
        return {"nhd": self.nhd.tolist(), "effective_invariance": self.effective_invariance.tolist(),
                "union": self.union.tolist()}


def _check_probabilities(name: str, p) -> np.ndarray:
    p = np.asarray(p)
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{name}: expected foreground probabilities (float), got {p.dtype}")
    if p.ndim < 2:
        raise ValueError(f"{name}: expected (..., H, W) probability maps, got shape {p.shape}")
    return p


def semantic_consistency(prob, prob_perturbed, threshold: float = THRESHOLD,
                         device: str | None = "auto") -> SemanticConsistency:
    """NHD score (eq. 5) and effective invariance (eq. 4) for a whole batch in one kernel call.

    ``prob`` (..., H, W) holds the unperturbed maps and ``prob_perturbed`` (..., H, W) the perturbed
    ones; leading dims broadcast (numpy rules), so ``prob[:, None]`` of shape (models, 1, images, H, W)
    against (models, perturbations, images, H, W) scores every model x perturbation x image while
    each unperturbed map is read from its own copy, never repeated in memory.
    """
    if hasattr(prob, "detach"):  # torch tensors stay where they are (CUDA -> Triton path)
        p_ref_lead, hw = tuple(prob.shape[:-2]), tuple(prob.shape[-2:])
        p_test_lead, hw_test = tuple(prob_perturbed.shape[:-2]), tuple(prob_perturbed.shape[-2:])
    else:
        prob = _check_probabilities("prob", prob)
        prob_perturbed = _check_probabilities("prob_perturbed", prob_perturbed)
        p_ref_lead, hw = prob.shape[:-2], prob.shape[-2:]
        p_test_lead, hw_test = prob_perturbed.shape[:-2], prob_perturbed.shape[-2:]
    if hw != hw_test:
        raise ValueError(f"image shapes differ: {hw} (unperturbed) vs {hw_test} (perturbed)")
    lead = np.broadcast_shapes(p_ref_lead, p_test_lead)
    n = int(np.prod(hw))
    ref_rows = int(np.prod(p_ref_lead))
    ref_index = np.broadcast_to(np.arange(ref_rows).reshape(p_ref_lead), lead).ravel()
    test_rows = int(np.prod(p_test_lead))
    test_index = np.broadcast_to(np.arange(test_rows).reshape(p_test_lead), lead).ravel()
    p_ref = prob.reshape(ref_rows, n)
    p_test = prob_perturbed.reshape(test_rows, n)
    if test_rows != len(test_index):  # the test side is broadcast too: materialise its rows
        p_test = p_test[test_index]
    union, flips, agree = semantic_counts(p_ref, p_test, ref_index, threshold, device=device)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = union.astype(np.float64)
        nhd_score = np.where(union > 0, 1.0 - flips / u, np.nan)
        ei = np.where(union > 0, agree / u, np.nan)
    return SemanticConsistency(nhd_score.reshape(lead), ei.reshape(lead), union.reshape(lead))


def nhd(prob: np.ndarray, prob_perturbed: np.ndarray, threshold: float = THRESHOLD) -> float:
    """NHD score of one pair (eq. 5): ``1 - flipped pixels / pixels in the union of foregrounds``."""
    _single("prob", prob), _single("prob_perturbed", prob_perturbed)
    return float(semantic_consistency(prob, prob_perturbed, threshold).nhd)


def effective_invariance(prob: np.ndarray, prob_perturbed: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Effective invariance of one pair (eq. 4): mean over the union of ``[f == f'] sqrt(p p')``."""
    _single("prob", prob), _single("prob_perturbed", prob_perturbed)
    return float(semantic_consistency(prob, prob_perturbed, threshold).effective_invariance)


def _single(name: str, arr) -> None:
    if np.ndim(arr) != 2:
        raise ValueError(f"{name}: expected one 2-D map, got shape {np.shape(arr)} (use the batched form)")


def rand_region(labels: np.ndarray, labels_perturbed: np.ndarray) -> np.ndarray:
    """Boolean mask of R: union of both foregrounds minus the boundary band of ``labels`` (the pixels
    where a one-step grey dilation and erosion with the cross footprint differ)."""
    u, v = np.asarray(labels), np.asarray(labels_perturbed)
    if u.shape != v.shape:
        raise ValueError(f"label maps differ in shape: {u.shape} vs {v.shape}")
    return ((u > 0) | (v > 0)) & ~boundary_band_reference(u)


def rand_pixels(labels: np.ndarray, labels_perturbed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of R as two 1-D label vectors, background pixels given singleton ids.

    Singleton ids start above both maps' largest id, so they never meet a real instance. Scoring
    these vectors with ``1 - skimage.metrics.adapted_rand_error(u, v, ignore_labels=None)[0]`` gives
    :func:`adapted_rand`; this function exists to state (and test) that equivalence.
    """
    region = rand_region(labels, labels_perturbed)
    u = np.asarray(labels)[region].astype(np.int64)
    v = np.asarray(labels_perturbed)[region].astype(np.int64)
    start = max(int(u.max(initial=0)), int(v.max(initial=0))) + 1
    ids = np.arange(start, start + u.size, dtype=np.int64)
    u = np.where(u > 0, u, ids)
    v = np.where(v > 0, v, ids)
    return u, v


def _rand_score(same: int, ref: int, test: int) -> float:
    denominator = 0.5 * ref + 0.5 * test
    return same / denominator if denominator > 0 else float("nan")


def adapted_rand(labels: np.ndarray, labels_perturbed: np.ndarray, device: str | None = "auto") -> float:
    """Foreground-restricted adapted Rand F-score (eq. 6) of a perturbed vs unperturbed label map.

    ``F = sum n_ij(n_ij - 1) / (0.5 sum a_i(a_i - 1) + 0.5 sum b_j(b_j - 1))`` over R (module docs);
    1 when the maps agree on R, NaN when R holds no pixel pair of one instance.
    """
    return _rand_score(*rand_pair_counts(labels, labels_perturbed, device=device))


def adapted_rand_batch(labels, labels_perturbed, device: str | None = "auto") -> np.ndarray:
    """:func:`adapted_rand` for aligned sequences (or (B, H, W) stacks) of label-map pairs."""
    if len(labels) != len(labels_perturbed):
        raise ValueError(f"{len(labels)} unperturbed vs {len(labels_perturbed)} perturbed label maps")
    return np.array([adapted_rand(u, v, device=device) for u, v in zip(labels, labels_perturbed)],
                    dtype=np.float64)
