"""Dataset quantization subsets: bins (eq. 1), per-bin sampling (eq. 2), the random baseline, subset files.

1. Bins. The N patch features are split into B bins by the greedy rule of eq. 1
   (``dqtool_kernels.quantization.form_bins``; gains ``paper`` (default), ``dq``, ``biomedseg``). Bins are
   computed once and stored in the cache under ``/derived/bins_<gain>_b<B>_<features hash>``; any later
   selection with the same features, gain and B reuses them (a changed encoder or cache changes the
   features hash, so stale bins are never read).
2. Sampling, eq. 2: S* = union_n g(S_n, rho). ``sampling="random"`` (default) draws from every bin a
   uniformly random subset of q_n patches with ``numpy.random.default_rng(seed)`` (bins in order, one
   generator). The quotas q_n follow the largest-remainder rule: the total is T = round(rho * N) (halves
   round up); every bin first gets floor(rho * |S_n|), and the T - sum floor(...) patches left go one each
   to the bins with the largest fractional parts rho * |S_n| - floor(rho * |S_n|), ties to the lower bin.
   rho is taken as the exact decimal it is written as, so 0.1 * 10 is exactly 1.
   ``sampling="first"`` reproduces the seed's released code: the first k_n = max(1, int(|S_n| * rho))
   patches of each bin in greedy order.
3. ``method="random"``: T patches uniformly at random from all N with ``default_rng(seed)``, T being the
   size the DQ subset would have; the baseline every DQ subset is compared with.

The subset is a JSON dict (:func:`select_subset`, :func:`write_subset`, :func:`read_subset`) with the sorted
patch ``indices``, the ``bins`` of those indices, the options, and coverage numbers
(:mod:`dqtool.coverage`) of the DQ subset next to the random one of the same size.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from dqtool_kernels.quantization import DEFAULT_MEMORY, GAINS, bin_sizes, form_bins

from dqtool.data.cache import PatchCache
from dqtool.selection.coverage import coverage
from dqtool.common.errors import InputError
from dqtool.common.progress import bar
from dqtool.common.files import atomic_write_text

METHODS = ("dq", "random")
SAMPLINGS = ("random", "first")
SUBSET_VERSION = 1


# ----------------------------------------------------------------------------------------------
# options


def parse_memory(value) -> int:
    """Bytes from an int or a string such as '512MB', '1.5GB', '2GiB' (None -> the default budget)."""
    if value is None:
        return DEFAULT_MEMORY
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise InputError(f"memory budget must be >= 0 bytes, got {value}")
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    units = {"GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "GB": 10**9, "MB": 10**6, "KB": 10**3,
             "G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, scale = text, 1
    try:
        amount = float(number)
    except ValueError:
        raise InputError(f"memory budget {value!r}: expected bytes or a size such as 512MB, 2GB") from None
    if not math.isfinite(amount) or amount < 0:
        raise InputError(f"memory budget {value!r} must be a non-negative size")
    return int(amount * scale)


def check_rate(rate) -> float:
    rate = float(rate)
    if not (0.0 < rate <= 1.0) or math.isnan(rate):
        raise InputError(f"rate must be in (0, 1], got {rate}")
    return rate


def _check_options(method, gain, sampling, seed):
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if gain not in GAINS:
        raise InputError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
    if sampling not in SAMPLINGS:
        raise InputError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


# ----------------------------------------------------------------------------------------------
# sampling (eq. 2)


def _exact(rate: float) -> Fraction:
    return Fraction(repr(float(rate)))  # the decimal the user wrote, not its binary neighbour


def subset_total(n: int, rate: float) -> int:
    """T = round(rate * N), halves rounded up."""
    return math.floor(_exact(rate) * n + Fraction(1, 2))


def largest_remainder_quotas(sizes, rate: float) -> np.ndarray:
    """Per-bin counts q_n summing to round(rate * N): floor(rate*|S_n|), then +1 by largest remainder."""
    sizes = [int(s) for s in sizes]
    r = _exact(rate)
    exact = [r * s for s in sizes]
    quotas = [math.floor(e) for e in exact]
    left = subset_total(sum(sizes), rate) - sum(quotas)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[:left]:
        quotas[i] += 1
    return np.array(quotas, dtype=np.int64)


def sample_bins(bins: list[np.ndarray], rate: float, seed: int = 0, sampling: str = "random") -> np.ndarray:
    """Eq. 2: the union over bins of g(S_n, rate); returns sorted patch indices."""
    if sampling == "first":
        picked = [b[: max(1, int(len(b) * rate))] for b in bins]
    else:
        rng = np.random.default_rng(seed)
        quotas = largest_remainder_quotas([len(b) for b in bins], rate)
        picked = [rng.choice(b, size=int(q), replace=False) for b, q in zip(bins, quotas)]
    return np.sort(np.concatenate(picked).astype(np.int64)) if picked else np.zeros(0, np.int64)


def random_subset(n: int, total: int, seed: int = 0) -> np.ndarray:
    """The random baseline: ``total`` of ``n`` patches uniformly without replacement, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(total), replace=False).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# features and bins stored in the cache


