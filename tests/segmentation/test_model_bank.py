"""A folder of models trained by dqtool is clean to rank (issue 14): the files dqtool writes beside each
model are passed over without a word; a file that really is not a model still gets one line."""

from __future__ import annotations

import json

import pytest

from dqtool.segmentation.model_files import discover_models, sidecar_paths


def _check_bank(bank):
    (bank / "notes.txt").write_text("not a model")
    # the record of a training whose model is not written yet (running, or killed) is dqtool's too
    (bank / "killed.json").write_text(sidecar_paths(bank / "one")["json"].read_text())
    models, skipped = discover_models(bank)
    assert [m.name for m in models] == ["one"]
    # ... and only the file that is really not a model gets a line
    assert [(p.split("/")[-1], bool(reason)) for p, reason in skipped] == [("notes.txt", True)]


def test_sidecars_are_passed_over_and_other_files_named(tmp_path):
    import torch
    from cellpose.resnet_torch import CPnet

    bank = tmp_path / "models"
    bank.mkdir()
    torch.save(CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).state_dict(), bank / "one")
    paths = sidecar_paths(bank / "one")
    paths["json"].write_text(json.dumps({"identity": "x", "config": {}, "provenance": {}, "train_losses": [1.0]}))
    paths["csv"].write_text("epoch,loss\n1,1.0\n")
    paths["png"].write_bytes(b"\x89PNG")
    paths["checkpoints"].mkdir()
    (paths["checkpoints"] / "epoch_0001").write_bytes(b"")
    _check_bank(bank)


@pytest.mark.slow
def test_a_bank_trained_by_dqtool_is_clean(tmp_path):
    from factories import disc_images

    from dqtool.data.cache_build import build_cache_from_arrays
    from dqtool.segmentation.train import TrainConfig, train

    images, labels = disc_images(n_images=2, size=64, n_cells=8)
    cache = build_cache_from_arrays(tmp_path / "discs.h5", images, labels, ["a", "b"], domain="discs", size=64,
                                    stride=64)
    bank = tmp_path / "models"
    train(cache, bank / "one", config=TrainConfig(n_epochs=1, bsize=32, batch_size=4, min_train_masks=1,
                                                  save_every=1), quiet=True)
    # every sidecar dqtool writes is there, and nothing else but hidden files (locks), which rank never reads
    written = {p.name for p in bank.iterdir() if not p.name.startswith(".")}
    assert {p.name for p in sidecar_paths(bank / "one").values()} | {"one"} == written
    _check_bank(bank)
