"""Patch features f(x) for DQ: the MAE network, its self-supervised pretraining, embedding a cache.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['embed', 'mae'],
    submod_attrs={
        "mae": ['MaskedAutoencoderViT', 'MAEConfig', 'CONFIGS'],
        "embed": ['embed_cache', 'load_features', 'pretrain_mae', 'check_features'],
    },
)
