"""Patch features f(x) for dataset quantization: embed every patch of a cache with an MAE encoder.

Three sources of features, one result: a float32 (N, D) matrix stored in the cache at
``/derived/features`` (dataset ``features``) with attributes ``encoder_hash`` (identity of the encoder
and preprocessing) and ``cache_hash`` (the cache's ``content_hash``). :func:`load_features` refuses
features whose ``cache_hash`` is not the cache's own, and :func:`embed_cache` recomputes them whenever
the encoder's hash differs from the stored one, so a changed encoder or cache never serves old features.

1. ``weights=PATH``: the official MAE checkpoint (``mae_pretrain_vit_base.pth``, ViT-B/16, D = 768;
   ViT-L/16 and ViT-H/14 load too): a torch file holding a state dict under ``"model"`` with the
   official names; decoder keys (``decoder_*``, ``mask_token``) are ignored.
2. default: a small MAE (ViT-Tiny encoder, D = 192) pretrained self-supervised on the cache's own
   patches (masked-patch reconstruction, no labels, no network; :func:`pretrain_mae`), saved beside the
   cache as ``<cache stem>.mae-<hash>.pt`` (temp file + rename) and reused while cache, config, epochs,
   seed and batch size are the same.
3. ``features_file=FILE``: a user's own (N, D) matrix, ``.npy`` or HDF5 (dataset ``features``, or the
   file's only 2-D dataset), N = patches in the cache, finite values.

Preprocessing (the same for every encoder): cache patches are uint8, percentile-normalised per source
image (1st -> 0, 99.8th -> 255, see ``dqtool.cache``), read as x / 255 in [0, 1]; a grayscale patch
(C = 1, the cache default, 16-bit sources included) is replicated to the encoder's 3 channels; a patch
whose size is not the encoder's 224 is resized bilinearly (antialiased); then each channel is
standardised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), which the
official weights expect; the default MAE is trained and used with the same standardisation.

Features are deterministic: no masking at feature time; f(x) = mean over the L patch tokens (196 at
patch size 16; 256 for ViT-H/14) of the encoder's final-norm output (class token excluded); see
:meth:`dqtool.mae.MaskedAutoencoderViT.features`.
Same cache, seed and thread count give the same bytes (torch runs on one CPU thread unless asked).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from dqtool.data.cache import PatchCache
from dqtool.common.errors import InputError
from dqtool.features.mae import (CONFIGS, DEFAULT_CONFIG, MAEConfig, MaskedAutoencoderViT, config_from_state_dict,
                  encoder_hash, encoder_state_dict, is_decoder_key)
from dqtool.common.progress import bar

__all__ = ["embed_cache", "load_features", "pretrain_mae", "load_mae_weights", "extract_features",
           "read_user_features", "check_features", "auto_epochs", "default_mae_path", "FEATURES_GROUP"]

FEATURES_GROUP = "features"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Changing anything in the preprocessing or pooling must change this string (it is part of the hash).
FEATURE_RECIPE = "x/255; gray->3ch; bilinear-antialias to img_size; imagenet mean/std; no mask; mean patch tokens"
# Same for the default pretraining recipe (part of the saved MAE's file name).
TRAIN_RECIPE = "adamw b(0.9,0.95) wd0.05 lr1e-3*bs/64 warmup5% cosine; mask0.75; flips+rot90; v1"
PRETRAIN_IMAGE_BUDGET = 2000  # images seen by the default pretraining: ~1 min on 2 idle CPU cores
MAX_AUTO_EPOCHS = 15


# ------------------------------------------------------------------------------------------------
# preprocessing


def to_model_input(patches: np.ndarray, config: MAEConfig) -> torch.Tensor:
    """uint8 or [0, 1] float patches (n, S, S, C) -> standardised float32 (n, 3, img, img); see the module
    docstring for the mapping."""
    x = torch.from_numpy(np.ascontiguousarray(patches))
    x = (x.float() / 255.0) if x.dtype == torch.uint8 else x.float()
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, config.in_chans, -1, -1)
    elif x.shape[1] != config.in_chans:
        raise InputError(f"patches have {x.shape[1]} channels; the encoder takes 1 (replicated) or "
                         f"{config.in_chans}")
    if x.shape[-1] != config.img_size or x.shape[-2] != config.img_size:
        x = F.interpolate(x, size=(config.img_size, config.img_size), mode="bilinear", align_corners=False,
                          antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# ------------------------------------------------------------------------------------------------
# the default: self-supervised pretraining on the cache's own patches


def auto_epochs(n_patches: int) -> int:
    """Default epoch count: about PRETRAIN_IMAGE_BUDGET images in all, ceil(2000 / N), kept in [1, 15]
    (10 epochs of 200 patches, 2 of 1,000, 1 from 2,000 on)."""
    return int(min(MAX_AUTO_EPOCHS, max(1, math.ceil(PRETRAIN_IMAGE_BUDGET / max(1, n_patches)))))


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then half-cosine decay to 0 (MAE, appendix A.1)."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rot90 (k in 0..3) and horizontal flip per image; microscopy has no up or left."""
    k = torch.randint(0, 4, (x.shape[0],), generator=gen)
    flip = torch.randint(0, 2, (x.shape[0],), generator=gen)
    out = [torch.rot90(img, int(ki), dims=(1, 2)) for img, ki in zip(x, k)]
    out = [torch.flip(img, dims=(2,)) if f else img for img, f in zip(out, flip)]
    return torch.stack(out)


