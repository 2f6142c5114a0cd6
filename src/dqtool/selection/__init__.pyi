"""Public names of ``dqtool.selection`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .subsets import Subset, random_subset, subset_total, export_subset
from .quantize import select_subset, select_to_files, sample_bins, load_or_form_bins
from .coverage import coverage, Coverage
from .plots import plot_selection

__all__ = ['Subset', 'random_subset', 'subset_total', 'export_subset', 'select_subset', 'select_to_files', 'sample_bins', 'load_or_form_bins', 'coverage', 'Coverage', 'plot_selection']
