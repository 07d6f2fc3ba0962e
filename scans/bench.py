"""Build a dev benchmark in the exact Anomaly-ShapeNet layout from parts and shapes available offline.

Why: the public benchmarks are not downloadable here, but the loaders, metrics, detector and agent must be
developed
and tested on data with per-point ground truth. The builder writes

    <root>/pcd/<class>/train/<class>_template{0..T-1}.pcd
    <root>/pcd/<class>/test/<class>_positive{i}.pcd          normal test samples
    <root>/pcd/<class>/test/<class>_<defect>{i}.pcd          defective test samples
    <root>/pcd/<class>/GT/<class>_<defect>{i}.txt            x,y,z,label rows: the same points as the test pcd
    <root>/recipe.json                                       recipe version, seed, sources, per-sample defect
    info
    <root>/manifest.json                                     every file with its point count and sha256

Sources (all optional except the procedural parts): the parts of `evals.parts`; the real scans in
../shared/data/scans (bunny mesh sampled; PCL single-view clouds resampled, skipped when too small); meshes
shipped by
pip packages (`pymeshlab` sample meshes, `pybullet_data` objects) when those are installed.

A sample of a class differs from its siblings by surface sampling, sensor noise along the normal and a small
pose
change; defective samples additionally carry one defect from `evals.defects`. Every sample's seed derives from
(seed, class, file stem), so a class is identical whichever other classes are built with it. The dataset is
built in
`<out>.tmp` and renamed at the end: an interrupted build leaves no half-written dataset at `<out>`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scans import defects as defect_lib
from scans import parts as part_lib
from scans import strict_json
from scans.bench_pictures import render_examples
from scans.io import umask_mode
from scans.shared_data import shared_scans_dir

RECIPE_VERSION = 1
DEFAULT_SCANS = shared_scans_dir()
PCL_CANDIDATES = ("rops_cloud.pcd", "milk.pcd", "car6.pcd", "cturtle.pcd")
PYBULLET_CANDIDATES = ("duck.obj", "teddy2_VHACD_CHs.obj", "teddy.obj", "cube.obj", "sphere2.obj",
                       "torus.obj")
MIN_SOURCE_POINTS = 8000  # Anomaly-ShapeNet's smallest samples have ~8k points
MESH_NOISE = 0.003  # sensor noise sigma as a fraction of the object size (mesh sources)
SCAN_NOISE = 0.001  # real scans are already noisy: add only a little


@dataclass
class Source:
    """Where a class comes from: a procedural part, a mesh file, or a point-cloud file."""

    name: str
    kind: str  # "procedural" | "mesh" | "pcd"
    path: str | None = None
    origin: str = "evals.parts"
    solid: bool = True  # closed surface with outward normals: `broken` samples a cut face
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "origin": self.origin, "solid": self.solid}


@dataclass(frozen=True)
class BenchConfig:
    points: int = 30000
    templates: int = 4
    normal_per_class: int = 3
    defects_per_type: int = 1
    defect_types: tuple[str, ...] = defect_lib.DEFECT_TYPES
    seed: int = 0
    # Largest rotation (degrees, random axis) of each sample away from the part's own pose, so two samples
    # differ by
    # up to twice this. The default is a fixture's play; a large value makes a benchmark of scans that are not
    # pre-aligned, as Real3D-AD's test scans are (see tools.registration).
    pose_deg: float = 4.0
    # Multiplies every defect's depth and anomalous share (scans.defects.make_defect): below 1 makes a
    # benchmark of subtler defects at the same places, to measure what a reader misses.
    severity: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.pose_deg <= 180.0:
            raise ValueError(f"pose_deg must be in [0, 180] degrees, got {self.pose_deg}")
        defect_lib.check_severity(self.severity)  # refused before any class is built


# ------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------
def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def discover_sources(scans_dir: Path | None = DEFAULT_SCANS) -> tuple[dict[str, Source], list[str]]:
    """All usable sources by class name, plus notes on what was skipped and why."""
    sources = {name: Source(name, "procedural") for name in part_lib.PARTS}
    skipped: list[str] = []
    if scans_dir is None or not Path(scans_dir).is_dir():
        skipped.append(f"real-scan classes ({', '.join(REAL_CLASSES)}): {missing_scans_hint(scans_dir)}")
    else:
        bunny = Path(scans_dir) / "stanford-bunny" / "bun_zipper_res2.ply"
        if bunny.is_file():
            sources["bunny"] = Source("bunny", "mesh", str(bunny), "Stanford 3D Scanning Repository",
                                      solid=False)
        for file_name in PCL_CANDIDATES:
            path = Path(scans_dir) / "pcl" / file_name
            if path.is_file():
                name = path.stem.replace("_cloud", "")
                sources[name] = Source(name, "pcd", str(path), "PCL test data (single sensor view)",
                                       solid=False)
    pymeshlab_dir = _package_dir("pymeshlab")
    if pymeshlab_dir is not None:
        for path in sorted((pymeshlab_dir / "tests" / "sample_meshes").glob("*"))[:50]:
            if path.suffix.lower() in (".ply", ".obj", ".stl", ".off"):
                name = "ml_" + path.stem.lower().replace("-", "_")
                sources[name] = Source(name, "mesh", str(path), "pymeshlab sample_meshes", solid=False)
    pybullet_dir = _package_dir("pybullet_data")
    if pybullet_dir is not None:
        for file_name in PYBULLET_CANDIDATES:
            found = sorted(pybullet_dir.rglob(file_name))
            if found:
                name = "pb_" + found[0].stem.lower().split("_")[0]
                sources.setdefault(name, Source(name, "mesh", str(found[0]), "pybullet_data", solid=False))
    return sources, skipped


REAL_CLASSES = ("bunny", *(name.split(".")[0].replace("_cloud", "") for name in PCL_CANDIDATES))


def missing_scans_hint(scans_dir: Path | None) -> str:
    """Why the real-scan classes are absent, and how to point the builder at them."""
    where = "no real-scans folder given" if scans_dir is None else f"{scans_dir} does not exist"
    return (f"{where}; they need the shared scans folder (data/scans under $SCANAGENT_SHARED, default "
            "../shared "
            "beside the checkout): set SCANAGENT_SHARED or pass --scans DIR")


def _refusal(name: str, scans_dir: Path | None) -> str:
    """Why one requested class cannot be built."""
    if name in REAL_CLASSES:
        if scans_dir is None or not Path(scans_dir).is_dir():
            return f"{name!r} is a real-scan class: {missing_scans_hint(scans_dir)}"
        return f"{name!r} is a real-scan class but its file is not in {scans_dir}"
    return f"{name!r} is not a known class"


def class_list(values: list[str] | None) -> list[str] | None:
    """Class names from `--classes a,b` (the syntax of every CLI) or the older `--classes a b`."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _load_mesh(source: Source):
    import trimesh

    if "mesh" not in source._cache:
        if source.kind == "procedural":
            mesh = part_lib.part_mesh(source.name)
        else:
            mesh = trimesh.load(source.path, force="mesh", process=True)
            if len(mesh.faces) < 100 or mesh.area <= 0:
                raise ValueError(f"{source.path}: mesh too small ({len(mesh.faces)} faces)")
            source.solid = bool(mesh.is_watertight)
        source._cache["mesh"] = mesh
        source._cache["size"] = part_lib.extent(np.asarray(mesh.vertices))
    return source._cache["mesh"]