def pretrain_mae(cache: PatchCache, config: MAEConfig | str = DEFAULT_CONFIG, epochs: int = 1, seed: int = 0,
                 batch_size: int = 64, quiet: bool = True) -> tuple[MaskedAutoencoderViT, list[float]]:
    """Pretrain an MAE on all patches of ``cache`` by masked-patch reconstruction (no labels).

    Recipe (``TRAIN_RECIPE``): AdamW (betas 0.9/0.95, weight decay 0.05 on weights only), peak learning
    rate 1e-3 * batch_size / 64 with 5% warmup and cosine decay, 75% masking, random rot90 + flip.
    One ``torch.Generator`` seeded with ``seed`` draws the initialisation, the patch order, the
    augmentation and the masks, so the same cache and seed give the same weights. Returns the model
    and the mean loss of each epoch.
    """
    config = CONFIGS[config] if isinstance(config, str) else config
    model = MaskedAutoencoderViT(config, seed=seed)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or "token" in n)]
    peak = 1e-3 * batch_size / 64
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95))
    n = len(cache)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    progress = bar(total, desc="MAE pretraining", quiet=quiet, unit="step")
    losses = []
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).numpy()
        running, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = _augment(to_model_input(cache.images(idx), config), gen)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, peak)
            loss, _, _ = model(x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
        losses.append(running / seen)
    progress.close()
    model.eval()
    return model, losses


def default_mae_path(cache: PatchCache, config: MAEConfig, epochs: int, seed: int, batch_size: int) -> Path:
    """``<cache stem>.mae-<16 hex>.pt`` beside the cache; the hash covers the cache's content hash, the
    config, epochs, seed, batch size and the training recipe, so any change trains a new model."""
    key = json.dumps({"cache": cache.content_hash, "config": config.to_dict(), "epochs": int(epochs),
                      "seed": int(seed), "batch_size": int(batch_size), "recipe": TRAIN_RECIPE}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache.path.with_name(f"{cache.path.stem}.mae-{digest}.pt")


def save_mae(model: MaskedAutoencoderViT, path: Path, meta: dict) -> None:
    """Write ``{"model": state_dict, "config": name, "dqtool": meta}`` (the official layout plus two keys)
    to a temp file beside ``path`` and rename it into place, so a killed run leaves no partial file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"model": model.state_dict(), "config": model.config.name, "dqtool": meta}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# official (or saved) weights


def _torch_load(path: Path) -> dict:
    # weights_only: never unpickle arbitrary objects; the official training checkpoints also carry an
    # argparse.Namespace under "args", which is allowed explicitly.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, or disallowed pickled objects
        raise InputError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict with a 'model' state dict, got {type(obj).__name__}")
    return obj


def load_mae_weights(path: str | os.PathLike) -> MaskedAutoencoderViT:
    """An MAE whose encoder holds the weights in ``path`` (state dict under ``"model"``, or a bare state
    dict). Decoder keys are ignored; any other missing, unexpected or mis-shaped name is an InputError
    naming the file and the first offending keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    obj = _torch_load(path)
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: 'model' is not a state dict of tensors")
    encoder = {k: v for k, v in state.items() if not is_decoder_key(k)}
    config = CONFIGS.get(obj.get("config")) if isinstance(obj.get("config"), str) else None
    config = config or config_from_state_dict(encoder)
    if config is None:
        shape = tuple(encoder["cls_token"].shape) if "cls_token" in encoder else "missing"
        raise InputError(f"{path}: encoder does not match a known MAE ViT ({', '.join(CONFIGS)}): cls_token "
                         f"{shape}, {len({k.split('.')[1] for k in encoder if k.startswith('blocks.')})} blocks; "
                         "expected the official MAE checkpoint layout (e.g. mae_pretrain_vit_base.pth)")
    model = MaskedAutoencoderViT(config, seed=0)
    expected = encoder_state_dict(model)
    missing = sorted(set(expected) - set(encoder))
    unexpected = sorted(set(encoder) - set(expected))
    mis_shaped = [f"{k} {tuple(encoder[k].shape)} (expected {tuple(expected[k].shape)})"
                  for k in sorted(set(expected) & set(encoder)) if encoder[k].shape != expected[k].shape]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if names:
            problems.append(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if problems:
        raise InputError(f"{path}: parameters do not match MAE {config.name}; " + "; ".join(problems))
    model.load_state_dict({k: v.float() for k, v in encoder.items()}, strict=False)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# features


def extract_features(model: MaskedAutoencoderViT, cache: PatchCache, batch_size: int = 64,
                     quiet: bool = True) -> np.ndarray:
    """float32 (N, D): f(x) for every patch in cache order (no masking; mean over patch tokens)."""
    n = len(cache)
    out = np.empty((n, model.config.embed_dim), dtype=np.float32)
    model.eval()
    progress = bar(n, desc="features", quiet=quiet, unit="patch")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        out[idx] = model.features(to_model_input(cache.images(idx), model.config)).numpy()
        progress.update(len(idx))
    progress.close()
    return out


def check_features(arr: np.ndarray, where: str, n_patches: int | None = None, hint: str = "") -> np.ndarray:
    """The one feature-matrix check: numeric, 2-D (patches, dims) with D >= 1, ``n_patches`` rows when
    given, every value finite. Returns it as contiguous float32; an InputError names ``where`` and, when
    given, ends with ``hint`` (what to do)."""
    arr = np.asarray(arr)
    tail = f"; {hint}" if hint else ""
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{where}: features must be numeric, got dtype {arr.dtype}{tail}")
    if arr.ndim != 2:
        raise InputError(f"{where}: features must be a 2-D (patches, dims) array, got shape {arr.shape}{tail}")
    if n_patches is not None and arr.shape[0] != n_patches:
        raise InputError(f"{where}: {arr.shape[0]} feature rows but the cache has {n_patches} patches{tail}")
    if arr.shape[1] < 1:
        raise InputError(f"{where}: features have 0 dimensions; expected (N, D) with D >= 1{tail}")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"{where}: {int(bad.sum())} non-finite feature values (NaN or inf), first at row "
                         f"{row}, column {col}; expected finite numbers{tail}")
    return np.ascontiguousarray(arr)


def read_user_features(path: str | os.PathLike, n_patches: int) -> np.ndarray:
    """A user's (N, D) features from ``.npy`` or HDF5 (dataset ``features``, or the only 2-D dataset),
    checked: numeric, 2-D, N rows, finite. Returned as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: features file not found")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        return check_features(arr, str(path), n_patches)
    if path.suffix.lower() in (".h5", ".hdf5", ".hdf", ".he5"):
        try:
            with h5py.File(path, "r") as h5:
                names: list[str] = []
                h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
                if "features" in h5 and isinstance(h5["features"], h5py.Dataset):
                    key = "features"
                else:
                    two_d = [k for k in names if h5[k].ndim == 2]
                    if len(two_d) != 1:
                        raise InputError(f"{path}: expected a dataset named 'features' or exactly one 2-D "
                                         f"dataset, found {len(two_d)} 2-D datasets among {names or 'none'}")
                    key = two_d[0]
                arr = h5[key][()]
        except OSError as exc:
            raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
        return check_features(np.asarray(arr), f"{path}:{key}", n_patches)
    raise InputError(f"{path}: features file must be .npy or HDF5 (.h5/.hdf5), got '{path.suffix}'")


def _user_features_hash(arr: np.ndarray) -> str:
    return "user:" + hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode() + arr.tobytes()).hexdigest()


@contextlib.contextmanager
def _opened(cache):
    if isinstance(cache, PatchCache):
        yield cache
    else:
        with PatchCache(cache) as opened:
            yield opened


def _stored(cache: PatchCache):
    group = cache.read_group(FEATURES_GROUP)
    if group is None or "features" not in group[0]:
        return None
    return group[0]["features"], group[1]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch's CPU work on ``n`` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed_cache(cache_path, weights=None, features_file=None, epochs=None, seed=0, batch_size=64,
                quiet=True, threads=1) -> np.ndarray:
    """Compute (or import) the features of every patch in the cache and store them in it.

    Parameters
    ----------
    cache_path : path or PatchCache
    weights : path, optional
        MAE checkpoint with the official names (e.g. ``mae_pretrain_vit_base.pth``).
    features_file : path, optional
        A user's own (N, D) features, ``.npy`` or HDF5; replaces the encoder.
    epochs : int, optional
        Pretraining epochs of the default MAE; None picks :func:`auto_epochs`.
    seed : int
        Seeds everything random in the default MAE's pretraining (features themselves use no randomness).
    batch_size : int
        Patches per forward pass (pretraining and features).
    threads : int
        CPU threads for torch (default 1). One thread keeps the bytes independent of the machine's core
        count and avoids the spin-wait collapse of OpenMP on a shared, oversubscribed machine (on this
        project's 2-core box under load, a training step took 27 s with 2 threads and 1.9 s with 1).
        More threads are faster on an idle multi-core machine, but the features may then differ in
        the last bits from a run with another thread count.

    Returns
    -------
    np.ndarray, float32 (N, D). Stored features whose ``encoder_hash`` and ``cache_hash`` match are
    returned without recomputation.
    """
    if weights is not None and features_file is not None:
        raise InputError(f"give either weights ({weights}) or a features file ({features_file}), not both")
    if epochs is not None and (weights is not None or features_file is not None):
        raise InputError(f"epochs ({epochs}) apply to the default self-trained MAE only, not to weights or a "
                         "features file")
    if epochs is not None and int(epochs) < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    if int(batch_size) < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if int(seed) < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if int(threads) < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    with _opened(cache_path) as cache, torch_threads(threads):
        n = len(cache)
        if n == 0:
            raise InputError(f"{cache.path}: the cache holds no patches (all images smaller than the patch "
                             f"size {cache.patch_size}?); nothing to embed")
        if features_file is not None:
            feats = read_user_features(features_file, n)
            meta = {"encoder_hash": _user_features_hash(feats), "encoder_source": "features-file",
                    "encoder": str(Path(features_file).resolve())}
            return _store(cache, feats, meta)
        if weights is not None:
            model = load_mae_weights(weights)
            meta = {"encoder_source": "weights", "encoder": str(Path(weights).resolve())}
        else:
            config = CONFIGS[DEFAULT_CONFIG]
            epochs = auto_epochs(n) if epochs is None else int(epochs)
            path = default_mae_path(cache, config, epochs, seed, batch_size)
            model = _load_default(path)
            if model is None:
                model, losses = pretrain_mae(cache, config, epochs, seed, batch_size, quiet)
                save_mae(model, path, {"cache_hash": cache.content_hash, "epochs": epochs, "seed": int(seed),
                                       "batch_size": int(batch_size), "recipe": TRAIN_RECIPE,
                                       "epoch_losses": losses})
            meta = {"encoder_source": "default", "encoder": str(path.resolve()), "epochs": epochs,
                    "seed": int(seed)}
        meta["encoder_hash"] = encoder_hash(model, FEATURE_RECIPE)
        meta["config"] = model.config.name
        stored = _stored(cache)
        if stored is not None and stored[1].get("encoder_hash") == meta["encoder_hash"] \
                and stored[1].get("cache_hash") == cache.content_hash and stored[0].shape[0] == n \
                and np.isfinite(stored[0]).all():
            return np.asarray(stored[0], dtype=np.float32)
        feats = extract_features(model, cache, batch_size, quiet)
        return _store(cache, feats, meta)


def _load_default(path: Path) -> MaskedAutoencoderViT | None:
    """The saved default MAE at ``path``, or None to (re)train it if it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        return load_mae_weights(path)
    except InputError as exc:
        warnings.warn(f"retraining the default MAE: {exc}", stacklevel=3)
        return None


def _store(cache: PatchCache, feats: np.ndarray, meta: dict) -> np.ndarray:
    attrs = {k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in meta.items()}
    attrs.update(cache_hash=cache.content_hash, pooling="mean over patch tokens (no class token), no masking",
                 recipe=FEATURE_RECIPE, dim=int(feats.shape[1]))
    cache.write_group(FEATURES_GROUP, {"features": feats}, attrs)
    return feats


def load_features(cache, expect_encoder: str | None = None) -> np.ndarray:
    """The stored float32 (N, D) features of ``cache`` (path or PatchCache).

    Raises InputError when none are stored, when they were computed for another cache content
    (``cache_hash`` differs), when their row count is not N or a value is not finite, or, if
    ``expect_encoder`` (an encoder hash) is given, when they come from another encoder; the message tells
    the user to run ``dqtool embed``.
    """
    with _opened(cache) as c:
        stored = _stored(c)
        hint = f"run `dqtool embed {c.path}`"
        if stored is None:
            raise InputError(f"{c.path}: no features stored; {hint}")
        feats, attrs = stored
        if attrs.get("cache_hash") != c.content_hash:
            raise InputError(f"{c.path}: stored features belong to another cache content (cache hash "
                             f"{attrs.get('cache_hash')!s:.12} != {c.content_hash:.12}); {hint}")
        feats = check_features(feats, str(c.path), len(c), hint)
        if expect_encoder is not None and attrs.get("encoder_hash") != expect_encoder:
            raise InputError(f"{c.path}: stored features come from another encoder; {hint}")
        return feats
