"""Shared plumbing: errors, crash-safe files and digests, tables, figures, progress bars.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['errors', 'figures', 'files', 'progress', 'tables'],
    submod_attrs={
        "errors": ['InputError'],
        "files": ['atomic_write', 'atomic_write_text', 'atomic_write_bytes', 'file_sha256'],
        "tables": ['format_markdown', 'write_table', 'write_json'],
        "figures": ['pyplot', 'save_figure'],
        "progress": ['bar', 'progress'],
    },
)
