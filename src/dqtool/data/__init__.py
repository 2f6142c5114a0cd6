"""Images and labels in: readers of the lab layouts, the embedded synthetic data, patches, the HDF5 patch cache.

The public names (listed in ``__init__.pyi``) load their module on first use.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
