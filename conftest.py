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


# ----------------------------------------------------------------------------------------------
# Dask (issue 16): one 2-worker cluster for the session's distributed tests


@pytest.fixture(scope="session")
def dask_client():
    """A Dask client of one 2-worker ``LocalCluster`` (processes, one thread each, dqtool's own settings:
    :func:`dqtool.common.cluster.client_for`), started once for the whole session on first use. Tests pass
    ``client.scheduler.address`` to ``--scheduler`` (or ``client=`` to ``run_tasks``), so the equality tests
    of every distributed command share one cluster instead of starting their own."""
    pytest.importorskip("distributed")
    from dqtool.common.cluster import Cluster, client_for

    with client_for(Cluster(workers=2), quiet=True) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


@pytest.fixture()
def dask_scheduler(dask_client):
    """The address of the session's 2-worker cluster (``--scheduler ADDRESS``), both workers up."""
    dask_client.wait_for_workers(2, timeout=60)
    return dask_client.scheduler.address


@pytest.fixture()
def worker_death(dask_client, tmp_path):
    """``arm(kind)`` -> flag file: on the session's cluster, the first task of ``kind`` to start creates the
    flag and kills its own worker process, once (dqtool's test-only hook ``DQTOOL_TASK_DIE``); the nanny
    starts a new worker and Dask reruns the task. The hook is removed from the workers afterwards."""
    armed = []

    def arm(kind: str):
        flag = tmp_path / f"died-{kind}"
        dask_client.run(exec, f"import os; os.environ['DQTOOL_TASK_DIE'] = {f'{kind}:{flag}'!r}")
        armed.append(flag)
        return flag

    yield arm
    if armed:
        dask_client.run(exec, "import os; os.environ.pop('DQTOOL_TASK_DIE', None)")
        dask_client.wait_for_workers(2, timeout=60)
