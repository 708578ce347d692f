"""The focus-map plane fit (results.fit_focus_plane)."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_deepfocus import fit_focus_plane


def _map(rows=4, cols=4, z0=20.0, sx=0.02, sy=-0.015, patch=128, px=0.65):
    yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
    x = (xx - (cols - 1) / 2) * patch * px
    y = (yy - (rows - 1) / 2) * patch * px
    return z0 + sx * x + sy * y


def test_plane_fit_is_exact_and_skips_missing_patches():
    fm = _map()
    fm[1, 2] = fm[3, 0] = np.nan
    z0, sx, sy = fit_focus_plane(fm, 128, 0.65)
    assert (z0, sx, sy) == pytest.approx((20.0, 0.02, -0.015), abs=1e-9)


def test_consensus_start_resists_wild_patches_that_pull_least_squares():
    """Three of 13 patches far off the plane (per-patch estimates that failed): the plain
    fit is pulled off, the consensus start (``inlier_tol``) recovers the plane."""
    rng = np.random.default_rng(0)
    fm = _map() + rng.normal(0, 0.2, (4, 4))
    fm[0, 3], fm[2, 0], fm[0, 2] = fm[0, 3] - 11.0, fm[2, 0] - 9.0, fm[0, 2] - 7.0
    fm[1, 1] = fm[3, 3] = fm[2, 2] = np.nan
    plain = fit_focus_plane(fm, 128, 0.65)
    robust = fit_focus_plane(fm, 128, 0.65, inlier_tol=1.5)
    assert abs(plain[0] - 20.0) > 1.0, plain
    assert abs(robust[0] - 20.0) < 0.25, robust
    assert robust[1:] == pytest.approx((0.02, -0.015), abs=0.004)


def test_plane_fit_needs_three_patches():
    fm = np.full((4, 4), np.nan)
    fm[0, 0], fm[1, 1] = 1.0, 2.0
    with pytest.raises(ValueError, match="at least 3 informative patches to fit a plane, got 2"):
        fit_focus_plane(fm, 128, 0.65)
