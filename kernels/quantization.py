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


def _check(features: np.ndarray, bins: int, gain: str) -> np.ndarray:
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
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
    """sim(a, b) = 0.5 + 0.5 cos(a, b) for all pairs (float64)."""
    u = unit_rows(x)
    return 0.5 + 0.5 * (u @ u.T)


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
# Triton path: fused gain update + masked argmax, then a one-program reduction that records the pick

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gain_step_kernel(rows_ptr, sq_ptr, acc_ptr, base_ptr, alive_ptr, chosen_ptr, blk_val_ptr, blk_idx_ptr,
                          n, d, stride, alpha, beta, has_new,
                          KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One pass over a block of candidate rows: acc += k(new, x); score; block max and first argmax."""
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = offs < n
        alive = tl.load(alive_ptr + offs, mask=inside, other=0) != 0
        acc = tl.load(acc_ptr + offs, mask=inside, other=0.0)
        if has_new != 0:
            new = tl.load(chosen_ptr)
            dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                f_new = tl.load(rows_ptr + new * stride + rd, mask=rd < d, other=0.0)
                tile = tl.load(rows_ptr + offs[:, None] * stride + rd[None, :],
                               mask=alive[:, None] & (rd[None, :] < d), other=0.0)
                dot += tl.sum(tile * f_new[None, :], axis=1)
            if KIND == 0:
                sq_new = tl.load(sq_ptr + new)
                sq_x = tl.load(sq_ptr + offs, mask=inside, other=0.0)
                k = tl.maximum(sq_x + sq_new - 2.0 * dot, 0.0)
            else:
                k = 0.5 + 0.5 * dot
            acc = tl.where(alive, acc + k, acc)
            tl.store(acc_ptr + offs, acc, mask=inside)
        base = tl.load(base_ptr + offs, mask=inside, other=0.0)
        score = tl.where(alive, alpha * acc + beta * base, -float("inf"))
        best = tl.max(score, axis=0)
        # first index attaining the max; -1 when the block has no live candidate
        cand = tl.where(alive & (score == best), offs, n + BLOCK_N)
        idx = tl.min(cand, axis=0)
        idx = tl.where(idx < n, idx, -1)
        tl.store(blk_val_ptr + pid, best)
        tl.store(blk_idx_ptr + pid, idx)

    @triton.jit
    def _pick_kernel(blk_val_ptr, blk_idx_ptr, n_blocks, alive_ptr, chosen_ptr, order_ptr, k,
                     BLOCK: tl.constexpr):
        """Reduce the block winners (lowest index on ties), record the pick, retire it from the pool."""
        offs = tl.arange(0, BLOCK)
        idx = tl.load(blk_idx_ptr + offs, mask=offs < n_blocks, other=-1)
        val = tl.load(blk_val_ptr + offs, mask=offs < n_blocks, other=-float("inf"))
        valid = idx >= 0
        val = tl.where(valid, val, -float("inf"))
        best = tl.max(val, axis=0)
        big = 2147483647
        cand = tl.where(valid & (val == best), idx, big)
        pick = tl.min(cand, axis=0)
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
        sq = torch.from_numpy(sq_np[pool].astype(np.float32)).to(dev)
        base = torch.from_numpy(base_np.astype(np.float32)).to(dev)
        acc = torch.zeros(m, dtype=torch.float32, device=dev)
        alive = torch.ones(m, dtype=torch.int8, device=dev)
        chosen = torch.zeros(1, dtype=torch.int32, device=dev)
        order = torch.empty(int(size), dtype=torch.int32, device=dev)
        bn = min(block_n, max(16, triton.next_power_of_2(m)))
        n_blocks = triton.cdiv(m, bn)
        blk_val = torch.empty(n_blocks, dtype=torch.float32, device=dev)
        blk_idx = torch.empty(n_blocks, dtype=torch.int32, device=dev)
        reduce_block = max(16, triton.next_power_of_2(n_blocks))
        for k in range(int(size)):
            alpha, beta = _weights(gain, k, n, lam)
            _gain_step_kernel[(n_blocks,)](rows, sq, acc, base, alive, chosen, blk_val, blk_idx,
                                           m, d, rows.stride(0), float(alpha), float(beta), int(k > 0),
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
              memory: int | None = None, lam: float = 1.0, progress=None) -> tuple[list[np.ndarray], str]:
    """Partition the N patches into ``bins`` bins by the greedy rule of eq. 1 (or a variant).

    Parameters
    ----------
    features : (N, D) array or tensor, finite.
    bins : number of bins B, 1 <= B <= N.
    gain : 'paper' (eq. 1), 'dq' (GraphCut on 0.5 + 0.5 cos, lambda ``lam``) or 'biomedseg'.
    device : 'auto' (Triton for CUDA tensors, else CPU), 'cpu', 'triton', 'numpy' (the reference).
    memory : bytes the CPU path may spend on the N x N Gram matrix (default 1 GiB); above it the
        running-sum path (one matrix-vector product per step, O(N D) memory) is used.
    progress : optional callable, called with 1 after every pick.

    Returns
    -------
    (bins, path): list of B int64 arrays of patch indices in greedy order, and the path that ran
    ('reference', 'gram', 'running' or 'triton').
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
    return _form_bins_cpu(x, bins, gain, lam, memory, progress=progress)

