"""Issue 19 for the three commands that fill a folder as they go: ``rank``, ``predict`` and ``eval``.

Through the CLI in subprocesses, like ``test_outputs.py``: each refuses a lab's non-empty folder, an output that
is one of its inputs (or a dqtool folder that holds one), and a second writer while the first holds the lock,
with one line naming the path, exit 1, and every file that was there byte-identical. Their own folders carry
dqtool's marker, so reruns write into them (the same bytes), a lab's file put there survives a rerun, and a run
that fails before writing leaves no folder behind. Each refusal comes before a model is loaded or an image read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import touching_cells
from faultkit import assert_one_line, assert_untouched, run_dqtool, snapshot
from PIL import Image

from dqtool.common.outputs import MARKER, folder_marker, write_marker


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab's folders: images (Cellpose layout), a model bank of one random network, ground truth and a
    prediction (label maps), and a folder of months of annotation that dqtool did not write."""
    import torch
    from cellpose.resnet_torch import CPnet

    root = tmp_path_factory.mktemp("lab")
    for k in range(2):
        labels = touching_cells((48, 48), 6, k).astype(np.uint16)
        img = ((labels > 0) * 150 + np.random.default_rng(k).integers(0, 60, labels.shape)).astype(np.uint8)
        _png(root / "images" / f"{k:03d}_img.png", img)
        _png(root / "gt" / f"{k:03d}_masks.png", labels)
        _png(root / "pred" / f"{k:03d}_img_cp_masks.png", np.roll(labels, 1, axis=1))
    torch.manual_seed(0)
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
    (root / "models").mkdir()
    net.save_model(str(root / "models" / "net.pth"))
    _png(root / "annotation" / "a_masks.png", touching_cells((48, 48), 6, 9).astype(np.uint16))
    (root / "annotation" / "notes.txt").write_text("months of work\n")
    return root


def _commands(root: Path, out) -> dict[str, list]:
    """The three writers, each into ``out``."""
    return {"rank": ["rank", root / "models", "--images", root / "images", "--out", out],
            "predict": ["predict", root / "models" / "net.pth", root / "images", "--out", out],
            "eval": ["eval", "--gt", root / "gt", "--pred", root / "pred", "--out", out]}


@pytest.mark.parametrize("command", ["rank", "predict", "eval"])
def test_refuses_a_labs_non_empty_folder(lab, command):
    before = snapshot(lab)
    line = assert_one_line(run_dqtool(_commands(lab, lab / "annotation")[command], lab), 1, [lab / "annotation"])
    assert "not written by dqtool" in line, line
    assert_untouched(before, snapshot(lab))


@pytest.mark.parametrize("command, out", [("rank", "images"), ("rank", "models"), ("predict", "images"),
                                          ("eval", "pred"), ("eval", "gt")])
def test_refuses_an_input_as_its_output(lab, command, out):
    """``predict --out IMAGES`` (Cellpose's own habit: masks beside the images) and its kind."""
    before = snapshot(lab)
    line = assert_one_line(run_dqtool(_commands(lab, lab / out)[command], lab), 1, [lab / out])
    assert "is also an input" in line, line
    assert_untouched(before, snapshot(lab))


def test_refuses_a_dqtool_folder_that_holds_an_input(tmp_path, lab):
    """A folder dqtool wrote (``dqtool data``, say) that holds the images: masks would land among them."""
    run = tmp_path / "run"
    (run / "fluo").mkdir(parents=True)
    write_marker(run, "data")
    for p in (lab / "images").iterdir():
        (run / "fluo" / p.name).write_bytes(p.read_bytes())
    before = snapshot(tmp_path)
    line = assert_one_line(run_dqtool(["predict", lab / "models" / "net.pth", run / "fluo", "--out", run], tmp_path),
                           1, [run, run / "fluo"])
    assert "holds" in line, line
    assert_untouched(before, snapshot(tmp_path))


_HOLDER = """
import sys, time
from dqtool.common.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(3600)  # killed by the test
"""


@pytest.mark.parametrize("command", ["rank", "predict", "eval"])
def test_a_second_writer_fails_at_once(tmp_path, lab, command):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        line = assert_one_line(run_dqtool(_commands(lab, out)[command], tmp_path), 1, [out, f"process {holder.pid}"])
        assert "another dqtool process" in line, line
        assert holder.poll() is None  # refused while the holder still held the lock: it did not wait
        assert_untouched(before, snapshot(tmp_path))
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", [pytest.param("rank", marks=pytest.mark.slow),  # ~30 s each: Cellpose runs
                                     pytest.param("predict", marks=pytest.mark.slow), "eval"])
def test_reruns_write_into_its_own_folder_and_keep_a_labs_file(tmp_path, lab, command):
    out = tmp_path / "out"
    args = _commands(lab, out)[command]
    assert run_dqtool(args, tmp_path).code == 0
    assert folder_marker(out)["command"] == command
    first = {k: v for k, v in snapshot(out).items() if k != "rank.json"}  # rank.json records the run's timing
    (out / "my_notes.txt").write_text("a lab's file in dqtool's folder\n")
    assert run_dqtool(args, tmp_path).code == 0
    again = snapshot(out)
    assert (out / "my_notes.txt").read_text() == "a lab's file in dqtool's folder\n"
    assert {k: again[k] for k in first} == first  # the same bytes
    assert MARKER in first


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, lab):
    out = tmp_path / "new" / "scores"
    r = run_dqtool(["eval", "--gt", lab / "gt", "--pred", lab / "gt", "--out", out], tmp_path)
    assert_one_line(r, 1, [lab / "gt"])
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_dqtool(["eval", "--gt", lab / "gt", "--pred", lab / "gt", "--out", empty], tmp_path)
    assert_one_line(r, 1, [lab / "gt"])
    assert empty.is_dir() and not any(empty.iterdir())  # a folder that was there stays, empty as it was


def test_folders_of_earlier_releases_are_still_dqtools(tmp_path):
    """``rank`` and ``eval`` folders written before the marker are recognised by their records."""
    rank = tmp_path / "rank"
    (rank / "dropout").mkdir(parents=True)
    (rank / "dropout" / "rank.json").write_text('{"models": [], "score": "adapted_rand", "perturbation": "dropout", '
                                                '"ranking": []}')
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "summary.json").write_text('{"thresholds": [0.5], "summary": [], "problems": []}')
    assert folder_marker(rank)["command"] == "rank" and folder_marker(ev)["command"] == "eval"
    (ev / "summary.json").write_text('{"thresholds": [0.5], "summary": [], "problems": [], "mine": 1}')
    assert folder_marker(ev) is None
