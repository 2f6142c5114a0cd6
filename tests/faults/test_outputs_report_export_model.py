"""Issue 19 for the last two writers: ``report`` (its page in a run folder) and ``export-model`` (a bioimage.io
package, a ``.zip`` or a folder).

Through the CLI in subprocesses, like ``test_outputs_rank_predict_eval.py``: each refuses a lab's file (or
folder) at its output, an input as its output, and a second writer while the first holds the lock, with one
line naming the path, exit 1 and every file that was there byte-identical; a rerun into its own output gives
the same result. ``report`` also leaves the ``report.md`` of a ``dqtool experiment`` folder alone. Every
refusal comes before the run is read or the model loaded (so the refusals cost a process start each).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from factories import noise_cache
from faultkit import assert_one_line, assert_untouched, run_dqtool, snapshot

from dqtool.common.outputs import MARKER, folder_marker, write_marker

_HOLDER = """
import sys, time
from dqtool.common.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(3600)  # killed by the test
"""


def _second_writer_fails_at_once(args, out: Path, cwd: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(cwd)
        line = assert_one_line(run_dqtool(args, cwd), 1, [out, f"process {holder.pid}"])
        assert "another dqtool process" in line, line
        assert holder.poll() is None  # refused while the holder still held the lock: it did not wait
        assert_untouched(before, snapshot(cwd))
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------
# report


@pytest.fixture
def run(tmp_path):
    """A partial run folder (one cache): the report is quick and says what is missing."""
    root = tmp_path / "run"
    root.mkdir()
    noise_cache(root / "train.h5")
    (root / "target").mkdir()
    return root


@pytest.mark.parametrize("name", ["report.md", "report.html", "report_files/figure.png", "report_files"])
def test_report_refuses_a_labs_file_at_its_page(run, name):
    """A lab's own report.md (or report.html, or pictures in report_files/) is not the report's to replace."""
    path = run / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"# our notes\n\nmonths of work\n" if name.endswith((".md", ".html")) else b"\x89PNG ours")
    before = snapshot(run.parent)
    line = assert_one_line(run_dqtool(["report", run], run.parent), 1, [path if name != "report_files/figure.png"
                                                                         else run / "report_files"])
    assert "give --out DIR" in line, line
    assert_untouched(before, snapshot(run.parent))


def test_report_leaves_an_experiment_folder_s_report_alone(run):
    """``dqtool experiment`` writes STUDY/report.md: ``dqtool report STUDY`` refuses and says --out."""
    write_marker(run, "experiment")
    (run / "report.md").write_text("# dqtool study\n\nthe study's tables\n")
    before = snapshot(run.parent)
    line = assert_one_line(run_dqtool(["report", run], run.parent), 1, [run, "dqtool experiment", "--out"])
    assert_untouched(before, snapshot(run.parent))
    page = run / "page"  # the page beside the study's report, where --out says
    assert run_dqtool(["report", run, "--out", page], run.parent).code == 0, line
    assert (run / "report.md").read_text() == "# dqtool study\n\nthe study's tables\n"
    assert (page / "report.md").read_text().startswith("# dqtool report: run\n")


@pytest.mark.parametrize("images, out", [("target", "target"), ("report_files", None)])
def test_report_refuses_an_input_as_its_output(run, images, out):
    """``--out IMAGES`` (the page among the lab's images), and ``--images RUN/report_files`` (replaced whole)."""
    (run / images).mkdir(exist_ok=True)
    (run / images / "a.png").write_bytes(b"\x89PNG an image")
    before = snapshot(run.parent)
    args = ["report", run, "--images", run / images] + (["--out", run / out] if out else [])
    line = assert_one_line(run_dqtool(args, run.parent), 1, [run / images])
    assert "is also an input" in line, line
    assert_untouched(before, snapshot(run.parent))


def test_report_second_writer_fails_at_once(run):
    _second_writer_fails_at_once(["report", run], run, run.parent)


def test_report_rerun_replaces_its_own_page_with_the_same_bytes(run):
    """A rerun (and one over the page of an earlier release, whose report_files/ had no marker) gives the same
    bytes; the run's other files, and a lab's file beside the page, stay; a lab's file put into report_files/
    (replaced whole) is refused by name, and stays."""
    from PIL import Image

    (run / "select").mkdir()
    Image.new("L", (8, 8), 128).save(run / "select" / "embedding.png")  # a selection picture: one figure
    (run / "notes.md").write_text("a lab's file beside the page\n")
    assert run_dqtool(["report", run], run.parent).code == 0
    first = snapshot(run)
    assert {"report.html", "report.md", f"report_files/{MARKER}", "report_files/select_embedding.png"} <= set(first)
    assert set(folder_marker(run / "report_files")["files"]) == {"select_embedding.png"}
    assert run_dqtool(["report", run], run.parent).code == 0
    assert snapshot(run) == first
    (run / "report_files" / MARKER).unlink()  # as an earlier release left it: its pictures are the page's links
    assert run_dqtool(["report", run], run.parent).code == 0
    assert snapshot(run) == first
    (run / "report_files" / "notes.txt").write_text("ours\n")
    before = snapshot(run.parent)
    line = assert_one_line(run_dqtool(["report", run], run.parent), 1, [run / "report_files", "notes.txt"])
    assert "not written by `dqtool report`" in line, line
    assert_untouched(before, snapshot(run.parent))


# ----------------------------------------------------------------------------------------------
# export-model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random Cellpose network file (refusals never load it; the reruns export it)."""
    import torch

    from dqtool.segmentation import model_files as mf

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "net"
    mf._new_net().save_model(str(path))
    return path


def _lab(tmp_path: Path, model: Path) -> Path:
    """``tmp_path/lab`` with the model in it (byte-compared afterwards like every other file)."""
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / model.name).write_bytes(model.read_bytes())
    return lab


