"""Cache features: default self-trained MAE, determinism, storage/invalidation, user features, CLI."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dqtool.features.embed as features
from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.data.datasets import open_dataset
from dqtool.common.errors import InputError
from dqtool.features import mae, pretrain
from dqtool.features.embed import embed_cache, extract_features, read_user_features
from dqtool.features.mae import CONFIGS, encoder_hash, to_model_input
from dqtool.features.pretrain import auto_epochs, load_mae_weights
from dqtool.features.store import FEATURES_GROUP, check_features, load_features
from dqtool_cli.main import cli

FAST = dict(epochs=1, batch_size=8, seed=0)  # 12 patches -> 2 pretraining steps


@pytest.fixture(scope="module")
def real_images(real_data):
    """Two real images through the project's readers: an 8-bit CTC frame crop and a 16-bit NeurIPS image."""
    cyto = open_dataset(real_data / "cyto_ctc")[0].image[:336, :448]          # 2 x 3 windows
    multi = next(s.image for s in open_dataset(real_data / "multi_neurips") if s.image.dtype == np.uint16)
    return [cyto, multi]


def make_cache(path, images):
    return build_cache_from_arrays(path, images, None, [f"img{i}" for i in range(len(images))])


@pytest.fixture()
def cache_path(tmp_path, real_images):
    return make_cache(tmp_path / "c.h5", real_images)


# -- preprocessing ---------------------------------------------------------------------------------


def test_to_model_input_gray_replication_resize_and_standardisation():
    cfg = CONFIGS["mae_tiny_patch16"]
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 224, 224, 1), dtype=np.uint8)
    x = to_model_input(gray, cfg).numpy()
    mean, std = np.array(mae.IMAGENET_MEAN), np.array(mae.IMAGENET_STD)
    for ch in range(3):  # same gray value in each channel, standardised per channel
        np.testing.assert_allclose(x[:, ch], (gray[..., 0] / 255.0 - mean[ch]) / std[ch], atol=1e-6)
    np.testing.assert_array_equal(x, to_model_input(gray.astype(np.float32) / 255.0, cfg).numpy())
    small = np.full((1, 64, 64, 3), 128, np.uint8)
    y = to_model_input(small, cfg).numpy()
    assert y.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(y[0, :, 100, 100], (128 / 255.0 - mean) / std, atol=1e-5)  # constant stays
    with pytest.raises(InputError, match="2 channels"):
        to_model_input(np.zeros((1, 224, 224, 2), np.uint8), cfg)


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with features.torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_auto_epochs():
    assert auto_epochs(200) == 10 and auto_epochs(1000) == 2 and auto_epochs(992) == 3
    assert auto_epochs(10_063) == 1 and auto_epochs(154) == 13 and auto_epochs(1) == 15


# -- default MAE: training, saving, reuse, determinism --------------------------------------------


def test_default_embed_trains_saves_reuses_and_stores(cache_path, monkeypatch):
    with PatchCache(cache_path) as c:
        n = len(c)
        assert c.n_channels == 1
    feats = embed_cache(cache_path, **FAST)
    assert feats.shape == (n, 192) and feats.dtype == np.float32 and np.isfinite(feats).all()
    saved = sorted(cache_path.parent.glob("c.mae-*.pt"))
    assert len(saved) == 1 and not list(cache_path.parent.glob("*.tmp-*"))
    # the saved model reproduces the stored features exactly (deterministic, no masking)
    model = load_mae_weights(saved[0])
    with PatchCache(cache_path) as c:
        np.testing.assert_array_equal(extract_features(model, c, batch_size=5), feats)
        arrays, attrs = c.read_group(FEATURES_GROUP)
        assert attrs["cache_hash"] == c.content_hash
        assert attrs["encoder_hash"] == encoder_hash(model, mae.FEATURE_RECIPE)
        assert attrs["encoder_source"] == "default" and attrs["config"] == "mae_tiny_patch16"
    np.testing.assert_array_equal(load_features(cache_path), feats)

    # second call: no training, no feature pass
    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(features, "pretrain_mae", boom)
    monkeypatch.setattr(features, "extract_features", boom)
    np.testing.assert_array_equal(embed_cache(cache_path, **FAST), feats)


