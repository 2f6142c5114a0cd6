"""The numba overlap/matching kernels against the plain NumPy reference (dense IoU + Hungarian)."""

import numpy as np
import pytest
from hypothesis import given, settings

from dqtool_kernels import matching as m
from factories import label_map_pairs, touching_cells

THRESHOLDS = (0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0)


def assert_same_overlap(a: m.Overlap, b: m.Overlap):
    for f in ("true_ids", "pred_ids", "true_sizes", "pred_sizes", "pair_true", "pair_pred", "pair_count"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.n_pixels == b.n_pixels


def assert_same_matches(got, want, sums=True):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.thresh, g.tp, g.fp, g.fn, g.n_true, g.n_pred) == (w.thresh, w.tp, w.fp, w.fn, w.n_true, w.n_pred)
        if sums:
            assert g.sum_matched_iou == pytest.approx(w.sum_matched_iou, rel=1e-12, abs=1e-12)


def check_against_reference(y_true, y_pred, thresholds=THRESHOLDS, sums=True):
    ov, got = m.match_instances(y_true, y_pred, thresholds, method="numba")
    ref_ov, want = m.match_instances(y_true, y_pred, thresholds, method="reference")
    assert_same_overlap(ov, ref_ov)
    assert_same_matches(got, want, sums)
    return ov, got


def test_touching_cells_shifted_and_damaged():
    y_true = touching_cells((96, 128), 60, seed=0)
    y_pred = np.roll(y_true, 2, axis=1)
    y_pred[y_pred == 7] = 0  # a missed cell
    y_pred[y_pred == 9] = 11  # a merge
    _, got = check_against_reference(y_true, y_pred)
    assert 0 < got[2].tp < 60


def test_identical_maps_match_everything_with_iou_one():
    y = touching_cells((64, 64), 20, seed=1)
    _, got = check_against_reference(y, y)
    n = len(np.unique(y)) - 1
    for r in got:
        assert (r.tp, r.fp, r.fn) == (n, 0, 0)
        assert r.sum_matched_iou == pytest.approx(n)


def test_ties_exactly_at_one_half():
    # B covers A1 and A2 exactly: IoU(A1, B) = IoU(A2, B) = 0.5, one match possible.
    y_true = np.zeros((4, 8), np.uint16)
    y_true[:, :4], y_true[:, 4:] = 1, 2
    y_pred = np.zeros_like(y_true)
    y_pred[:, :] = 5
    ov, got = check_against_reference(y_true, y_pred, (0.5, 0.51))
    np.testing.assert_array_equal(ov.iou, [0.5, 0.5])
    assert (got[0].tp, got[0].fp, got[0].fn, got[0].sum_matched_iou) == (1, 0, 1, 0.5)
    assert got[1].tp == 0
    # and the mirror image: one true instance tiled by two predictions
    _, got = check_against_reference(y_pred, y_true, (0.5,))
    assert (got[0].tp, got[0].fp, got[0].fn) == (1, 1, 0)


def test_non_consecutive_and_huge_ids_keep_their_ids():
    base = touching_cells((40, 50), 12, seed=2)
    ids = np.array([0] + [2**40 + 7 * k for k in range(1, 13)], np.uint64)
    y_true = ids[base]
    y_pred = np.roll(base, 1, axis=0).astype(np.uint32) * 1000 + 4_000_000_000 % 1000
    ov, got = check_against_reference(y_true, y_pred)
    np.testing.assert_array_equal(ov.true_ids, ids[np.unique(base)[1:]].astype(np.int64))
    _, plain = m.match_instances(base, np.roll(base, 1, axis=0), THRESHOLDS)
    assert_same_matches(got, plain)


def test_ids_near_uint32_max_use_the_renumbering_path():
    base = touching_cells((30, 30), 8, seed=3)
    y_true = np.where(base > 0, np.uint32(2**32 - 1) - base, 0).astype(np.uint32)
    ov, _ = check_against_reference(y_true, base)
    assert ov.true_ids.max() == 2**32 - 2


def test_empty_and_all_background():
    z = np.zeros((16, 16), np.uint8)
    y = touching_cells((16, 16), 5, seed=4)
    ov, got = check_against_reference(z, z)
    assert (ov.n_true, ov.n_pred, got[0].tp) == (0, 0, 0)
    assert ov.foreground_counts() == (0, 0, 0, 256)
    _, got = check_against_reference(y, z)
    n = len(np.unique(y)) - 1
    assert (got[0].tp, got[0].fp, got[0].fn) == (0, 0, n)
    _, got = check_against_reference(z, y)
    assert (got[0].tp, got[0].fp, got[0].fn) == (0, n, 0)
    assert m.overlap_numba(np.zeros((0, 5), np.uint16), np.zeros((0, 5), np.uint16)).n_true == 0


def test_one_huge_instance_against_many_small():
    y_true = np.zeros((60, 60), np.uint32)
    y_true[5:55, 5:55] = 1
    y_pred = np.zeros_like(y_true)
    k = 0
    for r in range(5, 55, 5):
        for c in range(5, 55, 5):
            k += 1
            y_pred[r:r + 5, c:c + 5] = k
    check_against_reference(y_true, y_pred)
    check_against_reference(y_pred, y_true)
    y_pred2 = y_pred.copy()
    y_pred2[5:45, 5:55] = 1000  # one prediction covering 80 %
    _, got = check_against_reference(y_true, y_pred2)
    assert got[THRESHOLDS.index(0.75)].tp == 1


