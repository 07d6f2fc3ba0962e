"""Defect synthesis on point clouds with per-point ground truth, deterministic by seed.

Why: the detector and the agent need labelled defects on parts we can generate here. The defect kinds and
their size
follow Anomaly-ShapeNet (bulge, concavity, crack, hole, broken; 1-7 % of points anomalous) plus a shallow
scratch.
Sizes are relative to the object (its largest bounding-box side), amplitudes well above the simulated sensor
noise
(0.3 % of the size), and every region is chosen by *rank* (the k points nearest to a centre or curve along the
surface), so the anomalous share is controlled directly and does not depend on point density or units.

Distances "along the surface" are shortest paths in a k-nearest-neighbour graph (scipy Dijkstra), so a region
on one
face of a thin plate does not leak through to the opposite face; deformations additionally skip points whose
normal
faces away from the defect's normal.

Labels: a deformed point is anomalous when its displacement exceeds 10 % of the defect's peak amplitude (the
flat
rim of a smooth bump cannot be told apart from a normal surface, so labelling it would only cap point AUROC).
Holes: removed points cannot carry a label, so the ring of remaining points around the hole is labelled
anomalous.
Anomaly-ShapeNet makes holes by deleting mesh faces and marks points on the hole's border; we could not
confirm the
exact ring width from the stored paper text, so the ring here holds ~1.5-3 % of the points. Broken: points
beyond a
plane are removed; on a closed surface with outward normals (``solid=True``) the new cut face is sampled at
the
cloud's density and labelled, together with a thin band of old points along the break; on an open single-view
scan only
that band is labelled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

DEFECT_TYPES: tuple[str, ...] = ("bulge", "concavity", "crack", "hole", "broken", "scratch")
LABEL_FRACTION = (
    0.1  # a displaced point is anomalous when moved by more than this fraction of the peak amplitude
)


def extent(points: np.ndarray) -> float:
    """Largest side of the axis-aligned bounding box."""
    return float(np.max(points.max(axis=0) - points.min(axis=0)))


def estimate_normals(points: np.ndarray, *, viewpoint: np.ndarray | None = None, k: int = 20) -> np.ndarray:
    """Unit normals by local PCA (open3d), oriented toward `viewpoint` (single-view scans) or outward.

    Without a viewpoint the orientation is made consistent over the tangent-plane graph and then flipped so
    most
    normals point away from the centroid: right for closed, roughly star-shaped objects.
    """
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=k))
    if viewpoint is not None:
        cloud.orient_normals_towards_camera_location(np.asarray(viewpoint, dtype=np.float64))
        return np.asarray(cloud.normals)
    cloud.orient_normals_consistent_tangent_plane(k)
    normals = np.asarray(cloud.normals)
    outward = np.einsum("ij,ij->i", normals, points - points.mean(axis=0))
    return -normals if np.mean(outward > 0) < 0.5 else normals


def _surface_graph(points: np.ndarray, k: int = 10):
    """Symmetric kNN graph with Euclidean edge weights (for geodesic distances)."""
    k = min(k, len(points) - 1)
    dist, idx = cKDTree(points).query(points, k=k + 1)
    rows = np.repeat(np.arange(len(points)), k)
    graph = coo_matrix((dist[:, 1:].ravel() + 1e-12, (rows, idx[:, 1:].ravel())), shape=(len(points),) * 2)
    return graph.tocsr().maximum(graph.T.tocsr())


def geodesic_from(points: np.ndarray, source: int) -> np.ndarray:
    """Shortest-path distances along the kNN graph from one point (inf where unreachable)."""
    return dijkstra(_surface_graph(points), indices=source, directed=False)


def _rank_region(distance: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` smallest finite distances."""
    finite = np.flatnonzero(np.isfinite(distance))
    count = int(min(max(count, 1), len(finite)))
    return finite[np.argsort(distance[finite], kind="stable")[:count]]


