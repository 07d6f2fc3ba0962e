"""One scan through the whole product: analyse -> verbalize -> agent loop -> verifier.

`inspect_scan` is what `agent.run` calls per scan and what the eval harness calls per (backend, scan); it
knows no
dataset layout and no metric. The backbone runs once per scan (`FittedClass.analyse`), its statistics feed the
verbalizer, the agent's bank look-ups and the verifier draw on the same analysis, and bank look-ups made
during the
conversation count towards the share of points verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import jinja2
import numpy as np

from agent.backends import Backend, get_backend
from agent.explain import region_explanation, scan_summary
from agent.guidance import guidance_summary, handling
from agent.guided_report import apply_to_report
from agent.loop import AgentBudget, AgentOutcome, context_window, run_agent
from agent.normal_features import named_kinds, recognisers_for
from agent.secrets import Redactor, backend_secrets
from agent.transcript import Transcript
from agent.verifier import Verification, verify, verify_zero_shot
from detector.calibration import verdict_of
from detector.fitted import FittedClass, ScanAnalysis
from scans.outliers import robust_radius_mean
from scans.patches import Patches, PatchTable
from tools.agent_tools import ScanContext, ToolBox
from verbalize import describe_scan, render_overview, render_system, render_tool_result
from verbalize.compact import COMPACT_ROWS, render_compact_overview, render_compact_system
from verbalize.shape import deviation_shape

VerifyMode = Literal["suspects", "all"]
Verbalization = Literal["full", "compact"]


@dataclass(frozen=True)
class InspectionConfig:
    """Knobs of one inspection; defaults keep the bank's share of points <= 20%."""

    verify: VerifyMode = "suspects"
    max_verify_fraction: float = 0.2  # bank-scored points / all points, agent look-ups included
    lookup_fraction: float = 0.1  # of which the agent's feature_lookup calls may spend at most this
    margin: float = 0.0  # extra radius around suspect regions, in scan units (0 = patch borders)
    token_budget: int = 3000  # for the scan overview
    guidance: str | None = None
    templates: str | None = None  # user template folder overriding prompts/*.j2 by file name
    # "compact": the short overview and system prompt for small models (verbalize.compact); a backend that
    # declares `verbalization` (the hf backend, the ranker) gets its own
    verbalization: Verbalization = "full"
    # rows of the compact overview; a backend that declares `compact_rows` (an adapter's recipe, the ranker's
    # model) gets the count it was trained on: the shipped adapter, trained on 8, reports nothing on 12
    compact_rows: int = COMPACT_ROWS
    budget: AgentBudget = field(default_factory=AgentBudget)
    seed: int = 0
    # the learned recognisers that apply guidance naming a normal feature (agent.normal_features): "shipped",
    # "none" (each backend reads it on its own), or a path to your own (agent.tune train --method recogniser)
    normal_features: str = "shipped"


@dataclass
class Inspection:
    """The result of one scan: scores, regions with verdicts, and what it cost."""

    points: np.ndarray
    verification: Verification
    outcome: AgentOutcome
    patches: Patches
    table: PatchTable
    backend: str
    seconds: dict[str, float]
    verify_mode: VerifyMode = "suspects"
    registration: dict | None = (
        None  # how the scan was aligned onto the class template (registered fits only)
    )
    guidance: dict | None = None  # the user's guidance and whether the reporting backend read it

    @property
    def point_scores(self) -> np.ndarray:
        return self.verification.point_scores

    @property
    def object_score(self) -> float:
        return self.verification.object_score

    def flagged_regions(self) -> list[np.ndarray]:
        """Point indices of each region the agent named (what region recall is measured on)."""
        return [self.patches.points_of(r.patch_ids) for r in self.verification.regions]

    def report(self) -> dict:
        """The `report.json` document (the contract other tools read)."""
        v, o = self.verification, self.outcome
        regions = []
        for number, (verdict, members) in enumerate(zip(v.regions, self.flagged_regions()), start=1):
            entry = {"id": number, **verdict.to_dict()}  # the number regions.png and viewer.html show
            if members.size:  # where to look, in the scan's own coordinates
                entry["center"] = [round(float(c), 6) for c in self.points[members].mean(axis=0)]
            entry["explanation"] = region_explanation(entry, self.table, v.mode)
            regions.append(entry)
        verdict = verdict_of(v.object_score, v.object_threshold)
        return {
            "object_score": float(v.object_score),
            "verdict": verdict,
            "threshold": None if v.object_threshold is None else round(float(v.object_threshold), 6),
            "summary": scan_summary(
                verdict, float(v.object_score), v.object_threshold, regions, v.mode, self.registration
            ),
            "verified_fraction": round(v.verified_fraction, 6),
            "verify_mode": self.verify_mode,
            "mode": v.mode,
            "backend": self.backend,
            "reporting_backend": o.backend,
            "fallback": {"used": o.fallback_used, "reason": o.fallback_reason},
            "error": o.error,
            "usage": o.usage.model_dump(),
            "tool_calls": o.n_tool_calls,
            "turns": o.turns,
            "repairs": o.repairs,
            "n_points": len(self.points),
            "n_patches": int(self.patches.n_patches),
            "patches_searched": v.patches_searched,
            "detector_patches": v.patches_total,
            "regions": regions,
            "registration": self.registration,
            "guidance": self.guidance,
            "seconds": {k: round(s, 3) for k, s in self.seconds.items()},
        }


