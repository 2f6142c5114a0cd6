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

import contextlib
import functools
import hashlib
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

from dqtool.common.cluster import connect
from dqtool.common.errors import InputError
from dqtool.common.outputs import kill_point, writing
from dqtool.common.progress import bar
from dqtool.data.cache import PatchCache
from dqtool.features.mae import (CONFIGS, DEFAULT_CONFIG, FEATURE_RECIPE, MaskedAutoencoderViT, encoder_hash,
                                 to_model_input)
from dqtool.features.pretrain import (TRAIN_RECIPE, auto_epochs, default_mae_path, load_mae_weights, pretrain_mae,
                                      save_mae)
from dqtool.features.store import (FEATURES_GROUP, check_features, load_features, opened_cache, store_features,
                                   stored_features)

__all__ = ["embed_cache", "load_features", "pretrain_mae", "load_mae_weights", "extract_features",
           "read_user_features", "check_features", "auto_epochs", "default_mae_path", "FEATURES_GROUP"]


#: Patches per embedding task (rounded down to a whole number of batches, at least one): a constant, so the
#: split into tasks, and with it every forward pass, never depends on the number of workers. At ~50 ms a
#: patch (ViT-Tiny, one thread) a task is ~13 s, and Dask's overhead per task well under 1 % of it.
CHUNK_PATCHES = 256


