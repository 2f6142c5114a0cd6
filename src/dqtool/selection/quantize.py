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
4. ``method="kcenter"``: the T patches of the farthest-first traversal (Gonzalez 1985;
   ``dqtool_kernels.kcenter``), first pick the patch nearest the feature mean, so the result does not
   depend on the seed: a covering radius at most twice the optimal one. Its coverage is reported next to
   DQ's and random's.
5. ``method="uncertain"`` (uncertainty sampling, :func:`uncertainty_sampling`): within each DQ bin, the q_n
   patches (the quotas of 2.) of largest uncertainty u, ties by one seeded random order; ``bins=None``: the
   T patches of largest u overall, no features needed. u comes from ``scorer``
   (:class:`dqtool.selection.uncertain.PatchScorer`: a Cellpose model's label-free consistency under
   perturbation, by the ranking's own code; that module has the formula and stores the per-patch scores in
   the cache). The scorer is passed in, so this module never loads the ranking, torch or Cellpose.

The result is a :class:`dqtool.selection.subsets.Subset` (:func:`select_subset`) with the sorted patch
``indices``, the ``bins`` of those indices, the options, and coverage numbers (:mod:`dqtool.selection.coverage`)
of the DQ subset next to the random one of the same size; :func:`select_to_files` writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path

import numpy as np

from dqtool_kernels.kcenter import kcenter
from dqtool_kernels.quantization import DEFAULT_MEMORY, GAINS, bin_sizes, form_bins

from dqtool.common.errors import InputError
from dqtool.common.outputs import fault_code, kill_point, output_error, output_lock, write_marker, writing
from dqtool.common.progress import bar
from dqtool.data.cache import PatchCache
from dqtool.features.store import load_features
from dqtool.selection.coverage import coverage
from dqtool.selection.subsets import Subset, exact_rate, random_subset, subset_total

METHODS = ("dq", "random", "kcenter")  # by features alone (also replay's source methods)
MODEL_METHODS = ("uncertain",)  # ranked by a Cellpose model (``scorer``)
SELECT_METHODS = METHODS + MODEL_METHODS
SAMPLINGS = ("random", "first")


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


def _check_options(method, gain, sampling, seed, scorer=None, bins=10):
    if method not in SELECT_METHODS:
        raise InputError(f"method must be one of {', '.join(SELECT_METHODS)}, got {method!r}")
    if method in MODEL_METHODS and scorer is None:
        raise InputError(f"--method {method} needs --model MODEL: the Cellpose model file whose consistency under "
                         "perturbation ranks the patches")
    if method not in MODEL_METHODS:
        if scorer is not None:
            raise InputError(f"--model {scorer.model}: only --method {'/'.join(MODEL_METHODS)} uses a model; "
                             f"--method {method} selects by the features alone")
        if bins is None:
            raise InputError(f"--no-bins applies to --method {'/'.join(MODEL_METHODS)} only; --method {method} "
                             "needs the DQ bins")
    if gain not in GAINS:
        raise InputError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
    if sampling not in SAMPLINGS:
        raise InputError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


# ----------------------------------------------------------------------------------------------
# sampling (eq. 2)


def largest_remainder_quotas(sizes, rate: float) -> np.ndarray:
    """Per-bin counts q_n summing to round(rate * N): floor(rate*|S_n|), then +1 by largest remainder."""
    sizes = [int(s) for s in sizes]
    r = exact_rate(rate)
    exact = [r * s for s in sizes]
    quotas = [math.floor(e) for e in exact]
    left = subset_total(sum(sizes), rate) - sum(quotas)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[:left]:
        quotas[i] += 1
    return np.array(quotas, dtype=np.int64)


