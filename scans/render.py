"""PNG snapshots of point clouds for benchmark pictures and evals' reports (truth and scores side by side).

Uses matplotlib's Agg canvas directly (no pyplot, no screen, no global figure state) so it works headless
and in threads. Each view is a 3-D scatter with equal axis scales; huge clouds are subsampled
deterministically by seed, always keeping flagged points so a small defect never disappears from the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scans.files import atomic_write
from scans.regions_png import VIEWS, check_points, subsample_indices

PANEL_INCHES = 4.0
DPI = 100
BASE_GREY = (0.62, 0.62, 0.62)
FLAG_RED = (0.9, 0.05, 0.05)


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
    return atomic_write(
        path,
        lambda out: figure.savefig(
            out, dpi=DPI, format="png", bbox_inches="tight" if tight else None, pad_inches=0.1
        ),
        suffix=".png",
    )


def render_points_png(
    path,
    points,
    values=None,
    *,
    mask=None,
    title: str | None = None,
    views: Sequence[str] = ("front", "side", "top"),
    max_points: int = 20000,
    seed: int = 0,
) -> Path:
    """Draw the cloud in grey (or coloured by ``values`` with viridis), flagged ``mask`` points in red on top.

    The image is ``400 * len(views)`` x 400 pixels. Returns the path written.
    """
    array = check_points(points)
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
            axes.scatter(
                base[:, 0],
                base[:, 1],
                base[:, 2],
                c=colour_values[keep][~flagged_shown],
                cmap="viridis",
                vmin=low,
                vmax=high if high > low else low + 1,
                s=size,
                depthshade=False,
                linewidths=0,
            )
        else:
            axes.scatter(
                base[:, 0], base[:, 1], base[:, 2], color=BASE_GREY, s=size, depthshade=False, linewidths=0
            )
        if flagged_shown.any():
            red = shown[flagged_shown]
            axes.scatter(
                red[:, 0],
                red[:, 1],
                red[:, 2],
                color=FLAG_RED,
                s=max(size * 3, 4.0),
                depthshade=False,
                linewidths=0,
            )
    return _save(figure, path)
