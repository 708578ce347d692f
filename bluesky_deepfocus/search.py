"""Where autofocus decides the next z: pure ask/tell search strategies (no hardware).

Every strategy is driven the same way::

    search = DeepFocusSearch(calibration, start=z0, lo=..., hi=...)
    while (z := search.ask()) is not None:
        search.tell(measure(z))        # an Observation at z
    result = search.result()

and never proposes a position outside ``[lo, hi]`` (the plan passes the stage limits
intersected with ``start +/- max_travel``) nor more than ``max_images`` positions.

Strategies
----------
:class:`PaperSearch`
    The DeepFocus paper (Shajkofci & Liebling, ICIP 2020, Sec. 2.2): images at z1 and
    z1 -/+ 2 FWHM of the calibration curve, golden-section steps until the (z, b) triplet
    is convex (a quadratic with a minimum inside the bracket fits better than a line),
    then the shift minimizing ``sum_i (b_i - b_calib(z_i - dz))^2`` for every patch of
    the blur map, averaged over the ROI. Raw CNN scores are matched to a curve measured
    on another specimen, so a specimen that scores differently (smooth nuclei in focus
    look "blurrier" than texture) shifts the answer.
:class:`DeepFocusSearch` (ours)
    A posterior over the focus position from *relative* information, in which the
    specimen cancels: the frames' radially binned ``log(P - N)`` spectra are matched to
    the calibration's with a free constant per spatial frequency (the specimen's own
    spectrum) and per frame (exposure), and the CNN scores with a free offset (the
    specimen's own raw score level), and the order of the frames' gradient sharpness (the
    sharper of two frames is the nearer to focus, whatever the specimen). Images are
    placed where they inform most: a first step sized by the single-image estimate, then
    pairs straddling the current estimate at ~0.7 DOF (where the transfer function changes
    fastest with z, and where a symmetric pair cancels the specimen exactly), stopping as
    soon as the posterior spread is below the tolerance with images on both sides of the
    estimate. Frames the calibration cannot explain, or an estimate their sharpness order
    contradicts, are never called converged.
:class:`BrentSearch`
    Bounded Brent minimization of a classic focus function (the paper's baseline).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from .calibration import Calibration
from .spectral import EDGES, Spectrum

__all__ = [
    "BrentSearch",
    "DeepFocusSearch",
    "FieldPlane",
    "Observation",
    "PaperSearch",
    "Search",
    "SearchResult",
    "field_plane",
    "make_search",
    "pool_field_tilts",
]

GOLDEN = (3 - math.sqrt(5)) / 2  # 0.381966


@dataclass
class Observation:
    """What one image at stage position ``z`` told us.

    Attributes
    ----------
    z
        Stage position (um).
    blur
        ROI score of the DeepFocus CNN (ln blur radius; NaN when uninformative), or of
        whatever focus function a strategy uses (``sharpness`` for Brent).
    blur_map, confidence
        Per-patch CNN scores and confidences (optional).
    spectrum
        ROI power spectrum (:func:`.spectral.frame_spectrum`), optional.
    patch_spectra
        Per-patch spectra on the same grid as ``blur_map`` (optional; for focus maps).
    sharpness
        A classic focus value (higher is sharper); used by :class:`BrentSearch`.
    gradient_sharpness
        :func:`.metrics.gradient_sharpness` of the frame: what the plans compare to
        check that the final position is not less sharp than the start.
    sharpness_floor
        The camera noise's share of it, :func:`.metrics.gradient_sharpness_floor`
        (NaN when unknown): what a frame with no detail left would show.
    """

    z: float
    blur: float = float("nan")
    blur_map: NDArray[np.float64] | None = None
    confidence: NDArray[np.float64] | None = None
    spectrum: Spectrum | None = None
    patch_spectra: list[list[Spectrum]] | None = None
    sharpness: float = float("nan")
    gradient_sharpness: float = float("nan")
    sharpness_floor: float = float("nan")


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a search.

    ``z_focus`` is the absolute estimated focus, ``dz = z_focus - start``; ``sigma_um``
    the posterior spread; ``focus_map`` the per-patch focus positions (absolute, NaN
    where a patch holds no information) when maps were given.
    """

    z_focus: float
    dz: float
    sigma_um: float
    residual: float
    confidence: float
    converged: bool
    reason: str
    images: int
    focus_map: NDArray[np.float64] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Search(ABC):
    """Base class: bounds, image budget and the observations told so far."""

    name = "search"

    def __init__(
        self, *, start: float, lo: float, hi: float, min_images: int = 3, max_images: int = 8
    ) -> None:
        if not (np.isfinite(start) and np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"start/lo/hi must be finite, got {start!r}, {lo!r}, {hi!r}.")
        if not lo <= start <= hi:
            raise ValueError(f"start {start!r} is outside the search bounds [{lo!r}, {hi!r}].")
        if not 1 <= min_images <= max_images:
            raise ValueError(
                f"Need 1 <= min_images <= max_images, got min_images={min_images!r}, "
                f"max_images={max_images!r}."
            )
        self.start, self.lo, self.hi = float(start), float(lo), float(hi)
        self.min_images, self.max_images = int(min_images), int(max_images)
        self.observations: list[Observation] = []
        self._pending: float | None = None

    def clip(self, z: float) -> float:
        return float(min(self.hi, max(self.lo, z)))

    @property
    def n(self) -> int:
        return len(self.observations)

    def ask(self) -> float | None:
        """Next stage position to image, or None when done (never outside [lo, hi])."""
        if self._pending is not None:
            return self._pending
        if self.n >= self.max_images:
            return None
        z = self._propose()
        if z is None:
            return None
        z = self.clip(z)
        self._pending = z
        return z

    def tell(self, obs: Observation) -> None:
        """Record the observation of the position last asked (or any position)."""
        self._pending = None
        self.observations.append(obs)
        self._update(obs)

    @property
    def done(self) -> bool:
        return self.ask() is None

    @abstractmethod
    def _propose(self) -> float | None: ...

    def _update(self, obs: Observation) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    def result(self) -> SearchResult: ...

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "min_images": self.min_images,
            "max_images": self.max_images,
            "lo": self.lo,
            "hi": self.hi,
        }


