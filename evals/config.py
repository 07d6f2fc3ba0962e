"""What a harness run is asked to do: the methods and backends by name, the data, the detector and agent
settings.

Bad input fails here, before anything is fitted or written: unknown methods or backends, a name given twice,
an
empty run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.pipeline import InspectionConfig
from detector.config import DetectorConfig
from detector.pointmae_config import PointMAEConfig
from evals.methods import DEFAULT_METHODS, METHODS
from evals.methods import REGISTRY as METHOD_REGISTRY

QUICK_CLASSES = ("flange", "gear")
QUICK_TRAIN_STEPS = 24

Executor = Literal["local", "ray"]


class HarnessError(ValueError):
    """Unusable harness input (unknown method or backend, bad spec); the message names the problem."""


DEFECT_PLACEHOLDER = "{defect}"


@dataclass(frozen=True)
class BackendSpec:
    """One backend as named on the command line: `label` is the result name, `name` the registry entry,
    `guidance` the operator guidance its scans are inspected with (a guided variant of the same backend)."""

    label: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    guidance: str | None = None

    def guidance_for(self, defect_type: str) -> str | None:
        """The guidance a scan of `defect_type` is inspected with. `{defect}` in the text names the scan's own
        defect kind (how "guidance that names a defect type" is measured: recall on that kind, guided vs not);
        a scan with no defect kind to name (normal, unknown) is inspected without it."""
        if self.guidance is None or DEFECT_PLACEHOLDER not in self.guidance:
            return self.guidance
        if not defect_type or defect_type in ("good", "unknown"):
            return None
        return self.guidance.replace(DEFECT_PLACEHOLDER, defect_type)


def key_value_options(arg: str) -> dict[str, Any] | None:
    """`key=value;key=value` as a dict (values read as JSON when they parse, else kept as text), or None when
    `arg` is not in that form (the older `hf:<model>` / `openai:<model>` spelling)."""
    pieces = [piece.strip() for piece in arg.split(";") if piece.strip()]
    if not pieces or not all(re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", piece) for piece in pieces):
        return None
    options: dict[str, Any] = {}
    for piece in pieces:
        key, _, value = piece.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _check_options(name: str, options: dict[str, Any], text: str) -> None:
    """Unknown keyword options fail here, naming the backend's own, before anything is fitted."""
    from agent.backends import backend_parameters

    known = backend_parameters(name)
    unknown = sorted(set(options) - set(known)) if known is not None else []
    if unknown:
        raise HarnessError(
            f"backend {text!r}: unknown option(s) {', '.join(unknown)}; {name} takes guidance, "
            + ", ".join(known or [])
        )


def parse_backend(
    text: str, *, base_url: str | None = None, seed: int = 0, llm_kwargs: dict[str, Any] | None = None
) -> BackendSpec:
    """`policy`, `random-regions`, `hf[:<model>]`, `openai:<model>`, `langchain:<module:Class>` or any
    registry name, optionally with `:key=value;key=value` options instead of the model: the backend's own
    keyword arguments (`hf:adapter=none`, `hf:adapter=DIR`, `ranker:model=FILE`), `guidance=TEXT`, which
    inspects that row's scans with the guidance (`policy:guidance=sharp ridges are normal`; `{defect}` in it
    is each scan's own defect kind, `BackendSpec.guidance_for`), and `label=NAME`, the row's name in the
    results (default: the spec as written).

    `llm_kwargs` (from `--backend-kwargs`) go to the server backends (openai, langchain), e.g.
    `{"llama_cpp_compat": true}` for a llama.cpp server whose chat format drops `role: tool` messages."""
    from agent.backends import REGISTRY

    text = text.strip()
    name, _, arg = text.partition(":")
    kwargs: dict[str, Any] = {}
    if name not in REGISTRY:
        raise HarnessError(f"unknown backend {name!r} in {text!r}; known: {', '.join(sorted(REGISTRY))}")
    options = key_value_options(arg)
    guidance, label = None, text
    if options is not None:
        guidance = options.pop("guidance", None)
        label = str(options.pop("label", text))
        if guidance is not None and (not isinstance(guidance, str) or not guidance.strip()):
            raise HarnessError(f"backend {text!r}: guidance must be text")
        _check_options(name, options, text)
        kwargs.update(options)
        arg = ""
    if name == "openai":
        if arg:
            kwargs["model"] = arg
        if base_url:
            kwargs["base_url"] = base_url
    elif name == "langchain":
        if arg:
            kwargs["chat_model"] = arg
    elif name == "hf":
        if arg:
            kwargs["model"] = arg
        kwargs.setdefault("seed", seed)
    elif name == "random-regions":
        kwargs.setdefault("seed", seed)
    elif arg:
        kwargs["model"] = arg
    if llm_kwargs and name in ("openai", "langchain"):
        kwargs.update(llm_kwargs)
    return BackendSpec(label=label, name=name, kwargs=kwargs, guidance=guidance)


