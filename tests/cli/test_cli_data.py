"""CLI conventions and the data commands, run as a user would (click's runner and a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dqtool import __version__
from dqtool_cli.main import COMMANDS, cli


@pytest.fixture
def runner():
    return CliRunner()


def test_version_and_help_on_every_command(runner):
    r = runner.invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    for name in COMMANDS:
        r = runner.invoke(cli, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage:" in r.output


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "dqtool", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_data_patches_info(runner, tmp_path):
    r = runner.invoke(cli, ["data", str(tmp_path / "d"), "--n-train", "2", "--n-test", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "c.h5"
    r = runner.invoke(cli, ["patches", str(tmp_path / "d" / "fluo"), str(tmp_path / "d" / "histo"),
                            "--out", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "built" in r.output and "fluo: 8" in r.output and "histo: 8" in r.output
    r = runner.invoke(cli, ["patches", str(tmp_path / "d" / "fluo"), str(tmp_path / "d" / "histo"),
                            "--out", str(cache), "--quiet"])
    assert "reused" in r.output
    r = runner.invoke(cli, ["info", str(cache)])
    assert r.exit_code == 0 and "patches: 16" in r.output and "gzip" in r.output
    r = runner.invoke(cli, ["info", str(cache), "--json"])
    assert json.loads(r.output)["patches_per_domain"] == {"fluo": 8, "histo": 8}


def test_user_errors_are_one_line_with_exit_codes(runner, tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(cli, ["patches", str(tmp_path / "empty"), "--out", str(tmp_path / "c.h5")])
    assert r.exit_code == 1 and r.output.strip().startswith("error:") and "no images found" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(cli, ["patches", str(tmp_path / "missing"), "--out", str(tmp_path / "c.h5")])
    assert r.exit_code == 2  # bad usage
    r = runner.invoke(cli, ["patches", str(tmp_path / "empty"), "--out", str(tmp_path / "c.h5"), "--edge", "wrap"])
    assert r.exit_code == 2
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    r = runner.invoke(cli, ["info", str(bad)])
    assert r.exit_code == 1 and "bad.h5" in r.output and "Traceback" not in r.output
