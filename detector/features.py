"""Patch features behind one interface: a learned Point-MAE backbone or hand-crafted FPFH (the BTF baseline).

The memory bank, the fitted class and the fitting never ask which kind they hold: they call an extractor's
``patch_features`` (patches of one scan with their feature vectors and per-patch statistics) and ``identity``
(what the bank's rows came from, so a bank is never read with features of another model). Both kinds share
the detector's patching (detector.grouping: FPS centres, kNN groups of ``group_size`` points, the class-level
scale), so a comparison between them is about the descriptor alone. Point-MAE runs as its exported graph
(detector.pointmae_runtime), so computing features does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from detector.grouping import PATCH_OVERLAP, covering_masks, group_scan, normalise_points
from detector.pointmae_runtime import OnnxBackbone

FPFH_IDENTITY = "fpfh-v1"


@dataclass
class PatchFeatures:
    centers: np.ndarray  # float32 (G,3) patch centres in the input's coordinates
    group_idx: np.ndarray  # int64 (G,K) indices into the input points
    features: np.ndarray  # float32 (G,D) multi-layer features (M3DM-style concat)
    recon_error: np.ndarray  # float32 (G,) Chamfer-L2 of the patch when masked (normalised units)
    feature_norm: np.ndarray  # float32 (G,) L2 norm of features


def extract_patch_features(
    backbone: OnnxBackbone,
    points: np.ndarray,
    *,
    num_groups: int,
    group_size: int,
    seed: int,
    scale: float,
    recon_rounds: int = 2,
) -> PatchFeatures:
    """Patch features + per-patch reconstruction error of one scan.

    The scan is normalised (centroid, class ``scale``), randomly subsampled to ``num_groups*group_size/2``
    points (the density training crops use when ``num_groups == config.inference_groups``), grouped by FPS +
    kNN, embedded once, encoded unmasked for features, and reconstructed in ``recon_rounds`` masking rounds
    that together hide every patch; a patch's recon_error is its Chamfer-L2 averaged over the rounds that hid
    it. ``recon_rounds=0`` skips reconstruction (about half the time) and returns recon_error as NaN, for
    callers that only need features (e.g. filling a memory bank). The seed decides the subsample, the first
    centre and the masks (a numpy Generator), so the same scan and seed give the same patches."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
        raise ValueError(f"points must be a finite (N,3) array, got shape {pts.shape}")
    if group_size != backbone.config.group_size:
        raise ValueError(f"group_size {group_size} != the backbone's {backbone.config.group_size}")
    n = len(pts)
    if n < group_size:
        raise ValueError(f"scan has {n} points, fewer than group_size {group_size}")
    if recon_rounds < 0:
        raise ValueError(f"recon_rounds must be >= 0, got {recon_rounds}")
    rng = np.random.default_rng(seed)
    normalised, _ = normalise_points(pts, scale)
    n_sample = min(n, max(num_groups * group_size // PATCH_OVERLAP, group_size))
    sub = np.sort(rng.permutation(n)[:n_sample]) if n_sample < n else np.arange(n)
    g = min(num_groups, n_sample)
    start = int(rng.integers(n_sample))
    neighborhood, centers, idx, center_idx = group_scan(normalised[sub], g, group_size, start)
    err_sum = np.zeros(g, dtype=np.float64)
    err_count = np.zeros(g, dtype=np.float64)
    if recon_rounds:
        masks = covering_masks(g, backbone.config.mask_ratio, recon_rounds, rng)
        visible = np.stack([np.flatnonzero(~mask) for mask in masks])
        masked = np.stack([np.flatnonzero(mask) for mask in masks])
        features, errors = backbone.run(neighborhood, centers, visible, masked)
        assert errors is not None
        for hidden, error in zip(masked, errors):
            err_sum[hidden] += error
            err_count[hidden] += 1
    else:
        features, _ = backbone.run(neighborhood, centers)
    with np.errstate(invalid="ignore"):  # 0/0 = NaN only when recon_rounds == 0
        recon_error = (err_sum / err_count).astype(np.float32)
    feats = np.asarray(features, dtype=np.float32)
    return PatchFeatures(
        centers=pts[sub[center_idx]].astype(np.float32),
        group_idx=sub[idx].astype(np.int64),
        features=feats,
        recon_error=recon_error,
        feature_norm=np.linalg.norm(feats, axis=1).astype(np.float32),
    )


class FeatureExtractor(Protocol):
    """What the fitted class and the fitting need from a kind of patch feature."""

    kind: str
    has_recon: bool  # per-patch reconstruction error is a real statistic (Point-MAE), not a placeholder

    def identity(self) -> str:
        """What the features come from; a bank is only valid with the same identity."""
        ...

    def patch_features(self, points: np.ndarray, *, seed: int, recon: bool = True) -> PatchFeatures:
        """Detector patches of one scan with their features; ``recon=False`` may skip costly extra
        statistics."""
        ...


@dataclass
class PointMAEExtractor:
    """M3DM's features: a Point-MAE encoder on all patches, a few blocks' outputs concatenated."""

    backbone: OnnxBackbone
    num_groups: int
    group_size: int
    scale: float
    recon_rounds: int
    kind: str = "pointmae"
    has_recon: bool = True

    def identity(self) -> str:
        return self.backbone.identity

    def patch_features(self, points: np.ndarray, *, seed: int, recon: bool = True) -> PatchFeatures:
        """``recon=False`` skips the masked-reconstruction rounds (recon_error comes back NaN): the memory
        bank
        only needs features, and the rounds cost about as much as the feature pass itself."""
        return extract_patch_features(
            self.backbone,
            points,
            num_groups=self.num_groups,
            group_size=self.group_size,
            seed=seed,
            scale=self.scale,
            recon_rounds=self.recon_rounds if recon else 0,
        )


@dataclass
class FPFHExtractor:
    """BTF's features: FPFH pooled over the same patches; no reconstruction, so recon_error is zero."""

    num_groups: int
    group_size: int
    scale: float
    kind: str = "fpfh"
    has_recon: bool = False

    def identity(self) -> str:
        return FPFH_IDENTITY

    def patch_features(self, points: np.ndarray, *, seed: int, recon: bool = True) -> PatchFeatures:
        from detector.btf import btf_patch_features

        centers, group_idx, feats = btf_patch_features(
            points, num_groups=self.num_groups, group_size=self.group_size, scale=self.scale, seed=seed
        )
        zeros = np.zeros(len(centers), dtype=np.float32)
        return PatchFeatures(
            centers=centers,
            group_idx=group_idx,
            features=feats,
            recon_error=zeros,
            feature_norm=np.linalg.norm(feats, axis=1).astype(np.float32),
        )


def make_extractor(
    kind: str,
    backbone: OnnxBackbone | None,
    *,
    num_groups: int,
    group_size: int,
    scale: float,
    recon_rounds: int,
) -> FeatureExtractor:
    """The extractor for a feature kind ("pointmae" needs its backbone, "fpfh" none)."""
    if kind == "fpfh":
        return FPFHExtractor(num_groups=num_groups, group_size=group_size, scale=scale)
    if kind == "pointmae":
        if backbone is None:
            raise ValueError("Point-MAE features need a backbone")
        return PointMAEExtractor(
            backbone, num_groups=num_groups, group_size=group_size, scale=scale, recon_rounds=recon_rounds
        )
    raise ValueError(f"unknown feature kind {kind!r}; known: pointmae, fpfh")