class ClassMismatch(ValueError):
    """A scan and a fitted class that do not belong together (message names the scan, the class folder and
    why)."""


SCALE_TOLERANCE = 3.0  # a scan whose size is off by more than this factor is another part or other units


def scan_radius(points: np.ndarray, seed: int = 0) -> float:
    """Mean distance of a point to the centroid, the same size measure as the class scale (detector.pointmae),
    but robust: measured on a bounded sample without the points far outside the part (scans.outliers), so
    that a few stray returns cannot make a part look like another class."""
    return robust_radius_mean(points, seed)


def check_scan_fits_class(
    points: np.ndarray, fitted: FittedClass, source: str, bank_dir: str = "the bank"
) -> None:
    """Refuse a scan whose size is far from the class's: a bank of another class, or a scan in other units (mm
    vs m).

    Why: the detector normalises by the class scale, so such a scan gives confident nonsense, not an error.
    Partial
    scans of the right part stay well within the tolerance."""
    radius = scan_radius(points)
    ratio = radius / fitted.scale
    if not (1.0 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE):
        raise ClassMismatch(
            f"{source}: its size (mean radius {radius:.4g}) is {ratio:.3g} x that of the class fitted "
            f"in {bank_dir} ({fitted.scale:.4g}): a bank of another class, or a scan in other units"
        )


def _bank_lookup(
    fitted: FittedClass, analysis: ScanAnalysis, patches: Patches, scored: np.ndarray
) -> Callable[[list[int]], dict[int, dict]]:
    """The agent's window on the memory bank: per verbalizer patch, its bank distances vs the normal range."""
    p99 = fitted.thresholds.get("patch_p99")
    p50 = fitted.thresholds.get("patch_p50")

    def lookup(patch_ids: list[int]) -> dict[int, dict]:
        answer = {}
        for pid in patch_ids:
            members = patches.points_of([pid])
            result = fitted.score(analysis, members)
            scored[result.point_ids] = True
            top = float(result.point_scores.max()) if result.point_scores.size else 0.0
            info = {
                "bank_distance_max": top,
                "bank_distance_mean": float(result.point_scores.mean()) if result.point_scores.size else 0.0,
            }
            if p99:
                info["normal_p99"] = float(p99)
                info["ratio_to_normal_p99"] = top / float(p99)
            if p50:
                info["normal_median"] = float(p50)
            answer[int(pid)] = info
        return answer

    return lookup


OVERVIEW_SHARE_OF_WINDOW = (
    0.25  # the rest of a small window: system prompt, tool schemas, tool results, replies
)
MIN_OVERVIEW_TOKENS = 800  # below this the overview is little more than its header


def overview_token_budget(configured: int, window: int | None) -> int:
    """The overview's token budget: as configured, but at most a quarter of a known context window (never
    below
    MIN_OVERVIEW_TOKENS, never above `configured`), so that a small local model has room left to call tools:
    an
    8k-token model given a 3k overview filled its window in two look-ups. The budget also sets the number of
    patches
    (`describe_scan`), so a small window means fewer, coarser patches, for the fallback policy too."""
    if window is None:
        return configured
    return min(configured, max(MIN_OVERVIEW_TOKENS, int(OVERVIEW_SHARE_OF_WINDOW * window)))


