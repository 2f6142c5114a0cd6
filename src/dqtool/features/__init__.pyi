"""Public names of ``dqtool.features`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .mae import MaskedAutoencoderViT, MAEConfig, CONFIGS
from .pretrain import pretrain_mae, load_mae_weights
from .store import load_features, check_features
from .embed import embed_cache

__all__ = ['MaskedAutoencoderViT', 'MAEConfig', 'CONFIGS', 'pretrain_mae', 'load_mae_weights', 'load_features', 'check_features', 'embed_cache']
