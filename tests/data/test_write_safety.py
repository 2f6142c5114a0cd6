"""Issue 19, the output side, in process: all-or-nothing derived groups, what dqtool recognises as its own,
output refusals, stale temp files, folder swaps and the one-line faults (``dqtool.common.outputs``)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from factories import noise_cache

from dqtool.common.errors import InputError
from dqtool.common.outputs import (
    MARKER,
    check_output,
    clean_stale,
    folder_marker,
    is_dqtool_file,
    output_error,
    output_lock,
    swap_folder,
    write_marker,
    writing,
)
from dqtool.data.cache import PatchCache
from dqtool.selection.subsets import Subset


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=False, capture_output=True,
                              text=True).stdout)


def test_write_group_failing_midway_keeps_the_previous_group(tmp_path, monkeypatch):
    path = noise_cache(tmp_path / "c.h5")
    with PatchCache(path) as c:
        c.write_group("features", {"features": np.ones((len(c), 3), np.float32)}, {"encoder_hash": "old"})
    calls = {"n": 0}
    real = h5py.Group.create_dataset

    def failing(self, name, *args, **kwargs):  # the second dataset fails, as on a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with PatchCache(path) as c, pytest.raises(OSError):
        c.write_group("features", {"features": np.zeros((len(c), 3), np.float32), "extra": np.zeros(2)},
                      {"encoder_hash": "new"})
    monkeypatch.undo()
    with PatchCache(path) as c:
        arrays, attrs = c.read_group("features")
        assert attrs["encoder_hash"] == "old" and np.all(arrays["features"] == 1)
        assert c.group_names() == ["features"]
    with h5py.File(path, "r") as h5:
        assert sorted(h5["derived"].keys()) == ["features"]  # the temp group was removed


def test_write_group_killed_between_the_moves_reads_the_old_copy_and_is_repaired(tmp_path):
    path = noise_cache(tmp_path / "c.h5")
    with PatchCache(path) as c:
        c.write_group("features", {"features": np.ones((len(c), 3), np.float32)}, {"encoder_hash": "old"})
    dead = _dead_pid()
    with h5py.File(path, "r+") as h5:  # what a writer killed after its first move leaves
        h5.move("derived/features", f"derived/.features.old-{dead}")
        h5.create_group(f"derived/.features.tmp-{dead}")
    with PatchCache(path) as c:
        assert c.read_group("features")[1]["encoder_hash"] == "old"
        assert c.group_names() == []  # hidden names are never listed as groups
        c.write_group("features", {"features": np.zeros((len(c), 3), np.float32)}, {"encoder_hash": "new"})
        assert c.read_group("features")[1]["encoder_hash"] == "new"
    with h5py.File(path, "r") as h5:
        assert sorted(h5["derived"].keys()) == ["features"]


def test_dqtool_recognises_its_own_files_by_content(tmp_path):
    cache = noise_cache(tmp_path / "c.h5")
    assert is_dqtool_file(cache)
    with h5py.File(tmp_path / "user.h5", "w") as h5:
        h5["x"] = np.zeros(3)
    assert not is_dqtool_file(tmp_path / "user.h5")
    Subset(indices=[1, 2], cache="c.h5").write(tmp_path / "s.json")
    assert is_dqtool_file(tmp_path / "s.json")
    (tmp_path / "user.json").write_text(json.dumps({"indices": [1, 2]}))  # hand-written: not dqtool's
    assert not is_dqtool_file(tmp_path / "user.json")
    (tmp_path / "m").write_bytes(b"weights")
    (tmp_path / "m.json").write_text(json.dumps({"model": str(tmp_path / "m"), "identity": "abc"}))
    assert is_dqtool_file(tmp_path / "m")
    (tmp_path / "img.tif").write_bytes(b"II*\0")
    assert not is_dqtool_file(tmp_path / "img.tif") and not is_dqtool_file(tmp_path / "missing")


def test_check_output_refusals(tmp_path):
    image = tmp_path / "a.tif"
    image.write_bytes(b"II*\0")
    with pytest.raises(InputError, match="is also an input"):
        check_output(tmp_path / "." / "a.tif", "patches", [image])
    with pytest.raises(InputError, match="not written by dqtool"):
        check_output(image, "patches")
    with pytest.raises(InputError, match="is a folder"):
        check_output(tmp_path, "select")
    lab = tmp_path / "lab"
    lab.mkdir()
    check_output(lab, "export", kind="folder")  # empty: fine
    (lab / "x.png").write_bytes(b"x")
    with pytest.raises(InputError, match="not written by dqtool"):
        check_output(lab, "export", kind="folder")
    with pytest.raises(InputError, match="holds"):
        check_output(tmp_path, "export", [image], kind="folder")
    write_marker(lab, "export")
    assert folder_marker(lab)["command"] == "export"
    check_output(lab, "export", kind="folder")
    assert json.loads((lab / MARKER).read_text())["command"] == "export"


def test_stale_temp_files_and_interrupted_swaps(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".c.h5.tmp-{dead}").write_bytes(b"x")
    (tmp_path / f".c.h5.tmp-{alive}").write_bytes(b"x")
    (tmp_path / f".exp.tmp-{dead}").mkdir()
    old = tmp_path / f".exp.old-{dead}"
    old.mkdir()
    (old / "000_img.png").write_bytes(b"kept")
    (tmp_path / f"c.h5.tmp-{dead}").write_bytes(b"not hidden: not ours, even of a dead pid")
    done = clean_stale(tmp_path)
    assert len(done) == 3
    assert (tmp_path / "exp" / "000_img.png").read_bytes() == b"kept"  # the old folder was put back
    assert (tmp_path / f".c.h5.tmp-{alive}").exists() and (tmp_path / f"c.h5.tmp-{dead}").exists()
    assert not (tmp_path / f".c.h5.tmp-{dead}").exists() and not (tmp_path / f".exp.tmp-{dead}").exists()


def test_swap_folder_replaces_whole(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    out.mkdir()
    (out / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    swap_folder(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["b"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_faults_become_one_line(tmp_path):
    for exc, words in ((OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
                       (OSError(errno.EROFS, "Read-only file system"), "read-only"),
                       (RuntimeError("file write failed: errno = 28, error message = 'No space left on device'"),
                        "disk is full"),
                       (OSError("Unable to lock file, errno = 11"), "locked")):
        msg = str(output_error(tmp_path / "c.h5", exc))
        assert words in msg and "\n" not in msg and str(tmp_path / "c.h5") in msg
    with pytest.raises(InputError, match="disk is full"), writing(tmp_path / "x.json", "select"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ValueError), writing(tmp_path / "x.json", "select"):  # other errors pass through
        raise ValueError("not a fault")


def test_subset_cache_path_is_relative_to_its_file(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    s = Subset(indices=[0], cache=str(tmp_path / "runs" / "c.h5")).relative_to_file(tmp_path / "runs" / "s.json")
    assert s.cache == "c.h5"
    monkeypatch.chdir(tmp_path.parent)
    assert s.cache_path(tmp_path / "runs" / "s.json") == tmp_path / "runs" / "c.h5"
    legacy = Subset(indices=[0], cache="runs/c.h5")  # written before the rule: relative to select's cwd
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "c.h5").write_bytes(b"")
    assert legacy.cache_path(tmp_path / "runs" / "s.json") == tmp_path / "runs" / "c.h5" or \
        legacy.cache_path(tmp_path / "runs" / "s.json").resolve() == (tmp_path / "runs" / "c.h5").resolve()


def test_a_temp_file_whose_output_is_locked_is_kept(tmp_path):
    """A writer on another machine of a shared file system has a pid that means nothing here: its lock counts."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dqtool.common.outputs import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(tmp_path / "c.h5")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        temp = tmp_path / f".c.h5.tmp-{_dead_pid()}"
        temp.write_bytes(b"x")
        assert clean_stale(tmp_path) == [] and temp.exists()
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale(tmp_path) == [temp] and not temp.exists()


