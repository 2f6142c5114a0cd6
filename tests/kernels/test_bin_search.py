"""Bin formation by exact pruned search around the moving centre: identical to the float64 reference.

Small N against ``form_bins_reference`` (O(N^2) per step), larger N against the Gram path (itself tested
equal to the reference) and against full scans of the same score (pruning must never change a pick).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from dqtool_kernels import quantization as q


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _features(kind, n, d, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(n, d)).astype(np.float32)
    if kind == "float64":
        return rng.normal(size=(n, d))
    if kind == "clustered":
        centres = rng.normal(size=(5, d)) * 3
        return (centres[rng.integers(0, 5, n)] + rng.normal(size=(n, d))).astype(np.float32)
    if kind == "ties":      # small integers: exact float sums, so exact ties, duplicates and zero rows
        x = rng.integers(0, 3, size=(n, d)).astype(np.float32)
        if n >= 6:
            x[1] = x[n // 2] = x[n - 1]
            x[2] = 0.0
            x[3] = 0.0
        return x
    if kind == "offset":    # far from the origin: float32 sums of squares would lose the differences
        return (4096 + rng.integers(0, 3, size=(n, d))).astype(np.float32)
    if kind == "identical":
        return np.full((n, d), 0.5, dtype=np.float32)
    raise ValueError(kind)


SHAPES = [(1, 3, 1), (2, 1, 1), (3, 1, 1), (3, 2, 3), (7, 3, 1), (7, 3, 2), (7, 1, 7), (45, 19, 4),
          (60, 768, 3), (100, 3, 1), (100, 3, 10), (64, 5, 2)]
KINDS = ["random", "float64", "clustered", "ties", "offset", "identical"]


def _skip_dq_rounding_ties(gain, kind, n):
    # dq: cosines are irrational, so a tie between non-parallel rows (e.g. (1,2,0) and (0,1,2), frequent
    # among many tiny integer rows) is decided by rounding in the reference and in every fast path alike;
    # offset rows have all cosines within 1e-8 of 1, the same. Duplicates, parallel and zero rows are exact.
    return gain == "dq" and (kind == "offset" or (kind == "ties" and n > 64))


@pytest.mark.parametrize("gain", q.GAINS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{n}-d{d}-b{b}" for n, d, b in SHAPES])
def test_equals_reference(gain, kind, shape):
    n, d, b = shape
    if _skip_dq_rounding_ties(gain, kind, n):
        pytest.skip("dq ties between non-parallel rows are decided by rounding")
    x = _features(kind, n, d, seed=n + d + b)
    got, path = q.form_bins(x, b, gain, cpu_path="search")
    assert path == "search"
    assert _same(got, q.form_bins_reference(x, b, gain))


@pytest.mark.parametrize("gain", q.GAINS)
def test_lambda_and_tensor_input(gain):
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(3))
    got, _ = q.form_bins(x, 3, gain, lam=2.5, cpu_path="search")
    assert _same(got, q.form_bins_reference(x.numpy(), 3, gain, lam=2.5))


@pytest.mark.parametrize("gain", q.GAINS)
@pytest.mark.parametrize("bins", [1, 10])
def test_equals_gram_path_at_larger_n(gain, bins):
    """N = 3,000 (B = 1 runs through 2k = N into the farthest phase for the paper gain)."""
    if gain == "biomedseg" and bins == 1:
        pytest.skip("one biomedseg bin of 3,000 is a full scan per pick: covered at smaller N")
    x = _features("clustered", 3000, 32, seed=1)
    got, _ = q.form_bins(x, bins, gain, cpu_path="search")
    want, path = q.form_bins(x, bins, gain, cpu_path="gram")
    assert path == "gram" and _same(got, want)


@pytest.mark.parametrize("gain", ["paper", "dq"])
@pytest.mark.parametrize("kind", ["clustered", "random"])
def test_pruning_never_changes_a_pick(gain, kind):
    """The pruned search and a full float64 scan of the same score at every step give the same bins."""
    x = _features(kind, 4000, 48, seed=2)
    stats = {}
    pruned = q._form_bins_search(x, 5, gain, stats=stats, scan_after=0)   # never falls back to scans
    assert stats["heap_steps"] > 0.9 * x.shape[0]
    if kind == "clustered":   # isotropic dq is herding-like (v turns fast): pruning touches much, still exact
        assert stats["touched_per_heap_step"] < 0.25 * x.shape[0]
    scanned = q._form_bins_search(x, 5, gain, scan_after=10 ** 9)        # falls back to scans at once
    assert _same(pruned, scanned)


def test_biomedseg_falls_back_to_scans_with_the_same_bins():
    x = _features("clustered", 1500, 24, seed=4)
    stats = {}
    got = q._form_bins_search(x, 10, "biomedseg", stats=stats)
    want, _ = q.form_bins(x, 10, "biomedseg", cpu_path="gram")
    assert _same(got, want)
    assert stats["scan_steps"] + stats["heap_steps"] == 1500


def test_default_paths():
    x = _features("random", 40, 4, seed=0)
    assert q.form_bins(x, 4, "paper")[1] == "search"
    assert q.form_bins(x, 4, "dq")[1] == "gram"            # measured faster for dq and biomedseg while it fits
    assert q.form_bins(x, 4, "biomedseg", memory=0)[1] == "search"


def test_progress_and_partition():
    x = _features("random", 50, 4, seed=0)
    calls = []
    got, _ = q.form_bins(x, 4, progress=calls.append)
    assert len(calls) == 50 and sorted(np.concatenate(got).tolist()) == list(range(50))


def test_triton_exact_where_float32_sums_flip():
    """Rows near 4096: float32 running sums (the former Triton kernel) lose the differences entirely."""
    pytest.importorskip("triton")
    x = _features("offset", 16, 4, seed=0)
    for gain in ("paper", "biomedseg"):
        got, path = q.form_bins(x, 2, gain, device="triton")
        assert path == "triton" and _same(got, q.form_bins_reference(x, 2, gain))


_MEMORY_CHILD = r"""
import resource, sys
import numpy as np
from dqtool_kernels import quantization as q
n, d = int(sys.argv[1]), int(sys.argv[2])
q.form_bins(np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32), 2)   # compile / load cache
x = np.empty((n, d), dtype=np.float32)
rng = np.random.default_rng(0)
for lo in range(0, n, 4096):
    x[lo:lo + 4096] = rng.standard_normal(size=(min(4096, n - lo), d), dtype=np.float32)
x[:] += 0.0   # touch every page
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
q.form_bins(x, 10, "paper")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((after - before) / x.nbytes)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux")
def test_memory_stays_near_the_features():
    """float32 features are used in place: the search adds O(N) state, far below 0.3 x the features."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, "20000", "768"], check=True, text=True,
                         stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    extra = float(out.stdout.strip().splitlines()[-1])
    assert extra < 0.3, f"peak grew by {extra:.2f} x the features"
