"""Compute kernels for dqtool.

Each kernel module holds a plain NumPy reference that defines the result, a CPU path (numba or
torch/BLAS), a Triton path for CUDA, and one dispatch function that picks the path by device.
Kernels take arrays and return arrays: they know nothing of files, the CLI or Cellpose.
"""
