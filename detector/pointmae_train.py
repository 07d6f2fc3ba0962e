"""Training Point-MAE on a class's templates (and an optional general pretraining CLI).

Why crops: at inference a whole scan is subsampled to ``inference_groups * group_size / 2`` points and cut
into
``inference_groups`` patches. Training sees the same density: each sample is a scan resampled to that many
points
(augmented), from which a local crop of ``num_groups / inference_groups`` of the points around a random seed
point is
taken and cut into ``num_groups`` patches. So a training patch spans the same surface extent as an inference
patch,
and positions stay in the class's normalised frame (no re-centring of crops), so the position embedding sees
the
same coordinate range it sees at inference.

CLI: ``python -m tools.pointmae_train --data DIR --out DIR --steps N`` pretrains a general backbone on every
scan or
mesh in DIR (each normalised by its own mean radius); a class fit can start from it with
``init=load_backbone(DIR)``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detector.grouping import PATCH_OVERLAP, estimate_scale
from detector.pointmae import PointMAE, load_backbone, save_backbone
from detector.pointmae_config import PointMAEConfig
from scans.geometry import knn

StepHook = Callable[[int, float], None]  # (step, loss) after every optimiser step


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of a training sample, in normalised units (scan centred, divided by the class scale)."""

    rotation_deg: float = 10.0  # max angle of a random-axis rotation about the centroid
    full_rotation: bool = False  # uniform SO(3) instead (for classes that come in any pose)
    scale_range: float = 0.05  # isotropic scaling in [1 - r, 1 + r]
    jitter_sigma: float = 0.002  # gaussian noise per point ...
    jitter_clip: float = 0.01  # ... clipped to this


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_share: float = 0.1  # linear warm-up share of the steps, then cosine decay to 1% (Point-MAE style)


