"""Farthest-first traversal (k-center): every path against the float64 NumPy reference."""

import itertools

import numpy as np
import pytest
import torch
from dqtool_kernels import kcenter as kc
from dqtool_kernels.distances import sq_distances_reference


def _features(kind, n, d, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(n, d)).astype(np.float32)
    if kind == "clustered":
        centres = rng.normal(size=(6, d)) * 4
        return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, d))).astype(np.float32)
    if kind == "ties":
        x = rng.integers(0, 3, size=(n, d)).astype(np.float32)
        if n >= 4:
            x[1] = x[n - 1]
            x[2] = 0.0
        return x
    if kind == "offset":
        return (4096 + rng.integers(0, 3, size=(n, d))).astype(np.float32)
    if kind == "identical":
        return np.ones((n, d), dtype=np.float32)
    raise ValueError(kind)


SHAPES = [(1, 3), (2, 1), (3, 1), (7, 3), (40, 5), (100, 3), (60, 768), (400, 16)]
KINDS = ["random", "clustered", "ties", "offset", "identical"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{n}-d{d}" for n, d in SHAPES])
def test_cpu_equals_reference(kind, shape):
    n, d = shape
    x = _features(kind, n, d, seed=n + d)
    for k in sorted({1, max(1, n // 3), n}):
        for first, seed in [(None, None), (n - 1, None), (None, 5)]:
            want = kc.kcenter_reference(x, k, first, seed)
            assert np.array_equal(kc.kcenter(x, k, first, seed, device="cpu"), want)
            c = want[0]
            assert np.array_equal(kc._kcenter_cpu(x, k, c, method="triangle"), want)
            assert len(set(want.tolist())) == k


@pytest.mark.parametrize("kind", ["random", "ties", "offset", "identical"])
def test_triton_equals_reference(kind):
    pytest.importorskip("triton")
    x = _features(kind, 23, 5, seed=1)            # the interpreter: small N, one block
    want = kc.kcenter_reference(x, 9)
    assert np.array_equal(kc.kcenter(x, 9, device="triton"), want)


@pytest.mark.parametrize("batch", [1, 2, 16])
@pytest.mark.parametrize("kind", ["ties", "identical", "offset"])
def test_blas_passes_of_any_width_give_the_reference(kind, batch):
    """Ties at the cut of a pass's candidates (duplicates, zero rows) must not change or stall the picks."""
    x = _features(kind, 120, 4, seed=batch)
    for first in (None, 7):
        c = kc._first_pick(x, first, None)
        assert np.array_equal(kc._kcenter_blas(x, 120, c, batch=batch), kc.kcenter_reference(x, 120, first=c))


@pytest.mark.parametrize("method", ["blas", "triangle"])
def test_pruned_rows_give_the_reference_at_larger_n(method):
    x = _features("clustered", 3000, 32, seed=3)
    stats = {}
    got = kc._kcenter_cpu(x, 300, kc._first_pick(x, None, None), stats=stats, method=method)
    assert np.array_equal(got, kc.kcenter_reference(x, 300))
    if method == "blas":
        assert stats["exact_entries_per_pick"] < 0.5 * x.shape[0]   # most entries ruled out by the product
    else:
        assert stats["full_rows_equivalent"] < 300                   # some row entries were skipped


def test_first_pick_and_farthest_first_property():
    x = _features("random", 200, 6, seed=2)
    picks = kc.kcenter(x, 50)
    d = sq_distances_reference(x, x)
    assert picks[0] == np.argmin(d.sum(axis=1))     # the most central patch
    radii = [d[picks[:j]][:, picks[j]].min() for j in range(1, 50)]
    assert all(a >= b for a, b in itertools.pairwise(radii))   # each pick is the farthest remaining patch
    assert kc.kcenter(x, 5, seed=7)[0] == np.random.default_rng(7).integers(200)
    assert kc.kcenter(x, 5, first=3)[0] == 3


def test_tensor_and_float64_input():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.array_equal(kc.kcenter(x, 10), kc.kcenter_reference(x.numpy(), 10))


def test_bad_input():
    x = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        kc.kcenter(x, 0)
    with pytest.raises(ValueError, match="k must be"):
        kc.kcenter(x, 6)
    with pytest.raises(ValueError, match="first must be"):
        kc.kcenter(x, 2, first=5)
    with pytest.raises(ValueError, match="NaN or inf"):
        kc.kcenter(np.array([[0.0], [np.inf]]), 1)
    with pytest.raises(ValueError, match="non-empty"):
        kc.kcenter(np.zeros((0, 2)), 1)
