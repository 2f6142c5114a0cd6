"""dqtool.training: the epoch loop against Cellpose's own train_seg, files beside the model, resume,
seeding and the Cellpose traps (REFERENCE.md section 6)."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.common.errors import InputError
from factories import disc_images
from dqtool.segmentation.train import (TrainConfig, epoch_seed, learning_rate_schedule, prepare_patches, run_epochs, train)
from dqtool.segmentation.model_files import sidecar_paths
from dqtool.segmentation.model_files import build_net, load_state_dict


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    images, labels = disc_images()
    path = tmp_path_factory.mktemp("cache") / "discs.h5"
    return build_cache_from_arrays(path, images, labels, ["a", "b"], domain="discs", size=64, stride=64)


TINY = dict(bsize=32, batch_size=4, min_train_masks=1, save_every=2)


class _FakeNet(torch.nn.Module):
    """The parts of CPnet that train_seg touches, around one 1x1 convolution (fast)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1)
        self.device = torch.device("cpu")
        self.diam_mean = torch.nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.diam_labels = torch.nn.Parameter(torch.tensor([30.0]), requires_grad=False)

    def forward(self, x):
        return (self.conv(x),)

    def save_model(self, filename):
        torch.save(self.state_dict(), filename)


def _cellpose_train_seg(net, images, labels, config, save_path):
    from cellpose.train import train_seg

    with torch.backends.mkldnn.flags(enabled=False):
        return train_seg(net, train_data=[im for im in images], train_labels=[lb.copy() for lb in labels],
                         channels=[0, 0], normalize=True, SGD=config.sgd, learning_rate=config.learning_rate,
                         weight_decay=config.weight_decay, momentum=config.momentum, n_epochs=config.n_epochs,
                         bsize=config.bsize, batch_size=config.batch_size, save_path=str(save_path),
                         model_name="reference", min_train_masks=config.min_train_masks,
                         save_every=10 ** 6)


def _ours(net, images, labels, config):
    data, flows, keep, _ = prepare_patches(images[..., None], labels, config.channels, config.min_train_masks)
    np_state = np.random.get_state()
    with torch.backends.mkldnn.flags(enabled=False):
        losses, _, _ = run_epochs(net, data, flows, config)
    np.random.set_state(np_state)
    return losses


@pytest.mark.parametrize("n_epochs", [4, 150, 330])
def test_learning_rate_schedule_is_train_segs(n_epochs, tmp_path, monkeypatch):
    """The learning rates both loops set per epoch (recorded at every optimiser step) match the formula."""
    seen: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    images, labels = disc_images(n_images=1, size=32, n_cells=6, radius=(3, 5))
    config = TrainConfig(n_epochs=n_epochs, bsize=32, batch_size=8, min_train_masks=1)
    torch.manual_seed(0)
    ref_net = _FakeNet()
    our_net = copy.deepcopy(ref_net)
    _, ref_losses, _ = _cellpose_train_seg(ref_net, images, labels, config, tmp_path)
    ref_lr, seen[:] = list(seen), []
    our_losses = _ours(our_net, np.stack(images), np.stack(labels), config)
    assert seen == ref_lr
    np.testing.assert_allclose(seen, learning_rate_schedule(0.1, n_epochs), rtol=0, atol=0)
    assert len(seen) == n_epochs and seen[0] == 0.0
    if n_epochs > 100:
        assert seen[9] == pytest.approx(0.1)
        assert seen[-1] == pytest.approx(0.1 / 2 ** 10)
    np.testing.assert_array_equal(our_losses, ref_losses)
    for k, v in ref_net.state_dict().items():
        assert torch.equal(v, our_net.state_dict()[k]), k


