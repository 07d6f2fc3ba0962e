"""The shape of what is off-normal around each patch: raised or sunk, a compact blob or a long line, one of
its kind or repeated.

Why: the table's z-scores say *how* unusual a patch is, not *what* is there. A by-design rib and a dent move
the surface by the same distance, a row of bolt holes and a drilled-through defect leave the same uncovered
rim; what tells them apart is the shape of the off-normal surface: added or removed material, a long straight
run or a blob, several alike or one. An operator's "sharp ridges are normal" or "the bolt holes are by
design" is about that shape, so the learned recogniser that applies such guidance (`agent.normal_features`)
reads these descriptors beside the table's statistics.

A point is *off-normal* when either surface cue (`detector.surface_cues`, in normal units) exceeds 1, the
edge of normal. Off-normal points within OFF_LINK x the scan's median point spacing of each other form one
*blob* (a connected component). Per patch, the blob holding most of its off-normal points describes it.
The descriptors are not shown in the overview (a reader would pay tokens for them on every scan, and the
adapters were trained without them); they live in `PatchTable.shape`.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from scans.patches import Patches

OFF_NORMAL = 1.0  # a cue above this (normal units) marks a point off-normal
OFF_LINK = 3.0  # off-normal points closer than this many median spacings belong to one blob
MIN_SIDED = 3  # a patch needs this many off-surface points for its `raised` to be more than 0
MIN_BLOB = 8  # smaller blobs are not counted as alike (`similar_blobs`): sensor noise
ALIKE = 2.0  # blobs within this factor of each other's size are alike
SAMPLE_CAP = 20_000  # spacing and blobs use at most this many seeded points; the rest join the nearest

SHAPE_COLUMNS: dict[str, str] = {
    "off_share": "share of the patch's points beyond normal (either surface cue above 1)",
    "raised": "of its points off the surface, share outside minus share inside (-1 sunk .. 1 raised)",
    "rim_share": "share of its off-normal points that border missing surface",
    "blob_extent": "length of its blob along the blob's main axis, over the scan's largest side",
    "blob_elongation": "1 - (second / first principal spread) of its blob: 0 round, 1 a line",
    "blob_share": "its blob's points over the scan's points",
    "similar_blobs": "other blobs of about its blob's size on the scan (repeated features)",
}


def _median_spacing(points: np.ndarray, rng: np.random.Generator) -> float:
    sample = (
        points if len(points) <= SAMPLE_CAP else points[rng.choice(len(points), SAMPLE_CAP, replace=False)]
    )
    distance, _ = cKDTree(sample).query(sample, k=2)
    spacing = float(np.median(distance[:, 1])) if len(sample) > 1 else 0.0
    # on a surface, spacing grows with 1 / sqrt(density): a subsample's spacing scaled back to the scan's
    return spacing * (len(sample) / len(points)) ** 0.5


def _blobs(points: np.ndarray, off: np.ndarray, link: float, rng: np.random.Generator) -> np.ndarray:
    """int64 (N,) blob id of every off-normal point, -1 elsewhere."""
    blob = np.full(len(points), -1, dtype=np.int64)
    idx = np.flatnonzero(off)
    if idx.size == 0:
        return blob
    core = idx if idx.size <= SAMPLE_CAP else np.sort(rng.choice(idx, SAMPLE_CAP, replace=False))
    tree = cKDTree(points[core])
    # a subsample of the off-normal points is sparser: its links stretch as its spacing does
    link *= np.sqrt(idx.size / core.size)
    graph = tree.sparse_distance_matrix(tree, link, output_type="coo_matrix")
    _, labels = connected_components(graph, directed=False)
    blob[core] = labels
    rest = np.setdiff1d(idx, core, assume_unique=True)
    if rest.size:
        blob[rest] = labels[tree.query(points[rest], k=1)[1]]
    return blob


def _blob_shapes(points: np.ndarray, blob: np.ndarray, size: float) -> tuple[np.ndarray, ...]:
    """Per blob: (extent over `size`, elongation, point count); one sort, so many small blobs stay cheap."""
    members = np.flatnonzero(blob >= 0)
    n = int(blob[members].max()) + 1 if members.size else 0
    extent, elongation = np.zeros(n), np.zeros(n)
    count = np.bincount(blob[members], minlength=n)
    order = members[np.argsort(blob[members], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(count)])
    for b in np.flatnonzero(count >= 4):
        xyz = points[order[starts[b] : starts[b + 1]]].astype(np.float64)
        spread, axes = np.linalg.eigh(np.cov(xyz.T))
        extent[b] = np.ptp(xyz @ axes[:, -1]) / size
        elongation[b] = 1.0 - np.sqrt(max(spread[1], 0.0) / max(spread[2], 1e-12))
    return extent, elongation, count


def deviation_shape(
    points: np.ndarray,
    point_stats: dict[str, np.ndarray],
    surface_side: np.ndarray | None,
    patches: Patches,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The SHAPE_COLUMNS of every patch (float32 (P,) each); empty when the scan has no surface cues."""
    if "surface_distance" not in point_stats or "uncovered_rim" not in point_stats:
        return {}
    pts = np.asarray(points, dtype=np.float64)
    surface = np.asarray(point_stats["surface_distance"]) > OFF_NORMAL
    rim = np.asarray(point_stats["uncovered_rim"]) > OFF_NORMAL
    off = surface | rim
    side = np.zeros(len(pts)) if surface_side is None else np.asarray(surface_side, dtype=np.float64)
    rng = np.random.default_rng(seed)
    size = float(np.ptp(pts, axis=0).max()) or 1.0
    blob = _blobs(pts, off, OFF_LINK * _median_spacing(pts, rng), rng)
    extent, elongation, count = _blob_shapes(pts, blob, size)
    owner, n_patches = patches.patch_of_point, patches.n_patches

    def per_patch(values: np.ndarray) -> np.ndarray:
        return np.bincount(owner, weights=values.astype(np.float64), minlength=n_patches)

    n_off = per_patch(off)
    sided = per_patch(surface)
    out = {
        "off_share": n_off / np.maximum(patches.counts, 1),
        "raised": np.where(sided >= MIN_SIDED, per_patch(surface * side) / np.maximum(sided, 1), 0.0),
        "rim_share": per_patch(rim) / np.maximum(n_off, 1),
    }
    main = np.full(n_patches, -1, dtype=np.int64)  # each patch's blob: the one holding most of its points
    if count.size:
        held = np.zeros((n_patches, count.size))
        np.add.at(held, (owner[blob >= 0], blob[blob >= 0]), 1.0)
        main = np.where(held.max(axis=1) > 0, held.argmax(axis=1), -1)
    has = main >= 0
    pick = np.where(has, main, 0)
    alike = (count[:, None] * ALIKE >= count[None, :]) & (count[None, :] * ALIKE >= count[:, None])
    alike &= (count >= MIN_BLOB)[:, None] & (count >= MIN_BLOB)[None, :]
    similar = alike.sum(axis=1) - alike.diagonal() if count.size else np.zeros(0)
    for name, values in (
        ("blob_extent", extent),
        ("blob_elongation", elongation),
        ("blob_share", count / len(pts)),
        ("similar_blobs", similar),
    ):
        out[name] = np.where(has, values[pick] if values.size else 0.0, 0.0)
    return {name: np.asarray(out[name], dtype=np.float32) for name in SHAPE_COLUMNS}