def build_conversation(
    points: np.ndarray,
    fitted: FittedClass | None,
    analysis: ScanAnalysis | None,
    config: InspectionConfig,
    scored: np.ndarray,
    template_errors: list[jinja2.TemplateError] | None = None,
) -> tuple[Patches, PatchTable, Callable[[], ToolBox], list[dict]]:
    """Patches, their table, a toolbox factory (fresh state for a fallback run) and the opening messages.

    A tool result that a (user) template fails to render is appended to `template_errors`: the loop turns a
    failing
    tool call into a message for the model, so without this a broken template would only degrade every
    scan."""
    stats = analysis.point_stats if analysis is not None else None
    patches, table = describe_scan(points, stats, token_budget=config.token_budget, seed=config.seed)
    if analysis is not None:
        table.shape = deviation_shape(points, stats, analysis.surface_side, patches, seed=config.seed)
    lookup = (
        _bank_lookup(fitted, analysis, patches, scored)
        if fitted is not None and analysis is not None
        else None
    )
    # the agent's look-ups are part of the verifier's share, never more than all of it
    lookup_share = min(config.lookup_fraction, config.max_verify_fraction)
    lookup_points = int(lookup_share * len(points)) if lookup is not None else 0

    def make_toolbox() -> ToolBox:
        # a fallback's fresh toolbox gets only what the failed attempt left: its look-ups were real bank
        # searches
        left = max(0, lookup_points - int(scored.sum()))
        context = ScanContext(
            points=points, patches=patches, table=table, bank_lookup=lookup, verify_budget_points=left
        )
        return ToolBox(context, render=render)

    def render(name: str, data: dict) -> str:
        try:
            return render_tool_result(name, data, templates=config.templates)
        except jinja2.TemplateError as exc:
            if template_errors is not None:
                template_errors.append(exc)
            raise

    toolbox = make_toolbox()
    if config.verbalization == "compact":
        system = render_compact_system(templates=config.templates)
        overview = render_compact_overview(
            table, config.guidance, rows=config.compact_rows, templates=config.templates
        )
    else:
        system = render_system(toolbox.tools_summary(), templates=config.templates)
        overview = render_overview(table, config.guidance, config.token_budget, templates=config.templates)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": overview}]
    return patches, table, make_toolbox, messages


