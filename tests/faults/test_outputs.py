"""Issue 19, the output side, through the CLI in subprocesses: what dqtool refuses to write over, one writer
at a time, kills at named points (``DQTOOL_TEST_KILL_AT``, :func:`dqtool.common.outputs.kill_point`), full
and read-only disks (a 2 MB tmpfs, root only), stale temp files, and where a subset finds its cache.

Every kill case asserts the same three things: the process died by SIGKILL at that point, every output
that existed before is byte-identical (or, inside an HDF5 cache, the previous group reads back the same),
and running the command again gives the bytes of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from factories import touching_cells
from faultkit import assert_one_line, assert_untouched, run_dqtool, snapshot
from PIL import Image

from dqtool.common.outputs import KILL_ENV, MARKER

KILLED = -signal.SIGKILL
#: Kill points and writers beyond the first of each kind run in the slow suite (CI keeps one per writer).
SLOW = pytest.mark.slow


# ----------------------------------------------------------------------------------------------
# inputs


def _images(folder: Path, n: int = 3, size: int = 48, seed: int = 0) -> Path:
    """A labelled Cellpose-layout folder of small images (touching cells)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        labels = touching_cells((size, size), 6, seed + k).astype(np.uint16)
        rng = np.random.default_rng(seed + k)
        img = ((labels > 0) * 150 + rng.integers(0, 60, labels.shape)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{k:03d}_img.png")
        Image.fromarray(labels).save(folder / f"{k:03d}_masks.png")
    return folder


PATCH_ARGS = ("--size", "16", "--stride", "8")


def _cache(root: Path, name: str = "c.h5", stride: str = "8") -> Path:
    images = root / "images" if (root / "images").exists() else _images(root / "images")
    r = run_dqtool(["patches", images, "--out", root / name, "--size", "16", "--stride", stride], root)
    assert r.code == 0, r.stderr
    return root / name


def _features(root: Path, cache: Path, seed: int = 0, name: str = "f.npy") -> Path:
    with h5py.File(cache, "r") as h5:
        n = int(h5.attrs["n_patches"])
    np.save(root / name, np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32))
    r = run_dqtool(["embed", cache, "--features", root / name], root)
    assert r.code == 0, r.stderr
    return root / name


def _killed(args, cwd, point):
    r = run_dqtool(args, cwd, env={KILL_ENV: point})
    assert r.code == KILLED, f"{point}: expected SIGKILL, got exit {r.code}\n{r.stderr}"
    return r


def _group(cache: Path, name: str):
    from dqtool.data.cache import PatchCache

    with PatchCache(cache) as c:
        got = c.read_group(name)
    assert got is not None, f"{cache}: /derived/{name} does not read back"
    return got


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------
# refusals: never destroy what dqtool did not write


def test_every_writer_refuses_a_users_file(tmp_path):
    cache = _cache(tmp_path)
    user = tmp_path / "notes.txt"
    user.write_text("a lab's notes\n")
    image = tmp_path / "images" / "000_img.png"
    before = snapshot(tmp_path)
    cases = [
        (["patches", tmp_path / "images", "--out", image, *PATCH_ARGS], image, "input"),
        (["patches", tmp_path / "images", "--out", user, *PATCH_ARGS, "--force"], user, "not written by dqtool"),
        (["select", cache, "--rate", "0.2", "--out", cache], cache, "input"),
        (["select", cache, "--rate", "0.2", "--out", user], user, "not written by dqtool"),
        (["train", cache, "--out", user, "--epochs", "2"], user, "not written by dqtool"),
    ]
    for args, path, words in cases:
        line = assert_one_line(run_dqtool(args, tmp_path), 1, [path])
        assert words in line, line
    assert_untouched(before, snapshot(tmp_path))


