"""Does guidance change what is found? Backends on the held-out test scans of `agent.tune`, each scan without
guidance and with every held-out (test) paraphrase of each guidance kind.

    python -m evals.guided --episodes EPISODES --backends policy,ranker=RANKER.json --out guided.json

Why: issue 13's bars for guidance are relative (false regions on a named normal feature fall by half, recall
on real defects holds, recall on a named defect kind rises), so each guided run is compared with the same
backend on the same scan without guidance. Only the paraphrases kept apart for testing are used
(`paraphrase_ids(kind, "test")`), so a reader tuned to the training sentences does not look better than it is.
Per backend and kind:
- normal_feature: each test scan gets a by-design feature its part's fit has never seen (`scans.features`:
  a sharp rib or a row of bolt holes, seeded by the scan's name, away from the defect, its sizes varied by
  FEATURE_VARY from the training episodes' and 2-4 holes instead of 3), which the detector flags; the
  guidance calls that feature normal (a held-out paraphrase that names it). False regions on the
  feature (a region with a feature patch and no defect patch), guided vs unguided, and recall on the
  defective scans' defects. Also the feature's patches named (in any region), guided vs unguided: a backend
  that reports its rows as one region (the rows adapter, the ranker) has a false region there only when it
  also misses the defect.
- only_kind, naming the scan's own defect kind: recall on those scans, guided vs unguided.
- ignore_region, a border 0.15 short of the defect's centre so that the defect lies in the ignored half:
  reported regions centred in the ignored half, guided vs unguided.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.guidance import read_guidance
from agent.pipeline import InspectionConfig, inspect_scan
from agent.tune.episodes import feature_paraphrases, feature_patch_truth, patch_truth
from agent.tune.guidance import PARAPHRASES, Guidance, make_guidance, paraphrase_ids
from evals.tuned import TestScan, backend_from_spec, episode_parser, load_test_scans, run_episode_eval
from scans.bench import sample_seed
from scans.defects import estimate_normals
from scans.features import FEATURE_KINDS, add_feature

# the test scans' features vary their sizes by this share and have 2-4 holes (add_feature's vary), while the
# training episodes' features have the defaults: the shapes measured here are not the shapes trained on
FEATURE_VARY = 0.3
PATCH_LABEL_SHARE = 0.2  # a patch carries the defect or the feature when this share of its points does
BORDER_OFFSET = 0.15  # the ignore_region border lies this far (normalised units) short of the defect's centre


def _regions(inspection) -> list[list[int]]:
    return [list(r.patch_ids) for r in inspection.verification.regions]


@dataclass
class FeaturedScan:
    """A test scan with a by-design feature added: its points, analysis, defect labels and feature mask."""

    kind: str
    points: np.ndarray
    analysis: object
    labels: np.ndarray
    feature_mask: np.ndarray


def featured(scan: TestScan, number: int, seed: int) -> FeaturedScan:
    """`scan` with a by-design feature (kinds alternate over the scans), seeded by the scan's name."""
    kind = FEATURE_KINDS[number % len(FEATURE_KINDS)]
    points = np.asarray(scan.points, dtype=np.float64)
    moved, mask, labels, _ = add_feature(
        points,
        estimate_normals(points),
        kind,
        sample_seed(seed, scan.name, "feature"),
        labels=scan.labels,
        vary=FEATURE_VARY,
    )
    moved = moved.astype(np.float32)
    return FeaturedScan(kind, moved, scan.fit.analyse(moved), labels, mask)


def _ignored(table, patch_ids: list[int], guidance: Guidance) -> bool:
    """A region lies in the ignored half when its first (highest-ranked) patch is centred there."""
    return guidance.ignores({a: float(table.columns[a][patch_ids[0]]) for a in "xyz"})


def scan_variants(table, truth: list[int], defect: str | None, axis: str = "x") -> list[Guidance]:
    """The held-out guidance paraphrases one scan is run with, but for normal_feature (`feature_variants`):
    only_kind and ignore_region, which need a defect."""
    variants: list[Guidance] = []
    if defect is not None and truth:
        variants += [
            make_guidance("only_kind", p, defect_kind=defect) for p in paraphrase_ids("only_kind", "test")
        ]
        centre = float(np.mean(table.columns[axis][truth]))
        value = float(np.clip(centre - BORDER_OFFSET, -0.9, 0.9))
        variants += [
            make_guidance("ignore_region", p, axis=axis, above=True, value=value)
            for p in paraphrase_ids("ignore_region", "test")
        ]
    return variants


