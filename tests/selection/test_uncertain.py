"""``dqtool select --method uncertain --model M``: per-patch scores against the ranking's own per-image
scores, the uncertainty rule, the pick per bin and overall against numpy, seeds, the stored scores, bad input.

The models are the ranking tests' untrained Cellpose 3 networks. Cellpose's mask dynamics find no cell
with an untrained network (no flow converges: every patch would be "stable and empty"), so this module
replaces the mask step, :meth:`ModelPasses.masks`, by the connected components of cellprob > 0 (as the
ranking tests' TinyCellpose does) in the selection's path and in the ranking's alike; the network passes,
perturbations, normalisation and scores are the real ones.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from factories import blob_image, store_features
from ranking.test_rank import save_cpnet  # the ranking tests' random Cellpose 3 networks

from dqtool.common.errors import InputError
from dqtool.common.files import file_sha256
from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.ranking import rank as R
from dqtool.ranking.passes import EvalSettings, ModelPasses, Prediction, count_network_passes
from dqtool.ranking.perturb import DEFAULT_STRENGTH
from dqtool.selection import uncertain as U
from dqtool.selection.quantize import select_subset
from dqtool.selection.uncertain import PatchScorer, patch_uncertainty
from dqtool_cli.main import cli

SIZE = 32  # patch size: 3 images of 64 x 64 give 12 patches


def _cache(path, features=True):
    images = [(blob_image(s, 64) * 255).astype(np.uint8) for s in range(3)]
    build_cache_from_arrays(path, images, None, [f"img{s}" for s in range(3)], size=SIZE, stride=SIZE)
    if features:
        store_features(path, np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32),
                       path.with_suffix(".npy"))
    return path


def _empty_model(path):
    """A network that finds nothing anywhere, perturbed or not (cell probability far below 0)."""
    save_cpnet(path, seed=5)
    state = torch.load(path, weights_only=True)
    state["output.2.bias"][2] -= 1000.0
    torch.save(state, path)
    return path


def _components(self, tiled, dP, cellprob):
    from skimage.measure import label

    cellprob = np.asarray(cellprob.squeeze(), np.float32)
    return Prediction(label(cellprob > 0).astype(np.int32), np.asarray(dP.squeeze(), np.float32), cellprob)


@pytest.fixture(scope="module", autouse=True)
def component_masks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelPasses, "masks", _components)
        mp.setattr(U, "CHUNK", 5)  # several calls of the shared passes: patch 7 is the third of the second
        yield


@pytest.fixture(scope="module")
def bank(tmp_path_factory, component_masks):
    """One cache with features, one without, a model, an empty model, and the first (scoring) selection."""
    root = tmp_path_factory.mktemp("uncertain")
    save_cpnet(root / "model.pth", seed=3)  # about a fifth of each patch is foreground
    _empty_model(root / "empty.pth")
    cache = _cache(root / "c.h5")
    with count_network_passes() as first:
        subset = select_subset(cache, 0.5, method="uncertain", bins=3, seed=1, scorer=PatchScorer(str(root / "model.pth")))
    return {"root": root, "cache": cache, "model": root / "model.pth", "empty": root / "empty.pth",
            "first": first, "subset": subset}


def _stored(cache, group):
    """The stored group read with h5py alone (not through dqtool)."""
    with h5py.File(cache, "r") as h5:
        g = h5["derived"][group]
        return {k: g[k][()] for k in g.keys()}, dict(g.attrs)


def _uncertainty_by_hand(arrays, score="adapted_rand"):
    """The rule written out patch by patch: 0 stable and empty, 1 if cells appear perturbed, else 1 - s (NaN: 1)."""
    n = len(arrays["n_cells"])
    total = np.zeros(n)
    for k in ("dropout", "noise"):
        for i in range(n):
            s = float(arrays[f"{k}_{score}"][i])
            if arrays["n_cells"][i] == 0:
                total[i] += 1.0 if arrays[f"{k}_n_cells_perturbed"][i] > 0 else 0.0
            else:
                total[i] += 1.0 if math.isnan(s) else 1.0 - s
    return total / 2


# ---------------------------------------------------------------------------------------------- the scores


def test_patch_scores_equal_the_rankings_scores_of_the_patch_saved_as_an_image(bank, tmp_path):
    arrays, attrs = _stored(bank["cache"], bank["subset"].config["uncertainty_group"])
    assert attrs["model_sha256"] == file_sha256(bank["model"])
    with PatchCache(bank["cache"]) as cache:
        patches = cache.images(np.arange(len(cache)))
    for k in (0, 7):  # the noise seed follows the patch index: a patch later in the cache too
        image = tmp_path / f"patch{k}.tif"
        tifffile.imwrite(image, patches[k][..., 0])
        pair = R.RankPair(model=str(bank["model"]), image=str(image), index=k,
                          perturbations=(("dropout", DEFAULT_STRENGTH["dropout"]), ("noise", DEFAULT_STRENGTH["noise"])),
                          seed=0, settings=EvalSettings(), dropout_draw="run")  # the selection's draw
        result = R.score_pair(pair)
        assert not result.error, result.error
        for kind, record in result.records.items():
            for score in ("adapted_rand", "nhd", "effective_invariance"):
                np.testing.assert_equal(arrays[f"{kind}_{score}"][k], record[score], err_msg=f"{kind} {score} {k}")
            assert arrays[f"{kind}_n_cells_perturbed"][k] == record["n_cells_perturbed"]
            assert arrays["n_cells"][k] == record["n_cells"]
    assert (arrays["n_cells"] > 0).any()
    assert np.nanmin(arrays["dropout_adapted_rand"]) < 1 and np.nanmin(arrays["noise_adapted_rand"]) < 1  # moved


def test_uncertainty_rule_on_constructed_records():
    consistency = {"dropout": np.array([0.9, np.nan, np.nan, 0.0, np.nan, 0.6]),
                   "noise": np.array([0.7, np.nan, 0.0, 0.5, np.nan, 0.2])}
    n_cells = np.array([3, 0, 0, 2, 4, 1])
    perturbed = {"dropout": np.array([3, 0, 0, 0, 1, 1]), "noise": np.array([2, 0, 5, 1, 1, 1])}
    u = patch_uncertainty(consistency, n_cells, perturbed)
    # 0: mean(0.1, 0.3); 1: stable and empty -> 0; 2: empty, stable under dropout (0), cells appear under
    # noise (1); 3: a model that loses every cell under dropout (Rand 0 -> 1); 4: undefined Rand -> 1
    np.testing.assert_allclose(u, [0.2, 0.0, 0.5, 0.75, 1.0, 0.6])
    arrays = {"n_cells": n_cells, **{f"{k}_adapted_rand": v for k, v in consistency.items()},
              **{f"{k}_n_cells_perturbed": v for k, v in perturbed.items()}}
    np.testing.assert_allclose(u, _uncertainty_by_hand(arrays))
    assert U.SCORES == R.SCORES


def test_a_model_that_finds_nothing_is_certain_everywhere_and_ties_go_by_the_seed(bank):
    scorer = PatchScorer(str(bank["empty"]))
    a = select_subset(bank["cache"], 0.25, method="uncertain", bins=None, seed=0, scorer=scorer)
    arrays, _ = _stored(bank["cache"], a.config["uncertainty_group"])
    assert (arrays["n_cells"] == 0).all() and (arrays["dropout_n_cells_perturbed"] == 0).all()
    assert np.isnan(arrays["dropout_adapted_rand"]).all()  # the ranking's value on two empty maps
    assert a.config["uncertainty_mean_all"] == 0.0 and a.n_selected == 3
    draws = {select_subset(bank["cache"], 0.25, method="uncertain", bins=None, seed=s, scorer=scorer).indices
             for s in range(4)}
    assert len(draws) > 1  # all tied: the seed decides
    assert select_subset(bank["cache"], 0.25, method="uncertain", bins=None, seed=0, scorer=scorer).indices == a.indices


# ---------------------------------------------------------------------------------------------- the pick


def _bins(cache, group):
    arrays, _ = _stored(cache, group)
    return np.split(arrays["order"], np.cumsum(arrays["sizes"])[:-1])


def test_within_each_bin_the_least_consistent_patches_with_dqs_quotas(bank):
    subset = bank["subset"]
    u = _uncertainty_by_hand(_stored(bank["cache"], subset.config["uncertainty_group"])[0])
    bins = _bins(bank["cache"], subset.config["bins_group"])
    dq = select_subset(bank["cache"], 0.5, method="dq", bins=3, seed=1)  # eq. 2's quotas, by the DQ sampling
    chosen = set(subset.indices)
    for b, members in enumerate(bins):
        inside = [i for i in members if i in chosen]
        assert len(inside) == sum(1 for i in dq.indices if i in set(members)), b
        rest = [i for i in members if i not in chosen]
        assert min(u[inside]) >= max(u[rest]), (b, u[inside], u[rest])  # a top-q set of the bin
    assert subset.method == "uncertain" and len(subset.bins) == subset.n_selected
    assert set(subset.coverage) == {"uncertain", "dq", "random"}
    assert subset.config["model_sha256"] == file_sha256(bank["model"])
    assert subset.config["uncertainty_mean_selected"] == pytest.approx(u[list(subset.indices)].mean())
    assert len(set(u.round(12))) > 3  # the scores are not all tied: the check above has teeth


def test_no_bins_is_the_global_top_k_and_needs_no_features(bank, tmp_path):
    bare = _cache(tmp_path / "bare.h5", features=False)
    subset = select_subset(bare, 0.25, method="uncertain", bins=None, seed=2, scorer=PatchScorer(str(bank["model"])))
    u = _uncertainty_by_hand(_stored(bare, subset.config["uncertainty_group"])[0])
    chosen = list(subset.indices)
    rest = [i for i in range(12) if i not in chosen]
    assert len(chosen) == 3 and min(u[chosen]) >= max(u[rest])
    assert subset.bins is None and subset.coverage is None and subset.features_hash is None
    with pytest.raises(InputError, match="no features"):
        select_subset(bare, 0.25, method="uncertain", bins=3, scorer=PatchScorer(str(bank["model"])))


def test_same_seed_same_subset_another_seed_differs_only_in_ties(bank):
    scorer = PatchScorer(str(bank["model"]))
    u = _uncertainty_by_hand(_stored(bank["cache"], bank["subset"].config["uncertainty_group"])[0])
    for bins in (3, None):
        runs = {s: select_subset(bank["cache"], 0.5, method="uncertain", bins=bins, seed=s, scorer=scorer).indices
                for s in (1, 9)}
        again = select_subset(bank["cache"], 0.5, method="uncertain", bins=bins, seed=1, scorer=scorer).indices
        assert again == runs[1]
        assert sorted(u[list(runs[1])]) == sorted(u[list(runs[9])])  # same values: only tied patches swap


def test_scores_are_stored_in_the_cache_and_reused(bank):
    assert bank["first"].encoder_tiles > 0 and not bank["subset"].config["uncertainty_reused"]
    with count_network_passes() as again:
        subset = select_subset(bank["cache"], 0.25, method="uncertain", bins=2, seed=3,
                               scorer=PatchScorer(str(bank["model"]), "nhd"))
    assert again.encoder_tiles == 0 and again.decoder_tiles == 0
    assert subset.config["uncertainty_reused"] and subset.config["score"] == "nhd"
    with PatchCache(bank["cache"]) as cache:
        assert subset.config["uncertainty_group"] in cache.group_names()


# ---------------------------------------------------------------------------------------------- the command


def _select(*args):
    return CliRunner().invoke(cli, ["select", *map(str, args), "--quiet"])


def test_cli_writes_the_subset_and_says_reused(bank, tmp_path):
    out = tmp_path / "s.json"
    res = _select(bank["cache"], "--rate", "0.5", "--bins", "3", "--seed", "1", "--method", "uncertain",
                  "--model", bank["model"], "--out", out, "--plot", tmp_path / "plots")
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["method"] == "uncertain" and doc["indices"] == list(bank["subset"].indices)
    assert doc["config"]["model"] == str(bank["model"].resolve())
    assert doc["config"]["model_sha256"] == file_sha256(bank["model"])
    assert "patch scores reused" in res.output
    assert (tmp_path / "plots" / "embedding.png").stat().st_size > 0
    res = _select(bank["cache"], "--rate", "0.25", "--method", "uncertain", "--no-bins", "--model", bank["model"],
                  "--out", tmp_path / "g.json", "--plot", tmp_path / "grid")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "g.json").read_text())["bins"] is None and "no bins" in res.output
    assert [p.name for p in (tmp_path / "grid").iterdir() if p.suffix == ".png"] == ["patches.png"]


def test_cli_bad_input_is_one_line_naming_the_value(bank, tmp_path):
    cache, out = bank["cache"], tmp_path / "s.json"
    not_a_model = tmp_path / "weights.pth"
    torch.save({"layer.weight": torch.zeros(2)}, not_a_model)
    rgb_model = tmp_path / "rgb3.pth"
    save_cpnet(rgb_model, nchan=3, seed=2)
    cases = [
        (["--method", "uncertain"], ["--method uncertain needs --model"]),
        (["--method", "dq", "--model", bank["model"]], [f"--model {bank['model']}", "only --method uncertain"]),
        (["--method", "dq", "--no-bins"], ["--no-bins applies to --method uncertain"]),
        (["--score", "nhd"], ["--score nhd"]),
        (["--method", "uncertain", "--model", not_a_model], [str(not_a_model), "not a Cellpose"]),
        (["--method", "uncertain", "--model", tmp_path / "missing.pth"], ["missing.pth", "not found"]),
        (["--method", "uncertain", "--model", rgb_model], [str(rgb_model), "3 input channels", str(cache)]),
        (["--method", "uncertain", "--model", bank["model"], "--rate", "0.01"], ["rate 0.01", "= 0 of the 12", str(cache)]),
    ]
    for args, names in cases:
        res = CliRunner().invoke(cli, ["select", str(cache), "--rate", "0.5", "--out", str(out), "--quiet",
                                       *map(str, args)])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, (args, res.output)
        for name in names:
            assert name in lines[0], (name, lines[0])
        assert not out.exists()
