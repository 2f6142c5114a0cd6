"""Deprecated: ``dqtool.consistency`` moved to ``dqtool.ranking.consistency``; this name works for this release."""

from dqtool._moved import forward

__getattr__, __dir__ = forward(__name__, ('dqtool.ranking.consistency',))
