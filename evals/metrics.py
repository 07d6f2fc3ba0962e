"""Detection and localisation metrics for images (MVTec grids) and point clouds.

The PRO curve follows MVTec's official evaluation script v2.0 (BSD-3) step for step, so grid numbers match the
published evaluation to ~1e-12 (see /work/shared/reference/metrics.md): ground-truth regions are connected
components,
all scores are sorted in descending order, per-pixel false-positive and per-region overlap increments are
accumulated,
tied scores keep only the last point of their threshold, values are clipped to <= 1, (0,0) and (1,1) are added
and the
curve is integrated with the trapezoid rule up to the FPR limit (interpolating linearly at the cut-off).

Grids and point clouds share one accumulation (`pro_curve_from_regions`); only the way regions are found
differs:
`scipy.ndimage.label` with a 3x3 structure on grids, connected components of a kNN or radius graph on the
anomalous
points of a cloud (`point_regions`). Region ids use one convention everywhere: -1 = normal, 0..R-1 = anomalous
region.

Region recall and false alarms of the agent's regions live in evals.regions.
"""

from __future__ import annotations

import math
from bisect import bisect
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from evals.regions import as_binary, as_mask, as_points, point_regions

__all__ = [
    "au_pro",
    "au_pro_points",
    "grid_regions",
    "mean_table",
    "o_auroc",
    "p_auroc",
    "pro_curve",
    "pro_curve_from_regions",
    "pro_curve_points",
    "trapezoid",
]

# 8-connectivity on image grids, as in the official script.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ------------------------------------------------------------------------------------------------------------
# Regions
# ------------------------------------------------------------------------------------------------------------
def grid_regions(ground_truth: np.ndarray) -> np.ndarray:
    """Region id per pixel of a 2-D ground-truth map (-1 = normal), 8-connected like MVTec's script."""
    gt = np.asarray(ground_truth)
    if gt.ndim != 2:
        raise ValueError(f"ground-truth map must be 2-D, got shape {gt.shape}")
    labeled, _ = ndimage.label(gt, structure=_EIGHT_CONNECTED)
    return labeled.astype(np.int64) - 1


