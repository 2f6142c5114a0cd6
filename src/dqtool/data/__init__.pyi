"""Public names of ``dqtool.data`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .io import read_image, read_labels, write_labels, relabel_consecutive, check_label_array
from .naming import (
    LABEL_SUFFIXES,
    is_image_file,
    is_label_file,
    is_input_image,
    label_key,
    image_key,
    find_label_file,
    list_input_images,
)
from .datasets import open_dataset, detect_format, write_split, Dataset, Sample, FORMATS
from .synthetic import generate, DOMAINS
from .patches import iter_patches, window_starts, count_windows, EDGE_MODES
from .cache import PatchCache
from .cache_build import PatchOptions, build_cache, build_cache_from_folders, build_cache_from_arrays

__all__ = ['read_image', 'read_labels', 'write_labels', 'relabel_consecutive', 'check_label_array', 'LABEL_SUFFIXES', 'is_image_file', 'is_label_file', 'is_input_image', 'label_key', 'image_key', 'find_label_file', 'list_input_images', 'open_dataset', 'detect_format', 'write_split', 'Dataset', 'Sample', 'FORMATS', 'generate', 'DOMAINS', 'iter_patches', 'window_starts', 'count_windows', 'EDGE_MODES', 'PatchCache', 'PatchOptions', 'build_cache', 'build_cache_from_folders', 'build_cache_from_arrays']
