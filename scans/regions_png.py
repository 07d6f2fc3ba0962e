"""regions.png: the scan as a heat map in three orthographic views, each flagged region outlined and
numbered, drawn with numpy and Pillow.

Why not matplotlib: on the path of every `agent.run`, its 3-D scatter of 20k points in three views and its
import were a large part of a cold single-scan run; an orthographic splat of the same points into a pixel
grid is a small part (README: speed with registration). Points are drawn in score order (the highest last,
on top) and not by depth, so a small defect is never hidden behind the part; the cloud is subsampled
deterministically by seed, region points kept first. The legend carries every label whole (wrapped, never
cut) and the image grows to hold it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scans.colours import heat_levels, heat_table
from scans.files import atomic_write

# (elevation, azimuth) in degrees, as matplotlib's 3-D axes take them (scans/render.py uses the same table).
# Views assume z is up (MVTec 3D-AD, Real3D-AD); a y-up scan (Stanford bunny) shows "top" as a side view.
VIEWS: dict[str, tuple[float, float]] = {
    "front": (0.0, -90.0),  # look along +y: x to the right, z up
    "side": (0.0, 0.0),  # look along -x: y to the right, z up
    "top": (90.0, -90.0),  # look down -z: x to the right, y up
    "iso": (30.0, -60.0),
}
PANEL_PIXELS = 400
PANEL_MARGIN = 14  # pixels between the cloud's extent and the panel's edge
BASE_GREY = (158, 158, 158)
WHITE = (255, 255, 255)
INK = (20, 20, 20)
# How each verdict's region outline is drawn: confirmed stands out, rejected and skipped recede (also the
# viewer's). linewidth is in pixels.
CONFIRMED_BLUE, REJECTED_GREY, SKIPPED_GREY = "#0072ce", "#8a8a8a", "#b5b5b5"
VERDICT_STYLES: dict[str, dict] = {
    "confirmed": {"color": CONFIRMED_BLUE, "linestyle": "-", "linewidth": 2},
    "rejected": {"color": REJECTED_GREY, "linestyle": "--", "linewidth": 1},
    "skipped": {"color": SKIPPED_GREY, "linestyle": ":", "linewidth": 1},
}
DASHES = {"-": None, "--": (6, 4), ":": (2, 3)}  # (on, off) pixels
LEGEND_WRAP = 100  # characters per legend line: long reasons wrap instead of being cut
COLOUR_BAR = (14, 240)  # width, height in pixels


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


def check_points(points) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(f"points must have shape (N, 3) with N > 0, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("points contain NaN/inf")
    return array


def _style(verdict: str) -> dict:
    """How a region of this verdict is outlined (an unknown verdict as skipped)."""
    return VERDICT_STYLES.get(verdict, VERDICT_STYLES["skipped"])


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@dataclass
class RegionsPicture:
    """The drawn image and what was written on it (the numbers per view, the legend's lines), so a test can
    check the text without reading pixels."""

    image: Image.Image
    numbers: list[str] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)


class _Projection:
    """Scan coordinates to pixel columns and rows of one panel: an orthographic view from (elevation,
    azimuth), equal scale on both axes, the cloud's projected extent centred in the panel."""

    def __init__(self, array: np.ndarray, view: str, left: int, top: int):
        if view not in VIEWS:
            raise ValueError(f"unknown view '{view}'; choose from {', '.join(VIEWS)}")
        elevation, azimuth = np.radians(VIEWS[view])
        self.axes = np.array(
            [
                [-np.sin(azimuth), np.cos(azimuth), 0.0],  # to the right on screen
                [
                    -np.sin(elevation) * np.cos(azimuth),
                    -np.sin(elevation) * np.sin(azimuth),
                    np.cos(elevation),
                ],  # up on screen
            ]
        )
        flat = array @ self.axes.T
        low, high = flat.min(axis=0), flat.max(axis=0)
        self.centre = (low + high) / 2
        half = max(float((high - low).max()) / 2, 1e-9)
        self.scale = (PANEL_PIXELS / 2 - PANEL_MARGIN) / half
        self.left, self.top = left, top

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = (np.asarray(points, dtype=np.float64) @ self.axes.T - self.centre) * self.scale
        column, row = flat[:, 0] + PANEL_PIXELS / 2, PANEL_PIXELS / 2 - flat[:, 1]
        return (
            np.clip(np.rint(column), 0, PANEL_PIXELS - 1).astype(np.int64) + self.left,
            np.clip(np.rint(row), 0, PANEL_PIXELS - 1).astype(np.int64) + self.top,
        )


def _splat(canvas: np.ndarray, columns: np.ndarray, rows: np.ndarray, colours: np.ndarray, size: int) -> None:
    """Draw squares of `size` pixels in list order, later points over earlier ones (a per-pixel max of the
    draw order, so the result does not depend on how numpy orders repeated writes)."""
    height, width = canvas.shape[:2]
    order = np.full((height, width), -1, dtype=np.int64)
    rank = np.arange(len(columns), dtype=np.int64)
    for dy in range(size):
        for dx in range(size):
            r, c = np.minimum(rows + dy, height - 1), np.minimum(columns + dx, width - 1)
            np.maximum.at(order, (r, c), rank)
    hit = order >= 0
    canvas[hit] = colours[order[hit]]


def _line(draw: ImageDraw.ImageDraw, start: tuple[int, int], end: tuple[int, int], style: dict) -> None:
    """A straight line in the verdict's colour, width and dash pattern."""
    colour, width, dash = _rgb(style["color"]), int(style["linewidth"]), DASHES.get(style["linestyle"])
    if dash is None:
        draw.line((*start, *end), fill=colour, width=width)
        return
    (x0, y0), (x1, y1) = start, end
    length = max(float(np.hypot(x1 - x0, y1 - y0)), 1.0)
    on, off = dash
    for a in np.arange(0.0, length, on + off):
        t0, t1 = a / length, min(a + on, length) / length
        draw.line(
            (x0 + t0 * (x1 - x0), y0 + t0 * (y1 - y0), x0 + t1 * (x1 - x0), y0 + t1 * (y1 - y0)),
            fill=colour,
            width=width,
        )


BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]  # 12 edges


