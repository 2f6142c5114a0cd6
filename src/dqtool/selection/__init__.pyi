"""Public names of ``dqtool.selection`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .subsets import Subset, random_subset, subset_total, export_subset
from .quantize import select_subset, select_to_files, sample_bins, load_or_form_bins, uncertainty_sampling
from .coverage import coverage, Coverage
from .plots import plot_selection
from .uncertain import PatchConsistency, PatchScorer, patch_uncertainty, load_or_score_patches

__all__ = ['Subset', 'random_subset', 'subset_total', 'export_subset', 'select_subset', 'select_to_files', 'sample_bins', 'load_or_form_bins', 'uncertainty_sampling', 'coverage', 'Coverage', 'plot_selection', 'PatchConsistency', 'PatchScorer', 'patch_uncertainty', 'load_or_score_patches']
