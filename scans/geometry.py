"""Point-cloud geometry: kNN, farthest point sampling, voxel downsampling, normals, local shape statistics,
FPFH descriptors and rigid registration.

Everything takes and returns plain numpy arrays so callers (Point-MAE grouping, the BTF baseline, the
verbaliser)
never touch open3d objects. Open3D is used only where it is the well-kept implementation (normals, FPFH,
RANSAC,
ICP); the rest is vectorised numpy/scipy so it can be checked against brute force in the tests.

kNN uses scipy's cKDTree rather than faiss: a k-d tree is the right structure for 3 dimensions and was several
times faster here (docs/design.md has the timings); faiss is kept for the high-dimensional memory bank
(detector/bank.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

if TYPE_CHECKING:
    import open3d as o3d

__all__ = [
    "KNN_WORKERS",
    "curvature",
    "estimate_normals",
    "fpfh",
    "fps",
    "knn",
    "local_pca",
    "icp_point_to_plane",
    "register",
    "register_global",
    "roughness",
    "surface_normals",
    "voxel_downsample",
]

# cKDTree query threads. Each query is answered independently, so results do not depend on this number.
KNN_WORKERS = 2


def _as_points(points: np.ndarray, name: str = "points", min_rows: int = 1) -> np.ndarray:
    """Validate an (N, 3) finite array and return it as float64 (the precision the k-d tree and PCA use)."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name}: expected an (N, 3) array, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} points, got {arr.shape[0]}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite coordinates")
    return arr


def knn(points: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each query among `points`.

    Returns (dist, idx): `dist` float32 (Q, k) holds *Euclidean* distances (not squared), ascending;
    `idx` int64 (Q, k) indexes `points`. A query that is itself in `points` gets itself first (distance 0).
    """
    pts = _as_points(points, "points")
    qry = _as_points(queries, "queries", min_rows=0)
    if not 1 <= k <= pts.shape[0]:
        raise ValueError(f"knn: k={k} must be between 1 and the number of points ({pts.shape[0]})")
    if qry.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    dist, idx = cKDTree(pts).query(qry, k=k, workers=KNN_WORKERS)
    if k == 1:  # cKDTree drops the k axis for k=1
        dist, idx = dist[:, None], idx[:, None]
    return dist.astype(np.float32), idx.astype(np.int64)


def fps(points: np.ndarray, n: int, seed: int = 0, *, start: int | None = None) -> np.ndarray:
    """Exact farthest point sampling: `n` indices into `points`, in pick order.

    The first index is `start`, or drawn from `seed` when it is None; each next pick is the point whose
    distance to the already picked set is largest (first index wins ties, as numpy's argmax does). O(N * n)
    time and O(N) memory.
    """
    pts = _as_points(points)
    num = pts.shape[0]
    if not 1 <= n <= num:
        raise ValueError(f"fps: n={n} must be between 1 and the number of points ({num})")
    picked = np.empty(n, dtype=np.int64)
    picked[0] = np.random.default_rng(seed).integers(num) if start is None else start
    min_sq = np.full(num, np.inf)
    for i in range(1, n):
        diff = pts - pts[picked[i - 1]]
        np.minimum(min_sq, np.einsum("ij,ij->i", diff, diff), out=min_sq)
        picked[i] = int(np.argmax(min_sq))
    return picked


def voxel_downsample(points: np.ndarray, voxel: float) -> np.ndarray:
    """Indices (ascending) of one representative point per occupied voxel of edge `voxel`.

    The representative is the real input point closest to its voxel's mean (ties: lowest index), so the result
    is a subset of the scan (labels and per-point values carry over by indexing), unlike open3d's averaging.
    """
    pts = _as_points(points)
    if not voxel > 0:
        raise ValueError(f"voxel_downsample: voxel must be > 0, got {voxel}")
    keys = np.floor((pts - pts.min(axis=0)) / voxel).astype(np.int64)
    inverse = _voxel_ids(keys)
    n_vox = int(inverse.max()) + 1
    counts = np.bincount(inverse, minlength=n_vox).astype(np.float64)
    means = np.stack([np.bincount(inverse, weights=pts[:, d], minlength=n_vox) for d in range(3)], 1)
    means /= counts[:, None]
    sq = np.einsum("ij,ij->i", pts - means[inverse], pts - means[inverse])
    order = np.lexsort((np.arange(len(pts)), sq, inverse))  # by voxel, then distance, then index
    first = np.ones(len(order), dtype=bool)
    first[1:] = inverse[order[1:]] != inverse[order[:-1]]
    return np.sort(order[first])


def _voxel_ids(keys: np.ndarray) -> np.ndarray:
    """Dense id (0..V-1) of each point's voxel from its (N,3) integer voxel coordinates.

    The three coordinates are packed into one int64 when their ranges allow, because a 1-D unique is many
    times cheaper than numpy's row-wise unique (which sorts structured rows); the ids differ between the two
    ways only by a relabelling of the voxels, which the callers do not see."""
    span = keys.max(axis=0) + 1
    if float(span[0]) * float(span[1]) * float(span[2]) < 2.0**62:
        packed = (keys[:, 0] * span[1] + keys[:, 1]) * span[2] + keys[:, 2]
        return np.unique(packed, return_inverse=True)[1].reshape(-1)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def _open3d():
    """open3d, imported on first use: its import pulls in its plotly/dash viewer and costs a cold start more
    than the rest of a run's imports together, while a run that registers by ICP alone never needs it."""
    import open3d

    return open3d


def _to_o3d(points: np.ndarray) -> o3d.geometry.PointCloud:
    o3d = _open3d()
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.ascontiguousarray(points, dtype=np.float64)))