_WRITER = ("import h5py, pathlib, sys\nf = h5py.File(sys.argv[1], 'r+')\nprint('open', flush=True)\n"
           "sys.stdin.readline()\npathlib.Path(sys.argv[2]).write_text('closing')\nf.close()\n")


def test_a_reader_waits_for_a_writers_hdf5_lock_and_then_reads(tmp_path):
    """libhdf5 locks a file open for writing; a reader waits for it (a derived group being swapped in)."""
    import threading

    cache = noise_cache(tmp_path / "c.h5")
    with PatchCache(cache) as pc:
        n = len(pc)
    marker = tmp_path / "closing"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(cache), str(marker)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(OSError):  # the lock is real: a plain open fails while the writer holds the file
            h5py.File(cache, "r").close()
        release = threading.Timer(1.0, lambda: (writer.stdin.write("go\n"), writer.stdin.flush()))
        release.start()
        with PatchCache(cache) as pc:  # waits, then reads
            assert len(pc) == n
        assert marker.exists()  # it could only open once the writer had let go (an order, not a time)
        release.join()
    finally:
        writer.kill()
        writer.wait()


_READER = ("import h5py, pathlib, sys\nf = h5py.File(sys.argv[1], 'r')\nprint('open', flush=True)\n"
           "sys.stdin.readline()\npathlib.Path(sys.argv[2]).write_text('closing')\nf.close()\n")


