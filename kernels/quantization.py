"""Greedy bin formation of dataset quantization (DQ), paper eq. 1, and the two released-code variants.

Bins S_1..S_B are built one after another; bin n is filled from the pool U_n of patches no earlier bin
holds. Step k of bin n adds the candidate x in U_n minus S_n with the largest gain (ties: lowest index):

``paper``  (eq. 1)   P(x) = sum_{p in S_n} d(p,x) - sum_{p in D minus S_n} d(p,x)
                           = 2 sum_{p in S_n} d(p,x) - sum_{p in D} d(p,x),   D = all N patches
``biomedseg``        G(x) = mean_{p in S_n} d(p,x) - mean_{p in D} d(p,x);  first pick argmin_x sum_D d(p,x)
``dq``  (GraphCut)   G(x) = -2 sum_{p in S_n} sim(p,x) + lambda sum_{u in U_n} sim(u,x),
                     sim = 0.5 + 0.5 cos (a zero vector has cos 0 with everything), lambda = 1

with d(p,x) = ||f(p) - f(x)||^2. Bin sizes: N // B each, the first N mod B bins one more.

Every gain is alpha_k * A(x) + beta * B(x), where A(x) = sum_{p in S_n} k(p,x) is a running sum that
grows by one kernel row k(new, .) per step and B(x) is fixed for the bin (REFERENCE.md section 3):
    sum_{p in A} d(p,x) = |A| ||f(x)||^2 - 2 f(x).s_A + q_A,  s_A = sum f(p), q_A = sum ||f(p)||^2.
So each greedy step is one matrix-vector product over the remaining candidates plus a masked argmax
(memory O(N D)); with the Gram matrix F F^T in memory (when it fits the budget) a step is O(N).

Paths: ``form_bins_reference`` (float64 NumPy, full distance matrix, direct sums: defines the result),
``cpu`` (numba; ``gram`` or ``running`` sums chosen by the memory budget), ``triton`` (fused gain update +
masked argmax per step for CUDA; runs in the interpreter under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numba
import numpy as np
import torch

from ._runtime import pick_device, triton_available

GAINS = ("paper", "dq", "biomedseg")
DEFAULT_MEMORY = 1 << 30  # bytes the Gram matrix may take; above it the running-sum path is used


def bin_sizes(n: int, bins: int) -> np.ndarray:
    """Sizes of ``bins`` bins over ``n`` patches: n // bins each, the first n mod bins one more."""
    if bins < 1 or bins > n:
        raise ValueError(f"bins must be between 1 and the number of patches ({n}), got {bins}")
    sizes = np.full(bins, n // bins, dtype=np.int64)
    sizes[: n % bins] += 1
    return sizes


def _all_finite(x: np.ndarray, block: int = 1 << 14) -> bool:
    """np.isfinite(x).all() a block of rows at a time (no N x D temporary)."""
    return all(bool(np.isfinite(x[lo:lo + block]).all()) for lo in range(0, x.shape[0], block))


def _check(features: np.ndarray, bins: int, gain: str) -> np.ndarray:
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if not _all_finite(x):
        raise ValueError("features contain NaN or inf")
    bin_sizes(x.shape[0], bins)
    return x


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norm; zero rows stay zero (so their cosine with anything is 0)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt(np.einsum("nd,nd->n", x, x))
    return x / np.where(norm > 0, norm, 1.0)[:, None]


# ----------------------------------------------------------------------------------------------
# NumPy reference: full matrices, the gains written as in the papers' text and code


def similarity_reference(x: np.ndarray) -> np.ndarray:
    """sim(a, b) = 0.5 + 0.5 cos(a, b) for all pairs (float64).

    Summed by einsum's own loop, the same order for every pair: a BLAS product rounds rows in different
    tiles differently, so duplicate rows would not tie exactly and their ties would not go to the lowest index.
    """
    u = unit_rows(x)
    return 0.5 + 0.5 * np.einsum("nd,md->nm", u, u)


def gains_reference(dist: np.ndarray, sim: np.ndarray | None, members: list[int], pool: np.ndarray,
                    candidates: np.ndarray, gain: str, lam: float = 1.0) -> np.ndarray:
    """Gain of every candidate given the partial bin ``members`` and the bin's ``pool`` (direct sums)."""
    n = dist.shape[0]
    members = list(members)
    if gain == "paper":
        rest = np.setdiff1d(np.arange(n), members)  # D minus S_n, literally
        return np.array([dist[members, x].sum() - dist[rest, x].sum() for x in candidates])
    if gain == "biomedseg":
        # exact rationals: the means' rounding must not decide exact ties
        return np.array([Fraction(math.fsum(dist[x, members])) / len(members) - Fraction(math.fsum(dist[x])) / n
                         for x in candidates], dtype=object)
    return np.array([-2.0 * sim[members, x].sum() + lam * sim[pool, x].sum() for x in candidates])


def form_bins_reference(features: np.ndarray, bins: int, gain: str = "paper",
                        lam: float = 1.0) -> list[np.ndarray]:
    """Bins in greedy order, computed directly from the full N x N float64 matrices (small N only)."""
    from .distances import sq_distances_reference

    x = _check(features, bins, gain)
    n = x.shape[0]
    dist = sq_distances_reference(x, x)
    sim = similarity_reference(x) if gain == "dq" else None
    taken = np.zeros(n, dtype=bool)
    out = []
    for size in bin_sizes(n, bins):
        pool = np.flatnonzero(~taken)
        members: list[int] = []
        while len(members) < size:
            cand = np.flatnonzero(~taken)
            if gain == "biomedseg" and not members:
                pick = cand[np.argmin(dist[cand].sum(axis=1))]
            else:
                g = list(gains_reference(dist, sim, members, pool, cand, gain, lam))
                pick = cand[g.index(max(g))]  # first maximum: the lowest index
            members.append(int(pick))
            taken[pick] = True
        out.append(np.array(members, dtype=np.int64))
    return out


# ----------------------------------------------------------------------------------------------
# shared set-up: kernel kind, fixed term B(x), step weights


def _prepare(x: np.ndarray, gain: str):
    """float32 rows used by the kernels, their squared norms (float64) and the kernel kind.

    kind 0: k(p, x) = d(p, x) on the raw features; kind 1: k(p, x) = 0.5 + 0.5 u_p.u_x on unit rows.
    """
    if gain == "dq":
        rows = unit_rows(x).astype(np.float32)
        kind = 1
    else:
        rows = np.ascontiguousarray(x, dtype=np.float32)
        kind = 0
    sq = _row_sq_norms(rows)
    return rows, sq, kind


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def _row_sq_norms(rows):
    n, d = rows.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for k in range(d):
            v = np.float64(rows[i, k])
            acc += v * v
        out[i] = acc
    return out


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def _matvec(rows, v):
    """rows @ v with float64 accumulation, the same order for every row (duplicates get equal values)."""
    n, d = rows.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for k in range(d):
            acc += np.float64(rows[i, k]) * np.float64(v[k])
        out[i] = acc
    return out


def _fixed_term(rows: np.ndarray, sq: np.ndarray, kind: int, pool_rows: np.ndarray) -> np.ndarray:
    """B(x) = sum_{p in A} k(p, x) for every row, by the running-sum identity (A = all rows or the pool)."""
    s = pool_rows.astype(np.float64).sum(axis=0)
    dot = _matvec(rows, s)
    if kind == 1:
        return 0.5 * pool_rows.shape[0] + 0.5 * dot
    q = float(_row_sq_norms(pool_rows).sum())
    return pool_rows.shape[0] * sq - 2.0 * dot + q


def _weights(gain: str, members: int, n: int, lam: float) -> tuple[float, float]:
    """(alpha, beta) of gain = alpha * A(x) + beta * B(x) once the bin holds ``members`` patches."""
    if gain == "paper":
        return 2.0, -1.0
    if gain == "biomedseg":
        # A/m - B/N scaled by m*N > 0 (same argmax within a step, and exact for integer-valued sums)
        return (float(n), -float(members)) if members else (0.0, -1.0)
    return -2.0, lam


# ----------------------------------------------------------------------------------------------
# CPU path (numba): one fused step = running-sum update + masked argmax


@numba.njit(cache=True)
def _step_running(dot, sq, new, acc, base, alive, alpha, beta, kind):
    """acc[i] += k(new, i) for live i from dot[i] = f(i).f(new) (new < 0: no update); first argmax of the gain."""
    n = acc.shape[0]
    bv = -np.inf
    bi = -1
    for i in range(n):
        if not alive[i]:
            continue
        if new >= 0:
            if kind == 0:
                acc[i] += max(sq[i] + sq[new] - 2.0 * np.float64(dot[i]), 0.0)
            else:
                acc[i] += 0.5 + 0.5 * np.float64(dot[i])
        s = alpha * acc[i] + beta * base[i]
        if bi < 0 or s > bv:  # strict: the lowest index keeps an exact tie
            bv = s
            bi = i
    return bi


@numba.njit(cache=True)
def _step_gram(gram, rep, pool, sq, new, acc, base, alive, alpha, beta, kind):
    """The same step with f(i).f(new) read from the Gram matrix (global rows via ``pool``, duplicates via ``rep``)."""
    n = pool.shape[0]
    rn = rep[pool[new]] if new >= 0 else 0
    bv = -np.inf
    bi = -1
    for i in range(n):
        if not alive[i]:
            continue
        if new >= 0:
            dot = np.float64(gram[rn, rep[pool[i]]])
            if kind == 0:
                acc[i] += max(sq[i] + sq[new] - 2.0 * dot, 0.0)
            else:
                acc[i] += 0.5 + 0.5 * dot
        s = alpha * acc[i] + beta * base[i]
        if bi < 0 or s > bv:
            bv = s
            bi = i
    return bi


def _duplicate_groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id of every row, lowest index of its group) for bytewise-identical rows.

    BLAS may round x.y and x'.y differently for identical rows x, x' (different tiles or tails);
    reading one representative keeps exact ties exact, so they go to the lowest index as defined.
    """
    view = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    return inverse, first[inverse].astype(np.int64)


def _pool_representatives(groups: np.ndarray) -> np.ndarray | None:
    """For pool positions: position of the first pool member in the same group, or None if all distinct."""
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if uniq.shape[0] == groups.shape[0]:
        return None
    return first[inverse.ravel()]


def _gram(rows: np.ndarray) -> np.ndarray:
    """F F^T in float32. NumPy hands ``a @ a.T`` to BLAS syrk: half the flops of a general product."""
    return rows @ rows.T


_EMPTY = np.zeros(0, dtype=np.float32)


def gram_bytes(n: int) -> int:
    """Bytes of the float32 N x N Gram matrix the ``gram`` path holds."""
    return 4 * n * n


SPECULATE = 32  # candidates whose kernel rows ride along in each pass of the running-sum path


@numba.njit(cache=True)
def _live_scores(acc, base, alive, alpha, beta, out):
    for i in range(acc.shape[0]):
        out[i] = alpha * acc[i] + beta * base[i] if alive[i] else -np.inf


def _bin_running(pool_rows, pool_sq, dup, base, size, gain, n, lam, kind, progress, speculate=SPECULATE):
    """One bin by running sums, speculating on the next picks.

    Each pass over the pool's features computes the kernel row of the newest pick together with those of
    the ``speculate`` candidates that currently score highest (one matrix product, so about the memory
    traffic of one matrix-vector product). Picks then proceed exactly as one step at a time; while the
    next pick is one of the speculated candidates its row is already there and no new pass is needed.
    The greedy order is sticky (the next pick is almost always among the current leaders), so a pass
    yields many picks. The result does not depend on the speculation, only the number of passes does.
    """
    m = pool_rows.shape[0]
    acc = np.zeros(m, dtype=np.float64)
    alive = np.ones(m, dtype=np.bool_)
    scores = np.empty(m, dtype=np.float64)
    alpha, beta = _weights(gain, 0, n, lam)
    new = _step_running(_EMPTY, pool_sq, -1, acc, base, alive, alpha, beta, kind)
    alive[new] = False
    picks = [new]
    if progress is not None:
        progress(1)
    while len(picks) < size:
        alpha, beta = _weights(gain, len(picks), n, lam)
        _live_scores(acc, base, alive, alpha, beta, scores)
        live = m - len(picks)
        k = min(speculate, live)
        spec = np.flatnonzero(alive) if k >= live else np.argpartition(-scores, k - 1)[:k]
        cols = np.concatenate([[new], spec]).astype(np.int64)
        dots = pool_rows[cols] @ pool_rows.T                   # (len(cols), m) float32
        if dup is not None:
            dots = dots[:, dup]
        row_of = {int(c): r for r, c in enumerate(cols)}
        cur = new
        while True:
            alpha, beta = _weights(gain, len(picks), n, lam)
            pick = _step_running(dots[row_of[cur]], pool_sq, cur, acc, base, alive, alpha, beta, kind)
            alive[pick] = False
            picks.append(pick)
            if progress is not None:
                progress(1)
            if len(picks) == size:
                break
            if pick in row_of:    # speculation hit: its kernel row is already computed
                cur = pick
                continue
            new = pick
            break
    return picks


def _bin_gram(gram, rep, pool, pool_sq, base, size, gain, n, lam, kind, progress):
    """One bin with every kernel row read from the Gram matrix: O(pool) per step."""
    acc = np.zeros(pool.shape[0], dtype=np.float64)
    alive = np.ones(pool.shape[0], dtype=np.bool_)
    picks = []
    new = -1
    for k in range(int(size)):
        alpha, beta = _weights(gain, k, n, lam)
        new = _step_gram(gram, rep, pool, pool_sq, new, acc, base, alive, alpha, beta, kind)
        alive[new] = False
        picks.append(new)
        if progress is not None:
            progress(1)
    return picks


def _form_bins_cpu(x: np.ndarray, bins: int, gain: str, lam: float, memory: int | None,
                   progress=None, speculate: int = SPECULATE) -> tuple[list[np.ndarray], str]:
    n = x.shape[0]
    rows, sq, kind = _prepare(x, gain)
    budget = DEFAULT_MEMORY if memory is None else int(memory)
    use_gram = gram_bytes(n) <= budget
    groups, rep = _duplicate_groups(rows)
    gram = _gram(rows) if use_gram else None
    base_all = _fixed_term(rows, sq, kind, rows) if kind == 0 else None
    taken = np.zeros(n, dtype=bool)
    out = []
    for size in bin_sizes(n, bins):
        pool = np.flatnonzero(~taken)
        base = base_all[pool] if kind == 0 else _fixed_term(rows[pool], sq[pool], kind, rows[pool])
        if use_gram:
            picks = _bin_gram(gram, rep, pool, sq[pool], base, size, gain, n, lam, kind, progress)
        else:
            pool_rows = np.ascontiguousarray(rows[pool])
            picks = _bin_running(pool_rows, sq[pool], _pool_representatives(groups[pool]), base, size, gain, n,
                                 lam, kind, progress, max(1, int(speculate)))
        members = pool[np.array(picks, dtype=np.int64)]
        taken[members] = True
        out.append(members)
    return out, ("gram" if use_gram else "running")


# ----------------------------------------------------------------------------------------------
# Search path (numba, the default on the CPU): every greedy step is a query around a slowly moving point
#
# Expanding the squared distances (REFERENCE.md section 3) with s_k the sum of the k patches picked so far
# in bin n, s_D the sum over all N patches and m = N - 2k:
#
#   paper      P(x) = -m ||x||^2 + 2 x.(s_D - 2 s_k) + const = -m ||x - c_k||^2 + const,
#              c_k = (s_D - 2 s_k) / m:  nearest to c_k while m > 0, max x.(s_D - 2 s_k) at m = 0, farthest
#              from c_k while m < 0 (only B = 1). k = 0 is the most central patch (nearest to the mean).
#   dq         G(x) = const + u_x . v_k,  u_x = x / ||x|| (0 for a zero row),  v_k = (lam/2) sum_U u - sum_S u
#   biomedseg  k N G(x) = x.(k s_D - N s_k) + const  (k >= 1; k = 0 is the paper's central pick)
#
# The query (c_k, v_k or k s_D - N s_k) moves a little per pick, so a value computed for x at step t bounds
# it at step k through the path length L travelled by the query since t (triangle inequality, or
# Cauchy-Schwarz with R >= ||x|| for the inner products):
#     ||x - c_k|| >= ||x - c_t|| - (L_k - L_t),      x.w_k <= x.w_t + R (L_k - L_t).
# Every candidate sits in a max-heap under key = (its value at t) - R L_t, so one number per candidate bounds
# all of them at once (ub = key + R L_k). A step pops candidates until the top's bound cannot reach the best
# value found, computes each popped one exactly (one dot product x.w in float64), and pushes them back with
# fresh keys. The winner among the candidates that can still win is decided by the exact score
# (-m ||x||^2 + 2 x.w, u_x.v or x.w in float64; ties: lowest index), so the bins equal those of a full
# float64 scan of that score at every step, whatever the pruning touched. All bounds carry a floating-point
# slack of order D * 2^-53 times the squared scale (||x|| + ||c||)^2, so rounding never prunes a winner.
# If pruning stops paying (the query turns fast, as for biomedseg's herding-like direction), the bin
# continues with full scans of the same score: the same picks, no heap overhead.

_U = 2.0 ** -53
_SEARCH_MODES = {"paper": 0, "dq": 1, "biomedseg": 2}


def _feature_rows(x) -> np.ndarray:
    """The features as a C-contiguous float32 or float64 array: float32 input is used as is (no copy)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x)


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def _dot_row(rows, i, w):
    """rows[i] . w in float64. Reassociation lets LLVM vectorise the sum; the order it picks is fixed in
    this one compiled function (x86 does not peel loops for alignment), so rows holding the same values
    get the same bits at every call and integer-valued rows stay exact."""
    acc = 0.0
    for j in range(w.shape[0]):
        acc += np.float64(rows[i, j]) * w[j]
    return acc