def _orient_outwards(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Flip normals to point away from the centroid: a cheap, deterministic sign convention that is right for
    closed, roughly star-shaped parts (most industrial objects); the sign does not matter to FPFH or
    curvature."""
    flip = np.einsum("ij,ij->i", normals, points - points.mean(axis=0)) < 0
    normals[flip] *= -1
    return normals


def estimate_normals(points: np.ndarray, k: int = 20) -> np.ndarray:
    """Unit normals (N, 3) float32 from the k-neighbour covariance (open3d), oriented away from the
    centroid."""
    o3d = _open3d()
    pts = _as_points(points, min_rows=3)
    if k < 3:
        raise ValueError(f"estimate_normals: k={k} must be at least 3")
    pcd = _to_o3d(pts)
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=min(k, len(pts))))
    return _orient_outwards(pts, np.asarray(pcd.normals).copy()).astype(np.float32)


def local_pca(points: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of each point's k-neighbourhood (the point included).

    Returns (centroids (N,3), eigenvalues (N,3) ascending, eigenvectors (N,3,3) with column j for eigenvalue
    j).
    Shared by curvature and roughness so both describe the same neighbourhood.
    """
    pts = _as_points(points, min_rows=3)
    if not 3 <= k <= len(pts):
        raise ValueError(f"local_pca: k={k} must be between 3 and the number of points ({len(pts)})")
    _, idx = knn(pts, pts, k)
    nbrs = pts[idx]  # (N, k, 3)
    centroids = nbrs.mean(axis=1)
    centred = nbrs - centroids[:, None, :]
    cov = np.einsum("nki,nkj->nij", centred, centred) / k
    eigval, eigvec = np.linalg.eigh(cov)
    return centroids, np.clip(eigval, 0.0, None), eigvec


def curvature(points: np.ndarray, k: int = 20) -> np.ndarray:
    """Surface variation lambda0 / (lambda0 + lambda1 + lambda2) of the k-neighbourhood, (N,) float32 in [0,
    1/3].

    0 on a plane, growing with bending; scale-free, so it reads the same for any object size.
    """
    _, eigval, _ = local_pca(points, k)
    total = eigval.sum(axis=1)
    out = np.divide(eigval[:, 0], total, out=np.zeros_like(total), where=total > 0)
    return out.astype(np.float32)


def roughness(points: np.ndarray, k: int = 20) -> np.ndarray:
    """Distance (N,) float32 of each point to the least-squares plane of its k-neighbourhood, in input units.

    Unlike curvature this keeps the scale: a 0.1 mm bump reads as 0.1 mm, which is what a dent or burr looks
    like.
    """
    pts = _as_points(points, min_rows=3)
    centroids, _, eigvec = local_pca(pts, k)
    plane_normal = eigvec[:, :, 0]
    return np.abs(np.einsum("ij,ij->i", pts - centroids, plane_normal)).astype(np.float32)


def fpfh(
    points: np.ndarray,
    radius_normal: float,
    radius_feature: float,
    *,
    max_nn_normal: int = 30,
    max_nn_feature: int = 100,
) -> np.ndarray:
    """Fast Point Feature Histograms (N, 33) float32 via open3d, with normals estimated at `radius_normal` and
    oriented away from the centroid.

    The usual choice (open3d's registration tutorial, BTF) is radius_normal = 2 * voxel and
    radius_feature = 5 * voxel for a cloud downsampled at `voxel`. A point with no neighbour inside
    radius_feature gets an all-zero histogram.
    """
    o3d = _open3d()
    pts = _as_points(points, min_rows=3)
    if not (radius_normal > 0 and radius_feature > 0):
        raise ValueError(f"fpfh: radii must be > 0, got {radius_normal}, {radius_feature}")
    pcd = _to_o3d(pts)
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius_normal, max_nn=max_nn_normal))
    # FPFH angles depend on the normals' signs; orienting them outwards makes the descriptor the same for the
    # same surface in any pose (open3d's default sign follows the coordinate axes, so it changes with
    # rotation).
    pcd.normals = o3d.utility.Vector3dVector(_orient_outwards(pts, np.asarray(pcd.normals).copy()))
    feat = o3d.pipelines.registration.compute_fpfh_feature(
        pcd, o3d.geometry.KDTreeSearchParamHybrid(radius=radius_feature, max_nn=max_nn_feature)
    )
    return np.asarray(feat.data).T.astype(np.float32)


