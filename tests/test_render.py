"""Tests for tools/render.py: files appear with the documented size and the colours mean what they should."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scans.render import REGION_COLOURS, render_points_png, render_regions_png


def sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    points = rng.normal(size=(n, 3))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def red_pixels(image: np.ndarray) -> int:
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int(((r > 170) & (g < 90) & (b < 90)).sum())


def near_colour(image: np.ndarray, hex_colour: str, tolerance: int = 30) -> int:
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - target).max(axis=-1) < tolerance).sum())


def test_points_png_size_and_red_flags(tmp_path, rng):
    points = sphere(rng, 3000)
    mask = points[:, 2] > 0.8  # a cap on top, visible from every view
    flagged = render_points_png(tmp_path / "flag.png", points, mask=mask, title="flagged cap")
    plain = render_points_png(tmp_path / "plain.png", points)
    assert flagged == tmp_path / "flag.png" and flagged.is_file()
    with Image.open(flagged) as image:
        assert image.size == (1200, 400) and image.format == "PNG"
    assert red_pixels(pixels(flagged)) > 200
    assert red_pixels(pixels(plain)) == 0
    # Flagged points sit in the upper half of each panel (z is up in every view but "top").
    image = pixels(flagged)
    front = image[:, :400]
    rows = np.nonzero((front[..., 0] > 170) & (front[..., 1] < 90) & (front[..., 2] < 90))[0]
    assert rows.mean() < 200


def test_single_view_size(tmp_path, rng):
    path = render_points_png(tmp_path / "one.png", sphere(rng, 500), views=("iso",))
    with Image.open(path) as image:
        assert image.size == (400, 400)


def test_values_colour_map_is_not_red(tmp_path, rng):
    points = sphere(rng, 2000)
    image = pixels(render_points_png(tmp_path / "v.png", points, values=points[:, 0]))
    assert red_pixels(image) == 0
    spread = image.max(axis=-1) - image.min(axis=-1)
    assert (spread > 60).sum() > 500  # coloured, not grey


def test_huge_cloud_subsampled_keeps_flagged_points(tmp_path, rng):
    points = sphere(rng, 200_000)
    mask = np.zeros(len(points), dtype=bool)
    mask[np.argsort(points[:, 2])[-30:]] = True  # 30 points at the very top
    path = render_points_png(tmp_path / "big.png", points, mask=mask, max_points=2000, views=("front",))
    assert red_pixels(pixels(path)) > 20


def test_rendering_is_deterministic(tmp_path, rng):
    points = sphere(rng, 50_000)
    first = pixels(render_points_png(tmp_path / "a.png", points, max_points=3000, seed=1))
    again = pixels(render_points_png(tmp_path / "b.png", points, max_points=3000, seed=1))
    np.testing.assert_array_equal(first, again)


def test_regions_png_has_each_colour(tmp_path, rng):
    points = sphere(rng, 4000)
    regions = [np.flatnonzero(points[:, 2] > 0.7), np.flatnonzero(points[:, 0] > 0.7)]
    path = render_regions_png(
        tmp_path / "r.png", points, regions, ["top patch", "side patch"], title="regions"
    )
    image = pixels(path)
    assert image.shape == (400, 1200, 3)
    assert near_colour(image, REGION_COLOURS[0]) > 100
    assert near_colour(image, REGION_COLOURS[1]) > 100
    assert red_pixels(image) == 0


def test_bad_arguments(tmp_path, rng):
    points = sphere(rng, 100)
    with pytest.raises(ValueError, match="mask has 5 entries for 100 points"):
        render_points_png(tmp_path / "x.png", points, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="unknown view 'back'"):
        render_points_png(tmp_path / "x.png", points, views=("back",))
    with pytest.raises(ValueError, match="outside 0..99"):
        render_regions_png(tmp_path / "x.png", points, [np.array([5, 100])], ["r"])
    with pytest.raises(ValueError, match="2 regions but 1 labels"):
        render_regions_png(tmp_path / "x.png", points, [np.array([1]), np.array([2])], ["r"])
    assert list(tmp_path.iterdir()) == []
