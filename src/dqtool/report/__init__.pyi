"""Public names of ``dqtool.report`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .page import ReportResult, write_report

__all__ = ['ReportResult', 'write_report']