def _rotation(aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    if aug.full_rotation:
        q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        if torch.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q.float()
    axis = torch.randn(3, generator=gen, dtype=torch.float64)
    axis = axis / axis.norm()
    angle = math.radians(aug.rotation_deg) * (2 * float(torch.rand(1, generator=gen)) - 1)
    k = torch.tensor(
        [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64
    )
    return (torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k).float()


def sample_crop(
    scan: torch.Tensor, n_sample: int, crop_points: int, aug: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """One training sample from a normalised scan (N,3): resample to n_sample points, augment, local crop."""
    n = scan.shape[0]
    pts = scan[torch.randperm(n, generator=gen)[:n_sample]] if n > n_sample else scan
    pts = pts @ _rotation(aug, gen).T
    pts = pts * (1 + aug.scale_range * (2 * torch.rand(1, generator=gen) - 1))
    noise = (torch.randn(pts.shape, generator=gen) * aug.jitter_sigma).clamp(
        -aug.jitter_clip, aug.jitter_clip
    )
    pts = pts + noise
    seed_point = pts[torch.randint(pts.shape[0], (1,), generator=gen)]
    near = torch.from_numpy(knn(pts.numpy(), seed_point.numpy(), crop_points)[1][0])
    return pts[near]


def crop_sizes(scans: list[torch.Tensor], config: PointMAEConfig) -> tuple[int, int]:
    """(points per resampled scan, points per crop) that reproduce the inference patch density."""
    n_inference = config.inference_groups * config.group_size // PATCH_OVERLAP
    n_sample = min(n_inference, min(s.shape[0] for s in scans))
    crop = round(n_sample * config.num_groups / config.inference_groups)
    crop = min(n_sample, max(crop, config.num_groups, 2 * config.group_size))
    if n_sample < max(config.num_groups, config.group_size):
        raise ValueError(
            f"smallest training scan has {n_sample} points; need at least "
            f"{max(config.num_groups, config.group_size)}"
        )
    return n_sample, crop


def train_pointmae(
    scans: list[np.ndarray],
    config: PointMAEConfig,
    *,
    steps: int,
    seed: int,
    init: PointMAE | None = None,
    progress: StepHook | None = None,
    batch_size: int = 8,
    scale: float | None = None,
    augment: AugmentConfig = AugmentConfig(),
    settings: TrainSettings = TrainSettings(),
    device: str | torch.device = "cpu",
) -> PointMAE:
    """Train (or fine-tune ``init``) a Point-MAE on crops of the given scans; returns the model in eval mode.

    ``scale`` is the class scale used at inference (default: :func:`estimate_scale` of the scans).
    Deterministic
    by ``seed`` on CPU: weights are initialised and dropout/drop-path drawn inside a forked, seeded RNG, and
    the
    data uses its own torch.Generator, so the caller's global RNG state is untouched."""
    if not scans:
        raise ValueError("train_pointmae: no scans given")
    if steps < 0 or batch_size < 1:
        raise ValueError("train_pointmae: steps must be >= 0 and batch_size >= 1")
    for i, s in enumerate(scans):
        if s.ndim != 2 or s.shape[1] != 3 or not np.isfinite(s).all():
            raise ValueError(f"train_pointmae: scan {i} is not a finite (N,3) array (shape {s.shape})")
    if init is not None and init.config != config:
        raise ValueError("train_pointmae: init backbone has a different config than the one requested")
    scale = estimate_scale(scans) if scale is None else scale
    if not scale > 0:
        raise ValueError(f"train_pointmae: scale must be positive, got {scale}")
    normalised = [torch.from_numpy(((s - s.mean(axis=0)) / scale).astype(np.float32)) for s in scans]
    n_sample, crop = crop_sizes(normalised, config)
    data_gen = torch.Generator().manual_seed(seed)
    cpu_only: list[int] = [] if torch.device(device).type == "cpu" else [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=cpu_only):
        torch.manual_seed(seed)
        model = PointMAE(config)
        if init is not None:
            model.load_state_dict(init.state_dict())
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        warmup = max(1, int(settings.warmup_share * steps))

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, steps - warmup)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        for step in range(steps):
            which = torch.randint(len(normalised), (batch_size,), generator=data_gen).tolist()
            batch = torch.stack(
                [sample_crop(normalised[i], n_sample, crop, augment, data_gen) for i in which]
            )
            loss = model(batch.to(device), generator=data_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            if progress is not None:
                progress(step, float(loss.detach()))
    return model.eval()


# ------------------------------------------------------------------------------------------------------ CLI
SCAN_SUFFIXES = {".pcd", ".ply", ".xyz", ".txt", ".npy", ".obj", ".stl", ".off", ".tif", ".tiff", ".pts"}


def _load_dir(data: Path, mesh_points: int, seed: int) -> list[np.ndarray]:
    """Every readable scan/mesh under data, each normalised by its own mean radius (a general backbone spans
    classes of any size, so there is no single class scale)."""
    from scans.io import ScanError, read_scan  # written by another module; contract in docs/design.md

    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in SCAN_SUFFIXES and p.is_file())
    scans = []
    for path in files:
        try:
            pts = read_scan(path, mesh_points=mesh_points, seed=seed).points
        except ScanError as e:
            print(f"skip {e}", file=sys.stderr)
            continue
        scans.append(((pts - pts.mean(axis=0)) / estimate_scale([pts])).astype(np.float32))
    return scans


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pointmae_train", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", required=True, type=Path, help="directory of scans or meshes (searched recursively)"
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="output directory (model.safetensors + config.json)"
    )
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--preset", choices=("small", "paper"), default="small")
    ap.add_argument("--init", type=Path, default=None, help="continue from this backbone directory")
    ap.add_argument("--full-rotation", action="store_true", help="augment with uniform SO(3) rotations")
    ap.add_argument("--mesh-points", type=int, default=30000)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is much faster than 2 when other jobs share the cores)",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        print(f"{args.data}: not a directory", file=sys.stderr)
        return 2
    config = PointMAEConfig.paper() if args.preset == "paper" else PointMAEConfig.small()
    init = load_backbone(args.init, expect=config) if args.init else None
    scans = _load_dir(args.data, args.mesh_points, args.seed)
    if not scans:
        print(f"{args.data}: no readable scans", file=sys.stderr)
        return 2
    start = time.perf_counter()
    every = max(1, args.steps // 20)

    def report(step: int, loss: float) -> None:
        if step % every == 0 or step == args.steps - 1:
            print(f"step {step:6d}  loss {loss:.5f}  {time.perf_counter() - start:7.1f}s", flush=True)

    model = train_pointmae(
        scans,
        config,
        steps=args.steps,
        seed=args.seed,
        init=init,
        progress=report,
        batch_size=args.batch_size,
        scale=1.0,
        augment=AugmentConfig(full_rotation=args.full_rotation),
    )
    save_backbone(model, args.out)
    print(f"saved {args.out} ({len(scans)} scans, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
