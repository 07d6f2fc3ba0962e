"""viewer.html and index.html: a real inspection on the tiny fit, written by agent.report, opened in headless Chromium.

The browser checks are the contract a reader relies on: the page renders the cloud (the WebGL canvas is not blank),
makes no request beyond its own file, lists the regions exactly as report.json numbers them, and a click on a drawn
point shows that point's score as scores.npy holds it. Skipped, with the reason, where chromium is not installed (CI
installs it).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.backends import get_backend
from agent.pipeline import inspect_scan
from agent.report import write_outputs
from agent.viewer import write_index
from agent.viewer.page import BACKGROUND, viewer_data
from tests.chromium import Browser, chromium_path

needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt install chromium)")
READY = "document.body && document.body.dataset.status !== 'loading' && document.body.dataset.status"
BACKGROUND_RGB = np.array([int(BACKGROUND[i:i + 2], 16) for i in (1, 3, 5)])


@pytest.fixture(scope="module")
def scan_folder(fitted, scan, tmp_path_factory) -> Path:
    """One scan's output folder from the real pipeline (policy agent, bank verifier), as agent.run writes it."""
    inspection = inspect_scan(scan, fitted, get_backend("policy"))
    out = tmp_path_factory.mktemp("run") / "part"
    write_outputs(inspection, out, source="scans/part.pcd")
    return out


def view_pixels(png: bytes, panel_width: int = 360) -> np.ndarray:
    """The screenshot's 3-D view (the page minus its side panel) as an RGB array."""
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return image[:, : image.shape[1] - panel_width - 2]


def drawn(image: np.ndarray) -> np.ndarray:
    """Pixels that are not the page background."""
    return np.abs(image - BACKGROUND_RGB).max(axis=-1) > 24


@needs_chromium
def test_viewer_renders_offline_lists_the_regions_and_picks_points(scan_folder):
    page = scan_folder / "viewer.html"
    report = json.loads((scan_folder / "report.json").read_text())
    scores = np.load(scan_folder / "scores.npy")
    assert report["regions"], "the tiny scan should give the policy something to name"
    with Browser() as browser:
        assert browser.open(page, READY) == "rendered", browser.evaluate("document.getElementById('status').textContent")
        assert browser.exceptions() == []
        image = view_pixels(browser.screenshot())
        assert drawn(image).sum() > 2000  # the cloud, not an empty canvas
        listed = browser.evaluate("""[...document.querySelectorAll('#regions li.region')].map(li => ({
            id: Number(li.dataset.regionId), verdict: li.querySelector('.verdict').textContent,
            reason: li.querySelector('.reason').textContent}))""")
        assert listed == [{"id": r["id"], "verdict": r["verdict"], "reason": r["reason"]} for r in report["regions"]]
        tags = browser.evaluate("[...document.querySelectorAll('.tag')].map(t => Number(t.textContent))")
        assert sorted(tags) == [r["id"] for r in report["regions"]]

        browser.evaluate("document.querySelector('#regions li.region').click()")  # centres the view on it
        assert browser.evaluate("document.querySelector('#regions li.region').classList.contains('chosen')")
        assert browser.exceptions() == []
        image = view_pixels(browser.screenshot())

        # click where a point was drawn (heat colours are saturated; the outlines are grey or blue)
        saturation = image.max(axis=-1) - image.min(axis=-1)
        rows, cols = np.nonzero(drawn(image) & (saturation > 60))
        middle = np.argsort(np.hypot(rows - rows.mean(), cols - cols.mean()))[0]
        browser.click(float(cols[middle]), float(rows[middle]))
        picked = browser.evaluate("document.getElementById('picked').textContent")
        found = re.search(r"point (\d+) \(input order.*?score ([-\d.e+]+)", picked)
        assert found, picked
        index, shown_score = int(found.group(1)), float(found.group(2))
        assert shown_score == pytest.approx(float(scores[index]), rel=1e-3)

        urls = browser.requested_urls()
    assert urls == [page.resolve().as_uri()]  # the page itself, nothing else


def test_viewer_data_keeps_region_points_and_bounds_the_cloud(rng):
    """Subsampled for the page, every region point stays and the page says how many were shown; same seed, same page."""
    points = rng.normal(size=(5000, 3))
    scores = rng.random(5000).astype(np.float32)
    region = np.flatnonzero(points[:, 2] > 1.5)
    report = {"object_score": 1.0, "regions": [{"id": 1, "verdict": "confirmed", "reason": "high", "point_count": 9}]}
    data = viewer_data(points, scores, report, [region], title="t", max_points=1000, seed=3)
    assert data["shown_points"] == 1000
    shown = np.frombuffer(base64.b64decode(data["input_index"]), dtype="<i4")
    assert set(region) <= set(shown.tolist())
    members = np.frombuffer(base64.b64decode(data["regions"][0]["members"]), dtype="<i4")
    np.testing.assert_array_equal(np.sort(shown[members]), region)
    assert viewer_data(points, scores, report, [region], title="t", max_points=1000, seed=3) == data


def test_viewer_redacts_secrets_from_the_environment(monkeypatch, scan):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    report = {"object_score": 0.5, "regions": [{"id": 1, "verdict": "rejected", "reason": f"key {secret}",
                                                "point_count": 3}]}
    data = viewer_data(scan, np.zeros(len(scan), np.float32), report, [np.arange(3)], title=f"t {secret}")
    assert secret not in json.dumps(data) and "[redacted]" in data["regions"][0]["reason"]


def test_index_lists_every_scan_folder_by_object_score(scan_folder, tmp_path):
    """A folder run's index: one row per scan folder, highest object score first, linking its viewer; a folder whose
    report.json is unreadable gets a row naming the file instead of breaking the page."""
    report = json.loads((scan_folder / "report.json").read_text())
    for name, score in (("low", 0.1), ("high", 9.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({**report, "object_score": score}))
        (tmp_path / name / "viewer.html").write_text("<html></html>")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    (tmp_path / "not-a-scan").mkdir()
    index = write_index(tmp_path)
    assert index == tmp_path / "index.html"
    html = index.read_text()
    assert html.index('href="high/viewer.html"') < html.index('href="low/viewer.html"')
    assert "broken/report.json: unreadable" in html and "not-a-scan" not in html
    assert write_index(tmp_path / "not-a-scan") is None and not (tmp_path / "not-a-scan" / "index.html").exists()


def test_report_legend_keeps_whole_reasons_and_numbers():
    """regions.png's legend lines carry report.json's id and the whole reason (the longest a report allows)."""
    from agent.report import region_legend

    reason = ("dent " * 60)[:300]
    regions = [{"id": 1, "verdict": "confirmed", "reason": reason, "point_count": 12, "confidence": 0.9,
                "max_distance": 2.0, "threshold": 1.0},
               {"id": 2, "verdict": "rejected", "reason": "ridge", "point_count": 5, "confidence": 0.4}]
    first, second = region_legend(regions)
    assert first.startswith("1 confirmed") and first.endswith(reason) and "2 vs threshold 1" in first
    assert second.startswith("2 rejected") and second.endswith("ridge")


def test_index_leaves_a_users_own_index_html_alone(scan_folder, tmp_path):
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "report.json").write_text((scan_folder / "report.json").read_text())
    (tmp_path / "index.html").write_text("my own page")
    assert write_index(tmp_path) is None
    assert (tmp_path / "index.html").read_text() == "my own page"
    (tmp_path / "index.html").unlink()
    assert write_index(tmp_path) is not None and write_index(tmp_path) is not None  # its own index it replaces
