"""Public names of ``dqtool.ranking`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .perturb import perturb_image, bottleneck_dropout, PERTURBATIONS
from .consistency import nhd, effective_invariance, adapted_rand, semantic_consistency
from .rank import rank_models, RankResult, ModelScore, SCORES

__all__ = ['perturb_image', 'bottleneck_dropout', 'PERTURBATIONS', 'nhd', 'effective_invariance', 'adapted_rand', 'semantic_consistency', 'rank_models', 'RankResult', 'ModelScore', 'SCORES']
