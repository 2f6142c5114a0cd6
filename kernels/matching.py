"""Instance matching between a true and a predicted label map: sparse overlap, IoU, matching.

The field's instance scores (stardist ``matching``, cellpose ``metrics.average_precision``) rest on
the overlap of every (true, pred) pair of instances,

    IoU(i, j) = |T_i ∩ P_j| / (|T_i| + |P_j| - |T_i ∩ P_j|),

and on a matching at threshold t: a one-to-one assignment of true to predicted instances that
maximises the number of pairs with IoU >= t and, among those, the sum of IoUs (the oracles solve
this with a Hungarian solver on the cost -[IoU >= t] - IoU / (2 min(n_true, n_pred))). Then
tp = |matches|, fp = n_pred - tp, fn = n_true - tp, and the sum of matched IoUs feeds panoptic
quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019, Eq. 1).

For t >= 0.5 no solver is needed. IoU(i, j) >= 0.5 means 3|T_i ∩ P_j| >= |T_i| + |P_j|, so P_j has at
least half of its pixels in T_i (and T_i in P_j). Above 0.5 a pair is therefore unique on both sides.
At exactly 0.5 one instance B can tie with two others A1, A2, but only when A1 and A2 both lie inside
B and tile it (B = A1 ∪ A2, both IoUs exactly 0.5); either choice gives one match with IoU 0.5 and
the leftovers overlap nothing else, so a greedy pass gives the oracles' tp and matched-IoU sum.
Below 0.5 the matching is solved exactly per connected component of the overlap graph with the
oracles' cost (global optimum = sum of the component optima, since pairs across components cost 0).

Paths: ``overlap_numba`` (a vectorised (min, max) pass, then one pass over the pixels that counts
runs of equal (true, pred) pairs and adds each finished run to per-id sizes and an open-addressing
table of (true, pred) -> count; never a dense n_true x n_pred matrix; ``nogil``, so images run in
parallel threads) and ``overlap_reference`` (plain NumPy: unique pair codes); ``match_reference``
runs scipy's Hungarian solver on the dense IoU matrix for every threshold and defines the result;
``match_sparse`` is the fast matching above. ``match_instances`` is the dispatch. IoUs are float64
and a pair matches when ``count / union >= t`` in float64, exactly as cellpose; stardist rounds IoUs
and the threshold to float32 first, which can only differ within ~6e-8 of a threshold.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numba
import numpy as np

from ._runtime import cpu_count

# Ids above this multiple of the pixel count are renumbered first, so per-id arrays stay small.
_DENSE_ID_FACTOR = 4
_U64 = np.uint64


@dataclass(frozen=True)
class Overlap:
    """Sparse overlap of two label maps.

    ``true_ids``/``pred_ids``: the ids present (ascending, background excluded); ``true_sizes``/
    ``pred_sizes``: their pixel counts; ``pair_true``/``pair_pred``: indices into those arrays of every
    overlapping pair, sorted by (true, pred); ``pair_count``: |T_i ∩ P_j|; ``n_pixels``: image size.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_sizes: np.ndarray
    pred_sizes: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_count: np.ndarray
    n_pixels: int

    @property
    def n_true(self) -> int:
        return int(self.true_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def iou(self) -> np.ndarray:
        """IoU of every overlapping pair, float64."""
        union = self.true_sizes[self.pair_true] + self.pred_sizes[self.pair_pred] - self.pair_count
        return self.pair_count / union

    def foreground_counts(self) -> tuple[int, int, int, int]:
        """Pixel counts on binary foreground (label > 0): (tp, fp, fn, tn)."""
        tp = int(self.pair_count.sum())
        fp = int(self.pred_sizes.sum()) - tp
        fn = int(self.true_sizes.sum()) - tp
        return tp, fp, fn, self.n_pixels - tp - fp - fn


@dataclass(frozen=True)
class Match:
    """Matching at one threshold: counts and the sum of matched IoUs."""

    thresh: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    sum_matched_iou: float


# ---------------------------------------------------------------------------------------------
# Input preparation (shared by both paths)

# dtypes the numba kernels are compiled for (each is a separate, cached compilation); the small
# ones are widened to int32 (cheap), so a fresh install compiles five variants, not nine.
_KERNEL_DTYPES = (np.uint16, np.uint32, np.uint64, np.int32, np.int64)


def _flat_ids(y: np.ndarray) -> np.ndarray:
    """A flat view of an integer label map (a copy only when not contiguous or of a small dtype)."""
    flat = np.ascontiguousarray(y).ravel()
    if flat.dtype.type in _KERNEL_DTYPES:
        return flat
    if flat.dtype == np.bool_ or np.issubdtype(flat.dtype, np.integer):
        return flat.astype(np.int32)
    raise ValueError(f"label maps must be integer arrays, got {flat.dtype}")


def _renumber(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids too large for per-id arrays: renumber to 0..k keeping 0 as background; returns (ids, id map).

    The kernel's own renumbering, not a copy of ``dqtool.data.io.relabel_consecutive`` (kernels import
    nothing from the library): it also returns the id map, to report overlaps under the original ids.
    """
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([np.zeros(1, ids.dtype), ids])
        inverse = inverse + 1
    return inverse.astype(np.uint32).ravel(), ids


# ---------------------------------------------------------------------------------------------
# numba path

_BLOCK = 64  # pixels compared at once against the current run (SIMD-friendly)
_SUB = 8  # a block that breaks the run is rechecked in sub-blocks of 8 before pixel by pixel
_WAYS = 4  # per true id, the table slots of its last 4 pairs: most runs repeat one of them
_OVERFLOW = 1  # the pair table passed half load: run again with a bigger one
_ID_TOO_LARGE = 2  # an id beyond the per-id arrays: measure the ids, run again with exact sizes
_NEGATIVE = 3
_FIRST_IDS = 4096  # per-id arrays of the first attempt: most images have fewer instances


@numba.njit(cache=True, nogil=True)
def _extent(x):
    """(min, max) of an id array in one vectorised pass."""
    lo = x[0]
    hi = x[0]
    for i in range(x.size):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
    return np.int64(lo), np.int64(hi)


@numba.njit(cache=True, nogil=True, inline="always")
def _hash_slot(keys, key, mask):
    """Open addressing, linear probing; Fibonacci hashing of the int64 pair key."""
    h = (_U64(key) * _U64(0x9E3779B97F4A7C15)) >> _U64(29)
    slot = np.int64(h) & mask
    while keys[slot] != -1 and keys[slot] != key:
        slot = (slot + 1) & mask
    return slot


@numba.njit(cache=True, nogil=True, inline="always")
def _flush(a, b, run, true_size, pred_size, keys, counts, n_used, cached_pred, cached_slot):
    """Add a run of ``run`` pixels with pair (a, b); returns the used slots, or -status to stop."""
    if a < 0 or b < 0:
        return -_NEGATIVE
    if a >= true_size.size or b >= pred_size.size:
        return -_ID_TOO_LARGE
    true_size[a] += run
    pred_size[b] += run
    if a != 0 and b != 0:
        w = b & (_WAYS - 1)  # direct-mapped by the pred id's low bits: one compare, no search
        if cached_pred[a, w] == b:  # a recent pair of this true id: no hashing
            counts[cached_slot[a, w]] += run
            return n_used
        key = (a << 32) | b
        slot = _hash_slot(keys, key, keys.size - 1)
        if keys[slot] == -1:
            if 2 * (n_used + 1) > keys.size:
                return -_OVERFLOW
            keys[slot] = key
            n_used += 1
        counts[slot] += run
        cached_pred[a, w] = b
        cached_slot[a, w] = slot
    return n_used


@numba.njit(cache=True, nogil=True)
def _overlap_kernel(t, p, size_t, size_p, capacity):
    """One pass: per-id sizes and (true, pred) -> count for both > 0; no dense n_true x n_pred matrix.

    Neighbouring pixels mostly repeat the (true, pred) pair, so the pass counts runs of equal pairs
    (whole blocks of 64, then of 8, at a time when they match: fixed-length compares that vectorise)
    and touches the pair table (open addressing, ``capacity`` slots, a power of two) only when a run
    ends; a small per-true-id cache of recent pairs skips most hash lookups. Nothing is reallocated
    inside the loop (that would cost reference counting on every run): the kernel stops with a status
    (_OVERFLOW: table past half load; _ID_TOO_LARGE: an id beyond ``size_t``/``size_p``; _NEGATIVE)
    and the caller runs it again with what it needs. Returns (status, true sizes, pred sizes, pair
    true ids, pair pred ids, pair counts).
    """
    n = t.size
    true_size = np.zeros(size_t, np.int64)
    pred_size = np.zeros(size_p, np.int64)
    cached_pred = np.full((size_t, _WAYS), -1, np.int64)  # per true id: recent pred ids, their slots
    cached_slot = np.zeros((size_t, _WAYS), np.int64)
    keys = np.full(capacity, -1, np.int64)
    counts = np.zeros(capacity, np.int64)
    n_used = 0
    empty = np.empty(0, np.int64)
    if n == 0:
        return 0, true_size, pred_size, empty, empty, empty
    last_a = t[0]  # kept in the arrays' own dtypes so the block compare vectorises
    last_b = p[0]
    run = 0
    n_blocks = n // _BLOCK
    for block in range(n_blocks):
        begin = block * _BLOCK
        diff = 0  # xor-or over the block: zero iff every pixel repeats the run's pair (vectorises)
        for j in range(begin, begin + _BLOCK):
            diff |= (t[j] ^ last_a) | (p[j] ^ last_b)
        if diff == 0:
            run += _BLOCK
            continue
        for sub in range(begin, begin + _BLOCK, _SUB):
            diff = 0
            for j in range(sub, sub + _SUB):
                diff |= (t[j] ^ last_a) | (p[j] ^ last_b)
            if diff == 0:
                run += _SUB
                continue
            for j in range(sub, sub + _SUB):
                if t[j] == last_a and p[j] == last_b:
                    run += 1
                else:
                    n_used = _flush(np.int64(last_a), np.int64(last_b), run, true_size, pred_size, keys, counts,
                                    n_used, cached_pred, cached_slot)
                    if n_used < 0:
                        return -n_used, true_size, pred_size, empty, empty, empty
                    last_a = t[j]
                    last_b = p[j]
                    run = 1
    # the tail repeats the pixel loop above on purpose: an inlined shared helper (tuple return) measured
    # 35 % slower on the real label maps, a single while-loop form 3x slower (no vectorised compares)
    for j in range(n_blocks * _BLOCK, n):
        if t[j] == last_a and p[j] == last_b:
            run += 1
        else:
            n_used = _flush(np.int64(last_a), np.int64(last_b), run, true_size, pred_size, keys, counts,
                            n_used, cached_pred, cached_slot)
            if n_used < 0:
                return -n_used, true_size, pred_size, empty, empty, empty
            last_a = t[j]
            last_b = p[j]
            run = 1
    n_used = _flush(np.int64(last_a), np.int64(last_b), run, true_size, pred_size, keys, counts, n_used,
                    cached_pred, cached_slot)
    if n_used < 0:
        return -n_used, true_size, pred_size, empty, empty, empty
    pair_key = np.empty(n_used, np.int64)
    pair_count = np.empty(n_used, np.int64)
    k = 0
    for s in range(capacity):
        if keys[s] != -1:
            pair_key[k] = keys[s]
            pair_count[k] = counts[s]
            k += 1
    order = np.argsort(pair_key)
    pair_key = pair_key[order]
    return 0, true_size, pred_size, pair_key >> 32, pair_key & 0xFFFFFFFF, pair_count[order]


def _finish(true_size, pred_size, pair_a, pair_b, pair_count, map_t, map_p, n_pixels) -> Overlap:
    """Per-id sizes + pairs of raw ids -> Overlap with indices into the present ids."""
    t_present = np.flatnonzero(true_size[1:]) + 1
    p_present = np.flatnonzero(pred_size[1:]) + 1
    t_index = np.searchsorted(t_present, pair_a)
    p_index = np.searchsorted(p_present, pair_b)
    true_ids = t_present if map_t is None else map_t[t_present]
    pred_ids = p_present if map_p is None else map_p[p_present]
    return Overlap(true_ids.astype(np.int64), pred_ids.astype(np.int64),
                   true_size[t_present].astype(np.int64), pred_size[p_present].astype(np.int64),
                   t_index.astype(np.int64), p_index.astype(np.int64), pair_count.astype(np.int64),
                   int(n_pixels))


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(f"label maps differ in shape: true {y_true.shape}, pred {y_pred.shape}")


def _kernel_over_chunks(t, p, size_t, size_p, capacity, threads):
    """The pass over ``threads`` contiguous chunks in parallel (nogil), merged; statuses as the kernel.

    A run cut at a chunk border is counted in both chunks and summed here, so the merge is exact.
    """
    n = t.size
    bounds = [n * k // threads for k in range(threads + 1)]
    parts = [(t[lo:hi], p[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda tp: _overlap_kernel(tp[0], tp[1], size_t, size_p, capacity), parts))
    status = max(r[0] for r in results)
    if status != 0:
        return status, None, None, None, None, None
    true_size = np.sum([r[1] for r in results], axis=0)
    pred_size = np.sum([r[2] for r in results], axis=0)
    keys = np.concatenate([(r[3] << 32) | r[4] for r in results])
    counts = np.concatenate([r[5] for r in results])
    keys, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=counts, minlength=keys.size).astype(np.int64)
    return 0, true_size, pred_size, keys >> 32, keys & 0xFFFFFFFF, counts


def overlap_numba(y_true: np.ndarray, y_pred: np.ndarray, threads: int = 1) -> Overlap:
    """Sparse overlap in one numba pass over the pixels (no dense n_true x n_pred matrix).

    Ids index per-id arrays directly: first sized for ids < 4096; larger ids cost one (min, max) pass
    and a second pass; ids above 4 x the pixel count (or >= 2^32) are renumbered (np.unique) and
    mapped back. ``threads`` > 1 splits an image of at least 2^20 pixels into that many chunks
    scored in parallel (for one big image; a dataset is better parallel over images).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_pair(y_true, y_pred)
    t, p = _flat_ids(y_true), _flat_ids(y_pred)
    if t.size == 0:
        return _finish(np.zeros(1, np.int64), np.zeros(1, np.int64), *(np.empty(0, np.int64),) * 3,
                       None, None, 0)
    threads = max(1, min(int(threads), t.size >> 20))
    map_t = map_p = None
    # First attempt in a single pass with per-id arrays for ids < 4096 (most images); only when an id
    # is larger are the ids measured (one more pass), renumbered if huge, and the pass repeated.
    size_t = size_p = min(_FIRST_IDS, t.size + 1)
    capacity = 1 << 14
    while True:
        if threads > 1:
            status, true_size, pred_size, a, b, c = _kernel_over_chunks(t, p, size_t, size_p, capacity, threads)
        else:
            status, true_size, pred_size, a, b, c = _overlap_kernel(t, p, size_t, size_p, capacity)
        if status == 0:
            break
        if status == _OVERFLOW:  # pairs are typically a few per instance
            capacity *= 4
        elif status == _NEGATIVE:
            raise ValueError("label maps contain negative ids; expected ids >= 0 (0 = background)")
        elif status == _ID_TOO_LARGE:
            (min_t, max_t), (min_p, max_p) = _extent(t), _extent(p)
            if min_t < 0 or min_p < 0:
                raise ValueError("label maps contain negative ids; expected ids >= 0 (0 = background)")
            limit = min(_DENSE_ID_FACTOR * t.size + 1024, 2**32 - 1)
            if max_t > limit:
                t, map_t = _renumber(t)
                max_t = map_t.size - 1
            if max_p > limit:
                p, map_p = _renumber(p)
                max_p = map_p.size - 1
            size_t, size_p = max_t + 1, max_p + 1
            capacity = max(capacity, 1 << int(np.ceil(np.log2(4 * (max_t + max_p) + 4096))))
    return _finish(true_size, pred_size, a, b, c, map_t, map_p, t.size)


# ---------------------------------------------------------------------------------------------
# NumPy reference


def overlap_reference(y_true: np.ndarray, y_pred: np.ndarray) -> Overlap:
    """Sparse overlap by plain NumPy: unique (true, pred) codes over the foreground pixels."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_pair(y_true, y_pred)
    t = y_true.ravel().astype(np.uint64)
    p = y_pred.ravel().astype(np.uint64)
    t_ids, t_sizes = np.unique(t[t != 0], return_counts=True)
    p_ids, p_sizes = np.unique(p[p != 0], return_counts=True)
    both = (t != 0) & (p != 0)
    ti = np.searchsorted(t_ids, t[both])
    pi = np.searchsorted(p_ids, p[both])
    code = ti.astype(np.int64) * max(p_ids.size, 1) + pi
    codes, counts = np.unique(code, return_counts=True)
    stride = max(p_ids.size, 1)
    return Overlap(t_ids.astype(np.int64), p_ids.astype(np.int64), t_sizes.astype(np.int64),
                   p_sizes.astype(np.int64), codes // stride, codes % stride, counts.astype(np.int64),
                   int(t.size))


def match_reference(ov: Overlap, thresholds: Sequence[float]) -> list[Match]:
    """Definition of the matching: Hungarian solver on the dense IoU matrix, the oracles' cost."""
    from scipy.optimize import linear_sum_assignment

    n_true, n_pred = ov.n_true, ov.n_pred
    iou = np.zeros((n_true, n_pred))
    iou[ov.pair_true, ov.pair_pred] = ov.iou
    out = []
    n_min = min(n_true, n_pred)
    for thr in thresholds:
        tp, total = 0, 0.0
        if n_min > 0:
            cost = -(iou >= thr).astype(float) - iou / (2 * n_min)
            rows, cols = linear_sum_assignment(cost)
            ok = iou[rows, cols] >= thr
            tp = int(ok.sum())
            total = float(iou[rows, cols][ok].sum())
        out.append(Match(float(thr), tp, n_pred - tp, n_true - tp, n_true, n_pred, total))
    return out


# ---------------------------------------------------------------------------------------------
# Matching without a dense matrix


@numba.njit(cache=True, nogil=True)
def _greedy_kernel(pair_true, pair_pred, iou, n_true, n_pred, thr):
    """Matching for thr >= 0.5: every candidate pair is unique except exact 0.5 ties (see module doc)."""
    used_t = np.zeros(n_true, np.bool_)
    used_p = np.zeros(n_pred, np.bool_)
    tp = 0
    total = 0.0
    for k in range(iou.size):
        if iou[k] >= thr:
            i = pair_true[k]
            j = pair_pred[k]
            if not used_t[i] and not used_p[j]:
                used_t[i] = True
                used_p[j] = True
                tp += 1
                total += iou[k]
    return tp, total


def _match_below_half(ov: Overlap, iou: np.ndarray, thr: float) -> tuple[int, float]:
    """Exact matching for thr < 0.5: the oracles' cost solved per connected component."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keep = iou > 0
    a, b, w = ov.pair_true[keep], ov.pair_pred[keep], iou[keep]
    if w.size == 0 or not np.any(w >= thr):
        return 0, 0.0
    n_true, n_pred = ov.n_true, ov.n_pred
    graph = coo_matrix((np.ones(w.size), (a, n_true + b)), shape=(n_true + n_pred,) * 2)
    _, comp = connected_components(graph, directed=False)
    n_min = min(n_true, n_pred)
    edge_comp = comp[a]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    tp, total = 0, 0.0
    for group in np.split(order, bounds):
        gw = w[group]
        if not np.any(gw >= thr):
            continue
        if group.size == 1:
            tp += 1
            total += float(gw[0])
            continue
        rows, ri = np.unique(a[group], return_inverse=True)
        cols, ci = np.unique(b[group], return_inverse=True)
        sub = np.zeros((rows.size, cols.size))
        sub[ri, ci] = gw
        cost = -(sub >= thr).astype(float) - sub / (2 * n_min)
        r, c = linear_sum_assignment(cost)
        ok = sub[r, c] >= thr
        tp += int(ok.sum())
        total += float(sub[r, c][ok].sum())
    return tp, total


def match_sparse(ov: Overlap, thresholds: Sequence[float]) -> list[Match]:
    """Matching on the sparse overlap: greedy for t >= 0.5, exact per component below."""
    iou = ov.iou
    out = []
    for thr in thresholds:
        thr = float(thr)
        if thr >= 0.5:
            tp, total = _greedy_kernel(ov.pair_true, ov.pair_pred, iou, ov.n_true, ov.n_pred, thr)
        else:
            tp, total = _match_below_half(ov, iou, thr)
        tp = int(tp)
        out.append(Match(thr, tp, ov.n_pred - tp, ov.n_true - tp, ov.n_true, ov.n_pred, float(total)))
    return out


# ---------------------------------------------------------------------------------------------
# Dispatch


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    thresholds = tuple(float(t) for t in np.atleast_1d(thresholds))
    if not thresholds or any(not (0.0 < t <= 1.0) for t in thresholds):
        raise ValueError(f"IoU thresholds must lie in (0, 1], got {thresholds}")
    return thresholds


def overlap(y_true: np.ndarray, y_pred: np.ndarray, method: str = "numba", threads: int = 1) -> Overlap:
    """Sparse overlap by ``method``: 'numba' (default; ``threads`` for one big image) or 'reference'."""
    if method == "numba":
        return overlap_numba(y_true, y_pred, threads)
    if method == "reference":
        return overlap_reference(y_true, y_pred)
    raise ValueError(f"method must be 'numba' or 'reference', got {method!r}")


def match_instances(y_true: np.ndarray, y_pred: np.ndarray, thresholds: Sequence[float] = (0.5,),
                    method: str = "numba", threads: int = 1) -> tuple[Overlap, list[Match]]:
    """Overlap and matching of one image pair at each threshold; returns (overlap, matches)."""
    thresholds = _check_thresholds(thresholds)
    ov = overlap(y_true, y_pred, method, threads)
    matches = match_sparse(ov, thresholds) if method == "numba" else match_reference(ov, thresholds)
    return ov, matches


def match_many(pairs: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float] = (0.5,),
               method: str = "numba", workers: int | None = None):
    """``match_instances`` over many image pairs, in parallel threads (the numba kernels drop the GIL).

    Yields (overlap, matches) in input order.
    """
    thresholds = _check_thresholds(thresholds)
    workers = workers or min(8, max(1, cpu_count()))
    if workers == 1:
        for y_true, y_pred in pairs:
            yield match_instances(y_true, y_pred, thresholds, method)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(lambda pair: match_instances(pair[0], pair[1], thresholds, method), pairs)


# ---------------------------------------------------------------------------------------------
# Pixel (binary foreground) counts


@numba.njit(cache=True, nogil=True)
def _foreground_kernel(t, p):
    """Counts of true foreground, predicted foreground, both, and negative ids (branch-free, vectorises)."""
    n_true = 0
    n_pred = 0
    both = 0
    negative = 0
    for i in range(t.size):
        a = t[i] != 0
        b = p[i] != 0
        n_true += a
        n_pred += b
        both += a & b
        negative += (t[i] < 0) | (p[i] < 0)
    return n_true, n_pred, both, negative


def foreground_counts(y_true: np.ndarray, y_pred: np.ndarray, method: str = "numba") -> tuple[int, int, int, int]:
    """Pixel counts on binary foreground (label > 0): (tp, fp, fn, tn), one pass."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_pair(y_true, y_pred)
    if method == "reference":
        if (y_true < 0).any() or (y_pred < 0).any():
            raise ValueError("label maps contain negative ids; expected ids >= 0 (0 = background)")
        t, p = y_true != 0, y_pred != 0
        tp, fp, fn = int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))
    elif method == "numba":
        n_true, n_pred, tp, negative = (int(v) for v in _foreground_kernel(_flat_ids(y_true), _flat_ids(y_pred)))
        if negative:
            raise ValueError("label maps contain negative ids; expected ids >= 0 (0 = background)")
        fp, fn = n_pred - tp, n_true - tp
    else:
        raise ValueError(f"method must be 'numba' or 'reference', got {method!r}")
    return tp, fp, fn, y_true.size - tp - fp - fn