def inspect_scan(
    points: np.ndarray,
    fitted: FittedClass | None,
    backend: Backend,
    *,
    config: InspectionConfig = InspectionConfig(),
    transcript_path: str | Path | None = None,
    fallback: Backend | None = None,
    use_fallback: bool = True,
    analysis: ScanAnalysis | None = None,
) -> Inspection:
    """Run one scan end to end. `fitted=None` runs the labelled zero-shot mode (geometry only).

    When the backend fails, `fallback` (default: the policy) finishes the scan and the report says why;
    `use_fallback=False` records the failure instead (the harness's `--no-fallback`)."""
    if fitted is None and config.verify == "all":
        raise ValueError("verify='all' scores every point with the memory bank and needs a fitted class")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pts = np.ascontiguousarray(points, dtype=np.float32)
    if fitted is not None and analysis is None:
        analysis = fitted.analyse(pts)
    timings["analyse"] = time.perf_counter() - t0
    scored = np.zeros(len(pts), dtype=bool)
    t0 = time.perf_counter()
    # a backend that reads the compact overview (verbalize.compact) gets it; its length does not depend on
    # the budget, so the budget only sets the patch count; an adapter's recipe may fix that budget
    verbalization = getattr(backend, "verbalization", None) or config.verbalization
    overview_budget = getattr(backend, "overview_tokens", None) or (
        config.token_budget
        if verbalization == "compact"
        else overview_token_budget(config.token_budget, context_window(backend, config.budget))
    )
    template_errors: list[jinja2.TemplateError] = []
    rows = getattr(backend, "compact_rows", None) or config.compact_rows
    spoken = replace(
        config,
        token_budget=overview_budget,
        verbalization=verbalization,
        compact_rows=rows,
        # a backend may keep guidance out of its prompt (hf's guidance_in_prompt); the report filter still
        # applies it
        guidance=config.guidance if getattr(backend, "guidance_in_prompt", True) else None,
    )
    patches, table, make_toolbox, messages = build_conversation(
        pts, fitted, analysis, spoken, scored, template_errors
    )
    timings["verbalize"] = time.perf_counter() - t0
    if not use_fallback:
        fallback = None
    elif fallback is None:
        fallback = get_backend("policy")
    # every configured secret (the environment's, the backends' keys) is scrubbed from what the run records
    redact = Redactor.for_run(backend_secrets(backend, fallback))
    transcript = (
        Transcript(transcript_path, extra_secrets=redact.secrets) if transcript_path is not None else None
    )
    t0 = time.perf_counter()
    try:
        if transcript is not None:
            transcript.log(
                "scan",
                n_points=len(pts),
                backend=backend.name,
                verify=config.verify,
                mode="bank" if fitted is not None else "zero-shot",
            )
        recognisers = recognisers_for(config.normal_features) if config.guidance else None
        handled = named_kinds(config.guidance, recognisers)
        with handling(handled):  # the backend leaves those features to the recognisers, judged once below
            toolbox = make_toolbox()
            outcome = run_agent(
                backend,
                toolbox,
                messages,
                budget=config.budget,
                transcript=transcript,
                fallback=fallback,
                toolbox_factory=make_toolbox,
            )
            if template_errors:
                raise template_errors[0]
            outcome = _scrubbed(outcome, redact)
            guidance = guidance_summary(
                redact(config.guidance),
                fallback if outcome.fallback_used else backend,
                outcome.fallback_used,
                outcome.messages,
            )
        if guidance is not None:  # there is guidance: for every backend, whether it read it or not
            regions, entries = apply_to_report(outcome.regions, table, config.guidance, handled, recognisers)
            guidance |= entries
            if entries and guidance.get("note"):
                applied = " and ".join(k.replace("_", " ") for k in entries)
                guidance["note"] += f"; {applied} were still applied to its report"
            outcome = outcome.model_copy(update={"regions": regions})
            if transcript is not None and entries:
                transcript.log("guidance_applied", **entries)
        timings["agent"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if fitted is not None and analysis is not None:
            verification = verify(
                fitted,
                analysis,
                patches,
                outcome.regions,
                max_fraction=config.max_verify_fraction,
                margin=config.margin,
                already_scored=scored,
                verify_all=config.verify == "all",
            )
        else:
            verification = verify_zero_shot(
                pts, patches, outcome.regions, max_fraction=config.max_verify_fraction, seed=config.seed
            )
        timings["verify"] = time.perf_counter() - t0
        if transcript is not None:
            transcript.log(
                "verification",
                mode=verification.mode,
                object_score=verification.object_score,
                verified_fraction=verification.verified_fraction,
                regions=[r.to_dict() for r in verification.regions],
            )
    finally:
        if transcript is not None:
            transcript.close()
    timings["total"] = sum(timings.values())
    return Inspection(
        points=pts,
        verification=verification,
        outcome=outcome,
        patches=patches,
        table=table,
        backend=backend.name,
        seconds=timings,
        verify_mode=config.verify if verification.mode == "bank" else "suspects",
        registration=_registration_summary(analysis),
        guidance=guidance,
    )


def _scrubbed(outcome: AgentOutcome, redact: Redactor) -> AgentOutcome:
    """The outcome with every secret removed from the text it carries (a server's error that echoed the key
    becomes
    the fallback reason; a model may repeat anything it was sent)."""
    return outcome.model_copy(
        update={
            "fallback_reason": redact(outcome.fallback_reason),
            "error": redact(outcome.error),
            "regions": redact(outcome.regions),
            "messages": redact(outcome.messages),
        }
    )


def _registration_summary(analysis: ScanAnalysis | None) -> dict | None:
    """ICP fitness and the 4x4 transform onto the class template; a doubtful alignment makes every score
    suspect."""
    if analysis is None or analysis.registered is None:
        return None
    a = analysis.alignment
    return {
        "fitness": round(a.fitness, 4),
        "doubtful": a.doubtful,
        "transform": [[round(float(v), 8) for v in row] for row in a.transform],
    }
