"""The deterministic no-LLM policy: the baseline every LLM is compared with, and the loop's fallback.

It plays by the same rules as a model: it sees only the conversation (OpenAI messages) and the tool schemas,
calls tools
through tool calls, and reads their results back from the `role: tool` messages (JSON text). So a run with the
policy
exercises exactly the same loop, tools and transcript as a run with an LLM, and the comparison is fair.

Plan (each step is one `chat` call, decided from the messages alone, so the policy holds no hidden state):
1. `list_patches(sort_by="cue", top_k, descending=True)`: the patches ranked by the combined statistic.
2. in one turn of parallel calls: `neighbourhood(patch_id)` of the first `inspect_top` selected patches, so
selected
   patches that touch each other are reported as one region, and `patch_geometry(patch_id)` of the first
   `describe_top`,
   whose descriptors (z-scores) give the reasons. Tools that are absent are skipped.
3. `report_suspects`: the highest-cue patches whose cumulative `n_points` stays within `target_share` of the
scan's
   points (at least one patch), each region with a reason built from the patch's largest statistics
   ("recon_error z=3.1, curvature z=2.0") and a confidence from its cue relative to the other listed patches.

With guidance (`agent.guidance`), step 1 lists every patch the schema allows, and each row's cue is multiplied
by the guidance's weight for that patch (its z-scores read from the overview's table): patches in an ignored
region and patches unusual mostly in a named normal feature's statistics drop out, the rest weigh those
statistics less, and the named defect kind's cues count more. Steps 2 and 3 then run on the re-weighted rows.
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.backends.base import LLMReply, ToolCall, Usage, parse_json_object, tool_names
from agent.backends.overview import overview_text, parse_overview_table
from agent.guidance import (
    GuidanceIntents,
    guidance_in_messages,
    left_to_backend,
    read_guidance,
    reading_summary,
)

ID_KEYS = ("patch_id", "id")
TOTAL_KEYS = ("total_points",)
NEIGHBOUR_KEYS = ("neighbours",)
# Columns that describe a patch but are not evidence of a defect, so they never go into a reason.
NON_EVIDENCE = {
    "patch_id",
    "id",
    "n_points",
    "cue",
    "rank",
    "x",
    "y",
    "z",
    "cx",
    "cy",
    "cz",
    "center",
    "centre",
}


def _rows(data: dict) -> list[dict]:
    """The patch rows of a list_patches result."""
    value = data.get("patches")
    return value if isinstance(value, list) and all(isinstance(r, dict) for r in value) else []


def _patch_id(row: dict) -> int | None:
    for key in ID_KEYS:
        if isinstance(row.get(key), int):
            return row[key]
    return None


def _total_points(data: dict, rows: list[dict]) -> float | None:
    """Points in the whole scan, read from the result; else estimated as total_patches x mean n_points of the
    listed rows
    (the listed rows are the high-cue ones, so this is only an estimate; tools that report total_points are
    preferred)."""
    for key in TOTAL_KEYS:
        if isinstance(data.get(key), (int, float)) and data[key] > 0:
            return float(data[key])
    n_patches = data.get("total_patches")
    sizes = [r["n_points"] for r in rows if isinstance(r.get("n_points"), (int, float))]
    if isinstance(n_patches, int) and sizes:
        return n_patches * sum(sizes) / len(sizes)
    return None


def _reason(row: dict, max_terms: int = 2) -> str:
    """The patch's strongest statistics in words; z-scores (columns named z_<stat> or <stat>_z) are preferred
    because they compare."""
    numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric = {k: v for k, v in numeric.items() if k not in NON_EVIDENCE and math.isfinite(v)}
    z_scores = {k[len("z_") :]: v for k, v in numeric.items() if k.startswith("z_")}
    z_scores |= {k[: -len("_z")]: v for k, v in numeric.items() if k.endswith("_z")}
    chosen = z_scores or numeric
    strongest = sorted(chosen.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:max_terms]
    label = " z" if z_scores else ""
    parts = [f"{name}{label}={value:.1f}" for name, value in strongest]
    cue = row.get("cue")
    if not parts and isinstance(cue, (int, float)):
        parts = [f"cue={cue:.2f}"]
    return ", ".join(parts) or "highest combined cue"


def _within_limits(regions: list[dict], max_regions: int | None, max_ids: int | None) -> list[dict]:
    """Regions cut to the schema's limits: a region's surplus ids are dropped (its highest-cue patches come
    first), and
    regions past the last allowed one are merged into it, up to its id limit, as "further high-cue
    patches"."""
    if max_ids is not None:
        regions = [{**r, "patch_ids": r["patch_ids"][:max_ids]} for r in regions]
    if max_regions is None or len(regions) <= max_regions:
        return regions
    if max_regions < 1:
        return []
    kept, rest = regions[: max_regions - 1], regions[max_regions - 1 :]
    ids = [pid for r in rest for pid in r["patch_ids"]]
    merged = {
        "patch_ids": ids[:max_ids] if max_ids is not None else ids,
        "reason": f"further high-cue patches ({rest[0]['reason']}, ...)"[:300],
        "confidence": min(r["confidence"] for r in rest),
    }
    return [*kept, merged]


