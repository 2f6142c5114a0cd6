"""Scores against ground truth: pixel and instance metrics (IoU, dice, F1, PQ) and folder evaluation.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['folders', 'metrics'],
    submod_attrs={
        "metrics": ['instance_scores', 'pixel_scores', 'evaluate', 'parse_thresholds'],
        "folders": ['evaluate_folders'],
    },
)
