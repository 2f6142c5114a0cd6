"""Blockwise pairwise squared Euclidean distances, and the fused distance + row-min used for coverage.

    d(a_i, b_j) = ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j          (REFERENCE.md section 3)

The expansion turns a tile of distances into one matrix product plus two norm vectors; it can round
below zero for (near-)duplicates, so every fast path clamps at 0. ``min_sq_distances`` fuses the tile with a
running row minimum, so coverage (distance of every patch to its nearest selected patch) never holds an
M x N matrix.

Paths (one dispatch function per kernel picks by device):
- ``numpy``: the float64 reference that defines the result, written from the difference itself.
- ``cpu``: torch/BLAS on blocks of rows (float64 accumulation by default).
- ``triton``: tile kernels for CUDA (``_sq_dist_tile_kernel``, ``_min_sq_dist_kernel``); they also run in the
  Triton interpreter (TRITON_INTERPRET=1), which is how the tests check them on a CPU-only machine.
  Defined only when Triton is installed; without it, asking for this path is a clear error.
"""

from __future__ import annotations

import numpy as np
import torch

from ._runtime import pick_device, triton_available

# ----------------------------------------------------------------------------------------------
# NumPy references (float64, from the difference, no expansion)


def sq_distances_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (M, N) matrix of ||a_i - b_j||^2, summed over the differences (the definition)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    for i in range(a.shape[0]):
        diff = b - a[i]
        out[i] = np.einsum("nd,nd->n", diff, diff)
    return out


def min_sq_distances_reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every row of ``a``: min_j ||a_i - b_j||^2 and the lowest j that attains it (float64, int64)."""
    d = sq_distances_reference(a, b)
    return d.min(axis=1), d.argmin(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# CPU path: torch/BLAS on blocks of rows


def _as_tensor(x, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype=dtype)


def _check_pair(a, b) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected two 2-D feature arrays, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def _sq_distances_cpu(a, b, dtype=torch.float64, block: int = 2048) -> np.ndarray:
    ta, tb = _as_tensor(a, dtype), _as_tensor(b, dtype)
    nb = (tb * tb).sum(1)
    out = torch.empty((ta.shape[0], tb.shape[0]), dtype=dtype)
    for lo in range(0, ta.shape[0], block):
        blk = ta[lo:lo + block]
        tile = torch.addmm(nb.unsqueeze(0), blk, tb.T, beta=1.0, alpha=-2.0)
        tile += (blk * blk).sum(1, keepdim=True)
        out[lo:lo + block] = tile.clamp_(min=0.0)
    return out.numpy()


def _min_sq_distances_cpu(a, b, dtype=torch.float64, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    ta, tb = _as_tensor(a, dtype), _as_tensor(b, dtype)
    na, nb = (ta * ta).sum(1), (tb * tb).sum(1)
    best = torch.full((ta.shape[0],), float("inf"), dtype=dtype)
    arg = torch.zeros((ta.shape[0],), dtype=torch.int64)
    # blocks over b: the running minimum keeps the earlier (lower) index on exact ties
    for lo in range(0, tb.shape[0], block):
        cols = tb[lo:lo + block]
        tile = torch.addmm(nb[lo:lo + block].unsqueeze(0), ta, cols.T, beta=1.0, alpha=-2.0)
        tile += na.unsqueeze(1)
        tile.clamp_(min=0.0)
        val, idx = tile.min(dim=1)  # torch returns the first minimal index
        better = val < best
        best = torch.where(better, val, best)
        arg = torch.where(better, idx + lo, arg)
    return best.numpy(), arg.numpy()


# ----------------------------------------------------------------------------------------------
# Triton path

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_sq_dist(a_ptr, b_ptr, rm, rn, M, N, D, stride_am, stride_bn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """(BLOCK_M, BLOCK_N) tile of ||a_m||^2 + ||b_n||^2 - 2 a_m.b_n for rows rm of a and rn of b, clamped at 0."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        na = tl.zeros((BLOCK_M,), dtype=tl.float32)
        nb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_ptr + rm[:, None] * stride_am + rd[None, :],
                        mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0).to(tl.float32)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rd[None, :],
                        mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0).to(tl.float32)
            # ieee: tf32 would cost ~3 decimal digits in the cross term
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            na += tl.sum(a * a, axis=1)
            nb += tl.sum(b * b, axis=1)
        return tl.maximum(na[:, None] + nb[None, :] - 2.0 * acc, 0.0)

    @triton.jit
    def _sq_dist_tile_kernel(a_ptr, b_ptr, out_ptr, M, N, D,
                             stride_am, stride_bn, stride_om,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of ||a||^2 + ||b||^2 - 2 a.b, clamped at 0."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dist = _tile_sq_dist(a_ptr, b_ptr, rm, rn, M, N, D, stride_am, stride_bn, BLOCK_M, BLOCK_N, BLOCK_D)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], dist,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _min_sq_dist_kernel(a_ptr, b_ptr, min_ptr, arg_ptr, M, N, D, stride_am, stride_bn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [pid*BLOCK_M, ...) of a against all of b: running min and first argmin, no M x N output."""
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK_M,), dtype=tl.int64)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            dist = _tile_sq_dist(a_ptr, b_ptr, rm, rn, M, N, D, stride_am, stride_bn, BLOCK_M, BLOCK_N, BLOCK_D)
            dist = tl.where(rn[None, :] < N, dist, float("inf"))
            tile_min = tl.min(dist, axis=1)
            tile_arg = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64) + n0
            better = tile_min < best  # strict: an earlier block keeps exact ties
            arg = tl.where(better, tile_arg, arg)
            best = tl.where(better, tile_min, best)
        tl.store(min_ptr + rm, best, mask=rm < M)
        tl.store(arg_ptr + rm, arg, mask=rm < M)