def _box(draw: ImageDraw.ImageDraw, projection: _Projection, low: np.ndarray, high: np.ndarray, style: dict):
    """The 12 edges of an axis-aligned box (a rectangle in an axis-aligned view); returns the pixel of its
    `high` corner, where the region's number goes."""
    corners = np.array([[(high if i >> axis & 1 else low)[axis] for axis in range(3)] for i in range(8)])
    columns, rows = projection(corners)
    for a, b in BOX_EDGES:
        _line(draw, (int(columns[a]), int(rows[a])), (int(columns[b]), int(rows[b])), style)
    return int(columns[7]), int(rows[7])


def _colour_bar(draw: ImageDraw.ImageDraw, left: int, top: int, low: float, high: float, font) -> None:
    width, height = COLOUR_BAR
    table = heat_table()
    for y in range(height):
        level = int(round(255 * (1 - y / max(height - 1, 1))))
        draw.line((left, top + y, left + width - 1, top + y), fill=tuple(int(c) for c in table[level]))
    draw.rectangle((left, top, left + width - 1, top + height - 1), outline=INK, width=1)
    for share in (0.0, 0.5, 1.0):
        y = top + int(round((1 - share) * (height - 1)))
        draw.line((left + width, y, left + width + 3, y), fill=INK)
        tick = f"{low + share * (high - low):.3g}"
        draw.text((left + width + 6, y), tick, fill=INK, font=font, anchor="lm")


