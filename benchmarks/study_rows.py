"""How well does a reader order the shown patch rows? Row-level AUROC and average precision on episodes.

A rows adapter (`agent.tune train --target rows`) and the learned ranker both score every row of the compact
overview and report those over a threshold; their region recall on a benchmark depends on that order first.
This scores the rows of an `agent.tune episodes` folder's test episodes (parts and paraphrases no reader was
trained on) with each reader, exactly as its backend does (the ranker with its guidance weights, the adapter
from its prompt alone), and prints per reader and guidance kind: row AUROC and average precision against the
episode's target patches (after guidance), and the share of defect episodes whose top row is a target patch;
the overview's own order (its cue column) is the first row, the baseline every reader has to beat.
No detector runs, so a reader is compared in minutes instead of a benchmark run.

    python benchmarks/study_rows.py --episodes EPISODES --ranker RANKER.json --adapter DIR [--adapter DIR2]
        [--split test] [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from agent.backends.hf_rows import row_preamble, row_questions, row_scores
from agent.backends.overview import overview_text, parse_overview_table
from agent.tune.episodes import read_episodes


def cue_scorer(episode: dict) -> dict[int, float]:
    """The overview's own order (its cue column): what a reader has to beat."""
    return {int(r["id"]): r["cue"] for r in parse_overview_table(overview_text(episode["messages"]))[0]}


def ranker_scorer(path: str):
    from agent.backends.ranker import RankerBackend

    ranker = RankerBackend(model=path)

    def score(episode: dict) -> dict[int, float]:
        # a row the guidance drops (an ignored region) gets no score: it ranks below every scored row
        return {pid: p for pid, p, _ in ranker.ranked(episode["messages"])}

    return score


def adapter_scorer(folder: str, threads: int):
    from agent.backends.hf_backend import HFBackend

    backend = HFBackend(threads=threads, adapter=folder)
    if backend.row_threshold is None:
        raise SystemExit(f"{folder}: not a rows adapter (its recipe's target is not rows)")

    def score(episode: dict) -> dict[int, float]:
        backend._decoder.set_text(backend.prompt(episode["messages"], episode["tools"]))
        overview = overview_text(episode["messages"])
        ids, questions = row_questions(backend.row_question, overview)
        preamble = row_preamble(backend.row_question, overview)
        return dict(zip(ids, row_scores(backend._decoder, questions, preamble)))

    return score


def summarise(records: list[tuple[list[int], list[float], bool]]) -> dict:
    """Row AUROC / AP over all rows of the episodes, and the top-row hit rate over those with a target."""
    labels = [lab for ls, _, _ in records for lab in ls]
    scores = [s for _, ss, _ in records for s in ss]
    defect = [(ls, ss) for ls, ss, has in records if has]
    top_hits = [ls[int(np.argmax(ss))] for ls, ss in defect if ss]
    out = {"episodes": len(records), "rows": len(labels), "target_rows": int(sum(labels))}
    if 0 < sum(labels) < len(labels):
        out["row_auroc"] = round(float(roc_auc_score(labels, scores)), 4)
        out["row_ap"] = round(float(average_precision_score(labels, scores)), 4)
    out["top_row_hit"] = round(float(np.mean(top_hits)), 4) if top_hits else None
    return out


def study(episodes: list[dict], scorers: dict) -> dict:
    results = {}
    for name, score in scorers.items():
        started = time.perf_counter()
        groups: dict[str, list] = {}
        for episode in episodes:
            scored = score(episode)
            ids, _ = row_questions("id", overview_text(episode["messages"]))
            truth = set(episode["truth_patches"])
            floor = min(scored.values(), default=0.0) - 1.0
            labels = [int(pid in truth) for pid in ids]
            values = [scored.get(pid, floor) for pid in ids]
            kind = (episode.get("guidance") or {}).get("kind", "unguided")
            groups.setdefault(kind, []).append((labels, values, bool(truth)))
        results[name] = {kind: summarise(records) for kind, records in sorted(groups.items())}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", required=True, type=Path)
    p.add_argument("--ranker", action="append", default=[], help="a ranker.json (repeatable)")
    p.add_argument("--adapter", action="append", default=[], help="a rows adapter folder (repeatable)")
    p.add_argument("--split", default="test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    episodes = read_episodes(args.episodes, args.split)
    scorers = {"cue": cue_scorer}
    scorers.update({f"ranker:{r}": ranker_scorer(r) for r in args.ranker})
    scorers.update({f"hf:{a}": adapter_scorer(a, args.threads) for a in args.adapter})
    results = {"episodes": str(args.episodes), "split": args.split, "readers": study(episodes, scorers)}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
