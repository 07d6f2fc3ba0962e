"""Inspection episodes for tuning the agent: exactly what the agent sees on a scan, plus the report it should
give.

Why: a pretrained model is an expert who has not been told the job. An episode tells it, on parts it will
never be
evaluated on (`scans.training_parts`, disjoint from the dev benchmark's classes), with defects from
`scans.defects`: the messages are built by `agent.pipeline.build_conversation` (same verbalizer, templates,
tool
schemas as `agent.run`), and the target is the `report_suspects` call naming the patches that carry the defect
by
ground truth (a patch counts when at least `patch_label_share` of its points are labelled), with a reason from
the
patch's own statistics and a confidence from its cue. A normal scan's target is an empty report, or its
highest-cue patch at the lowest confidence (`EpisodeConfig.normal_target`: the bank then clears it). Guided
episodes
(`agent.tune.guidance`) add operator guidance to the overview and change the target to match.

Each part gets one fitted class (saved, so evaluation can run the real pipeline on the test scans), its scans
are
split train/test by index, and every seed derives from (seed, part, scan index): the same config gives byte-
identical
episodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.backends.ranker import overview_text, parse_overview_table
from agent.guidance import read_guidance
from agent.normal_features import recogniser_features
from agent.pipeline import InspectionConfig, build_conversation
from agent.tune.episode_scans import (
    EpisodeConfig,
    PartScan,
    folder_part_scans,
    part_scans,
)
from agent.tune.guidance import GUIDANCE_KINDS, Guidance, make_guidance, paraphrase_ids
from detector.fitted import FittedClass
from detector.fitting import fit_class
from scans.bench import sample_seed
from scans.defects import DEFECT_TYPES
from scans.patches import Patches, PatchTable

EPISODES_FILE = "episodes.jsonl"
MANIFEST_FILE = "manifest.json"
REASON_COLUMNS_PREFIX = "z_"


@dataclass
class Episode:
    """One episode: the opening messages and tool schemas the agent gets, the target reply and the ground
    truth."""

    id: str
    scan: str  # the scan's name (several episodes share one scan)
    split: str
    part: str
    defect: str | None
    guidance: Guidance | None
    messages: list[dict]
    tools: list[dict]
    target: dict
    truth_patches: list[int]
    n_patches: int
    feature: str | None = None  # a by-design feature on the scan (scans.features), if any
    feature_patches: list[int] = field(default_factory=list)
    # the unguided episode's rows for the normal-feature recognisers (agent.tune.recogniser_fit): each feature
    # and defect patch's `recogniser_features`, labelled with the feature kind or "defect"
    recogniser_rows: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "scan": self.scan,
                "split": self.split,
                "part": self.part,
                "defect": self.defect,
                "guidance": self.guidance.to_dict() if self.guidance else None,
                "messages": self.messages,
                "tools": self.tools,
                "target": self.target,
                "truth_patches": self.truth_patches,
                "n_patches": self.n_patches,
                "feature": self.feature,
                "feature_patches": self.feature_patches,
                "recogniser_rows": self.recogniser_rows,
            },
            ensure_ascii=False,
            sort_keys=True,
        )


def patch_truth(patches: Patches, labels: np.ndarray, share: float) -> list[int]:
    """Patches at least `share` of whose points are labelled anomalous; if none reaches it but some points are
    labelled, the patch with the largest labelled share (a small defect still has a place to look)."""
    owner = patches.patch_of_point
    labelled = np.bincount(owner, weights=labels.astype(np.float64), minlength=patches.n_patches)
    shares = labelled / np.maximum(patches.counts, 1)
    chosen = np.flatnonzero(shares >= share)
    if chosen.size == 0 and labels.any():
        chosen = np.array([int(np.argmax(shares))])
    return [int(i) for i in chosen]


def reason_for(table: PatchTable, patch_id: int, terms: int = 2, columns: set[str] | None = None) -> str:
    """The patch's largest positive z-scores in words ("z_recon_error_max=4.2, z_curvature=3.1"), among
    `columns` when given (the ones the overview shows: a reason cites what the reader saw)."""
    zs = {
        c: float(v[patch_id])
        for c, v in table.columns.items()
        if c.startswith(REASON_COLUMNS_PREFIX) and (columns is None or c in columns)
    }
    top = sorted(zs.items(), key=lambda kv: (-kv[1], kv[0]))[:terms]
    words = [f"{name}={value:.1f}" for name, value in top if value > 0]
    return ", ".join(words) or f"cue={float(table.columns['cue'][patch_id]):.2f}"


def confidence_for(cue: float) -> float:
    """A confidence that grows with the cue (0 typical) and stays within 0.5..0.95: a ranking, not a
    probability."""
    return round(float(np.clip(0.5 + 0.1 * cue, 0.5, 0.95)), 2)


def shown_patches(messages: list[dict]) -> tuple[set[int], set[str]]:
    """The patch ids and columns of the overview's table (the compact overview shows only some patches)."""
    rows, _ = parse_overview_table(overview_text(messages))
    return {int(r["id"]) for r in rows}, {k for r in rows for k in r}