def chunk_size(batch_size: int) -> int:
    """Patches per task for ``batch_size``: :data:`CHUNK_PATCHES` rounded down to whole batches."""
    return max(1, CHUNK_PATCHES // int(batch_size)) * int(batch_size)


_WORKER_ENCODER: dict = {}  # on a Dask worker: the last encoder loaded, by (file, size, mtime)


def embed_chunk(patches: np.ndarray, model: MaskedAutoencoderViT, batch_size: int = 64,
                threads: int = 1) -> np.ndarray:
    """float32 (n, D) features of one chunk of patches, ``batch_size`` at a time, on ``threads`` torch
    threads: the one computation of the serial loop and of a Dask task."""
    out = np.empty((len(patches), model.config.embed_dim), dtype=np.float32)
    with torch_threads(threads):
        for start in range(0, len(patches), batch_size):
            out[start:start + batch_size] = model.features(to_model_input(patches[start:start + batch_size],
                                                                          model.config)).numpy()
    return out


def embed_range(bounds: tuple[int, int], cache: str, cache_hash: str, encoder: str, encoder_key: str,
                batch_size: int = 64, threads: int = 1) -> np.ndarray:
    """A Dask task of ``embed --workers``: the features of patches ``bounds[0]:bounds[1]`` of the cache file.

    The worker opens the cache read-only (the client, its one writer, writes nothing before every task is
    done) and loads the encoder file once (kept for the next task); both are checked against what the
    client computed with (``cache_hash``, ``encoder_key``), so a file changed under a run is an error,
    never other features. A task is two file names and two numbers: rerun anywhere after a worker dies.
    """
    stat = os.stat(encoder)
    key = (encoder, stat.st_size, stat.st_mtime_ns)
    model = _WORKER_ENCODER.get(key)
    if model is None:
        _WORKER_ENCODER.clear()
        model = load_mae_weights(encoder)
        if encoder_hash(model, FEATURE_RECIPE) != encoder_key:
            raise InputError(f"{encoder}: the encoder file changed during the run; run dqtool embed again")
        _WORKER_ENCODER[key] = model
    with PatchCache(cache) as opened:
        if opened.content_hash != cache_hash:
            raise InputError(f"{cache}: the cache changed during the run; run dqtool embed again")
        patches = opened.images(np.arange(*bounds))
    return embed_chunk(patches, model, batch_size, threads)


def extract_features(model: MaskedAutoencoderViT, cache: PatchCache, batch_size: int = 64,
                     quiet: bool = True, cluster=None, threads: int | None = None,
                     encoder: str | os.PathLike | None = None) -> np.ndarray:
    """float32 (N, D): f(x) for every patch in cache order (no masking; mean over patch tokens).

    The patches go in chunks of :func:`chunk_size` (:func:`embed_chunk`), here or, with an active
    ``cluster``, one Dask task a chunk (:func:`embed_range`: the worker reads its chunk from the cache file
    and loads the encoder from ``encoder``, the file ``model`` was loaded from or saved to); the features
    come back in order: the same bytes as here for the same ``threads`` (default: torch's current count
    here, 1 on a worker).
    """
    n = len(cache)
    out = np.empty((n, model.config.embed_dim), dtype=np.float32)
    model.eval()
    step = chunk_size(batch_size)
    if cluster is None or not cluster.active:
        threads = int(threads or torch.get_num_threads())
        progress = bar(n, desc="features", quiet=quiet, unit="patch")
        for start in range(0, n, step):
            stop = min(n, start + step)
            out[start:stop] = embed_chunk(cache.images(np.arange(start, stop)), model, batch_size, threads)
            progress.update(stop - start)
        progress.close()
        return out
    from dqtool.common.cluster import iter_tasks

    if encoder is None:
        raise ValueError("extract_features on a cluster needs the encoder's file (encoder=...)")
    task = functools.partial(embed_range, cache=str(Path(cache.path).absolute()), cache_hash=cache.content_hash,
                             encoder=str(Path(encoder).absolute()), encoder_key=encoder_hash(model, FEATURE_RECIPE),
                             batch_size=int(batch_size), threads=int(threads or 1))
    bounds = [(a, min(n, a + step)) for a in range(0, n, step)]
    stream = iter_tasks(task, bounds, cluster, kind="embed", desc="features", quiet=quiet, unit="patch", total=n,
                        progress_of=lambda b: b[1] - b[0])
    try:
        for (a, b), feats in zip(bounds, stream):
            out[a:b] = feats
    finally:
        stream.close()
    return out


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
def torch_threads(n: int):
    """Run torch's CPU work on ``n`` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed_cache(cache_path, weights=None, features_file=None, epochs=None, seed=0, batch_size=64,
                quiet=True, threads=1, cluster=None) -> np.ndarray:
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
        the last bits from a run with another thread count. On a cluster each task uses ``threads``.
    cluster : dqtool.common.cluster.Cluster, optional
        Compute the features as Dask tasks of :data:`CHUNK_PATCHES` patches (``--workers``/``--scheduler``):
        the MAE is pretrained (or loaded) here, each worker reads its chunks from the cache file and loads
        the MAE's file once, and this process alone writes the features into the cache. The same bytes as
        a run without a cluster (with the same ``threads``).

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
    target = Path(getattr(cache_path, "path", cache_path))
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such cache file")
    # connect first: an unreachable --scheduler fails before the MAE is pretrained
    with writing(target, "embed", [weights, features_file]), opened_cache(cache_path) as cache, \
            torch_threads(threads), connect(cluster, quiet) as cluster:
        n = len(cache)
        if n == 0:
            raise InputError(f"{cache.path}: the cache holds no patches (all images smaller than the patch "
                             f"size {cache.patch_size}?); nothing to embed")
        if features_file is not None:
            feats = read_user_features(features_file, n)
            meta = {"encoder_hash": _user_features_hash(feats), "encoder_source": "features-file",
                    "encoder": str(Path(features_file).resolve())}
            return store_features(cache, feats, meta, FEATURE_RECIPE)
        if weights is not None:
            model = load_mae_weights(weights)
            encoder_file = Path(weights)
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
                kill_point("embed:pretrained")
            encoder_file = path
            meta = {"encoder_source": "default", "encoder": str(path.resolve()), "epochs": epochs,
                    "seed": int(seed)}
        meta["encoder_hash"] = encoder_hash(model, FEATURE_RECIPE)
        meta["config"] = model.config.name
        stored = stored_features(cache)
        if stored is not None and stored[1].get("encoder_hash") == meta["encoder_hash"] \
                and stored[1].get("cache_hash") == cache.content_hash and stored[0].shape[0] == n \
                and np.isfinite(stored[0]).all():
            return np.asarray(stored[0], dtype=np.float32)
        feats = extract_features(model, cache, batch_size, quiet, cluster=cluster, threads=threads,
                                 encoder=encoder_file)
        return store_features(cache, feats, meta, FEATURE_RECIPE)


def _load_default(path: Path) -> MaskedAutoencoderViT | None:
    """The saved default MAE at ``path``, or None to (re)train it if it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        return load_mae_weights(path)
    except InputError as exc:
        warnings.warn(f"retraining the default MAE: {exc}", stacklevel=3)
        return None