def regions_picture(
    points,
    regions: list[np.ndarray],
    labels: list[str],
    title: str | None = None,
    *,
    scores=None,
    verdicts: Sequence[str] | None = None,
    views: Sequence[str] = ("front", "side", "top"),
    max_points: int = 20000,
    seed: int = 0,
) -> RegionsPicture:
    """The picture behind regions.png: the cloud as a heat map of ``scores`` (grey without), each region
    outlined by its box and numbered 1..n in list order (report.json's order), confirmed solid, rejected and
    skipped dashed grey, and a legend with every label whole (wrapped, never cut)."""
    array = check_points(points)
    n = len(array)
    if len(regions) != len(labels):
        raise ValueError(f"{len(regions)} regions but {len(labels)} labels")
    verdicts = list(verdicts) if verdicts is not None else ["confirmed"] * len(regions)
    if len(verdicts) != len(regions):
        raise ValueError(f"{len(regions)} regions but {len(verdicts)} verdicts")
    if not views:
        raise ValueError("at least one view is needed")
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
    if values is None:
        order, colours = keep, np.tile(np.array(BASE_GREY, np.uint8), (len(keep), 1))
        low = high = 0.0
    else:
        low, high = float(values.min()), float(values.max())
        order = keep[np.argsort(values[keep], kind="stable")]  # high scores drawn last, on top
        colours = heat_table()[heat_levels(values[order], low, high)]
    size = int(np.clip(round(np.sqrt(60000 / len(keep))), 1, 4))
    pad = 0.01 * float((array.max(axis=0) - array.min(axis=0)).max())
    boxes = [  # (number, corners, style) of each non-empty region, the same in every view
        (number, array[index].min(axis=0) - pad, array[index].max(axis=0) + pad, _style(verdict))
        for number, (index, verdict) in enumerate(zip(region_indices, verdicts), start=1)
        if len(index)
    ]

    small, normal, large = (ImageFont.load_default(size=s) for s in (11, 12, 15))
    wrapped = [textwrap.fill(label, LEGEND_WRAP, subsequent_indent="    ").split("\n") for label in labels]
    legend_lines = [line for lines in wrapped for line in lines]
    line_height = 16
    title_height = 34 if title else 8
    panels_top = title_height + 16
    bar_width = 90 if values is not None else 0
    legend_width = max((int(normal.getlength(line)) for line in legend_lines), default=0) + 60
    width = max(PANEL_PIXELS * len(views) + bar_width, legend_width) + 20
    height = panels_top + PANEL_PIXELS + 10 + line_height * len(legend_lines) + 14
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)

    projections = [
        _Projection(array, view, 10 + i * PANEL_PIXELS, panels_top) for i, view in enumerate(views)
    ]
    for projection in projections:
        columns, rows = projection(array[order])
        _splat(canvas, columns, rows, colours, size)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    picture = RegionsPicture(image=image, legend=legend_lines)
    if title:
        draw.text((width / 2, 8), title, fill=INK, font=large, anchor="ma")
    for view, projection in zip(views, projections):
        heading = (projection.left + PANEL_PIXELS / 2, panels_top - 4)
        draw.text(heading, view, fill=INK, font=small, anchor="md")
        for number, box_low, box_high, style in boxes:
            column, row = _box(draw, projection, box_low, box_high, style)
            at = (column + 3, row - 3)
            tag = draw.textbbox(at, str(number), font=small, anchor="lb")
            draw.rounded_rectangle(
                (tag[0] - 3, tag[1] - 2, tag[2] + 3, tag[3] + 2), radius=3, fill=_rgb(style["color"])
            )
            draw.text(at, str(number), fill=WHITE, font=small, anchor="lb")
            picture.numbers.append(str(number))
    if values is not None:
        bar_left = 10 + PANEL_PIXELS * len(views) + 12
        bar_top = panels_top + (PANEL_PIXELS - COLOUR_BAR[1]) // 2
        _colour_bar(draw, bar_left, bar_top, low, high, small)
        draw.text((bar_left, bar_top - 8), "anomaly score", fill=INK, font=small, anchor="ld")
    y = panels_top + PANEL_PIXELS + 10
    for lines, verdict in zip(wrapped, verdicts):
        _line(draw, (14, y + 8), (44, y + 8), _style(verdict))
        for line in lines:
            draw.text((54, y), line, fill=INK, font=normal)
            y += line_height
    return picture


def render_regions_png(path, *args, **kwargs) -> Path:
    """Write :func:`regions_picture` (same arguments after the path) as a PNG, through a temporary file so
    that a failed render leaves no partial image."""
    picture = regions_picture(*args, **kwargs)
    return atomic_write(path, lambda out: picture.image.save(out, format="PNG"), suffix=".png")