LOWEST_CONFIDENCE = 0.5  # confidence_for's floor: "worth a look, nothing stands out"


def target_report(
    table: PatchTable,
    patch_ids: list[int],
    max_ids: int,
    columns: set[str] | None = None,
    confidence: float | None = None,
) -> dict:
    """The assistant message calling report_suspects on `patch_ids` (one region, highest cue first), or an
    empty report when there are none; `confidence` overrides the cue's. Keys are in the schema's order, as the
    constrained hf decoder writes them."""
    cue = table.columns["cue"]
    ranked = sorted(patch_ids, key=lambda i: (-float(cue[i]), i))[:max_ids]
    regions = []
    if ranked:
        regions.append(
            {
                "patch_ids": ranked,
                "reason": reason_for(table, ranked[0], columns=columns),
                "confidence": confidence_for(float(cue[ranked[0]])) if confidence is None else confidence,
            }
        )
    arguments = json.dumps({"regions": regions})
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "report_suspects", "arguments": arguments},
            }
        ],
    }


def guided_truth(
    table: PatchTable, truth: list[int], defect: str | None, guidance: Guidance | None
) -> list[int]:
    """The ground-truth patches an operator following `guidance` wants reported."""
    if guidance is None:
        return truth
    if not guidance.keeps_kind(defect):
        return []
    return outside_ignored(table, truth, guidance)


def outside_ignored(table: PatchTable, patch_ids: list[int], guidance: Guidance) -> list[int]:
    """The patches whose centre lies outside the region `guidance` says to ignore (all, for other kinds)."""
    cols = table.columns
    return [i for i in patch_ids if not guidance.ignores({a: float(cols[a][i]) for a in "xyz"})]


def feature_patch_truth(
    patches: Patches, feature_mask: np.ndarray, truth: list[int], share: float
) -> list[int]:
    """The patches that carry the by-design feature (as `patch_truth` finds a defect's) and no defect."""
    defects = set(truth)
    return [i for i in patch_truth(patches, feature_mask, share) if i not in defects]


def recogniser_rows(
    table: PatchTable, truth: list[int], feature_patches: list[int], feature: str | None
) -> list[dict]:
    """The rows the recognisers learn from on one scan, each with what they read (`recogniser_features`): its
    defect's patches ("defect"; the episode names the kind), its by-design feature's (the feature kind) and
    every other patch ("normal": what a defect-kind recogniser must not add to a report)."""
    taken = set(truth) | set(feature_patches)
    normal = [p for p in range(table.n_patches) if p not in taken]
    labelled = (
        [(p, "defect") for p in truth]
        + [(p, feature) for p in feature_patches if feature]
        + [(p, "normal") for p in normal]
    )
    return [
        {"patch": int(p), "label": label, "values": recogniser_features(table, p)}
        for p, label in labelled
    ]


def names_feature(guidance: Guidance, feature: str) -> bool:
    """True when `guidance` calls the by-design `feature` (scans.features) normal (read as agent.run reads it,
    by keywords)."""
    if guidance.kind != "normal_feature":
        return False
    return feature in read_guidance(guidance.text, False).normal_features


def feature_target(
    table: PatchTable, feature_patches: list[int], feature: str | None, guidance: Guidance | None
) -> list[int]:
    """The by-design feature's patches the target names: all of them unguided (unusual, and not yet called
    normal), none when the guidance calls the feature normal or asks for one defect kind only (a feature is
    no defect), and outside an ignored region otherwise."""
    if feature is None or guidance is None:
        return list(feature_patches)
    if guidance.kind == "only_kind" or names_feature(guidance, feature):
        return []
    return outside_ignored(table, feature_patches, guidance)


def feature_paraphrases(feature: str, split: str) -> list[int]:
    """The normal_feature paraphrases of `split` that name `feature`."""
    return [
        i
        for i in paraphrase_ids("normal_feature", split)
        if names_feature(make_guidance("normal_feature", i), feature)
    ]


