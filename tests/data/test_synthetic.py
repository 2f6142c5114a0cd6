"""The embedded default data: deterministic, layout readable, domains that differ."""

from __future__ import annotations

import numpy as np

from dqtool.data.datasets import open_dataset
from dqtool.data.io import to_gray
from dqtool.data.synthetic import generate


def test_same_seed_same_bytes_and_reuse(tmp_path):
    a = generate(tmp_path / "a", seed=3, n_train=2, n_test=1)
    b = generate(tmp_path / "b", seed=3, n_train=2, n_test=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files_a) == 3 * 3 * 2
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    c = generate(tmp_path / "c", seed=4, n_train=2, n_test=1)
    assert (c / files_a[0]).read_bytes() != (a / files_a[0]).read_bytes()
    stamp = (a / "MANIFEST.json").stat().st_mtime_ns
    generate(tmp_path / "a", seed=3, n_train=2, n_test=1)  # manifest matches: reused, not rewritten
    assert (a / "MANIFEST.json").stat().st_mtime_ns == stamp


def test_domains_are_labelled_and_differ(tmp_path):
    root = generate(tmp_path / "d", seed=0, n_train=2, n_test=1)
    stats = {}
    for domain in ("fluo", "histo", "multi"):
        train = open_dataset(root / domain)
        test = open_dataset(root / domain, split="test")
        assert train.format == "cellpose" and len(train) == 2 and len(test) == 1
        assert train.domains == [domain] and train.has_labels
        s = train[0]
        lab = s.labels
        assert lab.max() >= 5
        gray = to_gray(s.image)
        fg, bg = gray[lab > 0].mean(), gray[lab == 0].mean()
        stats[domain] = (fg - bg) / (gray.std() + 1e-9)
        sizes = np.bincount(lab.ravel())[1:]
        stats[domain + "_size"] = np.median(sizes)
    # fluorescence: cells brighter than background; H&E: nuclei darker (inverted contrast in grayscale)
    assert stats["fluo"] > 0.5 and stats["histo"] < -0.5
    assert stats["fluo_size"] > 2 * stats["histo_size"]  # different object scales
    assert open_dataset(root / "fluo")[0].image.dtype == np.uint16
    assert open_dataset(root / "histo")[0].image.ndim == 3