def report_limits(tools: list[dict]) -> tuple[int | None, int | None]:
    """(most regions, most patch ids per region) that report_suspects' JSON schema allows; None where it sets
    none.

    The policy must obey the same schema as a model: a report over the limit is rejected by the tool, and the
    policy
    is the fallback, so it has nothing to fall back on."""
    for tool in tools:
        function = tool.get("function", {})
        if function.get("name") != "report_suspects":
            continue
        params = function.get("parameters", {})
        regions = params.get("properties", {}).get("regions", {})
        items = regions.get("items", {})
        ids = items.get("properties", {}).get("patch_ids", {})
        return regions.get("maxItems"), ids.get("maxItems")
    return None, None


def _ints_under(value: Any, keys: tuple[str, ...]) -> list[int]:
    """Every int stored under one of `keys` anywhere in a JSON value (neighbour lists come in several
    shapes)."""
    found: list[int] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k in keys or k in ID_KEYS:
                if isinstance(v, int) and not isinstance(v, bool):
                    found.append(v)
                elif isinstance(v, list):
                    found.extend(x for x in v if isinstance(x, int) and not isinstance(x, bool))
            found.extend(_ints_under(v, keys))
    elif isinstance(value, list):
        for item in value:
            found.extend(_ints_under(item, keys))
    return found


def _intents(messages: list[dict]) -> GuidanceIntents | None:
    """The guidance's intents when it has any the policy can act on, else None (unguided behaviour)."""
    text = guidance_in_messages(messages)
    intents = left_to_backend(read_guidance(text)) if text else None
    return intents if intents is not None and intents.active else None


def _top_k_limit(tools: list[dict], default: int = 50) -> int:
    """The most rows list_patches' schema allows, so that guidance can re-rank every patch it can reach."""
    for tool in tools:
        function = tool.get("function", {})
        if function.get("name") == "list_patches":
            params = function.get("parameters", {})
            top_k = params.get("properties", {}).get("top_k", {})
            return int(top_k.get("maximum", default))
    return default


