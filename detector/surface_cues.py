"""Point-level surface evidence after alignment: distance to the templates' surface, uncovered template rim.

Why: the feature bank and the coordinate bank judge *patches*, so a groove narrower than a patch, or
thinner than the templates' sampling spacing, is averaged away, and missing material (a hole, a broken-off
part) leaves no point behind to look odd at all. Once a scan sits in the templates' frame, two per-point
cues see both:

* ``surface_distance``: point-to-plane distance to the registered templates (median over the nearest template
  points of |n . (p - q)| with the templates' normals), which does not grow with the sampling spacing;
* ``uncovered_rim``: template points farther from the scan than normal (beyond the leave-one-out reach) are
  surface the scan lacks; the scan points on their rim (within a few *local* sampling spacings of the gap) get
  how far beyond normal reach the gap is.

Each cue is averaged over a few scan neighbours and divided by its normal-data norm (the 99th percentile of
the same cue on each template against the *other* templates), so 1 means "at the edge of normal" in both, as
the banks' scores are (detector.fitting). Everything that does not depend on the scan is computed once in the
fit and saved as plain arrays (:meth:`SurfaceCues.save`); the KD-tree is rebuilt at load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from scans.geometry import KNN_WORKERS
from scans.orientation import oriented_normals

CUE_NAMES = ("surface_distance", "uncovered_rim")
PLANE_NEIGHBOURS = 4  # template points whose planes vote (median) on a scan point's surface distance
NORMAL_NEIGHBOURS = 20  # neighbourhood of a template point's normal
SPACING_NEIGHBOURS = 4  # a template point's local spacing: mean distance to this many neighbours
SMOOTH_NEIGHBOURS = 10  # scan points a cue is averaged over (itself included): sensor noise averaged out
RIM_SPACINGS = 2.0  # a gap marks scan points within this many local spacings beyond its own distance
REACH_PERCENTILE = 99.5  # how far the scan may normally be from a template point (leave-one-out)
NORM_PERCENTILE = 99.0  # the cue value that counts as 1 (leave-one-out normal data)
MIN_NORM = 1e-3  # a cue that is exactly 0 on all normal data (identical templates) keeps a tiny unit
ORIENTATION = "propagated"  # cues.json "normals": how the stored normals were oriented (scans.orientation)
FILES = ("cue_points.npy", "cue_normals.npy", "cue_source.npy", "cue_spacing.npy", "cues.json")


def _local_spacing(points: np.ndarray) -> np.ndarray:
    """float32 (N,) mean distance of each point to its SPACING_NEIGHBOURS nearest others."""
    k = min(SPACING_NEIGHBOURS + 1, len(points))
    dist, _ = cKDTree(points).query(points, k=k, workers=1)
    return dist[:, 1:].mean(axis=1).astype(np.float32) if k > 1 else np.zeros(len(points), np.float32)


def _plane_offsets(points: np.ndarray, tree: cKDTree, normals: np.ndarray) -> np.ndarray:
    """float64 (N, k) signed distance of each point to the planes (point, normal) of its PLANE_NEIGHBOURS
    nearest template points behind ``tree``: positive along the normals."""
    k = min(PLANE_NEIGHBOURS, tree.n)
    _, idx = tree.query(points, k=k, workers=KNN_WORKERS)
    idx = idx.reshape(len(points), k)
    offsets = points[:, None, :].astype(np.float64) - tree.data[idx]
    return np.einsum("nkd,nkd->nk", offsets, normals[idx])


def _outward_normals(templates: list[np.ndarray]) -> list[np.ndarray]:
    """Each template's normals with one outward sign along its surface and across the templates
    (`scans.orientation`): the side a scan point lies on is read along them."""
    first = oriented_normals(templates[0], k=NORMAL_NEIGHBOURS)
    return [first] + [
        oriented_normals(t, k=NORMAL_NEIGHBOURS, reference=(templates[0], first)) for t in templates[1:]
    ]


def plane_distance(points: np.ndarray, tree: cKDTree, normals: np.ndarray) -> np.ndarray:
    """float32 (N,) point-to-plane distance of each point to the template surface behind ``tree``."""
    return np.median(np.abs(_plane_offsets(points, tree, normals)), axis=1).astype(np.float32)


def plane_side(points: np.ndarray, tree: cKDTree, normals: np.ndarray) -> np.ndarray:
    """float32 (N,) +1 where a point lies outside the template surface behind ``tree`` (along its outward
    normals: added material), -1 inside (removed material), 0 exactly on it; the sign of the median signed
    point-to-plane distance, as :func:`plane_distance` takes the median of its size."""
    return np.sign(np.median(_plane_offsets(points, tree, normals), axis=1)).astype(np.float32)


def uncovered_rim(
    points: np.ndarray,
    scan_tree: cKDTree,
    template: np.ndarray,
    spacing: np.ndarray,
    reach: float,
    rim_spacings: float = RIM_SPACINGS,
) -> np.ndarray:
    """float32 (N,) per scan point: the largest gap beyond normal reach (in reaches) of the uncovered template
    points whose rim it lies on; 0 where no template surface near it is missing."""
    # a bounded search first: nearly every template point is covered, and those stop looking at the reach
    bounded, _ = scan_tree.query(template, k=1, distance_upper_bound=reach, workers=KNN_WORKERS)
    out = np.zeros(len(points), np.float32)
    uncovered = np.flatnonzero(~np.isfinite(bounded))
    if uncovered.size:
        gap_dist = scan_tree.query(template[uncovered], k=1, workers=KNN_WORKERS)[0]
        gap = np.clip(gap_dist / reach - 1.0, 0.0, None)
        keep = gap > 0
        uncovered, gap_dist, gap = uncovered[keep], gap_dist[keep], gap[keep]
    if uncovered.size:
        radii = gap_dist + rim_spacings * spacing[uncovered]
        members = scan_tree.query_ball_point(template[uncovered], r=radii, workers=KNN_WORKERS)
        sizes = np.fromiter((len(m) for m in members), dtype=np.int64, count=len(members))
        if sizes.sum():
            near = np.concatenate([np.asarray(m, dtype=np.int64) for m in members if m])
            np.maximum.at(out, near, np.repeat(gap, sizes).astype(np.float32))
    return out


def neighbourhoods(scan_tree: cKDTree, k: int = SMOOTH_NEIGHBOURS) -> np.ndarray | None:
    """(N, k) each scan point's k nearest scan points (itself included); None when k <= 1 (no smoothing)."""
    k = min(k, scan_tree.n)
    if k <= 1:
        return None
    return scan_tree.query(scan_tree.data, k=k, workers=KNN_WORKERS)[1]


