"""Procedural parts for training the agent: machined shapes that are NOT classes of the dev benchmark.

Why a separate set: episodes for tuning the agent must never show it a part it is later evaluated on, or a
measured
gain could be memorised geometry. These parts reuse the building blocks of `scans.parts` (prisms of 2-D
regions with
holes, unions, gear outlines) but are other shapes: a sprocket with few teeth, a perforated plate, a thick
spacer
ring, a stepped block with a boss and a T-plate. `HELD_OUT_CLASSES` names every class the dev benchmark can
hold
(its procedural parts, and the real scans and package meshes it picks up), so a test can check the two sets
are
disjoint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import trimesh

from scans.parts import PARTS, Region2D, circle, gear_outline, prism, rectangle, union

# Every class name `scans.bench.discover_sources` can produce: its procedural parts, the bunny, the PCL
# clouds and the
# package meshes (pymeshlab ml_*, pybullet pb_*). Training parts must never be one of them.
HELD_OUT_CLASSES: frozenset[str] = frozenset(PARTS) | {"bunny", "rops", "milk", "car6", "cturtle"}
HELD_OUT_PREFIXES: tuple[str, ...] = ("ml_", "pb_")


def sprocket() -> trimesh.Trimesh:
    """Eleven-tooth sprocket of module 3, 10 mm thick, plain round bore (the benchmark's gear has 18 and a
    keyway)."""
    region = Region2D((gear_outline(11, 3.0), circle((0, 0), 6.0, 48)))
    return prism(region, 0, 10, 1.0).mesh


def perforated_plate() -> trimesh.Trimesh:
    """Rectangular plate with four corner holes and a long slot in the middle."""
    holes = [circle((x, y), 3.5, 32) for x in (8, 72) for y in (8, 42)]
    slot = rectangle(25, 20, 55, 30)[::-1]  # clockwise: a hole under the even-odd rule either way
    return prism(Region2D((rectangle(0, 0, 80, 50), *holes, slot)), 0, 6, 1.5).mesh


def spacer_ring() -> trimesh.Trimesh:
    """Thick ring: outer radius 22, bore 12, 28 mm tall (a tube with flat ends)."""
    return prism(Region2D((circle((0, 0), 22, 120), circle((0, 0), 12, 80))), 0, 28, 1.2).mesh


def stepped_block() -> trimesh.Trimesh:
    """A block with a narrower step on top and a round boss on the step."""
    s = 1.5
    base = prism(Region2D((rectangle(0, 0, 60, 40),)), 0, 15, s)
    step = prism(Region2D((rectangle(10, 5, 50, 35),)), 15, 25, s)
    boss = prism(Region2D((circle((30, 20), 8, 64),)), 25, 35, s)
    return union([base, step, boss], nudge=0.05)


def tee_plate() -> trimesh.Trimesh:
    """T-shaped plate with two holes in the bar and one in the stem."""
    outline = np.array([[0, 40], [70, 40], [70, 55], [0, 55]], dtype=float)
    bar = Region2D((outline, circle((12, 47.5), 4, 32), circle((58, 47.5), 4, 32)))
    stem = Region2D((rectangle(27.5, 0, 42.5, 40), circle((35, 12), 4, 32)))
    return union([prism(bar, 0, 8, 1.5), prism(stem, 0, 8, 1.5)], nudge=0.05)


TRAINING_PARTS: dict[str, Callable[[], trimesh.Trimesh]] = {
    "sprocket": sprocket,
    "perforated_plate": perforated_plate,
    "spacer_ring": spacer_ring,
    "stepped_block": stepped_block,
    "tee_plate": tee_plate,
}

_CACHE: dict[str, trimesh.Trimesh] = {}


def is_held_out(name: str) -> bool:
    """True for a class the dev benchmark may evaluate on."""
    return name in HELD_OUT_CLASSES or name.startswith(HELD_OUT_PREFIXES)


def training_mesh(name: str) -> trimesh.Trimesh:
    """The mesh of a training part (built once per process); refuses held-out benchmark classes."""
    if is_held_out(name):
        raise ValueError(f"{name!r} is a dev-benchmark class and is held out of training")
    if name not in TRAINING_PARTS:
        raise KeyError(f"unknown training part {name!r}; known: {', '.join(TRAINING_PARTS)}")
    if name not in _CACHE:
        _CACHE[name] = TRAINING_PARTS[name]()
    return _CACHE[name]
