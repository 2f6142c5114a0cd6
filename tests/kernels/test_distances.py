"""Pairwise squared distances and the fused distance + row-min, every path against the float64 reference."""

import numpy as np
import pytest
import torch

from dqtool_kernels import distances as dist

PATHS = ["cpu", "triton"]


def _random(m, n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def _adversarial():
    """Duplicates, zero vectors and exact ties, in integers so float32 is exact."""
    rng = np.random.default_rng(3)
    a = rng.integers(-2, 3, size=(21, 7)).astype(np.float32)
    b = rng.integers(-2, 3, size=(33, 7)).astype(np.float32)
    a[0] = 0.0
    b[4] = 0.0
    b[10] = b[2]          # duplicate column candidates: the lower index must win
    a[5] = b[2]           # a row that coincides exactly with a point of b: distance 0
    return a, b


def test_reference_matches_definition():
    a, b = _random(5, 6, 4)
    want = np.array([[sum((float(x) - float(y)) ** 2 for x, y in zip(ra, rb)) for rb in b] for ra in a])
    np.testing.assert_allclose(dist.sq_distances_reference(a, b), want, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(70, 90, 37), (1, 1, 1), (65, 3, 130)])
def test_pairwise_random(path, shape):
    a, b = _random(*shape)
    want = dist.sq_distances_reference(a, b)
    got = dist.sq_distances(a, b, device=path)
    assert got.shape == want.shape
    tol = 1e-10 if path == "cpu" else 2e-5 * (1 + want.max())
    np.testing.assert_allclose(got, want, atol=tol, rtol=1e-5)
    assert (got >= 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_pairwise_adversarial_exact(path):
    a, b = _adversarial()
    want = dist.sq_distances_reference(a, b)
    np.testing.assert_array_equal(dist.sq_distances(a, b, device=path), want)


@pytest.mark.parametrize("path", PATHS)
def test_min_adversarial_ties_lowest_index(path):
    a, b = _adversarial()
    want_min, want_arg = dist.min_sq_distances_reference(a, b)
    got_min, got_arg = dist.min_sq_distances(a, b, device=path)
    np.testing.assert_array_equal(got_min, want_min)
    np.testing.assert_array_equal(got_arg, want_arg)
    assert got_min[5] == 0 and got_arg[5] == 2  # b[2] and b[10] tie at 0: lowest index


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(70, 130, 37), (1, 1, 3), (3, 200, 1)])
def test_min_random(path, shape):
    a, b = _random(*shape, seed=1)
    want_min, want_arg = dist.min_sq_distances_reference(a, b)
    got_min, got_arg = dist.min_sq_distances(a, b, device=path, block_m=16, block_n=32) if path == "triton" \
        else dist.min_sq_distances(a, b, device=path, block=17)
    np.testing.assert_allclose(got_min, want_min, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_arg, want_arg)


def test_cpu_matches_torch_cdist():
    a, b = _random(40, 50, 16, seed=2)
    want = torch.cdist(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy() ** 2
    np.testing.assert_allclose(dist.sq_distances(a, b, device="cpu"), want, rtol=1e-9, atol=1e-9)


def test_tensor_inputs_and_numpy_device():
    a, b = _random(4, 5, 3)
    np.testing.assert_allclose(dist.sq_distances(torch.from_numpy(a), torch.from_numpy(b), device="numpy"),
                               dist.sq_distances_reference(a, b))


def test_bad_shapes():
    with pytest.raises(ValueError, match="dimensions differ"):
        dist.sq_distances(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least one row"):
        dist.min_sq_distances(np.zeros((2, 3)), np.zeros((0, 3)))
