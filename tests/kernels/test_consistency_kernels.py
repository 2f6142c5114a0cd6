"""dqtool_kernels.consistency: the numba parallel kernel leaves torch's thread count as the process set it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SETUP = """
import numpy as np, torch, numba
torch.set_num_threads(1)
assert torch.get_num_threads() == 1 and float((torch.ones(4) + 1).sum()) == 8  # torch's OpenMP in use first
@numba.njit(parallel=True)
def bare(x):
    s = 0.0
    for i in numba.prange(x.size):
        s += x[i]
    return s
"""

#: dqtool's kernel, then (numba's layer started already) a bare kernel, which changes nothing more either way.
_CHILD = _SETUP + """
from dqtool_kernels.consistency import semantic_counts_numba
p = np.random.default_rng(0).random((2, 5000), dtype=np.float32)
union, flips, agree = semantic_counts_numba(p, p[::-1].copy(), np.array([0, 1]))
kept = torch.get_num_threads()
bare(np.ones(8))
print(kept, numba.get_num_threads(), numba.threading_layer(), int(union.sum()))
"""

_BARE = _SETUP + """
bare(np.ones(8))
print(torch.get_num_threads(), numba.threading_layer())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for numba to differ from torch's 1 thread")
def test_the_parallel_consistency_kernel_keeps_torchs_thread_count():
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    env.pop("OMP_NUM_THREADS", None)
    bare = subprocess.run([sys.executable, "-c", _BARE], capture_output=True, text=True, env=env, timeout=300)
    assert bare.returncode == 0, bare.stderr[-2000:]
    threads, layer = bare.stdout.split()
    if layer != "omp" or threads == "1":
        pytest.skip(f"numba's {layer} layer leaves torch alone here: nothing to keep")
    assert threads == "2"  # the trap: a bare parallel kernel moved torch from 1 thread to numba's 2
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, numba_threads, layer, union = out.stdout.split()
    assert kept == "1" and numba_threads == "2" and int(union) > 0
