"""What an autofocus run returns (and stores)."""

from __future__ import annotations

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
    """

    run_uid: str = ""
    strategy: str = "deepfocus"
    z_measured: tuple[float, ...] = ()
    blur_measured: tuple[float, ...] = ()
    focus_map: NDArray[np.float64] | None = field(default=None, compare=False)
    sigma_um: float = float("nan")

    def summary(self) -> AutofocusSummary:
        return AutofocusSummary.from_dict(self.as_dict())

    def __str__(self) -> str:
        mark = "converged" if self.converged else self.status
        return (
            f"Autofocus {mark}: z {self.start_z:.2f} -> {self.final_z:.2f} um "
            f"(dz {self.dz:+.2f} um, sd {self.sigma_um:.2f} um), {self.images_used} images, "
            f"confidence {self.confidence:.2f}. {self.reason}"
        )


def fit_focus_plane(
    focus_map: NDArray[np.float64], patch_size: int, pixel_size_um: float
) -> tuple[float, float, float]:
    """Robust least-squares plane ``z = z0 + sx * x + sy * y`` through a per-patch focus map.

    ``x, y`` in um from the map centre (x along columns); returns ``(z0, sx, sy)`` (slopes in
    um/um). Patches more than 3.5 MADs off the plane are dropped and the plane refitted.
    """
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
    return float(coef[0]), float(coef[1]), float(coef[2])
