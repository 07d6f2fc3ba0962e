"""Render prompts from the jinja2 templates in prompts/, within a token budget.

The templates are data: a user can copy any of them into a directory of their own and pass it as `templates=`;
a file
there overrides the packaged one of the same name, and every template renders in jinja's sandbox. Numbers are
formatted here (fixed decimals, no "-0.00") so the text is byte-identical for identical input.

Only arrays reach these functions (a PatchTable, plain dicts), never a scan file's header or comments, so text
hidden in
a file cannot end up in a prompt. The one piece of free text is the user's guidance, which is placed in its
own section
between markers that the guidance itself cannot contain.

Token counting: `estimate_tokens` is a cheap deterministic estimate that errs on the high side for
number-heavy text:
a run of ASCII letters/underscores counts ceil(len/4), a run of digits ceil(len/3) (BPE vocabularies of
GPT-4/Llama-3
style hold up to 3 digits per token), and every other non-space character (punctuation, non-ASCII) counts 1.
Pass
`count_tokens=` to use an exact tokenizer instead.
"""

from __future__ import annotations

import functools
import math
import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from prompts import template_dir
from scans import strict_json
from scans.patches import PatchTable

DEFAULT_TOKEN_BUDGET = 3000
GUIDANCE_SHARE = 1 / 3  # the guidance may use at most this share of the overview's budget
OPEN_MARKER = "<<<GUIDANCE"
CLOSE_MARKER = "GUIDANCE>>>"
_TOKEN_RE = re.compile(r"[A-Za-z_]+|[0-9]+|\S")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

TokenCounter = Callable[[str], int]


def estimate_tokens(text: str) -> int:
    """Deterministic token estimate (see module docstring)."""
    total = 0
    for piece in _TOKEN_RE.findall(text):
        if piece[0].isascii() and (piece[0].isalpha() or piece[0] == "_"):
            total += math.ceil(len(piece) / 4)
        elif piece[0].isascii() and piece[0].isdigit():
            total += math.ceil(len(piece) / 3)
        else:
            total += 1
    return total


@functools.lru_cache(maxsize=8)
def _environment(user_dir: str | None) -> jinja2.Environment:
    # sandboxed: a user's template folder is data, and must not reach Python internals through attribute
    # access
    search = [str(template_dir())] if user_dir is None else [user_dir, str(template_dir())]
    return SandboxedEnvironment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def environment(templates: str | Path | None = None) -> jinja2.Environment:
    """The jinja2 environment: packaged templates, overridden by file name from `templates` when given."""
    if templates is None:
        return _environment(None)
    path = Path(templates).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{templates}: template override directory does not exist or is not a directory")
    return _environment(str(path))


class TemplateFolderError(ValueError):
    """A user template folder that cannot be used; the message names the folder or file and the problem."""