# ------------------------------------------------------------------------------------------------------------
# PRO curve (shared exact accumulation)
# ------------------------------------------------------------------------------------------------------------
def pro_curve_from_regions(
    scores_list: Sequence[np.ndarray], regions_list: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) from scores and region ids (-1 = normal) of every sample, pooled.

    Mirrors MVTec's script v2.0, including its float32 rounding of the FPR (counts are cast to float32 before
    the
    division): that is what makes our numbers equal the official ones to ~1e-12 rather than ~1e-8. The
    official
    script argsorts all scores and keeps the last point of each tie group; we sort the scores once and count
    what
    lies at or above each distinct score, which gives the same points (and sums the overlap increments in the
    same
    descending order) at a fraction of the memory traffic. Raises ValueError when the curve is undefined (no
    anomalous region or no normal element in the whole set).
    """
    if len(scores_list) != len(regions_list):
        raise ValueError(f"got {len(scores_list)} score arrays but {len(regions_list)} region arrays")
    if len(scores_list) == 0:
        raise ValueError("no samples given")

    flat_scores: list[np.ndarray] = []
    anomalous_scores: list[np.ndarray] = []
    anomalous_weights: list[np.ndarray] = []
    num_normal = 0
    num_regions = 0
    for index, (scores, regions) in enumerate(zip(scores_list, regions_list)):
        scores = np.asarray(scores, dtype=np.float64)
        regions = np.asarray(regions)
        if scores.shape != regions.shape:
            raise ValueError(f"sample {index}: scores shape {scores.shape} != regions shape {regions.shape}")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"sample {index}: scores contain NaN or inf")
        scores, regions = scores.ravel(), regions.ravel().astype(np.int64, copy=False)
        in_region = regions >= 0
        region_ids = regions[in_region]
        n_sample_regions = int(region_ids.max()) + 1 if region_ids.size else 0
        sizes = np.bincount(region_ids, minlength=n_sample_regions)
        if np.any(sizes == 0):
            raise ValueError(f"sample {index}: region ids must be 0..R-1 without gaps")
        flat_scores.append(scores)
        anomalous_scores.append(scores[in_region])
        # An element of a region raises that region's overlap by 1/size when the threshold passes it.
        anomalous_weights.append(1.0 / sizes[region_ids])
        num_normal += scores.size - region_ids.size
        num_regions += n_sample_regions
    if num_regions == 0:
        raise ValueError("PRO is undefined: no anomalous region in any sample")
    if num_normal == 0:
        raise ValueError("PRO is undefined: no normal element in any sample")

    # One curve point per distinct score t, in descending t, holding everything with score >= t: that is the
    # official
    # "sort descending, cumsum, keep the last point of each tie group", computed without a full-size argsort.
    ascending = np.sort(np.concatenate(flat_scores))
    del flat_scores
    n_total = ascending.size
    is_group_start = np.empty(n_total, dtype=bool)
    is_group_start[0] = True
    np.not_equal(ascending[1:], ascending[:-1], out=is_group_start[1:])
    group_start = np.flatnonzero(is_group_start)
    del is_group_start
    thresholds = ascending[group_start]  # distinct scores, ascending
    del ascending
    n_at_or_above = n_total - group_start[::-1]  # descending thresholds from here on
    del group_start

    # Overlap increments are summed in descending score order, like the official cumsum (normal elements add
    # 0.0).
    a_scores = np.concatenate(anomalous_scores)
    a_order = np.argsort(a_scores, kind="stable")[::-1]
    overlap_sum = np.concatenate(([0.0], np.cumsum(np.concatenate(anomalous_weights)[a_order])))
    anomalous_per_threshold = np.bincount(np.searchsorted(thresholds, a_scores), minlength=thresholds.size)
    n_anomalous_at_or_above = np.cumsum(anomalous_per_threshold[::-1])
    del thresholds, anomalous_per_threshold

    # float32 counts divided in float64 (numpy promotes against the int64 total) then stored as float32.
    false_positives = n_at_or_above - n_anomalous_at_or_above
    del n_at_or_above
    fpr = false_positives.astype(np.float32).astype(np.float64)
    del false_positives
    fpr /= num_normal
    fpr = fpr.astype(np.float32)
    pro = overlap_sum[n_anomalous_at_or_above]
    pro /= num_regions
    np.minimum(fpr, 1.0, out=fpr)
    np.minimum(pro, 1.0, out=pro)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under y(x) for ascending x up to ``x_max``, interpolating y linearly at the cut-off (MVTec
    style)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            insert_at = bisect(x, x_max)
            if not 0 < insert_at < len(x):
                raise ValueError(f"x_max={x_max} lies outside the curve's x range [{x.min()}, {x.max()}]")
            x0, x1, y0, y1 = x[insert_at - 1], x[insert_at], y[insert_at - 1], y[insert_at]
            y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_at_max + y0) * (x_max - x0)
        inside = x <= x_max
        x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _area_under_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    return trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def pro_curve(
    anomaly_maps: Sequence[np.ndarray], ground_truth_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) over 2-D anomaly maps and their binary ground-truth maps."""
    if len(anomaly_maps) != len(ground_truth_maps):
        raise ValueError(
            f"got {len(anomaly_maps)} anomaly maps but {len(ground_truth_maps)} ground-truth maps"
        )
    return pro_curve_from_regions(list(anomaly_maps), [grid_regions(gt) for gt in ground_truth_maps])


