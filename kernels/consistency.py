"""Consistency kernels for label-free model ranking (CTE, paper 004, eqs. 4-6).

Two kernels, each with a plain NumPy reference that defines the result, a numba CPU path, a Triton
path for CUDA (tested here under TRITON_INTERPRET=1) and one dispatch function:

``semantic_counts``
    Batched pixel counts behind the NHD score (eq. 5) and effective invariance (eq. 4) for many
    (unperturbed, perturbed) probability-map pairs at once, e.g. all models x perturbations x images
    in one call. For pair b with reference row r = ref_index[b] and foreground f = p > threshold::

        union[b] = #{x : f_r(x) or f_b(x)}
        flips[b] = #{x : f_r(x) xor f_b(x)}
        agree[b] = sum over {x : f_r(x) and f_b(x)} of sqrt(p_r(x) * p_b(x))

    (inside the union the hard labels agree only where both are foreground).

``rand_pair_counts``
    The pair counts of the foreground-restricted adapted Rand F-score (eq. 6) between a reference
    label map u (unperturbed) and a test map v (perturbed), without scipy.sparse. The region is
    R = (u > 0 or v > 0) minus the boundary band of u, the pixels where a one-step grey dilation
    and a one-step grey erosion of u with the cross (4-connected) footprint differ::

        band(u) = {x : max_{y in N4[x]} u(y) != min_{y in N4[x]} u(y)},  N4[x] = x and its 4 neighbours

    i.e. every pixel (instance or background) with a 4-neighbour inside the image that carries
    another id: the inner boundary of each instance *and* the one-pixel ring of background just
    outside it (neighbours outside the image do not count: the grey morphology's 'reflect' border).
    This is the band the paper's code removes, so a perturbed prediction that grows or shrinks every
    cell by one pixel is not penalised. Background pixels in R are singletons, so they add to the
    row/column sums of the other map only::

        same = sum_ij n_ij (n_ij - 1),  ref = sum_i a_i (a_i - 1),  test = sum_j b_j (b_j - 1)

    with n_ij = #{x in R : u = i > 0, v = j > 0}, a_i = #{x in R : u = i}, b_j = #{x in R : v = j}.
    F = same / (0.5 ref + 0.5 test).

Kernels take arrays and return arrays; they know nothing of files, the CLI or Cellpose.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._runtime import cpu_count, pick_device, torch_threads_kept, triton_available

__all__ = [
    "semantic_counts", "semantic_counts_reference", "semantic_counts_numba", "semantic_counts_triton",
    "rand_pair_counts", "rand_pair_counts_reference", "rand_pair_counts_numba",
    "rand_pair_counts_triton", "boundary_band_reference",
]


# --------------------------------------------------------------------------------------------------
# Semantic counts (NHD, EI)
# --------------------------------------------------------------------------------------------------

def semantic_counts_reference(p_ref: np.ndarray, p_test: np.ndarray, ref_index: np.ndarray,
                              threshold: float = 0.5):
    """NumPy reference: ``p_ref`` (R, N), ``p_test`` (B, N), ``ref_index`` (B,) -> union, flips, agree."""
    p_ref = np.asarray(p_ref, np.float32)
    p_test = np.asarray(p_test, np.float32)
    union = np.zeros(len(p_test), np.int64)
    flips = np.zeros(len(p_test), np.int64)
    agree = np.zeros(len(p_test), np.float64)
    for b, r in enumerate(np.asarray(ref_index)):
        p, q = p_ref[r], p_test[b]
        f, g = p > threshold, q > threshold
        union[b] = np.count_nonzero(f | g)
        flips[b] = np.count_nonzero(f ^ g)
        both = f & g
        agree[b] = np.sqrt(p[both].astype(np.float64) * q[both].astype(np.float64)).sum()
    return union, flips, agree


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _semantic_row(p, q, threshold):
    # branch-free so LLVM vectorises it; fastmath only reorders the float sum
    # The EI sum runs in float32 within a block (<= a few thousand pixels, 8 SIMD lanes) and in
    # float64 across blocks: relative error ~1e-6, twice the SIMD width of a float64 sum.
    n_union = 0
    n_flip = 0
    s = np.float32(0.0)
    for x in range(p.shape[0]):
        f = p[x] > threshold
        g = q[x] > threshold
        n_union += f | g
        n_flip += f ^ g
        s += math.sqrt(p[x] * q[x]) * np.float32(f & g)
    return n_union, n_flip, np.float64(s)


@numba.njit(cache=True, nogil=True, parallel=True)
def _semantic_numba(p_ref, p_test, ref_index, threshold, union, flips, agree, block):
    # Pairs sharing a reference row are swept together, block by block, so each reference block is
    # read from memory once and stays in cache for all its test rows (the pass is memory-bound).
    # Groups are independent (each writes only its own pairs): one group per thread.
    if ref_index.shape[0] == 0:
        return
    order = np.argsort(ref_index, kind="mergesort")
    n = p_test.shape[1]
    starts = [0]
    for t in range(1, order.shape[0]):
        if ref_index[order[t]] != ref_index[order[t - 1]]:
            starts.append(t)
    starts.append(order.shape[0])
    for k in numba.prange(len(starts) - 1):
        g, e = starts[k], starts[k + 1]
        r = ref_index[order[g]]
        for start in range(0, n, block):
            stop = min(start + block, n)
            ref_block = p_ref[r, start:stop]
            for t in range(g, e):
                b = order[t]
                nu, nf, s = _semantic_row(ref_block, p_test[b, start:stop], threshold)
                union[b] += nu
                flips[b] += nf
                agree[b] += s


def semantic_counts_numba(p_ref: np.ndarray, p_test: np.ndarray, ref_index: np.ndarray,
                          threshold: float = 0.5):
    """numba CPU path: one fused pass per pair, no temporaries."""
    p_ref = np.ascontiguousarray(p_ref, np.float32)
    p_test = np.ascontiguousarray(p_test, np.float32)
    ref_index = np.ascontiguousarray(ref_index, np.int64)
    b = p_test.shape[0]
    union, flips, agree = np.zeros(b, np.int64), np.zeros(b, np.int64), np.zeros(b, np.float64)
    with torch_threads_kept():  # numba's OpenMP layer would leave torch on every core
        _semantic_numba(p_ref, p_test, ref_index, np.float32(threshold), union, flips, agree, 2048)
    return union, flips, agree


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _semantic_kernel(p_ref_ptr, p_test_ptr, ref_index_ptr, union_ptr, flips_ptr, agree_ptr,
                         N, n_split, threshold, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # program (b, s) reduces pixels [s*CHUNK*BLOCK, (s+1)*CHUNK*BLOCK) of pair b into partials
        b = tl.program_id(0)
        s = tl.program_id(1)
        r = tl.load(ref_index_ptr + b)
        acc_union = tl.zeros([BLOCK], tl.int32)
        acc_flips = tl.zeros([BLOCK], tl.int32)
        acc_agree = tl.zeros([BLOCK], tl.float32)
        start = s * CHUNK * BLOCK
        for c in range(CHUNK):
            offs = start + c * BLOCK + tl.arange(0, BLOCK)
            m = offs < N
            p = tl.load(p_ref_ptr + r.to(tl.int64) * N + offs, mask=m, other=0.0)
            q = tl.load(p_test_ptr + b.to(tl.int64) * N + offs, mask=m, other=0.0)
            f = (p > threshold) & m
            g = (q > threshold) & m
            both = f & g
            acc_union += (f | g).to(tl.int32)
            acc_flips += (f ^ g).to(tl.int32)
            acc_agree += tl.where(both, tl.sqrt(p * q), 0.0)
        out = b * n_split + s
        tl.store(union_ptr + out, tl.sum(acc_union, axis=0))
        tl.store(flips_ptr + out, tl.sum(acc_flips, axis=0))
        tl.store(agree_ptr + out, tl.sum(acc_agree, axis=0))


def semantic_counts_triton(p_ref, p_test, ref_index, threshold: float = 0.5, block: int = 1024,
                           chunk: int = 16):
    """Triton path: grid (pairs, splits); partial sums per split, summed in float64 by torch.

    Within a split the EI sum accumulates in float32 (CHUNK*BLOCK pixels), then in float64.
    """
    import torch

    p_ref = torch.as_tensor(p_ref, dtype=torch.float32).contiguous()
    p_test = torch.as_tensor(p_test, dtype=torch.float32, device=p_ref.device).contiguous()
    ref_index = torch.as_tensor(np.asarray(ref_index), dtype=torch.int32, device=p_ref.device).contiguous()
    if p_ref.ndim != 2 or p_test.ndim != 2 or p_ref.shape[1] != p_test.shape[1]:
        raise ValueError(f"expected p_ref (R, N) and p_test (B, N), got {tuple(p_ref.shape)}, "
                         f"{tuple(p_test.shape)}")
    n_pairs, n = p_test.shape
    n_split = max(1, triton.cdiv(n, block * chunk))
    union = torch.empty((n_pairs, n_split), dtype=torch.int32, device=p_ref.device)
    flips = torch.empty_like(union)
    agree = torch.empty((n_pairs, n_split), dtype=torch.float32, device=p_ref.device)
    if n_pairs:
        _semantic_kernel[(n_pairs, n_split)](p_ref, p_test, ref_index, union, flips, agree, n, n_split,
                                             float(threshold), BLOCK=block, CHUNK=chunk)
    return (union.sum(1, dtype=torch.int64).cpu().numpy(), flips.sum(1, dtype=torch.int64).cpu().numpy(),
            agree.to(torch.float64).sum(1).cpu().numpy())


def semantic_counts(p_ref, p_test, ref_index=None, threshold: float = 0.5, device: str | None = "auto"):
    """Dispatch: union, flips and agreement sums for every (reference, test) pair.

    Parameters
    ----------
    p_ref : (R, N) float array or tensor, foreground probabilities of the unperturbed predictions.
    p_test : (B, N) float array or tensor, foreground probabilities of the perturbed predictions.
    ref_index : (B,) int, the reference row of each test row (default: ``arange(B)``, R == B).
    threshold : probability above which a pixel is foreground.
    device : 'auto' (Triton on CUDA tensors, else numba), 'cpu', 'triton' or 'numpy'.

    Returns
    -------
    union, flips : (B,) int64; agree : (B,) float64 (see the module docstring).
    """
    tensor_device = str(getattr(p_test, "device", "cpu"))
    path = pick_device(device, tensor_device)
    if ref_index is None:
        ref_index = np.arange(len(p_test))
    ref_index = np.asarray(ref_index, np.int64)
    if len(ref_index) != len(p_test):
        raise ValueError(f"ref_index has {len(ref_index)} entries for {len(p_test)} test rows")
    if len(ref_index) and (ref_index.min() < 0 or ref_index.max() >= len(p_ref)):
        raise ValueError(f"ref_index must lie in [0, {len(p_ref)}), got [{ref_index.min()}, {ref_index.max()}]")
    if path == "triton":
        return semantic_counts_triton(p_ref, p_test, ref_index, threshold)
    p_ref = p_ref.detach().cpu().numpy() if hasattr(p_ref, "detach") else p_ref
    p_test = p_test.detach().cpu().numpy() if hasattr(p_test, "detach") else p_test
    if np.shape(p_ref)[1:] != np.shape(p_test)[1:]:
        raise ValueError(f"expected p_ref (R, N) and p_test (B, N), got {np.shape(p_ref)}, {np.shape(p_test)}")
    if path == "numpy":
        return semantic_counts_reference(p_ref, p_test, ref_index, threshold)
    return semantic_counts_numba(p_ref, p_test, ref_index, threshold)


# --------------------------------------------------------------------------------------------------
# Adapted Rand pair counts
# --------------------------------------------------------------------------------------------------

def boundary_band_reference(u: np.ndarray) -> np.ndarray:
    """Boundary band of ``u``: a one-step grey dilation and grey erosion (cross footprint) differ there.

    ``max`` and ``min`` of u over a pixel and its 4 neighbours differ exactly where some 4-neighbour
    carries another id than the pixel, so the band holds the inner boundary of every instance and
    the one-pixel ring of background just outside it (label 0 is an id like any other here).
    Neighbours outside the image do not count (the 'reflect' border of ``scipy.ndimage.grey_dilation``
    / ``grey_erosion``; same as ``skimage.segmentation.find_boundaries(u, connectivity=1, mode='thick')``).
    """
    u = np.asarray(u)
    differs = np.zeros(u.shape, bool)
    differs[1:, :] |= u[1:, :] != u[:-1, :]
    differs[:-1, :] |= u[:-1, :] != u[1:, :]
    differs[:, 1:] |= u[:, 1:] != u[:, :-1]
    differs[:, :-1] |= u[:, :-1] != u[:, 1:]
    return differs


def _pair_sum(counts: np.ndarray) -> int:
    counts = np.asarray(counts, np.int64)
    return int((counts * (counts - 1)).sum())


def rand_pair_counts_reference(u: np.ndarray, v: np.ndarray):
    """NumPy reference: (same, ref, test) pair counts as Python ints (see the module docstring)."""
    u = np.asarray(u).astype(np.int64)
    v = np.asarray(v).astype(np.int64)
    region = ((u > 0) | (v > 0)) & ~boundary_band_reference(u)
    ur, vr = u[region], v[region]
    both = (ur > 0) & (vr > 0)
    _, n_ij = np.unique(np.stack([ur[both], vr[both]]), axis=1, return_counts=True)
    _, a_i = np.unique(ur[ur > 0], return_counts=True)
    _, b_j = np.unique(vr[vr > 0], return_counts=True)
    return _pair_sum(n_ij), _pair_sum(a_i), _pair_sum(b_j)


_HASH_MULT = 0x2545F4914F6CDD1D  # odd 63-bit constant (Fibonacci-style multiplicative hashing)
_EMPTY = -1


@numba.njit(cache=True, inline="always")
def _slot(key, mask):
    return ((key * np.int64(_HASH_MULT)) >> np.int64(17)) & mask


@numba.njit(cache=True)
def _rehash(keys, counts):
    cap = keys.shape[0] * 2
    new_keys = np.full(cap, _EMPTY, np.int64)
    new_counts = np.zeros(cap, np.int64)
    mask = np.int64(cap - 1)
    for i in range(keys.shape[0]):
        k = keys[i]
        if k != _EMPTY:
            s = _slot(k, mask)
            while new_keys[s] != _EMPTY:
                s = (s + 1) & mask
            new_keys[s] = k
            new_counts[s] = counts[i]
    return new_keys, new_counts


@numba.njit(cache=True, boundscheck=False)
def _rand_row(u, v, r, a, b, keys, counts, stride):
    """One image row of the fused pass; returns how many new (i, j) keys it added to the table."""
    h, w = u.shape
    mask = np.int64(keys.shape[0] - 1)
    added = 0
    last_key = np.int64(_EMPTY)
    last_slot = np.int64(0)
    row, test_row = u[r], v[r]
    # outside the image a neighbour reads as the pixel's own row, so it never makes a boundary
    up = u[r - 1] if r > 0 else row
    down = u[r + 1] if r < h - 1 else row
    for c in range(w):
        x = row[c]
        y = test_row[c]
        if (x | y) == 0:
            continue
        left = row[c - 1] if c > 0 else x
        right = row[c + 1] if c < w - 1 else x
        if (up[c] != x) | (down[c] != x) | (left != x) | (right != x):
            continue  # boundary band of u (dilation != erosion): inner boundary and outer ring
        if x == 0:
            b[y] += 1  # a singleton of u inside a v instance
            continue
        a[x] += 1
        if y == 0:
            continue
        b[y] += 1
        key = np.int64(x) * stride + np.int64(y)
        if key == last_key:  # runs of one (i, j) pair are the common case
            counts[last_slot] += 1
            continue
        s = _slot(key, mask)
        while keys[s] != _EMPTY and keys[s] != key:
            s = (s + 1) & mask
        if keys[s] == _EMPTY:
            keys[s] = key
            added += 1
        counts[s] += 1
        last_key = key
        last_slot = s
    return added


@numba.njit(cache=True, nogil=True)
def _rand_band(u, v, r0, r1, n_u, n_v, capacity):
    """Rows r0..r1-1 of the fused pass: (pair keys, their counts, a, b) for that band of rows.

    The band test of a row reads the rows above and below it, which may lie in another band: bands
    share nothing but read-only pixels, so they run in parallel threads (nogil).
    """
    h, w = u.shape
    a = np.zeros(n_u + 1, np.int64)
    b = np.zeros(n_v + 1, np.int64)
    keys = np.full(capacity, _EMPTY, np.int64)
    counts = np.zeros(capacity, np.int64)
    used = 0
    stride = np.int64(n_v + 1)
    for r in range(r0, r1):
        # a row adds at most w keys: grow before it so the load factor stays below 1/2
        while 2 * (used + w) > keys.shape[0]:
            keys, counts = _rehash(keys, counts)
        used += _rand_row(u, v, r, a, b, keys, counts, stride)
    out_keys = np.empty(used, np.int64)
    out_counts = np.empty(used, np.int64)
    k = 0
    for i in range(keys.shape[0]):
        if keys[i] != _EMPTY:
            out_keys[k] = keys[i]
            out_counts[k] = counts[i]
            k += 1
    return out_keys, out_counts, a, b


@numba.njit(cache=True)
def _merge_pair_sum(keys, counts):
    """sum over distinct keys of n (n - 1), n = the summed counts of that key (keys from all bands)."""
    order = np.argsort(keys)
    total = np.int64(0)
    i = 0
    while i < order.shape[0]:
        key = keys[order[i]]
        n = np.int64(0)
        while i < order.shape[0] and keys[order[i]] == key:
            n += counts[order[i]]
            i += 1
        total += n * (n - 1)
    return total


@numba.njit(cache=True)
def _array_pair_sum(x):
    total = np.int64(0)
    for i in range(x.shape[0]):
        total += x[i] * (x[i] - 1)
    return total


def _rand_numba(u, v, n_u, n_v, capacity, threads=1):
    """The pass over ``threads`` bands of rows (parallel, nogil), merged into (same, ref, test)."""
    h = u.shape[0]
    bounds = np.linspace(0, h, max(1, min(threads, h)) + 1).astype(np.int64)
    jobs = [(int(r0), int(r1)) for r0, r1 in zip(bounds[:-1], bounds[1:])]
    if len(jobs) == 1:
        parts = [_rand_band(u, v, 0, h, n_u, n_v, capacity)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(jobs)) as pool:
            parts = list(pool.map(lambda job: _rand_band(u, v, job[0], job[1], n_u, n_v, capacity), jobs))
    keys = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    a = parts[0][2] if len(parts) == 1 else np.sum([p[2] for p in parts], axis=0)
    b = parts[0][3] if len(parts) == 1 else np.sum([p[3] for p in parts], axis=0)
    return _merge_pair_sum(keys, counts), _array_pair_sum(a), _array_pair_sum(b)


def _next_pow2(n: int) -> int:
    return 1 << max(4, int(n - 1).bit_length())


def _compact_ids(labels: np.ndarray) -> np.ndarray:
    """Ids that would make dense count arrays too large are renumbered 1..n (0 stays 0)."""
    flat = labels.ravel()
    ids, inverse = np.unique(flat, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse + offset).reshape(labels.shape).astype(np.int64)


def _prepare_labels(u, v):
    u = np.asarray(u)
    v = np.asarray(v)
    if u.shape != v.shape or u.ndim != 2:
        raise ValueError(f"expected two 2-D label maps of one shape, got {u.shape} and {v.shape}")
    for name, arr in (("reference", u), ("test", v)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} labels must be integers, got {arr.dtype}")
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise ValueError(f"{name} labels must be >= 0, got min {arr.min()}")
    # numba mixes uint64 with int64 into float64: unsigned 64-bit ids go to int64 (they fit below 2**63)
    u = u.astype(np.int64) if u.dtype == np.uint64 else u
    v = v.astype(np.int64) if v.dtype == np.uint64 else v
    limit = 4 * u.size + 1024
    n_u = int(u.max()) if u.size else 0
    n_v = int(v.max()) if v.size else 0
    if n_u > limit:
        u, n_u = _compact_ids(u), None
    if n_v > limit:
        v, n_v = _compact_ids(v), None
    n_u = int(u.max()) if n_u is None else n_u
    n_v = int(v.max()) if n_v is None else n_v
    return u, v, n_u, n_v


#: maps below this many pixels stay on one thread (a thread pool's start-up is not worth it there)
_PARALLEL_PIXELS = 1 << 18


def rand_pair_counts_numba(u: np.ndarray, v: np.ndarray, threads: int | None = None):
    """numba CPU path: one fused pass (band test, row/column sums, open-addressing hash of n_ij).

    ``threads`` bands of rows run in parallel (default: the CPUs this process may use, one thread
    for maps under 2**18 pixels); every band keeps its own table and sums, merged exactly after.
    """
    u, v, n_u, n_v = _prepare_labels(u, v)
    u = np.ascontiguousarray(u)
    v = np.ascontiguousarray(v)
    if threads is None:
        threads = cpu_count() if u.size >= _PARALLEL_PIXELS else 1
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    # per-band sums are (n_u + n_v) long: keep huge id ranges on one band rather than copy them per thread
    if (n_u + n_v) * int(threads) > 8 * u.size + 4096:
        threads = 1
    capacity = _next_pow2(4 * (n_u + n_v) // max(1, int(threads)) + 4 * u.shape[1] + 64)
    same, ref, test = _rand_numba(u, v, n_u, n_v, capacity, int(threads))
    return int(same), int(ref), int(test)


if triton_available():

    @triton.jit
    def _rand_kernel(u_ptr, v_ptr, H, W, keys_ptr, counts_ptr, a_ptr, b_ptr, overflow_ptr,
                     stride_key, table_mask, BLOCK: tl.constexpr, MAX_PROBES: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < H * W
        row = offs // W
        col = offs % W
        x = tl.load(u_ptr + offs, mask=inb, other=0)
        y = tl.load(v_ptr + offs, mask=inb, other=0)
        # neighbours outside the image read as the pixel itself, so they never make a boundary
        up = tl.load(u_ptr + offs - W, mask=inb & (row > 0), other=0)
        up = tl.where(row > 0, up, x)
        down = tl.load(u_ptr + offs + W, mask=inb & (row < H - 1), other=0)
        down = tl.where(row < H - 1, down, x)
        left = tl.load(u_ptr + offs - 1, mask=inb & (col > 0), other=0)
        left = tl.where(col > 0, left, x)
        right = tl.load(u_ptr + offs + 1, mask=inb & (col < W - 1), other=0)
        right = tl.where(col < W - 1, right, x)
        band = (up != x) | (down != x) | (left != x) | (right != x)  # dilation != erosion of u
        region = inb & ((x > 0) | (y > 0)) & (band == 0)
        tl.atomic_add(a_ptr + x, 1, mask=region & (x > 0))
        tl.atomic_add(b_ptr + y, 1, mask=region & (y > 0))
        both = region & (x > 0) & (y > 0)
        key = x.to(tl.int64) * stride_key + y.to(tl.int64)
        h = ((key * 0x2545F4914F6CDD1D) >> 17) & table_mask
        done = both == 0
        k = 0
        remaining = tl.sum((done == 0).to(tl.int32), axis=0)
        while (remaining > 0) & (k < MAX_PROBES):
            slot = (h + k) & table_mask
            # finished lanes compare against -1, which no slot holds: a read, never a write
            cmp = tl.where(done, -1, 0).to(tl.int64)
            val = tl.where(done, -1, key).to(tl.int64)
            old = tl.atomic_cas(keys_ptr + slot, cmp, val)
            hit = (done == 0) & ((old == 0) | (old == key))
            tl.atomic_add(counts_ptr + slot, 1, mask=hit)
            done = done | hit
            k += 1
            remaining = tl.sum((done == 0).to(tl.int32), axis=0)
        tl.atomic_add(overflow_ptr + tl.zeros([BLOCK], tl.int32), 1, mask=done == 0)


def rand_pair_counts_triton(u, v, block: int = 1024, max_probes: int = 64):
    """Triton path: one fused pass with atomics (row/column sums) and an atomic_cas hash of n_ij.

    Keys are i * (max j + 1) + j >= 1 (0 marks an empty slot); the table has at least twice as many
    slots as pixels where both maps are foreground, so probe sequences stay short. A lane that does
    not find a slot in ``max_probes`` steps raises (never a silent wrong count).
    """
    import torch

    def as_labels(a):
        if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.unsignedinteger):
            a = a.astype(np.int64)  # torch has few kernels for unsigned types
        t = torch.as_tensor(a)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {t.dtype}")
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
            t = t.to(torch.int64)
        return t

    u_t, v_t = as_labels(u), as_labels(v)
    if u_t.shape != v_t.shape or u_t.ndim != 2:
        raise ValueError(f"expected two 2-D label maps of one shape, got {tuple(u_t.shape)}, {tuple(v_t.shape)}")
    dev = u_t.device
    n_u = int(u_t.max()) if u_t.numel() else 0
    n_v = int(v_t.max()) if v_t.numel() else 0
    if u_t.numel() and min(int(u_t.min()), int(v_t.min())) < 0:
        raise ValueError("labels must be >= 0")
    if max(n_u, n_v) >= 2**31 - 1 or max(n_u, n_v) > 4 * u_t.numel() + 1024:
        u_c, v_c, n_u, n_v = _prepare_labels(u_t.cpu().numpy(), v_t.cpu().numpy())
        u_t, v_t = torch.as_tensor(u_c, device=dev), torch.as_tensor(v_c, device=dev)
    u_t = u_t.to(torch.int32).contiguous()
    v_t = v_t.to(torch.int32, copy=False).to(dev).contiguous()
    h, w = u_t.shape
    capacity = _next_pow2(2 * max(1, min(h * w, n_u * n_v)))
    keys = torch.zeros(capacity, dtype=torch.int64, device=dev)
    counts = torch.zeros(capacity, dtype=torch.int32, device=dev)
    a = torch.zeros(n_u + 1, dtype=torch.int32, device=dev)
    b = torch.zeros(n_v + 1, dtype=torch.int32, device=dev)
    overflow = torch.zeros(1, dtype=torch.int32, device=dev)
    if h * w:
        grid = (triton.cdiv(h * w, block),)
        _rand_kernel[grid](u_t, v_t, h, w, keys, counts, a, b, overflow, n_v + 1, capacity - 1,
                           BLOCK=block, MAX_PROBES=max_probes)
    if int(overflow.item()):
        raise RuntimeError(f"{int(overflow.item())} pixels found no hash slot in {max_probes} probes")

    def pair_sum(t):
        t = t.to(torch.int64)
        return int((t * (t - 1)).sum().item())

    return pair_sum(counts), pair_sum(a), pair_sum(b)


def rand_pair_counts(u, v, device: str | None = "auto"):
    """Dispatch: (same, ref, test) pair counts of the foreground-restricted adapted Rand score.

    ``u`` is the reference (unperturbed) map whose boundary band (inner boundary and the background
    ring outside each instance, see :func:`boundary_band_reference`) is excluded, ``v``
    the test (perturbed) map; both 2-D non-negative integer arrays (NumPy or torch) of one shape.
    device: 'auto' (Triton on CUDA tensors, else numba), 'cpu', 'triton' or 'numpy'.
    """
    path = pick_device(device, str(getattr(u, "device", "cpu")))
    if path == "triton":
        return rand_pair_counts_triton(u, v)
    u = u.detach().cpu().numpy() if hasattr(u, "detach") else u
    v = v.detach().cpu().numpy() if hasattr(v, "detach") else v
    if path == "numpy":
        _prepare_labels(u, v)  # same input checks as the fast paths
        return rand_pair_counts_reference(u, v)
    return rand_pair_counts_numba(u, v)


if not triton_available():  # Triton is optional: the module stays importable, the Triton path is a clear error

    def semantic_counts_triton(*args, **kwargs):
        pick_device("triton")  # raises: the Triton path needs the triton package

    def rand_pair_counts_triton(*args, **kwargs):
        pick_device("triton")  # raises: the Triton path needs the triton package

