"""Robust statistics over a scan's patches: one place for the median/MAD scale and the z-scores built on it.

The verbalizer's cue, the agent tools' neighbour comparison and the verifier's prior all rank patches against
the
other patches of the same scan. They must agree on what "unusual" means, so they share these functions instead
of
each restating a scale: a median/MAD spread that one outlying patch cannot inflate, z-scores clipped so one
extreme
patch cannot swamp the rest, and floors below which a column counts as constant.
"""

from __future__ import annotations

import numpy as np

MAD_TO_SD = 1.4826  # scales the median absolute deviation to a standard deviation for normal data
Z_CLIP = 10.0  # z-scores are clipped so that one extreme patch cannot swamp the cue of all others
# below these spreads a column counts as constant (see robust_z): curvature is a ratio in [0, 1/3], roughness
# is in
# normalised units where 1e-4 is 1/20000 of the part's size
ABSOLUTE_Z_FLOORS = {"curvature": 1e-3, "roughness": 1e-4}
RELATIVE_Z_FLOOR = 1e-2


def robust_spread(values: np.ndarray) -> float:
    """1.4826 * MAD of the values, or their standard deviation when the MAD is 0 (0.0 when both are): a scale
    for
    z-scores that one outlying patch cannot inflate."""
    values = np.asarray(values, dtype=np.float64)
    spread = MAD_TO_SD * float(np.median(np.abs(values - np.median(values))))
    if not spread > 1e-12:
        spread = float(values.std())
    return spread if spread > 1e-12 else 0.0


def robust_z(values: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """(v - median) / spread, spread = 1.4826 * MAD, or the standard deviation when the MAD is 0, never below
    `floor`.

    `floor` keeps a column that is constant up to float noise (curvature on a flat plate: ~1e-9) from turning
    that
    noise into large z-scores; when every spread is 0 the z-scores are 0.
    """
    values = np.asarray(values, dtype=np.float64)
    median = np.median(values)
    spread = max(robust_spread(values), floor)
    if not spread > 1e-12:
        return np.zeros_like(values)
    return np.clip((values - median) / spread, -Z_CLIP, Z_CLIP)


def z_floor(column: str, values: np.ndarray) -> float:
    """Smallest spread that counts as variation: absolute for the geometric columns (normalised units /
    ratio),
    relative to the median's magnitude for spacing and learned statistics (whose scale we do not know)."""
    if column in ABSOLUTE_Z_FLOORS:
        return ABSOLUTE_Z_FLOORS[column]
    return RELATIVE_Z_FLOOR * abs(float(np.median(values)))
