"""dqtool: data-efficient, forgetting-aware cell segmentation with Cellpose.

Layers, one direction of imports: ``dqtool_cli`` (Click, parsing only) -> ``dqtool`` (this library:
data, patches, cache, features, selection, training, evaluation, ranking) -> ``dqtool_kernels``
(compute kernels that know nothing of files, the CLI or Cellpose).
"""

from dqtool._version import __version__  # noqa: F401

from dqtool import numba_cache as _numba_cache

_numba_cache.install()  # numba's on-disk cache for Cellpose's kernels, armed for its first import (see the module)
