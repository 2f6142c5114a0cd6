"""Deprecated: ``dqtool.metrics`` moved to ``dqtool.evaluation.metrics``; this name works for this release."""

from dqtool._moved import forward

__getattr__, __dir__ = forward(__name__, ('dqtool.evaluation.metrics',))