def feature_variants(kind: str) -> list[Guidance]:
    """The held-out normal_feature paraphrases that name the feature `kind`."""
    return [make_guidance("normal_feature", p) for p in feature_paraphrases(kind, "test")]


def _share(values: list[bool]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def evaluate(directory: Path, specs: list, limit: int | None = None, log=print) -> dict:
    """Per backend (a spec of `backend_from_spec`, or a (label, backend) pair): the guided-vs-unguided
    comparisons of the module docstring, with their counts."""
    tests = load_test_scans(directory, limit)
    results: dict[str, dict] = {}
    featured_scans: dict[int, FeaturedScan] = {}  # made once, shared by the backends
    for spec in specs:
        label, backend = spec if isinstance(spec, tuple) else backend_from_spec(spec)
        counts = {
            "normal_feature": {
                **_feature_tally(),
                "by_feature": {},  # per feature kind: the same counts
                "by_defect": {},  # per defect kind of the scan: [defect runs, hits unguided, hits guided]
            },
            "only_kind": {"runs": 0, "hits": [0, 0]},
            "ignore_region": {"runs": 0, "regions_in_ignored": [0, 0], "regions": [0, 0]},
        }
        reads: dict[str, list[bool]] = {kind: [] for kind in PARAPHRASES}
        for number, scan in enumerate(tests.scans):

            def run(guidance: Guidance | None, points=scan.points, analysis=scan.analysis, scan=scan):
                config = InspectionConfig(
                    token_budget=tests.budget, guidance=guidance.text if guidance else None, seed=tests.seed
                )
                return inspect_scan(points, scan.fit, backend, config=config, analysis=analysis)

            plain = run(None)
            table, truth = plain.table, set(scan.truth)
            plain_regions = _regions(plain)
            plain_hit = bool(truth & {p for r in plain_regions for p in r})
            for guidance in scan_variants(table, scan.truth, scan.defect, axis="xyz"[number % 3]):
                reads[guidance.kind].append(read_guidance(guidance.text).active)
                regions = _regions(run(guidance))
                hit = bool(truth & {p for r in regions for p in r})
                c = counts[guidance.kind]
                c["runs"] += 1
                if guidance.kind == "only_kind":
                    c["hits"][0] += plain_hit
                    c["hits"][1] += hit
                else:
                    for i, found in enumerate((plain_regions, regions)):
                        c["regions"][i] += len(found)
                        c["regions_in_ignored"][i] += sum(
                            1 for r in found if r and _ignored(table, r, guidance)
                        )
            if number not in featured_scans:
                featured_scans[number] = featured(scan, number, tests.seed)
            with_feature = featured_scans[number]
            feature_plain = run(None, with_feature.points, with_feature.analysis)
            plain_found = _regions(feature_plain)
            patches = feature_plain.patches
            defect_patches = patch_truth(patches, with_feature.labels, PATCH_LABEL_SHARE)
            feature_truth = set(defect_patches)
            on_feature = set(
                feature_patch_truth(patches, with_feature.feature_mask, defect_patches, PATCH_LABEL_SHARE)
            )
            for guidance in feature_variants(with_feature.kind):
                reads[guidance.kind].append(with_feature.kind in read_guidance(guidance.text).normal_features)
                guided = run(guidance, with_feature.points, with_feature.analysis)
                c = counts["normal_feature"]
                kind_counts = c["by_feature"].setdefault(with_feature.kind, _feature_tally())
                found_both = (plain_found, _regions(guided))
                for tally in (c, kind_counts):
                    _count_feature_run(tally, found_both, on_feature, feature_truth)
                if feature_truth:
                    per_defect = c["by_defect"].setdefault(scan.defect or "none", [0, 0, 0])
                    per_defect[0] += 1
                    for i, found in enumerate(found_both):
                        per_defect[1 + i] += bool(feature_truth & {p for r in found for p in r})
        results[label] = summarise(counts, reads)
        log(f"{label}: {json.dumps(results[label])}")
    return {
        "scans": len(tests.scans),
        "features": {k: sum(1 for f in featured_scans.values() if f.kind == k) for k in FEATURE_KINDS},
        "backends": results,
    }


def _feature_tally() -> dict:
    """Empty counts of normal-feature runs: [unguided, guided] pairs, runs and runs with a defect."""
    return {
        "runs": 0,
        "false_on_feature": [0, 0],
        "feature_patches": [0, 0],
        "hits": [0, 0],
        "defect_runs": 0,
    }


def _count_feature_run(
    tally: dict, runs: tuple[list[list[int]], list[list[int]]], on_feature: set[int], defect: set[int]
) -> None:
    """Add one normal-feature run (unguided regions, guided regions) to `tally`."""
    tally["runs"] += 1
    for i, found in enumerate(runs):
        tally["false_on_feature"][i] += sum(1 for r in found if on_feature & set(r) and not defect & set(r))
        tally["feature_patches"][i] += len(on_feature & {p for r in found for p in r})
        if defect:
            tally["hits"][i] += bool(defect & {p for r in found for p in r})
    tally["defect_runs"] += bool(defect)


def _feature_figures(nf: dict) -> dict:
    """Unguided -> guided figures of normal-feature runs (all of them, or one feature kind's)."""

    def fall(before: int, after: int) -> float | None:
        return round(1 - after / before, 3) if before else None

    def recall(i: int) -> float | None:
        return round(nf["hits"][i] / nf["defect_runs"], 3) if nf["defect_runs"] else None

    return {
        "runs": nf["runs"],
        "false_regions_on_feature": {
            "unguided": nf["false_on_feature"][0],
            "guided": nf["false_on_feature"][1],
        },
        "fall": fall(*nf["false_on_feature"]),
        # a backend that names its rows as one region has a false region only when the defect is missed
        "feature_patches_named": {"unguided": nf["feature_patches"][0], "guided": nf["feature_patches"][1]},
        "feature_patches_fall": fall(*nf["feature_patches"]),
        "recall_on_defects": {"unguided": recall(0), "guided": recall(1)},
    }


def summarise(counts: dict, reads: dict[str, list[bool]]) -> dict:
    """Unguided -> guided figures per guidance kind, and the share of paraphrases read into an intent."""
    nf, ok, ir = counts["normal_feature"], counts["only_kind"], counts["ignore_region"]
    return {
        "paraphrases_read": {kind: _share(values) for kind, values in reads.items()},
        "normal_feature": {
            **_feature_figures(nf),
            "by_feature": {kind: _feature_figures(c) for kind, c in sorted(nf["by_feature"].items())},
            "recall_on_defects_by_defect": {
                defect: {"runs": n, "unguided": round(u / n, 3), "guided": round(g / n, 3)}
                for defect, (n, u, g) in sorted(nf["by_defect"].items())
            },
        },
        "only_kind": {
            "runs": ok["runs"],
            "recall_on_named_kind": {
                "unguided": round(ok["hits"][0] / ok["runs"], 3) if ok["runs"] else None,
                "guided": round(ok["hits"][1] / ok["runs"], 3) if ok["runs"] else None,
            },
        },
        "ignore_region": {
            "runs": ir["runs"],
            "regions_in_ignored_half": {
                "unguided": ir["regions_in_ignored"][0],
                "guided": ir["regions_in_ignored"][1],
            },
            "regions": {"unguided": ir["regions"][0], "guided": ir["regions"][1]},
        },
    }


def plot_guided(result: dict, path: Path) -> Path:
    """Unguided vs guided bars per backend: the named feature's patches reported, recall on defects, recall on
    the named kind, regions in the ignored half."""
    from evals.report import _figure

    panels = (
        ("normal feature: its patches named", lambda b: b["normal_feature"]["feature_patches_named"]),
        ("normal feature: recall on defects", lambda b: b["normal_feature"]["recall_on_defects"]),
        ("named kind: recall on it", lambda b: b["only_kind"]["recall_on_named_kind"]),
        ("ignored half: regions in it", lambda b: b["ignore_region"]["regions_in_ignored_half"]),
    )
    names = list(result["backends"])
    figure = _figure(12, 3.2)
    for position, (title, pick) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        for offset, key, colour in ((-0.2, "unguided", "0.6"), (0.2, "guided", "tab:blue")):
            values = [pick(result["backends"][n])[key] or 0 for n in names]
            axes.bar([i + offset for i in range(len(names))], values, width=0.4, color=colour, label=key)
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axes.set_title(title, fontsize=9)
        axes.grid(axis="y", alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    p = episode_parser("python -m evals.guided", description, "policy, ranker=FILE, hf, hf=ADAPTER")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of unguided vs guided here")
    args = p.parse_args(argv)
    code, result = run_episode_eval(args, evaluate)
    if result is not None and args.plot is not None:
        plot_guided(result, args.plot)
    return code


if __name__ == "__main__":
    sys.exit(main())