def test_same_seed_same_bytes_other_seed_other_model(tmp_path, real_images):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = embed_cache(make_cache(tmp_path / "a" / "c.h5", real_images), **FAST)
    b = embed_cache(make_cache(tmp_path / "b" / "c.h5", real_images), **FAST)
    assert a.tobytes() == b.tobytes()
    wa = torch.load(next((tmp_path / "a").glob("*.pt")), weights_only=True)["model"]
    wb = torch.load(next((tmp_path / "b").glob("*.pt")), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = embed_cache(tmp_path / "a" / "c.h5", epochs=1, batch_size=8, seed=1)
    assert len(list((tmp_path / "a").glob("*.pt"))) == 2
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(load_features(tmp_path / "a" / "c.h5"), c)  # the new encoder's features


def test_pretraining_lowers_the_loss(cache_path):
    with PatchCache(cache_path) as c:
        _, losses = pretrain.pretrain_mae(c, epochs=3, seed=0, batch_size=12)
    assert losses[-1] < losses[0]


# -- invalidation ----------------------------------------------------------------------------------


def test_features_of_another_cache_content_are_stale(cache_path):
    feats = embed_cache(cache_path, features_file=None, **FAST)
    with PatchCache(cache_path) as c:
        _, attrs = c.read_group(FEATURES_GROUP)
        c.write_group(FEATURES_GROUP, {"features": feats}, dict(attrs, cache_hash="0123456789abcdef"))
    with pytest.raises(InputError, match=r"another cache content.*dqtool embed"):
        load_features(cache_path)
    # embed notices and recomputes
    np.testing.assert_array_equal(embed_cache(cache_path, **FAST), feats)
    np.testing.assert_array_equal(load_features(cache_path), feats)


def test_rebuilt_cache_and_missing_features(tmp_path, real_images):
    path = make_cache(tmp_path / "c.h5", real_images)
    with pytest.raises(InputError, match=r"no features stored.*dqtool embed"):
        load_features(path)
    embed_cache(path, **FAST)
    make_cache(path, [real_images[0]])  # a different cache at the same path
    with pytest.raises(InputError, match="dqtool embed"):
        load_features(path)


def test_changed_encoder_replaces_features(cache_path, tmp_path):
    with PatchCache(cache_path) as c:
        n = len(c)
    user = np.random.default_rng(1).normal(size=(n, 7)).astype(np.float32)
    np.save(tmp_path / "f.npy", user)
    embed_cache(cache_path, features_file=tmp_path / "f.npy")
    with PatchCache(cache_path) as c:
        user_hash = c.read_group(FEATURES_GROUP)[1]["encoder_hash"]
    feats = embed_cache(cache_path, **FAST)
    assert feats.shape[1] == 192
    with pytest.raises(InputError, match="another encoder"):
        load_features(cache_path, expect_encoder=user_hash)


# -- user features ---------------------------------------------------------------------------------


def test_user_features_npy_and_hdf5(cache_path, tmp_path):
    with PatchCache(cache_path) as c:
        n = len(c)
    user = np.random.default_rng(2).normal(size=(n, 5))
    np.save(tmp_path / "f.npy", user)
    np.testing.assert_array_equal(embed_cache(cache_path, features_file=tmp_path / "f.npy"),
                                  user.astype(np.float32))
    np.testing.assert_array_equal(load_features(cache_path), user.astype(np.float32))
    with h5py.File(tmp_path / "only.h5", "w") as h5:
        h5["labels"] = np.arange(n)
        h5["emb/x"] = user[:, :3]
    assert read_user_features(tmp_path / "only.h5", n).shape == (n, 3)
    with h5py.File(tmp_path / "named.h5", "w") as h5:
        h5["features"] = user
        h5["other"] = user
    np.testing.assert_array_equal(read_user_features(tmp_path / "named.h5", n), user.astype(np.float32))


@pytest.mark.parametrize("bad, match", [
    (lambda n: np.zeros((n + 1, 4)), r"rows but the cache has"),
    (lambda n: np.zeros(n), r"2-D"),
    (lambda n: np.zeros((n, 0)), r"0 dimensions"),
    (lambda n: np.where(np.eye(n, 3) > 0, np.nan, 1.0), r"non-finite.*row 0, column 0"),
    (lambda n: np.full((n, 2), np.inf), r"non-finite"),
    (lambda n: np.array([["a"] * 2] * n), r"numeric"),
])
def test_bad_user_features_leave_stored_ones_alone(cache_path, tmp_path, bad, match):
    with PatchCache(cache_path) as c:
        n = len(c)
    good = np.ones((n, 2), np.float32)
    np.save(tmp_path / "good.npy", good)
    embed_cache(cache_path, features_file=tmp_path / "good.npy")
    np.save(tmp_path / "bad.npy", bad(n))
    with pytest.raises(InputError, match=r"bad\.npy: .*" + match):
        embed_cache(cache_path, features_file=tmp_path / "bad.npy")
    np.testing.assert_array_equal(load_features(cache_path), good)


def test_bad_feature_files(cache_path, tmp_path):
    with PatchCache(cache_path) as c:
        n = len(c)
    (tmp_path / "f.txt").write_text("1 2 3")
    with pytest.raises(InputError, match=r"f\.txt.*\.npy or HDF5"):
        read_user_features(tmp_path / "f.txt", n)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError, match=r"broken\.npy"):
        read_user_features(tmp_path / "broken.npy", n)
    (tmp_path / "broken.h5").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"broken\.h5.*HDF5"):
        read_user_features(tmp_path / "broken.h5", n)
    with h5py.File(tmp_path / "two.h5", "w") as h5:
        h5["a"] = np.zeros((n, 2))
        h5["b"] = np.zeros((n, 2))
    with pytest.raises(InputError, match=r"two\.h5.*exactly one 2-D"):
        read_user_features(tmp_path / "two.h5", n)
    with pytest.raises(FileNotFoundError):
        read_user_features(tmp_path / "absent.npy", n)


