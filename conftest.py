"""Test configuration shared by tests/ and benchmarks/.

TRITON_INTERPRET must be set before any Triton kernel is defined, so that on a machine without CUDA the
Triton paths run in the interpreter (small sizes, big blocks). With a CUDA GPU they run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REAL = Path(__file__).resolve().parent.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real labelled samples (read through dqtool's own readers, never copied)."""
    if not REAL.is_dir():
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: a skip there would hide failures
            pytest.fail(f"shared real data not found at {REAL}")
        pytest.skip(f"shared real data not found at {REAL}")
    return REAL


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op torch thread: on 2 cores shared by several runs, OpenMP spinning made torch ~20x slower
    with 2 threads. Results do not depend on it (every test compares against a reference, not a time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Triton is an optional extra: without it, every test whose name or parameter id says ``triton`` is
    skipped (and said), and the rest of the suite runs on the CPU paths. CI installs it (dev extras)."""
    from dqtool_kernels._runtime import triton_available

    if triton_available():
        return
    skip = pytest.mark.skip(reason="triton is not installed (the optional extra dqtool[triton])")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)