def quick_detector_config(seed: int = 0) -> DetectorConfig:
    """A small, fast backbone for `--quick` and tests: the pipeline end to end, not the detector's best
    numbers."""
    backbone = PointMAEConfig(
        width=96,
        depth=2,
        heads=4,
        decoder_depth=1,
        decoder_heads=4,
        embed_dims=(32, 64, 96),
        inference_groups=256,
        feature_layers=(0, 1),
    )
    return DetectorConfig(
        backbone=backbone, train_steps=QUICK_TRAIN_STEPS, train_batch=4, bank_views=2, seed=seed
    )


def quick_bench_config(seed: int = 0):
    from scans.bench import BenchConfig

    return BenchConfig(
        points=4000,
        templates=3,
        normal_per_class=2,
        defects_per_type=1,
        defect_types=("bulge", "concavity", "hole"),
        seed=seed,
    )


def ensure_quick_bench(out: Path, seed: int = 0) -> str:
    """Build (or reuse) the tiny dev benchmark under `<out>/quick-bench`; returns its dataset spec."""
    from scans.bench import build_benchmark

    root = Path(out) / "quick-bench"
    if not (root / "manifest.json").is_file():
        build_benchmark(
            root, classes=list(QUICK_CLASSES), config=quick_bench_config(seed), scans_dir=None, overwrite=True
        )
    return f"anomaly-shapenet:{root}"


@dataclass(frozen=True)
class HarnessConfig:
    data: str  # "<layout>:<root>"
    out: Path
    classes: tuple[str, ...] | None = None  # None: every class of the dataset
    methods: tuple[str, ...] = DEFAULT_METHODS
    backends: tuple[BackendSpec, ...] = ()
    limit: int | None = None  # test scans per class (a balanced, deterministic subset)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    init_backbone: Path | None = None  # pretrained Point-MAE folder the class fits start from
    inspection: InspectionConfig = field(default_factory=InspectionConfig)
    executor: Executor = "local"
    ray_address: str | None = None
    price_prompt: float | None = None  # currency per 1k prompt tokens
    price_completion: float | None = None  # currency per 1k completion tokens
    fallback: bool = True  # False: a backend failure is recorded as failed, no policy rescue
    transcripts: bool = True
    seed: int = 0
    command: str = ""  # how the run was started (for the report)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise HarnessError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        labels = [*self.methods, *(b.label for b in self.backends)]
        if len(set(labels)) != len(labels):
            raise HarnessError(f"a method or backend is named twice: {labels}")
        if not labels:
            raise HarnessError("nothing to run: give --methods and/or --backends")
        if self.limit is not None and self.limit < 1:
            raise HarnessError(f"--limit must be >= 1, got {self.limit}")
        if self.executor not in ("local", "ray"):
            raise HarnessError(f"unknown executor {self.executor!r}; use local or ray")

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.methods, *(b.label for b in self.backends))

    def features(self) -> list[str]:
        """Which class fits the run needs: pointmae for the bank, recon and every backend; fpfh for btf."""
        needed = {METHOD_REGISTRY[m].feature for m in self.methods} - {None}
        if self.backends:
            needed.add("pointmae")
        return [f for f in ("pointmae", "fpfh") if f in needed]  # type: ignore[misc]
