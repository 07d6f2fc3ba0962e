"""Tools an agent calls while reading a scan: plain typed functions behind pydantic argument models.

Every backend (OpenAI, LangChain, a local model, the no-LLM policy) calls them the same way:
`ToolBox.call(name,
arguments)` with the arguments as the model produced them (a JSON string or a dict). Nothing here raises on
bad model
output: invalid JSON, unknown tools, wrong types, out-of-range patch ids all come back as
`ToolResult(ok=False,
error=...)` with a message that names the valid range, so the model can correct itself on the next turn.

The argument models are built per scan (patch ids 0..P-1, the table's column names) so the JSON schema itself
tells the
model the valid ranges. Schemas are inlined (no $defs) and closed (additionalProperties false) so that
OpenAI's strict
mode accepts them.

The memory bank is reached only through `ScanContext.bank_lookup`, supplied by the verifier layer; every patch
it is
asked about costs that patch's point count from the verification budget (a repeated look-up is served from
cache).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from scans import strict_json
from scans.geometry import fps
from scans.patches import Patches, PatchTable
from scans.stats import robust_spread

BankLookup = Callable[[list[int]], dict[int, dict]]
MAX_REGIONS = 10
MAX_IDS_PER_REGION = 20
MAX_TOP_K = 50
MAX_SAMPLE_POINTS = 64
MAX_NEIGHBOURS = 12
_SIGNIFICANT = 3               # numbers in tool results carry 3 significant digits


@dataclass
class ScanContext:
    """Everything the tools may read about one scan (arrays only; never file text)."""

    points: np.ndarray                          # (N, 3) scan coordinates
    patches: Patches
    table: PatchTable
    # patch ids -> {id: bank similarity info}; from the verifier layer
    bank_lookup: BankLookup | None = None
    verify_budget_points: int = 0               # points that bank look-ups may consume in total

    def __post_init__(self) -> None:
        if self.table.n_patches != self.patches.n_patches:
            raise ValueError(f"table has {self.table.n_patches} rows but there are {self.patches.n_patches} "
                             "patches")
        if len(self.points) != self.patches.n_points:
            raise ValueError(f"{len(self.points)} points but the patches cover {self.patches.n_points}")
        if self.verify_budget_points < 0:
            raise ValueError(f"verify_budget_points must be >= 0, got {self.verify_budget_points}")


@dataclass
class ToolResult:
    ok: bool
    data: dict
    error: str | None = None
    content: str = ""                           # the text the model sees (rendered data, or "error: ...")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    args_model: type[BaseModel]
    fn: Callable[[Any], dict]

    def parameters_schema(self) -> dict:
        return closed_inline_schema(self.args_model.model_json_schema())


@dataclass(frozen=True)
class CallRecord:
    name: str
    arguments: Any                              # as received (dict or raw string)
    ok: bool
    error: str | None = None


class ToolError(Exception):
    """Raised inside a tool function for a problem the model can fix; turned into ToolResult(ok=False)."""


def closed_inline_schema(schema: dict) -> dict:
    """Inline every `$ref` to `$defs`, drop titles, and close every object (additionalProperties false)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = defs[node["$ref"].split("/")[-1]]
                merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
                return walk(merged)
            out = {k: walk(v) for k, v in node.items() if k not in ("$defs", "title")}
            if out.get("type") == "object":
                out["additionalProperties"] = False
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _strict(schema: dict) -> dict:
    """OpenAI strict mode: every property required, no defaults."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items() if k != "default"}
            if out.get("type") == "object" and "properties" in out:
                out["required"] = list(out["properties"])
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _sig(value: float) -> float | None:
    value = float(value)
    if not math.isfinite(value):
        return None
    rounded = float(f"{value:.{_SIGNIFICANT}g}")
    return 0.0 if rounded == 0 else rounded


class ToolBox:
    """The tools for one scan, their schemas, dispatch, the verification budget and a call log."""

    def __init__(self, context: ScanContext, *, render: Callable[[str, dict], str] | None = None,
                 max_regions: int = MAX_REGIONS, max_ids_per_region: int = MAX_IDS_PER_REGION) -> None:
        self.context = context
        self.render = render or _compact_json
        self.max_regions = max_regions
        self.max_ids_per_region = max_ids_per_region
        self.budget_left = int(context.verify_budget_points)
        # patch id -> what bank_lookup returned (the verifier reads this)
        self.bank_results: dict[int, dict] = {}
        self.report: list[dict] | None = None      # set by report_suspects
        self.log: list[CallRecord] = []
        self._n = context.table.n_patches
        self._norm_centres = np.stack([context.table.columns[a] for a in "xyz"], axis=1)
        self._specs = self._build_specs()

    # ---- public interface
    # ----------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.report is not None

    def specs(self) -> list[ToolSpec]:
        return list(self._specs.values())

    def openai_schemas(self, strict: bool = False) -> list[dict]:
        """Tool definitions in OpenAI's chat-completions format (`tools=`)."""
        out = []
        for spec in self._specs.values():
            params = spec.parameters_schema()
            function: dict[str, Any] = {"name": spec.name, "description": spec.description,
                                        "parameters": _strict(params) if strict else params}
            if strict:
                function["strict"] = True
            out.append({"type": "function", "function": function})
        return out

    def tools_summary(self) -> str:
        """One line per tool with its arguments and ranges, for the system prompt."""
        lines = []
        for spec in self._specs.values():
            schema = spec.parameters_schema()
            args = ", ".join(f"{name}: {_describe_arg(prop)}"
                             for name, prop in schema.get("properties", {}).items())
            lines.append(f"- {spec.name}({args}): {spec.description}")
        return "\n".join(lines)

    def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Run tool `name`; never raises for anything a model could send."""
        result = self._dispatch(name, arguments)
        self.log.append(CallRecord(name=str(name), arguments=arguments, ok=result.ok, error=result.error))
        return result

    # ---- dispatch
    # ------------------------------------------------------------------------------------------------
    def _fail(self, message: str) -> ToolResult:
        return ToolResult(ok=False, data={}, error=message, content=f"error: {message}")

    def _dispatch(self, name: str, arguments: str | dict | None) -> ToolResult:
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            return self._fail(f"unknown tool {name!r}; available tools: {', '.join(self._specs)}")
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                return self._fail(f"arguments for {name} are not valid JSON ({exc.msg} at position "
                                  f"{exc.pos}); "
                                  "send one JSON object")
        if not isinstance(arguments, dict):
            return self._fail(f"arguments for {name} must be a JSON object, got {type(arguments).__name__}")
        try:
            args = spec.args_model.model_validate(arguments)
        except ValidationError as exc:
            return self._fail(self._explain(name, exc))
        try:
            data = spec.fn(args)
        except ToolError as exc:
            return self._fail(str(exc))
        return ToolResult(ok=True, data=data, error=None, content=self.render(name, data))

    def _explain(self, name: str, exc: ValidationError) -> str:
        parts = []
        mentions_ids = False
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "arguments"
            mentions_ids |= any(str(p) in ("patch_id", "patch_ids") for p in err["loc"])
            got = err.get("input")
            shown = json.dumps(got)[:60] if err["type"] != "missing" else None
            parts.append(f"{loc}: {err['msg']}" + (f" (got {shown})" if shown is not None else ""))
        hint = f" Valid patch ids are 0..{self._n - 1}." if mentions_ids else ""
        return f"invalid arguments for {name}: " + "; ".join(parts) + "." + hint

    # ---- tools
    # ---------------------------------------------------------------------------------------------------
    def _build_specs(self) -> dict[str, ToolSpec]:
        table = self.context.table
        last = self._n - 1
        closed = ConfigDict(extra="forbid")
        PatchId = Annotated[int, Field(ge=0, le=last, description=f"patch id, 0..{last}")]
        columns = tuple(table.columns)

        ListArgs = create_model(
            "ListPatchesArgs", __config__=closed,
            sort_by=(Literal[columns], Field("cue", description="column to sort by")),  # type: ignore[valid-type]
            top_k=(int, Field(10, ge=1, le=MAX_TOP_K, description=f"how many patches, 1..{MAX_TOP_K}")),
            descending=(bool, Field(True, description="largest first")),
        )
        GeometryArgs = create_model(
            "PatchGeometryArgs", __config__=closed, patch_id=(PatchId, ...),
            n_samples=(int, Field(16, ge=4, le=MAX_SAMPLE_POINTS, description="sample size, "
                                                                              f"4..{MAX_SAMPLE_POINTS}")),
        )
        NeighbourArgs = create_model(
            "NeighbourhoodArgs", __config__=closed, patch_id=(PatchId, ...),
            radius=(float, Field(0.3, gt=0.0, le=2.0, description="search radius in normalised units, (0, "
                                                                  "2]")),
        )
        LookupArgs = create_model("FeatureLookupArgs", __config__=closed, patch_id=(PatchId, ...))
        Region = create_model(
            "SuspectRegion", __config__=closed,
            patch_ids=(list[PatchId], Field(..., min_length=1, max_length=self.max_ids_per_region,
                                            description=f"1..{self.max_ids_per_region} patch ids forming the "
                                                        "region")),
            reason=(str, Field(..., min_length=1, max_length=300, description="why, in a sentence")),
            confidence=(float, Field(..., ge=0.0, le=1.0, description="0..1")),
        )
        ReportArgs = create_model(
            "ReportSuspectsArgs", __config__=closed,
            regions=(list[Region], Field(..., max_length=self.max_regions,  # type: ignore[valid-type]
                                         description=f"0..{self.max_regions} regions, most likely first")),
        )
        specs = [
            ToolSpec("list_patches", "List patches sorted by one column of the patch table (default: cue, "
                                     "highest "
                     "first) with their position and cue.", ListArgs, self._list_patches),
            ToolSpec("patch_geometry", "All descriptors of one patch plus a small evenly spread sample of "
                                       "its points "
                     "(normalised xyz).", GeometryArgs, self._patch_geometry),
            ToolSpec("neighbourhood", "Patches whose centres lie within `radius` of this patch's centre, and "
                                      "how this "
                     "patch differs from them (in robust standard deviations).", NeighbourArgs,
                     self._neighbourhood),
            ToolSpec("feature_lookup", "The learned statistics of one patch and, when a memory bank is "
                                       "attached, its "
                     "similarity to normal patches of the class; a bank look-up costs the patch's point "
                     "count from the "
                     "verification budget.", LookupArgs, self._feature_lookup),
            ToolSpec("report_suspects", "Final answer: the suspected defect regions, most likely first (an "
                                        "empty "
                     "list if none). Call once, at the end.", ReportArgs, self._report_suspects),
        ]
        return {s.name: s for s in specs}

    def _summary_row(self, pid: int, extra: tuple[str, ...] = ()) -> dict:
        cols = self.context.table.columns
        row = {"id": pid, **{c: _sig(cols[c][pid]) for c in ("x", "y", "z")},
               "n_points": int(cols["n_points"][pid]), "cue": _sig(cols["cue"][pid])}
        for c in extra:
            row[c] = _sig(cols[c][pid]) if c != "n_points" else int(cols[c][pid])
        return row

    def _list_patches(self, args: Any) -> dict:
        values = self.context.table.columns[args.sort_by]
        sign = -1.0 if args.descending else 1.0
        order = sorted(range(self._n), key=lambda i: (sign * float(values[i]), i))[: args.top_k]
        extra = () if args.sort_by in ("x", "y", "z", "n_points", "cue") else (args.sort_by,)
        return {"sort_by": args.sort_by, "descending": args.descending, "total_patches": self._n,
                "total_points": int(self.context.patches.n_points),
                "patches": [self._summary_row(i, extra) for i in order]}

    def _patch_geometry(self, args: Any) -> dict:
        pid = args.patch_id
        idx = self.context.patches.points_of([pid])
        norm_pts = self.context.table.normalisation.apply(self.context.points[idx]).astype(np.float32)
        n = min(args.n_samples, len(idx))
        pick = np.asarray(fps(norm_pts, n, pid), dtype=np.int64) if n < len(idx) else np.arange(len(idx))
        sample = [[_sig(v) for v in p] for p in norm_pts[pick].tolist()]
        return {"patch_id": pid, "descriptors": {k: (int(v) if k == "n_points" else _sig(v))
                                                for k, v in self.context.table.row(pid).items()},
                "sample_xyz": sample}

    def _neighbourhood(self, args: Any) -> dict:
        pid, cols = args.patch_id, self.context.table.columns
        dist = np.linalg.norm(self._norm_centres - self._norm_centres[pid], axis=1)
        candidates = [i for i in np.argsort(dist, kind="stable").tolist() if i != pid]
        within = [i for i in candidates if dist[i] <= args.radius][:MAX_NEIGHBOURS]
        note = None
        if not within:
            within = candidates[:3]
            note = f"no patch centre within radius {args.radius}; the {len(within)} nearest are shown"
        neighbours = [{**self._summary_row(i), "distance": _sig(dist[i])} for i in within]
        data: dict[str, Any] = {"patch_id": pid, "radius": args.radius, "neighbours": neighbours}
        if note:
            data["note"] = note
        if within:
            signals = ["curvature", "roughness", "spacing"]
            signals += [f"{s}_{agg}" for s in self.context.table.stat_names
                        for agg in ("mean", "max")] + ["cue"]
            diffs = {}
            for col in signals:
                nb_median = float(np.median(cols[col][within]))
                diff_sd = (cols[col][pid] - nb_median) / (robust_spread(cols[col]) or 1.0)
                diffs[col] = {"value": _sig(cols[col][pid]), "neighbour_median": _sig(nb_median),
                              "diff_sd": _sig(diff_sd)}
            data["differences"] = diffs
            normal = np.array([cols[f"n{a}"][pid] for a in "xyz"])
            nb_normal = np.stack([cols[f"n{a}"][within] for a in "xyz"], axis=1).mean(axis=0)
            norm_len = float(np.linalg.norm(nb_normal))
            if norm_len > 1e-9:
                cos = float(np.clip(normal @ nb_normal / norm_len, -1.0, 1.0))
                data["normal_angle_to_neighbours_deg"] = _sig(math.degrees(math.acos(cos)))
        return data

    def _feature_lookup(self, args: Any) -> dict:
        pid, table = args.patch_id, self.context.table
        stats = {}
        for s in table.stat_names:
            for col in (f"{s}_mean", f"{s}_max", f"z_{s}_mean", f"z_{s}_max"):
                stats[col] = _sig(table.columns[col][pid])
        data: dict[str, Any] = {"patch_id": pid, "statistics": stats}
        if not stats:
            data["note"] = "no learned statistics in this run (geometry only)"
        lookup = self.context.bank_lookup
        if lookup is None:
            return data
        cost = int(self.context.patches.counts[pid])
        if pid in self.bank_results:
            data.update(bank=self.bank_results[pid], cost_points=0, budget_left_points=self.budget_left)
            return data
        if cost > self.budget_left:
            raise ToolError(f"verification budget exhausted: {self.budget_left} points left, patch {pid} "
                            f"needs {cost}. "
                            "Look up smaller patches or finish with report_suspects.")
        try:
            answer = lookup([pid])
        except Exception as exc:  # the bank is outside the model's control; report, do not crash the loop
            raise ToolError(f"memory bank look-up failed for patch {pid}: "
                            f"{type(exc).__name__}: {exc}") from exc
        if pid not in answer:
            raise ToolError(f"memory bank returned no result for patch {pid}")
        self.budget_left -= cost
        self.bank_results[pid] = {k: (_sig(v) if isinstance(v, (float, np.floating)) else v)
                                  for k, v in dict(answer[pid]).items()}
        data.update(bank=self.bank_results[pid], cost_points=cost, budget_left_points=self.budget_left)
        return data

    def _report_suspects(self, args: Any) -> dict:
        if self.report is not None:
            raise ToolError("report_suspects was already called; the report is final")
        regions = []
        for region in args.regions:
            ids = list(dict.fromkeys(region.patch_ids))  # drop repeated ids, keep order
            regions.append({"patch_ids": ids, "reason": region.reason.strip(),
                            "confidence": region.confidence})
        self.report = regions
        covered = sorted({i for r in regions for i in r["patch_ids"]})
        points = int(self.context.patches.counts[covered].sum()) if covered else 0
        return {"accepted_regions": len(regions), "patches": len(covered), "points": points}


def _compact_json(name: str, data: dict) -> str:
    """Default tool-result text: compact JSON with sorted keys (what verbalize.render_tool_result also
    emits)."""
    try:
        return strict_json.dumps(data, missing_as_null=True, separators=(",", ":"), sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"tool {name} returned a value that is not JSON ({exc})") from exc


def _describe_arg(prop: dict) -> str:
    """Short human form of one JSON-schema property, e.g. 'int 1..50 = 10' or 'one of [cue, x]'."""
    if "enum" in prop:
        text = "one of [" + ", ".join(map(str, prop["enum"])) + "]"
    elif prop.get("type") == "array":
        lo, hi = prop.get("minItems", 0), prop.get("maxItems")
        item = prop.get("items", {})
        fields = ", ".join(f"{k}: {_describe_arg(v)}" for k, v in item.get("properties", {}).items())
        inner = "{" + fields + "}" if item.get("type") == "object" else _describe_arg(item)
        text = f"list of {lo}..{hi} x {inner}"
    else:
        kinds = {"integer": "int", "number": "float", "boolean": "bool", "string": "str"}
        kind = kinds.get(prop.get("type"), "any")
        lo = prop.get("minimum", prop.get("exclusiveMinimum"))
        hi = prop.get("maximum", prop.get("exclusiveMaximum"))
        text = kind + (f" {lo}..{hi}" if lo is not None and hi is not None else "")
    if "default" in prop:
        text += f" = {json.dumps(prop['default'])}"
    return text
