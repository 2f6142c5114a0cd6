"""rank_models and ``dqtool rank``: scores against an independent computation, outputs, bad input."""

import importlib
import itertools
import json
import math

import numpy as np
import pytest
import tifffile
import torch
from cellpose.resnet_torch import CPnet
from click.testing import CliRunner
from scipy import stats
from skimage.measure import label as connected_components
from skimage.metrics import adapted_rand_error

from dqtool.ranking import rank as R
from dqtool.ranking.consistency import rand_pixels
from dqtool.common.errors import InputError
from dqtool.data.io import write_labels
from dqtool.ranking.perturb import bottleneck_dropout, perturb_image
from dqtool_cli.main import cli
from factories import blob_image


# ---------------------------------------------------------------- a tiny stand-in for CellposeModel

class TinyCellpose:
    """Quacks like CellposeModel.eval: a small CPnet's cellprob, masks = connected components of it > 0.

    The cellprob mixes the image with the network's output, so dropout at the bottleneck and input
    perturbations both move the masks a little, as with a real model.
    """

    def __init__(self, seed):
        torch.manual_seed(seed)
        self.net = CPnet([2, 8, 16, 32], 3, sz=3, mkldnn=False)
        self.net.eval()

    def eval(self, x, channels, normalize, diameter, batch_size):
        assert channels == [0, 0] and normalize == {"normalize": False}
        data = torch.from_numpy(np.stack([x, np.zeros_like(x)])[None].astype(np.float32))
        with torch.no_grad():
            out = self.net(data)[0][0, 2].numpy()
        cellprob = 8.0 * (x - 0.45) + 2.0 * out
        return connected_components(cellprob > 0), [None, None, cellprob], None


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def direct_scores(m0, c0, m1, c1):
    """The definitions, written out: NHD, EI with numpy, Rand with scikit-image."""
    p, q = sigmoid(c0), sigmoid(c1)
    f, g = p > 0.5, q > 0.5
    union = f | g
    nhd = 1 - np.count_nonzero(f ^ g) / np.count_nonzero(union)
    ei = np.where(f & g, np.sqrt(p * q), 0.0)[union].mean()
    u, v = rand_pixels(m0, m1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rand = 1 - adapted_rand_error(u, v, ignore_labels=None)[0]
    return nhd, ei, rand


@pytest.mark.parametrize("perturbation,strength", [("dropout", 0.3), ("noise", 0.1), ("contrast", 0.5)])
def test_score_model_matches_direct_computation(perturbation, strength):
    model = TinyCellpose(seed=1)
    inputs = [blob_image(s) for s in range(3)]
    labels = [connected_components(x > 0.5) for x in inputs]
    records, inference_time = R.score_model(model, inputs, perturbation, strength, seed=4, labels=labels,
                                            dropout_draw="run")  # one draw for every image: the direct one below
    assert len(records) == 3 and inference_time >= 0.0  # reported, never compared with a budget
    for i, x in enumerate(inputs):
        m0, (_, _, c0), _ = model.eval(x, [0, 0], {"normalize": False}, None, 8)
        if perturbation == "dropout":
            with bottleneck_dropout(model.net, p=strength, seed=4, draw="run"):
                m1, (_, _, c1), _ = model.eval(x, [0, 0], {"normalize": False}, None, 8)
        else:
            noise_seed = int(np.random.SeedSequence([4, i]).generate_state(1)[0])
            x_p = perturb_image(x, perturbation, strength, seed=noise_seed)
            m1, (_, _, c1), _ = model.eval(x_p, [0, 0], {"normalize": False}, None, 8)
        nhd, ei, rand = direct_scores(m0, c0, m1, c1)
        assert records[i]["nhd"] == pytest.approx(nhd, abs=1e-9)
        assert records[i]["effective_invariance"] == pytest.approx(ei, rel=1e-5)
        assert records[i]["adapted_rand"] == pytest.approx(rand, abs=1e-9)
        assert 0 < records[i]["adapted_rand"] <= 1
        tp_model = 0 < records[i]["f1"] <= 1
        assert tp_model
    assert any(r["nhd"] < 1 for r in records)  # the perturbation did something


def test_summary_uses_median_and_counts_nan():
    recs = [{"adapted_rand": 0.9, "nhd": 0.8, "effective_invariance": math.nan},
            {"adapted_rand": math.nan, "nhd": 0.6, "effective_invariance": math.nan},
            {"adapted_rand": 0.5, "nhd": 0.7, "effective_invariance": 0.4}]
    ms = R._summarise("m", recs, "nhd")
    assert ms.adapted_rand == pytest.approx(0.7) and ms.n_adapted_rand == 2
    assert ms.nhd == pytest.approx(0.7) and ms.n_nhd == 3 and ms.score == ms.nhd
    assert ms.effective_invariance == pytest.approx(0.4) and ms.n_effective_invariance == 1


def _rec(image, rand, nhd, n_cells):
    return {"image": image, "adapted_rand": rand, "nhd": nhd, "effective_invariance": nhd, "n_cells": n_cells}


def constructed_bank():
    """Four images. 'steady' finds cells on images 0-2; 'rare' only on image 2 (one very stable cell);
    nobody on image 3. Where 'rare' finds nothing its unperturbed map is empty: adapted Rand NaN against
    an empty perturbed map, 0 against a non-empty one (the formula), NHD from a few foreground pixels."""
    steady = [_rec(0, 0.90, 0.92, 5), _rec(1, 0.80, 0.85, 4), _rec(2, 0.85, 0.88, 6), _rec(3, math.nan, math.nan, 0)]
    rare = [_rec(0, math.nan, 0.50, 0), _rec(1, 0.0, 0.40, 0), _rec(2, 0.99, 0.97, 1), _rec(3, math.nan, 0.30, 0)]
    broken = R.ModelScore(model="broken", status="failed", error="x")
    return [R._summarise("steady", steady, "adapted_rand"), R._summarise("rare", rare, "adapted_rand"), broken]


def test_empty_rule_worst_and_skip_on_a_constructed_bank():
    models = {m.model: m for m in R.apply_empty_rule(constructed_bank(), "adapted_rand", "skip")}
    steady, rare = models["steady"], models["rare"]
    # skip (the paper's code): rare's adapted Rand is the median over the one image where it found a cell
    assert rare.adapted_rand == pytest.approx(0.99) and rare.n_adapted_rand == 1
    assert rare.nhd == pytest.approx(np.median([0.50, 0.40, 0.97, 0.30])) and rare.n_nhd == 4  # as computed
    assert steady.adapted_rand == pytest.approx(0.85) and steady.n_adapted_rand == 3
    assert (rare.n_empty, steady.n_empty) == (3, 1)
    assert [m.model for m in R._result(list(models.values()), "adapted_rand", "dropout", 0.2, 0, [], [], None,
                                       {}).ranked] == ["rare", "steady"]  # the model that fails ranks first

    models = {m.model: m for m in R.apply_empty_rule(constructed_bank(), "adapted_rand", "worst")}
    steady, rare = models["steady"], models["rare"]
    # worst: images 0 and 1 (steady found cells there) score 0 for rare, every score; image 3 (nobody
    # found a cell) stays out of the adapted Rand for both, its NHD counts as computed
    assert rare.adapted_rand == pytest.approx(np.median([0.0, 0.0, 0.99])) and rare.n_adapted_rand == 3
    assert rare.nhd == pytest.approx(np.median([0.0, 0.0, 0.97, 0.30])) and rare.n_nhd == 4
    assert rare.effective_invariance == rare.nhd
    assert steady.adapted_rand == pytest.approx(0.85) and steady.n_adapted_rand == 3  # unchanged
    assert (rare.n_empty, steady.n_empty) == (3, 1)
    result = R._result(list(models.values()), "adapted_rand", "dropout", 0.2, 0, [], [], None, {})
    assert [m.model for m in result.ranked] == ["steady", "rare"]
    assert result.models[-1].model == "broken" and result.models[-1].status == "failed"
    assert [row["n_empty"] for row in result.table()] == [1, 3, 0]
    # the per-image records keep the values the formulas gave
    assert rare.per_image[1]["adapted_rand"] == 0.0 and math.isnan(rare.per_image[0]["adapted_rand"])
    # a model alone: nobody else finds cells, so 'worst' has nothing to compare with and skips
    alone = R.apply_empty_rule(constructed_bank()[1:2], "adapted_rand", "worst")[0]
    assert alone.adapted_rand == pytest.approx(0.99) and alone.n_adapted_rand == 1
    with pytest.raises(InputError, match="empty 'zero'"):
        R.apply_empty_rule(constructed_bank(), "adapted_rand", "zero")
    assert R.DEFAULT_EMPTY == "worst" and R.EMPTY_RULES == ("worst", "skip")


def test_rank_bank_threads_dropout_and_empty_options(tmp_path, bank, monkeypatch):
    """rank_bank / rank_models / ``dqtool rank`` hand dropout_site and dropout_draw to the passes, apply
    the empty rule across the bank, and record all three in rank.json."""
    seen = []

    def fake_passes(model, inputs, perturbations, seed=0, labels=None, tick=None, **kw):
        seen.append(kw)  # one call per (model, image), in order: alpha (rare) img0, img1, then cellpose_beta's
        (i,) = kw["image_indices"]
        if len(seen) <= 2:  # alpha: a stable cell on img0, nothing on img1 (where beta finds cells)
            recs = [_rec(0, 0.99, 0.9, 3), _rec(1, math.nan, 0.9, 0)]
        else:
            recs = [_rec(0, 0.9, 0.9, 3), _rec(1, 0.9, 0.9, 3)]
        return {k: [dict(recs[i])] for k in perturbations}, 0.0

    monkeypatch.setattr(R, "score_model_passes", fake_passes)
    res = R.rank_models(bank / "models", bank / "images", out=tmp_path / "a", dropout_site="bottleneck",
                        dropout_draw="batch", empty="skip", cache=False)
    assert {(kw["dropout_site"], kw["dropout_draw"]) for kw in seen} == {("bottleneck", "batch")}
    assert res.options == {"dropout_site": "bottleneck", "dropout_draw": "batch", "empty": "skip"}
    doc = json.loads((tmp_path / "a" / "rank.json").read_text())
    assert (doc["dropout_site"], doc["dropout_draw"], doc["empty"]) == ("bottleneck", "batch", "skip")
    by_name = {r["model"].split("/")[-1]: r for r in doc["ranking"]}
    assert by_name["alpha.pth"]["n_empty"] == 1 and by_name["cellpose_beta"]["n_empty"] == 0
    assert by_name["alpha.pth"]["rank"] == 1  # skip: alpha's one stable image outranks beta's 0.9
    assert "n_empty" in (tmp_path / "a" / "ranking.csv").read_text().splitlines()[0]

    seen.clear()
    res = CliRunner().invoke(cli, ["rank", str(bank / "models"), "--images", str(bank / "images"), "--out",
                                   str(tmp_path / "b"), "--no-cache", "--quiet"])
    assert res.exit_code == 0, res.output
    assert {(kw["dropout_site"], kw["dropout_draw"]) for kw in seen} == {("decoder", "batch")}  # the defaults
    doc = json.loads((tmp_path / "b" / "rank.json").read_text())
    assert doc["empty"] == "worst" and doc["ranking"][0]["model"].endswith("cellpose_beta")  # worst: alpha 0 on img1
    for bad in (["--empty", "zero"], ["--dropout-site", "encoder"], ["--dropout-draw", "image"]):
        res = CliRunner().invoke(cli, ["rank", str(bank / "models"), "--images", str(bank / "images"), "--out",
                                       str(tmp_path / "c"), "--quiet"] + bad)
        assert res.exit_code == 2, bad
    with pytest.raises(InputError, match="dropout site"):
        R.rank_models(bank / "models", bank / "images", dropout_site="encoder")
    with pytest.raises(InputError, match="empty"):
        R.rank_models(bank / "models", bank / "images", empty="zero")


def brute_force_p(x, y, fn):
    """Two-sided p over all n! pairings: 2 min(P(T >= t), P(T <= t)), capped at 1."""
    obs = fn(x, y)
    perms = np.array([fn(np.array(p), y) for p in itertools.permutations(x)])
    eps = 1e-12 * max(1.0, abs(obs))
    return min(1.0, 2 * min(np.mean(perms >= obs - eps), np.mean(perms <= obs + eps)))


def test_correlations_against_scipy_and_exact_permutations():
    x = np.array([0.91, 0.72, 0.85, 0.40, 0.66])
    y = np.array([0.80, 0.55, 0.83, 0.20, 0.61])
    c = R.correlations(x, y, seed=0)
    assert c["n_models"] == 5
    assert c["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert c["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert c["spearman_p"] == pytest.approx(brute_force_p(x, y, lambda a, b: stats.spearmanr(a, b).statistic))
    assert c["kendall_p"] == pytest.approx(brute_force_p(x, y, lambda a, b: stats.kendalltau(a, b).statistic))
    assert c["pearson_p"] == pytest.approx(brute_force_p(x, y, lambda a, b: stats.pearsonr(a, b).statistic))
    few = R.correlations([0.1, 0.2], [0.3, 0.4])
    assert few["n_models"] == 2 and math.isnan(few["spearman"])


# ---------------------------------------------------------------- model files and target folders

def save_cpnet(path, nchan=2, seed=0):
    """A randomly initialised Cellpose 3 network whose cellprob is centred on 0 (so about half the
    pixels are foreground and the consistency scores are defined)."""
    torch.manual_seed(seed)
    net = CPnet([nchan, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
    with torch.no_grad():
        out = net(torch.rand(1, nchan, 64, 64))[0]
        net.output[2].bias[2] -= out[0, 2].median()
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    models = root / "models"
    models.mkdir()
    save_cpnet(models / "alpha.pth", seed=0)
    (models / "beta_run" / "models").mkdir(parents=True)  # train_seg's layout, no suffix
    save_cpnet(models / "beta_run" / "models" / "cellpose_beta", seed=1)
    save_cpnet(models / "rgb3.pth", nchan=3, seed=2)  # other channel settings: fails, others go on
    (models / "README.txt").write_text("not a model")
    (models / "weights.bin").write_bytes(b"\x00" * 64)
    torch.save({"layer.weight": torch.zeros(2)}, models / "other_net.pt")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(2):
        img = (blob_image(10 + i) * 40000).astype(np.uint16)
        tifffile.imwrite(images / f"img{i}.tif", img)
    write_labels(labels / "img0_label.tif", connected_components(blob_image(10) > 0.5))  # img1 unlabelled
    # a label beside the images is no target (the old skip list lacked _mask and ranked on it)
    tifffile.imwrite(images / "img1_mask.tif", connected_components(blob_image(11) > 0.5).astype(np.uint16))
    return root


def test_discover_models_finds_models_and_notes_the_rest(bank):
    models, skipped = R.discover_models(bank / "models")
    assert [m.name for m in models] == ["alpha.pth", "cellpose_beta", "rgb3.pth"]
    reasons = {p.split("/")[-1]: r for p, r in skipped}
    assert set(reasons) == {"README.txt", "weights.bin", "other_net.pt"}
    assert "Cellpose" in reasons["other_net.pt"]


@pytest.fixture(scope="module")
def cli_run(bank):
    out = bank / "out"
    result = CliRunner().invoke(cli, ["rank", str(bank / "models"), "--images", str(bank / "images"),
                                      "--labels", str(bank / "labels"), "--score", "nhd", "--out", str(out),
                                      "--quiet"])
    return result, out


def test_rank_cli_end_to_end(cli_run):
    result, out = cli_run
    assert result.exit_code == 0, result.output
    assert "| rank | model |" in result.output and "2 ranked, 1 failed, 3 skipped" in result.output
    doc = json.loads((out / "rank.json").read_text())
    assert [p.split("/")[-1] for p in doc["models"]] == [r["model"].split("/")[-1] for r in doc["ranking"][:2]]
    assert len(doc["failed"]) == 1 and "rgb3.pth" in doc["failed"][0]["model"]
    assert "input channels" in doc["failed"][0]["error"]
    assert any("labels missing for 1 of 2" in n for n in doc["notes"])
    ranked = doc["ranking"][:2]
    assert [r["rank"] for r in ranked] == [1, 2]
    scores = [-1.0 if r["nhd"] is None else r["nhd"] for r in ranked]  # NaN (null) ranks last
    assert scores == sorted(scores, reverse=True) and all(r["score"] == r["nhd"] for r in ranked)
    assert ranked[0]["nhd"] is not None and ranked[0]["n_nhd"] == 2
    assert all(r["n_images"] == 2 and r["n_labelled"] == 1 for r in ranked)
    for name in ("ranking.csv", "ranking.md", "ranking.json", "per_image.csv", "validation.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_image = json.loads((out / "per_image.json").read_text())
    assert len(per_image) == 4 and {r["image"] for r in per_image} == {"img0.tif", "img1.tif"}
    assert all(0 <= r["nhd"] <= 1 for r in per_image if r["nhd"] is not None)
    assert doc["timing"]["inference_s"] <= doc["timing"]["total_s"]


def test_rank_cli_errors(tmp_path, bank):
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    res = runner.invoke(cli, ["rank", str(empty), "--images", str(bank / "images")])
    assert res.exit_code == 1 and "no Cellpose model files" in res.output
    res = runner.invoke(cli, ["rank", str(bank / "models"), "--images", str(bank / "images"), "--strength", "1.5"])
    assert res.exit_code == 1 and "dropout strength 1.5" in res.output  # the library's check, not a CLI copy
    res = runner.invoke(cli, ["rank", str(bank / "models"), "--images", str(bank / "images"), "--perturb", "blur"])
    assert res.exit_code == 2


def test_rank_models_bad_input(tmp_path, bank):
    only_junk = tmp_path / "junk"
    only_junk.mkdir()
    (only_junk / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no Cellpose model files.*a.txt"):
        R.rank_models(only_junk, bank / "images")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tifffile.imwrite(mixed / "a.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(mixed / "b.tif", np.zeros((32, 40), np.uint8))  # other sizes are ranked (test_passes)
    with pytest.raises(InputError, match="b.tif: pixel type"):
        R.rank_models(bank / "models", mixed)
    nolabels = tmp_path / "nolabels"
    nolabels.mkdir()
    with pytest.raises(InputError, match="no label file matches"):
        R.rank_models(bank / "models", bank / "images", labels=nolabels)
    with pytest.raises(InputError, match="perturbation"):
        R.rank_models(bank / "models", bank / "images", perturbation="blur")
    with pytest.raises(InputError, match="score"):
        R.rank_models(bank / "models", bank / "images", score="iou")
    with pytest.raises(FileNotFoundError):
        R.rank_models(tmp_path / "nope", bank / "images")


def test_labels_follow_the_one_naming_rule(tmp_path):
    """rank paired labels by its own list (no _gt, _cp_masks, case, and picked the first of two silently);
    it now uses dqtool.data.naming (the rule itself is tested in tests/data/test_naming.py)."""
    from dqtool.data.naming import list_input_images

    images, labels = tmp_path / "images", tmp_path / "labels"
    lab = np.zeros((16, 16), np.uint16)
    lab[2:8, 2:8] = 3
    for name in ("a.tif", "b.tif", "c_img.tif", "d.tif"):
        images.mkdir(exist_ok=True)
        tifffile.imwrite(images / name, np.zeros((16, 16), np.uint16))
    labels.mkdir()
    for name in ("a_gt.tif", "b_Masks.tif", "c_img_cp_masks.tif"):
        write_labels(labels / name, lab)
    tifffile.imwrite(images / "d_mask.tif", lab)  # a label beside the images: not a target
    files = list_input_images(images)
    assert [f.name for f in files] == ["a.tif", "b.tif", "c_img.tif", "d.tif"]
    truth, notes = R._read_truth(labels, files, [np.zeros((16, 16))] * 4)
    assert [t is not None and t.max() == 1 for t in truth] == [True, True, True, False]
    assert "d.tif" in notes[0]
    write_labels(labels / "a_label.tif", lab)
    with pytest.raises(InputError, match=r"a_gt\.tif and .*a_label\.tif"):
        R._read_truth(labels, files, [np.zeros((16, 16))] * 4)


def test_normalise_for_model_is_cellposes_normalisation():
    from cellpose import transforms

    img = (blob_image(3) * 1000 + 50).astype(np.uint16)
    want = transforms.normalize99(img.astype(np.float32))
    np.testing.assert_allclose(R.normalise_for_model(img), want, rtol=1e-5, atol=1e-6)


def test_rank_study_glue(tmp_path, monkeypatch):
    """The study's wiring (data, bank folder, rankings, tables, plot) with the training step replaced
    by random networks; the real bank is trained by ``dqtool rank-study`` (README evidence)."""
    S = importlib.import_module("dqtool.studies.rank_study")  # the module (the package exports the function)

    def fake_bank(data, out, members, **kwargs):
        (out / "bank").mkdir(parents=True, exist_ok=True)
        paths = [out / "bank" / f"{m.name}.pth" for m in members]
        for seed, path in enumerate(paths):
            save_cpnet(path, seed=seed)
        return paths

    monkeypatch.setattr(S, "build_bank", fake_bank)
    members = (S.BankMember("fluo", 1), S.BankMember("histo", 1, 0.5))
    summary = S.rank_study(tmp_path, members=members, perturbations=("dropout",), n_train=1, n_test=1, size=96)
    assert isinstance(summary, S.RankStudyResult) and summary.target == "fluo"
    assert summary.members == ["fluo_r100_e001", "histo_r050_e001"]
    assert {r["model"] for r in summary.rows} == {"fluo_r100_e001", "histo_r050_e001"}
    assert all("dropout_rank" in r and "dropout_nhd" in r and "f1" in r for r in summary.rows)
    assert [c["perturbation"] for c in summary.correlations] == ["dropout"] * 6
    assert {(c["consistency"], c["performance"]) for c in summary.correlations} == \
        {(s, p) for s in ("adapted_rand", "nhd", "effective_invariance") for p in ("F1@0.5", "mean accuracy@0.5:0.95")}
    for name in ("study.csv", "study.md", "study_correlations.md", "study_summary.json", "study.png",
                 "rank/dropout/rank.json"):
        assert (tmp_path / name).exists(), name
    written = json.loads((tmp_path / "study_summary.json").read_text())
    assert list(written) == ["target", "members", "rows", "correlations", "timing"]
    assert written["members"] == summary.members and len(written["rows"]) == 2
    with pytest.raises(InputError, match="target"):
        S.rank_study(tmp_path, target="mars")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("quick", [False, True])
def test_rank_study_budget_comes_from_the_library_presets(tmp_path, monkeypatch, quick):
    """``dqtool rank-study [--quick]`` passes only ``quick``; the budget (bank, patches per epoch, test
    images) is the library's preset, the one the CLI used to spell out."""
    S = importlib.import_module("dqtool.studies.rank_study")  # the module (the package exports the function)

    seen = {}

    def fake_generate(root, seed, n_train, n_test, size, quiet):
        seen.update(n_train=n_train, n_test=n_test, size=size)
        return root

    def fake_bank(data, out, members, bsize, nimg_per_epoch, seed, quiet):
        seen.update(members=members, bsize=bsize, nimg_per_epoch=nimg_per_epoch)
        raise _Stop

    monkeypatch.setattr(S, "generate", fake_generate)
    monkeypatch.setattr(S, "build_bank", fake_bank)
    with pytest.raises(_Stop):
        S.rank_study(tmp_path, quick=quick)
    old_cli = {"members": S.QUICK_BANK if quick else S.DEFAULT_BANK, "nimg_per_epoch": 8 if quick else 16,
               "n_test": 4 if quick else 6, "bsize": 64, "n_train": 12, "size": 336}
    assert seen == old_cli
    assert S.PRESETS["quick" if quick else "default"] == S.StudyBudget(**old_cli)

    calls = []
    monkeypatch.setattr(S, "rank_study", lambda out, **kw: calls.append(kw) or S.RankStudyResult(
        target="fluo", members=[], rows=[], correlations=[], timing={}))
    res = CliRunner().invoke(cli, ["rank-study", "--out", str(tmp_path / "s"), "--quiet"] + (["--quick"] if quick else []))
    assert res.exit_code == 0, res.output
    assert calls == [{"target": "fluo", "seed": 0, "quick": quick, "quiet": True}]


def test_rank_study_hands_the_dropout_and_empty_options_to_every_ranking(tmp_path, monkeypatch):
    S = importlib.import_module("dqtool.studies.rank_study")
    monkeypatch.setattr(S, "generate", lambda root, **kw: root)
    monkeypatch.setattr(S, "build_bank", lambda *a, **kw: [])
    calls = []

    def fake_rank(*args, **kw):
        calls.append(kw)
        raise _Stop

    monkeypatch.setattr(S, "rank_bank", fake_rank)
    with pytest.raises(_Stop):
        S.rank_study(tmp_path / "s", dropout_site="bottleneck", dropout_draw="batch", empty="skip")
    assert {k: calls[0][k] for k in ("dropout_site", "dropout_draw", "empty")} == \
        {"dropout_site": "bottleneck", "dropout_draw": "batch", "empty": "skip"}
    with pytest.raises(_Stop):
        S.rank_study(tmp_path / "t")
    assert not {"dropout_site", "dropout_draw", "empty"} & set(calls[1])  # rank_bank's defaults

    seen = []
    monkeypatch.setattr(S, "rank_study", lambda out, **kw: seen.append(kw) or S.RankStudyResult(
        target="fluo", members=[], rows=[], correlations=[], timing={}))
    res = CliRunner().invoke(cli, ["rank-study", "--out", str(tmp_path / "u"), "--quiet", "--dropout-site",
                                   "bottleneck", "--dropout-draw", "batch", "--empty", "skip"])
    assert res.exit_code == 0, res.output
    assert {k: seen[0][k] for k in ("dropout_site", "dropout_draw", "empty")} == \
        {"dropout_site": "bottleneck", "dropout_draw": "batch", "empty": "skip"}


def test_rank_study_bank_subsets_round_halves_up_like_selection():
    """A member at rate < 1 trains on the selection module's random baseline: round(rate * N) with halves
    up. The bank used Python's round (halves to even) with a minimum of 1: N = 5 at rate 0.5 gave 2, now 3."""
    from dqtool.selection.subsets import random_subset
    from dqtool.studies.rank_study import BankMember, member_indices

    half = BankMember("fluo", 30, 0.5)
    assert member_indices(5, half, seed=2).tolist() == random_subset(5, 3, seed=2).tolist()
    assert len(member_indices(5, half)) == 3 and len(member_indices(7, half)) == 4   # 2.5 -> 3, 3.5 -> 4
    assert member_indices(9, BankMember("fluo", 30)).tolist() == list(range(9))
    # the presets' members (48 patches per domain) draw what they drew before
    for rate in (0.25, 0.1):
        k = max(1, int(round(rate * 48)))
        old = np.sort(np.random.default_rng(0).choice(48, k, replace=False))
        assert member_indices(48, BankMember("fluo", 30, rate), seed=0).tolist() == old.tolist()
    with pytest.raises(InputError, match="selects no patch"):
        member_indices(20, BankMember("fluo", 30, 0.01))


def test_a_split_file_names_the_target_images_and_their_labels(tmp_path):
    """``--images`` and ``--labels`` take a split file (a study's fixed subset of a dataset folder): its images
    in the split's order, read in place, each with the label file its layout's reader pairs it with."""
    from dqtool.data.datasets import write_split

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    lab = np.zeros((16, 16), np.uint16)
    lab[2:8, 2:8] = 1
    for n in "abc":
        tifffile.imwrite(root / "images" / f"{n}.tif", np.zeros((16, 16), np.uint16))
        write_labels(root / "labels" / f"{n}.png", lab)
    split = write_split(tmp_path / "two.json", root, ["c", "a"])
    files = R.target_files(split)
    assert [f.name for f in files] == ["c.tif", "a.tif"] and all(f.parent.name == "images" for f in files)
    truth, notes = R._read_truth(split, files, [np.zeros((16, 16))] * 2)
    assert [t.max() for t in truth] == [1, 1] and not notes
    assert [p.name for p in R._label_files(split, files)] == ["c.png", "a.png"]
    with pytest.raises(InputError, match="a labels folder or a split file"):
        R._read_truth(root / "images" / "a.tif", files, [np.zeros((16, 16))] * 2)


def test_a_finished_ranking_with_the_same_inputs_is_reused_and_any_change_ranks_again(tmp_path, bank, monkeypatch):
    """rank_bank(reuse=True), what a study's rerun does: the same models, images, labels, settings and options
    read the finished rankings back without a network pass (the same results and files); another seed, option,
    image or model file ranks again."""
    import shutil

    real = R.score_pair
    calls = []
    monkeypatch.setattr(R, "score_pair", lambda pair: calls.append(pair.model) or real(pair))
    models, images = tmp_path / "models", tmp_path / "images"
    shutil.copytree(bank / "models", models)
    shutil.copytree(bank / "images", images)
    out = tmp_path / "rank"
    args = dict(labels=bank / "labels", perturbations="dropout,noise", out=out, subfolders=True, reuse=True)
    first = R.rank_bank(models, images, **args)
    n_pairs = len(calls)
    assert n_pairs == 3 * 2  # 3 model files x 2 images (rgb3 fails in its own task)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
             and "cache" not in p.parts}
    inputs = {k: json.loads((out / k / "rank.json").read_text())["inputs"] for k in ("dropout", "noise")}
    assert len(set(inputs.values())) == 2 and all(len(v) == 64 for v in inputs.values())

    again = R.rank_bank(models, images, **args)
    assert len(calls) == n_pairs  # no task ran
    for k in ("dropout", "noise"):
        assert json.dumps(again.results[k].table()) == json.dumps(first.results[k].table())  # NaN as NaN
        assert again.results[k].correlations == first.results[k].correlations
        assert again.results[k].options == first.results[k].options and again.results[k].inputs == inputs[k]
        assert set(again.paths[k]) == set(first.paths[k]) and all(p.exists() for p in again.paths[k].values())
    assert any("reused" in n for n in again.notes)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and "cache" not in p.parts} == files  # nothing written again

    # any change ranks again: the seed, an option, an image's bytes, a model file's bytes
    for change in ({"seed": 1}, {"dropout_draw": "run"}, {"empty": "skip"}):
        before = len(calls)
        R.rank_bank(models, images, **{**args, **change})
        assert len(calls) == before + n_pairs, change
    R.rank_bank(models, images, **args)  # back to the first inputs: ranked again (the files were overwritten)
    before = len(calls)
    R.rank_bank(models, images, **args)
    assert len(calls) == before  # and reused once more
    tifffile.imwrite(images / "img1.tif", (blob_image(12) * 40000).astype(np.uint16))
    R.rank_bank(models, images, **args)
    assert len(calls) == before + n_pairs
    before = len(calls)
    save_cpnet(models / "alpha.pth", seed=5)
    R.rank_bank(models, images, **args)
    assert len(calls) == before + n_pairs
    # without reuse (dqtool rank's default) a finished ranking is ranked again
    before = len(calls)
    R.rank_bank(models, images, **{**args, "reuse": False})
    assert len(calls) == before + n_pairs
