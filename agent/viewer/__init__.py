"""Interactive, offline pages for people: `viewer.html` per scan (page.py) and `index.html` per folder run (index.py)."""

from agent.viewer.index import write_index
from agent.viewer.page import MAX_VIEWER_POINTS, write_viewer

__all__ = ["MAX_VIEWER_POINTS", "write_index", "write_viewer"]