@numba.njit(cache=True)
def _unit_dot(rows, i, w, nxi):
    """(rows[i] / ||rows[i]||) . w, the unit row formed first as in ``unit_rows`` (0 for a zero row): rows
    that are positive multiples of each other get the same unit row, hence exactly tied scores."""
    if nxi <= 0.0:
        return 0.0
    r = np.sqrt(nxi)
    d = w.shape[0]
    a0 = a1 = a2 = a3 = 0.0
    j = 0
    while j + 4 <= d:
        a0 += (np.float64(rows[i, j]) / r) * w[j]
        a1 += (np.float64(rows[i, j + 1]) / r) * w[j + 1]
        a2 += (np.float64(rows[i, j + 2]) / r) * w[j + 2]
        a3 += (np.float64(rows[i, j + 3]) / r) * w[j + 3]
        j += 4
    tail = 0.0
    while j < d:
        tail += (np.float64(rows[i, j]) / r) * w[j]
        j += 1
    return ((a0 + a1) + (a2 + a3)) + tail


@numba.njit(cache=True)
def _add_row(out, rows, i, nx, unit):
    """out += rows[i] in float64, or its unit row rows[i] / ||rows[i]|| (a zero row adds nothing)."""
    d = rows.shape[1]
    if unit:
        if nx[i] > 0.0:
            r = np.sqrt(nx[i])
            for j in range(d):
                out[j] += np.float64(rows[i, j]) / r
    else:
        for j in range(d):
            out[j] += np.float64(rows[i, j])


