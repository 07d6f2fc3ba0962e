"""Read a scan as text: patches, per-patch descriptors and prompt rendering within a token budget."""

from scans.patches import Normalisation, Patches, PatchTable, adaptive_patch_count, build_patches
from verbalize.describe import CUE_DOC, describe, describe_scan, normalisation_of, robust_z
from verbalize.render import (
    DEFAULT_TOKEN_BUDGET,
    TemplateFolderError,
    check_templates,
    environment,
    estimate_tokens,
    render_overview,
    render_system,
    render_tool_result,
    template_error_message,
    to_jsonable,
)

__all__ = [
    "CUE_DOC", "DEFAULT_TOKEN_BUDGET", "Normalisation", "PatchTable", "Patches", "TemplateFolderError",
    "adaptive_patch_count", "build_patches", "check_templates", "describe", "describe_scan", "environment",
    "estimate_tokens", "normalisation_of", "render_overview", "render_system", "render_tool_result", "robust_z",
    "template_error_message", "to_jsonable",
]
