"""A normal run prints no third-party warning (issue 14): the notices torch and Cellpose raise under dqtool's
calls (TF32/oneDNN, sparse invariants) are hidden where dqtool triggers them, nothing else is."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tifffile
from factories import blob_image, noise_cache

from dqtool.common.notices import KNOWN_NOTICES, known_notices_hidden

THIRD_PARTY = re.compile(r"(site-packages|torch|cellpose).*Warning|Warning:.*(torch|oneDNN|TF32|[Ss]parse)")


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "dqtool", *args], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_known_notices_only_are_hidden():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_notices_hidden():
            for category, message in KNOWN_NOTICES:
                warnings.warn(message.replace("\\", "") + " (test)", category)
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]


@pytest.mark.slow
def test_train_and_predict_print_no_third_party_warning(tmp_path):
    cache = noise_cache(tmp_path / "c.h5", n_images=2, shape=(64, 64), size=64, stride=64)
    model = tmp_path / "m"
    train = _run("train", str(cache), "--out", str(model), "--epochs", "1", "--bsize", "32", "--batch-size", "2",
                 "--min-train-masks", "1", "--quiet")
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", (blob_image(1, size=64) * 60000).astype(np.uint16))
    pred = _run("predict", str(model), str(images), "--out", str(tmp_path / "pred"), "--quiet")
    for proc in (train, pred):
        lines = [ln for ln in proc.stderr.splitlines() if THIRD_PARTY.search(ln)]
        assert not lines, lines
    assert pred.stdout == ""  # --quiet: nothing on stdout
