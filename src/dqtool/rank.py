"""Deprecated location, kept for this release: ``dqtool.rank`` moved to ``dqtool.ranking.rank``.

Scripts that use ``dqtool.rank.NAME`` keep working (the names are looked up in the new modules);
new code should import from the new place.
"""

import warnings

import dqtool.ranking.rank as _m0

_MODULES = (_m0,)

warnings.warn("dqtool.rank moved to dqtool.ranking.rank; the old name will be removed in a later release",
              DeprecationWarning, stacklevel=2)


def __getattr__(name):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'dqtool.rank' has no attribute {name!r}")


def __dir__():
    return sorted({n for module in _MODULES for n in dir(module) if not n.startswith("__")})
