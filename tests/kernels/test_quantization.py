"""Greedy bin formation (eq. 1 and the two released-code variants): every path against the NumPy reference."""

import numpy as np
import pytest
import torch

from dqtool_kernels import quantization as q
from dqtool_kernels.distances import sq_distances_reference

# (device, memory budget, CPU path): the Gram, running-sum and exact-search CPU paths, and the Triton kernels (interpreter)
PATHS = [("cpu", None, "gram"), ("cpu", 0, "running"), ("cpu", None, "search"), ("triton", None, None)]
PATH_IDS = ["gram", "running", "search", "triton"]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _integer_ties(n=37, d=5, seed=0):
    """Small integers: float32 sums are exact, so exact ties exist and must go to the lowest index."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(n, d)).astype(np.float32)
    x[4] = x[11] = x[20]     # duplicates
    x[7] = 0.0               # a zero vector (cosine 0 for the dq gain)
    x[8] = 0.0
    return x


def test_bin_sizes():
    np.testing.assert_array_equal(q.bin_sizes(23, 5), [5, 5, 5, 4, 4])
    np.testing.assert_array_equal(q.bin_sizes(1, 1), [1])
    with pytest.raises(ValueError):
        q.bin_sizes(3, 4)
    with pytest.raises(ValueError):
        q.bin_sizes(3, 0)


def test_reference_follows_eq1_literally():
    """First pick is the most central patch; the second maximises 2*sum_S d - sum_D d; bins partition N."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 3))
    d = sq_distances_reference(x, x)
    bins = q.form_bins_reference(x, 3, "paper")
    first = bins[0][0]
    assert first == np.argmin(d.sum(axis=1))
    cand = [i for i in range(12) if i != first]
    gains = [d[first, c] - (d[:, c].sum() - d[first, c]) for c in cand]
    assert bins[0][1] == cand[int(np.argmax(gains))]
    assert sorted(np.concatenate(bins).tolist()) == list(range(12))
    assert [len(b) for b in bins] == [4, 4, 4]


def test_running_sum_identity():
    """sum_A d(p, x) = |A| ||x||^2 - 2 x.s_A + q_A (REFERENCE.md section 3)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    rows, sq, kind = q._prepare(x, "paper")
    got = q._fixed_term(rows, sq, kind, rows)
    np.testing.assert_allclose(got, sq_distances_reference(x, x).sum(axis=1), rtol=1e-5)
    rows, sq, kind = q._prepare(x, "dq")
    np.testing.assert_allclose(q._fixed_term(rows, sq, kind, rows), q.similarity_reference(x).sum(axis=0),
                               rtol=1e-5)


def test_dq_equals_eq1_on_unit_features_first_bin():
    """On unit rows d = 4 (1 - sim), so GraphCut(lambda=1) and eq. 1 agree where the pool is D (bin 1)."""
    rng = np.random.default_rng(2)
    x = q.unit_rows(rng.normal(size=(30, 6)))
    assert np.array_equal(q.form_bins_reference(x, 1, "dq")[0], q.form_bins_reference(x, 1, "paper")[0])


@pytest.mark.parametrize("gain", q.GAINS)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_random_features(gain, path):
    rng = np.random.default_rng(7)
    n = 23 if path[0] == "triton" else 45   # the interpreter costs ~10 ms per program instance
    x = rng.normal(size=(n, 19)).astype(np.float32)   # N, D not multiples of any block
    want = q.form_bins_reference(x, 4, gain)
    got, _ = q.form_bins(x, 4, gain, device=path[0], memory=path[1], cpu_path=path[2])
    assert _same(got, want)


@pytest.mark.parametrize("gain", q.GAINS)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_ties_duplicates_zero_vectors(gain, path):
    x = _integer_ties(n=25 if path[0] == "triton" else 37)
    want = q.form_bins_reference(x, 5, gain)
    got, _ = q.form_bins(x, 5, gain, device=path[0], memory=path[1], cpu_path=path[2])
    assert _same(got, want)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_all_identical_goes_in_index_order(path):
    x = np.ones((9, 4), dtype=np.float32)
    got, _ = q.form_bins(x, 2, "paper", device=path[0], memory=path[1], cpu_path=path[2])
    assert _same(got, [np.arange(5), np.arange(5, 9)])


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_single_patch_and_one_bin_per_patch(path):
    got, _ = q.form_bins(np.zeros((1, 3), np.float32), 1, "paper", device=path[0], memory=path[1], cpu_path=path[2])
    assert _same(got, [np.array([0])])
    x = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    got, _ = q.form_bins(x, 6, "biomedseg", device=path[0], memory=path[1], cpu_path=path[2])
    assert _same(got, q.form_bins_reference(x, 6, "biomedseg"))


def test_gram_and_running_agree_at_moderate_n():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(600, 48)).astype(np.float32)
    gram, p1 = q.form_bins(x, 10, "paper", device="cpu", cpu_path="gram")
    running, p2 = q.form_bins(x, 10, "paper", device="cpu", memory=0, cpu_path="running")
    assert (p1, p2) == ("gram", "running")
    assert _same(gram, running)


def test_tensor_input_and_progress():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    calls = []
    got, path = q.form_bins(x, 3, progress=calls.append)
    assert path == "search" and len(calls) == 20
    assert _same(got, q.form_bins_reference(x.numpy(), 3, "paper"))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        q.form_bins(np.array([[0.0], [np.nan]]), 1)
    with pytest.raises(ValueError, match="bins"):
        q.form_bins(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="gain"):
        q.form_bins(np.zeros((3, 2)), 1, gain="other")
    with pytest.raises(ValueError, match="non-empty"):
        q.form_bins(np.zeros((0, 2)), 1)


@pytest.mark.parametrize("speculate", [1, 3, 64])
def test_speculation_never_changes_the_bins(speculate):
    """The running-sum path computes rows of speculated candidates ahead; the picks must not depend on it."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 10)) * 3
    x = (centres[rng.integers(0, 6, 160)] + rng.normal(size=(160, 10))).astype(np.float32)
    x[50] = x[51] = x[90]
    want = q.form_bins_reference(x, 3, "paper")
    got, path = q._form_bins_cpu(x, 3, "paper", 1.0, memory=0, speculate=speculate)
    assert path == "running" and _same(got, want)
