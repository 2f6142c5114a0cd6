"""Issue 19, kill tests of the two study writers, ``experiment`` and ``rank-study``, on miniature studies.

Each study is stopped with SIGKILL at a named point (``DQTOOL_TEST_KILL_AT``,
:func:`dqtool.common.outputs.kill_point`) while an uninterrupted run of the same study goes on beside it (two
processes at once: the reference costs no extra wall time on two cores). Then:

1. what the killed run wrote is whole: every file it left is byte-identical to the uninterrupted run's;
2. a rerun killed at the same point changes none of it (the old outputs are intact);
3. a rerun finishes with the bytes of the uninterrupted run: every table, figure, model and record.

The two runs write ``study`` inside two working directories, so the paths recorded in the tables are equal.
Only lock files and the records of run times (``seconds``, ``timing``) may differ. ``rank-study`` has no CLI
option for a miniature bank, so it runs as ``python -c`` with the library call (the same entry point).
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import TIMEOUT_S, Result, snapshot

from dqtool.common.outputs import KILL_ENV

KILLED = -signal.SIGKILL
SLOW = pytest.mark.slow

#: Files whose bytes record how long a step took (besides a model's sidecar ``MODEL.json``), or which
#: process held a lock.
TIMED = ("*.lock", "*/rank.json", "study_summary.json")


def _spawn(argv, cwd: Path, point: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(KILL_ENV, None)
    if point:
        env[KILL_ENV] = point
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen) -> Result:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return Result(proc.returncode, out.decode("utf-8", "backslashreplace"), err.decode("utf-8", "backslashreplace"))


def _run(argv, cwd: Path, point: str | None = None) -> Result:
    return _wait(_spawn(argv, cwd, point))


def _compared(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the timed ones."""
    files = snapshot(folder)
    return {k: v for k, v in files.items() if not any(fnmatch.fnmatch(k, p) for p in TIMED)
            and not (k.endswith(".json") and k[:-len(".json")] in files)}


def _killed_beside_reference(argv, tmp_path: Path, point: str) -> tuple[Path, Path]:
    """``argv`` in ``tmp_path/ref`` (whole) and in ``tmp_path/run`` (killed at ``point``), at once."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    procs = [_spawn(argv, ref), _spawn(argv, run, point)]
    whole, killed = [_wait(p) for p in procs]
    assert whole.code == 0, whole.stderr
    assert killed.code == KILLED, f"{point}: expected SIGKILL, got exit {killed.code}\n{killed.stderr}"
    return ref / "study", run / "study"


def _check_kill_and_rerun(argv, tmp_path: Path, point: str, expect) -> None:
    ref, study = _killed_beside_reference(argv, tmp_path, point)
    left = _compared(study)
    reference = _compared(ref)
    expect(left)  # the point was reached: what must (not) be there yet
    changed = sorted(k for k in left if reference.get(k) != left[k])
    assert not changed, f"{point}: the killed run left files that are not the uninterrupted run's: {changed}"
    again = _run(argv, study.parent, point)  # killed again at the same point: nothing that was there changes
    assert again.code == KILLED, again.stderr
    assert _compared(study) == left
    final = _run(argv, study.parent)
    assert final.code == 0, final.stderr
    assert _compared(study) == reference
    assert not [p for p in study.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------------------------
# experiment


@pytest.fixture
def experiment_config(tmp_path) -> Path:
    """One domain of one 128 px training image (two test images: a std over images is defined); the
    'all patches' model and one random subset, 2 epochs each."""
    from dqtool.data.synthetic import generate

    root = generate(tmp_path / "data", seed=0, n_train=1, n_test=2, size=128, quiet=True)
    config = {"domains": {"fluo": {"train": str(root / "fluo" / "train"), "test": str(root / "fluo" / "test")}},
              "patch": {"size": 64, "stride": 64}, "source": "fluo", "rates": [0.5], "methods": ["random"],
              "train": {"n_epochs": 2, "bsize": 32, "batch_size": 4, "min_train_masks": 1, "save_every": 50}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(config))
    return path


def _after_first_model(left):
    assert "models/redundancy/fluo_all_1" in left and "models/redundancy/fluo_random_0.5" not in left
    assert not any(k.startswith("tables/") for k in left) and "report.md" not in left


def _after_first_table(left):
    assert {"tables/redundancy.csv", "tables/redundancy.json", "models/redundancy/fluo_random_0.5"} <= set(left)
    assert "tables/zero_shot.csv" not in left and "report.md" not in left


@pytest.mark.parametrize("point, expect", [("experiment:table", _after_first_table),
                                           pytest.param("experiment:trained", _after_first_model, marks=SLOW)])
def test_experiment_killed_keeps_its_outputs_and_reruns_to_the_uninterrupted_bytes(tmp_path, experiment_config,
                                                                                   point, expect):
    argv = ["-m", "dqtool", "--quiet", "experiment", experiment_config, "--out", "study"]
    _check_kill_and_rerun(argv, tmp_path, point, expect)


# ----------------------------------------------------------------------------------------------
# rank-study


_RANK_STUDY = ("from dqtool.studies.rank_study import BankMember, rank_study\n"
               "rank_study('study', members=(BankMember('fluo', 1), BankMember('histo', 1)), perturbations=('dropout',),"
               " n_train=1, n_test=1, size=96, nimg_per_epoch=2)\n")


def _after_bank(left):
    assert {"bank/fluo_r100_e001.pth", "bank/histo_r100_e001.pth"} <= set(left)
    assert not any(k.startswith("rank/") for k in left) and "study.csv" not in left


def _after_ranking(left):
    assert {"rank/dropout/ranking.csv", "rank/.dqtool-output.json"} <= set(left)
    assert any(k.startswith("rank/cache/") for k in left)  # the unperturbed outputs, kept for a rerun
    assert "study.csv" not in left


def _after_first_study_table(left):
    assert "study.csv" in left and "study_correlations.csv" not in left and "study.png" not in left


@pytest.mark.parametrize("point, expect", [("rank-study:ranked", _after_ranking),
                                           pytest.param("rank-study:bank", _after_bank, marks=SLOW),
                                           pytest.param("rank-study:tables", _after_first_study_table, marks=SLOW)])
def test_rank_study_killed_keeps_its_outputs_and_reruns_to_the_uninterrupted_bytes(tmp_path, point, expect):
    _check_kill_and_rerun(["-c", _RANK_STUDY], tmp_path, point, expect)
