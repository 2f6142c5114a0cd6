"""dqtool.metrics against the libraries users trust: stardist ``matching``/``matching_dataset``,
cellpose ``metrics.average_precision``, scipy/scikit-learn for the pixel scores."""

import math

import numpy as np
import pytest
from cellpose.metrics import average_precision
from hypothesis import given, settings
from scipy.spatial.distance import dice as dice_dissimilarity
from scipy.spatial.distance import jaccard as jaccard_dissimilarity
from stardist.matching import matching, matching_dataset

from dqtool.evaluation import metrics
from dqtool.common.errors import InputError
from dqtool.data.io import read_labels
from factories import label_map_pairs, touching_cells


def gapped_cells(shape, n, seed):
    return touching_cells(shape, n, seed, background="gaps", dtype=np.int32)

# cellpose's own 0/0 on empty-vs-empty (its AP is NaN there) is expected, not our warning.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

THRESHOLDS = (0.1, 0.3, 0.5, 0.55, 0.6, 0.75, 0.9)
STARDIST_FIELDS = {"tp": "tp", "fp": "fp", "fn": "fn", "precision": "precision", "recall": "recall",
                   "f1": "f1", "accuracy": "accuracy", "n_true": "n_true", "n_pred": "n_pred",
                   "mean_matched_iou": "mean_matched_score", "panoptic_quality": "panoptic_quality"}


