"""Source-free retention (``--retain l2sp|lwf``): the terms against independent NumPy formulas, their wiring into
training, finetune and sequence, and bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.common.errors import InputError
from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.segmentation.model_files import build_net, load_state_dict
from dqtool.segmentation.retention import Retention, check_retain, l2sp_penalty, lwf_loss
from dqtool.segmentation.train import TrainConfig, load_patches, train_patches
from dqtool.segmentation.transfer import sequence
from factories import disc_images as discs

CONFIG = TrainConfig(n_epochs=2, bsize=32, batch_size=4, min_train_masks=1, save_every=50)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A seeded random Cellpose model (the model to finetune) and a tiny cache of discs."""
    root = tmp_path_factory.mktemp("retain")
    torch.manual_seed(0)
    net = build_net(None)
    model = root / "start_model"
    net.save_model(str(model))
    images, labels = discs(n_images=1, size=128, n_cells=16, radius=(4.0, 6.0), seed=3)
    cache = build_cache_from_arrays(root / "c.h5", images, labels, ["train"], domain="d", size=64, stride=64)
    return {"model": model, "cache": cache, "root": root}


def _patches(cache):
    images, labels, _ = load_patches(cache)
    return list(images), list(labels)


# ---------------------------------------------------------------------------------------------- formulas


def test_l2sp_penalty_is_zero_at_the_start_and_grows_with_the_squared_distance(start):
    net = build_net(start["model"])
    reference = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert float(l2sp_penalty(net, reference)) == 0.0
    rng = np.random.default_rng(0)
    steps = {n: torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32))
             for n, p in net.named_parameters()}
    values = []
    for t in (0.001, 0.002, 0.004):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(reference[n] + t * steps[n])
        # independent: numpy, float64, over the state dict's parameter arrays
        expected = 0.5 * sum(float(np.sum((p.detach().numpy().astype(np.float64)
                                            - reference[n].numpy().astype(np.float64)) ** 2))
                             for n, p in net.named_parameters())
        got = float(l2sp_penalty(net, reference))
        assert got == pytest.approx(expected, rel=1e-4)
        values.append(got)
    assert values[1] == pytest.approx(4 * values[0], rel=1e-3)  # quadratic in the distance
    assert values[2] == pytest.approx(4 * values[1], rel=1e-3)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_lwf_loss_matches_numpy_and_is_zero_when_the_new_model_equals_the_old():
    rng = np.random.default_rng(1)
    y_old = rng.normal(0, 3, (2, 3, 8, 8)).astype(np.float32)
    y = y_old + rng.normal(0, 1, y_old.shape).astype(np.float32)
    assert float(lwf_loss(torch.from_numpy(y_old), torch.from_numpy(y_old))) == pytest.approx(0.0, abs=1e-6)
    q, p = _sigmoid(y_old[:, 2].astype(np.float64)), _sigmoid(y[:, 2].astype(np.float64))
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    expected = 0.5 * np.mean((y[:, :2].astype(np.float64) - y_old[:, :2]) ** 2) + kl.mean()
    assert float(lwf_loss(torch.from_numpy(y), torch.from_numpy(y_old))) == pytest.approx(expected, rel=1e-4)
    assert float(lwf_loss(torch.from_numpy(y), torch.from_numpy(y_old))) > 0


def test_the_lwf_term_is_zero_for_the_starting_model_itself(start):
    """The term in training: the starting model's own output (inference mode) against itself is 0."""
    term = Retention("lwf", 2.0, start["model"])
    net = build_net(start["model"]).eval()
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (2, 2, 64, 64)).astype(np.float32))
    with torch.no_grad():
        assert float(term(net, x, net(x)[0])) == pytest.approx(0.0, abs=1e-6)
    l2 = Retention("l2sp", 2.0, start["model"])
    assert float(l2(net, x, None)) == 0.0


# ---------------------------------------------------------------------------------------------- training


