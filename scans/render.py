"""PNG snapshots of point clouds for reports and for people checking what the agent flagged.

Uses matplotlib's Agg canvas directly (no pyplot, no screen, no global figure state) so it works headless
and in threads. Each view is a 3-D scatter with equal axis scales; huge clouds are subsampled
deterministically by seed, always keeping flagged points so a small defect never disappears from the picture.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scans.io import umask_mode

# (elevation, azimuth) in degrees for matplotlib's 3-D axes.
# Views assume z is up (MVTec 3D-AD, Real3D-AD); a y-up scan (Stanford bunny) shows "top" as a side view.
VIEWS: dict[str, tuple[float, float]] = {
    "front": (0.0, -90.0),   # look along +y: x to the right, z up
    "side": (0.0, 0.0),      # look along -x: y to the right, z up
    "top": (90.0, -90.0),    # look down -z: x to the right, y up
    "iso": (30.0, -60.0),
}
PANEL_INCHES = 4.0
DPI = 100
BASE_GREY = (0.62, 0.62, 0.62)
FLAG_RED = (0.9, 0.05, 0.05)
HEAT_CMAP = "inferno"  # the anomaly-score colour map of scores.ply, regions.png and viewer.html
# How each verdict's region outline is drawn: confirmed stands out, rejected and skipped recede (also the viewer's).
CONFIRMED_BLUE, REJECTED_GREY, SKIPPED_GREY = "#0072ce", "#8a8a8a", "#b5b5b5"
VERDICT_STYLES: dict[str, dict] = {
    "confirmed": {"color": CONFIRMED_BLUE, "linestyle": "-", "linewidth": 1.8},
    "rejected": {"color": REJECTED_GREY, "linestyle": "--", "linewidth": 1.0},
    "skipped": {"color": SKIPPED_GREY, "linestyle": ":", "linewidth": 1.0},
}
LEGEND_WRAP = 100  # characters per legend line: long reasons wrap instead of being cut


def _check_points(points) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(f"points must have shape (N, 3) with N > 0, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("points contain NaN/inf")
    return array


def subsample_indices(n: int, max_points: int, seed: int, priority: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows; rows in ``priority`` are kept first."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if priority is None or not priority.any():
        return np.sort(rng.choice(n, size=max_points, replace=False))
    first = np.flatnonzero(priority)
    if len(first) >= max_points:
        return np.sort(rng.choice(first, size=max_points, replace=False))
    rest = np.flatnonzero(~priority)
    return np.sort(np.concatenate([first, rng.choice(rest, size=max_points - len(first), replace=False)]))


def _new_figure(n_views: int, title: str | None) -> Figure:
    figure = Figure(figsize=(PANEL_INCHES * n_views, PANEL_INCHES), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.0, right=1.0, bottom=0.06, top=0.84 if title else 0.92, wspace=0.0)
    if title:
        figure.suptitle(title, fontsize=11, y=0.98)
    return figure


def _setup_axes(figure: Figure, position: int, n_views: int, view: str, points: np.ndarray):
    if view not in VIEWS:
        raise ValueError(f"unknown view '{view}'; choose from {', '.join(VIEWS)}")
    # computed_zorder=False: draw in call order, so flagged points / regions stay visible over the grey cloud.
    axes = figure.add_subplot(1, n_views, position, projection="3d", computed_zorder=False)
    elevation, azimuth = VIEWS[view]
    axes.view_init(elev=elevation, azim=azimuth)
    centre = (points.max(axis=0) + points.min(axis=0)) / 2
    half = max(float((points.max(axis=0) - points.min(axis=0)).max()) / 2, 1e-9)
    axes.set_xlim(centre[0] - half, centre[0] + half)
    axes.set_ylim(centre[1] - half, centre[1] + half)
    axes.set_zlim(centre[2] - half, centre[2] + half)
    axes.set_box_aspect((1, 1, 1), zoom=1.35)
    axes.set_axis_off()
    axes.set_title(view, fontsize=9)
    return axes


def _marker_size(n: int) -> float:
    return float(np.clip(3000.0 / max(n, 1), 0.3, 6.0))


def _save(figure: Figure, path, *, tight: bool = False) -> Path:
    """Render to a temp PNG beside the target and rename, so a failed render leaves no partial image."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent)
    os.close(handle)
    try:
        figure.savefig(temp, dpi=DPI, format="png", bbox_inches="tight" if tight else None, pad_inches=0.1)
        os.chmod(temp, umask_mode())
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)
    return target


def render_points_png(path, points, values=None, *, mask=None, title: str | None = None,
                      views: Sequence[str] = ("front", "side", "top"), max_points: int = 20000,
                      seed: int = 0) -> Path:
    """Draw the cloud in grey (or coloured by ``values`` with viridis), flagged ``mask`` points in red on top.

    The image is ``400 * len(views)`` x 400 pixels. Returns the path written.
    """
    array = _check_points(points)
    n = len(array)
    flagged = None
    if mask is not None:
        flagged = np.asarray(mask, dtype=bool).reshape(-1)
        if len(flagged) != n:
            raise ValueError(f"mask has {len(flagged)} entries for {n} points")
    colour_values = None
    if values is not None:
        colour_values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(colour_values) != n:
            raise ValueError(f"values has {len(colour_values)} entries for {n} points")
    if not views:
        raise ValueError("at least one view is needed")
    keep = subsample_indices(n, max_points, seed, flagged)
    shown = array[keep]
    flagged_shown = flagged[keep] if flagged is not None else np.zeros(len(keep), dtype=bool)
    size = _marker_size(len(keep))

    figure = _new_figure(len(views), title)
    for position, view in enumerate(views, start=1):
        axes = _setup_axes(figure, position, len(views), view, array)
        base = shown[~flagged_shown]
        if colour_values is not None:
            finite = colour_values[np.isfinite(colour_values)]
            low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
            axes.scatter(base[:, 0], base[:, 1], base[:, 2], c=colour_values[keep][~flagged_shown],
                         cmap="viridis", vmin=low, vmax=high if high > low else low + 1, s=size,
                         depthshade=False, linewidths=0)
        else:
            axes.scatter(base[:, 0], base[:, 1], base[:, 2], color=BASE_GREY, s=size, depthshade=False,
                         linewidths=0)
        if flagged_shown.any():
            red = shown[flagged_shown]
            axes.scatter(red[:, 0], red[:, 1], red[:, 2], color=FLAG_RED, s=max(size * 3, 4.0),
                         depthshade=False, linewidths=0)
    return _save(figure, path)


