"""The papers' studies end to end: the DQ/forgetting experiment and the ranking study.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['experiment', 'rank_study'],
    submod_attrs={
        "experiment": ['run_experiment'],
        "rank_study": ['rank_study'],
    },
)
