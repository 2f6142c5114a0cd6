"""What the kernels may use on this machine: Triton (optional), the device a dispatch takes, CPU threads.

Triton is an optional extra (``pip install dqtool[triton]``). Every kernel module defines its Triton
kernels only when :func:`triton_available` is true, and every dispatch function goes through
:func:`pick_device`, which refuses the Triton path with a clear error when Triton is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken or hidden install
        return False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (tests set TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_device(device: str | None, tensor_device: str = "cpu") -> str:
    """Resolve ``device`` ('auto', 'cpu', 'triton', 'numpy') to the path a dispatch function takes.

    'auto' picks 'triton' on a CUDA tensor when Triton is installed, else 'cpu'. 'triton' needs Triton
    installed, and a CUDA tensor or the interpreter (that is how the tests run the Triton kernels here).
    """
    device = device or "auto"
    if device == "auto":
        if tensor_device.startswith("cuda") and triton_available():
            return "triton"
        return "cpu"
    if device not in ("cpu", "triton", "numpy"):
        raise ValueError(f"device must be auto, cpu, triton or numpy, got {device!r}")
    if device == "triton":
        if not triton_available():
            raise ValueError("the Triton path needs the triton package: pip install 'dqtool[triton]'")
        if not (tensor_device.startswith("cuda") or interpreting()):
            raise ValueError("the Triton path needs a CUDA device or TRITON_INTERPRET=1")
    return device


def cpu_count() -> int:
    """CPUs this process may use: the default number of worker threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads_kept():
    """Keep torch's intra-op thread count across a numba ``parallel=True`` call.

    numba's OpenMP threading layer, when it starts (once per process, at the first parallel kernel), sets the
    OpenMP runtime's thread count to ``NUMBA_NUM_THREADS`` (the number of CPUs); torch shares that runtime, so
    a process that had asked torch for one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) ran
    its networks on every core from then on. Measured on the 2-core VM: torch 1 thread -> 2 after one
    parallel kernel; a serial ``rank`` under ``OMP_NUM_THREADS=1`` took 157 s wall for 299 CPU s. torch is
    not imported here: only a process that already holds it is restored.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)
