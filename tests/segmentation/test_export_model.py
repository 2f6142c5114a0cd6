"""bioimage.io export (issue 17): a Cellpose model becomes a format-0.5 package that passes
bioimageio.core's own model test, with dqtool's training-data record in its metadata."""

from __future__ import annotations

import json
import socket
import sys
import zipfile

import pytest
import torch

from dqtool.common.errors import InputError, MissingExtra
from dqtool.segmentation import model_files as mf

pytest.importorskip("bioimageio.core", reason="needs the extra dqtool[bioimageio]")


def _random_model(path, diam_labels=12.0):
    torch.manual_seed(0)
    net = mf._new_net()
    net.diam_labels.data = torch.ones(1) * diam_labels
    net.save_model(str(path))
    return path


@pytest.mark.slow
def test_package_passes_bioimageio_model_test(tmp_path, monkeypatch):
    """~1-2 min on 2 loaded cores: export, then bioimageio.core's test_model on the zip as written."""
    import yaml
    from bioimageio.core import test_model

    from dqtool import __version__
    from dqtool.segmentation.export_model import ExportOptions, export_model

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    model = _random_model(tmp_path / "fluo_dq10")
    record = {"provenance": {"cache": "/data/train.h5", "cache_hash": "abc", "n_selected": 48, "n_in_cache": 480,
                             "subset": {"path": "/data/subset.json", "method": "dq", "rate": 0.1, "bins": 10}}}
    (tmp_path / "fluo_dq10.json").write_text(json.dumps(record))
    out = export_model(model, tmp_path / "pkg" / "fluo.zip", ExportOptions(test_size=64), test=False)
    summary = test_model(out)
    assert summary.status == "passed", summary.format()
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert {"fluo_dq10", "cp_traced.pt", "test_input.npy", "test_output.npy", "cellpose_cpnet.py"} <= names
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    dq = rdf["config"]["dqtool"]
    assert dq["version"] == __version__ and dq["diam_labels"] == 12.0
    assert dq["training_data"]["rate"] == 0.1 and dq["training_data"]["cache"] == "/data/train.h5"
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}


def test_not_a_cellpose_model_is_refused(tmp_path):
    from dqtool.segmentation.export_model import export_model

    bad = tmp_path / "notes.pth"
    bad.write_text("not a model")
    with pytest.raises(InputError, match=f"{bad}.*not a Cellpose model"):
        export_model(bad, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    from dqtool.segmentation.export_model import export_model

    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=r"dqtool\[bioimageio\]"):
        export_model(_random_model(tmp_path / "m"), tmp_path / "out.zip")


def test_training_record_from_sidecar(tmp_path):
    from dqtool.segmentation.export_model import training_record

    model = tmp_path / "m"
    assert training_record(model) == {}
    (tmp_path / "m.json").write_text(json.dumps({"provenance": {"cache": "c.h5", "subset": {"rate": 0.25,
                                                                                            "method": "dq"}}}))
    assert training_record(model) == {"cache": "c.h5", "selection": "dq", "rate": 0.25}
