"""Bins stored in the cache, eq. 2 sampling with largest-remainder rounding, the random baseline, coverage,
the Subset record and its file, and export, on small caches built with the real cache builder."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqtool.common.errors import InputError
from dqtool.data.cache import PatchCache
from dqtool.data.cache_build import build_cache_from_arrays
from dqtool.features.store import load_features
from dqtool.selection import quantize as sel
from dqtool.selection.coverage import coverage, coverage_reference
from dqtool.selection.subsets import Subset, export_subset, random_subset, subset_total
from dqtool_kernels.quantization import form_bins_reference
from factories import noise_cache as _make_cache
from factories import store_features as _with_features


@pytest.fixture()
def cache(tmp_path):
    path = _make_cache(tmp_path / "c.h5")
    with PatchCache(path) as c:
        n = len(c)
    feats = np.random.default_rng(1).normal(size=(n, 12)).astype(np.float32)
    return _with_features(path, feats)


# ---------------------------------------------------------------------------------------------- rounding


def test_subset_total_rounds_halves_up_on_the_written_decimal():
    assert subset_total(10, 0.1) == 1
    assert subset_total(10, 0.25) == 3     # 2.5 -> 3
    assert subset_total(3, 0.5) == 2       # 1.5 -> 2
    assert subset_total(100, 0.29) == 29   # 0.29 * 100 is 28.999... in binary
    assert subset_total(7, 1.0) == 7


def test_largest_remainder_example():
    # exact shares 2.5, 2.5, 1.5, 1.25 -> floors 2, 2, 1, 1 (6); total round(7.75) = 8: two more go to the
    # largest remainders 0.5, 0.5, 0.5 -> ties to the lower bins 0 and 1
    np.testing.assert_array_equal(sel.largest_remainder_quotas([10, 10, 6, 5], 0.25), [3, 3, 1, 1])
    np.testing.assert_array_equal(sel.largest_remainder_quotas([5, 5, 5, 4, 4], 0.1), [1, 1, 0, 0, 0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(1, 1000))
def test_largest_remainder_properties(sizes, permille):
    rate = permille / 1000
    q = sel.largest_remainder_quotas(sizes, rate)
    assert q.sum() == math.floor(rate * sum(sizes) + 0.5 + 1e-9)
    for qi, s in zip(q, sizes):
        assert 0 <= qi <= s
        assert math.floor(rate * s + 1e-9) <= qi <= math.floor(rate * s + 1e-9) + 1


# ---------------------------------------------------------------------------------------------- sampling


def test_sample_bins_random_draws_quota_per_bin_with_seed():
    bins = [np.arange(0, 12), np.arange(12, 23), np.arange(23, 30)]
    a = sel.sample_bins(bins, 0.3, seed=4)
    quotas = sel.largest_remainder_quotas([12, 11, 7], 0.3)
    assert [int(np.isin(a, b).sum()) for b in bins] == quotas.tolist()
    assert np.array_equal(a, np.sort(a)) and len(set(a.tolist())) == len(a)
    assert np.array_equal(a, sel.sample_bins(bins, 0.3, seed=4))
    draws = {tuple(sel.sample_bins(bins, 0.3, seed=s)) for s in range(6)}
    assert len(draws) > 1


def test_sample_bins_first_reproduces_seed_code():
    bins = [np.array([5, 1, 9, 2]), np.array([0, 7, 3]), np.array([4, 8])]
    got = sel.sample_bins(bins, 0.4, sampling="first")
    # k = max(1, int(len * rate)): 1, 1, 1 -> the first of each bin in greedy order
    assert got.tolist() == [0, 4, 5]
    assert sel.sample_bins(bins, 1.0, sampling="first").tolist() == sorted(np.concatenate(bins).tolist())


def test_random_subset():
    a = random_subset(50, 7, seed=3)
    assert len(a) == 7 and len(set(a.tolist())) == 7 and a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, random_subset(50, 7, seed=3))
    assert random_subset(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_parse_memory():
    assert sel.parse_memory("512MB") == 512 * 10**6
    assert sel.parse_memory("2GiB") == 2 << 30
    assert sel.parse_memory(1000) == 1000
    assert sel.parse_memory(None) == 1 << 30
    with pytest.raises(InputError):
        sel.parse_memory("lots")


# ---------------------------------------------------------------------------------------------- coverage


def test_coverage_against_reference():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(80, 9)).astype(np.float32)
    picks = [3, 17, 40, 41, 79]
    got, want = coverage(f, picks), coverage_reference(f, picks)
    assert got.n_selected == want.n_selected == 5
    assert got.covering_radius == pytest.approx(want.covering_radius, rel=1e-9)
    assert got.mean_distance == pytest.approx(want.mean_distance, rel=1e-9)
    full = coverage(f, np.arange(80))
    assert full.covering_radius == 0 and full.mean_distance == 0


# ---------------------------------------------------------------------------------------------- the subset


def test_select_subset_end_to_end(cache):
    feats = load_features(cache)
    n = len(feats)
    s = sel.select_subset(cache, 0.1, bins=4)
    assert isinstance(s, Subset)
    idx = s.index_array()
    assert idx.tolist() == sorted(set(idx.tolist())) and idx.min() >= 0 and idx.max() < n
    assert len(idx) == subset_total(n, 0.1) and s.n_total == n == len(feats) and s.n_selected == len(idx)
    # the bins are eq. 1 exactly (independent float64 reference) and each index carries its bin
    ref = form_bins_reference(feats, 4, "paper")
    bin_of = np.empty(n, int)
    for b, members in enumerate(ref):
        bin_of[members] = b
    assert list(s.bins) == bin_of[idx].tolist()
    assert [int(np.isin(idx, b).sum()) for b in ref] == sel.largest_remainder_quotas([len(b) for b in ref],
                                                                                       0.1).tolist()
    assert s.coverage["dq"] == coverage(feats, idx).to_dict()
    assert s.config["bins_reused"] is False and s.config["seed"] == 0


def test_bins_are_stored_and_reused(cache):
    a = sel.select_subset(cache, 0.2, bins=3, seed=1)
    b = sel.select_subset(cache, 0.05, bins=3, seed=1)
    assert b.config["bins_reused"] is True and b.config["bins_group"] == a.config["bins_group"]
    with PatchCache(cache) as c:
        assert a.config["bins_group"] in c.group_names()
    c2 = sel.select_subset(cache, 0.2, bins=3, gain="biomedseg")
    assert c2.config["bins_group"] != a.config["bins_group"]


def test_changed_features_invalidate_bins(cache):
    a = sel.select_subset(cache, 0.2, bins=3)
    feats = load_features(cache)
    _with_features(cache, feats[::-1].copy())
    b = sel.select_subset(cache, 0.2, bins=3)
    assert b.config["bins_reused"] is False and b.features_hash != a.features_hash


def test_random_method_and_rate_extremes(cache):
    n = len(load_features(cache))
    dq = sel.select_subset(cache, 0.3, bins=2, seed=5)
    rnd = sel.select_subset(cache, 0.3, bins=2, seed=5, method="random")
    assert rnd.n_selected == dq.n_selected
    assert list(rnd.indices) == random_subset(n, dq.n_selected, 5).tolist()
    assert list(sel.select_subset(cache, 1.0, bins=2).indices) == list(range(n))
    with pytest.raises(InputError, match="0 of"):
        sel.select_subset(cache, 0.1 / n)
    first = sel.select_subset(cache, 0.1, bins=2, sampling="first")
    assert first.config["sampling"] == "first"


def test_kcenter_method_is_the_farthest_first_traversal_of_the_subset_size(cache):
    from dqtool_kernels.kcenter import kcenter_reference

    feats = load_features(cache)
    n = len(feats)
    dq = sel.select_subset(cache, 0.3, bins=2, seed=5)
    kc = sel.select_subset(cache, 0.3, bins=2, seed=5, method="kcenter")
    assert kc.method == "kcenter" and kc.n_selected == dq.n_selected
    assert list(kc.indices) == sorted(kcenter_reference(feats, dq.n_selected).tolist())
    assert set(kc.coverage) == {"dq", "random", "kcenter"}
    assert kc.coverage["kcenter"]["covering_radius"] <= kc.coverage["random"]["covering_radius"] + 1e-9
    assert list(sel.select_subset(cache, 0.3, bins=2, seed=9, method="kcenter").indices) == list(kc.indices)
    assert list(sel.select_subset(cache, 1.0, bins=2, method="kcenter").indices) == list(range(n))
    with pytest.raises(InputError, match="0 of"):
        sel.select_subset(cache, 0.1 / n, method="kcenter")


@pytest.mark.parametrize("kwargs, match", [({"rate": 0}, "rate"), ({"rate": 1.5}, "rate"),
                                           ({"rate": 0.1, "bins": 0}, "bins"), ({"rate": 0.1, "bins": 10**6}, "bins"),
                                           ({"rate": 0.1, "gain": "x"}, "gain"),
                                           ({"rate": 0.1, "method": "x"}, "method")])
def test_bad_options(cache, kwargs, match):
    with pytest.raises(InputError, match=match):
        sel.select_subset(cache, **kwargs)


def test_missing_and_bad_features(tmp_path):
    path = _make_cache(tmp_path / "c.h5")
    with pytest.raises(InputError, match="dqtool embed"):
        sel.select_subset(path, 0.1)
    with PatchCache(path) as c:
        n, chash = len(c), c.content_hash
        feats = np.zeros((n, 4), np.float32)
        feats[2, 1] = np.nan
        c.write_group("features", {"features": feats}, {"cache_hash": chash, "encoder_hash": "x"})
    with pytest.raises(InputError, match="NaN"):
        sel.select_subset(path, 0.1)


def test_empty_cache(tmp_path):
    path = build_cache_from_arrays(tmp_path / "e.h5", [np.zeros((8, 8), np.uint8)], None, ["tiny"], size=16,
                                   stride=8)
    with pytest.raises(InputError):
        sel.select_subset(path, 0.1)


def test_unlabelled_cache_selects_and_exports(tmp_path):
    path = _make_cache(tmp_path / "u.h5", labels=False)
    with PatchCache(path) as c:
        n = len(c)
    _with_features(path, np.random.default_rng(2).normal(size=(n, 5)).astype(np.float32))
    out = tmp_path / "s.json"
    sel.select_subset(path, 0.2, bins=2).write(out)
    csv_path = export_subset(out, tmp_path / "exp")
    files = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert "000_img.png" in files and not any(f.endswith("_masks.png") for f in files)
    assert len(csv_path.read_text().strip().splitlines()) == subset_total(n, 0.2) + 1


def test_export_cellpose_layout(cache, tmp_path):
    from dqtool.data.io import read_image

    out = tmp_path / "s.json"
    subset = sel.select_subset(cache, 0.2, bins=2)
    subset.write(out)
    csv_path = export_subset(out, tmp_path / "exp")
    rows = csv_path.read_text().strip().splitlines()
    assert rows[0].startswith("image,masks,patch_index,bin,domain,source,y,x")
    first = subset.indices[0]
    assert rows[1].split(",")[:3] == ["000_img.png", "000_masks.png", str(first)]
    with PatchCache(cache) as c:
        np.testing.assert_array_equal(read_image(tmp_path / "exp" / "000_img.png"), c.images([first])[0][..., 0])
        np.testing.assert_array_equal(read_image(tmp_path / "exp" / "000_masks.png"), c.labels([first])[0])
        y, x = c.offsets[first]
        assert rows[1].split(",")[6:8] == [str(y), str(x)]


def test_subset_read_checks(cache, tmp_path):
    out = tmp_path / "s.json"
    subset = sel.select_subset(cache, 0.2, bins=2)
    subset.write(out)
    assert Subset.read(out, cache) == subset
    bad = json.loads(subset.to_json())
    bad["indices"].append(10**6)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"bad\.json.*1000000"):
        Subset.read(tmp_path / "bad.json", cache)
    Subset.from_json(subset.to_json().replace(subset.cache_hash, "0" * 64)).write(tmp_path / "other.json")
    with pytest.raises(InputError, match="another cache"):
        Subset.read(tmp_path / "other.json", cache)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match=r"junk\.json.*JSON"):
        Subset.read(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError, match="missing"):
        Subset.read(tmp_path / "missing.json")
    with pytest.raises(InputError, match="outside"):
        export_subset(tmp_path / "bad.json", tmp_path / "exp2")


@pytest.mark.parametrize("text, match", [("[1, 2]", "'indices' list"), ('{"bins": []}', "'indices' list"),
                                         ('{"indices": [1, 2.5]}', "integers"),
                                         ('{"indices": [1, true]}', "integers"),
                                         ('{"indices": [1], "bins": "x"}', "bins")])
def test_subset_from_json_refuses(text, match):
    with pytest.raises(InputError, match=match):
        Subset.from_json(text, "s.json")


def test_subset_refuses_repeated_indices_naming_the_index(cache, tmp_path):
    """A repeated patch index would train on that patch twice; the old readers let it through."""
    path = tmp_path / "dup.json"
    path.write_text(json.dumps({"indices": [0, 3, 5, 3], "rate": 0.1}))
    with pytest.raises(InputError, match=r"dup\.json: patch index 3 appears more than once"):
        Subset.read(path, cache)


def test_subset_json_bytes_and_field_order():
    """The subset file: the fields in this order, one-space indent, a final newline (``dqtool select``'s bytes)."""
    s = Subset(indices=np.array([2, 7]), bins=[1, 0], rate=0.1, method="dq", n_total=20, cache="c.h5",
               cache_hash="ab", features_hash="cd", config={"seed": 0}, coverage=None)
    assert s.indices == (2, 7) and s.n_selected == 2 and s.version == 1
    want = ('{\n "version": 1,\n "indices": [\n  2,\n  7\n ],\n "bins": [\n  1,\n  0\n ],\n "rate": 0.1,\n'
            ' "method": "dq",\n "n_total": 20,\n "n_selected": 2,\n "cache": "c.h5",\n "cache_hash": "ab",\n'
            ' "features_hash": "cd",\n "config": {\n  "seed": 0\n },\n "coverage": null\n}\n')
    assert s.to_json() == want
    assert Subset.from_json(want) == s


def test_subset_reads_a_hand_written_file():
    """Only ``indices`` is needed; n_selected is derived, keys of older files (``seed``) are passed over."""
    s = Subset.from_json(json.dumps({"indices": [4, 1], "n_selected": 99, "seed": 3}))
    assert s.indices == (4, 1) and s.n_selected == 2 and s.version is None and s.bins is None
    assert s.config is None and s.cache_hash is None


def test_selection_package_reexports_subsets():
    import dqtool.selection as selection

    assert selection.Subset is Subset and selection.random_subset is random_subset
    assert selection.subset_total is subset_total and selection.export_subset is export_subset


def test_pca_is_deterministic_and_orthogonal():
    from dqtool.selection.plots import pca_2d

    f = np.random.default_rng(0).normal(size=(40, 6)) * np.array([5, 3, 1, 1, 1, 1])
    a, b = pca_2d(f), pca_2d(f.copy())
    assert np.array_equal(a, b)
    assert abs(np.dot(a[:, 0], a[:, 1])) < 1e-8 * np.abs(a).sum() ** 2
    assert a[:, 0].var() >= a[:, 1].var()
