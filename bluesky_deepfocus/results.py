"""What an autofocus run returns (and stores)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .schema import AutofocusSummary

__all__ = ["AutofocusResult", "fit_focus_plane"]


@dataclass(frozen=True)
class AutofocusResult(AutofocusSummary):
    """:class:`~.schema.AutofocusSummary` plus what only the live caller needs.

    Attributes
    ----------
    run_uid
        Uid of the run holding the documents (empty for a stub inside another run
        before the host run closes; then it is the host run's uid).
    strategy
        Search strategy used (``"deepfocus"``, ``"paper"``, ``"brent"``).
    z_measured, blur_measured
        Every stage position imaged and its ROI blur score, in order.
    focus_map
        Per-patch absolute focus positions (um), NaN where a patch held no information.
    sigma_um
        Posterior spread of the estimate (um).
    detail_z
        Where the whole frame -- its detail -- is in focus (absolute um; NaN when nothing
        was estimated). The estimate itself unless ``DeepFocusSettings(focus_at="centre")``
        moved it to the centre of a tilted field.
    """

    run_uid: str = ""
    strategy: str = "deepfocus"
    z_measured: tuple[float, ...] = ()
    blur_measured: tuple[float, ...] = ()
    focus_map: NDArray[np.float64] | None = field(default=None, compare=False)
    sigma_um: float = float("nan")
    detail_z: float = float("nan")

    def summary(self) -> AutofocusSummary:
        return AutofocusSummary.from_dict(self.as_dict())

    def __str__(self) -> str:
        mark = "converged" if self.converged else self.status
        if mark == "sharpest":
            mark = "not converged, at the sharpest image taken"
        return (
            f"Autofocus {mark}: z {self.start_z:.2f} -> {self.final_z:.2f} um "
            f"(dz {self.dz:+.2f} um, sd {self.sigma_um:.2f} um), {self.images_used} images, "
            f"confidence {self.confidence:.2f}. {self.reason}"
        )


def fit_focus_plane(
    focus_map: NDArray[np.float64],
    patch_size: int,
    pixel_size_um: float,
    *,
    inlier_tol: float | None = None,
) -> tuple[float, float, float]:
    """Robust least-squares plane ``z = z0 + sx * x + sy * y`` through a per-patch focus map.

    ``x, y`` in um from the map centre (x along columns); returns ``(z0, sx, sy)`` (slopes in
    um/um). Patches more than 3.5 MADs off the plane are dropped and the plane refitted.
    With ``inlier_tol`` (um) the fit starts from the plane through three patches that the
    most patches lie within ``inlier_tol`` of (every triple; a consensus start that a few
    wild patches cannot pull, where a least-squares start can be pulled too far for the
    MAD rule to recover).
    """
    coef, _keep, _x, _y, _z = _fit_plane(focus_map, patch_size, pixel_size_um, inlier_tol)
    return float(coef[0]), float(coef[1]), float(coef[2])


def _fit_plane(
    focus_map: NDArray[np.float64],
    patch_size: int,
    pixel_size_um: float,
    inlier_tol: float | None,
) -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray]:
    """:func:`fit_focus_plane`'s fit: ``(coef, keep, x, y, z)`` over the finite patches."""
    fm = np.asarray(focus_map, dtype=float)
    rows, cols = fm.shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
    yy = (yy - (rows - 1) / 2) * patch_size * pixel_size_um
    xx = (xx - (cols - 1) / 2) * patch_size * pixel_size_um
    ok = np.isfinite(fm)
    if ok.sum() < 3:
        raise ValueError(
            f"Need at least 3 informative patches to fit a plane, got {int(ok.sum())}."
        )
    x, y, z = xx[ok], yy[ok], fm[ok]
    keep = np.ones(len(z), bool)
    if inlier_tol is not None and len(z) > 3:
        keep = _consensus(x, y, z, float(inlier_tol))
    coef = np.zeros(3)
    for _ in range(4):  # robust: drop patches far off the plane (3.5 x the MAD), refit
        A = np.column_stack([np.ones(keep.sum()), x[keep], y[keep]])
        coef, *_ = np.linalg.lstsq(A, z[keep], rcond=None)
        r = z - (coef[0] + coef[1] * x + coef[2] * y)
        mad = 1.4826 * float(np.median(np.abs(r[keep] - np.median(r[keep]))))
        new_keep = np.abs(r) <= max(3.5 * mad, 1e-6)
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return coef, keep, x, y, z


def _consensus(x: NDArray, y: NDArray, z: NDArray, tol: float) -> NDArray:
    """The patches within ``tol`` of the plane through three patches that the most patches
    lie within ``tol`` of (ties: the smallest summed distance), over every triple (a fixed
    sample of 4000 for large maps)."""
    n = len(z)
    tri = np.array(list(itertools.combinations(range(n), 3)))
    if len(tri) > 4000:
        tri = tri[np.random.default_rng(0).choice(len(tri), 4000, replace=False)]
    A = np.stack([np.ones(tri.shape), x[tri], y[tri]], axis=-1)  # (T, 3, 3)
    det = np.linalg.det(A)
    scale = max(float(np.ptp(x)) * float(np.ptp(y)), 1e-12)
    tri, A = tri[np.abs(det) > 1e-6 * scale], A[np.abs(det) > 1e-6 * scale]
    if len(tri) == 0:
        return np.ones(n, bool)
    coef = np.linalg.solve(A, z[tri][..., None])[..., 0]  # (T, 3)
    r = np.abs(z[None, :] - (coef[:, :1] + coef[:, 1:2] * x[None, :] + coef[:, 2:] * y[None, :]))
    inl = r <= tol
    count = inl.sum(axis=1)
    spread = np.where(inl, r, 0.0).sum(axis=1)
    best = int(np.lexsort((spread, -count))[0])
    return inl[best]