def register(
    source: np.ndarray,
    target: np.ndarray,
    voxel: float,
    *,
    seed: int = 0,
    ransac_iterations: int = 100_000,
) -> tuple[np.ndarray, float]:
    """Rigidly align `source` to `target` from any pose: returns (4x4 float64 transform T with target ~ T @
    source, fitness).

    For a single pair of scans that are not pre-aligned (as Reg3D-AD does): both clouds are voxel-downsampled
    at `voxel`, coarsely aligned by :func:`register_global` (RANSAC on FPFH matches, seeded), then refined by
    :func:`icp_point_to_plane` on the downsampled clouds. `fitness` is the share of source points with a
    target point within 1.5 voxels (1.0 = fully overlapping). The detector's own registration
    (detector.registration) uses the same two steps with a template's data prepared once."""
    src = _as_points(source, "source", min_rows=3)
    tgt = _as_points(target, "target", min_rows=3)
    if not voxel > 0:
        raise ValueError(f"register: voxel must be > 0, got {voxel}")
    src_d = src[voxel_downsample(src, voxel)]
    tgt_d = tgt[voxel_downsample(tgt, voxel)]
    if len(src_d) < 3 or len(tgt_d) < 3:
        raise ValueError(f"register: voxel={voxel} leaves fewer than 3 points; use a smaller voxel")
    src_f, tgt_f = fpfh(src_d, 2 * voxel, 5 * voxel), fpfh(tgt_d, 2 * voxel, 5 * voxel)
    coarse = register_global(src_d, tgt_d, src_f, tgt_f, voxel, seed=seed, iterations=ransac_iterations)
    tree = cKDTree(tgt_d)
    fine = icp_point_to_plane(
        src_d, tgt_d, surface_normals(tgt_d), 1.5 * voxel, coarse, 50, target_tree=tree
    )
    moved = src_d @ fine[:3, :3].T + fine[:3, 3]
    dist, _ = tree.query(moved, k=1, distance_upper_bound=1.5 * voxel)
    return fine, float(np.mean(np.isfinite(dist)))


def surface_normals(points: np.ndarray, k: int = 20) -> np.ndarray:
    """Unit normals (N, 3) float64 of the k-neighbourhood's least-squares plane (:func:`local_pca`), oriented
    away from the centroid: what point-to-plane ICP needs of its target, computed once per template (numpy,
    so that registering by ICP does not import open3d)."""
    _, _, eigvec = local_pca(points, min(k, len(points)))
    return _orient_outwards(np.asarray(points, dtype=np.float64), eigvec[:, :, 0].copy())


