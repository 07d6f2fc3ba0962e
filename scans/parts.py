"""Procedural industrial parts as triangle meshes, plus scan-like surface sampling.

Why procedural parts: the public benchmarks (Anomaly-ShapeNet, Real3D-AD) cannot be downloaded here, yet the
detector
and the agent need classes with machined geometry (bores, bolt holes, teeth, fillets, keyways) to be developed
on.

How they are built without a boolean engine (trimesh booleans need manifold3d/blender, shapely and earcut are
not
installed): every part is a union of *prisms* (a 2D region with holes, triangulated by Delaunay on boundary +
interior
samples and extruded) or *swept tubes*. A union is made watertight-ish by dropping the faces of one solid that
lie
inside (or on the surface of) another solid: each face's centroid is nudged along its outward normal and
tested with the
other solids' exact inside functions. Touching faces thus cancel pairwise, which is what a boolean union would
do.

A part is a function of its class only (no seed): every sample of a class is the same part, and samples differ
only by
surface sampling, sensor noise along the normal and a small pose change (`scan_like`), as real scans of one
part do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trimesh
from matplotlib.path import Path as MplPath
from scipy.spatial import Delaunay, cKDTree

InsideFn = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------------------
# 2D regions and prisms
# ------------------------------------------------------------------------------------------------------------
def circle(center: tuple[float, float], radius: float, segments: int = 96) -> np.ndarray:
    """Closed polyline (counter-clockwise, last vertex not repeated) approximating a circle."""
    t = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=1)


def rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


@dataclass(frozen=True)
class Region2D:
    """A planar region given by closed loops under the even-odd rule (outer outline plus holes)."""

    loops: tuple[np.ndarray, ...]

    def contains(self, xy: np.ndarray) -> np.ndarray:
        inside_count = np.zeros(len(xy), dtype=int)
        for loop in self.loops:
            inside_count += MplPath(loop).contains_points(xy)
        return inside_count % 2 == 1

    def boundary_samples(self, spacing: float) -> np.ndarray:
        """Points along every loop, each edge split evenly so that corners are kept exactly."""
        pieces = []
        for loop in self.loops:
            nxt = np.roll(loop, -1, axis=0)
            for a, b in zip(loop, nxt):
                steps = max(1, int(np.ceil(np.linalg.norm(b - a) / spacing)))
                t = np.arange(steps)[:, None] / steps
                pieces.append(a + t * (b - a))
        return np.concatenate(pieces)


def triangulate_region(region: Region2D, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Delaunay triangulation of boundary + interior grid samples, keeping triangles whose centroid is inside.

    Returns (vertices (V,2), counter-clockwise faces (F,3)). The boundary is sampled at `spacing`, so features
    must be
    a few spacings wide for the centroid test to carve them correctly.
    """
    boundary = region.boundary_samples(spacing)
    lo, hi = boundary.min(0), boundary.max(0)
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0], spacing), np.arange(lo[1], hi[1], spacing * np.sqrt(3) / 2))
    gx = gx + (np.arange(gx.shape[0])[:, None] % 2) * spacing / 2  # hexagonal grid: well-shaped triangles
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    grid = grid[region.contains(grid)]
    if len(grid):
        far, _ = cKDTree(boundary).query(grid)
        grid = grid[far > 0.6 * spacing]
    vertices = np.concatenate([boundary, grid])
    faces = Delaunay(vertices).simplices
    tri = vertices[faces]
    keep = region.contains(tri.mean(axis=1))
    faces, tri = faces[keep], tri[keep]
    signed = 0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    faces = faces[np.abs(signed) > 1e-9 * spacing**2]
    signed = signed[np.abs(signed) > 1e-9 * spacing**2]
    faces[signed < 0] = faces[signed < 0][:, ::-1]
    return vertices, faces


