"""``dqtool select`` and ``dqtool export`` through Click: outputs, messages, exit codes, nothing overwritten."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dqtool.data.cache import PatchCache
from dqtool_cli.main import cli
from factories import noise_cache, store_features


def _cache(tmp_path, features=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = noise_cache(tmp_path / "c.h5", shape=(40, 40), names=["a", "b", "c"])
    if features:
        with PatchCache(path) as c:
            n = len(c)
        store_features(path, np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32), tmp_path / "f.npy")
    return path


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_select_writes_json_and_prints_coverage(tmp_path):
    path = _cache(tmp_path)
    out = tmp_path / "subset.json"
    res = _run("select", path, "--rate", "0.1", "--bins", "4", "--seed", "3", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    subset = json.loads(out.read_text())
    assert subset["method"] == "dq" and subset["rate"] == 0.1 and subset["config"]["seed"] == 3
    assert subset["config"]["bins"] == 4 and len(subset["bins"]) == len(subset["indices"])
    assert "covering radius" in res.output and "mean nearest distance" in res.output
    cov = subset["coverage"]
    assert f"{cov['dq']['covering_radius']:.4f}" in res.output
    assert f"{cov['random']['covering_radius']:.4f}" in res.output


def test_several_rates_reuse_bins_and_plot(tmp_path):
    path = _cache(tmp_path)
    res = _run("select", path, "--rate", "0.05,0.3", "--out", tmp_path / "s.json", "--plot", tmp_path / "p",
               "--gain", "dq", "--quiet")
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "s_rate0.05.json").read_text())
    b = json.loads((tmp_path / "s_rate0.3.json").read_text())
    assert a["config"]["bins_group"] == b["config"]["bins_group"] and b["config"]["bins_reused"]
    assert (tmp_path / "p" / "embedding_rate0.3.png").stat().st_size > 0
    assert (tmp_path / "p" / "patches_rate0.05.png").stat().st_size > 0


def test_random_method_and_first_sampling(tmp_path):
    path = _cache(tmp_path)
    res = _run("select", path, "--rate", "0.2", "--method", "random", "--sampling", "first", "--gain",
               "biomedseg", "--out", tmp_path / "r.json", "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "random"


@pytest.mark.parametrize("args", [["--rate", "abc"], ["--rate", "0.1", "--bins", "0"],
                                  ["--rate", "0.1", "--method", "kmeans"], ["--rate", "0.1", "--seed", "-1"]])
def test_bad_options_exit_2(tmp_path, args):
    path = _cache(tmp_path, features=False)
    res = _run("select", path, *args, "--out", tmp_path / "s.json")
    assert res.exit_code == 2
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("rates", ["0", "1.5", "0.1,1.5"])
def test_rates_are_checked_once_by_the_library(tmp_path, rates):
    """The range of a rate is the library's check (one line, exit 1); the CLI only reads the numbers."""
    path = _cache(tmp_path, features=False)
    res = _run("select", path, "--rate", rates, "--out", tmp_path / "s.json")
    assert res.exit_code == 1 and res.output.startswith("error: rate must be in (0, 1]")
    assert not list(tmp_path.glob("s*.json"))


def test_user_errors_exit_1_and_keep_existing_output(tmp_path):
    path = _cache(tmp_path, features=False)
    out = tmp_path / "s.json"
    out.write_text("keep me")
    res = _run("select", path, "--rate", "0.1", "--out", out)  # a file dqtool did not write: refused first
    assert res.exit_code == 1 and "not written by dqtool" in res.output and "Traceback" not in res.output
    assert out.read_text() == "keep me"
    new = tmp_path / "new.json"
    res = _run("select", path, "--rate", "0.1", "--out", new)
    assert res.exit_code == 1 and "dqtool embed" in res.output and "Traceback" not in res.output
    (tmp_path / "x").mkdir()
    embed_path = _cache(tmp_path / "x")
    res = _run("select", embed_path, "--rate", "0.1", "--bins", "100000", "--out", new)
    assert res.exit_code == 1 and "bins" in res.output
    assert not new.exists()
    res = _run("select", tmp_path / "missing.h5", "--rate", "0.1", "--out", new)
    assert res.exit_code == 1 and "missing.h5" in res.output


def test_export(tmp_path):
    path = _cache(tmp_path)
    out = tmp_path / "s.json"
    assert _run("select", path, "--rate", "0.2", "--out", out, "--quiet").exit_code == 0
    res = _run("export", out, "--out", tmp_path / "exp", "--quiet")
    assert res.exit_code == 0, res.output
    n = len(json.loads(out.read_text())["indices"])
    assert len(list((tmp_path / "exp").glob("*_img.png"))) == n
    assert len(list((tmp_path / "exp").glob("*_masks.png"))) == n
    assert (tmp_path / "exp" / "subset_patches.csv").exists()
    subset = json.loads(out.read_text())
    subset["indices"].append(99999)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(subset))
    res = _run("export", bad, "--out", tmp_path / "exp2")
    assert res.exit_code == 1 and "99999" in res.output and "bad.json" in res.output
    subset["indices"][-1] = subset["indices"][0]  # a repeated patch: refused, naming it
    bad.write_text(json.dumps(subset))
    res = _run("export", bad, "--out", tmp_path / "exp3")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"patch index {subset['indices'][0]} appears more than once" in res.output
    assert not (tmp_path / "exp3").exists()


@pytest.mark.slow
def test_real_data_default_mae_end_to_end(tmp_path, real_data):
    """patches -> embed (default self-trained MAE, 1 epoch) -> select --rate 0.1 on the shared real samples."""
    from dqtool.data.cache_build import build_cache_from_folders

    folders = sorted(p for p in real_data.iterdir() if p.is_dir())
    cache = tmp_path / "real.h5"
    build_cache_from_folders(folders[:1], cache, quiet=True)
    res = CliRunner().invoke(cli, ["embed", str(cache), "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    res = _run("select", cache, "--rate", "0.1", "--out", tmp_path / "s.json", "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())["n_selected"] >= 1