def test_every_folder_writer_refuses_a_users_folder(tmp_path):
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    assert run_dqtool(["select", cache, "--rate", "0.2", "--out", tmp_path / "s.json"], tmp_path).code == 0
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "annotation.tif").write_bytes(b"months of work")
    before = snapshot(tmp_path)
    for args in (["data", lab, "--n-train", "1", "--n-test", "1"],
                 ["data", lab, "--n-train", "1", "--n-test", "1", "--force"],
                 ["export", tmp_path / "s.json", "--out", lab],
                 ["select", cache, "--rate", "0.2", "--out", tmp_path / "t.json", "--plot", lab],
                 ["experiment", "--quick", "--out", lab],
                 ["rank-study", "--quick", "--out", lab]):
        line = assert_one_line(run_dqtool(args, tmp_path), 1, [lab])
        assert "not written by dqtool" in line, line
    assert_untouched(before, snapshot(tmp_path))


def test_rebuilding_a_cache_with_features_needs_force_and_names_them(tmp_path):
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    assert run_dqtool(["select", cache, "--rate", "0.2", "--out", tmp_path / "s.json"], tmp_path).code == 0
    before = snapshot(tmp_path)
    line = assert_one_line(run_dqtool(["patches", tmp_path / "images", "--out", cache, "--size", "16",
                                       "--stride", "4"], tmp_path), 1, [cache, "--force"])
    assert "/derived/features" in line and "/derived/bins_" in line and "subset s.json" in line and "stride" in line
    assert_untouched(before, snapshot(tmp_path))
    r = run_dqtool(["patches", tmp_path / "images", "--out", cache, "--size", "16", "--stride", "4", "--force"],
                   tmp_path)
    assert r.code == 0 and "rebuilt" in r.stdout, r.stderr
    with h5py.File(cache, "r") as h5:
        assert int(h5.attrs["stride"]) == 4 and "derived" not in h5


