"""Point-MAE in plain torch: the "compression" backbone of the detector.

Reads top to bottom like Point-MAE's ``models/Point_MAE.py`` (Pang et al., 2022):
farthest point sampling and kNN grouping -> mini-PointNet patch embedding -> transformer encoder on the
visible
patches -> light transformer decoder with mask tokens -> Chamfer-L2 on the masked patches only. Features for
the
memory bank follow M3DM (Wang et al., 2023): the encoder runs on *all* patches unmasked and the outputs of a
few
blocks (after the final norm) are concatenated per patch.

Everything is plain torch (CPU or CUDA); FPS, kNN and Chamfer are written here so no compiled extension is
needed.

Scale conventions (why they matter): a class has a known physical size, so points are centred per scan and
divided
by one class-level ``scale`` (see :func:`estimate_scale`) instead of being fitted into a unit sphere per scan.
Patch
*scale* is fixed by point density: a scan is randomly subsampled to ``num_groups * group_size / 2`` points
(:data:`PATCH_OVERLAP` = 2, every point lies in ~2 patches) before grouping, and training crops use the same
density
(see ``detector.pointmae_train``), so a patch at inference describes the same surface extent as a patch in
training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scans import strict_json
from scans.geometry import knn

FORMAT_NAME = "scanagent-pointmae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PATCH_OVERLAP = 2  # points in patches / points sampled: each sampled point is covered by ~2 patches


# --------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PointMAEConfig:
    """Architecture and patching of one backbone. Saved next to the weights; loading refuses a mismatch."""

    width: int = 192                        # transformer token width (trans_dim)
    depth: int = 4                          # encoder blocks
    heads: int = 4
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    embed_dims: tuple[int, int, int] = (32, 64, 128)  # mini-PointNet: 3->a->b, max, [b,b]->c->width
    group_size: int = 32                    # K points per patch (the decoder predicts exactly K points)
    num_groups: int = 64                    # patches per training crop
    inference_groups: int = 512             # patches over a whole scan at inference
    mask_ratio: float = 0.6
    feature_layers: tuple[int, ...] = (1, 3)        # encoder blocks whose (normed) outputs are concatenated
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if self.width % self.heads or self.width % self.decoder_heads:
            problems.append(f"width {self.width} must be divisible by heads "
                            f"{self.heads}/{self.decoder_heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            problems.append(f"mask_ratio {self.mask_ratio} must be in (0, 1)")
        if not self.feature_layers or any(not 0 <= i < self.depth for i in self.feature_layers):
            problems.append(f"feature_layers {self.feature_layers} must be non-empty indices into "
                            f"{self.depth} blocks")
        if min(self.width, self.depth, self.heads, self.decoder_depth, self.group_size, self.num_groups,
               self.inference_groups, *self.embed_dims) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ValueError("PointMAEConfig: " + "; ".join(problems))

    @classmethod
    def small(cls) -> PointMAEConfig:
        """Default for 2 CPU cores: fits one class in about a minute (see tools.pointmae_train)."""
        return cls()

    @classmethod
    def paper(cls) -> PointMAEConfig:
        """Point-MAE's pretraining setup (384 wide, 12 blocks, 64x32 groups) with M3DM's feature layers."""
        return cls(width=384, depth=12, heads=6, decoder_depth=4, decoder_heads=6, embed_dims=(128, 256, 512),
                   group_size=32, num_groups=64, inference_groups=1024, mask_ratio=0.6,
                   feature_layers=(3, 7, 11), drop_path=0.1)

    @property
    def feature_dim(self) -> int:
        return self.width * len(self.feature_layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> PointMAEConfig:
        data = json.loads(text) if isinstance(text, str) else dict(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PointMAEConfig: unknown fields {unknown}")
        for key in ("embed_dims", "feature_layers"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


# --------------------------------------------------------------------------------------- normalisation
# helpers
def estimate_scale(scans: list[np.ndarray]) -> float:
    """Class-level scale: mean distance of a point to its scan's centroid, averaged over the templates."""
    if not scans:
        raise ValueError("estimate_scale: no scans given")
    radii = [float(np.linalg.norm(s - s.mean(axis=0), axis=1).mean()) for s in scans]
    scale = float(np.mean(radii))
    if not scale > 0:
        raise ValueError("estimate_scale: scans have zero extent")
    return scale


