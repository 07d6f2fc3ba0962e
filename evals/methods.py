"""The detector methods the harness compares, as a registry: each method is one small function with its facts.

A method gets one scan (its points, the shared Point-MAE analysis, the class's fits) and returns per-point
scores
and an object score. Its entry says which class fit it needs (``feature``) and what share of the points the
memory
bank scores for it (``verified_fraction``, the x axis of "accuracy vs share verified"). Adding a method is one
``@method(...)`` function; nothing else branches on method names.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MethodInput:
    """One scan as a method sees it."""

    cls: str
    scan: str
    points: np.ndarray
    analysis: Any  # detector.fitted.ScanAnalysis of the Point-MAE fit, or None
    fit: Callable[[str], Any]  # feature kind -> this class's FittedClass
    seed: int
    verify_budget: float  # share of points a verifier may score (the agents' budget)


MethodFn = Callable[[MethodInput], tuple[np.ndarray, float]]


@dataclass(frozen=True)
class Method:
    name: str
    run: MethodFn
    feature: str | None  # the class fit it needs (None: no fit)
    verified_fraction: float  # share of points the bank scores
    default: bool = True  # run when --methods is not given
    has_threshold: bool = (
        False  # its object score is the fit's, so the fit's object threshold gives a verdict
    )


REGISTRY: dict[str, Method] = {}


def method(
    name: str,
    *,
    feature: str | None,
    verified_fraction: float,
    default: bool = True,
    has_threshold: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register a method under `name`."""

    def register(run: MethodFn) -> MethodFn:
        REGISTRY[name] = Method(name, run, feature, verified_fraction, default, has_threshold)
        return run

    return register


def scan_seed(seed: int, *parts: str) -> int:
    """A per-scan seed that depends only on the run seed and the scan's names (not on run order or
    executor)."""
    return zlib.crc32(":".join([str(seed), *parts]).encode()) & 0x7FFFFFFF


@method("pointmae-bank", feature="pointmae", verified_fraction=1.0, has_threshold=True)
def full_bank(scan: MethodInput) -> tuple[np.ndarray, float]:
    """M3DM's recipe: every patch through the bank."""
    result = scan.fit("pointmae").score(scan.analysis)
    scores = np.empty(len(scan.points), dtype=np.float32)
    scores[result.point_ids] = result.point_scores
    return scores, result.object_score


@method("btf", feature="fpfh", verified_fraction=1.0, has_threshold=True)
def btf(scan: MethodInput) -> tuple[np.ndarray, float]:
    """BTF: FPFH features, the same bank."""
    return scan.fit("fpfh").score_full(scan.points)


@method("recon", feature="pointmae", verified_fraction=0.0)
def recon(scan: MethodInput) -> tuple[np.ndarray, float]:
    """Point-MAE reconstruction error alone, no bank."""
    scores = np.asarray(scan.analysis.point_stats["recon_error"], dtype=np.float32)
    return scores, float(scores.max())


@method("random", feature=None, verified_fraction=0.0)
def random_scores(scan: MethodInput) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(scan_seed(scan.seed, "random", scan.cls, scan.scan))
    return rng.random(len(scan.points), dtype=np.float32), float(rng.random())


# oracle-regions searches the whole bank to choose which points keep their scores, so it counts as 1.0 (read
# it at
# the verification budget, not at its x position). A diagnostic: asked for by name only.
@method("oracle-regions", feature="pointmae", verified_fraction=1.0, default=False, has_threshold=True)
def oracle_regions(scan: MethodInput) -> tuple[np.ndarray, float]:
    """The top-B full-bank points under the verifier's prior: the points the full bank scores highest, up to
    the
    verification budget B, keep their bank scores and every other point gets the verifier's low prior. Not a
    usable
    method (it searched the whole bank to choose) and not a strict ceiling (an agent that named exactly the
    defect's
    points would beat it); it shows how much of the full bank's accuracy survives the low prior at that budget
    when
    the budget goes where the bank itself would put it."""
    from agent.verifier import prior_baseline

    fitted, n = scan.fit("pointmae"), len(scan.points)
    result = fitted.score(scan.analysis)
    full = np.empty(n, dtype=np.float32)
    full[result.point_ids] = result.point_scores
    scores = prior_baseline(fitted, scan.analysis)
    top = np.argsort(-full, kind="stable")[: int(scan.verify_budget * n)]
    scores[top] = full[top]
    return scores, result.object_score


METHODS = tuple(REGISTRY)
DEFAULT_METHODS = tuple(name for name, m in REGISTRY.items() if m.default)
