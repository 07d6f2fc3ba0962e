"""Does a tuned hf adapter decide *whether* to report? Its first decision, replayed on episodes and real runs.

The constrained decoder's first choice in a report is `]` (an empty report) against `{` (a region), by their
log-likelihoods after `"regions": [`. This prints that margin, log p(`]`) - log p(`{`), for the unguided
episodes of an `agent.tune episodes` folder (train and test split) and for the first request of every
transcript of an `evals.run` hf row (the same prompt the model answered), normal and defective scans apart (a
transcript's scan is normal when its name says "positive", as Anomaly-ShapeNet's do). A
decision that carries information gives normal scans the higher margin.

    python benchmarks/study_report_decision.py --episodes EPISODES [--transcripts RUN/transcripts/LABEL]
        [--adapter DIR] [--out margins.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from agent.backends import get_backend
from agent.backends.hf_prompt import CALL_OPEN
from agent.tune.episodes import read_episodes

HEAD = CALL_OPEN + '{"name": "report_suspects", "arguments": {"regions": ['


def margin(backend, messages: list[dict], tools: list[dict]) -> float:
    decoder = backend._decoder
    decoder.set_text(backend.prompt(messages, tools) + HEAD)
    empty, region = decoder.loglikelihoods(["]", "{"])
    return float(empty - region)


def first_request(transcript: Path) -> list[dict]:
    for line in transcript.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "request":
            return event["messages"]
    raise SystemExit(f"{transcript}: no request event")


def summary(rows: list[dict]) -> str:
    parts = []
    for normal in (True, False):
        margins = [r["margin"] for r in rows if r["normal"] == normal]
        if margins:
            parts.append(
                f"{'normal' if normal else 'defective'}: mean {np.mean(margins):+.2f}, "
                f"empty on {sum(m > 0 for m in margins)}/{len(margins)}"
            )
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=Path, required=True)
    p.add_argument("--transcripts", type=Path, default=None, help="an hf row's transcripts folder")
    p.add_argument("--adapter", default=None, help="default: the packaged adapter")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backend = get_backend("hf", adapter=args.adapter, threads=1)
    episodes = [e for e in read_episodes(args.episodes) if e["guidance"] is None]
    rows = [
        {"split": e["split"], "scan": e["scan"], "normal": e["defect"] is None,
         "margin": margin(backend, e["messages"], e["tools"])}
        for e in episodes
    ]
    tools = episodes[0]["tools"]  # transcripts do not keep the tool schemas; a run offers the same tools
    for transcript in sorted(args.transcripts.glob("*/*.jsonl")) if args.transcripts else []:
        rows.append({"split": "run", "scan": transcript.stem, "normal": "positive" in transcript.stem,
                     "margin": margin(backend, first_request(transcript), tools)})
    for split in ("train", "test", "run"):
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            print(f"{split} ({len(chosen)}): {summary(chosen)}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
