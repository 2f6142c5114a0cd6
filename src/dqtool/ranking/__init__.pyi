"""Public names of ``dqtool.ranking`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .perturb import perturb_image, bottleneck_dropout, PERTURBATIONS
from .consistency import nhd, effective_invariance, adapted_rand, semantic_consistency
from .rank import rank_models, rank_bank, BankRanking, RankResult, ModelScore, SCORES
from .passes import count_network_passes, EvalSettings

__all__ = ['perturb_image', 'bottleneck_dropout', 'PERTURBATIONS', 'nhd', 'effective_invariance', 'adapted_rand', 'semantic_consistency', 'rank_models', 'rank_bank', 'BankRanking', 'count_network_passes', 'EvalSettings', 'RankResult', 'ModelScore', 'SCORES']