def test_data_replaces_only_its_own_folder(tmp_path):
    out = tmp_path / "d"
    args = ["data", out, "--n-train", "1", "--n-test", "1"]
    assert run_dqtool(args, tmp_path).code == 0
    assert json.loads((out / MARKER).read_text())["command"] == "data"
    first = snapshot(out)
    assert run_dqtool([*args, "--force"], tmp_path).code == 0  # only dqtool's files there: replaced
    assert snapshot(out) == first
    (out / "fluo" / "train" / "my_notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    line = assert_one_line(run_dqtool([*args, "--seed", "1"], tmp_path), 1, [out, "my_notes.txt"])
    assert "not written by `dqtool data`" in line
    (out / "fluo" / "train" / "my_notes.txt").unlink()
    edited = out / "fluo" / "train" / "000_masks.png"
    edited.write_bytes(edited.read_bytes() + b"\0")
    line = assert_one_line(run_dqtool([*args, "--seed", "1", "--force"], tmp_path), 1, ["000_masks.png"])
    assert "changed since" in line
    assert edited.read_bytes() == before[str(edited.relative_to(tmp_path))] or edited.exists()


def test_export_keeps_edited_masks_and_removes_only_its_own_files(tmp_path):
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    for name, rate in (("a.json", "0.3"), ("b.json", "0.1")):
        assert run_dqtool(["select", cache, "--rate", rate, "--out", tmp_path / name], tmp_path).code == 0
    exp = tmp_path / "exp"
    assert run_dqtool(["export", tmp_path / "a.json", "--out", exp], tmp_path).code == 0
    n_a = len(json.loads((tmp_path / "a.json").read_text())["indices"])
    assert len(list(exp.glob("*_img.png"))) == n_a
    header = (exp / "subset_patches.csv").read_text().splitlines()[0]
    assert header.endswith("image_sha256,masks_sha256")
    mask = exp / "001_masks.png"
    mask.write_bytes(mask.read_bytes() + b"edited in the GUI")
    before = snapshot(tmp_path)
    line = assert_one_line(run_dqtool(["export", tmp_path / "b.json", "--out", exp], tmp_path), 1,
                           [exp, "001_masks.png"])
    assert "changed after the export" in line
    assert_untouched(before, snapshot(tmp_path))
    mask.unlink()  # the lab moves its corrected mask away; now the earlier export is all dqtool's
    assert run_dqtool(["export", tmp_path / "b.json", "--out", exp], tmp_path).code == 0
    n_b = len(json.loads((tmp_path / "b.json").read_text())["indices"])
    assert n_b < n_a and len(list(exp.glob("*_img.png"))) == n_b  # the earlier subset's files are gone
    assert not _hidden_leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------
# one writer at a time


_HOLDER = """
import sys, time
from dqtool.common.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(3600)  # killed by the test
"""


def _hold(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _second_writer_cases(tmp_path, cache):
    return {
        cache: [["patches", tmp_path / "images", "--out", cache, *PATCH_ARGS, "--force"],
                ["embed", cache, "--features", tmp_path / "f.npy"],
                ["select", cache, "--rate", "0.3", "--out", tmp_path / "t.json"]],
        tmp_path / "s.json": [["select", cache, "--rate", "0.2", "--out", tmp_path / "s.json"]],
        tmp_path / "exp": [["export", tmp_path / "s.json", "--out", tmp_path / "exp"]],
        tmp_path / "m": [["train", cache, "--out", tmp_path / "m", "--epochs", "2"]],
        tmp_path / "d": [["data", tmp_path / "d", "--n-train", "1", "--n-test", "1"]],
        tmp_path / "study": [["experiment", "--quick", "--out", tmp_path / "study"]],
        tmp_path / "rs": [["rank-study", "--quick", "--out", tmp_path / "rs"]],
        tmp_path / "ft": [["finetune", cache, "--init", tmp_path / "m", "--out", tmp_path / "ft"],
                          ["sequence", cache, cache, "--out", tmp_path / "ft"]],
    }


@pytest.mark.parametrize("which", ["cache", "models", pytest.param("all", marks=SLOW)])
def test_a_second_writer_fails_at_once_with_the_path_and_pid(tmp_path, which):
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    assert run_dqtool(["select", cache, "--rate", "0.2", "--out", tmp_path / "s.json"], tmp_path).code == 0
    cases = _second_writer_cases(tmp_path, cache)
    if which == "cache":  # CI: the three writers of a cache
        cases = {cache: cases[cache]}
    elif which == "models":  # CI: two trainings into one model folder (train, finetune, sequence)
        cases = {k: cases[k] for k in (tmp_path / "m", tmp_path / "ft")}
    for path, commands in cases.items():
        holder = _hold(path)
        try:
            for args in commands:
                before = snapshot(tmp_path)
                line = assert_one_line(run_dqtool(args, tmp_path), 1, [path, f"process {holder.pid}"])
                assert "another dqtool process" in line
                assert holder.poll() is None  # failed while the holder still held the lock: it did not wait
                assert_untouched(before, snapshot(tmp_path))
            if path == cache:  # readers do not take the lock: they work while a writer holds it
                r = run_dqtool(["info", cache], tmp_path)
                assert r.code == 0 and "patches" in r.stdout, r.stderr
                assert run_dqtool(["export", tmp_path / "s.json", "--out", tmp_path / "read"], tmp_path).code == 0
        finally:
            holder.kill()
            holder.wait()
    # the holder is gone: the lock is free again, and readers never needed it
    assert run_dqtool(["info", cache], tmp_path).code == 0
    assert run_dqtool(["select", cache, "--rate", "0.2", "--out", tmp_path / "s.json"], tmp_path).code == 0


# ----------------------------------------------------------------------------------------------
# kills at named points


@pytest.mark.parametrize("point", ["patches:image", "patches:written"])
def test_patches_killed_keeps_the_old_cache(tmp_path, point):
    cache = _cache(tmp_path)
    ref = _cache(tmp_path, "ref.h5", stride="4")
    old = cache.read_bytes()
    args = ["patches", tmp_path / "images", "--out", cache, "--size", "16", "--stride", "4"]
    _killed(args, tmp_path, point)
    assert cache.read_bytes() == old
    assert run_dqtool(args, tmp_path).code == 0
    assert cache.read_bytes() == ref.read_bytes()
    assert not _hidden_leftovers(tmp_path)  # the dead run's temp file was removed by the rerun


@pytest.mark.parametrize("point", [pytest.param("write_group:dataset", marks=SLOW), "write_group:written",
                                   "write_group:moved_old"])
def test_embed_killed_keeps_the_old_features(tmp_path, point):
    cache = _cache(tmp_path)
    _features(tmp_path, cache, seed=0, name="f0.npy")
    old_arrays, old_attrs = _group(cache, "features")
    np.save(tmp_path / "f1.npy", np.random.default_rng(1).normal(size=old_arrays["features"].shape).astype(np.float32))
    args = ["embed", cache, "--features", tmp_path / "f1.npy"]
    _killed(args, tmp_path, point)
    arrays, attrs = _group(cache, "features")  # the previous state reads back whole
    assert np.array_equal(arrays["features"], old_arrays["features"]) and attrs == old_attrs
    assert run_dqtool(args, tmp_path).code == 0
    ref = shutil.copy(cache, tmp_path / "ref.h5")  # the same write, never interrupted, from the same start
    arrays, attrs = _group(cache, "features")
    assert np.array_equal(arrays["features"], np.load(tmp_path / "f1.npy"))
    with h5py.File(ref, "r+") as h5:  # what an uninterrupted run stores: the same group, nothing else left
        del h5["derived/features"]
    assert run_dqtool(["embed", ref, "--features", tmp_path / "f1.npy"], tmp_path).code == 0
    ref_arrays, ref_attrs = _group(ref, "features")
    assert np.array_equal(arrays["features"], ref_arrays["features"])
    assert {k: v for k, v in attrs.items() if k != "encoder"} == {k: v for k, v in ref_attrs.items() if k != "encoder"}
    with h5py.File(cache, "r") as h5:
        assert sorted(h5["derived"].keys()) == ["features"]  # no temp or old group left behind


@pytest.mark.parametrize("point", [pytest.param("select:selected", marks=SLOW), "select:written"])
def test_select_killed_keeps_the_old_subsets(tmp_path, point):
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    base = ["select", cache, "--rate", "0.1,0.3", "--bins", "3"]
    assert run_dqtool([*base, "--seed", "5", "--out", tmp_path / "s.json"], tmp_path).code == 0
    old = snapshot(tmp_path)
    _killed([*base, "--out", tmp_path / "s.json"], tmp_path, point)
    now = snapshot(tmp_path)
    if point == "select:selected":
        assert_untouched(old, now)
    else:  # one subset file replaced whole, the other still the old one: never half a file
        changed = [k for k in old if now.get(k) != old[k] and not k.endswith(".lock")]
        assert changed == ["s_rate0.1.json"]
    assert run_dqtool([*base, "--out", tmp_path / "s.json"], tmp_path).code == 0
    # the uninterrupted run from the same state (the bins are stored in the cache by then: 'bins_reused')
    assert run_dqtool([*base, "--out", tmp_path / "ref.json"], tmp_path).code == 0
    for rate in ("0.1", "0.3"):
        assert (tmp_path / f"s_rate{rate}.json").read_bytes() == (tmp_path / f"ref_rate{rate}.json").read_bytes()


@pytest.mark.parametrize("point", [pytest.param("export:patch", marks=SLOW),
                                   pytest.param("export:written", marks=SLOW), "swap_folder"])
def test_export_killed_keeps_the_old_export(tmp_path, point):
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    for name, rate in (("a.json", "0.3"), ("b.json", "0.1")):
        assert run_dqtool(["select", cache, "--rate", rate, "--out", tmp_path / name], tmp_path).code == 0
    exp, ref = tmp_path / "exp", tmp_path / "ref"
    assert run_dqtool(["export", tmp_path / "b.json", "--out", ref], tmp_path).code == 0
    assert run_dqtool(["export", tmp_path / "a.json", "--out", exp], tmp_path).code == 0
    old = snapshot(exp)
    _killed(["export", tmp_path / "b.json", "--out", exp], tmp_path, point)
    if point == "swap_folder":  # killed between the two renames: the old folder waits under a hidden name
        assert not exp.exists()
        (hidden,) = [p for p in tmp_path.iterdir() if p.name.startswith(".exp.old-")]
        assert snapshot(hidden) == old
    else:
        assert snapshot(exp) == old
    assert run_dqtool(["export", tmp_path / "b.json", "--out", exp], tmp_path).code == 0
    assert snapshot(exp) == snapshot(ref)
    assert not _hidden_leftovers(tmp_path)


@pytest.mark.parametrize("point", ["data:image", pytest.param("data:written", marks=SLOW)])
def test_data_killed_keeps_the_old_folder(tmp_path, point):
    out, ref = tmp_path / "d", tmp_path / "ref"
    args = ["--n-train", "1", "--n-test", "1"]
    assert run_dqtool(["data", ref, *args, "--seed", "1"], tmp_path).code == 0
    assert run_dqtool(["data", out, *args], tmp_path).code == 0
    old = snapshot(out)
    _killed(["data", out, *args, "--seed", "1"], tmp_path, point)
    assert snapshot(out) == old
    assert run_dqtool(["data", out, *args, "--seed", "1"], tmp_path).code == 0
    assert snapshot(out) == snapshot(ref)
    assert not _hidden_leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["train:checkpoint", "train:model"])
def test_train_killed_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, point):
    cache = _cache(tmp_path)
    args = ["train", cache, "--epochs", "4", "--save-every", "2", "--bsize", "16", "--batch-size", "4",
            "--min-train-masks", "1", "--learning-rate", "0.01"]
    # one model name in two folders: torch names the archive inside the file after the file
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    assert run_dqtool([*args, "--out", tmp_path / "ref" / "m"], tmp_path).code == 0
    _killed([*args, "--out", tmp_path / "run" / "m"], tmp_path, point)
    assert not (tmp_path / "run" / "m").exists()
    r = run_dqtool([*args, "--out", tmp_path / "run" / "m", "--resume"], tmp_path)
    assert r.code == 0, r.stderr
    assert (tmp_path / "run" / "m").read_bytes() == (tmp_path / "ref" / "m").read_bytes()
    assert not _hidden_leftovers(tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# stale temp files, subset paths


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    cache = _cache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=False, capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".c.h5.tmp-{dead_pid}"
    stale.write_bytes(b"15 MB of a killed run")
    stale_model = tmp_path / f".m.mae-0123.pt.tmp-{dead_pid}"
    stale_model.write_bytes(b"x")
    live = tmp_path / f".c.h5.tmp-{os.getpid()}"  # this test's own pid: alive, so kept
    live.write_bytes(b"y")
    r = run_dqtool(["patches", tmp_path / "images", "--out", cache, *PATCH_ARGS], tmp_path)
    assert r.code == 0 and "reused" in r.stdout
    assert not stale.exists() and not stale_model.exists() and live.exists()


def test_a_subset_finds_its_cache_from_any_working_directory(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    _images(tmp_path / "images")
    assert run_dqtool(["patches", "images", "--out", "runs/demo/c.h5", *PATCH_ARGS], tmp_path).code == 0
    _features(run, run / "c.h5")
    assert run_dqtool(["select", "runs/demo/c.h5", "--rate", "0.2", "--out", "runs/demo/s.json"], tmp_path).code == 0
    assert json.loads((run / "s.json").read_text())["cache"] == "c.h5"  # relative to the JSON's own folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_dqtool(["export", run / "s.json", "--out", elsewhere / "exp"], elsewhere)
    assert r.code == 0, r.stderr
    moved = tmp_path / "moved"
    shutil.move(run, moved)  # the folder moved whole keeps working
    assert run_dqtool(["export", moved / "s.json", "--out", tmp_path / "exp2"], elsewhere).code == 0


# ----------------------------------------------------------------------------------------------
# full and read-only disks


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; skipped, and said, elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("full/read-only disk cases need root to mount a 2 MB tmpfs")
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=False, capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here (container without CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _large_images(root: Path) -> Path:
    return _images(root / "big", n=4, size=512, seed=3)


def test_full_disk_is_one_line_and_no_segfault(tmp_path, small_disk):
    images = _large_images(tmp_path)
    old = small_disk / "c.h5"
    assert run_dqtool(["patches", images, "--out", old, "--size", "64", "--stride", "512", "--compression", "none"],
                      tmp_path).code == 0
    before = snapshot(small_disk)
    r = run_dqtool(["patches", images, "--out", old, "--size", "64", "--stride", "16", "--compression", "none"],
                   tmp_path)
    line = assert_one_line(r, 1, [old])  # was a segfault (rc 139) in libhdf5's chunk cache on close
    assert "disk is full" in line
    assert_untouched(before, snapshot(small_disk))
    assert not _hidden_leftovers(small_disk)


def test_full_disk_during_embed_keeps_the_old_features(tmp_path, small_disk):
    images = _images(tmp_path / "images", n=3, size=48)
    cache = small_disk / "c.h5"
    assert run_dqtool(["patches", images, "--out", cache, *PATCH_ARGS], tmp_path).code == 0
    _features(tmp_path, cache, name="f0.npy")
    old_arrays, _ = _group(cache, "features")
    n = old_arrays["features"].shape[0]
    free = shutil.disk_usage(small_disk).free
    np.save(tmp_path / "big.npy", np.ones((n, free // (4 * n) + 64), np.float32))  # more than the disk holds
    line = assert_one_line(run_dqtool(["embed", cache, "--features", tmp_path / "big.npy"], tmp_path), 1, [cache])
    assert "disk is full" in line
    arrays, _ = _group(cache, "features")
    assert np.array_equal(arrays["features"], old_arrays["features"])


def test_read_only_disk_is_one_line(tmp_path, small_disk):
    images = _images(tmp_path / "images", n=2, size=48)
    cache = small_disk / "c.h5"
    assert run_dqtool(["patches", images, "--out", cache, *PATCH_ARGS], tmp_path).code == 0
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=False, capture_output=True).returncode == 0
    before = snapshot(small_disk)
    for args in (["patches", images, "--out", cache, *PATCH_ARGS, "--force"],
                 ["patches", images, "--out", small_disk / "new.h5", *PATCH_ARGS],
                 ["data", small_disk / "d", "--n-train", "1", "--n-test", "1"]):
        line = assert_one_line(run_dqtool(args, tmp_path), 1)
        assert "read-only" in line, line
    assert snapshot(small_disk) == before


def test_a_cache_held_open_by_another_process_is_one_line(tmp_path):
    """libhdf5 locks a file it has open; writing features into it waits DQTOOL_LOCK_WAIT_S for the reader, then
    fails as one line, cache intact."""
    cache = _cache(tmp_path)
    _features(tmp_path, cache)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\nf = h5py.File(sys.argv[1], 'r')\n"
                               "print('open', flush=True)\ntime.sleep(3600)", str(cache)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = snapshot(tmp_path)
        np.save(tmp_path / "g.npy", np.load(tmp_path / "f.npy") + 1)
        line = assert_one_line(run_dqtool(["embed", cache, "--features", tmp_path / "g.npy"], tmp_path,
                                          env={"DQTOOL_LOCK_WAIT_S": "1"}), 1, [cache])
        assert "held open by another process for over 1 s" in line
        after = snapshot(tmp_path)  # the lock file beside the cache now names the refused writer's pid
        assert all(after.get(k) == v for k, v in before.items() if not k.endswith(".lock"))
    finally:
        holder.kill()
        holder.wait()
