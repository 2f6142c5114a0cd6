"""Consistency kernels and scores: every path against the NumPy reference and scikit-image."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.segmentation import find_boundaries

from dqtool.ranking import consistency as C
from dqtool.data.io import read_labels
from dqtool_kernels import consistency as K
from factories import grown_seeds


def skimage_rand(u, v):
    """The definition: 1 - skimage's adapted Rand error on R with singleton background ids."""
    ur, vr = C.rand_pixels(u, v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - adapted_rand_error(ur, vr, ignore_labels=None)[0]


# ---------------------------------------------------------------- semantic kernels

def _probs(seed, rows, n, p_fg=0.5):
    rng = np.random.default_rng(seed)
    p = rng.random((rows, n)).astype(np.float32)
    p[rng.random((rows, n)) > p_fg] *= 0.5  # mostly background rows
    return p


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_semantic_counts_paths_match_reference(path):
    p_ref = _probs(1, 3, 3000)
    p_test = _probs(2, 6, 3000)
    p_test[5] = 0.0  # empty union with an empty reference row
    p_ref[2] = 0.0
    p_test[1] = p_ref[0]  # identical pair
    p_test[2, :7] = 0.5  # exactly on the threshold: background
    ref_index = np.array([0, 0, 1, 1, 2, 2])
    want = K.semantic_counts_reference(p_ref, p_test, ref_index)
    if path == "triton":
        got = K.semantic_counts_triton(p_ref, p_test, ref_index, block=256, chunk=4)
    else:
        got = K.semantic_counts(p_ref, p_test, ref_index, device="cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    assert want[0][5] == 0 and want[1][1] == 0


def test_semantic_counts_reference_by_hand():
    p = np.array([[0.9, 0.8, 0.2, 0.1, 0.6]], np.float32)
    q = np.array([[0.9, 0.3, 0.7, 0.1, 0.6]], np.float32)
    union, flips, agree = K.semantic_counts_reference(p, q, [0])
    assert union[0] == 4 and flips[0] == 2
    assert agree[0] == pytest.approx(math.sqrt(0.9 * 0.9) + math.sqrt(0.6 * 0.6), rel=1e-6)
    assert C.nhd(p.reshape(1, 5), q.reshape(1, 5)) == pytest.approx(1 - 2 / 4)
    assert C.effective_invariance(p.reshape(1, 5), q.reshape(1, 5)) == pytest.approx((0.9 + 0.6) / 4, rel=1e-6)


def test_semantic_consistency_batch_equals_single_pairs():
    rng = np.random.default_rng(3)
    models, perts, images = 2, 3, 4
    prob = rng.random((models, images, 16, 20)).astype(np.float32)
    pert = np.clip(prob[:, None] + rng.normal(0, 0.3, (models, perts, images, 16, 20)), 0, 1).astype(np.float32)
    out = C.semantic_consistency(prob[:, None], pert)
    assert out.nhd.shape == (models, perts, images)
    for m in range(models):
        for k in range(perts):
            for i in range(images):
                f, g = prob[m, i] > 0.5, pert[m, k, i] > 0.5
                union = f | g
                want_nhd = 1 - np.count_nonzero(f ^ g) / np.count_nonzero(union)
                want_ei = np.where(f & g, np.sqrt(prob[m, i].astype(float) * pert[m, k, i]), 0)[union].mean()
                assert out.nhd[m, k, i] == pytest.approx(want_nhd, abs=1e-12)
                assert out.effective_invariance[m, k, i] == pytest.approx(want_ei, rel=1e-6)
                assert out.nhd[m, k, i] == pytest.approx(C.nhd(prob[m, i], pert[m, k, i]), abs=1e-12)


def test_semantic_empty_union_is_nan_and_identical_is_one():
    zero = np.zeros((8, 8), np.float32)
    assert math.isnan(C.nhd(zero, zero)) and math.isnan(C.effective_invariance(zero, zero))
    p = np.full((8, 8), 0.9, np.float32)
    assert C.nhd(p, p) == 1.0
    assert C.effective_invariance(p, p) == pytest.approx(0.9, rel=1e-6)


def test_semantic_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        C.nhd(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="shapes differ"):
        C.semantic_consistency(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="batched"):
        C.nhd(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.float32))


# ---------------------------------------------------------------- adapted Rand

CROSS = ndimage.generate_binary_structure(2, 1)  # the 4-connected (cross) footprint


def paper_band(u):
    """The paper's band, from its definition: one-step grey dilation != grey erosion (cross footprint)."""
    return ndimage.grey_dilation(u, footprint=CROSS) != ndimage.grey_erosion(u, footprint=CROSS)


def paper_rand(u, v, band=paper_band):
    """Independent reference of the adapted Rand score, written from the definition (not through the
    project's region helper): R = (u > 0 or v > 0) minus the band of u; every background pixel of R a
    singleton (skimage's ``ignore_labels=None`` would make label 0 one big segment, its default
    ``(0,)`` would drop u's background pixels altogether); then 1 - skimage's adapted Rand error."""
    u, v = np.asarray(u, np.int64), np.asarray(v, np.int64)
    region = ((u > 0) | (v > 0)) & ~band(u)
    ur, vr = u[region], v[region]
    singletons = np.arange(1, ur.size + 1) + max(u.max(initial=0), v.max(initial=0))
    ur = np.where(ur > 0, ur, singletons)
    vr = np.where(vr > 0, vr, singletons)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - adapted_rand_error(ur, vr, ignore_labels=None)[0]


def test_boundary_band_is_dilation_not_equal_erosion():
    u = grown_seeds((40, 50), 15, seed=4)
    u[0, :5] = 99  # an instance on the image border: outside neighbours never make a band
    band = K.boundary_band_reference(u)
    np.testing.assert_array_equal(band, paper_band(u))
    np.testing.assert_array_equal(band, find_boundaries(u, connectivity=1, mode="thick"))
    assert band[u == 0].any() and band[u > 0].any()  # the outer ring and the inner boundary
    one = np.zeros((7, 7), np.int32)
    one[2:5, 2:5] = 1  # a 3x3 cell: its 8 border pixels and the 12-pixel ring around it
    assert K.boundary_band_reference(one).sum() == 8 + 12
    assert not K.boundary_band_reference(one)[3, 3]


@pytest.mark.parametrize("path", ["numpy", "cpu", "triton"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_paths_match_the_papers_band_definition(path, seed):
    u = grown_seeds((40, 52), 14, seed=seed)
    v = grown_seeds((40, 52), 12, seed=seed + 30)
    v[:6, :6] = 0  # some background of v inside u's cells, some v cells over u's background
    if path == "triton":
        got = K.rand_pair_counts_triton(u, v, block=1024)
    else:
        got = K.rand_pair_counts(u, v, device=path)
    assert got == K.rand_pair_counts_reference(u, v)
    assert C._rand_score(*got) == pytest.approx(paper_rand(u, v), abs=1e-9)


@pytest.mark.parametrize("device", ["numpy", "cpu", "triton"])
def test_growing_or_shrinking_every_cell_by_one_pixel_scores_one(device):
    from skimage.segmentation import expand_labels

    u = grown_seeds((48, 60), 10, seed=5, hole=0.0)
    grown = expand_labels(u, 1)  # every cell one pixel (4-neighbour) larger, into the background
    shrunk = np.where(find_boundaries(u, connectivity=1, mode="inner"), 0, u)
    assert (grown > 0).sum() > (u > 0).sum() > (shrunk > 0).sum()
    for v in (grown, shrunk):
        got = C.adapted_rand(u, v, device=device)
        assert got == pytest.approx(1.0, abs=1e-12)
        assert got == pytest.approx(paper_rand(u, v), abs=1e-12)
    # the inner band alone (before issue 13) penalised the grown cells on their new ring
    inner = lambda lab: find_boundaries(lab, connectivity=1, mode="inner")  # noqa: E731
    assert paper_rand(u, grown, band=inner) < 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_paths_match_reference_and_skimage(seed):
    u = grown_seeds((48, 64), 20, seed=seed)
    v = grown_seeds((48, 64), 16, seed=seed + 10)
    want = K.rand_pair_counts_reference(u, v)
    assert K.rand_pair_counts(u, v, device="cpu") == want
    assert K.rand_pair_counts_triton(u, v, block=1024) == want
    assert C.adapted_rand(u, v) == pytest.approx(skimage_rand(u, v), abs=1e-9)


def test_rand_numba_hash_grows_and_sparse_ids():
    # many fragmented pairs force the hash table to rehash; huge ids force compaction
    rng = np.random.default_rng(5)
    u = rng.integers(0, 60, (64, 64)).astype(np.int64)
    u = np.repeat(np.repeat(u, 2, 0), 2, 1)  # 2x2 blocks so the band does not cover everything
    v = rng.integers(0, 60, (128, 128)).astype(np.int64)
    want = K.rand_pair_counts_reference(u, v)
    assert K.rand_pair_counts_numba(u, v) == want
    big_u, big_v = u * 10_000_019, v * 7_000_003
    assert K.rand_pair_counts_numba(big_u, big_v) == want
    assert C.adapted_rand(u, v) == pytest.approx(skimage_rand(u, v), abs=1e-9)


@pytest.mark.parametrize("threads", [1, 2, 3, 7, 200])
def test_rand_numba_bands_of_rows_merge_exactly(threads):
    # instances span the band borders (rows of a band read the rows above and below it); more bands
    # than rows clamps to one band per row
    u = grown_seeds((150, 90), 40, seed=11)
    v = np.roll(grown_seeds((150, 90), 35, seed=12), 3, axis=0)
    want = K.rand_pair_counts_reference(u, v)
    assert K.rand_pair_counts_numba(u, v, threads=threads) == want
    assert K.rand_pair_counts_numba(u[:1], v[:1], threads=threads) == K.rand_pair_counts_reference(u[:1], v[:1])
    with pytest.raises(ValueError, match="threads"):
        K.rand_pair_counts_numba(u, v, threads=0)


def test_rand_triton_on_label_dtypes_and_singletons():
    u = grown_seeds((30, 34), 8, seed=6).astype(np.uint16)
    v = np.zeros_like(u)
    v[5:20, 5:25] = 3  # one big perturbed blob, most of R is background in one map or the other
    assert K.rand_pair_counts_triton(u, v) == K.rand_pair_counts_reference(u, v)
    assert C.adapted_rand(u, v) == pytest.approx(skimage_rand(u, v), abs=1e-9)


def test_rand_identical_maps_score_one_and_empty_is_nan():
    u = grown_seeds((32, 32), 6, seed=7)
    assert C.adapted_rand(u, u) == pytest.approx(1.0)
    empty = np.zeros((16, 16), np.int32)
    assert math.isnan(C.adapted_rand(empty, empty))
    for device in ("cpu", "numpy", "triton"):
        assert K.rand_pair_counts(empty, empty, device=device) == (0, 0, 0)


def test_rand_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        C.adapted_rand(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match="integers"):
        C.adapted_rand(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        C.adapted_rand(-np.ones((4, 4), np.int32), np.zeros((4, 4), np.int32))


def test_rand_on_real_labels_matches_skimage(real_data):
    from scipy import ndimage

    path = sorted((real_data / "cyto_ctc" / "labels").glob("*.tif"))[0]
    u = read_labels(path)
    # a plausible "perturbed" prediction: shifted by one pixel, smaller cells, one cell split
    v = ndimage.shift(u, (1, -1), order=0)
    v = np.where(ndimage.binary_erosion(v > 0, iterations=1), v, 0).astype(np.uint32)
    ids = np.unique(u)[1:]
    cell = u == ids[len(ids) // 2]
    v[cell & (np.arange(u.shape[1])[None, :] % 2 == 0)] = v.max() + 1
    got = C.adapted_rand(u, v)
    assert got == pytest.approx(skimage_rand(u, v), abs=1e-9)
    assert 0.3 < got < 1.0
    assert K.rand_pair_counts(u, v, device="cpu") == K.rand_pair_counts_reference(u, v)


def test_adapted_rand_batch():
    us = [grown_seeds((24, 24), 5, seed=s) for s in range(3)]
    vs = [grown_seeds((24, 24), 5, seed=s + 20) for s in range(3)]
    got = C.adapted_rand_batch(us, vs)
    np.testing.assert_allclose(got, [skimage_rand(u, v) for u, v in zip(us, vs)], atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 12))
def test_rand_property_matches_skimage(seed, n_u, n_v):
    u = grown_seeds((20, 24), n_u, seed=seed, radius=3)
    v = grown_seeds((20, 24), n_v, seed=seed + 1, radius=3)
    got = C.adapted_rand(u, v)
    want = skimage_rand(u, v)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-9)
        assert got == pytest.approx(paper_rand(u, v), abs=1e-9)
        assert 0.0 <= got <= 1.0


def test_semantic_consistency_torch_input_on_the_triton_path():
    import torch

    rng = np.random.default_rng(8)
    prob = rng.random((2, 16, 16)).astype(np.float32)
    pert = rng.random((3, 2, 16, 16)).astype(np.float32)
    want = C.semantic_consistency(prob[None], pert, device="numpy")
    got = C.semantic_consistency(torch.from_numpy(prob[None]), torch.from_numpy(pert), device="triton")
    np.testing.assert_allclose(got.nhd, want.nhd, atol=1e-12)
    np.testing.assert_allclose(got.effective_invariance, want.effective_invariance, rtol=1e-5)
    np.testing.assert_array_equal(got.union, want.union)


def test_rand_uint64_and_uint32_labels():
    u = grown_seeds((24, 28), 6, seed=9)
    v = grown_seeds((24, 28), 5, seed=19)
    want = K.rand_pair_counts_reference(u, v)
    for dtype in (np.uint16, np.uint32, np.uint64, np.int64):
        assert K.rand_pair_counts_numba(u.astype(dtype), v.astype(dtype)) == want