def uncertainty_sampling(uncertainty: np.ndarray, bins, quotas, seed: int = 0) -> np.ndarray:
    """Eq. 2 with g(S_n, rate) = the ``quotas[n]`` patches of largest ``uncertainty`` in bin ``bins[n]``; sorted.

    Ties are broken by one random order of all N patches, ``default_rng(seed).permutation(N)`` (lower
    first), drawn once whatever the bins: the same seed gives the same subset, another seed changes only
    which of tied patches are taken. One bin holding every patch gives the global top-T.
    """
    u = np.asarray(uncertainty, np.float64)
    rank = np.random.default_rng(seed).permutation(len(u))
    picked = []
    for members, q in zip(bins, quotas):
        members = np.asarray(members, np.int64)
        order = np.lexsort((rank[members], -u[members]))  # last key first: largest u, then the random rank
        picked.append(members[order[:int(q)]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def sample_bins(bins: list[np.ndarray], rate: float, seed: int = 0, sampling: str = "random") -> np.ndarray:
    """Eq. 2: the union over bins of g(S_n, rate); returns sorted patch indices."""
    if sampling == "first":
        picked = [b[: max(1, int(len(b) * rate))] for b in bins]
    else:
        rng = np.random.default_rng(seed)
        quotas = largest_remainder_quotas([len(b) for b in bins], rate)
        picked = [rng.choice(b, size=int(q), replace=False) for b, q in zip(bins, quotas)]
    return np.sort(np.concatenate(picked).astype(np.int64)) if picked else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# features and bins stored in the cache


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


def select_subset(cache_path, rate, method: str = "dq", bins: int | None = 10, gain: str = "paper", seed: int = 0,
                  sampling: str = "random", memory=None, quiet: bool = True, scorer=None) -> Subset:
    """Select a fraction ``rate`` of the cache's patches by dataset quantization (or at random).

    Returns the :class:`Subset`: ``indices`` (sorted), ``bins`` (DQ bin of each index), ``rate``,
    ``method``, ``n_total``, ``n_selected``, ``cache``, ``cache_hash``, ``features_hash``, ``config``
    (every option), ``coverage`` ({'dq': ..., 'random': ...}: covering radius and mean nearest-selected
    distance of the DQ subset and of the random subset of the same size and seed).

    ``method="uncertain"`` needs ``scorer`` (5. above; ``scorer.check(cache)`` refuses a model that cannot
    score the cache's patches, ``scorer(cache, quiet)`` returns the (N,) uncertainty and what the subset's
    ``config`` records of it) and may take ``bins=None`` (no bins, no features: ``bins``, ``features_hash``
    and ``coverage`` are null). Its ``coverage`` has 'uncertain' next to 'dq' and 'random'.
    """
    return _select(cache_path, rate, method, bins, gain, seed, sampling, memory, quiet, scorer)[0]


def _select(cache_path, rate, method, bins, gain, seed, sampling, memory, quiet, scorer=None):
    """select_subset, plus what the plots need: (subset, features, picked indices, random indices, bin of each
    patch); features and bins are None for ``uncertain`` without bins."""
    rate = check_rate(rate)
    _check_options(method, gain, sampling, seed, scorer, bins)
    memory_bytes = parse_memory(memory)
    scored = None
    with PatchCache(cache_path) as cache:
        n = len(cache)
        if n == 0:
            raise InputError(f"{cache.path}: the cache holds no patches")
        if bins is not None and (not isinstance(bins, (int, np.integer)) or bins < 1 or bins > n):
            raise InputError(f"bins must be between 1 and the number of patches ({n}), got {bins}")
        if scorer is not None:
            if subset_total(n, rate) == 0:
                raise InputError(f"rate {rate} selects round({rate} * {n}) = 0 of the {n} patches of {cache.path}; "
                                 f"use a rate >= {0.5 / n:.2g}")
            scorer.check(cache)  # a model that cannot score these patches is refused before any work
        if bins is None:
            return _select_uncertain_overall(cache, rate, seed, *scorer(cache, quiet))
        features = load_features(cache)
        dq_bins, info = load_or_form_bins(cache, features, int(bins), gain, memory_bytes, quiet)
        if scorer is not None:
            scored = scorer(cache, quiet)
        cache_hash = cache.content_hash
        cache_file = str(cache.path)
    dq = sample_bins(dq_bins, rate, int(seed), sampling)
    if dq.size == 0:
        raise InputError(f"rate {rate} selects round({rate} * {n}) = 0 of {n} patches; use a rate >= "
                         f"{0.5 / n:.2g}")
    unc, extra = None, {}
    if scored is not None:
        u, scoring = scored
        quotas = largest_remainder_quotas([len(b) for b in dq_bins], rate)  # eq. 2's q_n
        unc = _pick(u, dq_bins, quotas, seed, n)
        extra = {**_uncertain_config(scoring, u, unc), "rounding": "largest remainder, total round(rate*N) with halves up"}
    rnd = random_subset(n, dq.size if unc is None else unc.size, int(seed))
    kc = np.sort(kcenter(features, dq.size)) if method == "kcenter" else None
    indices = {"dq": dq, "random": rnd, "kcenter": kc, "uncertain": unc}[method]
    bin_of = np.empty(n, dtype=np.int64)
    for b, members in enumerate(dq_bins):
        bin_of[members] = b
    subset = Subset(
        indices=indices,
        bins=bin_of[indices],
        rate=rate,
        method=method,
        n_total=n,
        cache=cache_file,
        cache_hash=cache_hash,
        features_hash=features_hash(features),
        config={"rate": rate, "method": method, "bins": int(bins), "gain": gain, "seed": int(seed),
                "sampling": sampling, "memory": memory_bytes, "lambda": 1.0,
                "rounding": "largest remainder, total round(rate*N) with halves up" if sampling == "random"
                else "first max(1, int(len*rate)) of each bin in greedy order",
                "bins_group": info["group"], "bins_reused": info["reused"], "bins_path": info["path"], **extra},
        coverage={**({"uncertain": coverage(features, unc).to_dict()} if unc is not None else {}),
                  "dq": coverage(features, dq).to_dict(), "random": coverage(features, rnd).to_dict(),
                  **({"kcenter": coverage(features, kc).to_dict()} if kc is not None else {})},
    )
    return subset, features, (dq if unc is None else unc), rnd, bin_of


def _pick(u, groups, quotas, seed, n) -> np.ndarray:
    u = np.asarray(u, np.float64)
    if u.shape != (n,) or np.isnan(u).any():
        raise ValueError(f"the scorer gave uncertainties of shape {u.shape} (NaN: {np.isnan(u).any()}) for {n} patches")
    return uncertainty_sampling(u, groups, quotas, int(seed))


def _uncertain_config(scoring: dict, u, picked) -> dict:
    """What a subset of ``method='uncertain'`` records beyond DQ's options: the scorer's record (model, its
    sha256, how patches were scored), the mean uncertainty of the subset and of all patches, the tie rule."""
    return {**scoring, "uncertainty_mean_selected": float(np.mean(u[picked])), "uncertainty_mean_all": float(np.mean(u)),
            "ties": "default_rng(seed).permutation(N), lower first"}


def _select_uncertain_overall(cache: PatchCache, rate, seed, u, scoring):
    """``method='uncertain'`` without bins: the T = round(rate * N) patches of largest uncertainty ``u``."""
    n = len(cache)
    picked = _pick(u, [np.arange(n)], [subset_total(n, rate)], seed, n)
    subset = Subset(
        indices=picked, bins=None, rate=rate, method="uncertain", n_total=n, cache=str(cache.path),
        cache_hash=cache.content_hash, features_hash=None,
        config={"rate": rate, "method": "uncertain", "bins": None, "seed": int(seed),
                "rounding": "total round(rate*N) with halves up", **_uncertain_config(scoring, u, picked)},
        coverage=None)
    return subset, None, picked, random_subset(n, picked.size, int(seed)), None


def _out_for_rate(out: Path, rate: float, several: bool) -> Path:
    return out.with_name(f"{out.stem}_rate{rate:g}{out.suffix or '.json'}") if several else out


def select_to_files(cache_path, rates, out, plot_dir=None, method: str = "dq", bins: int | None = 10,
                    gain: str = "paper", seed: int = 0, sampling: str = "random", memory=None,
                    quiet: bool = True, scorer=None) -> list[tuple[Path, Subset]]:
    """``dqtool select``: one subset per rate (bins formed once), written to ``out`` (``out_rate<r>.json``
    when several rates are given), plus Fig. 2/3-like PNGs in ``plot_dir``; returns (path, subset) per rate.
    Nothing is written unless every rate succeeds. ``method='uncertain'`` without bins plots only the
    patch grid (no features, no embedding)."""
    rates = [check_rate(r) for r in rates]
    if not rates:
        raise InputError("give at least one rate")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise InputError(f"{out}: is a folder; --out expects a .json file path")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")
    several = len(rates) > 1
    paths = [_out_for_rate(out, rate, several) for rate in rates]
    with contextlib.ExitStack() as outputs:
        # the cache is an output too (its bins group); every output is checked and locked before any work
        if Path(cache_path).exists():
            outputs.enter_context(output_lock(cache_path))
        inputs = [cache_path] + ([scorer.model] if scorer is not None else [])
        for path in paths:
            outputs.enter_context(writing(path, "select", inputs))
        if plot_dir is not None:
            outputs.enter_context(writing(plot_dir, "select", inputs, kind="folder"))
        try:
            results = [_select(cache_path, r, method, bins, gain, seed, sampling, memory, quiet, scorer) for r in rates]
        except (OSError, RuntimeError) as exc:  # storing the bins in the cache: a full disk names the cache
            if fault_code(exc) is None:
                raise
            raise output_error(cache_path, exc) from exc
        kill_point("select:selected")
        written = []
        for path, (subset, *_) in zip(paths, results):
            subset.relative_to_file(path).write(path)
            kill_point("select:written")
            written.append((path, subset))
        if plot_dir is not None:
            from dqtool.selection.plots import plot_patch_grid, plot_selection

            Path(plot_dir).mkdir(exist_ok=True)
            write_marker(plot_dir, "select")
            label = "uncertain" if method in MODEL_METHODS else "DQ"
            for rate, (subset, features, picked, rnd, bin_of) in zip(rates, results):
                suffix = f"_rate{rate:g}" if several else ""
                if features is None:  # uncertain without bins: no features, so no embedding
                    with PatchCache(cache_path) as cache:
                        plot_patch_grid(cache, picked, rnd, Path(plot_dir) / f"patches{suffix}.png", label=label)
                else:
                    plot_selection(cache_path, features, picked, rnd, bin_of, plot_dir, suffix=suffix, label=label)
    return written


__all__ = ["select_subset", "select_to_files", "sample_bins", "largest_remainder_quotas", "load_or_form_bins",
           "parse_memory", "features_hash", "bins_group_name", "uncertainty_sampling", "METHODS", "MODEL_METHODS", "SELECT_METHODS"]
