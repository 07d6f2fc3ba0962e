"""What a class fit does (DetectorConfig), the error every fitting or loading problem raises, and the fit's
format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from detector.pointmae_config import PointMAEConfig

DETECTOR_VERSION = 1
FORMAT_NAME = "scanagent-fitted-class"
META_FILE = "fitted.json"
# Training is pinned to one thread: with two, a fit stalls whenever another process holds a core
# (docs/design.md).
TRAIN_THREADS = 1
FeatureKind = Literal["pointmae", "fpfh"]


class FitError(ValueError):
    """A class cannot be fitted or loaded; the message names the folder or input and the problem."""


@dataclass(frozen=True)
class DetectorConfig:
    """What a class fit does. Saved with the fit; the defaults fit one class in well under two minutes on 2
    cores."""

    feature: FeatureKind = "pointmae"
    backbone: PointMAEConfig = field(default_factory=PointMAEConfig.small)
    train_steps: int = 300
    train_batch: int = 8
    bank_views: int = 4  # patchings per template put into the bank (sampling variance, see module doc)
    coreset_ratio: float = 0.25
    recon_rounds: int = 2
    seed: int = 0
    # Align every scan to the first template and add the bank of registered coordinates
    # (detector.registration), for scans that are not pre-aligned. Costs one registration per scan. None: the
    # fit measures whether its training scans are aligned already and decides (detector.registration_choice);
    # a fitted class always holds the decision (True or False).
    register: bool | None = None
    # Per-point surface distance and uncovered-rim cues fused with the bank (detector.surface_cues); needs two
    # or more training scans (they calibrate on each other), so a one-scan fit turns it off.
    surface_cues: bool = True

    def to_dict(self) -> dict:
        data = asdict(self)
        data["backbone"] = json.loads(self.backbone.to_json())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        data = dict(data)
        data.setdefault("register", False)  # fits saved before registration existed
        data.setdefault("surface_cues", False)  # fits saved before the cues existed
        data["backbone"] = PointMAEConfig.from_json(data["backbone"])
        return cls(**data)