def perturb(y, seed):
    """A plausible prediction: shifted, some cells dropped, merged, split, shrunk; a few false positives."""
    rng = np.random.default_rng(seed)
    pred = np.roll(y, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1)).astype(np.int64)
    ids = np.unique(pred)[1:]
    if ids.size < 4:
        return pred
    drop, merge, split, shrink = (rng.choice(ids, size=max(1, ids.size // 10), replace=False) for _ in range(4))
    pred[np.isin(pred, drop)] = 0
    for i in merge:
        pred[pred == i] = ids[(np.searchsorted(ids, i) + 1) % ids.size]
    top = int(pred.max())
    for k, i in enumerate(split):
        rr, cc = np.nonzero(pred == i)
        if rr.size:
            pred[rr[cc > np.median(cc)], cc[cc > np.median(cc)]] = top + 1 + k
    for i in shrink:
        mask = pred == i
        inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        pred[mask & ~inner] = 0
    h, w = y.shape
    for k in range(3):
        r, c = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        pred[r:r + 4, c:c + 4] = top + 100 + k
    return pred


def consecutive(y):
    _, inv = np.unique(y, return_inverse=True)
    return inv.reshape(y.shape).astype(np.int64)  # background 0 stays 0 when present


def assert_equals_stardist(y_true, y_pred, thresholds=THRESHOLDS, compare_iou_sums=True):
    ours = metrics.instance_scores(y_true, y_pred, thresholds)
    theirs = matching(y_true, y_pred, thresh=list(thresholds))
    for o, s in zip(ours, theirs):
        assert o.thresh == pytest.approx(s.thresh)
        for ours_key, their_key in STARDIST_FIELDS.items():
            if not compare_iou_sums and ours_key in ("mean_matched_iou", "panoptic_quality"):
                continue
            # stardist keeps IoUs in float32; counts must be identical
            assert getattr(o, ours_key) == pytest.approx(float(getattr(s, their_key)), rel=2e-6, abs=1e-7), \
                (o.thresh, ours_key)
    return ours


def assert_equals_cellpose(y_true, y_pred, thresholds=THRESHOLDS):
    """cellpose counts instances as the max id, so it is compared on consecutive ids."""
    y_true, y_pred = consecutive(y_true), consecutive(y_pred)
    ours = metrics.instance_scores(y_true, y_pred, thresholds)
    ap, tp, fp, fn = average_precision(y_true, y_pred, threshold=list(thresholds))
    for k, o in enumerate(ours):
        assert (o.tp, o.fp, o.fn) == (tp[k], fp[k], fn[k])
        if o.n_true + o.n_pred > 0:
            assert o.accuracy == pytest.approx(float(ap[k]), rel=1e-6)
        else:
            assert math.isnan(ap[k])  # cellpose: 0/0; we report instance_empty_value (0.0)


# --- instance scores ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_predictions_equal_stardist_and_cellpose(seed):
    y_true = gapped_cells((120, 150), 70, seed)
    y_pred = perturb(y_true, seed + 10)
    ours = assert_equals_stardist(y_true, y_pred)
    assert_equals_cellpose(y_true, y_pred)
    assert 0 < ours[2].tp < ours[2].n_true  # a non-trivial case


def test_real_labels_equal_stardist_and_cellpose(real_data):
    files = sorted((real_data / "cyto_ctc" / "labels").glob("HeLa_t7*.tif"))[:1] + \
        sorted((real_data / "multi_neurips" / "labels").glob("*_label.tiff"))
    assert files
    for k, path in enumerate(files):
        y_true = read_labels(path)
        y_pred = perturb(y_true, 100 + k)
        assert_equals_stardist(y_true, y_pred, (0.5, 0.75, 0.9))
        assert_equals_cellpose(y_true, y_pred, (0.5, 0.75, 0.9))


def test_tie_exactly_at_threshold():
    y_true = np.zeros((6, 8), np.uint16)
    y_true[:, :4], y_true[:, 4:] = 1, 2
    y_pred = np.full_like(y_true, 3)
    ours = assert_equals_stardist(y_true, y_pred, (0.5, 0.51))
    # stardist rounds IoUs and thresholds to float32 (0.5 + 1e-9 becomes 0.5); cellpose keeps float64
    assert_equals_cellpose(y_true, y_pred, (0.5, 0.5 + 1e-9))
    ours = metrics.instance_scores(y_true, y_pred, (0.5, 0.5 + 1e-9))
    assert (ours[0].tp, ours[0].fp, ours[0].fn, ours[0].panoptic_quality) == (1, 0, 1, pytest.approx(0.5 / 1.5))
    assert ours[1].tp == 0
    # IoU exactly 3/5 at a threshold from a range: parse_thresholds gives 0.6, not 0.6000000000000001
    a = np.zeros((1, 5), np.uint8)
    a[0, :3] = 1
    b = np.ones((1, 5), np.uint8)
    t = metrics.parse_thresholds("0.5:0.6:0.05")
    assert t == (0.5, 0.55, 0.6)
    assert metrics.instance_scores(a, b, t)[-1].tp == 1
    assert_equals_cellpose(a, b, t)


def test_non_consecutive_and_large_ids_equal_stardist():
    y_true = gapped_cells((80, 80), 30, seed=7)
    y_pred = perturb(y_true, 8)
    lut = np.zeros(y_true.max() + 1, np.int64)
    lut[1:] = 1_000_003 + 7 * np.arange(1, y_true.max() + 1) ** 2
    y_true_sparse = lut[y_true]
    y_pred_sparse = np.where(y_pred > 0, y_pred * 65_521 + 9, 0)
    ours = assert_equals_stardist(y_true_sparse, y_pred_sparse)
    assert ours == metrics.instance_scores(y_true, y_pred, THRESHOLDS)
    huge = np.where(y_true > 0, y_true.astype(np.uint64) + np.uint64(2**62), 0).astype(np.uint64)
    assert metrics.instance_scores(huge, y_pred, THRESHOLDS) == metrics.instance_scores(y_true, y_pred, THRESHOLDS)


def test_empty_images_and_all_background_predictions():
    z = np.zeros((20, 20), np.uint16)
    y = gapped_cells((20, 20), 6, seed=9)
    for pair in ((z, z), (y, z), (z, y)):
        assert_equals_stardist(*pair)
        assert_equals_cellpose(*pair)
    empty = metrics.instance_scores(z, z)[0]
    assert (empty.tp, empty.fp, empty.fn, empty.f1) == (0, 0, 0, 0.0)
    assert metrics.instance_scores(z, z, (0.5,), empty_value=1.0)[0].f1 == 1.0


def test_one_huge_instance_against_many_small():
    y_true = np.zeros((100, 100), np.int32)
    y_true[10:90, 10:90] = 1
    y_pred = np.zeros_like(y_true)
    k = 0
    for r in range(10, 90, 8):
        for c in range(10, 90, 8):
            k += 1
            y_pred[r:r + 8, c:c + 8] = k
    for pair in ((y_true, y_pred), (y_pred, y_true)):
        assert_equals_stardist(*pair)
        assert_equals_cellpose(*pair)
    y_pred[10:80, 10:90] = 500
    ours = assert_equals_stardist(y_true, y_pred)
    assert ours[THRESHOLDS.index(0.75)].tp == 1


label_maps = label_map_pairs(np.int32, max_id=5, width=10, max_height=12)


@settings(max_examples=120, deadline=None)
@given(label_maps)
def test_random_label_maps_equal_stardist_and_cellpose(pair):
    y_true, y_pred = pair
    ours = metrics.instance_scores(y_true, y_pred, THRESHOLDS)
    # Below 0.5 optimal assignments can tie and leave different IoU sums; counts are unique.
    assert_equals_stardist(y_true, y_pred, [t for t in THRESHOLDS if t >= 0.5])
    assert_equals_stardist(y_true, y_pred, THRESHOLDS, compare_iou_sums=False)
    assert_equals_cellpose(y_true, y_pred)
    for o in ours:
        assert o.tp + o.fn == o.n_true and o.tp + o.fp == o.n_pred
        assert 0.0 <= o.panoptic_quality <= o.f1 + 1e-12  # PQ = SQ * RQ with SQ <= 1


# --- pixel scores -------------------------------------------------------------------------------


def test_pixel_scores_equal_scipy_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    y_true = gapped_cells((90, 110), 40, seed=11)
    y_pred = perturb(y_true, 12)
    t, p = (y_true > 0).ravel(), (y_pred > 0).ravel()
    s = metrics.pixel_scores(y_true, y_pred)
    assert s.iou == pytest.approx(1 - jaccard_dissimilarity(t, p), rel=1e-12)
    assert s.dice == pytest.approx(1 - dice_dissimilarity(t, p), rel=1e-12)
    assert s.iou == pytest.approx(sklearn_metrics.jaccard_score(t, p), rel=1e-12)
    assert s.dice == pytest.approx(sklearn_metrics.f1_score(t, p), rel=1e-12)
    assert s.precision == pytest.approx(sklearn_metrics.precision_score(t, p), rel=1e-12)
    assert s.recall == pytest.approx(sklearn_metrics.recall_score(t, p), rel=1e-12)
    assert s.accuracy == pytest.approx(sklearn_metrics.accuracy_score(t, p), rel=1e-12)
    assert s.pq_proxy == pytest.approx(0.5 * (s.iou + s.dice), rel=1e-12)


def test_pixel_scores_small_hand_example():
    y_true = np.array([[0, 1, 1, 2], [0, 0, 2, 2]])
    y_pred = np.array([[3, 3, 0, 4], [0, 0, 0, 4]])
    # foreground: TP = 3 (0,1),(0,3),(1,3); FP = 1 (0,0); FN = 2 (0,2),(1,2); TN = 2
    s = metrics.pixel_scores(y_true, y_pred)
    assert (s.iou, s.dice, s.precision, s.recall, s.accuracy) == pytest.approx((3 / 6, 6 / 9, 3 / 4, 3 / 5, 5 / 8))


def test_pixel_empty_conventions():
    z = np.zeros((8, 8), np.uint8)
    y = np.zeros_like(z)
    y[2:4, 2:4] = 1
    assert metrics.pixel_scores(z, z).to_dict() == dict(iou=1.0, dice=1.0, precision=1.0, recall=1.0,
                                                        accuracy=1.0, pq_proxy=1.0)
    seed = metrics.pixel_scores(z, z, empty_value=0.0)
    assert (seed.iou, seed.dice, seed.pq_proxy, seed.accuracy) == (0.0, 0.0, 0.0, 1.0)
    missed = metrics.pixel_scores(y, z)
    assert (missed.iou, missed.precision, missed.recall) == (0.0, 0.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(label_maps)
def test_random_pixel_scores_equal_scipy(pair):
    y_true, y_pred = pair
    t, p = (y_true > 0).ravel(), (y_pred > 0).ravel()
    s = metrics.pixel_scores(y_true, y_pred)
    if t.any() or p.any():
        assert s.iou == pytest.approx(1 - jaccard_dissimilarity(t, p), rel=1e-12)
        assert s.dice == pytest.approx(1 - dice_dissimilarity(t, p), rel=1e-12)
    assert s.accuracy == pytest.approx(np.mean(t == p), rel=1e-12)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_named():
    good = np.zeros((4, 4), np.uint8)
    with pytest.raises(InputError, match=r"shape mismatch.*\(4, 4\).*\(4, 5\)"):
        metrics.instance_scores(good, np.zeros((4, 5), np.uint8))
    with pytest.raises(InputError, match="floating point"):
        metrics.pixel_scores(good.astype(np.float32), good)
    with pytest.raises(InputError, match="negative"):
        metrics.instance_scores(good, good.astype(np.int16) - 1)
    with pytest.raises(InputError, match="negative"):
        metrics.pixel_scores(good.astype(np.int64) - 1, good)
    with pytest.raises(InputError, match="2-D"):
        metrics.instance_scores(np.zeros((2, 4, 4), np.uint8), good)
    with pytest.raises(ValueError, match="thresholds"):
        metrics.parse_thresholds("0.5:x")
    with pytest.raises(ValueError, match="thresholds"):
        metrics.parse_thresholds("1.5")


def test_parse_thresholds_forms():
    assert metrics.parse_thresholds("0.5:0.95:0.05") == tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
    assert metrics.parse_thresholds("0.5, 0.75") == (0.5, 0.75)
    assert metrics.parse_thresholds(0.5) == (0.5,)
    assert metrics.parse_thresholds([0.5, 0.9]) == (0.5, 0.9)
    assert metrics.threshold_suffix(0.5) == "@0.50" and metrics.threshold_suffix(0.525) == "@0.525"


# --- dataset aggregation ------------------------------------------------------------------------


def dataset(n=6):
    pairs = []
    for k in range(n):
        y_true = gapped_cells((64, 80), 25, seed=20 + k)
        pairs.append((f"img{k}", "fluo" if k < 4 else "histo", y_true, perturb(y_true, 40 + k)))
    return pairs


def test_evaluate_per_image_and_summary_equal_stardist_dataset():
    pairs = dataset()
    thresholds = (0.5, 0.75)
    result = metrics.evaluate(pairs, thresholds=thresholds, workers=2)
    assert [r["name"] for r in result.per_image] == [p[0] for p in pairs]
    rows = {r["domain"]: r for r in result.summary}
    assert list(rows) == ["fluo", "histo", "all"]
    for domain, sel in (("fluo", pairs[:4]), ("histo", pairs[4:]), ("all", pairs)):
        row = rows[domain]
        assert row["n_images"] == len(sel)
        micro = matching_dataset([p[2] for p in sel], [p[3] for p in sel], thresh=list(thresholds),
                                 by_image=False, show_progress=False)
        macro = matching_dataset([p[2] for p in sel], [p[3] for p in sel], thresh=list(thresholds),
                                 by_image=True, show_progress=False)
        for t, mi, ma in zip(thresholds, micro, macro):
            sfx = metrics.threshold_suffix(t)
            assert (row["tp" + sfx], row["fp" + sfx], row["fn" + sfx]) == (mi.tp, mi.fp, mi.fn)
            for key in ("precision", "recall", "f1", "accuracy", "panoptic_quality"):
                assert row[f"micro_{key}{sfx}"] == pytest.approx(float(getattr(mi, key)), rel=2e-6)
                assert row[f"{key}{sfx}_mean"] == pytest.approx(float(getattr(ma, key)), rel=2e-6)
            assert row[f"micro_mean_matched_iou{sfx}"] == pytest.approx(float(mi.mean_matched_score), rel=2e-6)
        ious = [metrics.pixel_scores(p[2], p[3]).iou for p in sel]
        assert row["iou_mean"] == pytest.approx(np.mean(ious))
        assert row["iou_std"] == pytest.approx(np.std(ious, ddof=1))
    one = result.per_image[0]
    direct = metrics.instance_scores(pairs[0][2], pairs[0][3], thresholds)
    assert one["f1@0.50"] == direct[0].f1 and one["panoptic_quality@0.75"] == direct[1].panoptic_quality
    assert one["iou"] == metrics.pixel_scores(pairs[0][2], pairs[0][3]).iou
    assert result.to_dict()["thresholds"] == [0.5, 0.75]


def test_evaluate_collects_bad_pairs_and_scores_the_rest():
    pairs = dataset(3)
    pairs.insert(1, ("bad_shape", "fluo", np.zeros((5, 5), np.uint8), np.zeros((5, 6), np.uint8)))
    pairs.append(("bad_float", "fluo", np.zeros((5, 5), np.float32), np.zeros((5, 5), np.uint8)))
    result = metrics.evaluate(iter(pairs), on_error="collect", workers=1)
    assert [r["name"] for r in result.per_image] == ["img0", "img1", "img2"]
    assert [e[0] for e in result.errors] == ["bad_shape", "bad_float"]
    assert "bad_shape" in result.errors[0][1] and "shape mismatch" in result.errors[0][1]
    with pytest.raises(InputError, match="bad_shape"):
        metrics.evaluate(pairs, on_error="raise")


def test_single_image_std_is_nan_and_empty_dataset():
    result = metrics.evaluate(dataset(1))
    assert math.isnan(result.summary[0]["iou_std"])
    assert metrics.evaluate([]).summary == [{**metrics.evaluate([]).summary[0]}]
    assert metrics.evaluate([]).summary[0]["n_images"] == 0
