"""The third-party notices dqtool knows it triggers, hidden where it triggers them (never a global ignore).

Each entry is one specific message of one category, raised by torch or Cellpose under a call dqtool makes on
purpose; none says anything a dqtool user can act on:

- torch's "TF32 acceleration on top of oneDNN ..." (``UserWarning``): raised by
  ``torch.backends.mkldnn.flags``, which dqtool's training uses to keep MKL-DNN off on the CPU;
- torch's "Sparse invariant checks are implicitly disabled ..." (``UserWarning``): raised once per process
  by ``torch.sparse_coo_tensor`` in Cellpose's mask dynamics (``cellpose.dynamics``);
- torch's "`torch.jit.script_method` is deprecated ..." (``DeprecationWarning``): raised while torch or one
  of Cellpose's imports defines scripted modules.

Use ``with known_notices_hidden(): ...`` around the call; every other warning still reaches the user.
"""

from __future__ import annotations

import contextlib
import warnings

#: (category, regular expression matched at the start of the message) of each known notice.
KNOWN_NOTICES = (
    (UserWarning, r"TF32 acceleration on top of oneDNN"),
    (UserWarning, r"Sparse invariant checks are implicitly disabled"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is"),
)


@contextlib.contextmanager
def known_notices_hidden():
    """Hide :data:`KNOWN_NOTICES` (and only those) inside the ``with`` block."""
    with warnings.catch_warnings():
        for category, message in KNOWN_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
