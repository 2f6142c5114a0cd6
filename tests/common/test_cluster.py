"""dqtool.common.cluster: results in input order, per-task seeds, one-line errors, usage errors, the
unreachable scheduler, and a serial path that never imports Dask (issue 16). The commands' own equality
tests (serial vs a 2-worker cluster, byte for byte) are beside each command's tests."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dqtool.common.cluster import SERIAL, Cluster, iter_tasks, run_tasks, task_seed
from dqtool.common.errors import InputError
from dqtool_cli.main import cli


def _slow_square(x, offset=0):
    time.sleep(0.05 * (x % 3))  # later items finish first now and then: the order must still hold
    if x == 99:
        raise InputError("item 99: bad input (names the file)")
    return x * x + offset


def test_task_seed_depends_on_the_run_and_the_task_only():
    assert task_seed(0, "img.png") == task_seed(0, "img.png")
    assert len({task_seed(0, "a"), task_seed(1, "a"), task_seed(0, "b"), task_seed(0, "a", 1)}) == 4
    assert 0 <= task_seed(7, "x") < 2 ** 63


def test_cluster_arguments():
    assert not SERIAL.active and Cluster(workers=2).active and Cluster(scheduler="tcp://h:8786").active
    with pytest.raises(InputError, match="not both"):
        Cluster(workers=2, scheduler="tcp://h:8786")
    with pytest.raises(InputError, match=">= 1"):
        Cluster(workers=0)


def test_serial_and_cluster_give_the_same_ordered_results(dask_client):
    items = list(range(12))
    serial = run_tasks(_slow_square, items, quiet=True)
    assert serial == [x * x for x in items]
    assert run_tasks(_slow_square, items, client=dask_client, kind="square", quiet=True) == serial
    plus_one = functools.partial(_slow_square, offset=1)
    streamed = iter_tasks(plus_one, iter(items), client=dask_client, kind="square", quiet=True, total=12)
    assert list(streamed) == [x + 1 for x in serial]
    assert list(iter_tasks(plus_one, iter(items), quiet=True)) == [x + 1 for x in serial]


def test_each_call_gets_its_own_results(dask_client):
    """Back to back calls on one client never share Dask keys (they once did, through id() of a list)."""
    for k in range(6):
        assert run_tasks(_slow_square, [k, k + 1], client=dask_client, quiet=True) == [k * k, (k + 1) ** 2]


def test_the_first_failing_task_raises_its_own_error(dask_client):
    for call in (lambda: run_tasks(_slow_square, [1, 99, 2], client=dask_client, quiet=True),
                 lambda: list(iter_tasks(_slow_square, [1, 99, 2], client=dask_client, quiet=True))):
        with pytest.raises(InputError, match="item 99: bad input"):
            call()


def _write_then_read(item):
    """item ("write", path): wait, then write the file; ("read", path): read it (fails if it is not there yet)."""
    what, path = item
    if what == "write":
        time.sleep(1.5)  # the other worker is idle all this time: only the dependency keeps the reader waiting
        Path(path).write_text("done")
        return "wrote"
    return Path(path).read_text()


def test_a_task_waits_for_the_tasks_it_reads_from(dask_client, tmp_path):
    """``after``: the reader starts only when its writer has finished, on a 2-worker cluster where it could
    start at once; serially the order of the items already is the order of the work."""
    items = [("write", str(tmp_path / "a")), ("read", str(tmp_path / "a")), ("write", str(tmp_path / "b")),
             ("read", str(tmp_path / "b"))]
    assert run_tasks(_write_then_read, items, client=dask_client, quiet=True, after=[(), (0,), (), (2,)]) == \
        ["wrote", "done", "wrote", "done"]
    for f in ("a", "b"):
        (tmp_path / f).unlink()
    assert run_tasks(_write_then_read, items, quiet=True, after=[(), (0,), (), (2,)]) == ["wrote", "done"] * 2
    for after, message in (([(), (1,), (), ()], r"after\[1\] = \[1\]"), ([(), (0,)], "2 entries for 4 items")):
        with pytest.raises(ValueError, match=message):
            run_tasks(_write_then_read, items, quiet=True, after=after)


def test_a_failing_dependency_fails_the_call_with_its_own_error(dask_client):
    with pytest.raises(InputError, match="item 99: bad input"):
        run_tasks(_slow_square, [99, 2, 3], client=dask_client, quiet=True, after=[(), (0,), (1,)])


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "expected a number of worker processes >= 1"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "give --workers or --scheduler, not both"),
])
@pytest.mark.parametrize("command", ["patches", "embed", "predict", "eval"])
def test_bad_cluster_options_are_usage_errors(tmp_path, command, args, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "c.h5").write_bytes(b"")
    given = {"patches": [str(tmp_path / "in"), "--out", str(tmp_path / "c.h5")],
             "embed": [str(tmp_path / "c.h5")],
             "predict": [str(tmp_path / "m"), str(tmp_path / "in"), "--out", str(tmp_path / "o")],
             "eval": ["--gt", str(tmp_path / "in"), "--pred", str(tmp_path), "--out", str(tmp_path / "o")]}[command]
    result = CliRunner().invoke(cli, [command, *given, *args])
    assert result.exit_code == 2 and message in result.output, result.output


def _run(args, cwd, timeout=120, code=""):
    script = code or ("import sys\nfrom dqtool_cli.main import main\nsys.argv = ['dqtool'] + sys.argv[1:]\nmain()")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_unreachable_scheduler_is_one_line_within_10_seconds(tmp_path, kind):
    """Refused: the CLI's socket probe answers at once. Silent (a port that accepts and never speaks):
    Dask's own handshake timeout, CONNECT_TIMEOUT_S."""
    import socket

    from factories import noise_cache

    noise_cache(tmp_path / "c.h5")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the connection; nobody ever answers
        address = "tcp://127.0.0.1:9" if kind == "refused" else f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        # the probe's own timeout bounds the wait; the subprocess timeout only stops a hang from blocking CI
        result = subprocess.run([sys.executable, "-m", "dqtool", "embed", str(tmp_path / "c.h5"), "--scheduler",
                                 address], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --scheduler {address}: no Dask scheduler answered"), lines
    from dqtool.common.cluster import CONNECT_TIMEOUT_S

    assert CONNECT_TIMEOUT_S < 10  # the bound, kept by the probe's timeout rather than timed here


def test_the_serial_path_never_imports_dask(tmp_path):
    from factories import disc_images

    from dqtool.data.io import write_image_png

    images, labels = disc_images(n_images=2, size=64, seed=0)
    (tmp_path / "imgs").mkdir()
    for i, (image, label) in enumerate(zip(images, labels)):
        write_image_png(tmp_path / "imgs" / f"{i:03d}_img.png", image)
        write_image_png(tmp_path / "imgs" / f"{i:03d}_masks.png", label.astype("uint16"))
    code = ("import json, sys\nfrom click.testing import CliRunner\nfrom dqtool_cli.main import cli\n"
            "r = CliRunner().invoke(cli, ['--quiet', 'patches', 'imgs', '--out', 'c.h5', '--size', '32'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))))")
    result = _run([], tmp_path, code=code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
