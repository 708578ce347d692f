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
    """Least-squares plane ``z = z0 + sx * x + sy * y`` through a per-patch focus map.

    ``x, y`` in um from the map centre; returns ``(z0, sx, sy)`` (slopes in um/um).
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
    A = np.column_stack([np.ones(ok.sum()), xx[ok], yy[ok]])
    coef, *_ = np.linalg.lstsq(A, fm[ok], rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])
