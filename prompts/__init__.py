"""Jinja2 prompt templates (data, not code). `template_dir()` is where the packaged `.j2` files live."""

from pathlib import Path


def template_dir() -> Path:
    """Directory holding the packaged templates (system, overview, patch_table, tool_result, guidance)."""
    return Path(__file__).resolve().parent
