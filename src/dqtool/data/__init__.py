"""Images and labels in: readers of the lab layouts, the embedded synthetic data, patches, the HDF5 patch cache.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['cache', 'cache_build', 'datasets', 'io', 'naming', 'patches', 'synthetic'],
    submod_attrs={
        "io": ['read_image', 'read_labels', 'write_labels', 'relabel_consecutive', 'check_label_array'],
        "naming": ['LABEL_SUFFIXES', 'is_image_file', 'is_label_file', 'is_input_image', 'label_key', 'image_key',
                   'find_label_file', 'list_input_images'],
        "datasets": ['open_dataset', 'detect_format', 'Dataset', 'Sample', 'FORMATS'],
        "synthetic": ['generate', 'DOMAINS'],
        "patches": ['iter_patches', 'window_starts', 'count_windows', 'EDGE_MODES'],
        "cache": ['PatchCache'],
        "cache_build": ['PatchOptions', 'build_cache', 'build_cache_from_folders', 'build_cache_from_arrays'],
    },
)
