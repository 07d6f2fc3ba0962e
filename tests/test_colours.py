"""The heat map's colour table shipped in scans/inferno.json is matplotlib's inferno (so a run can colour
scores.ply, regions.png and viewer.html without importing matplotlib, and the two never drift apart)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from scans.colours import HEAT_CMAP, heat_levels, heat_table


def test_shipped_table_is_matplotlibs_inferno():
    expected = (colormaps[HEAT_CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(heat_table(), expected)


def test_levels_span_the_table_and_a_flat_score_is_the_low_end():
    values = np.array([2.0, 3.0, 4.0])
    assert heat_levels(values, 2.0, 4.0).tolist() == [0, 128, 255]
    assert heat_levels(values, 3.0, 3.0).tolist() == [0, 0, 0]