def smooth(values: np.ndarray, neighbours: np.ndarray | None) -> np.ndarray:
    """Each point's value averaged over its neighbourhood (see :func:`neighbourhoods`)."""
    if neighbours is None:
        return values.astype(np.float32)
    return values[neighbours].mean(axis=1).astype(np.float32)


def raw_cues(
    points: np.ndarray,
    template: np.ndarray,
    tree: cKDTree,
    normals: np.ndarray,
    spacing: np.ndarray,
    reach: float,
    *,
    smooth_k: int = SMOOTH_NEIGHBOURS,
    rim_spacings: float = RIM_SPACINGS,
) -> dict[str, np.ndarray]:
    """Both cues of one (aligned) scan against a template union, smoothed, not yet divided by their norms."""
    scan_tree = cKDTree(points)
    surface = plane_distance(points, tree, normals)
    rim = uncovered_rim(points, scan_tree, template, spacing, reach, rim_spacings)
    neighbours = neighbourhoods(scan_tree, smooth_k)
    return {"surface_distance": smooth(surface, neighbours), "uncovered_rim": smooth(rim, neighbours)}


@dataclass
class SurfaceCues:
    """The registered templates' surface (points, normals, local spacing, source template), the normal reach
    and the cues' normal norms: all a scan's cues need besides the scan."""

    points: np.ndarray  # float32 (M,3) the templates in the reference frame, one after the other
    normals: np.ndarray  # float32 (M,3)
    source: np.ndarray  # int64 (M,) which template each point came from
    spacing: np.ndarray  # float32 (M,) each point's local sampling spacing within its own template
    reach: float  # normal scan-to-template distance (LOO REACH_PERCENTILE); beyond it surface is missing
    norms: dict[str, float]  # cue name -> its LOO normal NORM_PERCENTILE
    smooth_k: int = SMOOTH_NEIGHBOURS
    rim_spacings: float = RIM_SPACINGS
    _tree: cKDTree | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.points = np.ascontiguousarray(self.points, dtype=np.float32)
        self.normals = np.ascontiguousarray(self.normals, dtype=np.float32)
        self.source = np.asarray(self.source, dtype=np.int64)
        self.spacing = np.asarray(self.spacing, dtype=np.float32)
        n = len(self.points)
        if (
            self.points.shape != (n, 3)
            or self.normals.shape != (n, 3)
            or self.source.shape != (n,)
            or self.spacing.shape != (n,)
            or n < PLANE_NEIGHBOURS
        ):
            raise ValueError(
                f"surface cues need (M,3) points and normals and M sources and spacings (M >= "
                f"{PLANE_NEIGHBOURS}), got {self.points.shape}, {self.normals.shape}, {self.source.shape}, "
                f"{self.spacing.shape}"
            )
        finite = all(np.isfinite(a).all() for a in (self.points, self.normals, self.spacing))
        if not finite or not (np.isfinite(self.reach) and self.reach > 0):
            raise ValueError("surface cues hold NaN/inf values or a reach that is not > 0")
        if self.smooth_k < 1 or not self.rim_spacings >= 0:
            raise ValueError(
                f"surface cues need smooth_k >= 1 and rim_spacings >= 0, got {self.smooth_k}, "
                f"{self.rim_spacings}"
            )
        if set(self.norms) != set(CUE_NAMES) or not all(
            np.isfinite(v) and v > 0 for v in self.norms.values()
        ):
            raise ValueError(f"surface cue norms must be positive numbers for {CUE_NAMES}, got {self.norms}")

    # ------------------------------------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        registered: list[np.ndarray],
        smooth_k: int = SMOOTH_NEIGHBOURS,
        rim_spacings: float = RIM_SPACINGS,
    ) -> tuple[SurfaceCues, list[dict[str, np.ndarray]]]:
        """(the cues of these aligned templates, each template's leave-one-out cues in normal units).

        The reach and the norms are measured with each template in turn playing a normal scan against the
        others, as a test scan meets the templates."""
        if len(registered) < 2:
            raise ValueError(
                "surface cues need at least two aligned templates (they calibrate on each other)"
            )
        templates = [np.ascontiguousarray(t, dtype=np.float32) for t in registered]
        normals = _outward_normals(templates)
        spacings = [_local_spacing(t) for t in templates]
        source = np.concatenate([np.full(len(t), i) for i, t in enumerate(templates)])
        points, all_normals, all_spacing = (np.concatenate(a) for a in (templates, normals, spacings))
        own_trees = [cKDTree(t) for t in templates]
        reach = float(
            np.median(
                [
                    np.percentile(
                        own_trees[i].query(points[source != i], k=1, workers=1)[0], REACH_PERCENTILE
                    )
                    for i in range(len(templates))
                ]
            )
        )
        reach = reach if reach > 0 else float(np.median(all_spacing)) or 1.0
        loo = []
        for i, template in enumerate(templates):
            others = source != i
            loo.append(
                raw_cues(
                    template,
                    points[others],
                    cKDTree(points[others]),
                    all_normals[others],
                    all_spacing[others],
                    reach,
                    smooth_k=smooth_k,
                    rim_spacings=rim_spacings,
                )
            )
        norms = {
            name: max(float(np.percentile(np.concatenate([c[name] for c in loo]), NORM_PERCENTILE)), MIN_NORM)
            for name in CUE_NAMES
        }
        fitted = cls(points, all_normals, source, all_spacing, reach, norms, smooth_k, rim_spacings)
        return fitted, [fitted.normalised(c) for c in loo]

    # -------------------------------------------------------------------------------------------- scoring
    def tree(self) -> cKDTree:
        if self._tree is None:
            self._tree = cKDTree(self.points)
        return self._tree

    def normalised(self, cues: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: (cues[name] / self.norms[name]).astype(np.float32) for name in CUE_NAMES}

    def per_point(self, aligned: np.ndarray) -> dict[str, np.ndarray]:
        """Both cues of one scan already in the reference frame, in normal units (1 = edge of normal)."""
        pts = np.ascontiguousarray(aligned, dtype=np.float32)
        if len(pts) == 0:
            return {name: np.zeros(0, np.float32) for name in CUE_NAMES}
        raw = raw_cues(
            pts,
            self.points,
            self.tree(),
            self.normals,
            self.spacing,
            self.reach,
            smooth_k=self.smooth_k,
            rim_spacings=self.rim_spacings,
        )
        return self.normalised(raw)

    def side(self, aligned: np.ndarray) -> np.ndarray:
        """Per point of a scan in the reference frame: +1 outside the templates' surface, -1 inside
        (:func:`plane_side`). Why: a raised rib and a pressed-in scratch move the surface by the same
        distance; only the side tells added material (a bulge, a rib) from removed (a dent, a groove)."""
        pts = np.ascontiguousarray(aligned, dtype=np.float32)
        if len(pts) == 0:
            return np.zeros(0, np.float32)
        return plane_side(pts, self.tree(), self.normals)

    # ---------------------------------------------------------------------------------------------- files
    def save(self, folder: str | os.PathLike) -> None:
        """Plain arrays and json beside the rest of the fit (its manifest hashes them)."""
        root = Path(folder)
        for name, array in zip(FILES[:4], (self.points, self.normals, self.source, self.spacing)):
            np.save(root / name, array, allow_pickle=False)
        (root / FILES[4]).write_text(
            json.dumps(
                {
                    "reach": self.reach,
                    "norms": self.norms,
                    "smooth_k": self.smooth_k,
                    "rim_spacings": self.rim_spacings,
                    "normals": ORIENTATION,
                },
                sort_keys=True,
            )
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SurfaceCues:
        """Raises ValueError (or OSError) naming what is wrong; the caller names the folder."""
        root = Path(folder)
        arrays = [np.load(root / name, allow_pickle=False) for name in FILES[:4]]
        meta = json.loads((root / FILES[4]).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{FILES[4]} does not hold a json object")
        try:
            reach = float(meta["reach"])
            norms = {str(k): float(v) for k, v in dict(meta["norms"]).items()}
            smooth_k, rim_spacings = int(meta["smooth_k"]), float(meta["rim_spacings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{FILES[4]} is incomplete ({type(exc).__name__}: {exc})") from None
        cues = cls(*arrays, reach=reach, norms=norms, smooth_k=smooth_k, rim_spacings=rim_spacings)
        if meta.get("normals") != ORIENTATION:
            # a fit made before the normals were oriented along the surface: its distances are right, its
            # sides are not where a surface faces the centroid; re-oriented here (the files stay as hashed)
            templates = [cues.points[cues.source == i] for i in np.unique(cues.source)]
            oriented = np.concatenate(_outward_normals(templates))
            order = np.argsort(cues.source, kind="stable")  # templates are stored one after the other
            cues.normals = np.empty_like(cues.normals)
            cues.normals[order] = oriented
        return cues
