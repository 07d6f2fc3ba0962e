"""Plain words for a report: each region's evidence in the scan's units, and the scan's verdict in one line.

Why: the numbers the detector and the verbalizer work with (a bank distance of 0.98, `roughness z=-6.2`) mean
nothing
to someone holding the part. Each phrase here names what was measured, compares it with what is typical (the
class's
normal limit, or the scan's own median patch) and keeps the number, so the words can be checked against the
data.
Distances are in the scan's own units (whatever the scanner wrote: mm, m), also as a multiple of the point
spacing.
"""

from __future__ import annotations

import numpy as np

from scans.patches import PatchTable

NOTABLE_Z = 2.0  # a statistic is worth a phrase when some patch of the region is this many robust SDs off
MAX_PHRASES = 2  # evidence phrases per region, strongest first

# learned statistics: how to say "this is k times the scan's typical value"
RATIO_PHRASES = {
    "recon_error": "shape unfamiliar to the model: {ratio:.1f}x the scan's typical reconstruction error",
    "feature_deviation": "features unlike the class's average: {ratio:.1f}x the scan's typical deviation",
    "feature_norm": "unusual feature strength: {ratio:.1f}x the scan's typical",
}


# the detector's surface cues are in normal units (1 = the class's normal limit), so they are said against it
NORMAL_LIMIT_PHRASES = {
    "surface_distance": "off the templates' surface: {value:.1f}x the class's normal limit",
    "uncovered_rim": "template surface missing beside it: {value:.1f}x the class's normal limit",
}


def _typical(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else 0.0


def _ratio(value: float, typical: float) -> float | None:
    return value / typical if typical > 1e-12 else None


def point_spacing(table: PatchTable) -> float:
    """The scan's typical distance between neighbouring points, in scan units."""
    return _typical(table.columns["spacing"]) * table.normalisation.scale


def _geometry_phrase(name: str, table: PatchTable, ids: np.ndarray, z: float) -> str:
    """Roughness, curvature or spacing of the region's most unusual patch against the scan's median patch."""
    scale = table.normalisation.scale
    column = table.columns[name]
    value = float(column[ids[np.argmax(np.abs(table.columns[f"z_{name}"][ids]))]])
    typical = _typical(column)
    if name == "roughness":
        side = "rougher" if z > 0 else "smoother"
        return (
            f"surface {side} than the rest: {value * scale:.3g} scan units RMS off its plane vs "
            f"{typical * scale:.3g} typical"
        )
    if name == "curvature":
        side = "more curved" if z > 0 else "flatter"
        return f"{side} than the rest of the surface (surface variation {value:.3f} vs {typical:.3f} typical)"
    side = "sparser" if z > 0 else "denser"
    note = " (a hole or a shadow?)" if z > 0 else ""
    return (
        f"{side} sampling than the rest: points {value * scale:.3g} scan units apart vs "
        f"{typical * scale:.3g} typical{note}"
    )


def _stat_phrase(stat: str, table: PatchTable, ids: np.ndarray) -> str:
    """A learned statistic's region maximum against the scan's typical patch mean."""
    top = float(table.columns[f"{stat}_max"][ids].max())
    if stat in NORMAL_LIMIT_PHRASES:
        return NORMAL_LIMIT_PHRASES[stat].format(value=top)
    if stat == "template_distance":
        spacing = point_spacing(table)
        times = f" ({top / spacing:.1f}x the point spacing)" if spacing > 0 else ""
        return f"surface {top:.3g} scan units from the templates' surface{times}"
    ratio = _ratio(top, _typical(table.columns[f"{stat}_mean"]))
    if ratio is None:
        return f"{stat.replace('_', ' ')} {top:.3g}"
    template = RATIO_PHRASES.get(stat, stat.replace("_", " ") + " {ratio:.1f}x the scan's typical")
    return template.format(ratio=ratio)


def evidence_phrases(table: PatchTable, patch_ids: list[int], max_phrases: int = MAX_PHRASES) -> list[str]:
    """The region's strongest statistics in words (|z| >= NOTABLE_Z), strongest first."""
    ids = np.asarray([p for p in patch_ids if 0 <= p < table.n_patches], dtype=np.int64)
    if ids.size == 0:
        return []
    candidates: list[tuple[float, str]] = []
    for name in ("curvature", "roughness", "spacing"):
        if f"z_{name}" in table.columns:
            zs = table.columns[f"z_{name}"][ids]
            z = float(zs[np.argmax(np.abs(zs))])
            candidates.append((abs(z), _geometry_phrase(name, table, ids, z)))
    for stat in table.stat_names:
        z = float(max(table.columns[f"z_{stat}_max"][ids].max(), table.columns[f"z_{stat}_mean"][ids].max()))
        candidates.append((z, _stat_phrase(stat, table, ids)))
    strong = sorted((c for c in candidates if c[0] >= NOTABLE_Z), key=lambda c: -c[0])
    return [phrase for _, phrase in strong[:max_phrases]]


def check_phrase(region: dict, mode: str) -> str:
    """What the verification said about a region, as a multiple of the limit it was held against."""
    if region["verdict"] == "skipped":
        return "not verified (the memory bank's budget was spent on likelier regions)"
    top, limit = region.get("max_distance"), region.get("threshold")
    if top is None or not limit:
        return f"{region['verdict']} (no normal limit to compare with)"
    if mode != "bank":
        return f"{region['verdict']}: {top / limit:.2f}x the typical distance to the scan's own far patches"
    within = " (within normal)" if region["verdict"] == "rejected" else ""
    partial = region.get("partial_patch_ids")
    part = (
        f" on its first {len(partial)} of {len(region['patch_ids'])} patches (the budget held no more)"
        if partial
        else ""
    )
    ratio = f"{top / limit:.2f}x the class's normal patch limit{within}"
    return f"{region['verdict']} by the memory bank{part}: {ratio}"


def region_explanation(region: dict, table: PatchTable, mode: str) -> str:
    """One region's verification and evidence in words, e.g. 'confirmed: ... 2.31x ...; surface 0.6 scan units
    ...'."""
    phrases = evidence_phrases(table, region["patch_ids"]) or [
        "nothing in the scan's own statistics stands out"
    ]
    return "; ".join([check_phrase(region, mode), *phrases])


def scan_summary(
    verdict: str | None,
    object_score: float,
    threshold: float | None,
    regions: list[dict],
    mode: str,
    registration: dict | None = None,
) -> str:
    """The one line a reader needs: defective or normal, against which threshold, and the strongest reason."""
    confirmed = [r for r in regions if r["verdict"] == "confirmed"]
    counted = f"{len(confirmed)} of {len(regions)} suspect regions above the normal patch limit"
    if verdict is None:
        why = (
            "zero-shot mode has no normal scans to calibrate on"
            if mode != "bank"
            else "this fit has no object threshold; refit the class to get one"
        )
        line = f"no verdict (uncalibrated): {why}; object score {object_score:.4g}; {counted}"
    else:
        sign = ">" if verdict == "defective" else "<="
        line = f"{verdict}: object score {object_score:.4g} {sign} threshold {threshold:.4g}; {counted}"
        if confirmed:
            best = max(confirmed, key=lambda r: (r.get("max_distance") or 0.0) / (r.get("threshold") or 1.0))
            line += f"; strongest: {best.get('explanation', '').split('; ', 1)[-1]}"
    if registration and registration.get("doubtful"):
        line += "; registration doubtful: is it the same part?"
    return line
