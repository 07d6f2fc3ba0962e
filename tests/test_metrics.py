"""Tests for evals.metrics and evals.regions: the official AU-PRO value, brute-force cross-checks and
hand-made region cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.metrics import (
    au_pro,
    au_pro_points,
    mean_table,
    o_auroc,
    p_auroc,
    pro_curve,
)
from evals.regions import false_region_rate, point_regions, region_hits, region_recall


# ------------------------------------------------------------------------------------------------------------
# Independent helpers (deliberately naive: a loop over thresholds, a loop over pairs)
# ------------------------------------------------------------------------------------------------------------
def brute_force_pro_curve(maps: list[np.ndarray], gts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve by thresholding at every distinct score, region by region (8-connected via scipy)."""
    from scipy import ndimage

    labeled = [ndimage.label(gt, structure=np.ones((3, 3)))[0] for gt in gts]
    regions = [(lab == r) for lab in labeled for r in range(1, lab.max() + 1)]
    region_maps = [i for i, lab in enumerate(labeled) for _ in range(lab.max())]
    normal_total = sum(int((lab == 0).sum()) for lab in labeled)
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        predicted = [m >= threshold for m in maps]
        false_pos = sum(int((p & (lab == 0)).sum()) for p, lab in zip(predicted, labeled))
        overlaps = [(predicted[i] & reg).sum() / reg.sum() for i, reg in zip(region_maps, regions)]
        fprs.append(false_pos / normal_total)
        pros.append(float(np.mean(overlaps)))
    return np.array(fprs + [1.0]), np.array(pros + [1.0])


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Piecewise-linear area under (x, y) for x in [0, limit], segment by segment."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        if x0 >= limit:
            break
        end = min(x1, limit)
        y_end = y0 if x1 == x0 else y0 + (y1 - y0) * (end - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_end) * (end - x0)
    return area


def pair_count_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(float((p > neg).sum()) + 0.5 * float((p == neg).sum()) for p in pos)
    return wins / (len(pos) * len(neg))