def normalise_points(points: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre on the centroid and divide by the class scale. Returns (normalised float32, centroid
    float64)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    centroid = points.astype(np.float64).mean(axis=0)
    return ((points - centroid) / scale).astype(np.float32), centroid


# ---------------------------------------------------------------------------------------- FPS, kNN, grouping
def farthest_point_sample(xyz: torch.Tensor, n: int, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Batched farthest point sampling. xyz (B,N,3), start index per batch item -> indices (B,n) int64.

    Distances are squared Euclidean; ties go to the lowest index (torch.max returns the first maximum)."""
    b, num, _ = xyz.shape
    if not 0 < n <= num:
        raise ValueError(f"farthest_point_sample: cannot pick {n} of {num} points")
    idx = torch.empty(b, n, dtype=torch.long, device=xyz.device)
    current = torch.as_tensor(start, dtype=torch.long, device=xyz.device).expand(b).clone()
    nearest = torch.full((b, num), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        idx[:, i] = current
        d = ((xyz - xyz[rows, current].unsqueeze(1)) ** 2).sum(-1)
        nearest = torch.minimum(nearest, d)
        current = nearest.argmax(dim=1)
    return idx


def knn_indices(xyz: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B,Q,k) of the k nearest points of xyz (B,N,3) to each query (B,Q,3), nearest first: the
    project's one kNN (scans.geometry.knn, a k-d tree) per batch item, no gradient (indices only)."""
    rows = [knn(x.detach().cpu().numpy(), q.detach().cpu().numpy(), k)[1] for x, q in zip(xyz, queries)]
    return torch.from_numpy(np.stack(rows)).to(xyz.device)


def group_points(xyz: torch.Tensor, num_groups: int, group_size: int, start: torch.Tensor | int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FPS centres + kNN patches.

    Returns (neighborhood (B,G,K,3) relative to its centre, centres (B,G,3), idx (B,G,K), centre idx
    (B,G))."""
    b = xyz.shape[0]
    rows = torch.arange(b, device=xyz.device)[:, None]
    center_idx = farthest_point_sample(xyz, num_groups, start)
    centers = xyz[rows, center_idx]
    idx = knn_indices(xyz, centers, group_size)
    neighborhood = xyz[rows[:, :, None], idx] - centers.unsqueeze(2)
    return neighborhood, centers, idx, center_idx


# ---------------------------------------------------------------------------------------------- Chamfer-L2
def chamfer_l2_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Chamfer-L2 of each patch pair (M,K,3) x (M,K',3) -> (M,): mean squared NN distance, both directions
    summed.

    The mean over patches equals Point-MAE's ChamferDistanceL2 (mean(dist1) + mean(dist2)) for equal-size
    patches."""
    d = ((pred.unsqueeze(2) - target.unsqueeze(1)) ** 2).sum(-1)  # (M,K,K')
    return d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1)


# ------------------------------------------------------------------------------------------ patch embedding
class PatchEmbed(nn.Module):
    """Mini-PointNet: shared MLP per point, max-pool, concat the pooled code back, second MLP, max-pool.

    Point-MAE writes the shared MLPs as 1x1 convolutions; here they are Linear layers on channel-last rows,
    the
    same maths but a plain matmul, which is several times faster on CPU."""

    def __init__(self, dims: tuple[int, int, int], width: int):
        super().__init__()
        a, b, c = dims
        self.first = nn.Sequential(nn.Linear(3, a), nn.BatchNorm1d(a), nn.ReLU(), nn.Linear(a, b))
        self.second = nn.Sequential(nn.Linear(2 * b, c), nn.BatchNorm1d(c), nn.ReLU(), nn.Linear(c, width))
        self.width = width

    def forward(self, neighborhood: torch.Tensor) -> torch.Tensor:  # (B,G,K,3) -> (B,G,width)
        b, g, k, _ = neighborhood.shape
        x = self.first(neighborhood.reshape(b * g * k, 3)).reshape(b * g, k, -1)
        pooled = x.max(dim=1, keepdim=True).values
        x = torch.cat([pooled.expand(-1, k, -1), x], dim=2).reshape(b * g * k, -1)
        x = self.second(x).reshape(b * g, k, self.width)
        return x.max(dim=1).values.reshape(b, g, self.width)


# ---------------------------------------------------------------------------------------------- transformer
class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _pos_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))


