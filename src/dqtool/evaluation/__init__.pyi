"""Public names of ``dqtool.evaluation`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .metrics import instance_scores, pixel_scores, evaluate, parse_thresholds
from .folders import evaluate_folders

__all__ = ['instance_scores', 'pixel_scores', 'evaluate', 'parse_thresholds', 'evaluate_folders']
