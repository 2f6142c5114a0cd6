"""Compute kernels for dqtool, imported as ``dqtool_kernels`` (this folder is installed under that name).

Each kernel module holds a plain NumPy reference that defines the result, a CPU path (numba or
torch/BLAS) and one dispatch function. ``distances``, ``quantization`` and ``consistency`` also have a
Triton path for CUDA, picked by ``device``; ``matching`` has none: instance matching walks a sparse
overlap table with data-dependent branches, which a CPU thread per image (numba, GIL released) does well.

Triton is optional (``pip install 'dqtool[triton]'``): the Triton kernels are defined only when it is
installed (``_runtime.triton_available``), and without it asking for ``device='triton'`` is a clear error.
Kernels take arrays and return arrays: they know nothing of files, the CLI or Cellpose.
"""
