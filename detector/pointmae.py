"""Point-MAE in plain torch: the "compression" backbone of the detector.

Reads top to bottom like Point-MAE's ``models/Point_MAE.py`` (Pang et al., 2022):
farthest point sampling and kNN grouping -> mini-PointNet patch embedding -> transformer encoder on the
visible
patches -> light transformer decoder with mask tokens -> Chamfer-L2 on the masked patches only. Features for
the
memory bank follow M3DM (Wang et al., 2023): the encoder runs on *all* patches unmasked and the outputs of a
few
blocks (after the final norm) are concatenated per patch.

Everything is plain torch (CPU or CUDA); FPS + kNN grouping is shared with inference in numpy
(detector.grouping, where the scale conventions are explained), Chamfer is written here, so no compiled
extension is needed. Inference runs the exported graph of :class:`detector.pointmae_graph.ScanPass`
without torch (detector.pointmae_runtime).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detector.grouping import group_scan
from detector.pointmae_config import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    PointMAEConfig,
    config_dict,
    read_backbone_meta,
)
from scans import strict_json


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ grouping
def group_points(xyz: torch.Tensor, num_groups: int, group_size: int, start: torch.Tensor | int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FPS centres + kNN patches of a batch (B,N,3), one scan at a time with detector.grouping's numpy code
    (indices only, no gradient), so training groups exactly as inference does.

    Returns (neighborhood (B,G,K,3) relative to its centre, centres (B,G,3), idx (B,G,K), centre idx
    (B,G))."""
    b = xyz.shape[0]
    starts = torch.as_tensor(start, dtype=torch.long).expand(b).tolist()
    points = xyz.detach().cpu().numpy()
    parts = [group_scan(p, num_groups, group_size, s)[2:] for p, s in zip(points, starts)]
    idx = torch.from_numpy(np.stack([p[0] for p in parts])).to(xyz.device)
    center_idx = torch.from_numpy(np.stack([p[1] for p in parts])).to(xyz.device)
    rows = torch.arange(b, device=xyz.device)[:, None]
    centers = xyz[rows, center_idx]
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
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
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
    def predict_masked(self, visible_tokens: torch.Tensor, visible_centers: torch.Tensor,
                       masked_centers: torch.Tensor) -> torch.Tensor:
        """The K points (B,M,K,3) of each masked patch, from the visible tokens (B,V,C) at their centres
        (B,V,3) and the masked patches' centres (B,M,3): encoder on the visible, decoder with mask tokens."""
        b, m = masked_centers.shape[:2]
        visible, _ = self.run_encoder(visible_tokens, visible_centers)
        pos = self.decoder_pos_embed(torch.cat([visible_centers, masked_centers], dim=1))
        x = torch.cat([visible, self.mask_token.expand(b, m, -1)], dim=1)
        for block in self.decoder_blocks:
            x = block(x + pos)
        return self.head(self.decoder_norm(x[:, -m:])).reshape(b, m, self.config.group_size, 3)

    def reconstruct_masked(self, tokens: torch.Tensor, neighborhood: torch.Tensor, centers: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """Chamfer-L2 (B,M) of every masked patch, predicted from the visible ones.

        mask (B,G) bool with the same number of masked patches per row; masked patches come out in index
        order."""
        b, g, c = tokens.shape
        m = int(mask[0].sum())
        if m == 0 or m == g or bool((mask.sum(1) != m).any()):
            raise ValueError("mask must hide the same number (0 < M < G) of patches in every row")
        pred = self.predict_masked(tokens[~mask].reshape(b, g - m, c), centers[~mask].reshape(b, g - m, 3),
                                   centers[mask].reshape(b, m, 3)).reshape(b * m, self.config.group_size, 3)
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


# ------------------------------------------------------------------------------------ save / load / hash
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
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config_dict(model.config),
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
    config, recorded_hash = read_backbone_meta(config_path, expect)
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
    if backbone_hash(model) != recorded_hash:
        raise ValueError(f"{weights_path}: tensor contents differ from the hash recorded in {config_path} "
                         "(file modified or corrupted)")
    return model.to(device).eval()