def _pick_centre(points: np.ndarray, normals: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A random point and the mean normal of its neighbourhood (a stable displacement direction)."""
    centre = int(rng.integers(len(points)))
    _, near = cKDTree(points).query(points[centre], k=min(30, len(points)))
    direction = normals[near].sum(axis=0)
    norm = np.linalg.norm(direction)
    direction = normals[centre] if norm < 1e-9 else direction / norm
    return centre, direction


def _tangent_basis(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to `normal`."""
    v = rng.normal(size=3)
    v -= v.dot(normal) * normal
    return v / np.linalg.norm(v)


def _surface_curve(
    points: np.ndarray,
    normals: np.ndarray,
    tree: cKDTree,
    start: int,
    length: float,
    wiggle_deg: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Walk along the surface: step, turn by a random angle in the tangent plane, snap to the nearest point.

    Returns the dense curve (M, 3) and the index of the surface point nearest each curve sample.
    """
    steps = 60
    step = length / steps
    nn_dist, _ = tree.query(points[:: max(1, len(points) // 2000)], k=2)
    off_surface = 3.0 * float(np.median(nn_dist[:, 1])) + step
    position, index = points[start].copy(), start
    direction = _tangent_basis(normals[start], rng)
    curve, nearest = [position.copy()], [index]
    for _ in range(steps):
        normal = normals[index]
        turn = np.radians(rng.normal(0.0, wiggle_deg))
        side = np.cross(normal, direction)
        direction = np.cos(turn) * direction + np.sin(turn) * side
        direction -= direction.dot(normal) * normal
        direction /= max(np.linalg.norm(direction), 1e-12)
        # move continuously, then project onto the tangent plane of the nearest surface point (no snapping, so
        # steps shorter than the point spacing still advance)
        target = position + step * direction
        _, index = tree.query(target)
        q, n = points[index], normals[index]
        target = target - (target - q).dot(n) * n
        if (
            np.linalg.norm(target - q) > off_surface
        ):  # walked off an open border: stay on it and turn along it
            target = q.copy()
            direction = np.cross(n, direction) * rng.choice([-1.0, 1.0])
        moved = target - position
        if np.linalg.norm(moved) > 1e-12:
            direction = moved / np.linalg.norm(moved)
        position = target
        curve.append(position.copy())
        nearest.append(int(index))
    curve = np.asarray(curve)
    # densify so the distance to the curve is not quantised by the step
    t = np.linspace(0, 1, 6)[:-1, None]
    dense = np.concatenate([(curve[:-1, None] * (1 - t) + curve[1:, None] * t).reshape(-1, 3), curve[-1:]])
    dense_nearest = np.concatenate([np.repeat(nearest[:-1], 5), nearest[-1:]])
    return dense, dense_nearest


def _deform(
    points: np.ndarray, normals: np.ndarray, rng: np.random.Generator, kind: str, share: float, size: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Bulge or concavity: a smooth bump (1 - u^2)^2 along the mean normal of the region."""
    centre, direction = _pick_centre(points, normals, rng)
    geodesic = geodesic_from(points, centre)
    # (1-u^2)^2 > 0.1 for u < 0.827, which holds ~68 % of a disc's area: enlarge the region so the labelled
    # share
    # matches the target
    facing = (
        normals @ direction > 0.2
    )  # do not bend the far side of a thin wall or the back of a small cylinder
    region = _rank_region(np.where(facing, geodesic, np.inf), round(share / 0.68 * len(points)))
    radius = float(geodesic[region].max()) if len(region) else 0.0
    amplitude = float(min(rng.uniform(0.03, 0.06) * size, 0.6 * radius))
    u = geodesic[region] / max(radius, 1e-12)
    height = amplitude * (1 - u**2) ** 2
    sign = 1.0 if kind == "bulge" else -1.0
    moved = points.copy()
    moved[region] += sign * height[:, None] * direction
    mask = np.zeros(len(points), dtype=bool)
    mask[region[height > LABEL_FRACTION * amplitude]] = True
    info = {
        "centre": points[centre].tolist(),
        "size": radius,
        "amplitude": sign * amplitude,
        "direction": direction.tolist(),
    }
    return moved, mask, info


def _groove(
    points: np.ndarray, normals: np.ndarray, rng: np.random.Generator, kind: str, share: float, size: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Crack (wiggly, deep, V-shaped) or scratch (nearly straight, long, shallow) pressed into the surface."""
    tree = cKDTree(points)
    centre, _ = _pick_centre(points, normals, rng)
    if kind == "crack":
        length, wiggle, depth = rng.uniform(0.45, 0.7) * size, 12.0, rng.uniform(0.02, 0.035) * size
    else:
        length, wiggle, depth = rng.uniform(0.4, 0.6) * size, 1.5, rng.uniform(0.008, 0.012) * size
    curve, curve_nearest = _surface_curve(points, normals, tree, centre, length, wiggle, rng)
    distance, nearest_sample = cKDTree(curve).query(points)
    # skip points on the far side of thin walls: their normal disagrees with the surface under the curve
    facing = np.einsum("ij,ij->i", normals, normals[curve_nearest[nearest_sample]]) > 0.3
    distance = np.where(facing, distance, np.inf)
    region = _rank_region(distance, round(share / 0.9 * len(points)))
    width = float(distance[region].max())
    u = distance[region] / max(width, 1e-12)
    profile = (1 - u) if kind == "crack" else np.cos(0.5 * np.pi * u)  # V-shaped crack, rounded scratch
    moved = points.copy()
    moved[region] -= (depth * profile)[:, None] * normals[region]
    mask = np.zeros(len(points), dtype=bool)
    mask[region[profile > LABEL_FRACTION]] = True
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
    middle = curve[int(np.searchsorted(arc, arc[-1] / 2))]
    # centre = arc-length midpoint and size = curve length: every labelled point is within size/2 + width/2 of
    # it
    info = {
        "centre": middle.tolist(),
        "size": float(arc[-1]),
        "width": 2 * width,
        "depth": float(depth),
        "start": curve[0].tolist(),
        "end": curve[-1].tolist(),
    }
    return moved, mask, info


def _hole(
    points: np.ndarray, normals: np.ndarray, rng: np.random.Generator, share: float, size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Remove a surface patch; label the ring of remaining points around it."""
    del size
    centre, _ = _pick_centre(points, normals, rng)
    geodesic = geodesic_from(points, centre)
    removed_share = rng.uniform(0.02, 0.05)
    order = _rank_region(geodesic, round((removed_share + share) * len(points)))
    n_removed = round(removed_share * len(points))
    removed, ring = order[:n_removed], order[n_removed:]
    keep = np.ones(len(points), dtype=bool)
    keep[removed] = False
    mask = np.zeros(len(points), dtype=bool)
    mask[ring] = True
    info = {
        "centre": points[centre].tolist(),
        "size": float(geodesic[removed].max()),
        "removed_points": int(n_removed),
    }
    return keep, mask, normals, info


def _cut_face(
    points: np.ndarray,
    normals: np.ndarray,
    origin: np.ndarray,
    axis: np.ndarray,
    spacing: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Points filling the cross-section of the closed surface with the plane (origin, axis), at the cloud's
    density.

    A plane point q is inside the solid when it lies behind its nearest surface point p, i.e. (q - p) . n_p <
    0.
    """
    u = np.cross(axis, [1.0, 0.0, 0.0])
    if np.linalg.norm(u) < 0.1:
        u = np.cross(axis, [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    band = np.abs((points - origin) @ axis) < 3 * spacing
    if not band.any():
        return np.empty((0, 3))
    local = np.stack([(points[band] - origin) @ u, (points[band] - origin) @ v], axis=1)
    lo, hi = local.min(0) - spacing, local.max(0) + spacing
    gu, gv = np.meshgrid(np.arange(lo[0], hi[0], spacing), np.arange(lo[1], hi[1], spacing))
    grid = np.stack([gu.ravel(), gv.ravel()], axis=1) + rng.uniform(0, spacing, size=(gu.size, 2))
    candidates = origin + grid[:, :1] * u + grid[:, 1:] * v
    _, nearest = cKDTree(points).query(candidates)
    inside = np.einsum("ij,ij->i", candidates - points[nearest], normals[nearest]) < 0
    return candidates[inside]


def _broken(
    points: np.ndarray, normals: np.ndarray, rng: np.random.Generator, share: float, size: float, solid: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Cut away the part beyond a plane near a random point; sample and label the new face (closed
    surfaces)."""
    del size
    centre, _ = _pick_centre(points, normals, rng)
    centroid = points.mean(axis=0)
    axis = points[centre] - centroid
    axis = axis / max(np.linalg.norm(axis), 1e-12) + rng.normal(0, 0.2, size=3)
    axis /= np.linalg.norm(axis)
    height = (points - centroid) @ axis
    nn_dist, _ = cKDTree(points).query(points, k=2)
    spacing = 2.0 * float(
        np.median(nn_dist[:, 1])
    )  # mean spacing of uniform random samples ~ 2x the NN distance
    best = None
    for cut_share in (0.08, 0.06, 0.045, 0.03, 0.02, 0.012, 0.006):
        offset = float(np.quantile(height, 1 - cut_share))
        keep = height <= offset
        origin = centroid + offset * axis
        face = (
            _cut_face(points[keep], normals[keep], origin, axis, spacing, rng) if solid else np.empty((0, 3))
        )
        if solid:
            band = keep & (height > offset - 0.75 * spacing)
        else:  # no cut face on an open surface: label the points along the break, as many as the target share
            band = np.zeros(len(points), dtype=bool)
            band[_rank_region(np.where(keep, offset - height, np.inf), round(share * keep.sum()))] = True
        labelled = len(face) + int(band.sum())
        total = int(keep.sum()) + len(face)
        best = (keep, face, band, origin, cut_share)
        if labelled / total <= share * 1.6:
            break
    keep, face, band, origin, cut_share = best
    kept_points = points[keep]
    new_points = np.concatenate([kept_points, face])
    new_normals = np.concatenate([normals[keep], np.tile(axis, (len(face), 1))])
    mask = np.concatenate([band[keep], np.ones(len(face), dtype=bool)])
    info = {
        "centre": origin.tolist(),
        "size": extent(new_points[mask]) if mask.any() else 0.0,
        "plane_normal": axis.tolist(),
        "removed_points": int((~keep).sum()),
        "cut_face_points": len(face),
        "cut_share": cut_share,
    }
    return new_points, mask, new_normals, info


MAX_SEVERITY = 4.0  # beyond it a bulge's amplitude is capped by its radius anyway and holes eat the part


def check_severity(severity: float) -> None:
    """The one bound on a severity (the benchmark's --severity, each end of the episodes' range)."""
    if not (np.isfinite(severity) and 0.0 < severity <= MAX_SEVERITY):
        raise ValueError(f"severity must be in (0, {MAX_SEVERITY:g}], got {severity}")


def make_defect(
    points: np.ndarray,
    normals: np.ndarray | None,
    kind: str,
    seed: int,
    *,
    solid: bool = True,
    share: float | None = None,
    scale: float | None = None,
    severity: float = 1.0,
    return_normals: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | tuple:
    """Apply one defect of `kind` to a clean cloud; returns (points, mask, info) [+ normals if asked].

    points (N,3) and outward unit normals (estimated with open3d when None). `share` is the target anomalous
    share
    (default: random in 2-5 %, 1.2-2.5 % for cracks and scratches). `scale` overrides the object size used for
    amplitudes.
    `severity` multiplies both the amplitudes and the default share (0.5: half as deep and half as wide, for a
    benchmark of subtler defects; the random draws are the same, so a defect sits where severity 1 puts it; a
    groove is also shorter).
    `solid` says the cloud samples a closed surface with outward normals (enables the cut face of `broken`).
    info holds JSON-ready values: type, centre, size (defect extent in the cloud's units), share (labelled
    fraction
    of the returned points) and kind-specific amplitudes.
    """
    if kind not in DEFECT_TYPES:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_TYPES)}")
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 200:
        raise ValueError(f"defect synthesis needs an (N>=200, 3) point array, got {points.shape}")
    normals = estimate_normals(points) if normals is None else np.asarray(normals, dtype=np.float64)
    check_severity(severity)
    rng = np.random.default_rng(seed)
    size = (extent(points) if scale is None else float(scale)) * severity
    if share is None:
        share = rng.uniform(0.012, 0.025) if kind in ("scratch", "crack") else rng.uniform(0.02, 0.05)
        share *= severity
    if kind in ("bulge", "concavity"):
        new_points, mask, info = _deform(points, normals, rng, kind, share, size)
        new_normals = normals
    elif kind in ("crack", "scratch"):
        new_points, mask, info = _groove(points, normals, rng, kind, share, size)
        new_normals = normals
    elif kind == "hole":
        keep, mask, _, info = _hole(points, normals, rng, share, size)
        new_points, mask, new_normals = points[keep], mask[keep], normals[keep]
    else:
        new_points, mask, new_normals, info = _broken(points, normals, rng, share, size, solid)
    info = {"type": kind, **info, "share": float(mask.mean()), "anomalous_points": int(mask.sum())}
    if return_normals:
        return new_points, mask, info, new_normals
    return new_points, mask, info
