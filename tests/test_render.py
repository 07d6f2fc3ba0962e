"""Tests for tools/render.py: files appear with the documented size and the colours mean what they should."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scans.regions_png import CONFIRMED_BLUE, regions_picture, render_regions_png
from scans.render import render_points_png


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


def test_regions_png_draws_confirmed_apart_from_rejected(tmp_path, rng):
    """Confirmed regions are outlined in solid blue; a rejected one in dashed grey, so no blue without a
    confirmed."""
    points = sphere(rng, 4000)
    regions = [np.flatnonzero(points[:, 2] > 0.7), np.flatnonzero(points[:, 0] > 0.7)]
    labels = ["1 confirmed: top patch", "2 rejected: side patch"]
    both = pixels(
        render_regions_png(
            tmp_path / "r.png", points, regions, labels, title="regions", verdicts=["confirmed", "rejected"]
        )
    )
    rejected = pixels(
        render_regions_png(
            tmp_path / "x.png", points, regions, labels, title="regions", verdicts=["rejected", "rejected"]
        )
    )
    assert near_colour(both, CONFIRMED_BLUE, tolerance=40) > 100
    assert near_colour(rejected, CONFIRMED_BLUE, tolerance=40) == 0


def test_regions_are_numbered_in_order_on_a_heat_map(tmp_path, rng):
    """Each region carries its number (1..n, report.json's order) in every view, over the cloud coloured by
    score."""
    points = sphere(rng, 3000)
    regions = [
        np.flatnonzero(points[:, 2] > 0.8),
        np.flatnonzero(points[:, 1] > 0.8),
        np.flatnonzero(points[:, 0] > 0.8),
    ]
    picture = regions_picture(
        points, regions, ["a", "b", "c"], scores=points[:, 2], verdicts=["confirmed", "rejected", "skipped"]
    )
    numbers = sorted(picture.numbers)
    assert numbers == sorted(["1", "2", "3"] * 3)
    heat = pixels(
        render_regions_png(tmp_path / "h.png", points, regions, ["a", "b", "c"], scores=points[:, 2])
    )
    spread = heat.max(axis=-1) - heat.min(axis=-1)
    assert (spread > 60).sum() > 500  # coloured by score, not grey


def test_long_legend_is_whole_and_inside_the_image(tmp_path, rng):
    """The longest reason the report allows (300 characters) and many regions: every word of every label is
    drawn,
    and nothing touches the image border (a cut legend would)."""
    points = sphere(rng, 3000)
    reason = " ".join(f"word{i:03d}" for i in range(37))[:300]
    regions = [np.flatnonzero(points[:, 2] > 0.9 - 0.1 * i) for i in range(6)]
    labels = [f"{i + 1} rejected (40 points, confidence 0.50): {reason}" for i in range(6)]
    picture = regions_picture(points, regions, labels)
    legend_text = " ".join(picture.legend)
    assert legend_text.split() == " ".join(labels).split()
    image = pixels(render_regions_png(tmp_path / "long.png", points, regions, labels))
    border = np.concatenate(
        [
            image[:3].reshape(-1, 3),
            image[-3:].reshape(-1, 3),
            image[:, :3].reshape(-1, 3),
            image[:, -3:].reshape(-1, 3),
        ]
    )
    assert (border > 245).all()


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
