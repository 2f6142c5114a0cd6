"""``dqtool report``: one self-contained page of what a run found (issue 14)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from dqtool_cli.main import cli
from factories import blob_image, noise_cache

from dqtool.report import write_report

SECTIONS = ("summary", "data", "selection", "training", "ranking", "outlines", "missing")
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Tags balance, sections by id, every src/href."""

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.links, self.errors = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _check_html(text):
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert "http://" not in text and "https://" not in text
    assert all(link.startswith("data:image/png;base64,") for link in checker.links), checker.links[:3]
    return checker


def _save_cpnet(path, seed):
    import torch
    from cellpose.resnet_torch import CPnet

    torch.manual_seed(seed)
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False)
    with torch.no_grad():  # no foreground: a cheap, defined prediction (zero objects)
        net.output[2].bias[2] -= 20.0
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A whole small run folder: cache, subset, selection picture, two models with records, a ranking."""
    root = tmp_path_factory.mktemp("run")
    noise_cache(root / "train.h5")
    cov = {"n_selected": 3, "covering_radius": 1.5, "mean_distance": 0.4}
    (root / "subset.json").write_text(json.dumps({"indices": [0, 4, 9], "method": "dq", "rate": 0.1, "n_total": 30,
                                                  "n_selected": 3, "coverage": {"dq": cov, "random": {**cov, "covering_radius": 2.0}}}))
    (root / "select").mkdir()
    from dqtool.common.figures import pyplot, save_figure

    fig = pyplot().figure(figsize=(2, 2))
    save_figure(fig, root / "select" / "embedding.png")
    models = root / "models"
    models.mkdir()
    ranking = []
    for k, name in enumerate(("good", "weak")):
        _save_cpnet(models / name, seed=k)
        (models / f"{name}.json").write_text(json.dumps({
            "identity": "x", "complete": True, "n_patches": 12,
            "config": {"n_epochs": 3, "nimg_per_epoch": 8, "bsize": 64, "learning_rate": 0.1},
            "provenance": {"cache": str(root / "train.h5"), "subset": str(root / "subset.json") if k else None},
            "train_losses": [2.0 - k * 0.1, 1.0, 0.5 + k]}))
        ranking.append({"model": str(models / name), "status": "ok", "rank": k + 1, "score": 0.9 - k / 2,
                        "adapted_rand": 0.9 - k / 2, "nhd": 0.99, "effective_invariance": 0.8, "f1": 0.8 - k / 2,
                        "accuracy": 0.5})
    images = root / "target"
    images.mkdir()
    for i in range(2):
        tifffile.imwrite(images / f"t{i}.tif", (blob_image(i, size=48) * 60000).astype(np.uint16))
        tifffile.imwrite(images / f"t{i}_masks.tif", (blob_image(i, size=48) > 0.5).astype(np.uint16))
    (root / "rank").mkdir()
    (root / "rank" / "rank.json").write_text(json.dumps({
        "score": "adapted_rand", "perturbation": "dropout", "strength": 0.2, "seed": 0, "ranking": ranking,
        "notes": [], "correlations": [{"score": "adapted_rand", "n_models": 2, "pearson": 1.0, "pearson_p": 1.0,
                                       "spearman": 1.0, "spearman_p": 1.0}]}))
    return root


def test_every_section_of_a_run_without_target_images(run, tmp_path):
    """Fast: no Cellpose inference; the outlines section says what it needs."""
    result = write_report(run, out=tmp_path, quiet=True)
    text = result.html.read_text()
    checker = _check_html(text)
    assert set(SECTIONS) <= checker.ids
    assert len(checker.links) == 2  # selection picture, loss curves
    assert result.missing == [("Predicted outlines: best and worst ranked model: no target images: pass "
                               "`dqtool report RUN --images DIR` (the folder ranked)")]
    assert "Spearman 1.00" in text and "| good |" not in text and "<td>good</td>" in text


@pytest.mark.slow
def test_whole_run_gives_a_valid_self_contained_page_with_every_section(run, tmp_path):
    result = write_report(run, images=run / "target", out=tmp_path, quiet=True)
    text = result.html.read_text()
    checker = _check_html(text)
    assert set(SECTIONS) <= checker.ids
    assert len(checker.links) == 3  # selection picture, loss curves, outlines
    assert "Nothing: every part of the run is there." in text and not result.missing
    assert "Spearman 1.00" in text and "good" in text and "weak" in text
    md = result.markdown.read_text()
    for title in ("## What the run found", "## Data", "## DQ selection and coverage", "## Models and their training",
                  "## Scores, ranking and its validation", "## Predicted outlines", "## What is missing"):
        assert title in md
    for name in ("losses.png", "outlines.png", "select_embedding.png"):
        assert (tmp_path / "report_files" / name).read_bytes().startswith(b"\x89PNG")
        assert f"report_files/{name}" in md


def test_a_partial_run_reports_what_is_there_and_what_is_missing(tmp_path):
    noise_cache(tmp_path / "train.h5")
    result = write_report(tmp_path, quiet=True)
    text = result.html.read_text()
    _check_html(text)
    assert "train.h5" in text
    assert any("dqtool select" in m for m in result.missing)
    assert any("dqtool train" in m for m in result.missing)
    assert any("dqtool rank" in m for m in result.missing)
    assert "## What is missing" in result.markdown.read_text()


def test_report_cli_prints_the_page_path(run, tmp_path):
    res = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(tmp_path / "report.html")
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2


def test_outlines_come_from_the_rankings_cache_and_equal_what_segment_gives(tmp_path, monkeypatch):
    """The report reads the best and worst models' masks from the ranking's outputs cache (no second Cellpose
    run); they are the masks :func:`segment` gives on the same image. Another model file, or a cache written
    under other eval settings, is not used."""
    import shutil

    import torch
    from cellpose.resnet_torch import CPnet

    from dqtool.data.io import read_image
    from dqtool.ranking import rank as R
    from dqtool.report import page
    from dqtool.segmentation.predict import load_model, segment

    models, images = tmp_path / "models", tmp_path / "images"
    models.mkdir()
    images.mkdir()
    torch.manual_seed(3)
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
    with torch.no_grad():  # cellprob centred on 0: objects in about half the pixels
        net.output[2].bias[2] -= net(torch.rand(1, 2, 64, 64))[0][0, 2].median()
    torch.save(net.state_dict(), models / "m")
    for i in range(2):
        tifffile.imwrite(images / f"t{i}.tif", (blob_image(20 + i) * 40000).astype(np.uint16))
    R.rank_bank(models, images, out=tmp_path / "rank")
    cache = [tmp_path / "rank" / "cache"]
    want = [segment(load_model(models / "m"), read_image(f)) for f in sorted(images.glob("*.tif"))]
    got = [page.ranked_masks(models / "m", f, cache) for f in sorted(images.glob("*.tif"))]
    for g, w in zip(got, want):  # (a random network finds no object: same shape, dtype and zeros)
        assert g is not None and g.shape == w.shape and np.array_equal(g, w)
    # a cache entry with objects under the same key: its masks are what the page shows
    from dqtool.common.files import file_sha256
    from dqtool.ranking.outputs_cache import OutputsCache
    from dqtool.ranking.passes import EvalSettings, Prediction

    first = sorted(images.glob("*.tif"))[0]
    objects = (blob_image(20) > 0.5).astype(np.uint16)
    OutputsCache(cache[0], EvalSettings().key()).store(file_sha256(models / "m"), file_sha256(first), Prediction(
        objects, np.zeros((2, *objects.shape), np.float32), np.zeros(objects.shape, np.float32)))
    assert np.array_equal(page.ranked_masks(models / "m", first, cache), objects)

    def no_cellpose(*a, **k):
        raise AssertionError("segmented again although the ranking's cache holds the masks")

    import importlib

    monkeypatch.setattr(importlib.import_module("dqtool.segmentation.predict"), "segment", no_cellpose)
    png = page.outlines_figure([str(models / "m")], ["best"], sorted(images.glob("*.tif")), [None, None],
                               cache_dirs=cache)
    assert png.startswith(b"\x89PNG")
    monkeypatch.undo()
    other = tmp_path / "other"
    shutil.copy(models / "m", other)
    with open(other, "ab") as fh:  # another file (another sha256): not this model's masks
        fh.write(b"\0")
    assert page.ranked_masks(other, sorted(images.glob("*.tif"))[0], cache) is None
    assert page.ranked_masks(models / "m", sorted(images.glob("*.tif"))[0], [tmp_path / "nowhere"]) is None
    R.rank_bank(models, images, out=tmp_path / "rank_d", diameter=17.0)  # other eval settings: not the defaults
    assert page.ranked_masks(models / "m", sorted(images.glob("*.tif"))[0], [tmp_path / "rank_d" / "cache"]) is None
