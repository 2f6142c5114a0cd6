"""Deprecated location, kept for this release: ``dqtool.cache`` moved to ``dqtool.data.cache``, ``dqtool.data.cache_build``.

Scripts that use ``dqtool.cache.NAME`` keep working (the names are looked up in the new modules);
new code should import from the new place.
"""

import warnings

import dqtool.data.cache as _m0
import dqtool.data.cache_build as _m1

_MODULES = (_m0, _m1,)

warnings.warn("dqtool.cache moved to dqtool.data.cache (reading) and dqtool.data.cache_build (writing); the old name will be removed in a later release",
              DeprecationWarning, stacklevel=2)


def __getattr__(name):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'dqtool.cache' has no attribute {name!r}")


def __dir__():
    return sorted({n for module in _MODULES for n in dir(module) if not n.startswith("__")})