class PolicyBackend:
    name = "policy"
    tokenizes = False  # it reads tool results as JSON: no context window, no overview cut for one
    uses_guidance = True  # read into intents by agent.guidance; `guidance_reading` says how it was applied

    def __init__(
        self,
        target_share: float = 0.15,
        top_k: int = 16,
        inspect_top: int = 2,
        describe_top: int = 4,
        max_regions: int = 8,
        radius: float | None = None,
    ):
        if not 0.0 < target_share <= 1.0:
            raise ValueError(f"target_share must be in (0, 1], got {target_share}")
        if top_k < 1 or inspect_top < 0 or describe_top < 0 or max_regions < 1:
            raise ValueError("top_k and max_regions must be >= 1, inspect_top and describe_top >= 0")
        self.target_share = target_share
        self.top_k = top_k
        self.inspect_top = inspect_top
        self.describe_top = describe_top
        self.max_regions = max_regions
        self.radius = radius

    # -- reading the conversation
    # -------------------------------------------------------------------------------------
    @staticmethod
    def _results(messages: list[dict]) -> list[tuple[str, dict, dict | None]]:
        """(tool name, call arguments, parsed JSON result or None for an error/non-JSON result) per tool
        message."""
        calls: dict[str, tuple[str, dict]] = {}
        for m in messages:
            for c in m.get("tool_calls") or []:
                calls[c["id"]] = (c["function"]["name"], parse_json_object(c["function"]["arguments"]) or {})
        out = []
        for m in messages:
            if m.get("role") == "tool":
                name, args = calls.get(m.get("tool_call_id", ""), ("?", {}))
                out.append((name, args, parse_json_object(m.get("content") or "")))
        return out

    @staticmethod
    def _guided(rows: list[dict], messages: list[dict]) -> list[dict]:
        """The rows with their cue re-weighted by the guidance in the overview (dropped rows left out)."""
        intents = _intents(messages)
        if intents is None:
            return rows
        stats = {int(r["id"]): r for r in parse_overview_table(overview_text(messages))[0]}
        guided = []
        for row in rows:
            weight = intents.weight({**stats.get(_patch_id(row), {}), **row})
            if weight is not None:
                guided.append({**row, "cue": float(row.get("cue", 0.0) or 0.0) * weight})
        return guided

    def guidance_reading(self, messages: list[dict]) -> dict:
        """How the guidance in the conversation was read and applied (report.json's `guidance` entry)."""
        return reading_summary(messages, "policy")

    def _select(self, data: dict, messages: list[dict]) -> list[dict]:
        """The highest-cue rows (re-weighted by any guidance) whose cumulative n_points stays within the
        target share (always at least one, unless guidance dropped every listed patch)."""
        rows = self._guided([r for r in _rows(data) if _patch_id(r) is not None], messages)
        rows.sort(key=lambda r: (-float(r.get("cue", 0.0) or 0.0), _patch_id(r)))
        total = _total_points(data, rows)
        selected: list[dict] = []
        used = 0.0
        for row in rows:
            size = row.get("n_points")
            if total is not None and isinstance(size, (int, float)):
                if selected and used + size > self.target_share * total:
                    break
                used += size
            elif len(selected) >= 3:  # no size information: a small fixed number of patches
                break
            selected.append(row)
            if len(selected) >= self.max_regions:
                break
        return selected

    # -- the Backend interface
    # ----------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        available = set(tool_names(tools))
        if "report_suspects" not in available:
            raise ValueError("policy backend needs a report_suspects tool")
        results = self._results(messages)
        n_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        listings = [
            data for name, _, data in results if name == "list_patches" and data is not None and _rows(data)
        ]
        listed_already = any(name == "list_patches" for name, _, _ in results)

        if not listings and not listed_already and "list_patches" in available:
            top_k = self.top_k if _intents(messages) is None else max(self.top_k, _top_k_limit(tools))
            return self._calls(
                n_calls, [("list_patches", {"sort_by": "cue", "top_k": top_k, "descending": True})]
            )

        selected = self._select(listings[-1], messages) if listings else []
        asked = {(name, args.get("patch_id")) for name, args, _ in results}
        follow_ups: list[tuple[str, dict]] = []  # one turn of parallel look-ups, then the report
        if "neighbourhood" in available:
            for row in selected[: self.inspect_top]:
                if ("neighbourhood", _patch_id(row)) not in asked:
                    args: dict[str, Any] = {"patch_id": _patch_id(row)}
                    if self.radius is not None:
                        args["radius"] = self.radius
                    follow_ups.append(("neighbourhood", args))
        if "patch_geometry" in available:
            for row in selected[: self.describe_top]:
                if ("patch_geometry", _patch_id(row)) not in asked:
                    follow_ups.append(("patch_geometry", {"patch_id": _patch_id(row)}))
        if follow_ups:
            return self._calls(n_calls, follow_ups)
        regions = _within_limits(self._regions(selected, results), *report_limits(tools))
        return self._calls(n_calls, [("report_suspects", {"regions": regions})])

    def _regions(self, selected: list[dict], results: list[tuple[str, dict, dict | None]]) -> list[dict]:
        """Selected patches grouped by the neighbourhoods looked up, each group one region."""
        if not selected:
            return []
        neighbour_sets: dict[int, set[int]] = {}
        for name, args, data in results:
            if name == "neighbourhood" and data is not None and isinstance(args.get("patch_id"), int):
                pid = args["patch_id"]
                neighbour_sets[pid] = set(_ints_under(data, NEIGHBOUR_KEYS)) - {pid}
        descriptors = {
            args["patch_id"]: data.get("descriptors", data)
            for name, args, data in results
            if name == "patch_geometry" and data is not None and isinstance(args.get("patch_id"), int)
        }
        cues = [float(r.get("cue", 0.0) or 0.0) for r in selected]
        lo, hi = min(cues), max(cues)
        regions: list[dict] = []
        assigned: set[int] = set()
        for row in selected:
            pid = _patch_id(row)
            if pid in assigned:
                continue
            members = [pid] + [
                _patch_id(o)
                for o in selected
                if _patch_id(o) not in assigned
                and _patch_id(o) != pid
                and _patch_id(o) in neighbour_sets.get(pid, set())
            ]
            assigned.update(members)
            cue = float(row.get("cue", 0.0) or 0.0)
            evidence = {**row, **descriptors.get(pid, {})}
            relative = 1.0 if hi == lo else (cue - lo) / (hi - lo)
            regions.append(
                {
                    "patch_ids": members,
                    "reason": _reason(evidence),
                    "confidence": round(
                        0.5 + 0.4 * relative, 2
                    ),  # 0.5..0.9: a ranking, not a calibrated probability
                }
            )
        return regions

    @staticmethod
    def _calls(n_calls: int, calls: list[tuple[str, dict]]) -> LLMReply:
        return LLMReply(
            text=None,
            tool_calls=[
                ToolCall(id=f"policy_{n_calls + i}", name=name, arguments=json.dumps(args))
                for i, (name, args) in enumerate(calls)
            ],
            usage=Usage(),
        )