def test_hash_table_growth_with_many_pairs():
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 600, size=(200, 200), dtype=np.uint32)
    y_pred = rng.integers(0, 600, size=(200, 200), dtype=np.uint32)
    ov, _ = check_against_reference(y_true, y_pred, (0.1, 0.5))
    assert ov.pair_count.size > 20000  # the table started at 4096 slots


def test_foreground_counts_paths_agree():
    rng = np.random.default_rng(6)
    y_true = rng.integers(0, 4, size=(50, 70), dtype=np.int32)
    y_pred = rng.integers(0, 3, size=(50, 70), dtype=np.uint16)
    got = m.foreground_counts(y_true, y_pred)
    assert got == m.foreground_counts(y_true, y_pred, method="reference")
    assert got == m.overlap_numba(y_true, y_pred).foreground_counts()
    assert sum(got) == y_true.size


def test_match_many_in_parallel_equals_one_by_one():
    pairs = [(touching_cells((48, 48), 15, s), touching_cells((48, 48), 15, s + 100)) for s in range(6)]
    serial = [m.match_instances(a, b, THRESHOLDS)[1] for a, b in pairs]
    parallel = [res[1] for res in m.match_many(pairs, THRESHOLDS, workers=3)]
    for s, p in zip(serial, parallel):
        assert_same_matches(p, s)


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="shape"):
        m.overlap_numba(np.zeros((3, 4), np.uint8), np.zeros((4, 3), np.uint8))
    with pytest.raises(ValueError, match="thresholds"):
        m.match_instances(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8), (0.0,))
    with pytest.raises(ValueError, match="method"):
        m.overlap(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8), method="cuda")


label_maps = label_map_pairs(np.uint16, max_id=6, width=9, max_height=14)


@settings(max_examples=150, deadline=None)
@given(label_maps)
def test_random_label_maps_match_reference(pair):
    y_true, y_pred = pair
    ov, got = m.match_instances(y_true, y_pred, THRESHOLDS)
    ref_ov, want = m.match_instances(y_true, y_pred, THRESHOLDS, method="reference")
    assert_same_overlap(ov, ref_ov)
    # Below 0.5 several optimal assignments can tie; the count is unique, the IoU sum may differ.
    assert_same_matches([g for g in got if g.thresh >= 0.5], [w for w in want if w.thresh >= 0.5])
    assert_same_matches(got, want, sums=False)
    for g in got:
        assert g.tp <= min(g.n_true, g.n_pred)
        assert 0.0 <= g.sum_matched_iou <= g.tp + 1e-12


def test_ids_above_the_first_per_id_arrays_take_the_exact_size_path():
    base = touching_cells((100, 100), 30, seed=8)
    y_true = np.where(base > 0, base + 5000, 0).astype(np.int32)  # > 4096, below 4 x pixels: no renumbering
    y_pred = np.roll(np.where(base > 0, base + 9000, 0), 3, axis=1).astype(np.int64)
    ov, got = check_against_reference(y_true, y_pred)
    assert ov.true_ids.min() > 5000 and ov.pred_ids.min() > 9000
    _, plain = m.match_instances(base, np.roll(base, 3, axis=1), THRESHOLDS)
    assert_same_matches(got, plain)


def test_negative_ids_are_refused_by_both_kernels():
    y = np.zeros((8, 8), np.int32)
    y[2, 2] = -3
    with pytest.raises(ValueError, match="negative"):
        m.overlap_numba(y, np.zeros_like(y))
    with pytest.raises(ValueError, match="negative"):
        m.overlap_numba(np.zeros_like(y), y)
    with pytest.raises(ValueError, match="negative"):
        m.foreground_counts(y, np.zeros_like(y))


def test_chunked_threads_equal_one_pass():
    y_true = touching_cells((1100, 1000), 40, seed=12)  # > 2^20 pixels: the chunked path runs
    y_pred = np.roll(y_true, 5, axis=0)
    one = m.overlap_numba(y_true, y_pred)
    assert_same_overlap(m.overlap_numba(y_true, y_pred, threads=3), one)
    assert_same_overlap(m.overlap_reference(y_true, y_pred), one)
    big_ids = np.where(y_true > 0, y_true + 10_000, 0)  # the exact-size second pass, chunked
    assert_same_overlap(m.overlap_numba(big_ids, y_pred, threads=2), m.overlap_numba(big_ids, y_pred))


@pytest.mark.parametrize("seed", range(6))
def test_runs_across_blocks_and_sub_blocks(seed):
    """Runs of every length (1 to a few hundred pixels) cross the 64-pixel blocks, the 8-pixel sub-blocks
    and the tail of the numba pass; the overlap must equal the reference's exactly."""
    rng = np.random.default_rng(seed)
    width = int(rng.choice([64, 67, 129, 200]))
    n = width * int(rng.integers(5, 40))
    lengths = rng.choice([1, 2, 3, 7, 8, 9, 63, 64, 65, 300], size=n)
    t = np.repeat(rng.integers(0, 9, lengths.size), lengths)[:n]
    lengths = rng.choice([1, 5, 8, 16, 64, 128], size=n)
    p = np.repeat(rng.integers(0, 7, lengths.size), lengths)[:n]
    check_against_reference(t.reshape(-1, width).astype(np.int32), p.reshape(-1, width).astype(np.int32))