@dataclass(frozen=True)
class Solid:
    """A closed mesh together with an exact inside test (used to cull faces when solids are united)."""

    mesh: trimesh.Trimesh
    inside: InsideFn


def prism(region: Region2D, z0: float, z1: float, spacing: float, frame: np.ndarray | None = None) -> Solid:
    """Extrude `region` from z0 to z1 in its local frame, then place it with the 4x4 `frame`.

    Side walls follow the boundary edges of the 2D triangulation (edges used by exactly one triangle),
    oriented so
    their normals point out of the region, and are split into rows about `spacing` tall.
    """
    v2, f2 = triangulate_region(region, spacing)
    n2 = len(v2)
    rows = max(1, int(np.ceil((z1 - z0) / spacing)))
    levels = np.linspace(z0, z1, rows + 1)
    # vertex layout: level j occupies [j*n2, (j+1)*n2)
    verts = np.concatenate([np.column_stack([v2, np.full(n2, z)]) for z in levels])
    bottom = f2[:, ::-1]
    top = f2 + rows * n2
    edges = np.concatenate([f2[:, [0, 1]], f2[:, [1, 2]], f2[:, [2, 0]]])
    key = np.sort(edges, axis=1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    border = edges[counts[inverse.ravel()] == 1]  # directed as in the CCW triangle: interior on the left
    walls = []
    for j in range(rows):
        a0, b0 = border[:, 0] + j * n2, border[:, 1] + j * n2
        a1, b1 = a0 + n2, b0 + n2
        walls.append(np.column_stack([a0, b0, b1]))
        walls.append(np.column_stack([a0, b1, a1]))
    faces = np.concatenate([bottom, top, *walls])
    frame = np.eye(4) if frame is None else np.asarray(frame, dtype=float)
    mesh = trimesh.Trimesh(verts, faces, process=True)
    mesh.apply_transform(frame)
    inverse_frame = np.linalg.inv(frame)

    def inside(points: np.ndarray) -> np.ndarray:
        local = points @ inverse_frame[:3, :3].T + inverse_frame[:3, 3]
        in_z = (local[:, 2] > z0) & (local[:, 2] < z1)
        result = np.zeros(len(points), dtype=bool)
        if in_z.any():
            result[in_z] = region.contains(local[in_z, :2])
        return result

    return Solid(mesh, inside)


def union(solids: list[Solid], nudge: float) -> trimesh.Trimesh:
    """Concatenate solids, dropping faces that lie inside or on another solid (see module docstring)."""
    kept = []
    for i, solid in enumerate(solids):
        mesh = solid.mesh
        probe = mesh.triangles_center + nudge * mesh.face_normals
        covered = np.zeros(len(mesh.faces), dtype=bool)
        for j, other in enumerate(solids):
            if j != i:
                covered |= other.inside(probe)
        part = mesh.copy()
        part.update_faces(~covered)
        part.remove_unreferenced_vertices()
        kept.append(part)
    merged = trimesh.util.concatenate(kept)
    merged.merge_vertices()
    return merged


def _frame(origin: np.ndarray, x_axis: np.ndarray, y_axis: np.ndarray) -> np.ndarray:
    """4x4 placing local x, y (and z = x cross y) at `origin`."""
    x = np.asarray(x_axis, float) / np.linalg.norm(x_axis)
    y = np.asarray(y_axis, float) / np.linalg.norm(y_axis)
    frame = np.eye(4)
    frame[:3, 0], frame[:3, 1], frame[:3, 2], frame[:3, 3] = x, y, np.cross(x, y), origin
    return frame


# ------------------------------------------------------------------------------------------------------------
# Parts (units: millimetres)
# ------------------------------------------------------------------------------------------------------------
def flange() -> trimesh.Trimesh:
    """Disc with a bore, six bolt holes on a pitch circle, and a raised hub around the bore."""
    s = 1.5
    holes = [circle((38 * np.cos(a), 38 * np.sin(a)), 4.5, 32) for a in np.arange(6) * np.pi / 3]
    disc = Region2D((circle((0, 0), 50, 160), circle((0, 0), 15, 64), *holes))
    hub = Region2D((circle((0, 0), 26, 96), circle((0, 0), 15, 64)))
    return union([prism(disc, 0, 10, s), prism(hub, 10, 22, s)], nudge=0.05)


def gear_outline(teeth: int, module: float, pressure_deg: float = 20.0, flank_samples: int = 8) -> np.ndarray:
    """Spur gear outline with involute flanks (counter-clockwise)."""
    rp = module * teeth / 2
    ra, rf = rp + module, rp - 1.25 * module
    rb = rp * np.cos(np.radians(pressure_deg))

    def inv(r: np.ndarray) -> np.ndarray:  # involute function of the pressure angle at radius r
        alpha = np.arccos(np.clip(rb / r, -1, 1))
        return np.tan(alpha) - alpha

    half_pitch_angle = np.pi / (2 * teeth) + inv(np.array(rp))
    radii = np.linspace(max(rb, rf), ra, flank_samples)
    flank = half_pitch_angle - inv(radii)  # polar angle of the right flank (tooth centred on angle 0)
    pts = []
    for k in range(teeth):
        centre = 2 * np.pi * k / teeth
        right = [(r, centre - a) for r, a in zip(radii, flank)]
        left = [(r, centre + a) for r, a in zip(radii[::-1], flank[::-1])]
        if rb > rf:  # radial line from the root circle up to the base circle
            right = [(rf, centre - flank[0])] + right
            left = left + [(rf, centre + flank[0])]
        pts.extend(right + left)
        # root arc towards the next tooth
        a0, a1 = centre + flank[0], centre + 2 * np.pi / teeth - flank[0]
        for a in np.linspace(a0, a1, 5)[1:-1]:
            pts.append((rf, a))
    pts = np.array(pts)
    return np.stack([pts[:, 0] * np.cos(pts[:, 1]), pts[:, 0] * np.sin(pts[:, 1])], axis=1)


def keyed_circle(radius: float, key_half_width: float, key_x: float, segments: int = 96) -> np.ndarray:
    """Circle with a rectangular key slot centred on +x reaching to x = key_x.

    key_x > radius cuts the slot outward (keyway in a bore); key_x < radius cuts it inward (keyway in a
    shaft).
    """
    a0 = np.arcsin(key_half_width / radius)
    t = np.linspace(a0, 2 * np.pi - a0, segments)
    arc = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    x0 = radius * np.cos(a0)
    return np.concatenate([arc, [[key_x, -key_half_width], [key_x, key_half_width]]]) if key_x != x0 else arc


def gear() -> trimesh.Trimesh:
    """Spur gear, 18 teeth of module 4, 18 mm face width, bore with a keyway."""
    region = Region2D((gear_outline(18, 4.0), keyed_circle(10.0, 3.0, 13.0, 64)))
    return prism(region, 0, 18, 1.2).mesh


def bracket() -> trimesh.Trimesh:
    """L-bracket: base plate and upright plate with holes, joined by a fillet on the inner corner."""
    t, width, length, height, r = 8.0, 40.0, 70.0, 60.0, 8.0
    s = 1.5
    base = Region2D(
        (
            rectangle(t, 0, length, width),
            circle((45, 12), 4.0, 40),
            circle((45, 28), 4.0, 40),
            circle((60, 20), 4.0, 40),
        )
    )
    base_solid = prism(base, 0, t, s)
    # upright: local (x, y) = world (y, z), extruded along world +x from 0 to t
    upright = Region2D((rectangle(0, 0, width, height), circle((12, 42), 4.0, 40), circle((28, 42), 4.0, 40)))
    upright_solid = prism(upright, 0, t, s, frame=_frame(np.zeros(3), [0, 1, 0], [0, 0, 1]))
    # fillet: the square [t, t+r]^2 in world (x, z) minus the disc centred at (t+r, t+r)
    a = np.linspace(-np.pi / 2, -np.pi, 16)
    arc = np.stack([t + r + r * np.cos(a), t + r + r * np.sin(a)], axis=1)
    fillet_region = Region2D((np.concatenate([[[t, t]], arc]),))
    # local x -> world x, local y -> world z, so local z -> world -y: extrude over [-width, 0] to span y in
    # [0, width]
    fillet_solid = prism(fillet_region, -width, 0, s * 0.5, frame=_frame(np.zeros(3), [1, 0, 0], [0, 0, 1]))
    return union([base_solid, upright_solid, fillet_solid], nudge=0.05)


def _tube_grid(
    path: np.ndarray, normals: np.ndarray, binormals: np.ndarray, radius: float, around: int, outward: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Quad grid of a circle of `radius` swept along `path`; faces point away from (outward) or to the
    axis."""
    phi = np.linspace(0, 2 * np.pi, around, endpoint=False)
    ring = (
        np.cos(phi)[None, :, None] * normals[:, None, :] + np.sin(phi)[None, :, None] * binormals[:, None, :]
    )
    verts = (path[:, None, :] + radius * ring).reshape(-1, 3)
    m = len(path)
    i, j = np.meshgrid(np.arange(m - 1), np.arange(around), indexing="ij")
    a = i * around + j
    b = i * around + (j + 1) % around
    c = (i + 1) * around + (j + 1) % around
    d = (i + 1) * around + j
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return verts, (faces if outward else faces[:, ::-1])


def pipe_elbow() -> trimesh.Trimesh:
    """90-degree pipe elbow: two straight legs joined by a bend (outer radius 12, wall 3, bend radius 40)."""
    ro, ri, bend, leg, around = 12.0, 9.0, 40.0, 30.0, 72
    # centreline in the x-z plane: leg along +z from (bend, 0, -leg) to (bend, 0, 0), arc about the y axis to
    # (0, 0, bend), leg along -x to (-leg, 0, bend)
    z_leg = np.linspace(-leg, 0, 16)
    arc_t = np.linspace(0, np.pi / 2, 48)[1:]
    x_leg = np.linspace(0, -leg, 16)[1:]
    path = np.concatenate(
        [
            np.column_stack([np.full_like(z_leg, bend), np.zeros_like(z_leg), z_leg]),
            np.column_stack([bend * np.cos(arc_t), np.zeros_like(arc_t), bend * np.sin(arc_t)]),
            np.column_stack([x_leg, np.zeros_like(x_leg), np.full_like(x_leg, bend)]),
        ]
    )
    tangent_angle = np.concatenate([np.zeros_like(z_leg), arc_t, np.full_like(x_leg, np.pi / 2)])
    tangents = np.column_stack([-np.sin(tangent_angle), np.zeros_like(tangent_angle), np.cos(tangent_angle)])
    binormals = np.tile([0.0, 1.0, 0.0], (len(path), 1))
    normals = np.cross(binormals, tangents)
    vo, fo = _tube_grid(path, normals, binormals, ro, around, outward=True)
    vi, fi = _tube_grid(path, normals, binormals, ri, around, outward=False)
    n_ring, offset = around, len(vo)
    caps = []
    for ring_index, flip in ((0, True), (len(path) - 1, False)):
        j = np.arange(around)
        o0, o1 = ring_index * n_ring + j, ring_index * n_ring + (j + 1) % around
        i0, i1 = offset + o0, offset + o1
        cap = np.concatenate([np.column_stack([o0, i0, i1]), np.column_stack([o0, i1, o1])])
        caps.append(cap if flip else cap[:, ::-1])
    mesh = trimesh.Trimesh(np.concatenate([vo, vi]), np.concatenate([fo, fi + offset, *caps]), process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def hex_nut() -> trimesh.Trimesh:
    """M16-like hex nut: 24 mm across flats, 13 mm tall, with a round washer face under it."""
    corner = 24.0 / np.sqrt(3)
    hexagon = np.array([[corner * np.cos(a), corner * np.sin(a)] for a in np.arange(6) * np.pi / 3])
    bore = circle((0, 0), 8.0, 64)
    body = prism(Region2D((hexagon, bore)), 1.0, 14.0, 0.8)
    washer = prism(Region2D((circle((0, 0), 11.0, 96), bore)), 0.0, 1.0, 0.8)
    return union([body, washer], nudge=0.02)


def shaft() -> trimesh.Trimesh:
    """Stepped shaft with a keyway on the first journal, a shoulder and a thinner end."""
    s = 1.0
    journal = circle((0, 0), 10, 96)
    keyed = keyed_circle(10.0, 3.0, 6.5, 96)
    solids = [
        prism(Region2D((journal,)), 0, 8, s),
        prism(Region2D((keyed,)), 8, 32, s),
        prism(Region2D((journal,)), 32, 40, s),
        prism(Region2D((circle((0, 0), 14, 128),)), 40, 62, s),
        prism(Region2D((circle((0, 0), 8, 80),)), 62, 85, s),
    ]
    return union(solids, nudge=0.02)


PARTS: dict[str, Callable[[], trimesh.Trimesh]] = {
    "flange": flange,
    "gear": gear,
    "bracket": bracket,
    "pipe_elbow": pipe_elbow,
    "hex_nut": hex_nut,
    "shaft": shaft,
}

_MESH_CACHE: dict[str, trimesh.Trimesh] = {}


def part_mesh(name: str) -> trimesh.Trimesh:
    """The mesh of a procedural part class (built once per process; callers must not modify it)."""
    if name not in PARTS:
        raise KeyError(f"unknown part {name!r}; known: {', '.join(PARTS)}")
    if name not in _MESH_CACHE:
        _MESH_CACHE[name] = PARTS[name]()
    return _MESH_CACHE[name]


# ------------------------------------------------------------------------------------------------------------
# Sampling and scan simulation
# ------------------------------------------------------------------------------------------------------------
def sample_surface(mesh: trimesh.Trimesh, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform samples on the surface with the normal of the face each point lies on."""
    points, face_index = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points, dtype=np.float64), np.asarray(mesh.face_normals[face_index], dtype=np.float64)


def extent(points: np.ndarray) -> float:
    """Largest side of the axis-aligned bounding box: the length scale for noise and defect sizes."""
    return float(np.max(points.max(axis=0) - points.min(axis=0)))


def scan_like(
    points: np.ndarray,
    normals: np.ndarray,
    seed: int,
    *,
    noise: float = 0.003,
    max_rotation_deg: float = 4.0,
    max_shift: float = 0.01,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sensor-like copy: Gaussian noise along the normal (sigma = noise * extent) and a small random pose
    change.

    The pose change is a rotation of 1..max_rotation_deg degrees about a random axis through the centroid plus
    a shift
    of up to max_shift * extent per axis: what separates two scans of one part on a fixture. `scale` fixes the
    extent
    used (so a defective copy gets the same noise as its normal siblings).
    """
    rng = np.random.default_rng(seed)
    size = extent(points) if scale is None else scale
    noisy = points + rng.normal(0.0, noise * size, size=(len(points), 1)) * normals
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = (
        np.radians(rng.uniform(min(1.0, max_rotation_deg), max_rotation_deg)) if max_rotation_deg > 0 else 0.0
    )
    rotation = trimesh.transformations.rotation_matrix(angle, axis)[:3, :3]
    centre = points.mean(axis=0)
    shift = rng.uniform(-max_shift, max_shift, size=3) * size
    moved = (noisy - centre) @ rotation.T + centre + shift
    return moved, normals @ rotation.T
