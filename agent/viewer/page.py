"""`viewer.html`: one self-contained page per scan to rotate, zoom and pick the scored cloud in a browser.

Why a page and not a PNG: a defect hides behind the part in any fixed view, and a reader wants to ask "what is
the score
here, and which region is this?". Why self-contained: it must open by a double click, offline, from wherever
the scan's
folder was copied, so the three.js bundle (vendor/, MIT), the viewer script and the data are all inlined; the
page
makes no request. The cloud is subsampled to a bounded number of points (deterministic by seed, every region
point
kept first) and the page says so; positions travel as 16-bit steps of the bounding box, scores as float32.
"""

from __future__ import annotations

import base64
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment
from markupsafe import Markup

from agent.secrets import Redactor
from scans import strict_json
from scans.colours import heat_table
from scans.files import atomic_write_text
from scans.regions_png import VERDICT_STYLES, subsample_indices

MAX_VIEWER_POINTS = 200_000
BACKGROUND = "#f4f4f4"  # light: the heat map's low end (inferno) is near black


def _asset(name: str) -> str:
    return resources.files("agent.viewer").joinpath(name).read_text(encoding="utf-8")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    ).decode()


def _script_safe(text: str) -> Markup:
    """Text that cannot close the <script> element it is inlined in."""
    return Markup(text.replace("</", "<\\/"))


def redact(value: Any) -> Any:
    """`value` with every credential found in the environment replaced (the page may be mailed around)."""
    return Redactor.for_run()(value)


def colour_table() -> list[list[int]]:
    """The heat map's 256 colours as RGB bytes, the same map as scores.ply and regions.png."""
    return heat_table().astype(int).tolist()


def viewer_data(
    points: np.ndarray,
    scores: np.ndarray,
    report: dict,
    regions: list[np.ndarray],
    *,
    title: str,
    max_points: int = MAX_VIEWER_POINTS,
    seed: int = 0,
) -> dict:
    """What the page's script reads: the subsampled cloud, its scores, and the regions numbered as in
    report.json."""
    array = np.asarray(points, dtype=np.float64)
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(f"points must have shape (N, 3) with N > 0, got {array.shape}")
    if len(values) != len(array):
        raise ValueError(f"{len(values)} scores for {len(array)} points")
    if len(regions) != len(report["regions"]):
        raise ValueError(
            f"{len(regions)} region point sets for {len(report['regions'])} regions in the report"
        )
    report, title = redact(report), redact(title)
    in_region = np.zeros(len(array), dtype=bool)
    for members in regions:
        in_region[np.asarray(members, dtype=np.int64)] = True
    keep = subsample_indices(len(array), max_points, seed, in_region)
    shown = array[keep]
    low, high = shown.min(axis=0), shown.max(axis=0)
    span = np.maximum(high - low, 1e-12)
    steps = np.round((shown - low) / span * 65535).astype(np.uint16)
    position_in_page = np.full(len(array), -1, dtype=np.int64)
    position_in_page[keep] = np.arange(len(keep))
    page_regions = []
    for number, (entry, members) in enumerate(zip(report["regions"], regions), start=1):
        local = position_in_page[np.asarray(members, dtype=np.int64)]
        page_regions.append(
            {
                **entry,
                "id": entry.get("id", number),
                "members": _b64(np.sort(local[local >= 0]).astype(np.int32)),
            }
        )
    return {
        "title": title,
        "report": {k: v for k, v in report.items() if k != "regions"},
        "seed": seed,
        "shown_points": len(keep),
        "positions": _b64(steps.reshape(-1)),
        "bbox_min": low.tolist(),
        "bbox_span": span.tolist(),
        "scores": _b64(values[keep]),
        "input_index": _b64(keep.astype(np.int32)),
        "score_min": float(values.min()),
        "score_max": float(values.max()),
        "colour_table": colour_table(),
        "background": BACKGROUND,
        "verdict_styles": {
            verdict: {"color": style["color"], "dashed": style["linestyle"] != "-"}
            for verdict, style in VERDICT_STYLES.items()
        },
        "regions": page_regions,
    }


def render_viewer_html(data: dict) -> str:
    """The whole page as text: template, inlined three.js bundle, viewer script and data."""
    env = Environment(autoescape=True, keep_trailing_newline=True)
    template = env.from_string(_asset("viewer.html.j2"))
    table = data["colour_table"]
    ramp = ", ".join(f"rgb({r},{g},{b})" for r, g, b in table[::32] + [table[-1]])
    return template.render(
        title=data["title"],
        background=data["background"],
        ramp=ramp,
        styles=data["verdict_styles"],
        score_min=f"{data['score_min']:.4g}",
        score_max=f"{data['score_max']:.4g}",
        data_json=_script_safe(strict_json.dumps(data, missing_as_null=True, separators=(",", ":"))),
        three_js=_script_safe(_asset("vendor/three-viewer.min.js")),
        viewer_js=_script_safe(_asset("viewer.js")),
    )


def write_viewer(
    path: str | os.PathLike,
    points: np.ndarray,
    scores: np.ndarray,
    report: dict,
    regions: list[np.ndarray],
    *,
    title: str,
    max_points: int = MAX_VIEWER_POINTS,
    seed: int = 0,
) -> Path:
    """Write one scan's viewer.html (see the module docstring)."""
    data = viewer_data(points, scores, report, regions, title=title, max_points=max_points, seed=seed)
    return atomic_write_text(path, render_viewer_html(data))
