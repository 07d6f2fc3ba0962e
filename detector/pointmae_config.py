"""Point-MAE's architecture and patching (PointMAEConfig), apart from the model so that reading a fit's
config, or running the exported backbone (detector.pointmae_runtime), does not import torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# a saved backbone's folder (detector.pointmae.save_backbone)
FORMAT_NAME = "scanagent-pointmae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# the exported inference pass (detector.pointmae_graph, run by detector.pointmae_runtime)
GRAPH_INPUTS = ("neighborhood", "centers", "visible", "masked")
GRAPH_OUTPUTS = ("features", "errors")


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


def config_dict(config: PointMAEConfig) -> dict[str, Any]:
    return json.loads(config.to_json())


def read_backbone_meta(config_path: Path, expect: PointMAEConfig | None = None) -> tuple[PointMAEConfig, str]:
    """(config, recorded hash) of a saved backbone's config.json; ValueError naming the file when it is not
    one of this format and version, or its config is not ``expect``."""
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path}: not a {FORMAT_NAME} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    try:
        config = PointMAEConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: bad config ({e})") from None
    if expect is not None and expect != config:
        want, got = config_dict(expect), config_dict(config)
        diff = ", ".join(
            f"{k}: saved {got[k]!r} != expected {want[k]!r}" for k in sorted(want) if want[k] != got[k]
        )
        raise ValueError(f"{config_path}: config mismatch ({diff})")
    return config, str(meta.get("hash"))
