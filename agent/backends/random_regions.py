"""The "random regions at the same budget" baseline: what the verifier achieves when the regions are picked blindly.

Why it exists: the policy and every LLM spend the same verification budget (a share of the scan's points); the only
thing they add is *where* that budget goes. This backend spends it at random, so the gap between it and an agent is
what the agent's choice of regions is worth (and a backend that does no better than this one has learned nothing).

It plays by the same rules as the policy: it sees only the conversation and the tool schemas, calls `list_patches`
once to learn how many patches the scan has and how large they are, then `report_suspects` with random patches whose
estimated point count stays within the policy's target share. The random generator is seeded from `seed` and the
patch ids and sizes of the listing it received, so the same scan with the same seed always gets the same regions, while different scans (whose
listings differ) get different ones; it holds no state between calls.
"""

from __future__ import annotations

import json
import random
import zlib

from agent.backends.base import LLMReply, ToolCall, Usage, parse_json_object, tool_names
from agent.backends.policy import PolicyBackend

LISTING_ROWS = 50  # the most list_patches returns: the more rows, the better the patch-size estimate


class RandomRegionsBackend:
    name = "random-regions"
    tokenizes = False  # reads the conversation as data: no context window applies
    uses_guidance = False  # it picks patches at random

    def __init__(self, seed: int = 0, target_share: float | None = None, max_regions: int | None = None):
        policy = PolicyBackend()  # same budget as the policy unless told otherwise
        self.seed = int(seed)
        self.target_share = policy.target_share if target_share is None else float(target_share)
        self.max_regions = policy.max_regions if max_regions is None else int(max_regions)
        if not 0.0 < self.target_share <= 1.0:
            raise ValueError(f"target_share must be in (0, 1], got {self.target_share}")
        if self.max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {self.max_regions}")

    def _listing(self, messages: list[dict]) -> tuple[dict | None, str]:
        """The parsed list_patches result (or None) and its raw text (empty until list_patches was answered)."""
        list_ids = {c["id"] for m in messages for c in (m.get("tool_calls") or [])
                    if c["function"]["name"] == "list_patches"}
        for m in messages:
            if m.get("role") == "tool" and m.get("tool_call_id") in list_ids:
                text = m.get("content") or ""
                return parse_json_object(text), text
        return None, ""

    def _choose(self, data: dict | None) -> list[int]:
        """Random patch ids whose estimated points stay within the target share (at least one patch)."""
        if data is None:
            return []
        total_patches = data.get("total_patches")
        rows = [r for r in data.get("patches", []) if isinstance(r, dict)]
        if not isinstance(total_patches, int) or total_patches < 1:
            total_patches = len(rows)
        if total_patches < 1:
            return []
        # Patches are a Voronoi partition with roughly equal sizes, so the share of patches estimates the share of points.
        count = max(1, min(int(self.target_share * total_patches), self.max_regions, total_patches))
        # Seeded from the listing's integers only (ids, sizes): they come from the geometry alone, while the learned
        # statistics in the same rows may differ in the last digit between machines or thread counts.
        structure = [total_patches] + [[r.get("id"), r.get("n_points")] for r in rows]
        rng = random.Random(zlib.crc32(f"{self.seed}:{json.dumps(structure)}".encode()))
        return sorted(rng.sample(range(total_patches), count))

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        available = set(tool_names(tools))
        if "report_suspects" not in available:
            raise ValueError("random-regions backend needs a report_suspects tool")
        n_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        data, text = self._listing(messages)
        if not text and "list_patches" in available:
            call = ToolCall(id=f"random_{n_calls}", name="list_patches",
                            arguments=json.dumps({"sort_by": "x", "top_k": LISTING_ROWS, "descending": False}))
            return LLMReply(text=None, tool_calls=[call], usage=Usage())
        regions = [{"patch_ids": [pid], "reason": "random patch (baseline)", "confidence": 0.5}
                   for pid in self._choose(data)]
        call = ToolCall(id=f"random_{n_calls}", name="report_suspects", arguments=json.dumps({"regions": regions}))
        return LLMReply(text=None, tool_calls=[call], usage=Usage())
