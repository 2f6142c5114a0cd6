"""Start-up of the command line (pytest-benchmark): ``dqtool --help`` in a fresh process, target < 0.5 s.

The floor, measured in the same run, is a bare interpreter (``python -c pass``); the difference is what
the CLI costs before any command runs: Click, the lazy command table and ``dqtool_cli.common``. No
command module, torch, Cellpose, h5py or the MAE is imported (``tests/test_architecture.py`` checks that).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROUNDS = 10
DQTOOL = Path(sys.executable).with_name("dqtool")  # the console script a user runs


def _run(args) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_floor_python_pass(benchmark):
    """A bare interpreter, no site customisation beyond the venv's own."""
    benchmark.pedantic(_run, args=([sys.executable, "-c", "pass"],), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.skipif(not DQTOOL.exists(), reason="the dqtool console script is not installed beside python")
def test_dqtool_help(benchmark):
    """``dqtool --help``: lists every command from the lazy table."""
    benchmark.pedantic(_run, args=([str(DQTOOL), "--help"],), rounds=ROUNDS, warmup_rounds=1)