def _user_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("rdf.yaml", "type: model\nname: ours\nconfig: {}\n")  # a package, but not dqtool's
        z.writestr("weights.pt", b"months of training")


@pytest.mark.parametrize("what", ["zip", "folder", "other command's folder", "export folder with a lab's file"])
def test_export_model_refuses_what_it_did_not_write(tmp_path, model, what):
    lab = _lab(tmp_path, model)
    if what == "zip":
        out = lab / "ours.zip"
        _user_zip(out)
        names, expect = [out], "not written by dqtool"
    elif what == "folder":
        out = lab / "package"
        out.mkdir()
        (out / "rdf.yaml").write_text("type: model\n")
        names, expect = [out], "not written by dqtool"
    elif what == "other command's folder":
        out = lab / "ranking"
        out.mkdir()
        write_marker(out, "rank")
        (out / "ranking.csv").write_text("model,score\n")
        names, expect = [out, "dqtool rank"], "will not replace"
    else:
        out = lab / "package"
        out.mkdir()
        write_marker(out, "export-model", files={"rdf.yaml": "0" * 64})
        (out / "notes.txt").write_text("a lab's file in dqtool's package\n")
        names, expect = [out, "notes.txt"], "was not written by `dqtool export-model`"
    before = snapshot(lab)
    line = assert_one_line(run_dqtool(["export-model", lab / model.name, "--out", out, "--no-test"], lab), 1, names)
    assert expect in line, line
    assert_untouched(before, snapshot(lab))


@pytest.mark.parametrize("out, expect", [("{model}", "is also an input"), (".", "holds")])
def test_export_model_refuses_an_input_as_its_output(tmp_path, model, out, expect):
    """``--out MODEL`` (the folder form over the model file) and ``--out DIR`` holding the model (the folder is
    replaced whole)."""
    lab = _lab(tmp_path, model)
    write_marker(lab, "export-model", files={})  # even a folder that reads as an export of dqtool's
    out = lab / out.format(model=model.name)
    before = snapshot(lab)
    line = assert_one_line(run_dqtool(["export-model", lab / model.name, "--out", out, "--no-test"], lab), 1, [out])
    assert expect in line, line
    assert_untouched(before, snapshot(lab))


def test_export_model_second_writer_fails_at_once(tmp_path, model):
    lab = _lab(tmp_path, model)
    _second_writer_fails_at_once(["export-model", lab / model.name, "--out", lab / "net.zip", "--no-test"],
                                 lab / "net.zip", lab)
    assert not (lab / "net.zip").exists()


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_export_model_reruns_replace_their_own_package(tmp_path, model):
    """In one process with a small test input and no TorchScript (about 3 s an export after the imports): a
    rerun replaces its own zip (the same members; bioimage.io stamps rdf.yaml's zip entry with the time) and its
    own folder (the same bytes); a lab's file put in the package folder is then refused, and stays."""
    pytest.importorskip("bioimageio.core", reason="needs the extra dqtool[bioimageio]")
    from dqtool.common.errors import InputError
    from dqtool.common.outputs import is_dqtool_file
    from dqtool.segmentation.export_model import ExportOptions, export_model

    options = ExportOptions(test_size=64, torchscript=False)
    package = export_model(model, tmp_path / "pkg.zip", options, test=False)
    assert is_dqtool_file(package)
    first = _members(package)
    assert export_model(model, package, options, test=False) == package
    assert _members(package) == first
    folder = export_model(model, tmp_path / "pkg", options, test=False)
    assert folder_marker(folder)["command"] == "export-model"
    first = snapshot(folder)
    export_model(model, folder, options, test=False)
    assert snapshot(folder) == first
    assert set(folder_marker(folder)["files"]) == set(first) - {MARKER}  # every file, with its sha256
    (folder / "notes.txt").write_text("ours\n")
    with pytest.raises(InputError, match="notes.txt was not written"):
        export_model(model, folder, options, test=False)
    assert snapshot(folder) == {**first, "notes.txt": snapshot(folder)["notes.txt"]}


@pytest.mark.slow
@pytest.mark.parametrize("out", ["net.zip", "package"])
def test_export_model_cli_rerun_gives_the_same_package(tmp_path, model, out):
    """~1 min each on 2 loaded cores (two whole exports, TorchScript included)."""
    pytest.importorskip("bioimageio.core", reason="needs the extra dqtool[bioimageio]")
    lab = _lab(tmp_path, model)
    args = ["export-model", lab / model.name, "--out", lab / out, "--no-test"]
    assert run_dqtool(args, lab).code == 0
    first = _members(lab / out) if out.endswith(".zip") else snapshot(lab / out)
    assert run_dqtool(args, lab).code == 0
    assert (_members(lab / out) if out.endswith(".zip") else snapshot(lab / out)) == first