def _load_features(cache: PatchCache) -> np.ndarray:
    from dqtool.features.embed import load_features

    feats = load_features(cache)
    if feats.ndim != 2 or feats.shape[0] != len(cache):
        raise InputError(f"{cache.path}: features of shape {feats.shape} do not match the cache's "
                         f"{len(cache)} patches; run `dqtool embed {cache.path}`")
    bad = ~np.isfinite(feats)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InputError(f"{cache.path}: stored features hold {int(bad.sum())} NaN or inf values (first at "
                         f"patch {row}); run `dqtool embed {cache.path}` again")
    return feats


def features_hash(features: np.ndarray) -> str:
    f = np.ascontiguousarray(features, dtype=np.float32)
    return hashlib.sha256(f"{f.shape}".encode() + f.tobytes()).hexdigest()


def bins_group_name(gain: str, bins: int, feat_hash: str) -> str:
    return f"bins_{gain}_b{bins}_{feat_hash[:16]}"


def load_or_form_bins(cache: PatchCache, features: np.ndarray, bins: int = 10, gain: str = "paper",
                      memory=None, quiet: bool = True) -> tuple[list[np.ndarray], dict]:
    """The cache's stored bins for (features, gain, bins), or form them now and store them."""
    n = len(cache)
    fh = features_hash(features)
    name = bins_group_name(gain, bins, fh)
    stored = cache.read_group(name)
    if stored is not None:
        arrays, attrs = stored
        order, sizes = arrays.get("order"), arrays.get("sizes")
        if (order is not None and sizes is not None and attrs.get("features_hash") == fh
                and order.shape == (n,) and np.array_equal(np.sort(order), np.arange(n))
                and np.array_equal(sizes, bin_sizes(n, bins))):
            split = np.split(order.astype(np.int64), np.cumsum(sizes)[:-1])
            return split, {"group": name, "reused": True, "path": attrs.get("path"),
                           "seconds": attrs.get("seconds")}
    budget = parse_memory(memory)
    progress = bar(n, desc=f"bins ({gain}, B={bins})", quiet=quiet, unit="patch")
    start = time.perf_counter()
    try:
        result, path = form_bins(features, bins, gain, memory=budget, progress=progress.update)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    order = np.concatenate(result)
    cache.write_group(name, {"order": order, "sizes": np.array([len(b) for b in result], np.int64)},
                      {"gain": gain, "bins": int(bins), "features_hash": fh, "path": path,
                       "seconds": float(seconds), "cache_hash": cache.content_hash})
    return result, {"group": name, "reused": False, "path": path, "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# the subset


def select_subset(cache_path, rate, method: str = "dq", bins: int = 10, gain: str = "paper", seed: int = 0,
                  sampling: str = "random", memory=None, quiet: bool = True) -> dict:
    """Select a fraction ``rate`` of the cache's patches by dataset quantization (or at random).

    Returns the subset as a JSON-ready dict: ``indices`` (sorted), ``bins`` (DQ bin of each index),
    ``rate``, ``method``, ``n_total``, ``n_selected``, ``cache``, ``cache_hash``, ``features_hash``,
    ``config`` (every option), ``coverage`` ({'dq': ..., 'random': ...}: covering radius and mean
    nearest-selected distance of the DQ subset and of the random subset of the same size and seed).
    """
    return _select(cache_path, rate, method, bins, gain, seed, sampling, memory, quiet)[0]


def _select(cache_path, rate, method, bins, gain, seed, sampling, memory, quiet):
    """select_subset, plus what the plots need: (subset, features, dq indices, random indices, bin of each patch)."""
    rate = check_rate(rate)
    _check_options(method, gain, sampling, seed)
    memory_bytes = parse_memory(memory)
    with PatchCache(cache_path) as cache:
        n = len(cache)
        if n == 0:
            raise InputError(f"{cache.path}: the cache holds no patches")
        if not isinstance(bins, (int, np.integer)) or bins < 1 or bins > n:
            raise InputError(f"bins must be between 1 and the number of patches ({n}), got {bins}")
        features = _load_features(cache)
        dq_bins, info = load_or_form_bins(cache, features, int(bins), gain, memory_bytes, quiet)
        cache_hash = cache.content_hash
        cache_file = str(cache.path)
    dq = sample_bins(dq_bins, rate, int(seed), sampling)
    if dq.size == 0:
        raise InputError(f"rate {rate} selects round({rate} * {n}) = 0 of {n} patches; use a rate >= "
                         f"{0.5 / n:.2g}")
    rnd = random_subset(n, dq.size, int(seed))
    indices = dq if method == "dq" else rnd
    bin_of = np.empty(n, dtype=np.int64)
    for b, members in enumerate(dq_bins):
        bin_of[members] = b
    subset = {
        "version": SUBSET_VERSION,
        "indices": indices.tolist(),
        "bins": bin_of[indices].tolist(),
        "rate": rate,
        "method": method,
        "n_total": n,
        "n_selected": int(indices.size),
        "cache": cache_file,
        "cache_hash": cache_hash,
        "features_hash": features_hash(features),
        "config": {"rate": rate, "method": method, "bins": int(bins), "gain": gain, "seed": int(seed),
                   "sampling": sampling, "memory": memory_bytes, "lambda": 1.0,
                   "rounding": "largest remainder, total round(rate*N) with halves up" if sampling == "random"
                   else "first max(1, int(len*rate)) of each bin in greedy order",
                   "bins_group": info["group"], "bins_reused": info["reused"], "bins_path": info["path"]},
        "coverage": {"dq": coverage(features, dq).to_dict(), "random": coverage(features, rnd).to_dict()},
    }
    return subset, features, dq, rnd, bin_of


def _out_for_rate(out: Path, rate: float, several: bool) -> Path:
    return out.with_name(f"{out.stem}_rate{rate:g}{out.suffix or '.json'}") if several else out


def select_to_files(cache_path, rates, out, plot_dir=None, method: str = "dq", bins: int = 10,
                    gain: str = "paper", seed: int = 0, sampling: str = "random", memory=None,
                    quiet: bool = True) -> list[tuple[Path, dict]]:
    """``dqtool select``: one subset per rate (bins formed once), written to ``out`` (``out_rate<r>.json``
    when several rates are given), plus Fig. 2/3-like PNGs in ``plot_dir``. Nothing is written unless every
    rate succeeds."""
    rates = [check_rate(r) for r in rates]
    if not rates:
        raise InputError("give at least one rate")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise InputError(f"{out}: is a folder; --out expects a .json file path")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")
    several = len(rates) > 1
    results = [_select(cache_path, r, method, bins, gain, seed, sampling, memory, quiet) for r in rates]
    written = []
    for rate, (subset, *_) in zip(rates, results):
        path = _out_for_rate(out, rate, several)
        write_subset(subset, path)
        written.append((path, subset))
    if plot_dir is not None:
        from dqtool.selection.plots import plot_selection

        for rate, (subset, features, dq, rnd, bin_of) in zip(rates, results):
            suffix = f"_rate{rate:g}" if several else ""
            plot_selection(subset["cache"], features, dq, rnd, bin_of, plot_dir, suffix=suffix)
    return written


def write_subset(subset: dict, path) -> Path:
    """Write the subset JSON (temp file + rename, so a crash never leaves half a file)."""
    return atomic_write_text(path, json.dumps(subset, indent=1) + "\n")


def read_subset(path, cache=None) -> dict:
    """Read a subset JSON; with ``cache`` (path or PatchCache), check it was selected on that cache's content
    and that every index lies inside it (InputError naming the file and the bad index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such subset file")
    try:
        subset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a JSON subset file ({exc})") from exc
    if not isinstance(subset, dict) or not isinstance(subset.get("indices"), list):
        raise InputError(f"{path}: expected a JSON object with an 'indices' list (written by `dqtool select`)")
    idx = subset["indices"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise InputError(f"{path}: 'indices' must be integers")
    if cache is not None:
        opened = cache if isinstance(cache, PatchCache) else PatchCache(cache)
        try:
            n, chash, cpath = len(opened), opened.content_hash, opened.path
        finally:
            if opened is not cache:
                opened.close()
        bad = [i for i in idx if i < 0 or i >= n]
        if bad:
            raise InputError(f"{path}: patch index {bad[0]} is outside the cache {cpath} (0..{n - 1})")
        if subset.get("cache_hash") not in (None, chash):
            raise InputError(f"{path}: selected on another cache content (hash {subset['cache_hash']:.12}), "
                             f"not {cpath} (hash {chash:.12})")
    return subset


def subset_cache_path(subset: dict, subset_path) -> Path:
    """The cache a subset was selected on (relative paths are taken from the subset file's folder)."""
    p = Path(subset.get("cache", ""))
    if not p.is_absolute() and not p.exists():
        p = Path(subset_path).parent / p
    return p


def export_subset(subset_path, out_dir, cache_path=None, quiet: bool = True) -> Path:
    """``dqtool export``: the subset's patches as Cellpose-layout files for annotation or training.

    Writes ``NNN_img.png`` (uint8, gray or RGB as cached) and, when the cache has labels, ``NNN_masks.png``
    (uint16 instance ids) for NNN = 000, 001, ... in index order, plus ``subset_patches.csv`` mapping each
    file to its patch index, bin, domain, source image and (y, x) offset. Returns the CSV path.
    """
    import csv
    import io

    from dqtool.data.io import write_image_png
    from dqtool.common.progress import progress

    subset = read_subset(subset_path)
    cache_file = Path(cache_path) if cache_path is not None else subset_cache_path(subset, subset_path)
    out_dir = Path(out_dir)
    with PatchCache(cache_file) as cache:
        read_subset(subset_path, cache)  # index and content checks against this cache
        idx = np.asarray(subset["indices"], dtype=np.int64)
        bins_of = subset.get("bins") or [None] * len(idx)
        width = max(3, len(str(max(len(idx) - 1, 0))))
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for k in progress(range(len(idx)), total=len(idx), desc="export", quiet=quiet):
            i = int(idx[k])
            stem = f"{k:0{width}d}"
            img = cache.images([i])[0]
            write_image_png(out_dir / f"{stem}_img.png", img[..., 0] if img.shape[-1] == 1 else img)
            mask_name = ""
            if cache.has_labels:
                mask_name = f"{stem}_masks.png"
                write_image_png(out_dir / mask_name, cache.labels([i])[0].astype(np.uint16))
            y, x = (int(v) for v in cache.offsets[i])
            rows.append({"image": f"{stem}_img.png", "masks": mask_name, "patch_index": i, "bin": bins_of[k],
                         "domain": str(cache.domain_of_patch[i]), "source": str(cache.source_of_patch[i]),
                         "y": y, "x": x, "size": cache.patch_size})
    buf = io.StringIO()
    fields = ["image", "masks", "patch_index", "bin", "domain", "source", "y", "x", "size"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(out_dir / "subset_patches.csv", buf.getvalue())


__all__ = ["select_subset", "select_to_files", "write_subset", "read_subset", "export_subset", "sample_bins",
           "largest_remainder_quotas", "subset_total", "random_subset", "load_or_form_bins", "parse_memory",
           "features_hash", "bins_group_name"]
