"""The registration's early stop: ICP alone for a scan near the template's pose, the global step otherwise."""

from __future__ import annotations

import numpy as np

from detector.grouping import estimate_scale
from detector.registration import COORD_VOXEL_SHARE, RegistrationTarget, align
from scans.geometry import voxel_downsample
from tests.test_registration import turned
from tests.tiny import part_scans


def test_near_pose_stops_after_icp_and_a_far_pose_falls_back_to_the_global_step():
    first, second = part_scans(2, 3000, seed=11)
    scale = estimate_scale([first])
    target = RegistrationTarget(first[voxel_downsample(first, COORD_VOXEL_SHARE * scale)], scale)
    near = align(turned(second, 3.0), target, scale)
    far = align(turned(second, 120.0, axis=(1.0, 0.2, 0.0)), target, scale)
    assert near.method == "icp" and near.fitness > 0.9
    # ICP from the scan's pose cannot undo 120 degrees: the early stop must not accept that pose
    assert far.method == "global" and far.fitness > 0.9
    # both land on the template as closely (a symmetric part may land on a symmetric pose, also right)
    assert np.median(far.template_distance) < 2 * np.median(near.template_distance)