def icp_point_to_plane(
    source: np.ndarray,
    target: np.ndarray,
    target_normals: np.ndarray,
    max_distance: float,
    init: np.ndarray,
    iterations: int,
    *,
    target_tree: cKDTree | None = None,
    tolerance: float = 1e-3,
) -> np.ndarray:
    """Point-to-plane ICP of ``source`` onto ``target`` from the 4x4 ``init``: the refined 4x4 transform.

    Each step pairs every moved source point with its nearest target point within ``max_distance`` and
    solves the linearised (small-angle) least squares of the pairs' distances along the target normals.
    ``target_tree`` (a cKDTree of ``target``) lets a template's tree be built once for all scans. It stops
    after ``iterations`` steps, when a step moves the points by less than ``tolerance`` x ``max_distance``
    (by default a thousandth of the pairing reach, far below the noise of a scan), or when fewer than six
    pairs are left (then the last transform is returned)."""
    src = _as_points(source, "source", min_rows=1)
    tgt = _as_points(target, "target", min_rows=1)
    normals = np.asarray(target_normals, dtype=np.float64)
    tree = cKDTree(tgt) if target_tree is None else target_tree
    transform = np.asarray(init, dtype=np.float64).copy()
    for _ in range(iterations):
        moved = src @ transform[:3, :3].T + transform[:3, 3]
        dist, idx = tree.query(moved, k=1, distance_upper_bound=max_distance)
        paired = np.isfinite(dist)
        if paired.sum() < 6:
            break
        p, q, n = moved[paired], tgt[idx[paired]], normals[idx[paired]]
        centre = p.mean(axis=0)  # rotate about the pairs' centroid: a well-conditioned system
        arm = p - centre
        design = np.hstack([np.cross(arm, n), n])  # d/d(omega, t) of (R arm + centre + t - q) . n at 0
        residual = np.einsum("ij,ij->i", p - q, n)
        try:
            step = np.linalg.solve(design.T @ design, -design.T @ residual)
        except np.linalg.LinAlgError:  # a plane or a line: the pose is not pinned down, keep the last one
            break
        update = np.eye(4)
        update[:3, :3] = _rotation(step[:3])
        update[:3, 3] = centre - update[:3, :3] @ centre + step[3:]
        transform = update @ transform
        shift = np.linalg.norm(step[3:]) + np.linalg.norm(step[:3]) * np.linalg.norm(arm, axis=1).max()
        if shift < tolerance * max_distance:
            break
    return transform


def _rotation(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (Rodrigues)."""
    angle = float(np.linalg.norm(rotvec))
    if angle < 1e-12:
        return np.eye(3)
    k = rotvec / angle
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def register_global(
    source: np.ndarray,
    target: np.ndarray,
    source_fpfh: np.ndarray,
    target_fpfh: np.ndarray,
    voxel: float,
    *,
    seed: int = 0,
    iterations: int = 100_000,
) -> np.ndarray:
    """Coarse pose of ``source`` onto ``target`` (both already at ``voxel``) by RANSAC on mutual FPFH matches.
    The FPFH (radii 2 and 5 voxels, :func:`fpfh`) are passed in, so a template's are
    computed once and a scan's once for several rounds. RANSAC stops early at 0.999 confidence."""
    o3d = _open3d()
    src = _as_points(source, "source", min_rows=3)
    tgt = _as_points(target, "target", min_rows=3)
    reg = o3d.pipelines.registration

    def features(arr: np.ndarray) -> o3d.pipelines.registration.Feature:
        feat = reg.Feature()
        feat.data = np.ascontiguousarray(arr.T, dtype=np.float64)
        return feat

    o3d.utility.random.seed(seed)
    match_dist = 1.5 * voxel
    coarse = reg.registration_ransac_based_on_feature_matching(
        _to_o3d(src),
        _to_o3d(tgt),
        features(source_fpfh),
        features(target_fpfh),
        True,  # mutual filter: keeps only reciprocal feature matches, far fewer outliers
        match_dist,
        reg.TransformationEstimationPointToPoint(False),
        3,
        [
            reg.CorrespondenceCheckerBasedOnEdgeLength(0.9),
            reg.CorrespondenceCheckerBasedOnDistance(match_dist),
        ],
        reg.RANSACConvergenceCriteria(iterations, 0.999),
    )
    return np.asarray(coarse.transformation, dtype=np.float64).copy()