def _distance(model_a, model_b) -> float:
    """Squared distance of the trainable weights (batch-norm running statistics move without any gradient)."""
    a, b = load_state_dict(model_a), load_state_dict(model_b)
    weights = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    return float(sum(torch.sum((a[k].double() - b[k].double()) ** 2) for k in weights))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_l2sp_keeps_the_weights_nearer_the_start_and_is_recorded(start, tmp_path):
    images, labels = _patches(start["cache"])
    config = dataclasses.replace(CONFIG, n_epochs=4)  # epoch 0 has lr 0 (warm-up): 3 steps that move
    naive = train_patches(images, labels, tmp_path / "naive", config, init=start["model"], quiet=True)
    l2sp_config = dataclasses.replace(config, retain="l2sp", retain_weight=50.0)
    held = train_patches(images, labels, tmp_path / "l2sp", l2sp_config, init=start["model"], quiet=True)
    assert _distance(held.model, start["model"]) < _distance(naive.model, start["model"])
    record = json.loads((tmp_path / "l2sp.json").read_text())
    assert record["config"]["retain"] == "l2sp" and record["config"]["retain_weight"] == 50.0
    assert "retain" not in json.loads((tmp_path / "naive.json").read_text())["config"]  # old identities kept
    # W = 0 is the naive run, bit for bit (the term adds nothing)
    zero = train_patches(images, labels, tmp_path / "zero", dataclasses.replace(config, retain="l2sp",
                                                                               retain_weight=0.0),
                         init=start["model"], quiet=True)
    assert _distance(zero.model, naive.model) == 0.0
    # deterministic: the same run again gives the same weights
    again = train_patches(images, labels, tmp_path / "l2sp_again", l2sp_config, init=start["model"], quiet=True)
    assert _distance(again.model, held.model) == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lwf_trains_and_differs_from_naive(start, tmp_path):
    images, labels = _patches(start["cache"])
    naive = train_patches(images, labels, tmp_path / "naive", CONFIG, init=start["model"], quiet=True)
    lwf = train_patches(images, labels, tmp_path / "lwf", dataclasses.replace(CONFIG, retain="lwf"),
                        init=start["model"], quiet=True)
    assert lwf.config["retain_weight"] == 1.0  # the method's default W, recorded
    assert np.all(np.isfinite(lwf.train_losses))
    assert _distance(lwf.model, naive.model) > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sequence_without_init_trains_its_first_stage_without_retention(start, tmp_path):
    config = dataclasses.replace(CONFIG, retain="l2sp", retain_weight=1.0)
    res = sequence([start["cache"], start["cache"]], tmp_path / "seq", config=config, names=["a", "b"], quiet=True)
    first, second = (json.loads(p.read_text()) for p in sorted((tmp_path / "seq" / "models").glob("*.json")))
    assert "retain" not in first["config"] and first["provenance"]["init"] is None
    assert second["config"]["retain"] == "l2sp" and second["provenance"]["init"] is not None
    assert len(res.stages) == 2


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"retain": "ewc"}, "retain 'ewc'"),
    ({"retain": "l2sp", "retain_weight": -1.0}, "retain_weight = -1.0"),
    ({"retain": "lwf", "retain_weight": float("nan")}, "retain_weight = nan"),
    ({"retain": "lwf", "retain_weight": float("inf")}, "retain_weight = inf"),
    ({"retain_weight": 0.5}, "only with --retain"),
    ({"retain": "l2sp", "engine": "train_seg"}, "engine 'dqtool'"),
])
def test_bad_retention_settings_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        TrainConfig(**kwargs)


def test_retain_without_a_starting_model_is_refused_before_writing(start, tmp_path):
    images, labels = _patches(start["cache"])
    with pytest.raises(InputError, match="--init"):
        train_patches(images, labels, tmp_path / "m", dataclasses.replace(CONFIG, retain="lwf"), quiet=True)
    assert not any(tmp_path.iterdir())


def test_check_retain_defaults():
    assert check_retain("none", None) == 0.0
    assert check_retain("l2sp", None) == 0.01 and check_retain("lwf", None) == 1.0
    assert check_retain("lwf", 0.3) == 0.3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_finetune_retain_and_bad_weight(start, tmp_path):
    from dqtool_cli.main import cli

    common = ["--epochs", "2", "--bsize", "32", "--batch-size", "4", "--min-train-masks", "1", "--quiet"]
    bad = CliRunner().invoke(cli, ["finetune", str(start["cache"]), "--init", str(start["model"]), "--out",
                                   str(tmp_path / "bad"), "--retain", "lwf", "--retain-weight", "-2", *common])
    assert bad.exit_code == 1 and "retain_weight = -2.0" in bad.output and not (tmp_path / "bad").exists()
    noinit = CliRunner().invoke(cli, ["train", str(start["cache"]), "--out", str(tmp_path / "m"), "--retain", "lwf",
                                      *common])
    assert noinit.exit_code == 1 and "--init" in noinit.output
    ok = CliRunner().invoke(cli, ["finetune", str(start["cache"]), "--init", str(start["model"]), "--out",
                                  str(tmp_path / "ft"), "--retain", "l2sp", "--retain-weight", "5", *common])
    assert ok.exit_code == 0, ok.output
    trained = json.loads(next((tmp_path / "ft" / "models").glob("*.json")).read_text())
    assert trained["config"]["retain"] == "l2sp" and trained["config"]["retain_weight"] == 5.0
