"""``dqtool export --seed-masks MODEL``: a DQ subset exported with a model's predictions as Cellpose GUI files.

The annotator opens each ``NNN_img.png`` in the Cellpose GUI, which loads the ``NNN_img_seg.npy`` beside it,
corrects the outlines and saves; the corrected files are label files for ``dqtool patches`` and ``train``.
"""

from __future__ import annotations

import os
from pathlib import Path

from dqtool.segmentation.predict import PredictOptions, load_model, segment
from dqtool.selection.subsets import export_subset


def export_with_seed_masks(subset_path, out_dir, model: str | os.PathLike, cache_path=None,
                           options: PredictOptions | None = None, quiet: bool = True) -> Path:
    """:func:`~dqtool.selection.subsets.export_subset` with ``NNN_img_seg.npy`` pre-filled by ``model``."""
    options = options or PredictOptions()
    net = load_model(model)
    return export_subset(subset_path, out_dir, cache_path=cache_path, quiet=quiet,
                         seed_masks=lambda image: segment(net, image, options))
