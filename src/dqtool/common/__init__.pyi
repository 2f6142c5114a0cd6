"""Public names of ``dqtool.common`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .errors import InputError
from .files import atomic_write, atomic_write_text, atomic_write_bytes, file_sha256
from .tables import format_markdown, write_table, write_json
from .figures import pyplot, save_figure
from .progress import bar, progress
from .cluster import Cluster, iter_tasks, run_tasks, task_seed

__all__ = ['InputError', 'atomic_write', 'atomic_write_text', 'atomic_write_bytes', 'file_sha256', 'format_markdown', 'write_table', 'write_json', 'pyplot', 'save_figure', 'bar', 'progress', 'Cluster', 'iter_tasks', 'run_tasks', 'task_seed']
