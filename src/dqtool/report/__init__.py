"""One page that says what a run found: ``dqtool report RUN_DIR`` (HTML, self-contained, and Markdown).

The public names (listed in ``__init__.pyi``) load their module on first use.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
