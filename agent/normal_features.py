"""Guidance that calls a feature normal ("sharp ridges are normal", "the bolt holes are by design"), applied
by a learned recogniser to whatever backend made the report.

Why here and not in each backend: measured on the tuning episodes' held-out scans (README, "Normal features
that stand out"), no reader of the overview's text told a by-design feature from a defect well enough: the
hand-written statistics of `agent.guidance` dropped real defects with the feature, and the tuned LLM learned
to say less everywhere rather than to skip the feature. What tells a raised rib from a dent, or a row of bolt
holes from a drilled-through defect, is the shape of the off-normal surface (`verbalize.shape`), which the
overview does not show. So the pipeline applies such guidance once, for every backend: the patches a logistic
regression (trained on the episodes' by-design features against their defects, `agent.tune.recogniser_fit`)
calls the named feature are removed from the reported regions before verification (`agent.guided_report`),
and report.json says which.
The backend still reads the guidance in its prompt; the policy and the ranker leave the kinds handled here to
this stage (`agent.guidance.handling`), so a patch is not judged twice.

The same file holds one recogniser per defect kind (`defect_kinds`: that kind's patches against every other
patch), which guidance naming a defect kind ("only dents") uses to put the patches that look like it first in
the report (`agent.guided_report.add_named_kinds`).

The model file is JSON (no pickles): per kind, the feature names, standardisation, coefficients, intercept and
threshold. The package ships one (`SHIPPED`), trained on the training parts' episodes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from agent.backends.ranker import LogisticRows
from agent.guidance import read_guidance
from scans.patches import PatchTable

FORMAT = "scanagent-normal-features"
SHIPPED = Path(__file__).parent / "recognisers" / "normal-features.json"


def recogniser_features(table: PatchTable, patch_id: int) -> dict[str, float]:
    """What the recogniser reads of one patch: the table's z-scores and cue, and its shape descriptors."""
    row = {k: float(v[patch_id]) for k, v in table.columns.items() if k.startswith("z_") or k == "cue"}
    return row | {f"shape_{k}": float(v[patch_id]) for k, v in table.shape.items()}


class NormalFeatureRecognisers:
    """One logistic regression per normal-feature kind (P(this patch is that by-design feature)) and, when the
    file has them, one per defect kind (P(this patch is a defect of that kind))."""

    def __init__(self, data: dict, source: str):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} file")
        kinds = data.get("kinds")
        if not isinstance(kinds, dict) or not kinds:
            raise ValueError(f"{source}: no recognisers under 'kinds'")
        try:
            self.kinds = {
                kind: LogisticRows(list(entry["features"]), entry, f"{source}: kinds.{kind}")
                for kind, entry in kinds.items()
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: a recogniser is malformed ({err})") from None
        # defect kinds a look-for guidance may add patches of (agent.guided_report); older files have none
        try:
            self.defect_kinds = {
                kind: LogisticRows(list(entry["features"]), entry, f"{source}: defect_kinds.{kind}")
                for kind, entry in (data.get("defect_kinds") or {}).items()
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: a defect-kind recogniser is malformed ({err})") from None
        self.source = source
        self.trained_on = data.get("trained_on", {})
        self.sha256: str | None = None  # of the file it was loaded from (`load`)

    @classmethod
    def load(cls, path: str | Path) -> NormalFeatureRecognisers:
        try:
            raw = Path(path).read_bytes()
            model = cls(json.loads(raw.decode("utf-8")), str(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the normal-feature recognisers ({err})") from None
        model.sha256 = hashlib.sha256(raw).hexdigest()
        return model

    def recognised(self, table: PatchTable, kind: str, patch_ids: list[int]) -> list[int]:
        """The patches among `patch_ids` this kind's recogniser calls the feature (none without shape
        descriptors: a scan without surface cues gives it nothing to tell the feature by)."""
        if kind not in self.kinds or not table.shape:
            return []
        model = self.kinds[kind]
        return [p for p in patch_ids if model.probability(recogniser_features(table, p)) >= model.threshold]


@functools.lru_cache(maxsize=8)
def recognisers_for(choice: str) -> NormalFeatureRecognisers | None:
    """The recognisers an inspection uses: "shipped" (the package's), "none", or a model file's path."""
    if choice == "none":
        return None
    return NormalFeatureRecognisers.load(SHIPPED if choice == "shipped" else Path(choice))


def likely_kind(
    table: PatchTable, kind: str, recognisers: NormalFeatureRecognisers
) -> list[tuple[int, float]]:
    """(patch, probability) of the patches the defect-kind recogniser of `kind` calls that kind, most likely
    first (none without shape descriptors or a recogniser for it)."""
    model = recognisers.defect_kinds.get(kind)
    if model is None or not table.shape:
        return []
    scored = [(p, model.probability(recogniser_features(table, p))) for p in range(table.n_patches)]
    return sorted(((p, q) for p, q in scored if q >= model.threshold), key=lambda t: (-t[1], t[0]))


def named_kinds(guidance: str | None, recognisers: NormalFeatureRecognisers | None) -> tuple[str, ...]:
    """The normal features `guidance` names that `recognisers` can apply."""
    if not guidance or recognisers is None:
        return ()
    return tuple(k for k in read_guidance(guidance).normal_features if k in recognisers.kinds)
