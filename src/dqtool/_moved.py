"""Old module names kept for one release after the move into subpackages (scripts keep working)."""

from __future__ import annotations

import importlib
import warnings


def forward(old: str, new: tuple[str, ...]):
    """``__getattr__`` and ``__dir__`` for the deprecated module ``old``: names are looked up in ``new``.

    Importing the old module warns once (DeprecationWarning) and says where the names went.
    """
    modules = [importlib.import_module(name) for name in new]
    warnings.warn(f"{old} moved to {' and '.join(new)}; the old name will be removed in a later release",
                  DeprecationWarning, stacklevel=3)

    def __getattr__(name):
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    def __dir__():
        return sorted({n for module in modules for n in dir(module) if not n.startswith("__")})

    return __getattr__, __dir__