def _load_cloud(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """Points and normals of a point-cloud source (normals oriented toward the sensor at the origin)."""
    if "cloud" not in source._cache:
        from scans.io import read_scan

        points = read_scan(source.path).points.astype(np.float64)
        if len(points) < MIN_SOURCE_POINTS:
            raise ValueError(f"{source.path}: only {len(points)} points (< {MIN_SOURCE_POINTS})")
        # PCL clouds store VIEWPOINT 0 0 0: the sensor sat at the origin, so normals face it.
        normals = defect_lib.estimate_normals(points, viewpoint=np.zeros(3))
        source._cache["cloud"] = (points, normals)
        source._cache["size"] = part_lib.extent(points)
    return source._cache["cloud"]


def _clean_sample(source: Source, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Noise-free points + normals of one sample, and the class's size (for noise and defect amplitudes)."""
    if source.kind == "pcd":
        points, normals = _load_cloud(source)
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(points), size=min(count, len(points)), replace=False)
        return points[pick], normals[pick], source._cache["size"]
    mesh = _load_mesh(source)
    points, normals = part_lib.sample_surface(mesh, count, seed)
    return points, normals, source._cache["size"]


# ------------------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------------------
def sample_seed(seed: int, *names: str) -> int:
    """Seed for one sample from the global seed and its names (independent of which other classes are
    built)."""
    key = zlib.crc32("|".join(names).encode("utf-8"))
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def _write_gt(path: Path, points32: np.ndarray, mask: np.ndarray) -> None:
    """Comma-delimited x,y,z,label rows with the same float formatting as tools.io.write_pcd (%.9g of
    float32).

    Formatted as one string (about 3x faster than np.savetxt, which formats row by row).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.column_stack([points32.astype(np.float64), mask.astype(np.float64)]).ravel().tolist()
    path.write_text(("%.9g,%.9g,%.9g,%d\n" * len(points32)) % tuple(values))


def build_class(source: Source, class_dir: Path, config: BenchConfig) -> list[dict[str, Any]]:
    """Write one class's train/test/GT files; returns per-sample records for recipe.json."""
    from scans.io import write_pcd

    noise = SCAN_NOISE if source.kind == "pcd" else MESH_NOISE
    name = source.name
    records: list[dict[str, Any]] = []

    def emit(split: str, stem: str, points: np.ndarray, mask: np.ndarray | None, info: dict | None,
             seed: int) -> None:
        points32 = points.astype(np.float32)
        write_pcd(class_dir / split / f"{stem}.pcd", points32)
        if mask is not None:
            _write_gt(class_dir / "GT" / f"{stem}.txt", points32, mask)
        records.append({"file": f"pcd/{name}/{split}/{stem}.pcd", "split": split, "seed": seed,
                        "points": len(points32), "defect": info})

    jobs = [("train", f"{name}_template{i}", None) for i in range(config.templates)]
    jobs += [("test", f"{name}_positive{i}", None) for i in range(config.normal_per_class)]
    jobs += [("test", f"{name}_{kind}{i}", kind) for kind in config.defect_types
             for i in range(config.defects_per_type)]
    for split, stem, kind in jobs:
        seed = sample_seed(config.seed, name, stem)
        points, normals, size = _clean_sample(source, config.points, seed)
        mask, info = None, None
        if kind is not None:
            points, mask, info, normals = defect_lib.make_defect(points, normals, kind, seed + 1,
                                                                 solid=source.solid, scale=size,
                                                                 severity=config.severity,
                                                                 return_normals=True)
        points, _ = part_lib.scan_like(points, normals, seed + 2, noise=noise, scale=size,
                                        max_rotation_deg=config.pose_deg)
        emit(split, stem, points, mask, info, seed)
    return records


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_one(source: Source, staging: Path, config: BenchConfig) -> list[dict[str, Any]] | str:
    """Build one class; an optional source that cannot be used returns the reason instead of raising."""
    try:
        return build_class(source, staging / "pcd" / source.name, config)
    except (ValueError, OSError) as error:
        if source.kind == "procedural":
            raise
        return str(error)


def _build_all(sources: dict[str, Source], staging: Path, config: BenchConfig, workers: int):
    """Yield (class, records or skip reason) in class order, building classes in `workers` processes."""
    if workers <= 1 or len(sources) <= 1:
        for name, source in sources.items():
            yield name, _build_one(source, staging, config)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {name: pool.submit(_build_one, source, staging, config) for name, source in sources.items()}
        for name, future in futures.items():
            yield name, future.result()


def build_benchmark(out: Path, *, classes: list[str] | None = None, config: BenchConfig = BenchConfig(),
                    scans_dir: Path | None = DEFAULT_SCANS, overwrite: bool = False, workers: int = 1,
                    progress=None) -> dict[str, Any]:
    """Build the dataset at `out` atomically; returns the summary (also written into manifest.json)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass overwrite=True / --overwrite)")
    for kind in config.defect_types:
        if kind not in defect_lib.DEFECT_TYPES:
            raise ValueError(f"unknown defect type {kind!r}; known: {', '.join(defect_lib.DEFECT_TYPES)}")
    if config.points < 500:
        raise ValueError(f"points per sample must be at least 500, got {config.points}")
    sources, skipped = discover_sources(scans_dir)
    if classes:
        unknown = [c for c in classes if c not in sources]
        if unknown:
            reasons = "; ".join(_refusal(c, scans_dir) for c in unknown)
            raise ValueError(f"cannot build {', '.join(unknown)}: {reasons}. Available: {', '.join(sources)}")
        sources = {c: sources[c] for c in classes}
        # the real scans were not asked for: their absence is no news
        if not set(classes) & set(REAL_CLASSES):
            skipped = [note for note in skipped if not note.startswith("real-scan classes")]

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        samples: dict[str, list[dict[str, Any]]] = {}
        used: dict[str, dict[str, Any]] = {}
        for name, outcome in _build_all(sources, staging, config, workers):
            source = sources[name]
            if isinstance(outcome, str):  # an unusable optional source is skipped, never fatal
                shutil.rmtree(staging / "pcd" / name, ignore_errors=True)
                skipped.append(f"{name}: {outcome}")
                continue
            samples[name] = outcome
            used[name] = source.describe()
            if progress is not None:
                progress(name, len(outcome))
        recipe = {
            "recipe_version": RECIPE_VERSION, "seed": config.seed, "points": config.points,
            "templates": config.templates, "normal_per_class": config.normal_per_class,
            "defects_per_type": config.defects_per_type, "defect_types": list(config.defect_types),
            "pose_deg": config.pose_deg, "severity": config.severity,
            "noise": {"mesh": MESH_NOISE, "pcd": SCAN_NOISE}, "sources": used, "skipped": skipped,
            "samples": samples,
        }
        (staging / "recipe.json").write_text(strict_json.dumps(recipe, what="recipe.json", indent=1))
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "layout": "anomaly-shapenet", "recipe_version": RECIPE_VERSION,
            "classes": {name: {"train": sum(r["split"] == "train" for r in recs),
                               "test_normal": sum(r["split"] == "test" and r["defect"] is None for r in recs),
                               "test_defective": sum(r["defect"] is not None for r in recs)}
                        for name, recs in samples.items()},
            "files": {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in files},
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / "manifest.json").write_text(strict_json.dumps(manifest, what="manifest.json", indent=1))
        staging.chmod(umask_mode(directory=True))  # mkdtemp's 0700 would make the dataset private
        if out.exists():
            retired = out.with_name(out.name + ".old")
            shutil.rmtree(retired, ignore_errors=True)
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"root": str(out), "classes": manifest["classes"], "skipped": skipped,
            "seconds": manifest["build_seconds"], "sources": used}


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
EPILOG = """examples:
  scanagent bench --out dev-bench --pictures             # every available class
  scanagent bench --out dev-bench --classes flange,bunny
  SCANAGENT_SHARED=/data/shared scanagent bench --out dev-bench   # real scans from /data/shared/data/scans
  (`python -m evals.bench ...` is the same command)

exit codes: 0 ok, 2 bad input (unknown or unavailable class, existing --out without --overwrite, """ \
    "bad option)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.bench", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create")
    parser.add_argument("--classes", nargs="+", help="comma-separated class names, e.g. flange,bunny "
                                                     "(default: every "
                        "available source; real-scan classes need the shared scans, see --scans)")
    parser.add_argument("--points", type=int, default=30000, help="points per sample (default 30000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", type=int, default=4)
    parser.add_argument("--normal", type=int, default=3, help="normal test samples per class")
    parser.add_argument("--per-defect", type=int, default=1, help="defective test samples per defect type")
    parser.add_argument("--defects", nargs="+", default=list(defect_lib.DEFECT_TYPES),
                        help="comma-separated defect types (default all: "
                             f"{','.join(defect_lib.DEFECT_TYPES)})")
    parser.add_argument("--scans", type=Path, default=DEFAULT_SCANS,
                        help=f"real scans folder (default {DEFAULT_SCANS}, i.e. $SCANAGENT_SHARED/data/scans "
                             "or "
                        "../shared/data/scans; its classes are skipped, with the reason, when it is absent)")
    parser.add_argument("--pose-deg", type=float, default=4.0,
                        help="largest rotation of a sample away from the part's pose, in degrees (default 4: "
                             "pre-aligned scans; e.g. 30 for scans that need registration)")
    parser.add_argument("--severity", type=float, default=1.0,
                        help="multiplies every defect's depth and anomalous share (default 1; e.g. 0.5 for "
                             "subtler defects at the same places)")
    parser.add_argument("--pictures", action="store_true", help="also write <out>/examples.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--workers", type=int, default=2, help="processes building classes in parallel "
                                                               "(default 2)")
    args = parser.parse_args(argv)
    try:
        config = BenchConfig(points=args.points, templates=args.templates, normal_per_class=args.normal,
                             defects_per_type=args.per_defect, seed=args.seed,
                             defect_types=tuple(class_list(args.defects) or ()),
                             pose_deg=args.pose_deg, severity=args.severity)
        summary = build_benchmark(args.out, classes=class_list(args.classes), config=config,
                                  scans_dir=args.scans, overwrite=args.overwrite, workers=args.workers,
                                  progress=lambda name, n: print(f"  {name}: {n} samples", flush=True))
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"built {summary['root']} in {summary['seconds']:.1f} s")
    print(f"{'class':<14}{'source':<12}{'train':>6}{'normal':>8}{'defective':>10}")
    for name, counts in summary["classes"].items():
        print(f"{name:<14}{summary['sources'][name]['kind']:<12}{counts['train']:>6}{counts['test_normal']:>8}"
              f"{counts['test_defective']:>10}")
    for note in summary["skipped"]:
        print(f"skipped {note}")
    if args.pictures:
        print(f"pictures: {render_examples(args.out, args.out / 'examples.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
