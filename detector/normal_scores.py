"""Normal scores from the templates alone: each template's bank views scored against the *other* templates.

Why: the fit has no normal test scans, so every normal-data scale (the banks' and cues' norms, the patch
percentiles, the object threshold) is measured by letting each template play a normal test scan against the
rest. Leaving templates out has a cost: the views are judged by a bank (and a surface) with one template
fewer than a test scan meets, so their scores lean high. Scoring them with *two* templates left out as well
measures that lean (detector.calibration corrects the threshold by it), generically, per class.

Every function takes ``excluded``: for each template, the sets of templates hidden from it (``{t}`` leaves one
out; ``{t, u}`` for every other ``u`` leaves two out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from detector.bank import MemoryBank
from detector.registration import CoordinateBank
from detector.surface_cues import CUE_NAMES, SurfaceCues, raw_cues


def hidden_sets(n_templates: int, leave_out: int) -> list[list[frozenset[int]]]:
    """Per template, the template sets hidden from it: itself (leave_out=1) or itself and one other (2)."""
    if leave_out == 1:
        return [[frozenset({t})] for t in range(n_templates)]
    return [[frozenset({t, u}) for u in range(n_templates) if u != t] for t in range(n_templates)]


def feature_scores(
    features: list[np.ndarray],
    bank: MemoryBank,
    bank_source: np.ndarray,
    hidden: frozenset[int],
    template: int,
    k: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(patch distances, nearest bank rows) of one template's rows among the rows of visible templates.

    Candidates come from a faiss search on mean-centred features; their distances are then recomputed exactly,
    because the batched (BLAS) path computes |a|^2 + |b|^2 - 2ab and loses the small distances between normal
    patches to cancellation. inf where every candidate was hidden (no honest estimate)."""
    import faiss

    rows = np.ascontiguousarray(bank.features, dtype=np.float32)
    centre = rows.mean(axis=0)
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(rows - centre)
    feats = features[template]
    _, nn = index.search(np.ascontiguousarray(feats - centre, dtype=np.float32), min(k, len(rows)))
    exact = np.linalg.norm(rows[nn].astype(np.float64) - feats[:, None, :].astype(np.float64), axis=2)
    exact[np.isin(bank_source[nn], list(hidden))] = np.inf
    best = exact.argmin(axis=1)
    return exact[np.arange(len(feats)), best], nn[np.arange(len(feats)), best]


def coord_scores(
    coord_bank: CoordinateBank, registered: np.ndarray, members: np.ndarray, hidden: frozenset[int]
) -> np.ndarray:
    """float32 (G,) mean distance of each patch's points to the visible templates' coordinate-bank points."""
    others = coord_bank.points[~np.isin(coord_bank.source, list(hidden))]
    if len(others) == 0:
        return np.full(len(members), np.nan, dtype=np.float32)
    dist = cKDTree(others).query(np.asarray(registered, dtype=np.float32)[members.ravel()], k=1, workers=1)[0]
    return dist.reshape(members.shape).mean(axis=1).astype(np.float32)


def cue_scores(cues: SurfaceCues, template: np.ndarray, hidden: frozenset[int]) -> np.ndarray:
    """float32 (N,) the summed cues (normal units) of one template against the visible templates' surface."""
    keep = ~np.isin(cues.source, list(hidden))
    raw = raw_cues(
        np.ascontiguousarray(template, dtype=np.float32),
        cues.points[keep],
        cKDTree(cues.points[keep]),
        cues.normals[keep],
        cues.spacing[keep],
        cues.reach,
        smooth_k=cues.smooth_k,
        rim_spacings=cues.rim_spacings,
    )
    normal = cues.normalised(raw)
    return sum(normal[name] for name in CUE_NAMES).astype(np.float32)


@dataclass
class TemplateViews:
    """What the fit knows about its templates: per template, its bank rows' features and patch members (the
    template's views one after the other), and the template's points in the frame the banks use."""

    features: list[np.ndarray]  # per template (R_t, D)
    members: list[np.ndarray]  # per template (R_t, K) point indices into that template
    points: list[np.ndarray]  # per template (N_t, 3), registered when the fit registers
    n_views: int


def fused_patch_scores(
    views: TemplateViews,
    bank_dist: np.ndarray,
    template: int,
    hidden: frozenset[int],
    *,
    norms: dict[str, float],
    coord_bank: CoordinateBank | None,
    cues: SurfaceCues | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(bank patch scores in normal units, the mean and the largest summed cue over each patch's members;
    zeros without cues) of one template's rows with ``hidden`` left out, as FittedClass scores a test scan."""
    members = views.members[template]
    scores = bank_dist / norms.get("feature", 1.0)
    if coord_bank is not None:
        coord = coord_scores(coord_bank, views.points[template], members, hidden)
        scores = scores + coord / norms["coord"]
    cue_mean = cue_max = np.zeros(len(members), np.float32)
    if cues is not None:
        member_cues = cue_scores(cues, views.points[template], hidden)[members]
        cue_mean, cue_max = member_cues.mean(axis=1), member_cues.max(axis=1)
    return scores.astype(np.float32), cue_mean, cue_max


def view_object_scores(
    views: TemplateViews,
    bank: MemoryBank,
    bank_source: np.ndarray,
    leave_out: int,
    *,
    norms: dict[str, float],
    coord_bank: CoordinateBank | None,
    cues: SurfaceCues | None,
) -> np.ndarray:
    """One normal object score per bank view and hidden set, by FittedClass's rule (the larger of the bank's
    PatchCore score and the largest fused patch score); views with no honest estimate are left out."""
    out = []
    for template, hidden_list in enumerate(hidden_sets(len(views.features), leave_out)):
        for hidden in hidden_list:
            dist, nn = feature_scores(views.features, bank, bank_source, hidden, template)
            scores, _, cue_max = fused_patch_scores(
                views, dist, template, hidden, norms=norms, coord_bank=coord_bank, cues=cues
            )
            feats = views.features[template]
            for part in np.array_split(np.arange(len(feats)), views.n_views):
                if not len(part) or not np.isfinite(scores[part]).all():
                    continue
                bank_obj = bank.object_score(feats[part], scores[part], nn[part])
                out.append(max(bank_obj, float((scores[part] + cue_max[part]).max())))
    return np.asarray(out, dtype=np.float64)
