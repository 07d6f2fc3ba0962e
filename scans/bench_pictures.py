"""`python -m evals.bench --pictures`: one PNG with a few samples of every class, defects in red, for a person
to
check what the benchmark builder made."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np


def render_examples(root: Path, out_png: Path, *, max_samples: int = 6, max_points: int = 12000) -> Path:
    """One PNG with a few defective samples (anomalous points in red), one per defect type where possible."""
    from PIL import Image

    from scans.render import render_points_png

    recipe = json.loads((Path(root) / "recipe.json").read_text())
    by_type: dict[str, list[tuple[str, dict]]] = {}
    for records in recipe["samples"].values():
        for record in records:
            if record["defect"]:
                by_type.setdefault(record["defect"]["type"], []).append((record["file"], record["defect"]))
    # one sample per defect type, rotating through the classes so the sheet shows several parts
    chosen = [found[index % len(found)] for index, found in enumerate(by_type.values())][:max_samples]
    if not chosen:
        raise ValueError(f"{root}: no defective samples to render")
    tiles = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (rel, info) in enumerate(chosen):
            path = Path(root) / rel
            gt = path.parent.parent / "GT" / f"{path.stem}.txt"
            rows = np.loadtxt(gt, delimiter=",", ndmin=2)
            title = f"{path.stem}: {info['type']}, {100 * info['share']:.1f}% anomalous"
            tile = Path(scratch) / f"{index}.png"
            render_points_png(tile, rows[:, :3], mask=rows[:, 3] > 0.5, title=title, max_points=max_points)
            tiles.append(Image.open(tile).convert("RGB"))
        width = max(t.width for t in tiles)
        sheet = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
        y = 0
        for tile in tiles:
            sheet.paste(tile, (0, y))
            y += tile.height
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