def test_bad_arguments_and_empty_cache(cache_path, tmp_path):
    with pytest.raises(InputError, match="not both"):
        embed_cache(cache_path, weights="w.pth", features_file="f.npy")
    with pytest.raises(InputError, match="epochs"):
        embed_cache(cache_path, weights="w.pth", epochs=3)
    with pytest.raises(InputError, match="batch size"):
        embed_cache(cache_path, batch_size=0)
    with pytest.raises(InputError, match="threads"):
        embed_cache(cache_path, threads=0)
    # an image too small for any window is refused now (issue 19), so a cache of no patches is made by hand
    empty = build_cache_from_arrays(tmp_path / "empty.h5", [np.zeros((100, 100), np.uint8)], None, ["a"])
    with h5py.File(empty, "r+") as h5:
        h5["images"].resize(0, axis=0)
        for name in ("patch_source", "patch_domain", "patch_offset"):
            shape, dtype = (0,) + h5[name].shape[1:], h5[name].dtype
            del h5[name]
            h5.create_dataset(name, shape, dtype)
        h5.attrs["n_patches"] = 0
    with pytest.raises(InputError, match=r"empty\.h5.*no patches"):
        embed_cache(empty, **FAST)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(InputError, match=r"junk\.h5"):
        embed_cache(tmp_path / "junk.h5", **FAST)


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_embed(cache_path, tmp_path):
    with PatchCache(cache_path) as c:
        n = len(c)
    np.save(tmp_path / "f.npy", np.ones((n, 3)))
    run = CliRunner().invoke(cli, ["embed", str(cache_path), "--features", str(tmp_path / "f.npy")])
    assert run.exit_code == 0, run.output
    assert f"{n} x 3" in run.output
    run = CliRunner().invoke(cli, ["embed", str(cache_path), "--quiet", "--epochs", "1", "--batch-size", "8",
                                   "--threads", "1"])
    assert run.exit_code == 0, run.output
    assert load_features(cache_path).shape == (n, 192)
    run = CliRunner().invoke(cli, ["embed", str(cache_path), "--features", str(tmp_path / "f.npy"),
                                   "--weights", str(tmp_path / "f.npy")])
    assert run.exit_code == 1 and "not both" in run.output  # the library's check, not a CLI copy
    np.save(tmp_path / "short.npy", np.ones((n - 1, 3)))
    run = CliRunner().invoke(cli, ["embed", str(cache_path), "--features", str(tmp_path / "short.npy")])
    assert run.exit_code == 1
    assert "short.npy" in run.output and "Traceback" not in run.output
    assert load_features(cache_path).shape == (n, 192)  # nothing overwritten


def test_corrupt_saved_mae_is_retrained_to_the_same_weights(cache_path):
    feats = embed_cache(cache_path, **FAST)
    saved = next(cache_path.parent.glob("c.mae-*.pt"))
    state = saved.read_bytes()
    saved.write_bytes(b"killed mid-write")
    with pytest.warns(UserWarning, match="retraining the default MAE"):
        again = embed_cache(cache_path, **FAST)
    np.testing.assert_array_equal(again, feats)
    reloaded = torch.load(saved, weights_only=True)["model"]
    original = torch.load(io.BytesIO(state), weights_only=True)["model"]
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def test_stored_non_finite_features_are_refused(cache_path):
    feats = embed_cache(cache_path, **FAST)
    with PatchCache(cache_path) as c:
        _, attrs = c.read_group(FEATURES_GROUP)
        feats[3, 1] = np.nan
        c.write_group(FEATURES_GROUP, {"features": feats}, attrs)
    with pytest.raises(InputError, match="NaN or inf"):
        load_features(cache_path)


def test_stored_features_pass_the_user_features_check(cache_path):
    """load_features checked shape and finiteness only (and selection checked them again): stored (N, 0) or
    text features were served. Both now go through the one check_features."""
    with PatchCache(cache_path) as c:
        n, attrs = len(c), {"cache_hash": c.content_hash}
        c.write_group(FEATURES_GROUP, {"features": np.zeros((n, 0), np.float32)}, attrs)
    with pytest.raises(InputError, match=r"c\.h5: features have 0 dimensions.*dqtool embed"):
        load_features(cache_path)
    with pytest.raises(InputError, match=r"where: 3 feature rows but the cache has 4"):
        check_features(np.ones((3, 2)), "where", 4)
