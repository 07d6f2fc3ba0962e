"""Verdict rules replayed on one `evals.run` output: false alarms and detections per class, per rule.

Why: the object threshold is fixed at fit time, so comparing rules by rerunning means refitting every class.
Every rule here is a function of what the fit saved (`fitted.json` thresholds: the leave-one-out max, the
threshold, the measured leave-two-out lean) and of the object scores the run stored (`results.jsonl`), so one
run answers for all of them:

* `saved`: the threshold the fit saved (what the run's `false alarms` / `detected` columns used);
* `max+std`: leave-one-out max + std (the current rule);
* `lean-corrected`: the same scores divided by the measured lean first (the rule before this change).

    python benchmarks/study_verdicts.py RUN_DIR [--methods pointmae-bank,btf]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FEATURE_OF = {"pointmae-bank": "pointmae", "btf": "fpfh"}


def thresholds(run: Path, cls: str, feature: str) -> dict[str, float]:
    fits = sorted((run / "fits" / cls).glob(f"{feature}-*/fitted.json"))
    if len(fits) != 1:
        raise SystemExit(f"{run}: expected one {feature} fit of {cls!r}, found {len(fits)}")
    saved = json.loads(fits[0].read_text(encoding="utf-8"))["thresholds"]
    lean, top, threshold = saved["object_loo_lean"], saved["object_normal_max"], saved["object_threshold"]
    if "object_threshold_lean_corrected" in saved:  # a fit with the current rule saved both
        corrected = saved["object_threshold_lean_corrected"]
        spread = threshold - top
    else:  # an older fit saved the corrected one: max / lean + std / lean
        corrected = threshold
        spread = (threshold - top / lean) * lean
    return {"saved": threshold, "max+std": top + spread, "lean-corrected": corrected}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an evals.run --out folder")
    parser.add_argument("--methods", default="pointmae-bank,btf")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (args.run / "results.jsonl").read_text().splitlines() if line]
    out: dict = {}
    for method in args.methods.split(","):
        per_class: dict = {}
        for cls in sorted({r["class"] for r in rows if r["name"] == method}):
            rules = thresholds(args.run, cls, FEATURE_OF[method])
            scans = [r for r in rows if r["class"] == cls and r["name"] == method and r["status"] == "ok"]
            per_class[cls] = {
                rule: {
                    "threshold": t,
                    "false_alarms": sum(r["label"] == 0 and r["object_score"] > t for r in scans),
                    "normal": sum(r["label"] == 0 for r in scans),
                    "detected": sum(r["label"] == 1 and r["object_score"] > t for r in scans),
                    "defective": sum(r["label"] == 1 for r in scans),
                    "missed": sorted(r["scan"] for r in scans if r["label"] == 1 and r["object_score"] <= t),
                    "false_alarm_scans": sorted(
                        r["scan"] for r in scans if r["label"] == 0 and r["object_score"] > t
                    ),
                }
                for rule, t in rules.items()
            }
        out[method] = per_class
        for rule in ("saved", "max+std", "lean-corrected"):
            got = [per_class[c][rule] for c in per_class]
            fa, n = sum(g["false_alarms"] for g in got), sum(g["normal"] for g in got)
            det, d = sum(g["detected"] for g in got), sum(g["defective"] for g in got)
            worst = [
                f"{c} {per_class[c][rule]['false_alarms']}"
                for c in per_class
                if per_class[c][rule]["false_alarms"]
            ]
            missed = [m for c in per_class for m in per_class[c][rule]["missed"]]
            print(
                f"{method:14s} {rule:15s} false alarms {fa}/{n}  detected {det}/{d}  "
                f"false alarms in: {', '.join(worst) or '-'}  missed: {', '.join(missed) or '-'}"
            )
    print(json.dumps(out, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