def _triton_inputs(a, b):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ta = _as_tensor(a, torch.float32).to(dev).contiguous()
    tb = _as_tensor(b, torch.float32).to(dev).contiguous()
    return ta, tb


def _block_d(d: int) -> int:
    return max(16, min(128, triton.next_power_of_2(d)))


def _sq_distances_triton(a, b, block_m: int = 64, block_n: int = 64) -> np.ndarray:
    ta, tb = _triton_inputs(a, b)
    M, D = ta.shape
    N = tb.shape[0]
    out = torch.empty((M, N), dtype=torch.float32, device=ta.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _sq_dist_tile_kernel[grid](ta, tb, out, M, N, D, ta.stride(0), tb.stride(0), out.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D))
    return out.cpu().numpy()


def _min_sq_distances_triton(a, b, block_m: int = 64, block_n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    ta, tb = _triton_inputs(a, b)
    M, D = ta.shape
    N = tb.shape[0]
    best = torch.empty((M,), dtype=torch.float32, device=ta.device)
    arg = torch.empty((M,), dtype=torch.int64, device=ta.device)
    _min_sq_dist_kernel[(triton.cdiv(M, block_m),)](ta, tb, best, arg, M, N, D, ta.stride(0), tb.stride(0),
                                                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D))
    return best.cpu().numpy(), arg.cpu().numpy()


if not triton_available():  # the module stays importable; the Triton path is a clear error

    def _sq_distances_triton(a, b, **blocks):
        pick_device("triton")  # raises: the Triton path needs the triton package

    def _min_sq_distances_triton(a, b, **blocks):
        pick_device("triton")  # raises: the Triton path needs the triton package


# ----------------------------------------------------------------------------------------------
# dispatch


def _tensor_device(x) -> str:
    return str(x.device) if isinstance(x, torch.Tensor) else "cpu"


def sq_distances(a, b, device: str | None = "auto", **blocks) -> np.ndarray:
    """Pairwise squared Euclidean distances D_ij = ||a_i - b_j||^2 as an (M, N) NumPy array.

    Parameters
    ----------
    a, b : (M, D) and (N, D) arrays or tensors of features.
    device : 'auto' (Triton on CUDA tensors, else CPU), 'cpu' (torch/BLAS, float64), 'triton', or 'numpy'
        (the float64 reference).
    """
    _check_pair(a, b)
    path = pick_device(device, _tensor_device(a))
    if path == "numpy":
        return sq_distances_reference(_numpy(a), _numpy(b))
    if path == "triton":
        return _sq_distances_triton(a, b, **blocks)
    return _sq_distances_cpu(a, b, **blocks)


def min_sq_distances(a, b, device: str | None = "auto", **blocks) -> tuple[np.ndarray, np.ndarray]:
    """For every row a_i: (min_j ||a_i - b_j||^2, the lowest j attaining it), fused so no (M, N) matrix exists.

    ``b`` must have at least one row. Same ``device`` choices as :func:`sq_distances`.
    """
    _check_pair(a, b)
    if b.shape[0] == 0:
        raise ValueError("min_sq_distances needs at least one row in b")
    path = pick_device(device, _tensor_device(a))
    if path == "numpy":
        return min_sq_distances_reference(_numpy(a), _numpy(b))
    if path == "triton":
        return _min_sq_distances_triton(a, b, **blocks)
    return _min_sq_distances_cpu(a, b, **blocks)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
