"""The fault suite's harness: run a dqtool command in a subprocess on a prepared folder and check its refusal.

A fault case is judged from outside, as a lab would see it:

- the exit code (1 for a refused input: ``dqtool_cli.common.user_errors``);
- stderr is exactly one line, with no "Traceback", that names the file or value at fault;
- every file under the folder is byte-identical afterwards (sha256 of every file, hidden ones included),
  and, unless the case says otherwise, no file was added: a refused command writes nothing.

``run_dqtool`` and ``snapshot`` are plain functions so that any fault test (inputs, outputs) can use them;
``tests/faults/conftest.py`` offers them as fixtures too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass

#: dqtool's advisory lock files (``.OUT.lock`` beside an output, ``dqtool.common.outputs``) may stay after a
#: run, refused or not: an unheld lock file is how file locks are kept; it holds no data.
LOCK_SUFFIX = ".lock"

#: Seconds one command may take; a hang is a failure, not a stuck suite.
TIMEOUT_S = 180


def snapshot(root: str | os.PathLike) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (names that are not UTF-8 included)."""
    root = os.fspath(root)
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = "link:" + os.readlink(path)
                continue
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[os.path.relpath(path, root)] = h.hexdigest()
    return out


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_dqtool(args, cwd: str | os.PathLike, env: dict | None = None, timeout: float = TIMEOUT_S) -> Result:
    """``python -m dqtool --quiet ARGS`` in ``cwd`` (no progress bars); output decoded, bad bytes as \\xNN."""
    environ = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "dqtool", "--quiet", *map(str, args)], cwd=cwd, env=environ,
                          capture_output=True, timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout.decode("utf-8", "backslashreplace"),
                  proc.stderr.decode("utf-8", "backslashreplace"))


def assert_one_line(result: Result, code: int = 1, names=()) -> str:
    """The exit code, one line on stderr, no traceback, each of ``names`` in it; returns the line."""
    shown = f"exit {result.code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr, shown
    assert result.code == code, shown
    assert len(result.lines) == 1, shown
    line = result.lines[0]
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    return line


def assert_untouched(before: dict[str, str], after: dict[str, str], allow_new=()) -> None:
    """Every file of ``before`` is byte-identical in ``after``; new files only where ``allow_new`` says."""
    changed = [k for k in before if after.get(k) != before[k] and not os.path.basename(k).endswith(LOCK_SUFFIX)]
    assert not changed, f"changed or removed by a refused command: {changed}"
    added = [k for k in after if k not in before and not any(k.startswith(p) for p in allow_new)
             and not os.path.basename(k).endswith(LOCK_SUFFIX)]
    assert not added, f"written by a refused command: {added}"
