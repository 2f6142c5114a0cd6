"""dqtool: data-efficient, forgetting-aware cell segmentation with Cellpose.

Layers, one direction of imports: ``dqtool_cli`` (Click, parsing only) -> ``dqtool`` (this library:
data, patches, cache, features, selection, training, evaluation, ranking) -> ``dqtool_kernels``
(compute kernels that know nothing of files, the CLI or Cellpose).
"""

__version__ = "0.1.0"
