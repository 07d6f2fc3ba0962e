"""Guidance applied to the report itself, after any backend made it: what the user asked never to see is not
reported, whether or not the backend read the guidance.

Why: an LLM backend reads guidance as text and may ignore it (measured: the shipped adapter reports as many
regions in an "ignore x above 0.2" half as without it, README), and a by-design feature needs the shape of the
off-normal surface to be told from a defect (`agent.normal_features`). Two things are applied here, for every
backend, before verification:
- an ignored region ("ignore x above 0.2", in the normalised box): reported patches centred there are taken
  out, as the policy and the ranker already leave them out themselves;
- a named normal feature: the reported patches its learned recogniser calls that feature are taken out;
- a named defect kind ("only dents"): the patches its learned recogniser calls that kind, if the report lacks
  them, are put first in a region of their own (LOOK_FOR_PATCHES at most), for the verifier to judge.
A region left without patches is gone. report.json's `guidance` entry says what was taken out and why.
"""

from __future__ import annotations

from pathlib import Path

from agent.guidance import read_guidance
from agent.normal_features import NormalFeatureRecognisers, likely_kind
from scans.patches import PatchTable

LOOK_FOR_PATCHES = 3  # patches a named defect kind's recogniser may add to a report


def _without(regions: list[dict], dropped: set[int]) -> list[dict]:
    kept = []
    for region in regions:
        ids = [p for p in region.get("patch_ids", []) if int(p) not in dropped]
        if ids:
            kept.append({**region, "patch_ids": ids})
    return kept


def _reported(regions: list[dict]) -> list[int]:
    return sorted({int(p) for r in regions for p in r.get("patch_ids", [])})


def drop_ignored(regions: list[dict], table: PatchTable, guidance: str) -> tuple[list[dict], dict | None]:
    """`regions` without the patches centred in a region the guidance says to ignore, and what was done (None
    when the guidance names no such region)."""
    ignore = read_guidance(guidance).ignore
    if not ignore:
        return regions, None
    centre = {a: table.columns[a] for a in "xyz"}
    dropped = {
        p
        for p in _reported(regions)
        if any(r.contains({a: float(centre[a][p]) for a in "xyz"}) for r in ignore)
    }
    kept = _without(regions, dropped)
    return kept, {
        "regions": [r.words() for r in ignore],
        "dropped_patches": sorted(dropped),
        "regions_removed": len(regions) - len(kept),
    }


def drop_normal_features(
    regions: list[dict], table: PatchTable, kinds: tuple[str, ...], recognisers: NormalFeatureRecognisers
) -> tuple[list[dict], dict]:
    """`regions` without the patches recognised as one of `kinds` (a region left empty is gone), and what was
    done, for report.json."""
    reported = _reported(regions)
    dropped: set[int] = set()
    for kind in kinds:
        dropped |= set(recognisers.recognised(table, kind, reported))
    kept = _without(regions, dropped)
    summary = {
        "kinds": list(kinds),
        "dropped_patches": sorted(dropped),
        "regions_removed": len(regions) - len(kept),
        "recogniser": Path(recognisers.source).name,
        "sha256": recognisers.sha256,
    }
    if not table.shape:
        summary["note"] = "the scan has no surface cues (fit without templates): nothing could be recognised"
    return kept, summary


def add_named_kinds(
    regions: list[dict], table: PatchTable, guidance: str, recognisers: NormalFeatureRecognisers
) -> tuple[list[dict], dict | None]:
    """`regions` with the unreported patches the named defect kinds' recognisers call that kind put first, and
    what was done (None when the guidance names no kind a recogniser exists for)."""
    kinds = [k for k in read_guidance(guidance).look_for if k in recognisers.defect_kinds]
    if not kinds:
        return regions, None
    reported = set(_reported(regions))
    best: dict[int, float] = {}  # each unreported patch at its likeliest named kind
    for kind in kinds:
        for p, q in likely_kind(table, kind, recognisers):
            if p not in reported:
                best[p] = max(q, best.get(p, 0.0))
    added = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:LOOK_FOR_PATCHES]
    entry = {"kinds": kinds, "added_patches": [p for p, _ in added]}
    if not added:
        return regions, entry
    region = {
        "patch_ids": [p for p, _ in added],
        "reason": f"learned recogniser: looks like {' or '.join(kinds)} (p={added[0][1]:.2f})",
        "confidence": round(added[0][1], 2),
    }
    return [region, *regions], entry


def apply_to_report(
    regions: list[dict],
    table: PatchTable,
    guidance: str,
    kinds: tuple[str, ...],
    recognisers: NormalFeatureRecognisers | None,
) -> tuple[list[dict], dict]:
    """The three steps of the module docstring: (the regions left, report.json entries to add to
    `guidance`)."""
    entries: dict = {}
    regions, ignored = drop_ignored(regions, table, guidance)
    if ignored is not None:
        entries["ignored_regions"] = ignored
    if kinds and recognisers is not None:
        regions, entries["normal_features"] = drop_normal_features(regions, table, kinds, recognisers)
    if recognisers is not None:
        regions, named = add_named_kinds(regions, table, guidance, recognisers)
        if named is not None:
            entries["named_kinds"] = named
    return regions, entries