def au_pro(
    anomaly_maps: Sequence[np.ndarray], ground_truth_maps: Sequence[np.ndarray], fpr_limit: float = 0.3
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` on image grids (1.0 = perfect).

    Returns nan (instead of raising) when no map has an anomalous region or no pixel is normal: a class
    without
    defective test samples then shows up as a gap in a table rather than aborting a whole benchmark run.
    """
    _check_fpr_limit(fpr_limit)
    regions = [grid_regions(gt) for gt in ground_truth_maps]
    if len(anomaly_maps) != len(regions):
        raise ValueError(f"got {len(anomaly_maps)} anomaly maps but {len(regions)} ground-truth maps")
    return _au_pro_from_regions(list(anomaly_maps), regions, fpr_limit)


def pro_curve_points(
    points_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    *,
    radius: float | None = None,
    k: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) over point clouds; regions as in `point_regions`."""
    return pro_curve_from_regions(*_scores_and_point_regions(points_list, scores_list, masks_list, radius, k))


def au_pro_points(
    points_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    *,
    radius: float | None = None,
    k: int = 8,
) -> float:
    """AU-PRO over point clouds: the grid metric with regions = connected anomalous points (see
    `point_regions`).

    Returns nan when undefined (no anomalous region or no normal point in the set), like `au_pro`.
    """
    _check_fpr_limit(fpr_limit)
    scores, regions = _scores_and_point_regions(points_list, scores_list, masks_list, radius, k)
    return _au_pro_from_regions(scores, regions, fpr_limit)


def _au_pro_from_regions(scores: list[np.ndarray], regions: list[np.ndarray], fpr_limit: float) -> float:
    if len(scores) == 0:
        raise ValueError("no samples given")
    has_region = any(np.any(np.asarray(r) >= 0) for r in regions)
    has_normal = any(np.any(np.asarray(r) < 0) for r in regions)
    if not (has_region and has_normal):
        return math.nan
    fpr, pro = pro_curve_from_regions(scores, regions)
    return _area_under_pro(fpr, pro, fpr_limit)


def _scores_and_point_regions(
    points_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    radius: float | None,
    k: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not len(points_list) == len(scores_list) == len(masks_list):
        raise ValueError(
            f"got {len(points_list)} point sets, {len(scores_list)} score arrays and {len(masks_list)} masks"
        )
    scores_out, regions_out = [], []
    for index, (points, scores, mask) in enumerate(zip(points_list, scores_list, masks_list)):
        pts = as_points(points, f"sample {index} points")
        scores_out.append(_as_scores(scores, len(pts), f"sample {index} scores"))
        regions_out.append(
            point_regions(pts, as_mask(mask, len(pts), f"sample {index} mask"), radius=radius, k=k)
        )
    return scores_out, regions_out


# ------------------------------------------------------------------------------------------------------------
# ROC AUC
# ------------------------------------------------------------------------------------------------------------
def o_auroc(object_scores: Sequence[float] | np.ndarray, object_labels: Sequence[int] | np.ndarray) -> float:
    """Object-level ROC AUC (label 1 = anomalous).

    Returns nan, not an error, when only one class is present: ROC AUC is undefined then, and a benchmark over
    many
    classes (or a small smoke subset) must still produce the rest of its table.
    """
    scores = np.asarray(object_scores, dtype=np.float64).ravel()
    labels = np.asarray(object_labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"got {scores.size} object scores but {labels.size} labels")
    return _auroc(scores, as_binary(labels, "object labels"), "object scores")


def p_auroc(scores_list: Sequence[np.ndarray], masks_list: Sequence[np.ndarray]) -> float:
    """Point-level ROC AUC pooled over all points of all samples of a class.

    Returns nan when all pooled points are normal (or all anomalous): the AUC is undefined, see `o_auroc`.
    """
    if len(scores_list) != len(masks_list):
        raise ValueError(f"got {len(scores_list)} score arrays but {len(masks_list)} masks")
    if len(scores_list) == 0:
        raise ValueError("no samples given")
    scores, labels = [], []
    for index, (s, m) in enumerate(zip(scores_list, masks_list)):
        s = np.asarray(s, dtype=np.float64).ravel()
        labels.append(as_mask(np.asarray(m).ravel(), s.size, f"sample {index} mask"))
        scores.append(s)
    return _auroc(np.concatenate(scores), np.concatenate(labels), "point scores")


def _auroc(scores: np.ndarray, labels: np.ndarray, what: str) -> float:
    if scores.size == 0:
        raise ValueError(f"no {what} given")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} contain NaN or inf")
    if labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, scores))


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------
def mean_table(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every metric over classes, ignoring nan (a class where the metric is undefined); nan if all
    are."""
    metrics: list[str] = []
    for row in per_class.values():
        metrics += [name for name in row if name not in metrics]
    means: dict[str, float] = {}
    for name in metrics:
        values = np.array([row[name] for row in per_class.values() if name in row], dtype=np.float64)
        finite = values[~np.isnan(values)]
        means[name] = float(finite.mean()) if finite.size else math.nan
    return means


def _as_scores(scores: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    return arr
