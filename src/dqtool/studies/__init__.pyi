"""Public names of ``dqtool.studies`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .coverage import coverage_study
from .experiment import run_experiment
from .rank_study import rank_study
from .real_rank import rank_study_config

__all__ = ['coverage_study', 'run_experiment', 'rank_study', 'rank_study_config']
