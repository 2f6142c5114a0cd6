"""k-center selection by farthest-first traversal (Gonzalez 1985): a subset that covers every patch.

Picks c_1..c_k one at a time. c_1 is the given ``first`` index, a uniformly drawn patch when a ``seed``
is given, or else the most central patch: argmin_x sum_p ||f(p) - f(x)||^2 = argmin_x ||f(x) - mean||^2
(the paper-gain DQ first pick; computed as N ||x||^2 - 2 x.s_D, exact for integer-valued features).
Then
    c_{j+1} = argmax_{x not picked} r_j(x),    r_j(x) = min_{i <= j} ||f(x) - f(c_i)||^2,
ties to the lowest index. max_x r_k(x) is the covering radius (squared) of the picks, at most twice the
optimal k-center radius (Gonzalez 1985). One distance row per pick and an incremental row-min: O(k N D).

Paths:
- ``kcenter_reference``: float64 NumPy, distances from the differences (defines the result).
- ``cpu``: the same rows and minima; a row entry is computed exactly (float64, from the differences) only
  where it can lower the minimum.
  'blas' (default): the next picks are almost always among the current farthest patches, so one BLAS
  product per pass gives the rows of the ``batch`` farthest; each serves as a bound
  (nx + nc - 2 x.c within (D + 8) u (nx + nc)) when its patch is picked; see ``_kcenter_blas``.
  'triangle' (numba): every patch x belongs to the pick a(x) that realises r(x). For a new pick c, if
  ||c - a|| >= 2 sqrt(r(x)) then ||x - c|| >= ||c - a|| - ||x - a|| >= sqrt(r(x)): no update. Whole groups
  are skipped with their largest r, and ||c - a|| is first bounded below through a few pivot picks p
  (| ||c - p|| - ||a - p|| | <= ||c - a||). Weak in high dimension (distances concentrate).
  All tests carry a floating-point margin, so the minima are those of the full row-min.
- ``triton``: one fused kernel per pick (distance row in float64 + row-min + block argmax), then a
  one-program reduction that records the pick; runs in the interpreter under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ._runtime import pick_device, triton_available

_U = 2.0 ** -53
PIVOTS = 8  # the first picks double as pivots for cheap lower bounds on pick-to-pick distances


def _check(features, k: int) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if not all(bool(np.isfinite(x[lo:lo + (1 << 14)]).all()) for lo in range(0, x.shape[0], 1 << 14)):
        raise ValueError("features contain NaN or inf")
    if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= x.shape[0]:
        raise ValueError(f"k must be an integer between 1 and the number of patches ({x.shape[0]}), got {k}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x)


def _first_pick(x: np.ndarray, first, seed) -> int:
    n = x.shape[0]
    if first is not None:
        if isinstance(first, bool) or int(first) != first or not 0 <= int(first) < n:
            raise ValueError(f"first must be a patch index between 0 and {n - 1}, got {first}")
        return int(first)
    if seed is not None:
        return int(np.random.default_rng(seed).integers(n))
    return int(_most_central(x))


@numba.njit(cache=True)
def _most_central(rows):
    """argmin_x N ||x||^2 - 2 x.s (s the sum of all rows, float64): the patch nearest the mean; lowest index."""
    n, d = rows.shape
    s = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            s[j] += np.float64(rows[i, j])
    best = np.inf
    arg = 0
    for i in range(n):
        nx = 0.0
        dot = 0.0
        for j in range(d):
            v = np.float64(rows[i, j])
            nx += v * v
            dot += v * s[j]
        score = n * nx - 2.0 * dot
        if score < best:
            best = score
            arg = i
    return arg


# ----------------------------------------------------------------------------------------------
# NumPy reference


def kcenter_reference(features, k: int, first: int | None = None, seed: int | None = None) -> np.ndarray:
    """Farthest-first traversal in float64 NumPy, one full distance row per pick (defines the result)."""
    from .distances import sq_distances_reference

    x = _check(features, k)
    n = x.shape[0]
    if first is None and seed is None:
        # the most central patch: smallest total squared distance to all patches (= nearest the mean)
        xd = x.astype(np.float64)
        total = n * np.einsum("nd,nd->n", xd, xd) - 2.0 * (xd @ xd.sum(axis=0))
        c = int(np.argmin(total))
    else:
        c = _first_pick(x, first, seed)
    picks = [c]
    picked = np.zeros(n, dtype=bool)
    picked[c] = True
    r = sq_distances_reference(x[[c]], x)[0]
    while len(picks) < int(k):
        c = int(np.argmax(np.where(picked, -1.0, r)))   # first maximum: lowest index
        picks.append(c)
        picked[c] = True
        r = np.minimum(r, sq_distances_reference(x[[c]], x)[0])
    return np.array(picks, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# CPU path (numba): row-min with exact triangle-inequality skips


@numba.njit(cache=True)
def _sq_dist(rows, i, c):
    """||rows[i] - rows[c]||^2 in float64 from the differences (the reference's formula), four partial sums
    in a fixed order (no fast-math: the same bits wherever it is called)."""
    d = rows.shape[1]
    a0 = a1 = a2 = a3 = 0.0
    j = 0
    while j + 4 <= d:
        e0 = np.float64(rows[i, j]) - np.float64(rows[c, j])
        e1 = np.float64(rows[i, j + 1]) - np.float64(rows[c, j + 1])
        e2 = np.float64(rows[i, j + 2]) - np.float64(rows[c, j + 2])
        e3 = np.float64(rows[i, j + 3]) - np.float64(rows[c, j + 3])
        a0 += e0 * e0
        a1 += e1 * e1
        a2 += e2 * e2
        a3 += e3 * e3
        j += 4
    tail = 0.0
    while j < d:
        e = np.float64(rows[i, j]) - np.float64(rows[c, j])
        tail += e * e
        j += 1
    return ((a0 + a1) + (a2 + a3)) + tail


@numba.njit(cache=True)
def _kcenter_numba(rows, k, first, stats):
    """Farthest-first picks; stats += [row entries computed, pick-to-pick distances computed]."""
    n, d = rows.shape
    grow = 1.0 + (4.0 * d + 16.0) * _U            # relative error bound of a computed squared distance
    picks = np.empty(k, dtype=np.int64)
    r = np.empty(n, dtype=np.float64)            # r(x): squared distance to the nearest pick
    owner = np.empty(n, dtype=np.int64)          # group (pick slot) of every patch
    nxt = np.full(n, -1, dtype=np.int64)         # linked member lists of the groups (unpicked patches only)
    head = np.full(k, -1, dtype=np.int64)
    g_max = np.full(k, -1.0)                     # largest r in the group, and its lowest index
    g_arg = np.full(k, -1, dtype=np.int64)
    n_piv = min(PIVOTS, k)
    piv = np.zeros((k, n_piv), dtype=np.float64)  # ||pick_j - pivot_p|| (Euclidean)
    cd = np.empty(n_piv, dtype=np.float64)
    c = first
    picks[0] = c
    # first row: every patch joins group 0
    tail = -1
    for i in range(n - 1, -1, -1):
        owner[i] = 0
        if i == c:
            r[i] = 0.0
            continue
        r[i] = _sq_dist(rows, i, c)
        nxt[i] = tail
        tail = i
        if r[i] > g_max[0] or (r[i] == g_max[0] and i < g_arg[0]):
            g_max[0] = r[i]
            g_arg[0] = i
    head[0] = tail
    stats[0] += n
    for j in range(1, k):
        # next pick: the largest r over the groups; ties to the lowest index
        best = -1.0
        c = -1
        for g in range(j):
            if g_arg[g] >= 0 and (g_max[g] > best or (g_max[g] == best and g_arg[g] < c)):
                best = g_max[g]
                c = g_arg[g]
        picks[j] = c
        # unlink c from its group (it stays there as a centre with r = 0)
        g0 = owner[c]
        prev = -1
        i = head[g0]
        while i != c:
            prev = i
            i = nxt[i]
        if prev < 0:
            head[g0] = nxt[c]
        else:
            nxt[prev] = nxt[c]
        r[c] = 0.0
        owner[c] = j
        # distances from c to the pivots (the first picks)
        for p in range(min(j, n_piv)):
            cd[p] = np.sqrt(_sq_dist(rows, c, picks[p]))
            stats[1] += 1
        if j < n_piv:
            for q in range(j):
                piv[q, j] = cd[q] if q < n_piv else 0.0
            for p in range(j):
                piv[j, p] = cd[p]
        else:
            for p in range(n_piv):
                piv[j, p] = cd[p]
        new_head = -1
        for g in range(j):
            if head[g] < 0:
                g_max[g] = -1.0
                g_arg[g] = -1
                continue
            # lower bound on ||c - a_g|| through the pivots; skip the group when it rules out every member
            lb = 0.0
            for p in range(min(j, n_piv)):
                lb = max(lb, abs(cd[p] - piv[g, p]) - (4.0 * d + 16.0) * _U * (cd[p] + piv[g, p]))
            # (c's own group is always walked: its largest r was c's)
            if g != g0 and lb > 0.0 and lb * lb >= 4.0 * g_max[g] * grow * grow:
                continue
            cg2 = _sq_dist(rows, c, picks[g])
            stats[1] += 1
            if g != g0 and cg2 >= 4.0 * g_max[g] * grow * grow:
                continue
            # members: update those that c may be nearer to; rebuild the group's max
            g_max[g] = -1.0
            g_arg[g] = -1
            prev = -1
            i = head[g]
            while i >= 0:
                following = nxt[i]
                moved = False
                if cg2 < 4.0 * r[i] * grow * grow:
                    dx = _sq_dist(rows, i, c)
                    stats[0] += 1
                    if dx < r[i]:
                        r[i] = dx
                        owner[i] = j
                        moved = True
                if moved:
                    if prev < 0:
                        head[g] = following
                    else:
                        nxt[prev] = following
                    nxt[i] = new_head
                    new_head = i
                else:
                    if r[i] > g_max[g] or (r[i] == g_max[g] and i < g_arg[g]):
                        g_max[g] = r[i]
                        g_arg[g] = i
                    prev = i
                i = following
        head[j] = new_head
        i = new_head
        while i >= 0:
            if r[i] > g_max[j] or (r[i] == g_max[j] and i < g_arg[j]):
                g_max[j] = r[i]
                g_arg[j] = i
            i = nxt[i]
    return picks


@numba.njit(cache=True)  # in-order sums; quantization._row_sq_norms reassociates (fastmath): not the same bits
def _sq_norms(rows):
    n, d = rows.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for j in range(d):
            v = np.float64(rows[i, j])
            acc += v * v
        out[i] = acc
    return out


@numba.njit(cache=True)
def _exact_row(rows, c, r, picked):
    """r = ||x - rows[c]||^2 for every row (the first pick's row); marks c picked."""
    for i in range(rows.shape[0]):
        r[i] = _sq_dist(rows, i, c)
    picked[c] = True


@numba.njit(cache=True)
def _farthest(r, picked):
    """Unpicked index with the largest r, lowest index on ties (-1 when all are picked)."""
    best = -1.0
    arg = -1
    for i in range(r.shape[0]):
        if not picked[i] and r[i] > best:
            best = r[i]
            arg = i
    return arg


@numba.njit(cache=True)
def _update_from_product(rows, nx, gram_col, c, r, err_rel):
    """r(x) = min(r(x), ||x - c||^2), computing the exact float64 entry only where the float32/64 BLAS value
    nx + nc - 2 x.c, less its error bound, is below r(x). Returns the number of exact entries computed."""
    nc = nx[c]
    count = 0
    for i in range(rows.shape[0]):
        approx = nx[i] + nc - 2.0 * np.float64(gram_col[i])
        if approx - err_rel * (nx[i] + nc) >= r[i]:
            continue        # even the exact value could not lower r(x)
        count += 1
        r[i] = min(r[i], _sq_dist(rows, i, c))
    return count


def _kcenter_blas(x: np.ndarray, k: int, first: int, batch: int = 128, stats: dict | None = None) -> np.ndarray:
    """Farthest-first with the distance rows of ``batch`` likely next picks from one BLAS product per pass.

    The next picks are almost always among the current farthest patches (a pick lowers r only near
    itself), so each pass multiplies the features by the ``batch`` largest-r candidates at once (one
    read of the features for many rows). Picks still go one at a time by the exact argmax of r; a pick
    whose row is in the pass updates r from the product, computing the exact float64 difference-form
    entry wherever the product, less its floating-point bound (D + 8) u (||x||^2 + ||c||^2), could reach
    r(x); a pick outside the pass starts the next pass. Same minima, hence same picks, as the reference.
    """
    n, d = x.shape
    nx = _sq_norms(x)
    u = float(np.finfo(x.dtype).eps) / 2
    err_rel = 2.0 * (d + 8.0) * u + 64.0 * (d + 8.0) * 2.0 ** -53
    feats = torch.from_numpy(x)
    r = np.empty(n, dtype=np.float64)
    picked = np.zeros(n, dtype=np.bool_)
    _exact_row(x, first, r, picked)
    picks = [int(first)]
    exact = n
    passes = 0
    while len(picks) < k:
        live = np.where(picked, -1.0, r)
        width = min(batch, n - len(picks))
        cand = np.argpartition(-live, width - 1)[:width]
        cand = cand[~picked[cand]]
        c = int(_farthest(r, picked))
        if c not in cand:        # ties at the cut: the exact next pick must be in the pass
            cand[-1] = c
        column = {int(c): j for j, c in enumerate(cand)}
        gram = (feats[torch.from_numpy(cand)] @ feats.T).numpy()     # (width, n), one pass over the features
        passes += 1
        while len(picks) < k:
            c = int(_farthest(r, picked))
            if c not in column:
                break
            picks.append(c)
            picked[c] = True
            exact += _update_from_product(x, nx, gram[column[c]], c, r, err_rel)
    if stats is not None:
        stats.update(picks=int(k), passes=passes, exact_entries=int(exact), exact_entries_per_pick=exact / k)
    return np.array(picks, dtype=np.int64)


def _kcenter_cpu(x: np.ndarray, k: int, first: int, stats: dict | None = None, method: str = "blas") -> np.ndarray:
    """CPU farthest-first: 'blas' (batched BLAS rows with exact float64 refinement, the default) or
    'triangle' (numba, triangle-inequality skips)."""
    if method == "blas":
        return _kcenter_blas(x, k, first, stats=stats)
    counters = np.zeros(2, dtype=np.int64)
    picks = _kcenter_numba(x, int(k), int(first), counters)
    if stats is not None:
        stats.update(row_entries=int(counters[0]), pick_distances=int(counters[1]), picks=int(k),
                     row_entries_per_pick=counters[0] / k, full_rows_equivalent=counters[0] / x.shape[0])
    return picks


# ----------------------------------------------------------------------------------------------
# Triton path: one fused row + row-min + block argmax per pick, then a one-program reduction

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_argmax import reduce_block_winners, store_block_argmax

    @triton.jit
    def _row_min_kernel(rows_ptr, r_ptr, picked_ptr, chosen_ptr, blk_val_ptr, blk_idx_ptr, n, d, stride,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """r(x) = min(r(x), ||x - c||^2) for a block of rows (float64 from the differences); block max of r
        over unpicked rows and its first index."""
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = offs < n
        c = tl.load(chosen_ptr)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
        for d0 in range(0, d, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            f_c = tl.load(rows_ptr + c * stride + rd, mask=rd < d, other=0.0).to(tl.float64)
            tile = tl.load(rows_ptr + offs[:, None] * stride + rd[None, :],
                           mask=inside[:, None] & (rd[None, :] < d), other=0.0).to(tl.float64)
            diff = tile - f_c[None, :]
            acc += tl.sum(diff * diff, axis=1)
        r = tl.load(r_ptr + offs, mask=inside, other=0.0)
        r = tl.minimum(r, acc)
        tl.store(r_ptr + offs, r, mask=inside)
        live = inside & (tl.load(picked_ptr + offs, mask=inside, other=1) == 0)
        store_block_argmax(tl.where(live, r, -1.0), live, offs, n, pid, blk_val_ptr, blk_idx_ptr, BLOCK_N)

    @triton.jit
    def _next_pick_kernel(blk_val_ptr, blk_idx_ptr, n_blocks, picked_ptr, chosen_ptr, order_ptr, j,
                          BLOCK: tl.constexpr):
        """Reduce the block winners (lowest index on ties), record pick j, mark it picked."""
        pick = reduce_block_winners(blk_val_ptr, blk_idx_ptr, n_blocks, BLOCK)
        tl.store(chosen_ptr, pick)
        tl.store(order_ptr + j, pick)
        tl.store(picked_ptr + pick, 1)


def _kcenter_triton(x, k: int, first: int, block_n: int = 1024) -> np.ndarray:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))).to(dev).contiguous()
    n, d = rows.shape
    r = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
    picked = torch.zeros(n, dtype=torch.int8, device=dev)
    picked[first] = 1
    chosen = torch.full((1,), first, dtype=torch.int32, device=dev)
    order = torch.empty(int(k), dtype=torch.int32, device=dev)
    order[0] = first
    bn = min(block_n, max(16, triton.next_power_of_2(n)))
    n_blocks = triton.cdiv(n, bn)
    blk_val = torch.empty(n_blocks, dtype=torch.float64, device=dev)
    blk_idx = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    block_d = max(16, min(128, triton.next_power_of_2(d)))
    reduce_block = max(16, triton.next_power_of_2(n_blocks))
    for j in range(1, int(k)):
        _row_min_kernel[(n_blocks,)](rows, r, picked, chosen, blk_val, blk_idx, n, d, rows.stride(0),
                                     BLOCK_N=bn, BLOCK_D=block_d)
        _next_pick_kernel[(1,)](blk_val, blk_idx, n_blocks, picked, chosen, order, j, BLOCK=reduce_block)
    return order.cpu().numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------
# dispatch


def kcenter(features, k: int, first: int | None = None, seed: int | None = None,
            device: str | None = "auto") -> np.ndarray:
    """Indices of ``k`` patches picked by farthest-first traversal (Gonzalez 1985), in pick order.

    Parameters
    ----------
    features : (N, D) array or tensor, finite. float32 and float64 arrays are used without a copy.
    k : number of picks, 1 <= k <= N.
    first : index of the first pick. When None: a uniformly drawn patch if ``seed`` is given, else the
        patch nearest the mean (smallest total squared distance to all patches; ties: lowest index).
    seed : seed of the first pick's draw (numpy.random.default_rng), used only when ``first`` is None.
    device : 'auto' (Triton for CUDA tensors, else CPU), 'cpu' (numba), 'triton', 'numpy' (the reference).

    Returns
    -------
    int64 array of k distinct indices; pick j+1 maximises the squared distance to the nearest of picks
    1..j (ties: lowest index). Covering radius: see ``distances.min_sq_distances``.
    """
    is_tensor = isinstance(features, torch.Tensor)
    tensor_device = str(features.device) if is_tensor else "cpu"
    path = pick_device(device, tensor_device)
    x = _check(features.detach().cpu().numpy() if is_tensor else features, k)
    if path == "numpy":
        return kcenter_reference(x, k, first, seed)
    c = _first_pick(x, first, seed)
    if path == "triton":
        return _kcenter_triton(features if is_tensor and tensor_device.startswith("cuda") else x, int(k), c)
    return _kcenter_cpu(x, int(k), c)