def grid_as_points(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.indices(shape)
    return np.stack([rows.ravel(), cols.ravel(), np.zeros(rows.size)], axis=1).astype(np.float64)


def random_gt(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A few rectangles, one pair touching only at a corner (8-connected, not 4-connected)."""
    gt = np.zeros(shape, dtype=np.uint8)
    gt[1:3, 1:3] = 1
    gt[3:5, 3:5] = 1  # diagonal neighbour of the first square -> same region under 8-connectivity
    r, c = rng.integers(6, shape[0] - 3), rng.integers(6, shape[1] - 3)
    gt[r : r + 2, c : c + 3] = 1
    return gt


# ------------------------------------------------------------------------------------------------------------
# AU-PRO on grids
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_au_pro_reproduces_official_self_check() -> None:
    # Value published with MVTec's evaluation script v2.0 (see /work/shared/reference/metrics.md).
    np.random.seed(1338)
    maps = [np.random.random((300, 500)) for _ in range(200)]
    gt = np.zeros((300, 500))
    gt[0:10, 0:10] = 1
    assert abs(au_pro(maps, [gt] * 200, fpr_limit=0.3) - 0.15101926603137933) < 1e-12


def test_perfect_scores_give_one_and_inverted_give_zero() -> None:
    rng = np.random.default_rng(0)
    gts = [random_gt(rng, (16, 20)) for _ in range(3)]
    noise = [rng.random(gt.shape) * 0.1 for gt in gts]
    perfect = [gt + n for gt, n in zip(gts, noise)]  # every anomalous pixel above every normal one
    assert au_pro(perfect, gts) == pytest.approx(1.0, abs=1e-12)
    assert au_pro([gt.astype(float) for gt in gts], gts) == pytest.approx(
        1.0, abs=1e-12
    )  # ties inside classes
    inverted = [-p for p in perfect]
    assert au_pro(inverted, gts) < 1e-12


def test_constant_scores_are_one_tie_group_on_the_diagonal() -> None:
    # All pixels cross the threshold together: the curve is (0,0) -> (1,1), whatever the pixel order.
    rng = np.random.default_rng(1)
    gts = [random_gt(rng, (12, 12)) for _ in range(2)]
    constant = [np.full(gt.shape, 0.7) for gt in gts]
    fpr, pro = pro_curve(constant, gts)
    np.testing.assert_array_equal(fpr, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0, 1.0], rtol=0, atol=1e-12)
    assert au_pro(constant, gts, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    assert au_pro(constant, gts, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])  # None: distinct scores; 1: many ties
def test_matches_brute_force_threshold_sweep(decimals: int | None) -> None:
    rng = np.random.default_rng(2)
    gts = [random_gt(rng, (14, 18)) for _ in range(4)]
    maps = [rng.random(gt.shape) + 0.3 * gt for gt in gts]
    if decimals is not None:
        maps = [np.round(m, decimals) for m in maps]
    fpr_ref, pro_ref = brute_force_pro_curve(maps, gts)
    fpr, pro = pro_curve(maps, gts)
    np.testing.assert_allclose(fpr, fpr_ref, rtol=0, atol=1e-7)  # the official FPR is rounded to float32
    np.testing.assert_allclose(pro, pro_ref, rtol=0, atol=1e-12)
    assert au_pro(maps, gts, fpr_limit=1.0) == pytest.approx(np.trapezoid(pro_ref, fpr_ref), abs=1e-6)
    assert au_pro(maps, gts, fpr_limit=0.3) == pytest.approx(
        area_up_to(fpr_ref, pro_ref, 0.3) / 0.3, abs=1e-6
    )


def test_au_pro_is_nan_without_regions_and_rejects_bad_input() -> None:
    maps = [np.random.default_rng(3).random((5, 5))]
    assert math.isnan(au_pro(maps, [np.zeros((5, 5))]))
    with pytest.raises(ValueError, match="NaN"):
        au_pro([np.full((5, 5), np.nan)], [np.eye(5)])
    with pytest.raises(ValueError, match="shape"):
        au_pro([np.zeros((5, 6))], [np.eye(5)])
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro(maps, [np.eye(5)], fpr_limit=0.0)


# ------------------------------------------------------------------------------------------------------------
# AU-PRO on points
# ------------------------------------------------------------------------------------------------------------
def test_point_variant_on_a_grid_equals_grid_variant() -> None:
    rng = np.random.default_rng(5)
    shape = (15, 17)
    gts = [random_gt(rng, shape) for _ in range(3)]
    maps = [rng.random(shape) + 0.25 * gt for gt in gts]
    points = [grid_as_points(shape)] * len(gts)
    scores = [m.ravel() for m in maps]
    masks = [gt.ravel().astype(bool) for gt in gts]
    for limit in (0.3, 1.0):
        expected = au_pro(maps, gts, fpr_limit=limit)
        assert au_pro_points(points, scores, masks, fpr_limit=limit, radius=1.5) == pytest.approx(
            expected, abs=1e-12
        )
    # radius 1.0 is 4-connectivity: the diagonal squares split into two regions and the number changes.
    assert au_pro_points(points, scores, masks, radius=1.0) != pytest.approx(au_pro(maps, gts), abs=1e-9)


def test_point_regions_radius_and_knn() -> None:
    line = np.stack([np.arange(30.0), np.zeros(30), np.zeros(30)], axis=1)
    mask = np.zeros(30, dtype=bool)
    mask[[3, 4, 5, 20, 21]] = True
    mask[10] = True  # isolated anomalous point
    expected = np.full(30, -1)
    expected[[3, 4, 5]] = 0
    expected[10] = 1
    expected[[20, 21]] = 2
    np.testing.assert_array_equal(point_regions(line, mask, radius=1.0), expected)
    # kNN over the whole cloud: the neighbours of point 10 are normal points, so it stays alone.
    np.testing.assert_array_equal(point_regions(line, mask, k=4), expected)
    # A huge radius links everything anomalous into one region.
    assert set(point_regions(line, mask, radius=100.0)[mask]) == {0}
    assert (point_regions(line, np.zeros(30, dtype=bool)) == -1).all()
    with pytest.raises(ValueError, match="mask"):
        point_regions(line, mask[:-1])


def test_au_pro_points_nan_when_no_anomaly() -> None:
    pts = grid_as_points((4, 4))
    assert math.isnan(au_pro_points([pts], [np.arange(16.0)], [np.zeros(16, dtype=bool)]))


# ------------------------------------------------------------------------------------------------------------
# ROC AUC
# ------------------------------------------------------------------------------------------------------------
def test_o_auroc_and_p_auroc_match_pair_count() -> None:
    rng = np.random.default_rng(6)
    scores = np.round(rng.random(40), 1)  # with ties
    labels = (rng.random(40) < 0.4).astype(int)
    assert o_auroc(scores, labels) == pytest.approx(pair_count_auc(scores, labels), abs=1e-12)

    point_scores = [np.round(rng.random(n), 2) for n in (30, 50)]
    point_masks = [rng.random(n) < 0.3 for n in (30, 50)]
    expected = pair_count_auc(np.concatenate(point_scores), np.concatenate(point_masks).astype(int))
    assert p_auroc(point_scores, point_masks) == pytest.approx(expected, abs=1e-12)


def test_auroc_nan_with_one_class_and_errors_on_bad_labels() -> None:
    assert math.isnan(o_auroc([0.1, 0.5], [0, 0]))
    assert math.isnan(p_auroc([np.array([0.2, 0.3])], [np.array([1, 1])]))
    with pytest.raises(ValueError, match="binary"):
        o_auroc([0.1, 0.5], [0, 2])
    with pytest.raises(ValueError, match="scores"):
        o_auroc([0.1], [0, 1])


# ------------------------------------------------------------------------------------------------------------
# Region metrics
# ------------------------------------------------------------------------------------------------------------
def _two_defect_line() -> tuple[np.ndarray, np.ndarray]:
    points = np.stack([np.arange(60.0), np.zeros(60), np.zeros(60)], axis=1)
    gt = np.zeros(60, dtype=bool)
    gt[10:15] = True
    gt[30:35] = True
    return points, gt


def test_region_recall_hand_made() -> None:
    points, gt = _two_defect_line()
    flagged = np.zeros(60, dtype=bool)
    flagged[12] = True  # one point in the first defect
    flagged[50] = True  # a false alarm does not change recall
    assert region_recall(points, gt, flagged, radius=1.0) == 0.5
    assert region_recall(points, gt, flagged, min_overlap=2, radius=1.0) == 0.0
    flagged[[31, 32]] = True
    assert region_recall(points, gt, flagged, min_overlap=2, radius=1.0) == 0.5
    flagged[13] = True
    assert region_recall(points, gt, flagged, min_overlap=2, radius=1.0) == 1.0
    assert math.isnan(region_recall(points, np.zeros(60, dtype=bool), flagged, radius=1.0))
    assert region_hits(points, gt, flagged, radius=1.0) == (2, 2)  # the counts a report pools over scans
    assert region_hits(points, np.zeros(60, dtype=bool), flagged, radius=1.0) == (0, 0)


def test_false_region_rate_hand_made() -> None:
    points, gt = _two_defect_line()
    flagged = [np.array([12, 13]), np.array([50, 51]), np.array([14, 15, 16]), np.array([0])]
    assert false_region_rate(points, gt, flagged) == 0.5  # [50, 51] and [0] hit nothing
    assert false_region_rate(points, gt, flagged[:1]) == 0.0
    assert math.isnan(false_region_rate(points, gt, []))
    with pytest.raises(ValueError, match="outside"):
        false_region_rate(points, gt, [np.array([60])])
    with pytest.raises(ValueError, match="non-empty"):
        false_region_rate(points, gt, [np.array([], dtype=int)])


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------
def test_mean_table_ignores_nan() -> None:
    per_class = {"bagel": {"o_auroc": 0.8, "au_pro": math.nan}, "cable": {"o_auroc": 0.6, "au_pro": 0.5}}
    means = mean_table(per_class)
    assert means["o_auroc"] == pytest.approx(0.7)
    assert means["au_pro"] == pytest.approx(0.5)
    assert math.isnan(mean_table({"a": {"x": math.nan}})["x"])