@numba.njit(cache=True)
def _sum_rows(rows, ids, nx, unit):
    """sum_i rows[ids[i]] in float64, or of the unit rows rows / ||rows|| (zero rows add nothing)."""
    out = np.zeros(rows.shape[1], dtype=np.float64)
    for t in range(ids.shape[0]):
        _add_row(out, rows, ids[t], nx, unit)
    return out


@numba.njit(cache=True)
def _heap_push(key, ids, size, k, i):
    pos = size
    while pos > 0:
        parent = (pos - 1) >> 1
        if key[parent] >= k:
            break
        key[pos] = key[parent]
        ids[pos] = ids[parent]
        pos = parent
    key[pos] = k
    ids[pos] = i
    return size + 1


@numba.njit(cache=True)
def _sift_down(key, ids, pos, size, k, i):
    """Place (k, i) at ``pos`` of the max-heap of ``size`` entries and move it down to its level."""
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and key[child + 1] > key[child]:
            child += 1
        if key[child] <= k:
            break
        key[pos] = key[child]
        ids[pos] = ids[child]
        pos = child
    key[pos] = k
    ids[pos] = i


@numba.njit(cache=True)
def _heap_pop(key, ids, size):
    """Remove the top (largest key); returns the new size (the popped id was ids[0] before the call)."""
    size -= 1
    if size > 0:
        _sift_down(key, ids, 0, size, key[size], ids[size])
    return size


