"""The papers' studies end to end: the DQ/forgetting experiment, the ranking study, and what DQ selects.

The public names (listed in ``__init__.pyi``) load their module on first use.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