class PointMAE(nn.Module):
    """Masked autoencoder over point patches. ``forward`` gives the pretraining loss; ``encode`` gives
    features."""

    def __init__(self, config: PointMAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = PatchEmbed(c.embed_dims, c.width)
        self.pos_embed = _pos_mlp(c.width)
        rates = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(c.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.decoder_pos_embed = _pos_mlp(c.width)
        dec_rates = torch.linspace(0, c.drop_path, c.decoder_depth, device="cpu").tolist()
        self.decoder_blocks = nn.ModuleList(Block(c.width, c.decoder_heads, c.mlp_ratio, r)
                                            for r in dec_rates)
        self.decoder_norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, 3 * c.group_size)  # predicts the K points of a masked patch
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- encoder ---------------------------------------------------------------------------------------
    def run_encoder(self, tokens: torch.Tensor, centers: torch.Tensor,
                    keep_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Transformer over tokens (B,G,C) at centres (B,G,3). Returns (normed last output, normed kept
        layers)."""
        pos = self.pos_embed(centers)
        x = tokens
        kept = []
        for i, block in enumerate(self.blocks):
            x = block(x + pos)  # Point-MAE adds the position embedding before every block
            if i in keep_layers:
                kept.append(self.norm(x))
        return self.norm(x), kept

    # -- masked reconstruction --------------------------------------------------------------------------
    def reconstruct_masked(self, tokens: torch.Tensor, neighborhood: torch.Tensor, centers: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """Chamfer-L2 (B,M) of every masked patch, predicted from the visible ones.

        mask (B,G) bool with the same number of masked patches per row; masked patches come out in index
        order."""
        b, g, c = tokens.shape
        m = int(mask[0].sum())
        if m == 0 or m == g or bool((mask.sum(1) != m).any()):
            raise ValueError("mask must hide the same number (0 < M < G) of patches in every row")
        visible, _ = self.run_encoder(tokens[~mask].reshape(b, g - m, c), centers[~mask].reshape(b, g - m, 3))
        pos = self.decoder_pos_embed(torch.cat([centers[~mask].reshape(b, g - m, 3),
                                                centers[mask].reshape(b, m, 3)], dim=1))
        x = torch.cat([visible, self.mask_token.expand(b, m, -1)], dim=1)
        for block in self.decoder_blocks:
            x = block(x + pos)
        pred = self.head(self.decoder_norm(x[:, -m:])).reshape(b * m, self.config.group_size, 3)
        target = neighborhood[mask].reshape(b * m, -1, 3)
        return chamfer_l2_per_patch(pred, target).reshape(b, m)

    def forward(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pretraining loss on normalised points (B,N,3): random-mask ``mask_ratio`` of ``num_groups``
        patches."""
        c = self.config
        b, n, _ = points.shape
        start = torch.randint(n, (b,), generator=generator, device="cpu").to(points.device)
        neighborhood, centers, _, _ = group_points(points, c.num_groups, c.group_size, start)
        mask = random_mask(b, c.num_groups, c.mask_ratio, generator).to(points.device)
        tokens = self.embed(neighborhood)
        return self.reconstruct_masked(tokens, neighborhood, centers, mask).mean()


def random_mask(batch: int, groups: int, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B,G) bool masks hiding round(ratio*G) random patches per row (Point-MAE's 'rand' masking)."""
    m = min(max(round(ratio * groups), 1), groups - 1)
    order = torch.rand(batch, groups, generator=generator).argsort(dim=1)
    return order < m


def covering_masks(groups: int, ratio: float, rounds: int, generator: torch.Generator | None) -> torch.Tensor:
    """(rounds,G) bool masks that together hide every patch at least once.

    Patches are put in a random order and round r hides a cyclic window of that order starting at r*G/rounds;
    the
    window is max(ratio*G, G/rounds) long, so consecutive windows touch and the union is everything."""
    if rounds < 1:
        raise ValueError("covering_masks: rounds must be >= 1")
    m = min(max(round(ratio * groups), math.ceil(groups / rounds), 1), groups - 1)
    perm = torch.randperm(groups, generator=generator)
    masks = torch.zeros(rounds, groups, dtype=torch.bool)
    for r in range(rounds):
        window = (torch.arange(m) + (r * groups) // rounds) % groups
        masks[r, perm[window]] = True
    if rounds * m < groups or not bool(masks.any(0).all()):
        raise ValueError(f"{rounds} rounds with mask ratio {ratio} cannot cover all {groups} patches")
    return masks


# ------------------------------------------------------------------------------------ save / load / hash
def _config_dict(config: PointMAEConfig) -> dict[str, Any]:
    return json.loads(config.to_json())


def backbone_hash(model: PointMAE) -> str:
    """sha256 over the config json and every tensor (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_backbone(model: PointMAE, directory: str | os.PathLike) -> Path:
    """Write model.safetensors + config.json (format, version, config, hash). Files appear atomically."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": _config_dict(model.config),
            "hash": backbone_hash(model)}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file(tensors, str(Path(tmp) / WEIGHTS_FILE))
        (Path(tmp) / CONFIG_FILE).write_text(strict_json.dumps(meta, what=str(out / CONFIG_FILE), indent=2,
                                                               sort_keys=True))
        os.replace(Path(tmp) / WEIGHTS_FILE, out / WEIGHTS_FILE)
        os.replace(Path(tmp) / CONFIG_FILE, out / CONFIG_FILE)
    return out


def load_backbone(directory: str | os.PathLike, expect: PointMAEConfig | None = None,
                  device: str | torch.device = "cpu") -> PointMAE:
    """Load a saved backbone; refuses another format/version, a config other than ``expect``, missing/extra
    tensors, wrong shapes, and tensors whose hash differs from the one recorded at save time."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    root = Path(directory)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (not a saved Point-MAE backbone)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path}: not a {FORMAT_NAME} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}")
    try:
        config = PointMAEConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: bad config ({e})") from None
    if expect is not None and expect != config:
        want, got = _config_dict(expect), _config_dict(config)
        diff = ", ".join(f"{k}: saved {got[k]!r} != expected {want[k]!r}"
                         for k in sorted(want) if want[k] != got[k])
        raise ValueError(f"{config_path}: config mismatch ({diff})")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path}: unreadable tensor file ({e})") from None
    with torch.device("meta"):  # no random init of tensors that are overwritten at once
        model = PointMAE(config)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{weights_path}: tensors do not match the config (missing {missing}, extra "
                         f"{extra})")
    bad_shapes = [k for k in expected if tuple(expected[k].shape) != tuple(tensors[k].shape)
                  or expected[k].dtype != tensors[k].dtype]
    if bad_shapes:
        raise ValueError(f"{weights_path}: wrong shape/dtype for {bad_shapes}")
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # nothing may stay uninitialised
        raise ValueError(f"{weights_path}: tensors do not match the config")
    if backbone_hash(model) != meta.get("hash"):
        raise ValueError(f"{weights_path}: tensor contents differ from the hash recorded in {config_path} "
                         "(file modified or corrupted)")
    return model.to(device).eval()
