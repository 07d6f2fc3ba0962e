"""agent.verifier: the bank scores exactly the chosen points (agent look-ups included) with full-bank values,
the rest
keeps a prior below the class's normal range, the budget skips regions rather than overspend, and the
zero-shot mode
works without a bank and says so.

A tiny Point-MAE fitted for a few steps is enough: what is tested is bookkeeping and exactness, not detection
quality.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.explain import check_phrase
from agent.verifier import verify, verify_zero_shot
from verbalize import describe_scan


@pytest.fixture(scope="module")
def patches(scan, analysis):
    return describe_scan(scan, analysis.point_stats, seed=0)[0]


@pytest.fixture(scope="module")
def full(fitted, analysis) -> np.ndarray:
    result = fitted.score(analysis)
    out = np.empty(len(analysis.points), dtype=np.float32)
    out[result.point_ids] = result.point_scores
    return out


def region(patch_ids, confidence=0.5):
    return {"patch_ids": list(patch_ids), "reason": "test", "confidence": confidence}


def test_scores_exactly_the_region_points_with_full_bank_values(fitted, analysis, patches, full):
    regions = [region([0], 0.9), region([3], 0.4)]
    v = verify(fitted, analysis, patches, regions, max_fraction=0.5)
    expected = np.zeros(len(full), dtype=bool)
    expected[patches.points_of([0, 3])] = True
    np.testing.assert_array_equal(v.verified, expected)
    assert v.verified_fraction == pytest.approx(expected.mean())
    np.testing.assert_array_equal(v.point_scores[v.verified], full[v.verified])  # exact, not approximately
    assert v.mode == "bank"
    assert [r.verdict for r in v.regions] != ["skipped", "skipped"]
    assert {r.point_count for r in v.regions} == {patches.counts[0], patches.counts[3]}


def test_unverified_points_keep_a_prior_below_the_normal_floor(fitted, analysis, patches):
    v = verify(fitted, analysis, patches, [region([1])], max_fraction=0.2)
    floor = fitted.thresholds["patch_p5"]
    prior = v.point_scores[~v.verified]
    assert prior.size and (prior >= 0).all() and (prior < floor).all()


def test_agent_lookups_count_towards_the_budget_and_keep_their_bank_scores(fitted, analysis, patches, full):
    n = len(analysis.points)
    already = np.zeros(n, dtype=bool)
    already[patches.points_of([2])] = True
    budget = (
        already.sum() + patches.counts[0]
    ) / n  # room for the look-up and region 0, not for region 5 as well
    v = verify(
        fitted,
        analysis,
        patches,
        [region([0], 0.9), region([5], 0.1)],
        max_fraction=budget,
        already_scored=already,
    )
    assert v.verified_fraction <= budget + 1e-12
    assert v.verified[already].all()
    np.testing.assert_array_equal(v.point_scores[v.verified], full[v.verified])
    verdicts = {tuple(r.patch_ids): r.verdict for r in v.regions}
    assert verdicts[(0,)] in ("confirmed", "rejected")
    assert verdicts[(5,)] == "skipped"  # the low-confidence region is dropped, not the budget exceeded


def test_regions_past_the_budget_are_cut_to_their_leading_patches_not_overspent(fitted, analysis, patches):
    everything = list(range(patches.n_patches))
    v = verify(fitted, analysis, patches, [region(everything, 0.9), region([4], 0.5)], max_fraction=0.2)
    assert v.verified_fraction <= 0.2
    whole = v.regions[0]
    assert whole.verdict in ("confirmed", "rejected") and whole.partial_patch_ids
    leading = whole.partial_patch_ids
    assert leading == everything[: len(leading)] and len(leading) < len(everything)
    assert v.verified[patches.points_of(leading)].all()
    n = len(analysis.points)
    # as many leading patches as fit: one more would pass the budget
    assert patches.counts[: len(leading) + 1].sum() > 0.2 * n
    assert v.regions[1].verdict == "skipped" or 4 in leading
    words = check_phrase(whole.to_dict(), "bank")
    assert f"on its first {len(leading)} of {len(everything)} patches" in words
    with_room = verify(fitted, analysis, patches, [region([4], 0.5)], max_fraction=0.2)
    assert with_room.regions[0].partial_patch_ids is None  # a region that fits is verified whole


def test_a_region_whose_first_patch_does_not_fit_is_skipped(fitted, analysis, patches):
    biggest = int(np.argmax(patches.counts))
    share = 0.5 * patches.counts[biggest] / len(analysis.points)
    v = verify(fitted, analysis, patches, [region([biggest, 0], 0.9)], max_fraction=share)
    assert v.regions[0].verdict == "skipped" and v.regions[0].max_distance is None
    assert not v.verified.any()


def test_verdict_compares_the_region_maximum_with_the_normal_threshold(fitted, analysis, patches):
    v = verify(fitted, analysis, patches, [region([p]) for p in range(4)], max_fraction=1.0)
    threshold = fitted.thresholds["patch_p99"]
    for r in v.regions:
        assert r.threshold == pytest.approx(threshold)
        assert r.max_distance == pytest.approx(v.point_scores[patches.points_of(r.patch_ids)].max())
        assert r.verdict == ("confirmed" if r.max_distance > threshold else "rejected")


def test_verify_all_is_the_full_bank_baseline(fitted, analysis, patches, full):
    full_result = fitted.score(analysis)
    v = verify(fitted, analysis, patches, [region([0])], max_fraction=0.2, verify_all=True)
    assert v.verified_fraction == 1.0
    np.testing.assert_array_equal(v.point_scores, full)
    assert v.object_score == full_result.object_score


def test_no_regions_means_no_bank_search(fitted, analysis, patches):
    v = verify(fitted, analysis, patches, [], max_fraction=0.2)
    assert v.verified_fraction == 0.0 and v.patches_searched == 0
    assert v.object_score < fitted.thresholds["patch_p5"]


def plate_with_bump(n_side: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A flat square plate with one sharp bump: (points, bump mask). A bump is unlike the rest of its own
    part."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-1, 1, size=(n_side * n_side, 2))
    centre = np.array([0.5, 0.5])
    r = np.linalg.norm(xy - centre, axis=1)
    z = 0.25 * np.clip(1 - r / 0.2, 0, None) ** 2
    return np.column_stack([xy, z]).astype(np.float32), r < 0.2


def test_zero_shot_mode_needs_no_bank_and_says_so():
    points, bump = plate_with_bump()
    patches, _ = describe_scan(points, None, seed=0)
    owner = patches.patch_of_point
    bump_patch = int(np.bincount(owner[bump]).argmax())
    far = np.linalg.norm(patches.centers - patches.centers[bump_patch], axis=1)
    flat_patch = int(np.argsort(far)[len(far) // 2])  # mid-distance patch on the flat part
    regions = [region([bump_patch], 0.9), region([flat_patch], 0.5)]
    v = verify_zero_shot(points, patches, regions, max_fraction=0.3)
    assert v.mode == "zero-shot"
    assert v.verified_fraction <= 0.3
    assert (v.point_scores[~v.verified] == 0).all()
    by_patch = {r.patch_ids[0]: r for r in v.regions}
    assert by_patch[bump_patch].max_distance > by_patch[flat_patch].max_distance
    assert all(r.verdict in ("confirmed", "rejected") for r in v.regions)


def test_prior_orders_points_by_every_learned_statistic():
    """A point that stands out in any one statistic outranks the typical points, whichever statistic it is."""
    from agent.verifier import point_cue

    rng = np.random.default_rng(0)
    stats = {"template_distance": rng.normal(1.0, 0.1, 500), "feature_deviation": rng.normal(5.0, 0.5, 500)}
    stats["template_distance"][10] = 3.0  # far from the template only
    stats["feature_deviation"][20] = 15.0  # unusual features only
    cue = point_cue(stats)
    typical = np.median(cue)
    assert cue[10] > 5 * typical and cue[20] > 5 * typical
    assert (cue >= 0).all()