@numba.njit(cache=True)
def _heapify(key, ids, size):
    for start in range((size - 2) // 2, -1, -1):
        _sift_down(key, ids, start, size, key[start], ids[start])


# query kinds: 0 nearest to c (paper, m > 0), 1 linear (paper, m = 0), 2 farthest from c (paper, m < 0),
# 3 max u_x.v (dq), 4 max x.w (biomedseg, k >= 1)


@numba.njit(cache=True)
def _candidate(kind, dot, nxi, m, inv_m, cc):
    """(search value, exact score) of a candidate from its dot product with the step's vector w."""
    if kind == 3:
        v = dot / np.sqrt(nxi) if nxi > 0.0 else 0.0
        return v, v
    if kind == 4:
        return dot, dot
    score = -m * nxi + 2.0 * dot
    if kind == 1:
        return score, score
    return nxi - 2.0 * dot * inv_m + cc, score      # squared distance to c = w / m


@numba.njit(cache=True)
def _value_high(kind, val, err):
    """An upper bound on the true search value (-distance, distance or inner product) of a candidate."""
    if kind == 0:
        return -np.sqrt(max(val - err, 0.0)) * (1.0 - 2.0 * _U)
    if kind == 2:
        return np.sqrt(max(val + err, 0.0)) * (1.0 + 2.0 * _U)
    return val + err


@numba.njit(cache=True)
def _beaten(kind, ub, best_val, err, margin):
    """True when a candidate whose true search value is at most ``ub`` can neither win nor tie."""
    if kind == 0:        # best_val: smallest computed squared distance
        return ub < 0.0 and ub * ub > best_val + margin + 2.0 * err
    if kind == 2:        # best_val: largest computed squared distance
        return ub * ub + 2.0 * err < best_val - margin
    return ub + err < best_val - margin


@numba.njit(cache=True)
def _norm_step(a, b):
    """||a - b|| rounded up to cover its own floating-point error and that of the stored vectors."""
    d = a.shape[0]
    s = 0.0
    na = 0.0
    nb = 0.0
    for j in range(d):
        diff = a[j] - b[j]
        s += diff * diff
        na += a[j] * a[j]
        nb += b[j] * b[j]
    return np.sqrt(s) * (1.0 + (d + 4.0) * _U) + 4.0 * _U * (np.sqrt(na) + np.sqrt(nb))


@numba.njit(cache=True)
def _search_bin(rows, nx, pool, size, mode, n_all, base, out, stats, scan_after):
    """Fill one bin (``size`` picks from ``pool``, global ids ascending) by exact pruned search; see above.

    base: s_D (paper, biomedseg) or (lam/2) sum_U u (dq). out receives the picks (global ids) in order.
    Each candidate holds two upper bounds on its search value: in the heap, value_t - R L_t (path length
    since its evaluation), and beside it value_t + R ||q_t - a|| (displacement from the anchor a, the query
    at the start of the phase: tight while the query jitters around). A popped candidate that the second
    bound already rules out is set aside without a dot product.
    stats += [candidates evaluated by the heap, heap steps, candidates evaluated by full scans, scan steps].
    """
    n_pool = pool.shape[0]
    d = rows.shape[1]
    fd = float(d)
    live = np.arange(n_pool)           # compact list of live positions (order irrelevant: ties use ids)
    where = np.arange(n_pool)          # position of each candidate in ``live``
    n_live = n_pool
    norm_max = 0.0
    for t in range(n_pool):
        norm_max = max(norm_max, np.sqrt(nx[pool[t]]))
    norm_max *= 1.0 + 4.0 * _U
    s_k = np.zeros(d, dtype=np.float64)
    w = np.empty(d, dtype=np.float64)
    path = np.empty(d, dtype=np.float64)
    prev = np.empty(d, dtype=np.float64)
    anchor = np.empty(d, dtype=np.float64)
    hkey = np.empty(n_pool, dtype=np.float64)
    hid = np.empty(n_pool, dtype=np.int64)
    akey = np.empty(n_pool, dtype=np.float64)
    hsize = 0
    t_id = np.empty(n_pool, dtype=np.int64)
    t_val = np.empty(n_pool, dtype=np.float64)
    t_score = np.empty(n_pool, dtype=np.float64)
    aside = np.empty(n_pool, dtype=np.int64)
    aside_key = np.empty(n_pool, dtype=np.float64)
    phase = -1
    scanning = False
    crowded = 0
    length = 0.0
    disp = 0.0
    slack_rel = (16.0 + 2.0 * size) * _U
    for k in range(size):
        # ---- the step's vector w, query kind, and the point whose path bounds the values
        m = float(n_all - 2 * k)
        if mode == 1:
            kind = 3
            for j in range(d):
                w[j] = base[j] - s_k[j]
        elif mode == 2 and k > 0:
            kind = 4
            for j in range(d):
                w[j] = k * base[j] - n_all * s_k[j]
        else:
            if mode == 2:
                m = float(n_all)
            kind = 0 if m > 0 else (1 if m == 0 else 2)
            for j in range(d):
                w[j] = base[j] - 2.0 * s_k[j]
        inv_m = 1.0 / m if m != 0 else 0.0
        wn2 = 0.0
        for j in range(d):
            wn2 += w[j] * w[j]
        if kind <= 2:
            for j in range(d):
                path[j] = w[j] * inv_m
            cc = wn2 * inv_m * inv_m
            scale = norm_max + np.sqrt(cc) * (1.0 + 4.0 * _U)
            err = 2.0 * (fd + 8.0) * _U * scale * scale          # |computed - true| squared distance
            margin = 8.0 * (fd + 8.0) * _U * scale * scale       # covers 2 err + 2 (score error) / |m|
            reach = 1.0
        else:
            for j in range(d):
                path[j] = w[j]
            cc = 0.0
            reach = 1.0 if kind == 3 else norm_max
            err = 2.0 * (fd + 4.0) * _U * np.sqrt(wn2) * reach  # |computed - true| value
            margin = 2.0 * err if kind == 3 else 0.0            # dq: the score is recomputed from u_x
        # ---- full scan when the query kind changes (or pruning stopped paying): also (re)builds the heap
        fresh = kind != phase
        if fresh:
            phase = kind
            scanning = False
            crowded = 0
            length = 0.0
            disp = 0.0
            for j in range(d):
                anchor[j] = path[j]
        else:
            length += _norm_step(path, prev)
            disp = _norm_step(path, anchor)
        for j in range(d):
            prev[j] = path[j]
        win = -1
        nt = 0
        na = 0
        best_val = np.inf if kind == 0 else -np.inf
        full = fresh or scanning or kind == 1
        if full:
            for t in range(n_live):
                p = live[t]
                dot = _dot_row(rows, pool[p], w)
                val, score = _candidate(kind, dot, nx[pool[p]], m, inv_m, cc)
                t_id[t] = p
                t_val[t] = val
                t_score[t] = score
                if kind == 0:
                    best_val = min(best_val, val)
                else:
                    best_val = max(best_val, val)
            nt = n_live
            stats[2] += n_live
            stats[3] += 1
        else:
            # ---- pruned search: pop while the top's bound can still reach the best value
            while hsize > 0:
                ub = hkey[0] + reach * length
                ub += slack_rel * (abs(hkey[0]) + 2.0 * reach * length)
                if nt > 0 and _beaten(kind, ub, best_val, err, margin):
                    break
                p = hid[0]
                key = hkey[0]
                hsize = _heap_pop(hkey, hid, hsize)
                if nt > 0:
                    ua = akey[p] + reach * disp
                    ua += slack_rel * (abs(akey[p]) + 2.0 * reach * disp)
                    if _beaten(kind, ua, best_val, err, margin):
                        aside[na] = p
                        aside_key[na] = key
                        na += 1
                        continue
                dot = _dot_row(rows, pool[p], w)
                val, score = _candidate(kind, dot, nx[pool[p]], m, inv_m, cc)
                t_id[nt] = p
                t_val[nt] = val
                t_score[nt] = score
                nt += 1
                if kind == 0:
                    best_val = min(best_val, val)
                else:
                    best_val = max(best_val, val)
        # ---- the winner: exact score among the candidates that can still win (ties: lowest index)
        best = -np.inf
        for t in range(nt):
            if kind == 0 and t_val[t] > best_val + margin:
                continue
            if kind == 2 and t_val[t] < best_val - margin:
                continue
            if kind >= 3 and t_val[t] < best_val - margin:
                continue
            p = t_id[t]
            score = t_score[t]
            if kind == 3:
                score = _unit_dot(rows, pool[p], w, nx[pool[p]])
            if win < 0 or score > best or (score == best and p < win):
                best = score
                win = p
        if full:
            if fresh and kind != 1:
                hsize = 0
                for t in range(n_live):
                    p = t_id[t]
                    if p == win:
                        continue
                    vh = _value_high(kind, t_val[t], err)
                    hkey[hsize] = vh
                    hid[hsize] = p
                    akey[p] = vh
                    hsize += 1
                _heapify(hkey, hid, hsize)
        else:
            for t in range(nt):
                p = t_id[t]
                if p == win:
                    continue
                vh = _value_high(kind, t_val[t], err)
                hsize = _heap_push(hkey, hid, hsize, vh - reach * length, p)
                akey[p] = vh + reach * disp
            for t in range(na):
                hsize = _heap_push(hkey, hid, hsize, aside_key[t], aside[t])
            stats[0] += nt
            stats[1] += 1
            if nt * scan_after > n_live:
                crowded += 1
                if crowded >= 3:
                    scanning = True
                    hsize = 0   # the heap is no longer used in this phase
            else:
                crowded = 0
        # ---- record the pick, retire it, move the running sum
        gi = pool[win]
        out[k] = gi
        q = where[win]
        last = live[n_live - 1]
        live[q] = last
        where[last] = q
        n_live -= 1
        _add_row(s_k, rows, gi, nx, mode == 1)


SCAN_AFTER = 8  # a step touching more than 1/8 of the live candidates three times in a row: full scans


def _form_bins_search(x: np.ndarray, bins: int, gain: str, lam: float = 1.0, progress=None,
                      stats: dict | None = None, scan_after: int = SCAN_AFTER) -> list[np.ndarray]:
    """Bins by exact pruned search (see the section comment); ``stats`` (a dict) receives the counters."""
    rows = _feature_rows(x)
    n = rows.shape[0]
    nx = _row_sq_norms(rows)
    mode = _SEARCH_MODES[gain]
    everything = np.arange(n, dtype=np.int64)
    s_all = _sum_rows(rows, everything, nx, False) if mode != 1 else None
    taken = np.zeros(n, dtype=bool)
    counters = np.zeros(4, dtype=np.int64)
    out = []
    for size in bin_sizes(n, bins):
        pool = np.flatnonzero(~taken).astype(np.int64)
        base = 0.5 * lam * _sum_rows(rows, pool, nx, True) if mode == 1 else s_all
        picks = np.empty(int(size), dtype=np.int64)
        if mode == 1 and pool.shape[0] == 2:
            # two left: G(a) - G(b) = lam (sim(a, a) - sim(b, b)), the cross terms cancel exactly; sim(x, x)
            # is 1 (0.5 for a zero row). Summed dot products would round this exact tie either way.
            self_a, self_b = (1.0 if nx[i] > 0 else 0.5 for i in pool)
            order = pool if lam * (self_a - self_b) >= 0 else pool[::-1]
            picks[:] = order[: int(size)]
        else:
            _search_bin(rows, nx, pool, int(size), mode, n, base, picks, counters, int(scan_after))
        taken[picks] = True
        out.append(picks)
        if progress is not None:
            for _ in range(int(size)):
                progress(1)
    if stats is not None:
        heap_touched, heap_steps, scan_touched, scan_steps = (int(c) for c in counters)
        stats.update(picks=n, heap_steps=heap_steps, heap_touched=heap_touched, scan_steps=scan_steps,
                     scan_touched=scan_touched,
                     touched_per_heap_step=heap_touched / heap_steps if heap_steps else 0.0,
                     touched_per_pick=(heap_touched + scan_touched) / n)
    return out


# ----------------------------------------------------------------------------------------------
# Triton path: fused gain update + masked argmax, then a one-program reduction that records the pick

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_argmax import reduce_block_winners, store_block_argmax

    @triton.jit
    def _gain_step_kernel(rows_ptr, sq_ptr, acc_ptr, base_ptr, alive_ptr, chosen_ptr, blk_val_ptr, blk_idx_ptr,
                          weights_ptr, k, n, d, stride, has_new,
                          KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One pass over a block of candidate rows: acc += k(new, x); score; block max and first argmax.

        Everything after the float32 feature loads is float64: the products f(new) f(x) are exact in float64
        and the running sums never round to float32, whose unit at N = 128k (about 1 per step) flips
        near-ties late in a bin. The step weights (alpha, beta) come from a float64 table (row k).
        """
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = offs < n
        alive = tl.load(alive_ptr + offs, mask=inside, other=0) != 0
        acc = tl.load(acc_ptr + offs, mask=inside, other=0.0)
        if has_new != 0:
            new = tl.load(chosen_ptr)
            dot = tl.zeros((BLOCK_N,), dtype=tl.float64)
            for d0 in range(0, d, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                f_new = tl.load(rows_ptr + new * stride + rd, mask=rd < d, other=0.0).to(tl.float64)
                tile = tl.load(rows_ptr + offs[:, None] * stride + rd[None, :],
                               mask=alive[:, None] & (rd[None, :] < d), other=0.0).to(tl.float64)
                dot += tl.sum(tile * f_new[None, :], axis=1)
            if KIND == 0:
                sq_new = tl.load(sq_ptr + new)
                sq_x = tl.load(sq_ptr + offs, mask=inside, other=0.0)
                kern = tl.maximum(sq_x + sq_new - 2.0 * dot, 0.0)
            else:
                kern = 0.5 + 0.5 * dot
            acc = tl.where(alive, acc + kern, acc)
            tl.store(acc_ptr + offs, acc, mask=inside)
        alpha = tl.load(weights_ptr + 2 * k)
        beta = tl.load(weights_ptr + 2 * k + 1)
        base = tl.load(base_ptr + offs, mask=inside, other=0.0)
        score = tl.where(alive, alpha * acc + beta * base, -float("inf"))
        store_block_argmax(score, alive, offs, n, pid, blk_val_ptr, blk_idx_ptr, BLOCK_N)

    @triton.jit
    def _pick_kernel(blk_val_ptr, blk_idx_ptr, n_blocks, alive_ptr, chosen_ptr, order_ptr, k,
                     BLOCK: tl.constexpr):
        """Reduce the block winners (lowest index on ties), record the pick, retire it from the pool."""
        pick = reduce_block_winners(blk_val_ptr, blk_idx_ptr, n_blocks, BLOCK)
        tl.store(chosen_ptr, pick)
        tl.store(order_ptr + k, pick)
        tl.store(alive_ptr + pick, 0)


def _form_bins_triton(x: np.ndarray, bins: int, gain: str, lam: float, block_n: int = 1024,
                      progress=None) -> list[np.ndarray]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, d = x.shape
    rows_np, sq_np, kind = _prepare(x, gain)
    base_all = _fixed_term(rows_np, sq_np, kind, rows_np) if kind == 0 else None
    block_d = max(16, min(128, triton.next_power_of_2(d)))
    taken = np.zeros(n, dtype=bool)
    out = []
    for size in bin_sizes(n, bins):
        pool = np.flatnonzero(~taken)
        m = pool.shape[0]
        base_np = base_all[pool] if kind == 0 else _fixed_term(rows_np[pool], sq_np[pool], kind, rows_np[pool])
        rows = torch.from_numpy(np.ascontiguousarray(rows_np[pool])).to(dev)
        sq = torch.from_numpy(np.ascontiguousarray(sq_np[pool], dtype=np.float64)).to(dev)
        base = torch.from_numpy(np.ascontiguousarray(base_np, dtype=np.float64)).to(dev)
        weights = torch.tensor([_weights(gain, k, n, lam) for k in range(int(size))], dtype=torch.float64,
                               device=dev).reshape(-1)
        acc = torch.zeros(m, dtype=torch.float64, device=dev)
        alive = torch.ones(m, dtype=torch.int8, device=dev)
        chosen = torch.zeros(1, dtype=torch.int32, device=dev)
        order = torch.empty(int(size), dtype=torch.int32, device=dev)
        bn = min(block_n, max(16, triton.next_power_of_2(m)))
        n_blocks = triton.cdiv(m, bn)
        blk_val = torch.empty(n_blocks, dtype=torch.float64, device=dev)
        blk_idx = torch.empty(n_blocks, dtype=torch.int32, device=dev)
        reduce_block = max(16, triton.next_power_of_2(n_blocks))
        for k in range(int(size)):
            _gain_step_kernel[(n_blocks,)](rows, sq, acc, base, alive, chosen, blk_val, blk_idx, weights, k,
                                           m, d, rows.stride(0), int(k > 0),
                                           KIND=kind, BLOCK_N=bn, BLOCK_D=block_d)
            _pick_kernel[(1,)](blk_val, blk_idx, n_blocks, alive, chosen, order, k, BLOCK=reduce_block)
            if progress is not None:
                progress(1)
        members = pool[order.cpu().numpy().astype(np.int64)]
        taken[members] = True
        out.append(members)
    return out


# ----------------------------------------------------------------------------------------------
# dispatch


def form_bins(features, bins: int = 10, gain: str = "paper", device: str | None = "auto",
              memory: int | None = None, lam: float = 1.0, progress=None,
              cpu_path: str | None = None) -> tuple[list[np.ndarray], str]:
    """Partition the N patches into ``bins`` bins by the greedy rule of eq. 1 (or a variant).

    Parameters
    ----------
    features : (N, D) array or tensor, finite. float32 and float64 arrays are used without a copy.
    bins : number of bins B, 1 <= B <= N.
    gain : 'paper' (eq. 1), 'dq' (GraphCut on 0.5 + 0.5 cos, lambda ``lam``) or 'biomedseg'.
    device : 'auto' (Triton for CUDA tensors, else CPU), 'cpu', 'triton', 'numpy' (the reference).
    memory : bytes the Gram matrix may take (default 1 GiB): decides gram vs search for dq and biomedseg,
        and gram vs running on the ``sums`` path.
    progress : optional callable, called with 1 for every pick (at the end of each bin on the search path).
    cpu_path : internal, for tests and benchmarks: 'search' (exact pruned search around the moving
        centre), 'gram' (N x N Gram matrix, running sums), 'running' (one kernel row per pick) or 'sums'
        (gram when it fits ``memory``, else running: the default before the search path). Default: 'search'
        for the paper gain; for dq and biomedseg 'gram' while it fits ``memory``, else 'search'.

    Returns
    -------
    (bins, path): list of B int64 arrays of patch indices in greedy order, and the path that ran
    ('reference', 'search', 'gram', 'running' or 'triton').
    """
    is_tensor = isinstance(features, torch.Tensor)
    tensor_device = str(features.device) if is_tensor else "cpu"
    x = features.detach().cpu().numpy() if is_tensor else features
    x = _check(x, bins, gain)
    path = pick_device(device, tensor_device)
    if path == "numpy":
        return form_bins_reference(x, bins, gain, lam), "reference"
    if path == "triton":
        return _form_bins_triton(x, bins, gain, lam, progress=progress), "triton"
    if cpu_path is None:
        # measured (N = 10,063, D = 768, seeded synthetic features): the search wins for the paper gain
        # (0.23 s vs 1.6 s CPU), but dq and biomedseg turn their query fast (herding-like), the search falls
        # back to full scans and the Gram path is 5-6x faster while it fits; beyond it, the exact scans.
        fits = gram_bytes(x.shape[0]) <= (DEFAULT_MEMORY if memory is None else int(memory))
        cpu_path = "gram" if gain != "paper" and fits else "search"
    if cpu_path == "search":
        return _form_bins_search(x, bins, gain, lam, progress=progress), "search"
    if cpu_path not in ("gram", "running", "sums"):
        raise ValueError(f"cpu_path must be search, gram, running or sums, got {cpu_path!r}")
    if cpu_path == "gram":
        memory = max(gram_bytes(x.shape[0]), DEFAULT_MEMORY if memory is None else int(memory))
    elif cpu_path == "running":
        memory = 0
    return _form_bins_cpu(x, bins, gain, lam, memory, progress=progress)