def test_patches_prepared_on_demand_equal_cellposes_up_front_preparation():
    """Each patch's normalised image and flows, computed when first drawn, are Cellpose's ``_reshape_norm`` and
    ``labels_to_flows`` of the whole list (float32, bit for bit), and the label diameters are its flows'."""
    from cellpose import dynamics, models, utils
    from cellpose.train import _reshape_norm

    images, labels = disc_images(n_images=5, size=48, n_cells=6, radius=(3, 6), seed=2)
    labels[2][:] = 0  # dropped (no mask): positions shift
    labels[4][labels[4] == labels[4].max()] = 1000  # not consecutive: labels_to_flows renumbers a copy
    data, flows, keep, _ = prepare_patches(np.stack(images)[..., None], np.stack(labels), (0, 0), 1)
    assert list(keep) == [0, 1, 3, 4] and len(data) == len(flows) == 4 and flows.computed == 0
    ref_flows = dynamics.labels_to_flows([np.array(labels[i], dtype=np.int64) for i in keep],
                                         device=torch.device("cpu"))
    ref_data = _reshape_norm([images[i] for i in keep], channels=[0, 0],
                             normalize_params={**models.normalize_default, "normalize": True})
    for j in (3, 0, 3):  # any order, twice
        assert flows[j].dtype == np.float32 and np.array_equal(flows[j], ref_flows[j])
        assert np.array_equal(data[j], ref_data[j].astype(np.float32))
    assert flows.computed == 2 and data.computed == 2
    np.testing.assert_array_equal(flows.diameters(), [utils.diameters(f[0])[0] for f in ref_flows])
    assert labels[4].max() == 1000  # the caller's labels are left as they were


def test_a_few_patches_per_epoch_give_train_segs_weights_and_prepare_only_those(tmp_path):
    """nimg_per_epoch below the number of patches (the studies' setting): train_seg's weights, and only the
    patches an epoch drew had their flows computed."""
    images, labels = disc_images(n_images=20, size=32, n_cells=6, radius=(3, 5), seed=3)
    config = TrainConfig(n_epochs=12, nimg_per_epoch=2, **{**TINY, "batch_size": 2, "save_every": 50})
    torch.manual_seed(0)
    ref_net = _FakeNet()
    our_net = copy.deepcopy(ref_net)
    from cellpose.train import train_seg

    with torch.backends.mkldnn.flags(enabled=False):
        _, ref_losses, _ = train_seg(ref_net, train_data=list(images), train_labels=[lb.copy() for lb in labels],
                                     channels=[0, 0], normalize=True, SGD=config.sgd, learning_rate=config.learning_rate,
                                     weight_decay=config.weight_decay, momentum=config.momentum, n_epochs=12,
                                     bsize=32, batch_size=2, nimg_per_epoch=2, save_path=str(tmp_path),
                                     model_name="reference", min_train_masks=1, save_every=10 ** 6)
    data, flows, _, _ = prepare_patches(np.stack(images)[..., None], np.stack(labels), (0, 0), 1)
    with torch.backends.mkldnn.flags(enabled=False):
        losses, _, _ = run_epochs(our_net, data, flows, config)
    np.testing.assert_array_equal(losses, ref_losses)
    for k, v in ref_net.state_dict().items():
        assert torch.equal(v, our_net.state_dict()[k]), k
    assert flows.computed < len(flows)  # 12 epochs x 2 draws of 20 patches: some never drawn


def test_loop_gives_train_segs_weights_on_cellpose_net(tmp_path):
    """Same data, seed 0, real Cellpose network: our loop and train_seg end with identical weights."""
    images, labels = disc_images(n_images=2, size=64, n_cells=8)
    config = TrainConfig(n_epochs=3, **{**TINY, "save_every": 50})
    torch.manual_seed(0)
    ref_net = build_net(None)
    our_net = copy.deepcopy(ref_net)
    _, ref_losses, _ = _cellpose_train_seg(ref_net, images, labels, config, tmp_path)
    our_losses = _ours(our_net, np.stack(images), np.stack(labels), config)
    np.testing.assert_array_equal(our_losses, ref_losses)
    assert not np.allclose(ref_losses, 0)
    ours = our_net.state_dict()
    changed = 0
    for k, v in ref_net.state_dict().items():
        assert torch.equal(v, ours[k]), k
    init = build_net(None).state_dict()  # a fresh net: the training did move the weights
    changed = sum(not torch.equal(init[k], ours[k]) for k in ours)
    assert changed > 10


