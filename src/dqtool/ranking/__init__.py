"""Label-free model ranking: perturbations, consistency scores (NHD, EI, adapted Rand), rank a bank.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['consistency', 'perturb', 'rank'],
    submod_attrs={
        "perturb": ['perturb_image', 'bottleneck_dropout', 'PERTURBATIONS'],
        "consistency": ['nhd', 'effective_invariance', 'adapted_rand', 'semantic_consistency'],
        "rank": ['rank_models', 'RankResult', 'ModelScore', 'SCORES'],
    },
)
