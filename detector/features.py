"""Patch features behind one interface: a learned Point-MAE backbone or hand-crafted FPFH (the BTF baseline).

The memory bank, the fitted class and the fitting never ask which kind they hold: they call an extractor's
``patch_features`` (patches of one scan with their feature vectors and per-patch statistics) and ``identity``
(what
the bank's rows came from, so a bank is never read with features of another model). Both kinds share the
detector's
patching (FPS centres, kNN groups of ``group_size`` points, the class-level scale), so a comparison between
them is
about the descriptor alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from detector.pointmae import (
    PATCH_OVERLAP,
    PointMAE,
    backbone_hash,
    covering_masks,
    group_points,
    normalise_points,
)

# Torch threads for the backbone's inference (bank views at fit time, analyse at test time). One thread,
# because
# inference is many small ops (FPS is a loop over the centres) and an OpenMP team stalls whenever another
# process
# holds a core (docs/design.md has the measurements). Fixing the count also keeps features independent of the
# caller's torch setting.
INFERENCE_THREADS = 1
FPFH_IDENTITY = "fpfh-v1"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class PatchFeatures:
    centers: np.ndarray  # float32 (G,3) patch centres in the input's coordinates
    group_idx: np.ndarray  # int64 (G,K) indices into the input points
    features: np.ndarray  # float32 (G,D) multi-layer features (M3DM-style concat)
    recon_error: np.ndarray  # float32 (G,) Chamfer-L2 of the patch when masked (normalised units)
    feature_norm: np.ndarray  # float32 (G,) L2 norm of features


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def extract_patch_features(
    model: PointMAE,
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
    points
    (the density training crops use when ``num_groups == config.inference_groups``), grouped by FPS + kNN,
    embedded
    once, encoded unmasked for features, and reconstructed in ``recon_rounds`` masking rounds that together
    hide
    every patch; a patch's recon_error is its Chamfer-L2 averaged over the rounds that hid it.
    ``recon_rounds=0`` skips reconstruction (about half the time) and returns recon_error as NaN, for callers
    that
    only need features (e.g. filling a memory bank)."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
        raise ValueError(f"points must be a finite (N,3) array, got shape {pts.shape}")
    if group_size != model.config.group_size:
        raise ValueError(f"group_size {group_size} != the backbone's {model.config.group_size}")
    n = len(pts)
    if n < group_size:
        raise ValueError(f"scan has {n} points, fewer than group_size {group_size}")
    gen = torch.Generator().manual_seed(seed)
    normalised, _ = normalise_points(pts, scale)
    n_sample = min(n, max(num_groups * group_size // PATCH_OVERLAP, group_size))
    sub = torch.randperm(n, generator=gen)[:n_sample].sort().values if n_sample < n else torch.arange(n)
    g = min(num_groups, n_sample)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        xyz = torch.from_numpy(normalised)[sub].unsqueeze(0).to(device)
        start = int(torch.randint(n_sample, (1,), generator=gen))
        neighborhood, centers, idx, center_idx = group_points(xyz, g, group_size, start)
        tokens = model.embed(neighborhood)
        _, kept = model.run_encoder(tokens, centers, tuple(model.config.feature_layers))
        features = torch.cat(kept, dim=-1)[0]
        if recon_rounds < 0:
            raise ValueError(f"recon_rounds must be >= 0, got {recon_rounds}")
        masks = covering_masks(g, model.config.mask_ratio, recon_rounds, gen) if recon_rounds else []
        err_sum = torch.zeros(g, dtype=torch.float64)
        err_count = torch.zeros(g, dtype=torch.float64)
        for mask in masks:
            errors = model.reconstruct_masked(tokens, neighborhood, centers, mask.unsqueeze(0).to(device))
            err_sum[mask] += errors[0].double().cpu()
            err_count[mask] += 1
    finally:
        model.train(was_training)
    group_idx = sub[idx[0].cpu()].numpy().astype(np.int64)
    feats = features.float().cpu().numpy()
    return PatchFeatures(
        centers=pts[sub[center_idx[0].cpu()].numpy()].astype(np.float32),
        group_idx=group_idx,
        features=feats,
        recon_error=(err_sum / err_count).float().numpy(),  # 0/0 = NaN only when recon_rounds == 0
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

    backbone: PointMAE
    num_groups: int
    group_size: int
    scale: float
    recon_rounds: int
    kind: str = "pointmae"
    has_recon: bool = True

    def identity(self) -> str:
        return backbone_hash(self.backbone)

    def patch_features(self, points: np.ndarray, *, seed: int, recon: bool = True) -> PatchFeatures:
        """``recon=False`` skips the masked-reconstruction rounds (recon_error comes back NaN): the memory
        bank
        only needs features, and the rounds cost about as much as the feature pass itself."""
        with torch_threads(INFERENCE_THREADS):
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
    kind: str, backbone: PointMAE | None, *, num_groups: int, group_size: int, scale: float, recon_rounds: int
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