def _pick_guidance(
    rng: np.random.Generator,
    split: str,
    defect: str | None,
    table: PatchTable,
    truth: list[int],
    feature: str | None = None,
) -> Guidance:
    if feature is not None and rng.random() < 0.6:  # most often, the guidance calls the feature normal
        return make_guidance("normal_feature", int(rng.choice(feature_paraphrases(feature, split))))
    kind = GUIDANCE_KINDS[int(rng.integers(len(GUIDANCE_KINDS)))]
    paraphrase = int(rng.choice(paraphrase_ids(kind, split)))
    if kind == "only_kind":  # half the time the kind the scan has, else another one
        wanted = defect if defect is not None and rng.random() < 0.5 else str(rng.choice(DEFECT_TYPES))
        return make_guidance(kind, paraphrase, defect_kind=wanted)
    if kind == "ignore_region":
        axis = "xyz"[int(rng.integers(3))]
        if truth:  # a border through or next to the defect, so that it is ignored about half the time
            centre = float(np.mean(table.columns[axis][truth]))
            above = bool(rng.random() < 0.5)
            value = centre - 0.15 if above else centre + 0.15
            if rng.random() < 0.5:
                value = centre + 0.15 if above else centre - 0.15
        else:
            above, value = bool(rng.random() < 0.5), float(rng.uniform(-0.5, 0.5))
        return make_guidance(kind, paraphrase, axis=axis, above=above, value=float(np.clip(value, -0.9, 0.9)))
    return make_guidance(kind, paraphrase)


def scan_episodes(scan: PartScan, part: str, fitted: FittedClass, config: EpisodeConfig) -> Iterator[Episode]:
    """The unguided episode of one scan and its guided ones (one analysis, one patching, several
    overviews)."""
    analysis = fitted.analyse(scan.points)

    def conversation(guidance: Guidance | None):
        inspect = InspectionConfig(
            token_budget=config.overview_tokens,
            verbalization=config.verbalization,  # type: ignore[arg-type]
            compact_rows=config.compact_rows,
            seed=config.seed,
            guidance=guidance.text if guidance else None,
        )
        scored = np.zeros(len(scan.points), dtype=bool)
        return build_conversation(scan.points, fitted, analysis, inspect, scored)

    patches, table, make_toolbox, messages = conversation(None)
    truth = patch_truth(patches, scan.labels, config.patch_label_share)
    feature_patches: list[int] = []
    if scan.feature_mask is not None and scan.feature_mask.any():
        feature_patches = feature_patch_truth(patches, scan.feature_mask, truth, config.patch_label_share)
    # a target names only patches the overview shows (the reader knows no others); the truth stays whole
    shown, columns = shown_patches(messages)
    tools = make_toolbox().openai_schemas()
    rng = np.random.default_rng(sample_seed(config.seed, part, scan.name, "guidance"))
    guidances = [
        _pick_guidance(rng, scan.split, scan.defect, table, truth, scan.feature)
        for _ in range(config.guided_per_scan)
    ]
    for g, guidance in enumerate([None, *guidances]):
        if (
            guidance is not None
        ):  # the patching does not depend on the guidance: only the overview's text changes
            messages = conversation(guidance)[3]
        wanted = [
            *guided_truth(table, truth, scan.defect, guidance),
            *feature_target(table, feature_patches, scan.feature, guidance),
        ]
        named, limit, confidence = [i for i in wanted if i in shown], config.max_target_ids, None
        if not wanted and guidance is None and config.normal_target == "lowest":
            # target_report ranks by cue: its first shown patch, at the lowest confidence
            named, limit, confidence = sorted(shown), 1, LOWEST_CONFIDENCE
        yield Episode(
            id=scan.name if guidance is None else f"{scan.name}_g{g}",
            scan=scan.name,
            split=scan.split,
            part=part,
            defect=scan.defect,
            guidance=guidance,
            messages=messages,
            tools=tools,
            target=target_report(table, named, limit, columns=columns, confidence=confidence),
            truth_patches=wanted,
            n_patches=int(patches.n_patches),
            feature=scan.feature,
            feature_patches=feature_patches,
            recogniser_rows=recogniser_rows(table, truth, feature_patches, scan.feature) if g == 0 else [],
        )


def part_episodes(
    part: str, config: EpisodeConfig, out: Path | None = None, folder: Path | None = None
) -> Iterator[Episode]:
    """Fit the part's class, then every episode of its scans; with `out`, the fit and the test scans are saved
    there (parts/<part>/ and scans/<scan>.npz) for `evals.tuned` to run the full pipeline on. With `folder`,
    the part is your own normal scans there (`folder_part_scans`)."""
    templates, scans = part_scans(part, config) if folder is None else folder_part_scans(folder, config)
    fitted = fit_class(templates, config.detector)
    if out is not None:
        fitted.save(out / "parts" / part)
        (out / "scans").mkdir(parents=True, exist_ok=True)
        for scan in scans:
            if scan.split == "test":
                np.savez_compressed(
                    out / "scans" / f"{scan.name}.npz", points=scan.points, labels=scan.labels
                )
    for scan in scans:
        yield from scan_episodes(scan, part, fitted, config)


def read_episodes(directory: str | Path, split: str | None = None) -> list[dict]:
    """The episodes saved in `directory` (optionally one split), as dicts; a clear error for a wrong
    folder."""
    path = Path(directory) / EPISODES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no {EPISODES_FILE} here (make one with python -m agent.tune episodes)"
        )
    episodes = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                episode = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from None
            if split is None or episode.get("split") == split:
                episodes.append(episode)
    return episodes