class _GeneratorSearch(Search):
    """Ask/tell over a generator ``algorithm()`` that yields positions and receives values."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._gen: Generator[float, float, None] | None = None
        self._next: float | None = None
        self._finished = False

    @abstractmethod
    def _value(self, obs: Observation) -> float: ...

    @abstractmethod
    def algorithm(self) -> Generator[float, float, None]: ...

    def _propose(self) -> float | None:
        if self._finished:
            return None
        if self._gen is None:
            self._gen = self.algorithm()
            try:
                self._next = next(self._gen)
            except StopIteration:
                self._finished = True
                return None
        return self._next

    def _update(self, obs: Observation) -> None:
        if self._gen is None:
            self._gen = self.algorithm()
            next(self._gen)
        try:
            self._next = self._gen.send(self._value(obs))
        except StopIteration:
            self._finished = True
            self._next = None


# ======================================================================================
# Classic baseline: bounded Brent
# ======================================================================================
class BrentSearch(_GeneratorSearch):
    """Bounded Brent minimization of ``-sharpness`` (Brent 1973; as scipy's ``fminbound``).

    Stops when the bracket is below ``xtol`` (um) and ``min_images`` are used, or at
    ``max_images``; the result is the best position imaged.
    """

    name = "brent"

    def __init__(
        self,
        *,
        start: float,
        lo: float,
        hi: float,
        xtol: float = 0.1,
        min_images: int = 3,
        max_images: int = 20,
    ) -> None:
        super().__init__(start=start, lo=lo, hi=hi, min_images=min_images, max_images=max_images)
        self.xtol = float(xtol)

    def _value(self, obs: Observation) -> float:
        return -obs.sharpness if np.isfinite(obs.sharpness) else float("inf")

    def algorithm(self) -> Generator[float, float, None]:
        a, b = self.lo, self.hi
        x = w = v = a + GOLDEN * (b - a)
        fx = yield x
        fw = fv = fx
        d = e = 0.0
        while True:
            m = 0.5 * (a + b)
            tol1 = 1e-9 * abs(x) + self.xtol / 3
            tol2 = 2 * tol1
            if abs(x - m) <= tol2 - 0.5 * (b - a) and self.n >= self.min_images:
                return
            use_golden = True
            if abs(e) > tol1:
                r = (x - w) * (fx - fv)
                q = (x - v) * (fx - fw)
                p = (x - v) * q - (x - w) * r
                q = 2 * (q - r)
                if q > 0:
                    p = -p
                q = abs(q)
                if abs(p) < abs(0.5 * q * e) and q * (a - x) < p < q * (b - x):
                    e, d = d, p / q
                    u = x + d
                    if (u - a) < tol2 or (b - u) < tol2:
                        d = tol1 if x < m else -tol1
                    use_golden = False
            if use_golden:
                e = (b - x) if x < m else (a - x)
                d = GOLDEN * e
            u = x + (d if abs(d) >= tol1 else (tol1 if d > 0 else -tol1))
            fu = yield u
            if fu <= fx:
                if u >= x:
                    a = x
                else:
                    b = x
                v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
            else:
                if u < x:
                    a = u
                else:
                    b = u
                if fu <= fw or w == x:
                    v, fv, w, fw = w, fw, u, fu
                elif fu <= fv or v in (x, w):
                    v, fv = u, fu

    def result(self) -> SearchResult:
        vals = [
            (-o.sharpness if np.isfinite(o.sharpness) else np.inf, o.z) for o in self.observations
        ]
        if not vals or not np.isfinite(min(vals)[0]):
            return SearchResult(
                self.start,
                0.0,
                float("nan"),
                float("nan"),
                0.0,
                False,
                "no image held focus information",
                self.n,
            )
        best = min(vals)[1]
        zs = sorted(o.z for o in self.observations)
        spread = float(np.min(np.abs(np.diff(zs)))) if len(zs) > 1 else float("nan")
        converged = self._finished
        return SearchResult(
            z_focus=best,
            dz=best - self.start,
            sigma_um=spread,
            residual=float("nan"),
            confidence=1.0 if converged else 0.5,
            converged=converged,
            reason="bracket below xtol" if converged else f"image budget ({self.max_images}) used",
            images=self.n,
        )


# ======================================================================================
# Shared: matching CNN scores against the calibration curve
# ======================================================================================
def _match_raw(cal: Calibration, z: NDArray, b: NDArray, grid: NDArray) -> tuple[float, float]:
    """argmin_f sum_i (b_i - b_calib(z_i - f))^2 on a grid + parabolic refinement."""
    lo_c, hi_c = cal.z_range
    ok = np.isfinite(b)
    if ok.sum() == 0:
        return float("nan"), float("nan")
    zz, bb = z[ok], b[ok]
    d = np.clip(zz[None, :] - grid[:, None], lo_c, hi_c)
    pred = cal.b_calib(d.ravel(), clamp=True).reshape(d.shape)
    sse = np.nansum((bb[None, :] - pred) ** 2, axis=1)
    i = int(np.argmin(sse))
    f = float(grid[i])
    if 0 < i < len(grid) - 1:
        y0, y1, y2 = sse[i - 1], sse[i], sse[i + 1]
        den = y0 - 2 * y1 + y2
        if den > 0:
            f += 0.5 * (y0 - y2) / den * float(grid[1] - grid[0])
    return f, float(math.sqrt(sse[i] / max(1, ok.sum())))


def _quad_beats_linear(z: NDArray, b: NDArray) -> bool:
    """Paper step 2, made meaningful: a convex quadratic with its vertex inside the
    bracket explains (z, b) better than a line (adjusted R^2 when n >= 4)."""
    ok = np.isfinite(b) & np.isfinite(z)
    z, b = z[ok], b[ok]
    if len(np.unique(z)) < 3:  # a parabola needs three distinct positions
        return False
    ss = float(((b - b.mean()) ** 2).sum()) or 1e-12
    with warnings.catch_warnings():  # nearly coincident positions: the fit says so itself
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            qa = np.polyfit(z, b, 2)
            la = np.polyfit(z, b, 1)
        except (np.linalg.LinAlgError, ValueError):  # degenerate (e.g. all z = 0)
            return False
    r2q = 1 - float(((b - np.polyval(qa, z)) ** 2).sum()) / ss
    r2l = 1 - float(((b - np.polyval(la, z)) ** 2).sum()) / ss
    n = len(z)
    if n >= 4:
        r2q = 1 - (1 - r2q) * (n - 1) / (n - 3)
        r2l = 1 - (1 - r2l) * (n - 1) / (n - 2)
    vertex = -qa[1] / (2 * qa[0]) if qa[0] != 0 else np.inf
    return bool(qa[0] > 0 and z.min() <= vertex <= z.max() and r2q > r2l)


class PaperSearch(Search):
    """The DeepFocus paper's algorithm (see module docstring); ``min_images == max_images``
    reproduces the fixed-budget comparison of its Fig. 4."""

    name = "paper"

    def __init__(
        self,
        calibration: Calibration,
        *,
        start: float,
        lo: float,
        hi: float,
        min_images: int = 3,
        max_images: int = 8,
    ) -> None:
        super().__init__(start=start, lo=lo, hi=hi, min_images=min_images, max_images=max_images)
        self.cal = calibration
        self.step = 2 * calibration.fwhm_um
        self._matched = False

    def _arrays(self) -> tuple[NDArray, NDArray]:
        z = np.array([o.z for o in self.observations])
        b = np.array([o.blur for o in self.observations])
        return z, b

    def _propose(self) -> float | None:
        n = self.n
        if n == 0:
            return self.start
        if n == 1:
            return self.start - self.step
        if n == 2:
            return self.start + self.step
        z, b = self._arrays()
        if _quad_beats_linear(z, b) and n >= self.min_images:
            return None
        ok = np.isfinite(b)
        if ok.sum() < 2:
            return None
        order = np.argsort(z[ok])
        zs, bs = z[ok][order], b[ok][order]
        i = int(np.argmin(bs))
        if i == 0:  # minimum at the low end: expand the bracket downwards (golden ratio)
            return zs[0] - (1 + GOLDEN) * (zs[1] - zs[0])
        if i == len(zs) - 1:
            return zs[-1] + (1 + GOLDEN) * (zs[-1] - zs[-2])
        # golden-section step inside the bracket around the minimum
        left, right = zs[i] - zs[i - 1], zs[i + 1] - zs[i]
        if right > left:
            return zs[i] + GOLDEN * right
        return zs[i] - GOLDEN * left

    def _grid(self) -> NDArray:
        step = max(self.cal.dof_um / 40, 0.02)
        lo_c, hi_c = self.cal.z_range
        zs = [o.z for o in self.observations]
        lo = max(self.lo, min(zs) - hi_c)
        hi = min(self.hi, max(zs) - lo_c)
        return np.arange(lo, hi + step / 2, step) if hi > lo else np.array([self.start])

    def result(self) -> SearchResult:
        z, b = self._arrays()
        if np.sum(np.isfinite(b)) == 0:
            return SearchResult(
                self.start,
                0.0,
                float("nan"),
                float("nan"),
                0.0,
                False,
                "no image held focus information",
                self.n,
            )
        grid = self._grid()
        f, rms = _match_raw(self.cal, z, b, grid)
        f = float(np.clip(f, self.lo, self.hi))
        fmap = None
        maps = [o.blur_map for o in self.observations]
        if all(m is not None for m in maps) and maps:
            stack = np.stack([np.asarray(m, dtype=float) for m in maps])  # (n, rows, cols)
            fmap = np.full(stack.shape[1:], np.nan)
            for idx in np.ndindex(*stack.shape[1:]):
                bi = stack[(slice(None), *idx)]
                if np.sum(np.isfinite(bi)) >= 2:
                    fmap[idx] = _match_raw(self.cal, z, bi, grid)[0]
            if np.any(np.isfinite(fmap)):
                f = float(np.clip(np.nanmean(fmap), self.lo, self.hi))  # averaged over the ROI
        convex = _quad_beats_linear(z, b)
        return SearchResult(
            z_focus=f,
            dz=f - self.start,
            sigma_um=float("nan"),
            residual=rms,
            confidence=1.0 if convex else 0.5,
            converged=convex,
            reason="convex triplet matched to calibration"
            if convex
            else "matched without a convex bracket",
            images=self.n,
            focus_map=fmap,
        )


# ======================================================================================
# Ours: posterior from specimen-cancelling spectra + CNN scores with a free offset
# ======================================================================================
# a per-patch focus map's plane is fitted from the consensus of the patches within this
# many DOF of it (fit_focus_plane's inlier_tol): the field-centre focus, the tilt benchmark
PLANE_INLIER_DOF = 0.2


# the normal distribution's two-sided 95 % quantile (what a Student t quantile widens)
_Z975 = float(stats.norm.ppf(0.975))

# fewer informative spectral bins than this at the estimate: the spectra hold no detail
# there (a blank field, or one whose only structure is light from beyond its edge)
MIN_SPECTRAL_DOF = 4

# the camera noise's share of a frame's gradient energy is known to a few per cent: a frame
# whose gradient energy stands less than this fraction above it shows no detail
FLOOR_REL = 0.05


@dataclass(frozen=True)
class DeepFocusSettings:
    """Tuning of :class:`DeepFocusSearch` (recorded in the run's metadata)."""

    tol_dof: float = 0.03  # stop when the posterior sd is below this (DOF)
    converged_dof: float = 0.1  # call it converged below this (DOF)
    straddle_dof: float = 0.7  # refinement images at estimate +/- this (DOF)
    first_step_min_dof: float = 1.0
    # the second image of a cold start steps toward the side that the first image's
    # estimate picks -- a guess: one image cannot tell the side of focus -- by at most
    # this (DOF). A wrong guess then lands the second image this much farther out
    # instead of twice the distance, where the spectra of sparse and smooth specimens put
    # the focus too near the images (measured over 3 draws of 50 trials: 20x 0.098 ->
    # 0.066 DOF, 10x +/-150 um 5.12 -> 2.75 um; inf = step the whole estimated distance).
    # It caps the step of a first image that told nothing too (explore_dof, toward the
    # roomier side): measured, uncapping that made 10x +/-150 um with 3 images worse
    first_step_max_dof: float = 2.0
    cnn_sigma: float = 0.25  # sd of one image's ROI score about its specimen curve (ln r)
    cnn_offset_sigma: float = 0.35  # prior sd of the specimen's raw score offset (ln r)
    spec_model_sigma: float = 0.15  # model floor of a spectral bin (log power)
    exposure_sigma: float = 0.2  # prior sd of per-image brightness changes (log power)
    spec_curvature: float = 20.0  # the specimen/calibration spectrum ratio is smooth...
    spec_slope: float = 1.0  # ...and not steep (two specimens' power laws differ mildly)
    grid_dof: float = 0.02  # posterior grid step (DOF)
    use_spectra: bool = True
    use_cnn: bool = True
    verify: bool = True  # end with an image at the estimate when the budget allows
    explore_dof: float = 4.0  # step of the search pattern while no image holds information
    prior_floor: float = 0.05  # weight of the flat component of a warm-start prior
    # the specimen's own curve: a frame's gradient sharpness falls monotonically and
    # symmetrically with |z - focus| for every specimen, so of two frames the sharper one is
    # the nearer to focus (a constraint in which the specimen cancels; see _order_cost)
    use_sharpness_order: bool = True
    order_sigma: float = 0.02  # sd of a gradient-sharpness difference (log units)
    order_cap: float = 1000.0  # largest cost (chi^2 units) one contradicted pair adds
    order_tol_dof: float = 0.2  # slack past a pair's midpoint before the full cost (DOF)
    # when obeying the order costs the spectra and the CNN more than this (chi^2 units) at
    # the estimate, they misdescribe the specimen: not converged on them
    order_conflict: float = 9.0
    bracket_dof: float = 1.5  # before stopping, image both sides of the estimate within this
    # frames whose spectra fit the calibration this badly (reduced chi^2 at the estimate) are
    # not explained by it (content entering from beyond the field, a specimen unlike any
    # the table can describe): never called converged on them
    misfit_chi2: float = 6.0
    # the specimen's own sharpness curve: gradient sharpness (less the camera noise's
    # share) is symmetric about focus for every specimen, ~ A - B log(1 + ((z - f) / w)^2)
    # with A, B >= 0 and the width w free (0.1-2 DOF): with >= 4 frames its fit locates f
    # whatever the specimen (sd of the model about a frame, log units; 0 = off; off too
    # with use_sharpness_order=False, which turns off every use of the frames' sharpness)
    sharpness_fit_sigma: float = 0.05
    # straddle ties: image the side of the sharpest image (else opposite the last one)
    tie_to_sharper: bool = True
    # where to focus a tilted field: "detail" -- where the image's detail is (the whole
    # frame's estimate); "centre" -- the field centre, the value at the centre of the plane
    # fitted to the per-patch focus map, when that plane tilts by >= centre_tilt_dof DOF
    # across the field (tiles of a scan are placed by their centres)
    focus_at: str = "detail"
    centre_tilt_dof: float = 0.3
    centre_sd_dof: float = 0.04  # largest standard error of the plane's centre value (DOF)
    # never converged unless some frame's gradient energy stands at least this share above
    # its camera-noise floor (an image that saw detail; frames of a field still far out of
    # focus hold a few low-frequency spectral bins that can mimic a focus: at 40x, 30-50 um
    # out, such frames stood 10-12 % above it and converged 30-50 um off)
    min_detail_share: float = 0.3
    # a focus is a peak: the sharpest image within peak_near_dof of the estimate must be
    # sharper, by peak_min_drop (log gradient energy; 2 x order_sigma, the measurement's
    # noise), than every image >= peak_far_dof from it, else not converged. Frames 30 DOF
    # out all look alike: at 40x seven frames within 0.8 DOF of their estimate differed by
    # <= 0.04 (the one at it by -0.009) and converged 45.6 um off. At a real focus the
    # smallest drop measured was 0.081 (a real cell micrograph at 10x, images 0.7 DOF
    # away); every synthetic family >= 0.5 at 10x, >= 0.56 at 40x. 0 disables the check.
    peak_min_drop: float = 0.04
    peak_near_dof: float = 0.25
    peak_far_dof: float = 0.5
    coarse_candidates: int = 400  # of the coarse posterior grid over the whole range
    # the spectra of frames all on one side of focus do not cancel a specimen unlike the
    # calibration object (an object at the frame edge): they put the focus short of the
    # truth, inside the sharpest frame, with a tight sd. While the sharpest frame is the
    # outermost one and the estimate lies within a straddle step of it, image a straddle
    # step beyond it instead of refining inside: the sharpness order then tests the
    # other side (this takes the place of the verify image when it is the last one; a
    # posterior already below tol_dof stops or verifies first, as before)
    probe_beyond_sharpest: bool = True
    # how far beyond the sharpest image that probe goes: a straddle step, or the distance
    # from the sharpest image to the nearest (less sharp) image when that is longer but at
    # most this (DOF): the step that made the sharpness rise, repeated. On a specimen the
    # spectra place short the search otherwise crawls toward the focus a straddle step
    # (0.7 DOF) per image and runs out of images with the sharpness still rising (40x,
    # smooth and sparse fields started 2-5 DOF out, refused); an image that far beyond is
    # either less sharp (the focus bracketed within half that step) or sharper. After a
    # longer jump (an exploration step, an estimate far off) a straddle step, as before
    # (measured at 20x: a 2-DOF probe after a 3-DOF jump left a smooth field refused on a
    # marginal spectral fit). After such a short step the probe is also taken while the
    # estimate lies within half that step (plus the order's slack, order_tol_dof / 2) of
    # the sharpest image, either side, rather than only within a straddle step: inside,
    # the sharpness order pins at the pair's midpoint an estimate the spectra put
    # farther inside (40x, a sparse-nuclei field 4.93 um out: estimate 1.59 um, the
    # midpoint 1.54 um, the sharper image at 3.07 um); outside, an estimate just beyond
    # the sharper image is still short on such specimens (40x, a sparse-nuclei field
    # 7.35 um out, images at 0 and 3.07 um, estimate 4.20 +/- 0.70 um: refused before,
    # converged 0.11 um off). 0 = always a straddle step, and only within a straddle
    # step of the estimate. The capped first step (first_step_max_dof) is exactly this
    # long
    probe_gap_max_dof: float = 2.0
    # in a conflict (order_conflict), the frames' own sharpness curve overrules the
    # spectra and the CNN when it alone locates the focus (sd <= converged_dof, its
    # posterior wholly inside the window around the estimate) and images lie within
    # bracket_dof of its mode on both sides, wherever the combined estimate sits, as
    # long as the spectra hold detail there (MIN_SPECTRAL_DOF bins: a blank field whose
    # only structure is light from beyond its edge has a sharpness peak of its own, at
    # 10x one 43 um from the slide's focus); without images around it, only when the
    # estimate is already within 2 sd of it. A specimen the spectra misdescribe pulls the
    # combined estimate between the two (a smooth field at 10x: spectra 6 um short,
    # sharpness fit and CNN within 0.2 um of the truth, images 2 um and 5 um either side
    # of it) and was refused
    overrule_when_bracketed: bool = True
    # the frames' own sharpness still rises at the outermost image: when the sharpest
    # image is the outermost one and the symmetric sharpness curve (>= 4 frames) peaks
    # beyond it by more than this (DOF) and 2 of its sd, the next image goes to that
    # peak, and the estimate is not called converged. The spectra of a smooth specimen
    # with every image on one side can put the focus at the sharpest image with a tight
    # sd: at 10x such a field converged 11.1 um short (0 = off)
    rising_beyond_dof: float = 0.2

    def __post_init__(self) -> None:
        if self.focus_at not in ("detail", "centre"):
            raise ValueError(
                f"focus_at={self.focus_at!r}: use 'detail' (where the image's detail is) or "
                "'centre' (the field centre, from the focus map's plane)."
            )


class DeepFocusSearch(Search):
    """Our search (see module docstring). ``prior=(z, sd)`` warm-starts it (timelapse).

    The prior only weights the posterior: it is a mixture of ``N(z, sd^2)`` (weight
    ``1 - prior_floor``) and a flat density over all candidates (weight ``prior_floor``),
    so that images contradicting it (a focus jump, drift faster than assumed) win instead
    of being overruled by it; the candidates always cover the whole reachable range.
    A ``sd`` below the posterior grid step (``grid_dof`` DOF) is treated as that step.
    While the images agree with the prior it also places the second image (the side of
    focus that one image cannot tell); once they contradict it (the posterior weight of
    its Gaussian component drops below 1/2) images are placed as in a cold start, and a
    single image is never called converged.
    """

    name = "deepfocus"

    def __init__(
        self,
        calibration: Calibration,
        *,
        start: float,
        lo: float,
        hi: float,
        min_images: int = 2,
        max_images: int = 8,
        settings: DeepFocusSettings | None = None,
        prior: tuple[float, float] | None = None,
        field_tilt: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__(start=start, lo=lo, hi=hi, min_images=min_images, max_images=max_images)
        self.cal = calibration
        self.s = settings or DeepFocusSettings()
        self.prior = _check_prior(prior)
        # the slide's tilt (um across the field, image axes) known from earlier fields:
        # a prior on the slopes of the plane that places focus_at="centre" (_field_centre)
        self.field_tilt = _check_field_tilt(field_tilt)
        if not 0.0 <= self.s.prior_floor < 1.0:
            raise ValueError(
                f"settings.prior_floor={self.s.prior_floor!r} must be in [0, 1) (default 0.05)."
            )
        self.dof = calibration.dof_um
        lo_c, hi_c = calibration.z_range
        step = max(self.s.grid_dof * self.dof, 0.01)
        # focus candidates: the reachable range plus what the images can still see beyond
        # it (the calibration's range), so that a focus out of reach shows up as such
        # instead of as a confident wrong answer inside the bounds. A prior never narrows
        # them: it only weights the posterior (_prior_parts), so images can overrule it.
        glo, ghi = self.lo - max(hi_c, 0.0), self.hi + max(-lo_c, 0.0)
        # a coarse grid (<= coarse_candidates) locates the basin; _refined() zooms in
        self.grid = _grid(glo, ghi, max(step, (ghi - glo) / self.s.coarse_candidates))
        # posteriors of the current observations (cleared by tell): ask() and result()
        # evaluate the same ones several times
        self._memo: dict[Any, Any] = {}
        # the table's rows of one frame on the coarse grid (every update re-reads them)
        self._rows: dict[float, tuple[NDArray, NDArray, NDArray]] = {}
        self._verified = False

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            **self.s.__dict__,
            "prior": self.prior,
            "field_tilt": self.field_tilt,
        }

    # ------------------------------------------------------------------ likelihood
    def _cnn_cost(self, zs: NDArray, bs: NDArray, grid: NDArray) -> NDArray:
        return self._cnn_cost_rows(zs, np.asarray(bs, dtype=float)[None], grid)[0]

    def _spec_cost(
        self, zs: NDArray, specs: list[Spectrum | None], grid: NDArray
    ) -> tuple[NDArray, NDArray]:
        """Chi^2 of the frames' spectra against the calibration table, and its dof.

        For a focus candidate f the table predicts ``log(P - N)`` of frame i at bin k up to
        ``c_k + d_i``: the specimen-to-calibration spectrum ratio (a smooth function of
        log frequency) and the frame's exposure. Entries where frame and table both detect
        signal are fitted; where only one side detects, the other side's detection limit
        is a bound (a frame showing detail the table says is blurred away at that
        defocus, or the reverse, is penalized). Both nuisances are solved in closed form
        (a few active-set iterations), vectorized over candidates.
        """
        use = [i for i, s in enumerate(specs) if s is not None]
        if not self.s.use_spectra or len(use) < 2:
            return np.zeros(len(grid)), np.zeros(len(grid))
        L, W, Lub, present = _spectra_arrays([specs[i] for i in use])  # type: ignore[misc]
        T, WT, Tub = self._table(zs[use], grid)
        return self._spec_chi2(L[None], W[None], Lub[None], present[None], T, WT, Tub)

    def _table(self, z: NDArray, grid: NDArray) -> tuple[NDArray, NDArray, NDArray]:
        """The calibration's transfer table at frames ``z`` for candidates ``grid``:
        ``(F, N, K)`` arrays ``T, WT, Tub``."""
        F, N = len(grid), len(z)
        if grid is not self.grid:
            T, WT, Tub = self.cal.transfer_table((z[None, :] - grid[:, None]).ravel())
            return T.reshape(F, N, -1), WT.reshape(F, N, -1), Tub.reshape(F, N, -1)
        # the coarse grid: each frame's rows are computed once (row i depends on z_i only)
        new = [float(v) for v in z if float(v) not in self._rows]
        if new:
            d = (np.array(new)[None, :] - grid[:, None]).ravel()
            T, WT, Tub = (a.reshape(F, len(new), -1) for a in self.cal.transfer_table(d))
            for j, v in enumerate(new):
                self._rows[v] = (T[:, j], WT[:, j], Tub[:, j])
        rows = [self._rows[float(v)] for v in z]
        T, WT, Tub = (np.stack(part, axis=1) for part in zip(*rows, strict=True))
        return T, WT, Tub

    def _spec_chi2(
        self,
        L: NDArray,
        W: NDArray,
        Lub: NDArray,
        present: NDArray,
        T: NDArray,
        WT: NDArray,
        Tub: NDArray,
    ) -> tuple[NDArray, NDArray]:
        """Chi^2 and its dof per row of ``T`` (see :meth:`_spec_cost`): the frames' arrays
        ``L, W, Lub, present`` are ``(1, N, K)`` (one set of frames for every candidate)
        or ``(F, N, K)`` (a set per row: the patches of :meth:`_focus_map`, batched)."""
        _F, N, K = T.shape
        ov = np.isfinite(L) & present
        tv = np.isfinite(T)
        s2 = self.s.spec_model_sigma**2
        wA = np.where(
            ov & tv, 1.0 / (1.0 / np.maximum(W, 1e-9) + 1.0 / np.maximum(WT, 1e-9) + s2), 0.0
        )
        yA = np.where(ov & tv, L - T, 0.0)
        # bounds: y = L - T >= L - Tub where only the frame detects; <= Lub - T where only the table does
        wH = 1.0 / (2 * s2)
        lbB = np.where(ov & ~tv, np.nan_to_num(L - Tub), -np.inf)
        ubC = np.where(~np.isfinite(L) & present & tv, Lub - T, np.inf)
        # smoothness of c over log-frequency bins (second differences) + weak ridge
        Pc, P = _smoothness(K, self.s.spec_curvature, self.s.spec_slope)
        pd = 1.0 / self.s.exposure_sigma**2
        # unbounded fit, then a refit with the violated bounds active (an active set of
        # one step), only for the candidates where some bound is violated
        c, d = _solve_two_way(wA, yA, P, pd)
        m = c[:, None, :] + d[:, :, None]
        wB = np.where(m < lbB, wH, 0.0)
        wC = np.where(m > ubC, wH, 0.0)
        act = np.flatnonzero(((wB > 0) | (wC > 0)).any(axis=(1, 2)))
        if len(act):
            w = wA[act] + wB[act] + wC[act]
            y = (
                wA[act] * yA[act]
                + wB[act] * np.where(np.isfinite(lbB[act]), lbB[act], 0)
                + wC[act] * np.where(np.isfinite(ubC[act]), ubC[act], 0)
            ) / np.maximum(w, 1e-12)
            c[act], d[act] = _solve_two_way(w, y, P, pd)
            m = c[:, None, :] + d[:, :, None]
        r = yA - m
        chi2 = (wA * r * r).sum(axis=(1, 2))
        # (inactive bounds are -inf / +inf: no cost)
        chi2 += (wH * np.maximum(lbB - m, 0.0) ** 2).sum(axis=(1, 2))
        chi2 += (wH * np.maximum(m - ubC, 0.0) ** 2).sum(axis=(1, 2))
        chi2 += pd * (d * d).sum(axis=1) + ((c @ Pc) * c).sum(axis=1)
        n_a = (wA > 0).sum(axis=(1, 2))
        dof = np.maximum(n_a - np.minimum(n_a, K // 3) - (N - 1), 1).astype(float)
        return chi2, dof

    def _order_cost(self, zs: NDArray, gs: NDArray, grid: NDArray) -> NDArray:
        """Cost of each focus candidate from the order of the frames' gradient sharpness.

        :func:`.metrics.gradient_sharpness` of frames of one field falls monotonically and
        symmetrically with ``|z - f|`` whatever the specimen (smooth, sparse, printed text,
        real micrographs: :mod:`.benchmarks.bench_sharpness`, ``tests/test_metrics.py``), so
        of two frames the sharper one is the nearer to focus: ``f`` lies on its side of the
        pair's midpoint. Candidates past the midpoint (by more than ``order_tol_dof`` / 2
        DOF at full cost) pay ``min((delta / order_sigma)^2, order_cap)`` per contradicted pair,
        ``delta`` the pair's sharpness difference. Unlike raw scores matched to a
        calibration, this needs nothing of the specimen to look like the calibration
        object; it removes the confident wrong answers where the spectra or the CNN do
        not fit the specimen (objects at the field's edge, smooth specimens).
        """
        ok = np.isfinite(gs)
        out = np.zeros(len(grid))
        if not self.s.use_sharpness_order or ok.sum() < 2:
            return out
        z, g = zs[ok], gs[ok]
        tau = max(self.s.order_tol_dof * self.dof, 1e-6)
        for i in range(len(z)):
            for j in range(len(z)):
                d = g[i] - g[j]
                if d <= 0 or abs(z[i] - z[j]) < 1e-9:
                    continue
                a = min((d / self.s.order_sigma) ** 2, self.s.order_cap)
                v = np.abs(z[i] - grid) - np.abs(z[j] - grid)  # > 0: i (sharper) is farther
                out += a * np.clip(v / tau, 0.0, 1.0) ** 2
        return out

    def _sharpness_fit_cost(
        self, zs: NDArray, gs: NDArray, floors: NDArray, grid: NDArray
    ) -> NDArray:
        """Chi^2 of the frames' gradient sharpness about a curve symmetric about each
        candidate (see ``DeepFocusSettings.sharpness_fit_sigma``), profiled over the
        specimen's level A, depth B >= 0 and width w, relative to the best candidate.

        The camera noise's floor (``floors``) is taken off first: the signal's part
        ``log(exp(g) - exp(floor))`` follows the curve far from focus too. Near the floor
        it is uncertain (the floor is estimated to a few per cent, ``floor_rel``): each
        frame's weight is ``1 / (sigma^2 + (floor_rel / snr)^2)``, and frames with less
        signal than ``floor_rel`` of the floor are left out. Zeros with fewer than 4
        frames left.
        """
        sig = self.s.sharpness_fit_sigma
        if sig <= 0 or not self.s.use_sharpness_order:
            return np.zeros(len(grid))
        floor_rel = FLOOR_REL
        known = np.isfinite(floors)
        with np.errstate(invalid="ignore", over="ignore"):
            snr = np.where(known, np.expm1(gs - floors), np.inf)
            y = np.where(known, gs + np.log(-np.expm1(np.minimum(floors - gs, -1e-12))), gs)
        ok = np.isfinite(gs) & (snr > floor_rel) & np.isfinite(y)
        if ok.sum() < 4:
            return np.zeros(len(grid))
        z, g = zs[ok], y[ok]
        wt = 1.0 / (sig**2 + (floor_rel / snr[ok]) ** 2)
        widths = self.dof * np.geomspace(0.1, 2.0, 16)
        u = (z[None, None, :] - grid[:, None, None]) / widths[None, :, None]
        h = np.log1p(u * u)  # (F, W, N)
        sw = wt.sum()
        hc = h - (h * wt).sum(axis=2, keepdims=True) / sw
        gc = g - float((g * wt).sum()) / sw
        var = (wt * hc * hc).sum(axis=2)
        cov = (wt * hc * gc).sum(axis=2)
        # B = -cov / var >= 0: the fit explains cov^2 / var of the spread; else nothing
        explained = np.where(cov < 0, cov * cov / np.maximum(var, 1e-12), 0.0)
        rss = float((wt * gc * gc).sum()) - explained.max(axis=1)
        # relative to the best candidate: the model's own misfit is no evidence against
        # any of them (and no "conflict" with the spectra, see _order_conflict)
        return rss - rss.min()

    def _update(self, obs: Observation) -> None:
        self._memo.clear()

    def _posterior(
        self, grid: NDArray | None = None, *, gaussian_prior: bool = False
    ) -> tuple[float, float, NDArray, NDArray, dict[str, float]]:
        if grid is not None:
            return self._posterior_on(grid, gaussian_prior=gaussian_prior)
        key = ("coarse", gaussian_prior)
        if key not in self._memo:
            self._memo[key] = self._posterior_on(self.grid, gaussian_prior=gaussian_prior)
        f, sd, g, p, info = self._memo[key]
        return f, sd, g, p, dict(info)

    def _posterior_on(
        self, grid: NDArray, *, gaussian_prior: bool = False
    ) -> tuple[float, float, NDArray, NDArray, dict[str, float]]:
        """Posterior mode, sd, grid, probabilities and diagnostics on ``grid``.

        With a prior, ``info["prior_weight"]`` is the posterior probability of the
        prior's Gaussian component (versus its flat one): below 1/2 the images contradict
        the prior. ``gaussian_prior`` uses that component alone (for placing images).
        """
        zs = np.array([o.z for o in self.observations])
        bs = np.array([o.blur for o in self.observations])
        specs = [o.spectrum for o in self.observations]
        cost = self._cnn_cost(zs, bs, grid)
        gs = np.array([o.gradient_sharpness for o in self.observations], dtype=float)
        order = self._order_cost(zs, gs, grid)
        floors = np.array([o.sharpness_floor for o in self.observations], dtype=float)
        fit = self._sharpness_fit_cost(zs, gs, floors, grid)
        chi2, dof = self._spec_cost(zs, specs, grid)
        # the spectral chi^2 is over-dispersed when the model is imperfect: scale by its
        # minimum reduced value (>= 1) so the posterior width stays honest
        scale = 1.0
        if np.any(dof > 0):
            i = int(np.argmin(chi2 + cost + order + fit))
            scale = max(1.0, float(chi2[i] / max(dof[i], 1.0)))
        total = cost + chi2 / scale + order + fit
        base = cost + chi2 / scale  # what the spectra and the CNN alone say (see order_conflict)
        prior_weight = float("nan")
        if self.prior is not None and len(grid) > 1:
            log_gauss, log_flat = self._prior_parts(grid, float(grid[1] - grid[0]))
            log_like = -0.5 * (total - total.min())
            if log_flat is None:
                prior_weight = 1.0
            else:
                lg = float(np.logaddexp.reduce(log_like + log_gauss))
                lf = float(np.logaddexp.reduce(log_like + log_flat))
                prior_weight = float(1.0 / (1.0 + math.exp(min(lf - lg, 700.0))))
            if gaussian_prior or log_flat is None:
                total = total - 2 * log_gauss
            else:
                total = total - 2 * np.logaddexp(log_gauss, log_flat)
        total = total - total.min()
        p = np.exp(-0.5 * total)
        p /= p.sum()
        i = int(np.argmax(p))
        f = float(grid[i])
        if 0 < i < len(grid) - 1:  # parabolic refinement of the mode
            y0, y1, y2 = total[i - 1], total[i], total[i + 1]
            den = y0 - 2 * y1 + y2
            if den > 0:
                f += float(np.clip(0.5 * (y0 - y2) / den, -1, 1)) * float(grid[1] - grid[0])
        f = float(np.clip(f, grid[0], grid[-1]))
        mean = float((p * grid).sum())
        sd = float(math.sqrt(max((p * (grid - mean) ** 2).sum(), 0.0)))
        step = float(grid[1] - grid[0]) if len(grid) > 1 else 0.0
        sd = max(sd, step / math.sqrt(12))
        j = int(np.argmin(np.abs(grid - f)))
        info = {
            "chi2_scale": scale,
            "spec_chi2_red": float(chi2[j] / max(dof[j], 1.0))
            if np.any(dof > 0)
            else float("nan"),
            "spec_dof": float(dof[j]),
            "cnn_cost": float(cost[j]),
            "order_cost": float(order[j]),
            "base_at_mode": float(base[j]),
            "base_min": float(base.min()),
            "prior_weight": prior_weight,
            "f": f,
        }
        if fit.any():
            # what the frames' own sharpness (order + symmetric fit) says alone
            info["fit_cost"] = float(fit[j])
            sharp = order + fit
            q = np.exp(-0.5 * (sharp - sharp.min()))
            q /= q.sum()
            qm = float((q * grid).sum())
            info["sharp_mode"] = float(grid[int(np.argmax(q))])
            # the curve falls off by chi^2 > 9 at both ends of ``grid``: its mode and sd are
            # not those of a part cut off by a window (the fine grid of _refined_now)
            edge = min(float(sharp[0]), float(sharp[-1])) - float(sharp.min())
            info["sharp_contained"] = float(edge > 9.0)
            info["sharp_sd"] = max(
                float(math.sqrt(max((q * (grid - qm) ** 2).sum(), 0.0))), step / math.sqrt(12)
            )
        return f, sd, grid, p, info

    def _prior_parts(self, z: NDArray, step: float) -> tuple[NDArray, float | None]:
        """The warm-start prior's log densities at ``z``: its Gaussian component, and its
        flat one (None when ``prior_floor`` is 0).

        A heavy-tailed prior: ``(1 - w) N(z0, sd^2) + w / width`` over the candidates
        (``w = prior_floor``), so its penalty for a focus far from ``z0`` is bounded
        (``2 log((1 - w) width / (w sqrt(2 pi) sd))``, ~15 for sd = DOF/4) and images
        that say otherwise outweigh it. ``sd`` is floored at the grid step (and at the
        posterior's resolution, ``grid_dof`` DOF), so that a prior narrower than the
        candidate spacing is neither lost between candidates nor sharper than anything
        the images could confirm.
        """
        if self.prior is None:
            raise RuntimeError("no prior")
        z0, sd = self.prior
        sd = max(sd, step, self.s.grid_dof * self.dof)
        log_gauss = (
            math.log1p(-self.s.prior_floor)
            - 0.5 * ((z - z0) / sd) ** 2
            - math.log(math.sqrt(2 * math.pi) * sd)
        )
        if self.s.prior_floor <= 0:
            return log_gauss, None
        width = float(self.grid[-1] - self.grid[0]) or 1.0
        return log_gauss, math.log(self.s.prior_floor / width)

    def _prior_holds(self, info: dict[str, float]) -> bool:
        """A warm start the images do not contradict: the posterior weight of the prior's
        Gaussian component is at least 1/2 (False without a prior)."""
        return self.prior is not None and info["prior_weight"] >= 0.5

    def _refined(self, *, gaussian_prior: bool = False) -> tuple[float, float, dict[str, float]]:
        key = ("refined", gaussian_prior)
        if key not in self._memo:
            self._memo[key] = self._refined_now(gaussian_prior=gaussian_prior)
        f, sd, info = self._memo[key]
        return f, sd, dict(info)

    def _refined_now(
        self, *, gaussian_prior: bool = False
    ) -> tuple[float, float, dict[str, float]]:
        """Posterior mode and sd, re-evaluated on a fine grid (<= 150 points) around the
        coarse mode (``info["prior_weight"]`` from the coarse grid, which covers every
        candidate)."""
        f, sd, _g, _p, info = self._posterior(gaussian_prior=gaussian_prior)
        coarse = float(self.grid[1] - self.grid[0]) if len(self.grid) > 1 else self.dof
        half = max(3 * coarse, min(6 * sd, 40 * coarse), 0.5 * self.dof)
        step = max(2 * half / 150, min(sd / 10, self.s.grid_dof * self.dof), 0.002)
        fine = _grid(max(self.grid[0], f - half), min(self.grid[-1], f + half), step)
        if len(fine) >= 5:
            f2, sd2, _, _, info2 = self._posterior(fine, gaussian_prior=gaussian_prior)
            info2["prior_weight"] = info["prior_weight"]
            # within the window (>= 0.5 DOF either side): an order pressing the estimate
            # against the spectra's own optimum; a far mode it rules out is no conflict
            info2["order_penalty"] = info2["base_at_mode"] - info2["base_min"]
            if self._sharpness_overrules(info2):
                f2, sd2 = info2["sharp_mode"], info2["sharp_sd"]
                info2["from_sharpness"] = 1.0
                # the estimate is now the sharpness's (what _sharpness_confirms and the
                # result's reason test); the combined one is kept for the record
                info2["combined_f"], info2["f"] = info2["f"], f2
            # keep the wide sd when the coarse posterior is multimodal
            return f2, max(sd2, sd if sd > half / 3 else sd2), info2
        info["order_penalty"] = info["base_at_mode"] - info["base_min"]
        return f, sd, info

    # ------------------------------------------------------------------ policy
    def _detail_share(self) -> float:
        """The largest share by which a frame's gradient energy stands above its camera-noise
        floor, ``exp(g - floor) - 1`` (inf when no frame's floor is known: not judged)."""
        share = [
            math.expm1(o.gradient_sharpness - o.sharpness_floor)
            for o in self.observations
            if math.isfinite(o.gradient_sharpness) and math.isfinite(o.sharpness_floor)
        ]
        return max(share) if share else math.inf

    def _peak_drop(self, f: float) -> float | None:
        """How much sharper (log gradient energy) the sharpest frame within
        ``peak_near_dof`` of ``f`` is than the sharpest frame ``>= peak_far_dof`` from it;
        None when either side has no frame with a known sharpness (not judged), or when
        the frames' sharpness is not used (``use_sharpness_order=False``)."""
        if self.s.peak_min_drop <= 0 or not self.s.use_sharpness_order:
            return None
        near, far = -math.inf, -math.inf
        for o in self.observations:
            g = o.gradient_sharpness
            if not math.isfinite(g):
                continue
            d = abs(o.z - f)
            if d <= self.s.peak_near_dof * self.dof:
                near = max(near, g)
            elif d >= self.s.peak_far_dof * self.dof:
                far = max(far, g)
        if not (math.isfinite(near) and math.isfinite(far)):
            return None
        return near - far

    def _has_information(self) -> bool:
        for o in self.observations:
            if np.isfinite(o.blur):
                return True
            if o.spectrum is not None and np.count_nonzero(o.spectrum.log_signal()[1] > 0) >= 3:
                return True
        return False

    def _propose(self) -> float | None:
        z = self._next_position()
        if z is None and self.n < self.min_images:
            # the search would stop (a focus beyond the reachable range, say) before its
            # min_images: an exact budget (min_images == max_images) is a promise -- image
            # the estimate, or go on looking around the start
            z = self._fill_budget()
        return z

    def _fill_budget(self) -> float | None:
        """A position for an image the search itself no longer needs: the (clipped)
        estimate unless an image lies within 0.05 DOF of it, else the next position of
        the outward search pattern, else the position in ``[lo, hi]`` farthest from every
        image (None when every position lies within 0.05 DOF of one)."""
        eps = 0.05 * self.dof
        if not self.observations:
            return self.start
        if self._has_information():
            f = self.clip(self._refined()[0])
            if self._nearest(f) > eps:
                return f
        z = self._explore(self.n)
        if z is not None and self._nearest(z) > eps:
            return z
        grid = np.linspace(self.lo, self.hi, 401)
        zs = np.array([o.z for o in self.observations])
        gap = np.min(np.abs(grid[:, None] - zs[None, :]), axis=1)
        i = int(np.argmax(gap))
        return float(grid[i]) if gap[i] > eps else None

    def _next_position(self) -> float | None:
        n = self.n
        if n == 0:
            return self.start
        if not self._has_information():
            # nothing seen yet (blank field, or a sparse one far out of focus): look
            # around the start in growing steps, alternating sides; if nothing is ever
            # seen the result says so and the plan restores the start position
            return self._explore(n)
        f, sd, info = self._refined()
        prior_holds = self._prior_holds(info)
        tol = self.s.tol_dof * self.dof
        if self._misfit(info):
            sd = max(sd, 2 * tol)  # not done: keep imaging around the estimate
            if self._order_conflict(info) and n < self.max_images - 1:
                z = self._follow_sharpness()
                if z is not None:
                    return z
        if (f < self.lo - self.dof or f > self.hi + self.dof) and self._p_reachable() < 0.05:
            # focus beyond the reachable range: look once from the nearest bound and once
            # 2 DOF inside it (if that one is the sharper, the sharpness order pulls the
            # estimate back inside), then stop
            bound = self.lo if f < self.lo else self.hi
            if self._nearest(bound) > 0.5 * self.dof:
                return bound
            inside = bound + (2.0 if bound == self.lo else -2.0) * self.dof
            if (
                self.s.use_sharpness_order
                and self.lo <= inside <= self.hi
                and self._nearest(inside) > 0.5 * self.dof
                and n < self.max_images - 1
            ):
                return inside
            return None
        f = self.clip(f)  # a wide posterior reaching beyond the bounds: look inside them
        if self._rising_beyond(info) is not None:
            # the sharpness still rises at the outermost image: look where its curve peaks
            z = self.clip(info["sharp_mode"])
            if self._nearest(z) > 0.05 * self.dof:
                return z
        if n >= self.min_images and sd <= tol and n < self.max_images - 1:
            side = self._unbracketed_side(f)
            if side:
                # a tight posterior from images all on one side of it: image the other side
                # (its sharpness then confirms the estimate or moves it; see _order_cost)
                z = f + side * max(self.s.straddle_dof * self.dof, 2 * sd)
                if self.lo <= z <= self.hi and self._nearest(z) > 0.05 * self.dof:
                    return z
        if n >= self.min_images and sd <= tol:
            if (
                self.s.verify
                and not self._verified
                and n < self.max_images
                and self._nearest(f) > tol
            ):
                self._verified = True
                return f
            return None
        if n == 1 and not prior_holds:
            # cold start, or a warm start the first image contradicts (a focus jump):
            # placed as without a prior
            d = abs(f - self.start)
            told_nothing = sd > 0.25 * (self.grid[-1] - self.grid[0])
            if told_nothing:
                d = self.s.explore_dof * self.dof
            step = max(
                min(d, self.s.first_step_max_dof * self.dof), self.s.first_step_min_dof * self.dof
            )
            sign = 1.0 if f >= self.start else -1.0
            if d < self.s.first_step_min_dof * self.dof or told_nothing:
                # near focus or unknown side: step toward the roomier side of the bounds
                sign = 1.0 if (self.hi - self.start) >= (self.start - self.lo) else -1.0
            return self.start + sign * step
        if n >= 2 and self.s.probe_beyond_sharpest:
            z = self._beyond_sharpest(f, sd)
            if z is not None:
                return z
        if n == self.max_images - 1 and self.s.verify and self._nearest(f) > 0.05 * self.dof:
            self._verified = True
            return f  # last image: look where we would go (and refine with it)
        if n == 1 and prior_holds:
            # one image cannot tell the side of focus; the prior can: place the second
            # image by the posterior under the prior's Gaussian component (the flat one
            # only widens it with candidates the prior does not expect)
            f, sd, _ = self._refined(gaussian_prior=True)
        # straddle the estimate: image the side of it with fewer images nearby, so a
        # symmetric pair cancels the specimen. Ties: the side of the sharpest of those
        # images (the sharpness order says the focus is nearer to it, whatever the
        # spectra and the CNN make of the specimen), else the side opposite the last image
        delta = max(self.s.straddle_dof * self.dof, min(2 * sd, 4 * self.dof))
        zs = np.array([o.z for o in self.observations])
        nearby = np.abs(zs - f) <= 2.5 * delta
        near = zs[nearby]
        above = int(np.sum(near > f + 0.1 * delta))
        below = int(np.sum(near < f - 0.1 * delta))
        if above != below:
            sign = 1.0 if above < below else -1.0
        else:
            sign = -1.0 if zs[-1] > f else 1.0
            if self.s.tie_to_sharper:
                sharpest = self._sharpest_side(f, zs, nearby, 0.1 * delta)
                if sharpest:
                    sign = sharpest
        z = f + sign * delta
        if not self.lo <= z <= self.hi:
            z = f - sign * delta
        # do not image the same place twice
        if np.min(np.abs(zs - z)) < 0.05 * self.dof:
            z = f + sign * 0.5 * delta
        return z

    def _sharpest_side(self, f: float, zs: NDArray, pick: NDArray, eps: float) -> float:
        """+1 / -1: the side of ``f`` of the sharpest of the images ``pick`` when it is
        sharper than every image on the other side by more than ``order_sigma`` and lies
        more than ``eps`` from ``f``; 0 otherwise (or when the sharpness order is off)."""
        if not self.s.use_sharpness_order:
            return 0.0
        gs = np.array([o.gradient_sharpness for o in self.observations], dtype=float)
        ok = pick & np.isfinite(gs)
        if ok.sum() < 2:
            return 0.0
        z, g = zs[ok], gs[ok]
        i = int(np.argmax(g))
        if abs(z[i] - f) <= eps:
            return 0.0
        side = 1.0 if z[i] > f else -1.0
        other = g[(z - f) * side < -eps]
        if len(other) == 0 or g[i] - other.max() <= self.s.order_sigma:
            return 0.0
        return side

    def _sharpest_image(self) -> tuple[Observation, NDArray, NDArray] | None:
        """The sharpest image with a known sharpness, and the positions and sharpness of
        the other such images; None with fewer than two."""
        obs = [o for o in self.observations if np.isfinite(o.gradient_sharpness)]
        if len(obs) < 2:
            return None
        best = max(obs, key=lambda o: o.gradient_sharpness)
        others = [o for o in obs if o is not best]
        zs = np.array([o.z for o in others])
        gs = np.array([o.gradient_sharpness for o in others])
        return best, zs, gs

    def _outermost_sharpest(self) -> tuple[Observation, NDArray, NDArray, float] | None:
        """:meth:`_sharpest_image` and the direction away from the other images when it is
        the outermost one (every other image on one side of it); None otherwise."""
        sharpest = self._sharpest_image()
        if sharpest is None:
            return None
        best, zo, go = sharpest
        side = _outward(best.z, zo)
        return (best, zo, go, side) if side else None

    def _beyond_sharpest(self, f: float, sd: float) -> float | None:
        """A step beyond the sharpest image when it is the outermost image (every other
        image with a known sharpness lies on one side of it, each less sharp by more than
        ``order_sigma``) and the estimate ``f`` (posterior sd ``sd``) lies within a
        straddle step of it; None otherwise (the usual placement applies). When the
        sharpest image lies at most ``probe_gap_max_dof`` DOF from its nearest other image
        (a short step raised the sharpness), the estimate may lie within
        ``max(straddle, distance / 2 + order_tol_dof / 2 DOF)`` of it, either side, and
        the step beyond is that distance (at least a straddle step; a straddle step when
        that one would fall outside ``[lo, hi]`` or onto an image and the estimate lies
        within a straddle step); otherwise a straddle step.

        Nothing then says the sharpness does not go on rising beyond that image except the
        spectra and the CNN, which is where they fail on a specimen unlike the calibration
        object (measured at 40x: estimates 0.4-3.4 um short, every image on one side). An
        image beyond it either is less sharp (the order then bounds the focus from that
        side too) or sharper (the order moves the estimate out). An estimate far from the
        sharpest image, or still wide, is left to the usual placement; so is a position
        beyond ``[lo, hi]`` or within 0.05 DOF of an image, and the last image while no
        frame yet shows ``min_detail_share`` detail (with ``verify`` it goes to the
        estimate).
        :meth:`_next_position` asks this only after its stop test: a posterior already below
        ``tol_dof`` stops (or verifies)."""
        outermost = self._outermost_sharpest() if self.s.use_sharpness_order else None
        if outermost is None:
            return None
        best, zo, go, side = outermost
        if best.gradient_sharpness - go.max() <= self.s.order_sigma:
            return None
        delta = self.s.straddle_dof * self.dof
        # the distance to the nearest (less sharp) image: usually the step that made the
        # sharpness rise. The tolerance lets a capped first step (first_step_max_dof =
        # probe_gap_max_dof = 2 DOF) count as short
        gap = float(np.min(np.abs(zo - best.z)))
        repeat = gap <= self.s.probe_gap_max_dof * self.dof * (1 + 1e-9)
        # how near the sharpest image the estimate must lie, either side: a straddle step,
        # or after a short step half of it plus the order's slack (order_tol_dof / 2) --
        # inside, up to where the order pins an estimate the spectra put farther inside;
        # outside, an estimate the spectra may still place short
        reach = delta
        if repeat:
            reach = max(delta, 0.5 * gap + 0.5 * self.s.order_tol_dof * self.dof)
        if not (abs(f - best.z) < reach and sd < delta):  # (NaN: no probe)
            return None
        if self.n == self.max_images - 1 and self._detail_share() < self.s.min_detail_share:
            # the last image, and no frame yet shows the detail a result needs (see
            # ``min_detail_share`` in :meth:`result`): an image beyond would leave the
            # estimate refused unless it happens to show it; the estimate is where detail
            # is likeliest (the usual placement images it with ``verify``) (measured at 40x: a beads field 0.7 DOF from focus refused,
            # its estimate 0.05 um off, after its last image went 1.4 DOF out)
            return None
        steps = [max(delta, gap)] if repeat else []
        if abs(f - best.z) < delta:
            steps.append(delta)  # the long step past the bounds or onto an image: as before
        for step in steps:
            z = best.z + side * step
            if self.lo <= z <= self.hi and self._nearest(z) >= 0.05 * self.dof:
                return z
        return None

    def _rising_beyond(self, info: dict[str, float]) -> float | None:
        """How far beyond the sharpest image the frames' symmetric sharpness curve peaks
        (um) when that image is the outermost one and the peak lies beyond it by more than
        ``rising_beyond_dof`` DOF and 2 sd of the curve's posterior; None otherwise."""
        if self.s.rising_beyond_dof <= 0 or "sharp_mode" not in info:
            return None
        outermost = self._outermost_sharpest()
        if outermost is None:
            return None
        best, _zo, _go, side = outermost
        beyond = (info["sharp_mode"] - best.z) * side
        if beyond > max(self.s.rising_beyond_dof * self.dof, 2 * info["sharp_sd"]):
            return float(beyond)
        return None

    def _p_reachable(self) -> float:
        """Posterior probability that the focus lies within [lo, hi]."""
        _f, _sd, g, p, _info = self._posterior()
        return float(p[(g >= self.lo) & (g <= self.hi)].sum())

    def _follow_sharpness(self) -> float | None:
        """Next position when spectra and CNN contradict the sharpness order (they are
        misdescribing this specimen): step from the sharpest image away from the blurrier
        ones, by 1.6x its distance to the nearest of them (at least ``explore_dof`` DOF),
        as a bracketing search on the frames' own sharpness would."""
        sharpest = self._sharpest_image()
        if sharpest is None:
            return None
        best, others, _ = sharpest
        below, above = others[others < best.z], others[others > best.z]
        if len(below) and len(above):
            return None  # bracketed: the straddle placement refines inside the bracket
        if len(above):
            sign, gap = -1.0, float(above.min() - best.z)
        else:
            sign, gap = 1.0, float(best.z - below.max())
        z = best.z + sign * max(1.618 * gap, self.s.explore_dof * self.dof)
        z = self.clip(z)
        return z if self._nearest(z) > 0.05 * self.dof else None

    def _spectra_misfit(self, info: dict[str, float]) -> bool:
        """The frames' spectra fit the calibration table badly at the estimate."""
        red = info.get("spec_chi2_red", float("nan"))
        return bool(np.isfinite(red) and red > self.s.misfit_chi2)

    def _misfit(self, info: dict[str, float]) -> bool:
        # spectra the calibration cannot explain are no reason to refuse an estimate that
        # the frames' own sharpness curve locates by itself at the same place
        bad_fit = self._spectra_misfit(info) and not self._sharpness_confirms(info)
        return bad_fit or self._order_conflict(info)

    def _order_conflict(self, info: dict[str, float]) -> bool:
        """The sharpness order and the spectra/CNN disagree at the estimate: obeying the
        order costs them more than ``order_conflict`` within half a DOF or more of it (a
        far mode that the order rules out -- an ambiguity it resolves -- is no conflict),
        or the estimate itself still violates the order by that much."""
        return self._raw_conflict(info) and not self._sharpness_overrules(info)

    def _raw_conflict(self, info: dict[str, float]) -> bool:
        return bool(
            info.get("order_penalty", 0.0) > self.s.order_conflict
            or info.get("order_cost", 0.0) > self.s.order_conflict
        )

    def _sharpness_overrules(self, info: dict[str, float]) -> bool:
        """In a conflict, the frames' own sharpness curve (order + symmetric fit) locates
        the focus by itself (sd <= ``converged_dof``) and either the estimate lies within
        2 sd of it or (``overrule_when_bracketed``) the spectra hold detail
        (``MIN_SPECTRAL_DOF`` bins), there are images within
        ``bracket_dof`` on both sides of its mode and the curve's posterior lies wholly
        inside the window it was computed on (``sharp_contained``: not a mode at the edge
        of a window that cut the real peak off): the spectra/CNN misdescribe the
        specimen, the frames do not -- the estimate is then the sharpness's (see
        :meth:`_refined_now`)."""
        if not self._raw_conflict(info):
            return False
        if self._sharpness_confirms(info):
            return True
        return bool(
            self.s.overrule_when_bracketed
            and (self._spectral_detail(info) or not self.s.use_spectra)
            and info.get("sharp_sd", math.inf) <= self.s.converged_dof * self.dof
            and info.get("sharp_contained", 0.0) == 1.0
            and self._bracketed(info["sharp_mode"])
        )

    @staticmethod
    def _spectral_detail(info: dict[str, float]) -> bool:
        """The frames' spectra hold detail at the estimate: at least ``MIN_SPECTRAL_DOF``
        frequency bins informative (else the estimate rests on the CNN and the sharpness
        alone)."""
        return bool(info.get("spec_dof", 0.0) >= MIN_SPECTRAL_DOF)

    def _sharpness_confirms(self, info: dict[str, float]) -> bool:
        """The frames' own sharpness curve alone locates the focus (sd <= ``converged_dof``)
        within 2 sd of the estimate ``info["f"]``."""
        if "sharp_sd" not in info:
            return False
        tol = self.s.converged_dof * self.dof
        return bool(
            info["sharp_sd"] <= tol
            and abs(info["f"] - info["sharp_mode"])
            <= max(2 * info["sharp_sd"], self.s.grid_dof * self.dof)
        )

    def _images_beside(self, f: float) -> tuple[bool, bool]:
        """Whether an image with a sharpness lies within ``bracket_dof`` DOF below / above
        ``f`` (farther than 0.05 DOF from it)."""
        reach = self.s.bracket_dof * self.dof
        eps = 0.05 * self.dof
        zs = np.array([o.z for o in self.observations if np.isfinite(o.gradient_sharpness)])
        below = bool(np.any((zs < f - eps) & (zs >= f - reach)))
        above = bool(np.any((zs > f + eps) & (zs <= f + reach)))
        return below, above

    def _bracketed(self, f: float) -> bool:
        """Images with a sharpness within ``bracket_dof`` DOF on both sides of ``f``."""
        return all(self._images_beside(f))

    def _unbracketed_side(self, f: float) -> float:
        """+1 / -1: the side of ``f`` with no image within ``bracket_dof`` DOF while the
        other side has one (0 when both or neither have one, or when the sharpness order
        is off)."""
        if not (self.s.use_sharpness_order and self.s.bracket_dof > 0):
            return 0.0
        below, above = self._images_beside(f)
        if above == below:
            return 0.0
        return -1.0 if above else 1.0

    def _explore(self, n: int) -> float | None:
        step = self.s.explore_dof * self.dof
        first = 1.0 if (self.hi - self.start) >= (self.start - self.lo) else -1.0
        tried = {round(o.z, 6) for o in self.observations}
        for k in range(1, 64):
            for sign in (first, -first):
                z = self.start + sign * k * step
                if self.lo <= z <= self.hi and round(z, 6) not in tried:
                    return z
            if self.start + k * step > self.hi and self.start - k * step < self.lo:
                break
        return None

    def _nearest(self, f: float) -> float:
        return float(min(abs(o.z - f) for o in self.observations)) if self.observations else np.inf

    # ------------------------------------------------------------------ result
    def result(self) -> SearchResult:
        if self.n == 0 or not self._has_information():
            return SearchResult(
                self.start,
                0.0,
                float("nan"),
                float("nan"),
                0.0,
                False,
                "no focus information in any image (blank, dark or saturated field)",
                self.n,
            )
        f, sd, info = self._refined()
        resid = info.get("spec_chi2_red", float("nan"))
        conv = sd <= self.s.converged_dof * self.dof
        at_edge = f < self.lo - 1e-9 or f > self.hi + 1e-9
        confidence = float(math.exp(-((sd / (0.25 * self.dof)) ** 2)))
        if at_edge:
            confidence *= 0.1
            conv = False
        if self.n < 2 and not self._prior_holds(info):
            conv = False
        misfit = self._misfit(info)
        if misfit:
            conv = False
            confidence *= 0.1
        # no frame shows detail above the camera noise (a field still far out of focus):
        # whatever the spectra's few low-frequency bins say, no image saw the focus
        detail = self._detail_share()
        no_detail = conv and detail < self.s.min_detail_share
        if no_detail:
            conv = False
            confidence *= 0.1
        # with no spectral detail the estimate rests on the CNN's raw score alone, which
        # depends on the specimen (the paper's weakness): converged only when images on
        # both sides of it confirm it through their sharpness order
        cnn_only = not self._spectral_detail(info) and self.s.use_sharpness_order
        unconfirmed = conv and cnn_only and not self._bracketed(f)
        if unconfirmed:
            conv = False
        # a focus is a peak of the frames' own sharpness
        drop = self._peak_drop(f)
        flat = conv and drop is not None and drop < self.s.peak_min_drop
        if flat:
            conv = False
            confidence *= 0.1
            info["peak_drop"] = float(drop)  # type: ignore[arg-type]
        rising = self._rising_beyond(info) if conv else None
        if rising is not None:
            conv = False
            confidence *= 0.1
        if conv:
            reason = f"posterior sd {sd:.3f} um <= {self.s.converged_dof} DOF"
            if info.get("from_sharpness"):
                reason += (
                    " (the frames' own sharpness curve; their match to the calibration "
                    f"disagreed by chi^2 {info['order_penalty']:.1f})"
                )
            elif self._spectra_misfit(info):  # converged: so the sharpness confirmed it
                reason += (
                    f" (the spectra fit the calibration poorly, reduced chi^2 "
                    f"{info['spec_chi2_red']:.1f}, but the frames' own sharpness curve "
                    "puts the focus at the same place)"
                )
        elif no_detail:
            reason = (
                f"no image shows enough detail above the camera noise (the sharpest frame's "
                f"gradient energy stands {100 * detail:.1f} % above the noise's "
                f"floor, < {100 * self.s.min_detail_share:g} %): the estimate {f:.2f} um rests "
                "on the spectra's few low-frequency bins (a field still far out of focus); "
                "not trusted"
            )
        elif rising is not None:
            reason = (
                f"the frames' own sharpness still rises at the outermost image: their "
                f"symmetric curve peaks {rising:.2f} um beyond the sharpest image (the "
                f"estimate: {f:.2f} um); not trusted"
            )
        elif flat:
            reason = (
                f"no sharpness peak at the estimate {f:.2f} um: the sharpest image within "
                f"{self.s.peak_near_dof:g} DOF of it is only {drop:.3f} (log gradient energy) "
                f"sharper than one >= {self.s.peak_far_dof:g} DOF away (< "
                f"{self.s.peak_min_drop:g}; frames of a field far out of focus all look "
                "alike); not trusted"
            )
        elif at_edge:
            reason = (
                f"focus estimated at {f:.2f} um, beyond the allowed range [{self.lo:.2f}, "
                f"{self.hi:.2f}] um (stage limits / max_travel)"
            )
        elif self._order_conflict(info):
            reason = (
                f"the frames' sharpness order contradicts their match to the calibration "
                f"(obeying it costs chi^2 {info['order_penalty']:.1f}): the estimate {f:.2f} um "
                "is not trusted"
            )
        elif unconfirmed:
            reason = (
                f"only the CNN's raw score informs (no spectral detail) and no images within "
                f"{self.s.bracket_dof:g} DOF on both sides confirm the estimate {f:.2f} um"
            )
        elif misfit:
            reason = (
                f"the frames' spectra do not fit the calibration (reduced chi^2 "
                f"{info['spec_chi2_red']:.1f} > {self.s.misfit_chi2:g}): the estimate "
                f"{f:.2f} um is not trusted"
            )
        else:
            reason = f"posterior sd {sd:.3f} um too wide"
        fmap = self._focus_map(f, sd)
        if conv and self.s.focus_at == "centre" and fmap is not None:
            centre = self._field_centre(f, fmap, info)
            if centre is not None:
                reason += (
                    f"; focused at the field centre {centre:.2f} um (the field tilts by "
                    f"{info['tilt_um_across_field']:.2f} um across; its detail is in focus at "
                    f"{f:.2f} um)"
                )
                info["detail_focus"] = f
                f = centre
                sd = max(sd, info["field_centre_sd"])
        return SearchResult(
            z_focus=f,
            dz=f - self.start,
            sigma_um=sd,
            residual=float(resid),
            confidence=confidence,
            converged=bool(conv),
            reason=reason,
            images=self.n,
            focus_map=fmap,
            details=info,
        )

    def _field_centre(self, f: float, fmap: NDArray, info: dict[str, float]) -> float | None:
        """The focus at the field centre from the robust plane through ``fmap``, or None
        when the plane is not trusted or hardly tilted.

        The plane: :func:`field_plane` (the consensus of patches within
        ``PLANE_INLIER_DOF`` (0.2) DOF, >= 5 of them), with the search's ``field_tilt``
        prior on its slopes when one was given (the slide's tilt learned from earlier
        tiles of a scan: a field with few informative patches then needs only their level,
        not their slopes). Trusted with a standard error of its centre value (from the
        patches' robust scatter about it, widened by the Student t quantile for its
        residual degrees of freedom) <= ``centre_sd_dof`` DOF, a tilt of >=
        ``centre_tilt_dof`` DOF across the field, and the detail's focus ``f`` within the
        focus range the plane spans over those patches (else the map and the whole frame
        disagree: keep ``f``). Writes ``field_centre``, ``field_centre_sd``,
        ``tilt_um_across_field``, ``plane_patches``, ``map_patches`` and, when a tilt
        prior was used, ``tilt_prior_used`` into ``info``.
        """
        informative = int(np.isfinite(fmap).sum())
        fit = field_plane(fmap, PLANE_INLIER_DOF * self.dof, prior=self.field_tilt)
        if fit is None:
            return None
        info.update(
            tilt_um_across_field=fit.tilt_um,
            field_centre=fit.centre,
            field_centre_sd=fit.centre_sd,
            plane_patches=float(fit.n),
            map_patches=float(informative),
        )
        if self.field_tilt is not None:
            info["tilt_prior_used"] = 1.0
        if (
            fit.tilt_um < self.s.centre_tilt_dof * self.dof
            or fit.centre_sd > self.s.centre_sd_dof * self.dof
        ):
            return None
        slack = self.s.converged_dof * self.dof
        if not (fit.z_min - slack <= f <= fit.z_max + slack):
            return None
        return float(np.clip(fit.centre, self.lo, self.hi))

    def _focus_map(self, f: float, sd: float) -> NDArray[np.float64] | None:
        """Per-patch focus positions from per-patch spectra and CNN maps, near ``f``."""
        obs = self.observations
        if len(obs) < 2 or any(o.patch_spectra is None and o.blur_map is None for o in obs):
            return None
        shape = None
        for o in obs:
            if o.patch_spectra is not None:
                shape = (len(o.patch_spectra), len(o.patch_spectra[0]) if o.patch_spectra else 0)
                break
            if o.blur_map is not None:
                shape = o.blur_map.shape
                break
        if shape is None or 0 in shape:
            return None
        half = max(4 * sd, 3 * self.dof)
        step = max(2 * half / 32, 0.01)  # coarse: the parabola below refines each patch
        grid = _grid(max(self.grid[0], f - half), min(self.grid[-1], f + half), step)
        zs = np.array([o.z for o in obs])
        cells = list(np.ndindex(*shape))
        bs = np.array(
            [
                [
                    float(o.blur_map[idx])
                    if o.blur_map is not None
                    and (o.confidence is None or o.confidence[idx] >= 0.5)
                    else np.nan
                    for o in obs
                ]
                for idx in cells
            ]
        ).reshape(len(cells), len(obs))
        cost = self._cnn_cost_rows(zs, bs, grid)
        chi2, dof = self._patch_spec_costs(zs, cells, grid)
        out = np.full(shape, np.nan)
        for p, idx in enumerate(cells):
            if not np.any(dof[p] > 0) and np.sum(np.isfinite(bs[p])) < 2:
                continue
            j = int(np.argmin(chi2[p] + cost[p]))
            scale = (
                max(1.0, float(chi2[p, j] / max(dof[p, j], 1.0))) if np.any(dof[p] > 0) else 1.0
            )
            total = cost[p] + chi2[p] / scale
            i = int(np.argmin(total))
            if i < 2 or i > len(grid) - 3:
                continue  # at the edge of the window: this patch does not know
            w = np.exp(-0.5 * (total - total[i]))
            w /= w.sum()
            mean = float((w * grid).sum())
            if math.sqrt(float((w * (grid - mean) ** 2).sum())) > 0.3 * self.dof:
                continue  # too little information in this patch
            fi = float(grid[i])
            y0, y1, y2 = total[i - 1], total[i], total[i + 1]
            den = y0 - 2 * y1 + y2
            if den > 0:
                fi += float(np.clip(0.5 * (y0 - y2) / den, -1, 1)) * step
            out[idx] = fi
        return out

    def _cnn_cost_rows(self, zs: NDArray, bs: NDArray, grid: NDArray) -> NDArray:
        """:meth:`_cnn_cost` for every row of ``bs (P, N)`` (the patches' scores of the
        same frames; NaN = not measured there): ``(P, F)``."""
        P = bs.shape[0]
        ok = np.isfinite(bs)
        if not self.s.use_cnn or not ok.any():
            return np.zeros((P, len(grid)))
        lo_c, hi_c = self.cal.z_range
        d = np.clip(zs[None, :] - grid[:, None], lo_c, hi_c)
        pred = self.cal.b_calib(d.ravel(), clamp=True).reshape(d.shape)  # (F, N)
        resid = np.where(ok[:, None, :], bs[:, None, :] - pred[None], 0.0)  # (P, F, N)
        sb2, s2 = self.s.cnn_offset_sigma**2, self.s.cnn_sigma**2
        n = ok.sum(axis=1)[:, None]
        beta = resid.sum(axis=2) / (n + s2 / sb2)
        r = np.where(ok[:, None, :], resid - beta[..., None], 0.0)
        return (r**2).sum(axis=2) / s2 + beta**2 / sb2

    def _patch_spec_costs(
        self, zs: NDArray, cells: list[tuple[int, ...]], grid: NDArray
    ) -> tuple[NDArray, NDArray]:
        """:meth:`_spec_cost` of every patch ``cells`` of the frames, batched: patches
        with spectra in the same frames share one solve (in chunks of bounded size)."""
        obs = self.observations
        F = len(grid)
        chi2 = np.zeros((len(cells), F))
        dof = np.zeros((len(cells), F))
        if not self.s.use_spectra:
            return chi2, dof

        def spectrum(o: Observation, idx: tuple[int, ...]) -> Spectrum | None:
            return o.patch_spectra[idx[0]][idx[1]] if o.patch_spectra is not None else None

        groups: dict[tuple[int, ...], list[int]] = {}
        for p, idx in enumerate(cells):
            use = tuple(i for i, o in enumerate(obs) if spectrum(o, idx) is not None)
            if len(use) >= 2:
                groups.setdefault(use, []).append(p)
        chunk = max(1, 4096 // F)
        for use, members in groups.items():
            T, WT, Tub = self._table(zs[list(use)], grid)
            for k in range(0, len(members), chunk):
                part = members[k : k + chunk]
                arrays = [
                    _spectra_arrays([spectrum(obs[i], cells[p]) for i in use])  # type: ignore[misc]
                    for p in part
                ]
                L, W, Lub, present = (
                    np.repeat(np.stack([a[j] for a in arrays]), F, axis=0) for j in range(4)
                )
                reps = (len(part), 1, 1)
                c2, d2 = self._spec_chi2(
                    L, W, Lub, present, np.tile(T, reps), np.tile(WT, reps), np.tile(Tub, reps)
                )
                chi2[part] = c2.reshape(len(part), F)
                dof[part] = d2.reshape(len(part), F)
        return chi2, dof


def _outward(z: float, others: NDArray) -> float:
    """+1 / -1: the direction away from ``others`` when every one of them lies on one side
    of ``z`` (``z`` is the outermost position); 0 otherwise."""
    if np.all(others < z):
        return 1.0
    if np.all(others > z):
        return -1.0
    return 0.0


def _spectra_arrays(specs: list[Spectrum]) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Frames' spectra as ``(N, K)`` arrays: log signal (NaN = undetected), its weight,
    the detection limit and where the bin holds any frequency."""
    obs = [s.log_signal() for s in specs]
    L = np.stack([o[0] for o in obs])
    W = np.stack([o[1] for o in obs])
    # (each frame's limit in every bin: ``+ 0 * L`` here once made it NaN wherever the
    # frame detected nothing -- exactly where the bound applies -- and the bound 0)
    Lub = np.repeat(np.array([s.detection_limit() for s in specs])[:, None], L.shape[1], axis=1)
    present = np.stack([s.counts > 0 for s in specs])
    return L, W, Lub, present


@dataclass(frozen=True)
class FieldPlane:
    """A plane through a per-patch focus map (:func:`field_plane`); um, image axes.

    ``tilt_x_um`` / ``tilt_y_um``: the focus change across the field, edge to edge along
    its rows (x, the columns' direction) / columns (y) (with the prior, if one was
    given); ``own_*``: the same from the map alone, with their standard errors (what
    :func:`pool_field_tilts` pools; NaN / inf when the patches lie in one row or column).
    """

    centre: float
    centre_sd: float
    tilt_x_um: float
    tilt_y_um: float
    n: int
    z_min: float
    z_max: float
    own_tilt_x_um: float
    own_tilt_y_um: float
    own_tilt_x_sd_um: float
    own_tilt_y_sd_um: float

    @property
    def tilt_um(self) -> float:
        """The plane's focus change across the field (um)."""
        return float(math.hypot(self.tilt_x_um, self.tilt_y_um))


def field_plane(
    fmap: NDArray[np.float64],
    inlier_tol: float,
    *,
    prior: tuple[float, float, float] | None = None,
) -> FieldPlane | None:
    """The robust plane through a per-patch focus map, or None with < 5 patches on it
    (or, without a prior, with those patches all in one row or column).

    The patches: the consensus of those within ``inlier_tol`` (um) of a plane
    (:func:`.results.fit_focus_plane`). Their scatter about it is robust (1.4826 MAD,
    for the residual degrees of freedom), and the standard errors are widened by the
    Student t quantile for those degrees of freedom (a scatter from 2 residual degrees
    of freedom is itself uncertain: x2.2 at 5 patches, x1.1 at 20). With ``prior=(tx,
    ty, sd)`` (um across the field, as ``tilt_x_um`` / ``tilt_y_um``) the slopes are
    fitted with that Gaussian prior (a weighted least-squares fit; the residual degrees
    of freedom are then ``n`` less the fit's effective number of parameters, between 1
    and 3): few patches fix the plane's level at the centre when the slide's tilt is
    known.
    """
    from .results import _fit_plane

    fm = np.asarray(fmap, dtype=float)
    if int(np.isfinite(fm).sum()) < 5:
        return None
    coef, keep, x, y, z = _fit_plane(fm, 1, 1.0, inlier_tol)
    n = int(keep.sum())
    if n < 5:
        return None
    rows, cols = fm.shape
    A = np.column_stack([np.ones(n), x[keep], y[keep]])
    zk = z[keep]
    AtA = A.T @ A
    r = zk - A @ coef
    # the patches' scatter about the plane (robust; n - 3 residual degrees of freedom)
    scatter = 1.4826 * float(np.median(np.abs(r))) * math.sqrt(n / (n - 3))
    widen = float(stats.t.ppf(0.975, n - 3)) / _Z975
    # no error below this (the map's values come off a grid: a scatter of zero is not one)
    floor = 0.05 * inlier_tol
    if np.linalg.matrix_rank(AtA) < 3:
        # patches all in one row or column: their own plane has no slope across it
        if prior is None:
            return None
        own_cov = None
        own = (math.nan, math.nan, math.inf, math.inf)
    else:
        own_cov = np.linalg.inv(AtA) * scatter**2
        own = (
            float(coef[1]) * cols,
            float(coef[2]) * rows,
            max(math.sqrt(float(own_cov[1, 1])) * cols * widen, floor),
            max(math.sqrt(float(own_cov[2, 2])) * rows * widen, floor),
        )
    theta, cov = np.asarray(coef, dtype=float), own_cov
    if prior is not None:
        tx, ty, sd = prior
        p_prec = np.array([0.0, (cols / sd) ** 2, (rows / sd) ** 2])
        p_mean = np.array([0.0, tx / cols, ty / rows])
        s = max(scatter, floor)
        for _ in range(4):  # the scatter about the fit weighs the patches against the prior
            cov = np.linalg.inv(AtA / s**2 + np.diag(p_prec))
            theta = cov @ (A.T @ zk / s**2 + p_prec * p_mean)
            p_eff = float(np.trace(cov @ AtA)) / s**2  # 1 (slopes known) .. 3 (prior weak)
            dof = max(n - p_eff, 1.0)
            res = zk - A @ theta
            s = max(1.4826 * float(np.median(np.abs(res))) * math.sqrt(n / dof), floor)
        cov = np.linalg.inv(AtA / s**2 + np.diag(p_prec))
        theta = cov @ (A.T @ zk / s**2 + p_prec * p_mean)
        dof = max(n - float(np.trace(cov @ AtA)) / s**2, 1.0)
        widen = float(stats.t.ppf(0.975, dof)) / _Z975
    assert cov is not None
    plane = A @ theta
    return FieldPlane(
        centre=float(theta[0]),
        centre_sd=math.sqrt(float(cov[0, 0])) * widen,
        tilt_x_um=float(theta[1]) * cols,
        tilt_y_um=float(theta[2]) * rows,
        n=n,
        z_min=float(plane.min()),
        z_max=float(plane.max()),
        own_tilt_x_um=own[0],
        own_tilt_y_um=own[1],
        own_tilt_x_sd_um=own[2],
        own_tilt_y_sd_um=own[3],
    )


def pool_field_tilts(planes: list[FieldPlane]) -> tuple[float, float, float] | None:
    """The field tilt ``(tx, ty, sd)`` (um across the field) expected in the next field
    of a slide, from the planes of its earlier fields (a scan's tiles: the camera sees
    the slide's tilt the same way in every field), for :class:`DeepFocusSearch`'s
    ``field_tilt``.

    A random-effects mean of the planes' own tilt estimates (weights ``1 / (sd_i^2 +
    tau^2)``; ``tau^2``, the spread of the true tilt from field to field -- a warped
    slide, a wrong plane -- estimated from their scatter, DerSimonian-Laird), and
    ``sd`` the spread expected of the next field's tilt about it, ``sqrt(se^2 +
    tau^2)``, the larger of the two axes'. None without a plane with finite errors.
    """
    usable = [
        p
        for p in planes
        if math.isfinite(p.own_tilt_x_sd_um) and math.isfinite(p.own_tilt_y_sd_um)
    ]
    if not usable:
        return None
    out = []
    for value, sd in (
        ("own_tilt_x_um", "own_tilt_x_sd_um"),
        ("own_tilt_y_um", "own_tilt_y_sd_um"),
    ):
        v = np.array([getattr(p, value) for p in usable])
        var = np.array([getattr(p, sd) for p in usable]) ** 2
        w = 1.0 / var
        mean = float((w * v).sum() / w.sum())
        q = float((w * (v - mean) ** 2).sum())
        c = float(w.sum() - (w * w).sum() / w.sum())
        tau2 = max(0.0, (q - (len(v) - 1)) / c) if len(v) > 1 and c > 0 else 0.0
        w = 1.0 / (var + tau2)
        mean = float((w * v).sum() / w.sum())
        out.append((mean, math.sqrt(1.0 / float(w.sum()) + tau2)))
    return out[0][0], out[1][0], max(out[0][1], out[1][1])


def _check_field_tilt(field_tilt: Any) -> tuple[float, float, float] | None:
    """``None``, or ``(tx, ty, sd)`` in um with finite values and sd > 0."""
    if field_tilt is None:
        return None
    try:
        tx, ty, sd = (float(v) for v in field_tilt)
    except (TypeError, ValueError):
        tx = ty = sd = float("nan")
    if not (math.isfinite(tx) and math.isfinite(ty) and math.isfinite(sd) and sd > 0):
        raise ValueError(
            f"field_tilt={field_tilt!r} must be (tilt_x, tilt_y, sd) in um across the field "
            "(finite, sd > 0), e.g. from pool_field_tilts(); pass None when unknown."
        )
    return tx, ty, sd


def _check_prior(prior: Any) -> tuple[float, float] | None:
    """``None``, or a warm-start prior ``(z, sd)`` with finite z and finite sd > 0 (um)."""
    if prior is None:
        return None
    try:
        z, sd = (float(v) for v in prior)
    except (TypeError, ValueError):
        z = sd = float("nan")
    if not (math.isfinite(z) and math.isfinite(sd) and sd > 0):
        raise ValueError(
            f"prior={prior!r} must be (z, sd) in um with a finite z and a finite sd > 0 "
            "(the last focus and its uncertainty); pass prior=None for a cold start."
        )
    return z, sd


def _grid(lo: float, hi: float, step: float) -> NDArray[np.float64]:
    """Evenly spaced candidates from lo to hi inclusive (never beyond hi)."""
    if hi <= lo:
        return np.array([lo])
    n = max(2, math.floor((hi - lo) / step) + 1)
    g = lo + np.arange(n, dtype=np.float64) * step
    return g if g[-1] >= hi - 1e-12 else np.append(g, np.float64(hi))


def _banded_solve(a0: NDArray, a1: NDArray, a2: NDArray, b: NDArray) -> NDArray:
    """Solve symmetric positive-definite pentadiagonal systems, batched over rows.

    ``a0 (F, K)`` diagonal, ``a1 (F, K-1)`` and ``a2 (F, K-2)`` the first and second
    off-diagonals, ``b (F, K, R)`` right-hand sides; banded Cholesky, O(F K R).

    The K steps are sequential, so each is a handful of numpy calls on length-F rows:
    the rows are laid out ``(K, R, F)`` (contiguous, broadcast over the leading axis),
    the factor and the forward substitution share one loop, and every step writes in
    place (this runs twice per posterior update: the search's largest cost).
    """
    F, K = a0.shape
    A0, A1, A2 = (np.ascontiguousarray(a.T) for a in (a0, a1, a2))
    y = np.transpose(b, (1, 2, 0)).copy()  # (K, R, F): solved in place
    inv = np.empty((K, F))  # 1 / the factor's diagonal
    e = np.zeros((K, F))  # its first and second sub-diagonals
    f = np.zeros((K, F))
    tmp = np.empty(F)
    t2 = np.empty(y.shape[1:])
    for k in range(K):
        v = A0[k].copy()
        if k >= 1:
            v -= np.square(e[k - 1], out=tmp)
        if k >= 2:
            v -= np.square(f[k - 2], out=tmp)
        dk = np.sqrt(np.maximum(v, 1e-12, out=v), out=v)
        if k + 1 < K:
            if k >= 1:
                np.subtract(A1[k], np.multiply(f[k - 1], e[k - 1], out=tmp), out=e[k])
                e[k] /= dk
            else:
                np.divide(A1[k], dk, out=e[k])
        if k + 2 < K:
            np.divide(A2[k], dk, out=f[k])
        np.divide(1.0, dk, out=inv[k])
        yk = y[k]  # forward: L y = b
        if k >= 1:
            yk -= np.multiply(e[k - 1], y[k - 1], out=t2)
        if k >= 2:
            yk -= np.multiply(f[k - 2], y[k - 2], out=t2)
        yk *= inv[k]
    for k in range(K - 1, -1, -1):  # backward: L' x = y, x over y
        yk = y[k]
        if k + 1 < K:
            yk -= np.multiply(e[k], y[k + 1], out=t2)
        if k + 2 < K:
            yk -= np.multiply(f[k], y[k + 2], out=t2)
        yk *= inv[k]
    # the layout the callers' matmuls have always seen ((K, F, R) moved), so their
    # float rounding is unchanged
    return np.moveaxis(np.ascontiguousarray(np.transpose(y, (0, 2, 1))), 0, 1)


@lru_cache(maxsize=8)
def _smoothness(K: int, curvature: float, slope: float) -> tuple[NDArray, NDArray]:
    """The spectral ratio's smoothness penalty ``Pc`` over ``K`` bins and ``Pc`` plus a
    weak ridge (read-only; cached: every posterior evaluation uses the same)."""
    D2 = np.diff(np.eye(K), 2, axis=0)
    D1 = np.diff(np.eye(K), 1, axis=0)
    Pc = curvature * D2.T @ D2 + slope * D1.T @ D1
    P = Pc + 1e-4 * np.eye(K)
    Pc.setflags(write=False)
    P.setflags(write=False)
    return Pc, P


def _solve_two_way(w: NDArray, y: NDArray, P: NDArray, pd: float) -> tuple[NDArray, NDArray]:
    """Minimize sum w (y - c_k - d_i)^2 + c'Pc + pd |d|^2 for every candidate (batched).

    ``w, y``: ``(F, N, K)``; ``P`` is pentadiagonal ``(K, K)``. Exact: ``c`` is eliminated
    with a banded Cholesky of ``M = P + diag(sum_i w)`` (N + 1 right-hand sides), leaving
    an N x N system for the per-frame offsets ``d``. Returns ``c (F, K)``, ``d (F, N)``.
    """
    F, N, K = w.shape
    wk = w.sum(axis=1)
    a0 = np.diag(P)[None, :] + wk
    a1 = np.broadcast_to(np.diag(P, 1)[None, :], (F, K - 1))
    a2 = np.broadcast_to(np.diag(P, 2)[None, :], (F, K - 2))
    bc = (w * y).sum(axis=1)  # (F, K)
    Wt = np.transpose(w, (0, 2, 1))  # (F, K, N)
    sol = _banded_solve(a0, a1, a2, np.concatenate([bc[:, :, None], Wt], axis=2))
    m_bc, m_wt = sol[:, :, 0], sol[:, :, 1:]  # M^-1 bc, M^-1 W'
    A = -(w @ m_wt)  # -W M^-1 W'
    idx = np.arange(N)
    A[:, idx, idx] += w.sum(axis=2) + pd
    rhs = (w * y).sum(axis=2) - (w @ m_bc[..., None])[..., 0]
    d = np.linalg.solve(A, rhs[..., None])[..., 0]
    c = m_bc - (m_wt @ d[..., None])[..., 0]
    return c, d


def make_search(strategy: str, calibration: Calibration | None, **kw: Any) -> Search:
    """Build a strategy by name: ``"deepfocus"`` (ours), ``"paper"`` or ``"brent"``."""
    if strategy == "deepfocus":
        if calibration is None:
            raise ValueError("strategy 'deepfocus' needs a calibration.")
        return DeepFocusSearch(calibration, **kw)
    if strategy == "paper":
        if calibration is None:
            raise ValueError("strategy 'paper' needs a calibration.")
        return PaperSearch(calibration, **kw)
    if strategy == "brent":
        kw.pop("settings", None)
        kw.pop("prior", None)
        kw.pop("field_tilt", None)
        return BrentSearch(**kw)
    raise ValueError(f"Unknown strategy {strategy!r}; use 'deepfocus', 'paper' or 'brent'.")


_ = EDGES
