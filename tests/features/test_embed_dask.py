"""``dqtool embed`` on Dask (issue 16): fixed chunks of patches a task, the encoder's weights sent once, the
client the one writer; the features are the serial run's, byte for byte, also when a worker dies."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dqtool.features.embed as embed
from dqtool.features.mae import MaskedAutoencoderViT
from dqtool.features.pretrain import save_mae
from dqtool_cli.main import cli
from factories import noise_cache


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 24-patch cache (16 px patches, resized to the MAE's 224) and a seeded ViT-Tiny MAE file."""
    root = tmp_path_factory.mktemp("embed_dask")
    cache = noise_cache(root / "base.h5", n_images=2, shape=(40, 32))
    weights = root / "mae.pt"
    save_mae(MaskedAutoencoderViT("mae_tiny_patch16", seed=5), weights, {})
    return cache, weights


def features(path):
    with h5py.File(path, "r") as h5:
        group = h5["derived/features"]
        return group["features"][()], sorted((k, str(v)) for k, v in group.attrs.items())


def run_embed(inputs, out, *extra):
    cache, weights = inputs
    shutil.copyfile(cache, out)
    result = CliRunner().invoke(cli, ["--quiet", "embed", str(out), "--weights", str(weights), "--batch-size", "4",
                                      *extra])
    assert result.exit_code == 0, result.output
    return features(out)


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(embed, "CHUNK_PATCHES", 10)  # 24 patches: 3 tasks of 8 (whole batches of 4)
    assert embed.chunk_size(4) == 8 and embed.chunk_size(64) == 64


@pytest.fixture(scope="module")
def serial(inputs, tmp_path_factory):
    return run_embed(inputs, tmp_path_factory.mktemp("serial") / "c.h5")


def test_features_equal_the_serial_ones(inputs, serial, small_chunks, dask_scheduler, tmp_path):
    feats, attrs = run_embed(inputs, tmp_path / "c.h5", "--scheduler", dask_scheduler)
    assert feats.shape == (24, 192) and feats.tobytes() == serial[0].tobytes()
    assert attrs == serial[1]


def test_a_worker_that_dies_mid_task_changes_nothing(inputs, serial, small_chunks, dask_scheduler, worker_death,
                                                     tmp_path):
    flag = worker_death("embed")
    feats, _ = run_embed(inputs, tmp_path / "c.h5", "--scheduler", dask_scheduler)
    assert flag.exists() and feats.tobytes() == serial[0].tobytes()


def test_a_task_is_what_the_serial_loop_computes_and_checks_its_files(inputs, tmp_path):
    """A task reads its range from the cache file and loads the encoder file once (kept for the next task);
    a cache or an encoder file that is not the client's is an error, never other features."""
    from dqtool.common.errors import InputError
    from dqtool.data.cache import PatchCache
    from dqtool.features.mae import FEATURE_RECIPE, encoder_hash
    from dqtool.features.pretrain import load_mae_weights

    cache, weights = inputs
    model = load_mae_weights(weights)
    with PatchCache(cache) as c:
        patches, content = c.images(np.arange(4, 16)), c.content_hash
    key = encoder_hash(model, FEATURE_RECIPE)
    embed._WORKER_ENCODER.clear()
    ours = embed.embed_range((4, 16), str(cache), content, str(weights), key, batch_size=8)
    assert len(embed._WORKER_ENCODER) == 1
    with torch.no_grad():
        reference = np.concatenate([model.features(embed.to_model_input(patches[i:i + 8], model.config)).numpy()
                                    for i in range(0, 12, 8)])
    assert ours.tobytes() == reference.tobytes()
    with pytest.raises(InputError, match="the cache changed during the run"):
        embed.embed_range((0, 8), str(cache), "another", str(weights), key)
    other = tmp_path / "other.pt"
    save_mae(MaskedAutoencoderViT("mae_tiny_patch16", seed=6), other, {})
    with pytest.raises(InputError, match="the encoder file changed during the run"):
        embed.embed_range((0, 8), str(cache), content, str(other), key)
