"""Does guidance change what is found? Backends on the held-out test scans of `agent.tune`, each scan without
guidance and with every held-out (test) paraphrase of each guidance kind.

    python -m evals.guided --episodes EPISODES --backends policy,ranker=RANKER.json --out guided.json

Why: issue 13's bars for guidance are relative (false regions on a named normal feature fall by half, recall
on real defects holds, recall on a named defect kind rises), so each guided run is compared with the same
backend on the same scan without guidance. Only the paraphrases kept apart for testing are used
(`paraphrase_ids(kind, "test")`), so a reader tuned to the training sentences does not look better than it is.
Per backend and kind:
- normal_feature: false regions (no target patch) "on the feature" -- a reported patch whose statistics the
  feature raises stands out (z >= FEATURE_Z) -- guided vs unguided, and recall on the defective scans.
- only_kind, naming the scan's own defect kind: recall on those scans, guided vs unguided.
- ignore_region, a border 0.15 short of the defect's centre so that the defect lies in the ignored half:
  reported regions centred in the ignored half, guided vs unguided.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from agent.guidance import FEATURES, read_guidance
from agent.pipeline import InspectionConfig, inspect_scan
from agent.tune.guidance import PARAPHRASES, Guidance, make_guidance, paraphrase_ids
from evals.tuned import backend_from_spec, episode_parser, load_test_scans, run_episode_eval

FEATURE_Z = 2.0  # a patch "shows" a feature when one of the feature's z-scores reaches this
BORDER_OFFSET = 0.15  # the ignore_region border lies this far (normalised units) short of the defect's centre


def _regions(inspection) -> list[list[int]]:
    return [list(r.patch_ids) for r in inspection.verification.regions]


def _on_feature(table, patch_ids: list[int], feature: str) -> bool:
    named = FEATURES[feature].statistics
    columns = [c for c in table.columns if c.startswith("z_") and any(s in c for s in named)]
    return any(float(table.columns[c][p]) >= FEATURE_Z for c in columns for p in patch_ids)


def _ignored(table, patch_ids: list[int], guidance: Guidance) -> bool:
    """A region lies in the ignored half when its first (highest-ranked) patch is centred there."""
    return guidance.ignores({a: float(table.columns[a][patch_ids[0]]) for a in "xyz"})


def scan_variants(table, truth: list[int], defect: str | None, axis: str = "x") -> list[Guidance]:
    """The held-out guidance paraphrases one scan is run with (only_kind and ignore_region need a defect)."""
    variants = [make_guidance("normal_feature", p) for p in paraphrase_ids("normal_feature", "test")]
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


def _share(values: list[bool]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def evaluate(directory: Path, specs: list[str], limit: int | None = None, log=print) -> dict:
    """Per backend: the guided-vs-unguided comparisons of the module docstring, with their counts."""
    tests = load_test_scans(directory, limit)
    results: dict[str, dict] = {}
    for spec in specs:
        label, backend = backend_from_spec(spec)
        counts = {
            "normal_feature": {"runs": 0, "false_on_feature": [0, 0], "hits": [0, 0], "defect_runs": 0},
            "only_kind": {"runs": 0, "hits": [0, 0]},
            "ignore_region": {"runs": 0, "regions_in_ignored": [0, 0], "regions": [0, 0]},
        }
        reads: dict[str, list[bool]] = {kind: [] for kind in PARAPHRASES}
        for number, scan in enumerate(tests.scans):

            def run(guidance: Guidance | None, scan=scan):
                config = InspectionConfig(
                    token_budget=tests.budget, guidance=guidance.text if guidance else None, seed=tests.seed
                )
                return inspect_scan(scan.points, scan.fit, backend, config=config, analysis=scan.analysis)

            plain = run(None)
            table, truth = plain.table, set(scan.truth)
            plain_regions = _regions(plain)
            plain_hit = bool(truth & {p for r in plain_regions for p in r})
            for guidance in scan_variants(table, scan.truth, scan.defect, axis="xyz"[number % 3]):
                intents = read_guidance(guidance.text)
                reads[guidance.kind].append(intents.active)
                guided = run(guidance)
                regions = _regions(guided)
                hit = bool(truth & {p for r in regions for p in r})
                c = counts[guidance.kind]
                c["runs"] += 1
                if guidance.kind == "normal_feature":
                    for i, found in enumerate((plain_regions, regions)):
                        c["false_on_feature"][i] += sum(
                            1
                            for r in found
                            if not truth & set(r)
                            and any(_on_feature(table, r, f) for f in intents.normal_features)
                        )
                    if truth:
                        c["defect_runs"] += 1
                        c["hits"][0] += plain_hit
                        c["hits"][1] += hit
                elif guidance.kind == "only_kind":
                    c["hits"][0] += plain_hit
                    c["hits"][1] += hit
                else:
                    for i, found in enumerate((plain_regions, regions)):
                        c["regions"][i] += len(found)
                        c["regions_in_ignored"][i] += sum(
                            1 for r in found if r and _ignored(table, r, guidance)
                        )
        results[label] = summarise(counts, reads)
        log(f"{label}: {json.dumps(results[label])}")
    return {"scans": len(tests.scans), "feature_z": FEATURE_Z, "backends": results}


def summarise(counts: dict, reads: dict[str, list[bool]]) -> dict:
    """Unguided -> guided figures per guidance kind, and the share of paraphrases read into an intent."""
    nf, ok, ir = counts["normal_feature"], counts["only_kind"], counts["ignore_region"]

    def fall(before: int, after: int) -> float | None:
        return round(1 - after / before, 3) if before else None

    return {
        "paraphrases_read": {kind: _share(values) for kind, values in reads.items()},
        "normal_feature": {
            "runs": nf["runs"],
            "false_regions_on_feature": {
                "unguided": nf["false_on_feature"][0],
                "guided": nf["false_on_feature"][1],
            },
            "fall": fall(*nf["false_on_feature"]),
            "recall_on_defects": {
                "unguided": round(nf["hits"][0] / nf["defect_runs"], 3) if nf["defect_runs"] else None,
                "guided": round(nf["hits"][1] / nf["defect_runs"], 3) if nf["defect_runs"] else None,
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
    """Unguided vs guided bars per backend: false regions on the named feature, recall on defects, recall on
    the named kind, regions in the ignored half."""
    from evals.report import _figure

    panels = (
        ("normal feature: false regions on it", lambda b: b["normal_feature"]["false_regions_on_feature"]),
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
        axes.set_xticks(range(len(names)), names)
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
