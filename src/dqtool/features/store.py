"""Features stored in a patch cache: the one feature-matrix check, reading and writing ``/derived/features``.

The features are a float32 (N, D) matrix in the cache's derived group ``features`` (dataset ``features``)
with attributes ``encoder_hash`` (identity of the encoder and preprocessing) and ``cache_hash`` (the
cache's ``content_hash``). :func:`load_features` refuses features of another cache content or encoder.
This module needs no torch: DQ selection reads features through it alone.
"""

from __future__ import annotations

import contextlib

import numpy as np

from dqtool.common.errors import InputError
from dqtool.data.cache import PatchCache

FEATURES_GROUP = "features"


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
    wide = arr
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        if np.isfinite(wide[row, col]):
            raise InputError(f"{where}: feature value {float(wide[row, col]):.6g} at row {row}, column {col} overflows "
                             f"float32 (max {float(np.finfo(np.float32).max):.3g}); scale the features down{tail}")
        raise InputError(f"{where}: {int(bad.sum())} non-finite feature values (NaN or inf), first at row "
                         f"{row}, column {col}; expected finite numbers{tail}")
    # Eq. 1 sums up to N squared distances, each at most 4 max ||f||^2; the kernels add them in float32.
    squared = np.einsum("ij,ij->i", arr, arr, dtype=np.float64)
    limit = float(np.finfo(np.float32).max) / (4.0 * max(arr.shape[0], 1))
    if squared.size and squared.max() > limit:
        row = int(np.argmax(squared))
        raise InputError(f"{where}: feature row {row} has squared norm {squared[row]:.3g}; with {arr.shape[0]} rows "
                         f"the sums of squared distances (up to 4 N max ||f||^2) overflow float32 (max "
                         f"{float(np.finfo(np.float32).max):.3g}); scale the features down{tail}")
    return np.ascontiguousarray(arr)


@contextlib.contextmanager
def opened_cache(cache):
    """``cache`` itself when it is an open PatchCache, else the cache at that path, opened for the block."""
    if isinstance(cache, PatchCache):
        yield cache
    else:
        with PatchCache(cache) as opened:
            yield opened


def stored_features(cache: PatchCache):
    """(features, attrs) stored in ``cache``, unchecked, or None."""
    group = cache.read_group(FEATURES_GROUP)
    if group is None or "features" not in group[0]:
        return None
    return group[0]["features"], group[1]


def store_features(cache: PatchCache, feats: np.ndarray, meta: dict, recipe: str) -> np.ndarray:
    """Write ``feats`` with ``meta`` (encoder identity) into the cache's features group; returns them."""
    attrs = {k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in meta.items()}
    attrs.update(cache_hash=cache.content_hash, pooling="mean over patch tokens (no class token), no masking",
                 recipe=recipe, dim=int(feats.shape[1]))
    cache.write_group(FEATURES_GROUP, {"features": feats}, attrs)
    return feats


def load_features(cache, expect_encoder: str | None = None) -> np.ndarray:
    """The stored float32 (N, D) features of ``cache`` (path or PatchCache).

    Raises InputError when none are stored, when they were computed for another cache content
    (``cache_hash`` differs), when their row count is not N or a value is not finite, or, if
    ``expect_encoder`` (an encoder hash) is given, when they come from another encoder; the message tells
    the user to run ``dqtool embed``.
    """
    with opened_cache(cache) as c:
        stored = stored_features(c)
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
