"""Deprecated location, kept for this release: ``dqtool.consistency`` moved to ``dqtool.ranking.consistency``.

Scripts that use ``dqtool.consistency.NAME`` keep working (the names are looked up in the new modules);
new code should import from the new place.
"""

import warnings

import dqtool.ranking.consistency as _m0

_MODULES = (_m0,)

warnings.warn("dqtool.consistency moved to dqtool.ranking.consistency; the old name will be removed in a later release",
              DeprecationWarning, stacklevel=2)


def __getattr__(name):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'dqtool.consistency' has no attribute {name!r}")


def __dir__():
    return sorted({n for module in _MODULES for n in dir(module) if not n.startswith("__")})
