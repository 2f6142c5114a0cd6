"""Triton availability: the Triton paths run on CUDA devices, or anywhere under TRITON_INTERPRET=1."""

from __future__ import annotations

import os


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is optional
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (tests set TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_device(device: str | None, tensor_device: str = "cpu") -> str:
    """Resolve ``device`` ('auto', 'cpu', 'cuda', 'triton') to the path a dispatch function takes.

    'auto' picks 'triton' on a CUDA tensor when Triton is installed, else 'cpu'. 'triton' on a CPU
    tensor is allowed only in the interpreter (that is how the tests run the Triton kernels here).
    """
    device = device or "auto"
    if device == "auto":
        if tensor_device.startswith("cuda") and triton_available():
            return "triton"
        return "cpu"
    if device not in ("cpu", "triton", "numpy"):
        raise ValueError(f"device must be auto, cpu, triton or numpy, got {device!r}")
    if device == "triton" and not (tensor_device.startswith("cuda") or interpreting()):
        raise ValueError("the Triton path needs a CUDA device or TRITON_INTERPRET=1")
    return device