def _region_box(axes, corners_low: np.ndarray, corners_high: np.ndarray, style: dict) -> None:
    """The 12 edges of an axis-aligned box: the region's outline in every view."""
    low, high = corners_low, corners_high
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for first in (low, high):
            for second in (low, high):
                start, end = low.copy(), high.copy()
                start[others[0]] = end[others[0]] = first[others[0]]
                start[others[1]] = end[others[1]] = second[others[1]]
                axes.plot(*np.stack([start, end]).T, **style)


def regions_figure(points, regions: list[np.ndarray], labels: list[str], title: str | None = None, *,
                   scores=None, verdicts: Sequence[str] | None = None,
                   views: Sequence[str] = ("front", "side", "top"), max_points: int = 20000,
                   seed: int = 0) -> Figure:
    """The figure behind regions.png: the cloud as a heat map of ``scores`` (grey without), each region outlined by
    its box and numbered 1..n in list order (report.json's order), confirmed solid, rejected/skipped dashed grey, and
    a legend with every label whole (wrapped, never cut)."""
    array = _check_points(points)
    n = len(array)
    if len(regions) != len(labels):
        raise ValueError(f"{len(regions)} regions but {len(labels)} labels")
    verdicts = list(verdicts) if verdicts is not None else ["confirmed"] * len(regions)
    if len(verdicts) != len(regions):
        raise ValueError(f"{len(regions)} regions but {len(verdicts)} verdicts")
    values = None
    if scores is not None:
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(values) != n:
            raise ValueError(f"scores has {len(values)} entries for {n} points")
    region_indices = []
    for label, region in zip(labels, regions):
        index = np.asarray(region, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"region '{label}' has point indices outside 0..{n - 1}")
        region_indices.append(index)
    in_region = np.zeros(n, dtype=bool)
    for index in region_indices:
        in_region[index] = True
    keep = subsample_indices(n, max_points, seed, in_region)
    size = _marker_size(len(keep))
    pad = 0.01 * float((array.max(axis=0) - array.min(axis=0)).max())

    figure = _new_figure(len(views), title)
    low, high = (float(values.min()), float(values.max())) if values is not None else (0.0, 1.0)
    for position, view in enumerate(views, start=1):
        axes = _setup_axes(figure, position, len(views), view, array)
        if values is None:
            axes.scatter(*array[keep].T, color=BASE_GREY, s=size, depthshade=False, linewidths=0)
        else:
            order = keep[np.argsort(values[keep], kind="stable")]  # high scores drawn last, on top
            axes.scatter(*array[order].T, c=values[order], cmap=HEAT_CMAP, vmin=low,
                         vmax=high if high > low else low + 1, s=size, depthshade=False, linewidths=0)
        for number, (index, verdict) in enumerate(zip(region_indices, verdicts), start=1):
            if not len(index):
                continue
            style = VERDICT_STYLES.get(verdict, VERDICT_STYLES["skipped"])
            box_low, box_high = array[index].min(axis=0) - pad, array[index].max(axis=0) + pad
            _region_box(axes, box_low, box_high, style)
            axes.text(*box_high, str(number), color="white", fontsize=8, fontweight="bold", zorder=10,
                      bbox={"boxstyle": "round,pad=0.15", "facecolor": style["color"], "edgecolor": "none"})
    if values is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = figure.add_axes((1.0, 0.15, 0.008, 0.6))  # right of the panels; the tight crop keeps it
        figure.colorbar(ScalarMappable(Normalize(low, high if high > low else low + 1), cmap=HEAT_CMAP), cax=bar,
                        orientation="vertical", label="anomaly score")
    if labels:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], **VERDICT_STYLES.get(v, VERDICT_STYLES["skipped"])) for v in verdicts]
        wrapped = [textwrap.fill(label, LEGEND_WRAP, subsequent_indent="    ") for label in labels]
        figure.legend(handles=handles, labels=wrapped, loc="upper left", bbox_to_anchor=(0.01, -0.02),
                      ncol=1, fontsize=8, frameon=False, handlelength=2.5)
    return figure


def render_regions_png(path, points, regions: list[np.ndarray], labels: list[str],
                       title: str | None = None, *, scores=None, verdicts: Sequence[str] | None = None,
                       views: Sequence[str] = ("front", "side", "top"), max_points: int = 20000,
                       seed: int = 0) -> Path:
    """Write :func:`regions_figure` as a PNG cropped to everything drawn (so the legend is never cut off)."""
    figure = regions_figure(points, regions, labels, title, scores=scores, verdicts=verdicts, views=views,
                            max_points=max_points, seed=seed)
    return _save(figure, path, tight=True)
