"""Uncertainty scores on Dask and after a kill: ``select --method uncertain --workers N`` scores chunks of patches as
tasks (the client alone writes the cache) with the serial run's numbers, and a killed scoring resumes after the
chunks it finished."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.common.cluster import Cluster
from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.segmentation.model_files import build_net
from dqtool.selection import uncertain as U
from dqtool_cli.main import cli


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A cache of 10 patches of 48 x 48 with bright discs, and a seeded random network whose cell probability is
    biased so that about a third of a patch is foreground (NHD and EI then depend on every bit of it)."""
    root = tmp_path_factory.mktemp("uncertain_cluster")
    rng = np.random.default_rng(2)
    images = []
    for _ in range(5):
        yy, xx = np.mgrid[:96, :48]
        img = rng.normal(30, 5, (96, 48))
        for cy, cx in rng.uniform(8, 40, (4, 2)) * [2, 1]:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 40] += 150
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    build_cache_from_arrays(root / "c.h5", images, None, [f"img{i}" for i in range(5)], size=48, stride=48)
    torch.manual_seed(3)
    net = build_net(None).eval()
    with torch.no_grad():
        cellprob = net(torch.rand(1, 2, 48, 48))[0][0, 2]
        net.output[-1].bias[2] -= torch.quantile(cellprob.flatten(), 0.7)
    net.save_model(str(root / "net.pth"))
    return root


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(U, "CHUNK", 3)  # 10 patches: chunks of 3, 3, 3 and 1


def _copy(bank, tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes((bank / "c.h5").read_bytes())
    return path


def _scores(bank, cache_path, cluster=None):
    with PatchCache(cache_path) as cache:
        return U.load_or_score_patches(cache, bank / "net.pth", cluster=cluster)


def test_two_workers_give_the_serial_scores_and_the_client_writes_them(bank, tmp_path, small_chunks):
    serial_dir, dask_dir = tmp_path / "serial", tmp_path / "dask"
    serial_dir.mkdir()
    dask_dir.mkdir()
    serial = _scores(bank, _copy(bank, serial_dir))
    distributed = _scores(bank, _copy(bank, dask_dir), Cluster(workers=2))
    assert serial.arrays().keys() == distributed.arrays().keys()
    for name, values in serial.arrays().items():
        assert values.tobytes() == distributed.arrays()[name].tobytes(), name
    nhd = serial.scores["noise"]["nhd"]  # foreground in every patch: the NHD depends on every bit of the passes
    assert np.isfinite(nhd).all() and np.unique(nhd).size == nhd.size
    with PatchCache(dask_dir / "c.h5") as cache:  # stored by the client, read back without a network pass
        again = U.load_or_score_patches(cache, bank / "net.pth")
    assert again.reused and again.arrays()["n_cells"].tobytes() == serial.arrays()["n_cells"].tobytes()
    assert not list(dask_dir.glob(".*partial*"))  # the partial file is gone once the group is in the cache


def test_a_killed_scoring_resumes_after_the_chunks_it_finished(bank, tmp_path, small_chunks, monkeypatch):
    fresh_dir, killed_dir = tmp_path / "fresh", tmp_path / "killed"
    fresh_dir.mkdir()
    killed_dir.mkdir()
    fresh = _scores(bank, _copy(bank, fresh_dir))
    cache_path = _copy(bank, killed_dir)
    real = U._chunk_arrays
    calls = []

    def dies_on_the_third(net, images, idx, strengths):
        calls.append(idx.tolist())
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, after two chunks
        return real(net, images, idx, strengths)

    monkeypatch.setattr(U, "_chunk_arrays", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _scores(bank, cache_path)
    (partial,) = killed_dir.glob(".c.h5.uncertainty_*.partial.npz")
    with np.load(partial) as z:
        assert int(z["done"]) == 6 and z["n_cells"].shape == (6,)
    calls.clear()
    monkeypatch.setattr(U, "_chunk_arrays", lambda *a: (calls.append(a[2].tolist()), real(*a))[1])
    resumed = _scores(bank, cache_path)
    assert calls == [[6, 7, 8], [9]]  # only the chunks after the partial file's
    for name, values in fresh.arrays().items():
        assert values.tobytes() == resumed.arrays()[name].tobytes(), name
    assert not partial.exists()


def test_a_partial_file_of_another_model_is_not_used(bank, tmp_path, small_chunks, monkeypatch):
    cache_path = _copy(bank, tmp_path)
    with PatchCache(cache_path) as cache:
        key = U.scoring_key()
        partial = tmp_path / "p.npz"
        U._write_partial(partial, json.dumps({"cache": cache.content_hash, "model": "0" * 64, "key": key},
                                             sort_keys=True), 3, {"n_cells": np.full(10, 99, np.int64)})
        scored = U.score_patches(cache, bank / "net.pth", key, partial=partial)
    assert not (scored.n_cells == 99).any()


def test_workers_without_uncertain_are_refused_in_one_line(bank, tmp_path):
    cache_path = _copy(bank, tmp_path)
    result = CliRunner().invoke(cli, ["select", str(cache_path), "--rate", "0.5", "--method", "random",
                                      "--workers", "2", "--out", str(tmp_path / "s.json")])
    assert result.exit_code != 0 and "only --method uncertain runs work on a cluster" in result.output
