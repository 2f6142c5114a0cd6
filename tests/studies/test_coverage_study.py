"""``dqtool coverage`` (issue 12): DQ's bins as shells and the coverage of DQ, random and k-center over seeds,
each number against a plain NumPy computation on the same features and the same draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dqtool.common.errors import InputError
from dqtool_cli.main import cli
from factories import noise_cache, store_features


def _near_reference(features, idx):
    """nearest(x) from the full float64 distance matrix."""
    f = np.asarray(features, np.float64)
    d = np.sqrt(((f[:, None, :] - f[None, np.asarray(idx), :]) ** 2).sum(-1))
    return d.min(axis=1)


@pytest.fixture
def cache(tmp_path):
    """A cache of 99 patches and features with a dense core and a few outliers (3 clusters, 5-d)."""
    path = noise_cache(tmp_path / "c.h5", n_images=11, shape=(32, 32), size=16, stride=8)
    rng = np.random.default_rng(4)
    n = 99
    f = rng.normal(size=(n, 5)) * np.where(np.arange(n) < 80, 1.0, 4.0)[:, None]
    return store_features(path, f.astype(np.float32), tmp_path / "f.npy"), f.astype(np.float32)


def test_shells_and_coverage_equal_numpy_on_the_same_draws(cache):
    from dqtool.selection.quantize import sample_bins
    from dqtool.selection.subsets import random_subset
    from dqtool.studies.coverage import coverage_rows, shell_rows
    from dqtool_kernels.kcenter import kcenter_reference
    from dqtool_kernels.quantization import form_bins

    _, f = cache
    bins, _ = form_bins(f, 5, "paper")
    r = np.linalg.norm(f.astype(np.float64) - f.astype(np.float64).mean(0), axis=1)
    shells = shell_rows(f, bins)
    assert [s["patches"] for s in shells] == [len(b) for b in bins] and sum(len(b) for b in bins) == len(f)
    for s, b in zip(shells, bins):
        assert s["median"] == pytest.approx(np.median(r[b]), rel=1e-12)
        assert (s["min distance to mean"], s["max"]) == pytest.approx((r[b].min(), r[b].max()), rel=1e-12)
    rows = coverage_rows(f, bins, rates=(0.1, 0.3), seeds=range(4))
    assert [(row["method"], row["rate"]) for row in rows] == [
        ("dq", 0.1), ("random", 0.1), ("kcenter", 0.1), ("dq", 0.3), ("random", 0.3), ("kcenter", 0.3)]
    for row in rows:
        size = row["patches"]
        if row["method"] == "kcenter":
            draws = [kcenter_reference(f, size)]
        elif row["method"] == "dq":
            draws = [sample_bins(list(bins), row["rate"], s) for s in range(4)]
        else:
            draws = [random_subset(len(f), size, s) for s in range(4)]
        near = [_near_reference(f, d) for d in draws]
        radius = np.array([n.max() for n in near])
        mean = np.array([n.mean() for n in near])
        p95 = np.array([np.percentile(n, 95) for n in near])
        assert row["seeds"] == len(draws) and all(len(d) == size for d in draws)
        assert row["covering radius mean"] == pytest.approx(radius.mean(), rel=1e-5)
        assert row["mean distance mean"] == pytest.approx(mean.mean(), rel=1e-5)
        assert row["p95 distance mean"] == pytest.approx(p95.mean(), rel=1e-5)
        expected_std = radius.std(ddof=1) if len(draws) > 1 else 0.0
        assert row["covering radius std"] == pytest.approx(expected_std, rel=1e-4, abs=1e-9)
    # the seed changes the DQ and random draws (so the std is over different subsets), never k-center
    dq_std = [row["covering radius std"] + row["mean distance std"] for row in rows if row["method"] != "kcenter"]
    assert all(s > 0 for s in dq_std)


def test_command_writes_tables_and_figures_and_refuses_bad_input(cache, tmp_path):
    path, f = cache
    out = tmp_path / "cov"
    res = CliRunner().invoke(cli, ["coverage", str(path), "--out", str(out), "--rates", "0.1,0.3", "--seeds", "3",
                                   "--bins", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "coverage.json").read_text())
    assert [(r["method"], r["rate"], r["seeds"]) for r in rows] == [
        ("dq", 0.1, 3), ("random", 0.1, 3), ("kcenter", 0.1, 1), ("dq", 0.3, 3), ("random", 0.3, 3), ("kcenter", 0.3, 1)]
    shells = json.loads((out / "shells.json").read_text())
    assert [s["bin"] for s in shells] == [1, 2, 3, 4, 5]
    from dqtool.data.cache import PatchCache

    with PatchCache(path) as c:
        names = sorted(set(np.asarray(c.domain_of_patch).astype(str)))
    assert [sum(s[f"{d} patches"] for d in names) for s in shells] == [s["patches"] for s in shells]
    for name in ("shells.png", "coverage_radius.png", "coverage_mean.png", "coverage.md", "shells.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "shells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command again: the bins stored in the cache are reused and the tables are the same bytes
    before = (out / "coverage.csv").read_bytes()
    assert CliRunner().invoke(cli, ["coverage", str(path), "--out", str(out), "--rates", "0.1,0.3", "--seeds", "3",
                                    "--bins", "5", "--quiet"]).exit_code == 0
    assert (out / "coverage.csv").read_bytes() == before
    # bad input: one line each
    bare = noise_cache(tmp_path / "bare.h5")
    for args, message in ((["--seeds", "1"], "--seeds"), (["--rates", "0"], "rate"), (["--bins", "500"], "--bins")):
        res = CliRunner().invoke(cli, ["coverage", str(path), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code != 0 and message in res.output, res.output
    res = CliRunner().invoke(cli, ["coverage", str(bare), "--out", str(tmp_path / "y")])
    assert res.exit_code == 1 and "no features stored" in res.output and "dqtool embed" in res.output
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "notes.txt").write_text("mine")
    res = CliRunner().invoke(cli, ["coverage", str(path), "--out", str(lab)])
    assert res.exit_code == 1 and (lab / "notes.txt").read_text() == "mine"


def test_library_refuses_a_single_seed(cache, tmp_path):
    from dqtool.studies.coverage import coverage_study

    with pytest.raises(InputError, match="at least 2"):
        coverage_study(cache[0], tmp_path / "o", seeds=1)
