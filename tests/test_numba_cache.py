"""dqtool.numba_cache: numba's on-disk cache switched on for Cellpose's kernels, and for nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dqtool.numba_cache import caching


def _function_of(module: str):
    def fn(x):
        return x

    fn.__module__ = module
    return fn


class _Recorder:
    """Stands for numba.njit: records each call's arguments and returns a decorator that marks the function."""

    def __init__(self, refuse_cache=False):
        self.calls, self.refuse_cache = [], refuse_cache

    def __call__(self, *args, **kwargs):
        if self.refuse_cache and kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'fn': no locator available for file '<x>'")
        self.calls.append((args, kwargs))
        return lambda fn: ("compiled", fn, args, kwargs)


@pytest.mark.parametrize("module", ["cellpose", "cellpose.dynamics", "cellpose.metrics"])
def test_cellposes_functions_get_the_cache_in_every_form_of_the_decorator(module):
    fn, njit = _function_of(module), _Recorder()
    wrapped = caching(njit)
    assert wrapped(fn)[3] == {"cache": True}  # @njit
    assert wrapped("(float64[:], int32)", nogil=True)(fn)[2:] == (("(float64[:], int32)",), {"cache": True,
                                                                                           "nogil": True})
    assert wrapped(nogil=True)(fn)[3] == {"cache": True, "nogil": True}  # @njit(nogil=True)
    assert wrapped(["f8(f8)", "f4(f4)"])(fn)[2] == (["f8(f8)", "f4(f4)"],)
    assert wrapped(fn, nogil=True)[3] == {"cache": True, "nogil": True}  # njit(fn, **options)
    assert wrapped(cache=False)(fn)[3] == {"cache": False}  # an explicit choice is kept
    assert caching(wrapped) is wrapped  # wrapping twice changes nothing


@pytest.mark.parametrize("module", ["cellposefoo", "mypackage.cellpose", "dqtool_kernels.matching", "__main__"])
def test_every_other_function_is_decorated_as_it_asks(module):
    fn, njit = _function_of(module), _Recorder()
    wrapped = caching(njit)
    assert wrapped(fn)[3] == {}
    assert wrapped("(float64[:],)", nogil=True)(fn)[3] == {"nogil": True}


def test_without_a_writable_cache_folder_the_function_is_compiled_without_cache():
    njit = _Recorder(refuse_cache=True)
    assert caching(njit)("(int32,)", nogil=True)(_function_of("cellpose.dynamics"))[3] == {"nogil": True}


def test_in_a_fresh_process_cellposes_kernels_are_cached_and_numba_waits_for_cellpose(tmp_path):
    """``import dqtool`` imports neither numba nor Cellpose; importing Cellpose afterwards gives its kernels numba's
    file cache (here in a private folder), while a function of another module keeps numba's default (no cache)."""
    code = """
import sys
import dqtool
assert "numba" not in sys.modules and "cellpose" not in sys.modules, sorted(m for m in sys.modules if "numba" in m)
import cellpose.dynamics as d, cellpose.metrics as m
import numba
from numba.core.caching import FunctionCache, NullCache
assert isinstance(d._extend_centers._cache, FunctionCache), type(d._extend_centers._cache)
assert isinstance(d.get_centers._cache, FunctionCache)
assert isinstance(m._label_overlap._cache, FunctionCache)
@numba.njit
def other(x):
    return x + 1
assert other(1) == 2 and isinstance(other._cache, NullCache), type(other._cache)
print("ok")
"""
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