def test_epoch_seed():
    assert [epoch_seed(0, e) for e in range(4)] == [0, 1, 2, 3]
    assert epoch_seed(1, 0) != epoch_seed(2, 0) != epoch_seed(1, 1)


def test_train_from_cache_writes_a_cellpose_model_and_its_record(cache, tmp_path):
    out = tmp_path / "run" / "model"
    state = np.random.get_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cache, out, config=TrainConfig(n_epochs=4, **{**TINY, "min_train_masks": 3}), quiet=True)
    # the caller's global numpy RNG is untouched
    assert np.array_equal(np.random.get_state()[1], state[1])
    messages = [str(w.message) for w in caught]
    assert any("warms up" in m for m in messages)
    assert result.complete and out.exists()
    paths = sidecar_paths(out)
    record = json.loads(paths["json"].read_text())
    assert record["config"]["learning_rate"] == 0.1 and record["config"]["sgd"] is True
    assert record["config"]["channels"] == [0, 0] and record["config"]["n_epochs"] == 4
    assert record["provenance"]["cache_hash"] and record["provenance"]["n_in_cache"] == 8
    assert len(record["train_losses"]) == 4 and all(np.isfinite(record["train_losses"]))
    assert record["learning_rates"] == pytest.approx(list(learning_rate_schedule(0.1, 4)))
    # patches with fewer than 3 masks were dropped and counted
    from dqtool.data.cache import PatchCache

    with PatchCache(cache) as c:
        n_masks = np.array([np.unique(lb[lb > 0]).size for lb in c.labels(range(len(c)))])
    assert record["n_dropped"] == int((n_masks < 3).sum()) == len(record["dropped_positions"])
    assert record["n_patches"] == int((n_masks >= 3).sum())
    if record["n_dropped"]:
        assert any("dropped" in m for m in messages)
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "epoch,learning_rate,train_loss,grad_norm" and len(rows) == 5
    assert len(record["grad_norms"]) == 4 and all(g > 0 and np.isfinite(g) for g in record["grad_norms"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (paths["checkpoints"] / "epoch_0002").exists()
    # the model loads in Cellpose itself, with the training diameter
    from cellpose.models import CellposeModel

    model = CellposeModel(gpu=False, pretrained_model=str(out))
    assert model.diam_labels == pytest.approx(result.diam_labels)
    # a second call with the same config reuses the finished model
    again = train(cache, out, config=TrainConfig(n_epochs=4, **{**TINY, "min_train_masks": 3}), quiet=True)
    assert again.train_losses == result.train_losses


def test_grad_norms_are_the_mean_per_epoch_of_the_global_gradient_norm_before_each_step(cache, tmp_path, monkeypatch):
    """Checked by an optimiser that records sqrt(sum g^2) over every weight in float64 NumPy before stepping."""
    import importlib

    T = importlib.import_module("dqtool.segmentation.train")  # the module (the package exports a function `train`)
    seen, real = [], T._optimizer

    def recording(net, config):
        opt = real(net, config)
        step = opt.step

        def step_and_record(*args, **kwargs):
            seen.append(np.sqrt(sum(float((p.grad.detach().double().numpy() ** 2).sum())
                                    for p in net.parameters() if p.grad is not None)))
            return step(*args, **kwargs)

        opt.step = step_and_record
        return opt

    monkeypatch.setattr(T, "_optimizer", recording)
    result = train(cache, tmp_path / "m", config=TrainConfig(n_epochs=3, nimg_per_epoch=8, **TINY), quiet=True)
    per_epoch = np.array(seen).reshape(3, 2).mean(axis=1)  # 8 patches a epoch in batches of 4: 2 steps
    np.testing.assert_allclose(result.grad_norms, per_epoch, rtol=1e-5)


def test_resume_continues_to_the_same_weights(cache, tmp_path):
    config = TrainConfig(n_epochs=5, **TINY)
    full = train(cache, tmp_path / "full", config=config, quiet=True)
    killed = train(cache, tmp_path / "killed", config=config, stop_after=3, quiet=True)
    assert not killed.complete and not (tmp_path / "killed").exists()
    with pytest.raises(InputError, match="--resume"):
        train(cache, tmp_path / "killed", config=config, quiet=True)
    resumed = train(cache, tmp_path / "killed", config=config, resume=True, quiet=True)
    assert resumed.resumed_from == 2  # the last checkpoint (every 2 epochs) before the kill at 3
    np.testing.assert_array_equal(resumed.train_losses, full.train_losses)
    np.testing.assert_array_equal(resumed.grad_norms, full.grad_norms)  # kept in the checkpoint, then recomputed
    a, b = load_state_dict(tmp_path / "full"), load_state_dict(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # same seed -> same bytes; another seed -> other weights
    other = train(cache, tmp_path / "seed1", config=TrainConfig(n_epochs=5, **{**TINY, "seed": 1}), quiet=True)
    assert other.train_losses != full.train_losses


def test_engine_train_seg_calls_cellpose_and_gives_the_same_model(cache, tmp_path, monkeypatch):
    """--engine train_seg runs cellpose.train.train_seg itself; for seed 0 its model equals our loop's, bit for bit."""
    import cellpose.train

    calls = []
    real = cellpose.train.train_seg

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cellpose.train, "train_seg", spy)
    ours = train(cache, tmp_path / "ours", config=TrainConfig(n_epochs=5, **TINY), quiet=True)
    assert not calls
    theirs = train(cache, tmp_path / "theirs", config=TrainConfig(n_epochs=5, engine="train_seg", **TINY), quiet=True)
    assert len(calls) == 1 and calls[0]["n_epochs"] == 5 and calls[0]["min_train_masks"] == TINY["min_train_masks"]
    np.testing.assert_array_equal(theirs.train_losses, ours.train_losses)
    assert theirs.n_patches == ours.n_patches and theirs.diam_labels == ours.diam_labels
    a, b = load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "theirs")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # train_seg's saves land as our checkpoints (epochs done), nothing is left in a temporary folder
    assert sorted(p.name for p in sidecar_paths(tmp_path / "theirs")["checkpoints"].iterdir()) == \
        ["epoch_0003"]
    assert not list(tmp_path.glob(".theirs.train_seg.*"))
    record = json.loads(sidecar_paths(tmp_path / "theirs")["json"].read_text())
    assert record["complete"] and record["config"]["engine"] == "train_seg"
    assert "engine" not in json.loads(sidecar_paths(tmp_path / "ours")["json"].read_text())["config"]
    with pytest.raises(InputError, match="engine"):
        TrainConfig(engine="torch")


def test_output_with_a_different_config_is_refused(cache, tmp_path):
    out = tmp_path / "m"
    train(cache, out, config=TrainConfig(n_epochs=2, **TINY), quiet=True)
    with pytest.raises(InputError, match="different config"):
        train(cache, out, config=TrainConfig(n_epochs=3, **TINY), quiet=True)


def test_bad_inputs(cache, tmp_path, monkeypatch):
    import cellpose.models

    def no_download(*args, **kwargs):
        raise AssertionError("cellpose tried to fetch a builtin model")

    monkeypatch.setattr(cellpose.models, "model_path", no_download)
    config = TrainConfig(n_epochs=2, **TINY)
    with pytest.raises(InputError, match="model not found"):
        train(cache, tmp_path / "a", init=tmp_path / "missing", config=config, quiet=True)
    with pytest.raises(InputError, match="model not found"):
        train(cache, tmp_path / "a", init="cyto3", config=config, quiet=True)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a Cellpose model"):
        train(cache, tmp_path / "a", init=junk, config=config, quiet=True)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(InputError, match="not a Cellpose 3 model"):
        train(cache, tmp_path / "a", init=other, config=config, quiet=True)
    with pytest.raises(InputError, match="grayscale"):
        train(cache, tmp_path / "a", config=TrainConfig(n_epochs=2, channels=(2, 3), **TINY), quiet=True)
    bad_subset = tmp_path / "subset.json"
    bad_subset.write_text(json.dumps({"indices": [0, 1, 99]}))
    with pytest.raises(InputError, match="outside"):
        train(cache, tmp_path / "a", subset=bad_subset, config=config, quiet=True)
    empty = build_cache_from_arrays(tmp_path / "empty.h5", [np.full((64, 64), 9, np.uint8)],
                                    [np.zeros((64, 64), np.uint32)], ["e"], size=64, stride=64)
    with pytest.raises(InputError, match="no masks"):
        train(empty, tmp_path / "a", config=config, quiet=True)
    with pytest.raises(InputError, match="min_train_masks"):
        train(cache, tmp_path / "a", config=TrainConfig(n_epochs=2, **{**TINY, "min_train_masks": 999}),
              quiet=True)
    with pytest.raises(InputError, match="bsize"):
        TrainConfig(bsize=100)
    assert not (tmp_path / "a").exists()


def test_cli_train_and_errors(cache, tmp_path):
    from dqtool_cli.main import cli

    runner = CliRunner()
    out = tmp_path / "cli_model"
    res = runner.invoke(cli, ["train", str(cache), "--out", str(out), "--epochs", "2", "--bsize", "32",
                              "--batch-size", "4", "--min-train-masks", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert out.exists() and sidecar_paths(out)["json"].exists()
    res = runner.invoke(cli, ["train", str(cache), "--out", str(tmp_path / "x"), "--init",
                              str(tmp_path / "nope"), "--quiet"])
    assert res.exit_code == 1 and "model not found" in res.output
    res = runner.invoke(cli, ["train", str(cache), "--out", str(tmp_path / "x"), "--channels", "5,0"])
    assert res.exit_code == 2


def test_onednn_is_a_recorded_opt_in_that_switches_torchs_cpu_convolutions(cache, tmp_path, monkeypatch):
    """``onednn`` is off by default and then stays out of the record (identities of older runs unchanged); the
    training runs with torch's oneDNN backend exactly as asked, and the caller's setting is restored."""
    import importlib

    T = importlib.import_module("dqtool.segmentation.train")
    assert "onednn" not in TrainConfig().to_dict() and TrainConfig(onednn=True).to_dict()["onednn"] is True
    seen, real = [], T.run_epochs

    def recording(*args, **kwargs):
        seen.append(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "run_epochs", recording)
    before = torch.backends.mkldnn.enabled
    a = train(cache, tmp_path / "a", config=TrainConfig(n_epochs=2, onednn=True, **TINY), quiet=True)
    b = train(cache, tmp_path / "b", config=TrainConfig(n_epochs=2, onednn=True, **TINY), quiet=True)
    native = train(cache, tmp_path / "n", config=TrainConfig(n_epochs=2, **TINY), quiet=True)
    assert seen == [True, True, False] and torch.backends.mkldnn.enabled == before
    assert json.loads(sidecar_paths(tmp_path / "a")["json"].read_text())["config"]["onednn"] is True
    assert "onednn" not in json.loads(sidecar_paths(tmp_path / "n")["json"].read_text())["config"]
    sa, sb = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same threads, same seed: same weights
    assert a.train_losses == b.train_losses and len(native.train_losses) == 2
    # a model trained one way is not taken for the other's
    with pytest.raises(InputError):
        train(cache, tmp_path / "a", config=TrainConfig(n_epochs=2, **TINY), quiet=True)
    from dqtool_cli.main import cli

    res = CliRunner().invoke(cli, ["train", str(cache), "--out", str(tmp_path / "cli"), "--epochs", "2", "--bsize",
                                   "32", "--batch-size", "4", "--min-train-masks", "1", "--onednn", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(sidecar_paths(tmp_path / "cli")["json"].read_text())["config"]["onednn"] is True