def test_a_writer_waits_for_a_readers_hdf5_lock_and_then_writes(tmp_path, monkeypatch):
    """A derived group written (``embed``/``select``) while another process reads the cache (a training loading
    its patches): libhdf5 refuses the write then; the writer waits for the reader, then writes; a reader that
    never lets go gives one line after LOCK_WAIT_S, and the cache is as it was."""
    import threading

    import dqtool.data.cache as C

    cache = noise_cache(tmp_path / "c.h5")
    marker = tmp_path / "closing"
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(cache), str(marker)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        with pytest.raises(OSError):  # the lock is real: a plain open for writing fails while the reader holds it
            h5py.File(cache, "r+").close()
        release = threading.Timer(1.0, lambda: (reader.stdin.write("go\n"), reader.stdin.flush()))
        release.start()
        with PatchCache(cache) as pc:
            pc.write_group("waited", {"x": np.arange(3)})
            assert marker.exists()  # it could only write once the reader had let go
            np.testing.assert_array_equal(pc.read_group("waited")[0]["x"], np.arange(3))
        release.join()
    finally:
        reader.kill()
        reader.wait()
    monkeypatch.setattr(C, "LOCK_WAIT_S", 0.5)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(cache), str(tmp_path / "never")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # holds until killed
    try:
        assert reader.stdout.readline().strip() == "open"
        with PatchCache(cache) as pc:
            with pytest.raises(InputError, match="held open by another process") as err:
                pc.write_group("late", {"x": np.arange(2)})
            assert str(cache) in str(err.value) and "\n" not in str(err.value)
            assert pc.group_names() == ["waited"]
            np.testing.assert_array_equal(pc.read_group("waited")[0]["x"], np.arange(3))
    finally:
        reader.kill()
        reader.wait()


def test_a_reader_gives_up_on_a_lock_held_too_long_with_one_line(tmp_path, monkeypatch):
    import dqtool.data.cache as C

    cache = noise_cache(tmp_path / "c.h5")
    monkeypatch.setattr(C, "LOCK_WAIT_S", 0.5)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(cache), str(tmp_path / "closing")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # holds until killed
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(InputError, match="held open for writing by another process") as err:
            PatchCache(cache)
        assert str(cache) in str(err.value) and "\n" not in str(err.value)
    finally:
        writer.kill()
        writer.wait()


def test_the_output_lock_never_waits(tmp_path, monkeypatch):
    """A second writer fails at once: the lock is tried without blocking (timeout 0), whatever the holder does."""
    import filelock

    seen = []
    real = filelock.FileLock.acquire

    def spy(self, timeout=None, *args, **kwargs):
        seen.append(self.timeout if timeout is None else timeout)
        return real(self, timeout, *args, **kwargs)

    monkeypatch.setattr(filelock.FileLock, "acquire", spy)
    with output_lock(tmp_path / "out"):
        pass
    assert seen and all(t == 0 for t in seen)
