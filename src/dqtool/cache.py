"""Deprecated: ``dqtool.cache`` moved to ``dqtool.data.cache`` and ``dqtool.data.cache_build``; this name works for this release."""

from dqtool._moved import forward

__getattr__, __dir__ = forward(__name__, ('dqtool.data.cache', 'dqtool.data.cache_build'))
