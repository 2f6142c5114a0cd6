"""Dataset quantization: bins (eq. 1), per-bin sampling (eq. 2), subsets, coverage and plots.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['coverage', 'plots', 'quantize', 'subsets'],
    submod_attrs={
        "subsets": ['Subset', 'random_subset', 'subset_total', 'export_subset'],
        "quantize": ['select_subset', 'select_to_files', 'sample_bins', 'load_or_form_bins'],
        "coverage": ['coverage', 'Coverage'],
        "plots": ['plot_selection'],
    },
)
