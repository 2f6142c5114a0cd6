"""Numba's on-disk cache for Cellpose's own kernels.

Cellpose 3.1.1 declares its numba kernels without ``cache=True``: ``cellpose.dynamics`` compiles three of them
eagerly (explicit signatures) at import and two more (``get_centers``, ``metrics._label_overlap``) at first
call, so every process that imports Cellpose pays the compiler again: measured on the 2-core VM, importing
``cellpose.models`` took 6.9 s, 3.5 s of it inside ``cellpose.dynamics``, and a training process spent
another ~4 s compiling at its first flows. dqtool runs Cellpose in many short processes (one per demo
training, one per Dask worker, the report), so that cost is paid again and again.

:func:`install` arms a finder that, when the ``cellpose`` package is first imported (and never before: no
numba import at ``import dqtool``), wraps ``numba.njit`` and ``numba.jit`` so that a function defined in a
``cellpose`` module gets ``cache=True`` unless it asks otherwise. Numba then stores the machine code it
compiles beside Cellpose's sources (or in its user-wide cache folder when that is read-only) and the next
process loads it. Nothing else changes: the same functions, signatures and options compile to the same code
(numba keys its cache by the source file's stamp, the signature and the CPU); every function outside
``cellpose`` is decorated exactly as before. Where no cache folder is writable, the function is decorated
without a cache, as Cellpose does.
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import sys

_PACKAGE = "cellpose"


def _ours(fn) -> bool:
    module = getattr(fn, "__module__", "") or ""
    return module == _PACKAGE or module.startswith(_PACKAGE + ".")


def _decorate(decorator, fn, args, kwargs):
    if _ours(fn) and "cache" not in kwargs:
        try:
            return decorator(*args, cache=True, **kwargs)(fn)
        except RuntimeError:  # numba: no writable cache folder ("cannot cache function ...")
            pass
    return decorator(*args, **kwargs)(fn)


def caching(decorator):
    """``decorator`` (``numba.njit`` or ``numba.jit``) with ``cache=True`` for functions of Cellpose's modules.

    Takes every form the numba decorators take: ``@njit``, ``@njit(signature_or_list, **options)``,
    ``@njit(**options)``, and ``njit(fn, **options)``.
    """
    if getattr(decorator, "_dqtool_caching", False):
        return decorator

    @functools.wraps(decorator)
    def wrapper(*args, **kwargs):
        if args and inspect.isfunction(args[0]):
            return _decorate(decorator, args[0], args[1:], kwargs)
        return lambda fn: _decorate(decorator, fn, args, kwargs)

    wrapper._dqtool_caching = True
    return wrapper


def _patch_numba():
    import numba

    numba.njit = caching(numba.njit)
    numba.jit = caching(numba.jit)


class _CellposeImport(importlib.abc.MetaPathFinder):
    """Wraps numba's decorators the moment ``cellpose`` is imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _PACKAGE:
            uninstall()
            _patch_numba()
        return None  # the normal finders import it


def install() -> None:
    """Arm the wrapping for the first import of ``cellpose``; a no-op once ``cellpose`` is imported."""
    if _PACKAGE in sys.modules:
        return  # too late for its modules' decorators: leave them as they are
    if not any(isinstance(f, _CellposeImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _CellposeImport())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _CellposeImport)]