def check_templates(templates: str | Path) -> None:
    """Compile every `.j2` file of a user template folder, so a missing folder or a syntax error is reported
    before
    any scan is analysed (rendering would otherwise fail only once the first prompt is built)."""
    try:
        env = environment(templates)
    except ValueError as exc:
        raise TemplateFolderError(str(exc)) from None
    folder = Path(templates)
    for file in sorted(folder.glob("*.j2")):
        try:
            env.get_template(file.name)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateFolderError(f"{file}:{exc.lineno}: template syntax error: {exc.message}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateFolderError(f"{file}: cannot be read as a UTF-8 template ({exc})") from None


def template_error_message(exc: jinja2.TemplateError, templates: str | Path | None) -> str:
    """What went wrong while rendering, naming the template file (jinja puts it in the traceback) when it
    can."""
    files = [
        frame.filename for frame in traceback.extract_tb(exc.__traceback__) if frame.filename.endswith(".j2")
    ]
    where = files[-1] if files else str(templates or template_dir())
    kind = "unsafe template (blocked by the sandbox)" if isinstance(exc, SecurityError) else "template error"
    return f"{where}: {kind}: {type(exc).__name__}: {exc}"


def _fmt(value: float, decimals: int) -> str:
    rounded = round(float(value), decimals)
    if rounded == 0:
        rounded = 0.0  # no "-0.00"
    return f"{rounded:.{decimals}f}"


def to_jsonable(value: Any, significant: int = 4) -> Any:
    """Plain JSON types from numpy scalars/arrays, floats rounded to `significant` digits, NaN/inf mapped to
    None.

    Significant digits rather than decimals: descriptors span 1e-4 (roughness) to 1e5 (point counts)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, significant) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, significant) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), significant)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return None
        rounded = float(f"{float(value):.{significant}g}")
        return 0.0 if rounded == 0 else rounded
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot convert {type(value).__name__} to JSON")


def render_system(tools_summary: str, *, templates: str | Path | None = None) -> str:
    """System prompt: the task, how to read the overview, the tools and the rules."""
    return environment(templates).get_template("system.j2").render(tools_summary=tools_summary).strip() + "\n"


def render_tool_result(name: str, data: dict, *, templates: str | Path | None = None) -> str:
    """Text of one tool result for the model; by default compact JSON (sorted keys) that parses back to
    `data`."""
    plain = to_jsonable(data)
    data_json = strict_json.dumps(
        plain, missing_as_null=True, separators=(",", ":"), sort_keys=True, ensure_ascii=False
    )
    return (
        environment(templates)
        .get_template("tool_result.j2")
        .render(name=name, data=plain, data_json=data_json)
    )


# ---- overview
# -------------------------------------------------------------------------------------------------------


# The detector's surface cues (detector.surface_cues) come in the class's normal units (1 = the most a normal
# scan shows), so their patch maximum is shown as it is, beside the z-scores: "3.0" reads alike on any scan.
NORMAL_UNIT_STATS = ("surface_distance", "uncovered_rim")


def overview_columns(table: PatchTable) -> list[str]:
    """Columns shown per patch in the overview (others stay reachable through the tools)."""
    cols = ["x", "y", "z", "n_points", "z_curvature", "z_roughness", "z_spacing"]
    for stat in table.stat_names:
        cols += [f"z_{stat}_mean", f"z_{stat}_max"]
    cols += [f"{stat}_max" for stat in NORMAL_UNIT_STATS if stat in table.stat_names]
    return cols + ["cue"]


def _decimals(column: str) -> int:
    if column == "n_points":
        return 0
    if column.startswith("z_") or column.removesuffix("_max") in NORMAL_UNIT_STATS:
        return 1
    return 2


def _legend(table: PatchTable) -> list[str]:
    lines = [
        "id = patch id; x y z = patch centre (normalised); n_points = points in the patch.",
        "z_* = robust z-score vs this scan's patches (0 typical, |z| > 3 unusual) of: curvature (surface "
        "variation), "
        "roughness (distance to the best-fit plane), spacing (point spacing; high = sparse or holes)"
        + ("" if not table.stat_names else ", <statistic>_mean / _max (learned statistic over the patch)")
        + ".",
        "cue = combined outlier score (higher = more unusual; 0 = typical).",
    ]
    shown = [stat for stat in NORMAL_UNIT_STATS if stat in table.stat_names]
    if shown:
        lines.append(
            " / ".join(f"{stat}_max" for stat in shown)
            + " = the detector's surface evidence over the patch, in "
            "the class's normal units (1 = the most a normal scan shows; above 1 = beyond normal): "
            "surface_distance = distance to the templates' surface (dents, bulges, scratches, cracks), "
            "uncovered_rim = template surface missing next to the patch (holes, broken-off parts)."
        )
    return lines


def _sanitise_guidance(guidance: str, max_tokens: int, count: TokenCounter) -> str:
    """Strip control characters and the section markers; cut to `max_tokens` (noted in the text)."""
    text = _CONTROL_RE.sub("", guidance.replace("\r\n", "\n"))
    for marker in (OPEN_MARKER, CLOSE_MARKER):
        text = re.sub(re.escape(marker), "", text, flags=re.IGNORECASE)
    text = text.strip()
    if count(text) <= max_tokens:
        return text
    note = " [guidance truncated]"
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits together with the note
        mid = (lo + hi + 1) // 2
        if count(text[:mid] + note) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + note


def render_overview(
    table: PatchTable,
    guidance: str | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    *,
    templates: str | Path | None = None,
    count_tokens: TokenCounter | None = None,
) -> str:
    """Scan overview within `token_budget`: header, patch table (id order) and the delimited user guidance.

    When all rows do not fit, the patches with the highest cue are kept in full (still in id order) and the
    others are
    summarised in one line; the number kept is the largest that fits (binary search). Raises ValueError if
    even the
    header with no rows exceeds the budget.
    """
    count = count_tokens or estimate_tokens
    env = environment(templates)
    template = env.get_template("overview.j2")
    cols = overview_columns(table)
    values = {c: table.columns[c] for c in cols}
    all_rows = [[str(int(pid))] + [_fmt(values[c][pid], _decimals(c)) for c in cols] for pid in table.ids]
    cue = table.columns["cue"]
    by_cue = sorted(range(table.n_patches), key=lambda i: (-cue[i], i))
    norm = table.normalisation
    clean_guidance = None
    if guidance is not None:
        clean_guidance = _sanitise_guidance(guidance, int(token_budget * GUIDANCE_SHARE), count)

    def render(keep: int) -> str:
        kept = sorted(by_cue[:keep])
        rest = by_cue[keep:]
        omitted = None
        if rest:
            rest_cue = cue[rest]
            omitted = {
                "count": len(rest),
                "points": int(table.columns["n_points"][rest].sum()),
                "cue_median": _fmt(np.median(rest_cue), 2),
                "cue_max": _fmt(rest_cue.max(), 2),
            }
        text = template.render(
            n_points=norm.n_points,
            extent=[_fmt(e, 3) for e in norm.extent],
            n_patches=table.n_patches,
            mean_points=round(norm.n_points / max(table.n_patches, 1)),
            stat_names=list(table.stat_names),
            legend=_legend(table),
            header=["id", *cols],
            rows=[all_rows[i] for i in kept],
            omitted=omitted,
            guidance=clean_guidance,
            open_marker=OPEN_MARKER,
            close_marker=CLOSE_MARKER,
        )
        return text.strip() + "\n"

    full = render(table.n_patches)
    if count(full) <= token_budget:
        return full
    lo, hi = 0, table.n_patches - 1
    if count(render(0)) > token_budget:
        raise ValueError(f"token budget {token_budget} is too small for the overview header alone")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(render(mid)) <= token_budget:
            lo = mid
        else:
            hi = mid - 1
    return render(lo)
