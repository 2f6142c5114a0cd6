"""``dqtool eval`` on Dask (issue 16): one pair a task, the client writes the tables; every table (scores,
summary, problems) is the serial run's, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from dqtool.data.io import write_image_png
from dqtool_cli.main import cli
from factories import touching_cells


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Truth and prediction of two domains, with a pair of other shapes and a truth without prediction."""
    root = tmp_path_factory.mktemp("eval_dask")
    for domain in ("fluo", "histo"):
        for k in range(3):
            truth = touching_cells((40, 48), 8, seed=k + (10 if domain == "histo" else 0))
            pred = np.where(np.random.default_rng(k).random(truth.shape) < 0.1, 0, truth)
            (root / "gt" / domain).mkdir(parents=True, exist_ok=True)
            (root / "pred" / domain).mkdir(parents=True, exist_ok=True)
            write_image_png(root / "gt" / domain / f"{k:03d}_masks.png", truth.astype(np.uint16))
            write_image_png(root / "pred" / domain / f"{k:03d}_img_cp_masks.png", pred.astype(np.uint16))
    write_image_png(root / "gt" / "fluo" / "009_masks.png", np.ones((40, 48), np.uint16))  # no prediction
    write_image_png(root / "pred" / "histo" / "001_img_cp_masks.png", np.ones((30, 30), np.uint16))  # bad pair
    return root / "gt", root / "pred"


def run_eval(folders, out, *extra):
    gt, pred = folders
    result = CliRunner().invoke(cli, ["--quiet", "eval", "--gt", str(gt), "--pred", str(pred), "--out", str(out),
                                      "--thresholds", "0.5,0.75", *extra])
    assert result.exit_code == 3, result.output  # scored, with problems
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_tables_equal_the_serial_ones(folders, dask_scheduler, tmp_path):
    serial = run_eval(folders, tmp_path / "serial")
    assert {"per_image.csv", "summary.csv", "summary.json", "problems.csv"} <= set(serial)
    assert b"shape" in serial["problems.csv"]  # the bad pair is reported, the others scored
    assert run_eval(folders, tmp_path / "dask", "--scheduler", dask_scheduler) == serial
