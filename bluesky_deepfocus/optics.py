"""Widefield image formation: objectives, defocused PSFs, blur and the camera model.

Everything here is plain numpy/scipy and knows nothing of Micro-Manager or Bluesky.

The point-spread function is computed from a circular pupil carrying the *exact*
(non-paraxial) defocus phase

.. math:: \\phi(f) = 2\\pi z \\left(\\sqrt{(n/\\lambda)^2 - f^2} - n/\\lambda\\right),

plus optional Zernike aberrations (Noll indices, coefficients in waves). The amplitude
PSF is the inverse Fourier transform of the pupil; its squared modulus is computed on a
grid oversampled by an odd factor and binned to camera pixels (pixel integration).
Images are formed incoherently by linear (zero-padded) FFT convolution, so nothing wraps
around: :func:`blur` with ``mode="valid"`` takes an object that is larger than the
output by the PSF footprint and returns only pixels whose light is fully accounted for.

References
----------
Born & Wolf, *Principles of Optics*, 7th ed., sec. 8.8 (defocused aberration-free
imaging). Noll, R. J., "Zernike polynomials and atmospheric turbulence",
J. Opt. Soc. Am. 66, 207 (1976). The depth of field uses the non-paraxial axial extent
``lambda / (n - sqrt(n^2 - NA^2))``, which gives the 10.7 um the DeepFocus paper quotes
for a 10x/0.3 objective at lambda = 0.49 um (11.3 um at our default 0.52 um) (Shajkofci & Liebling, ICIP 2020, doi:10.1109/ICIP40778.2020.9190969).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import signal

__all__ = [
    "OBJECTIVES",
    "CameraModel",
    "Objective",
    "blur",
    "encircled_energy_radius",
    "far_defocus_image",
    "get_objective",
    "noll_to_nm",
    "objective_psf",
    "psf_support_px",
    "render_depth_variant",
    "widefield_psf",
    "zernike",
]

FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """A microscope objective with its camera sampling.

    Parameters
    ----------
    name
        Label used as the calibration key, e.g. ``"10x/0.3"``.
    magnification, na
        Total magnification onto the camera and numerical aperture.
    immersion_index
        Refractive index of the immersion medium (1.0 air, 1.33 water, 1.515 oil).
    wavelength_um
        Emission (imaging) wavelength in micrometres.
    camera_pixel_um
        Physical camera pixel pitch in micrometres (6.5 um for common sCMOS).

    Examples
    --------
    >>> obj = get_objective("10x/0.3")
    >>> round(obj.pixel_size_um, 3), round(obj.dof_um, 1)
    (0.65, 11.3)
    """

    name: str
    magnification: float
    na: float
    immersion_index: float = 1.0
    wavelength_um: float = 0.52
    camera_pixel_um: float = 6.5

    def __post_init__(self) -> None:
        if not 0 < self.na < self.immersion_index:
            raise ValueError(
                f"Objective {self.name!r}: NA={self.na!r} must be positive and below the "
                f"immersion index n={self.immersion_index!r}."
            )
        if self.magnification <= 0 or self.wavelength_um <= 0 or self.camera_pixel_um <= 0:
            raise ValueError(
                f"Objective {self.name!r}: magnification, wavelength and camera pixel must be "
                f"positive (got {self.magnification!r}, {self.wavelength_um!r}, "
                f"{self.camera_pixel_um!r})."
            )

    @property
    def pixel_size_um(self) -> float:
        """Pixel size in the sample plane (um)."""
        return self.camera_pixel_um / self.magnification

    @property
    def half_angle(self) -> float:
        """Half-angle of the collected cone, ``asin(NA/n)`` (radians)."""
        return math.asin(self.na / self.immersion_index)

    @property
    def dof_um(self) -> float:
        """Depth of field ``lambda / (n - sqrt(n^2 - NA^2))`` (um)."""
        n = self.immersion_index
        return self.wavelength_um / (n - math.sqrt(n * n - self.na * self.na))

    @property
    def resolution_um(self) -> float:
        """Rayleigh lateral resolution ``0.61 lambda / NA`` (um)."""
        return 0.61 * self.wavelength_um / self.na

    @property
    def nyquist_pixel_um(self) -> float:
        """Largest pixel that samples the incoherent band limit, ``lambda / (4 NA)``."""
        return self.wavelength_um / (4 * self.na)

    def geometric_blur_radius_um(self, defocus_um: float) -> float:
        """Radius of the geometric defocus disc, ``|z| tan(asin(NA/n))`` (um)."""
        return abs(defocus_um) * math.tan(self.half_angle)

    def blur_radius_px(self, defocus_um: float) -> float:
        """Effective blur radius in pixels: geometric disc combined with the Airy core.

        ``sqrt(r_geo^2 + r_airy^2 + (0.5 px)^2)``; this is the quantity the CNN regresses
        (as a logarithm), because it is determined by the pixels alone, whatever NA,
        wavelength and pixel size produced them.
        """
        r_geo = self.geometric_blur_radius_um(defocus_um) / self.pixel_size_um
        r_airy = 0.5 * self.resolution_um / self.pixel_size_um
        return math.sqrt(r_geo * r_geo + r_airy * r_airy + 0.25)

    def psf_support_px(self, defocus_um: float, aberration_waves: float = 0.0) -> int:
        """:func:`psf_support_px` for this objective: the odd side (camera pixels) of a
        box that holds its PSF at ``defocus_um``."""
        return psf_support_px(
            defocus_um,
            na=self.na,
            wavelength_um=self.wavelength_um,
            pixel_size_um=self.pixel_size_um,
            immersion_index=self.immersion_index,
            aberration_waves=aberration_waves,
        )

    def with_(self, **changes: float | str) -> Objective:
        """Return a copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, float | str]:
        """Plain-dict form for metadata and configuration readings."""
        return {
            "name": self.name,
            "magnification": self.magnification,
            "na": self.na,
            "immersion_index": self.immersion_index,
            "wavelength_um": self.wavelength_um,
            "camera_pixel_um": self.camera_pixel_um,
            "pixel_size_um": self.pixel_size_um,
            "dof_um": self.dof_um,
        }


OBJECTIVES: Mapping[str, Objective] = {
    o.name: o
    for o in (
        Objective("4x/0.13", 4, 0.13),
        Objective("10x/0.3", 10, 0.30),
        Objective("20x/0.45", 20, 0.45),
        Objective("20x/0.75", 20, 0.75),
        Objective("40x/0.75", 40, 0.75),
        Objective("60x/1.4", 60, 1.40, immersion_index=1.515),
        Objective("100x/1.45", 100, 1.45, immersion_index=1.515),
    )
}


def get_objective(objective: str | Objective) -> Objective:
    """Return an :class:`Objective` from a preset name (or pass one through)."""
    if isinstance(objective, Objective):
        return objective
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise KeyError(
            f"Unknown objective {objective!r}. Use one of {sorted(OBJECTIVES)} or pass an "
            "`Objective(name, magnification, na, ...)`."
        ) from None


# --------------------------------------------------------------------------------------
# Zernike polynomials (Noll ordering)
# --------------------------------------------------------------------------------------
def noll_to_nm(j: int) -> tuple[int, int]:
    """Radial order n and azimuthal frequency m of Noll index ``j`` (j >= 1).

    >>> [noll_to_nm(j) for j in (1, 2, 3, 4, 5, 6, 11)]
    [(0, 0), (1, 1), (1, -1), (2, 0), (2, -2), (2, 2), (4, 0)]
    """
    if j < 1:
        raise ValueError(f"Noll index must be >= 1, got {j!r}.")
    n, rem = 0, j - 1
    while rem > n:
        n += 1
        rem -= n
    m = (-1) ** j * ((n % 2) + 2 * ((rem + (n + 1) % 2) // 2))
    return n, m


def zernike(j: int, rho: ArrayLike, theta: ArrayLike) -> FloatArray:
    """Noll-normalized Zernike polynomial Z_j on the unit disc (zero outside)."""
    n, m = noll_to_nm(j)
    rho = np.asarray(rho, dtype=float)
    theta = np.asarray(theta, dtype=float)
    am = abs(m)
    radial = np.zeros_like(rho)
    for s in range((n - am) // 2 + 1):
        coef = (
            (-1) ** s
            * math.factorial(n - s)
            / (
                math.factorial(s)
                * math.factorial((n + am) // 2 - s)
                * math.factorial((n - am) // 2 - s)
            )
        )
        radial += coef * rho ** (n - 2 * s)
    if m == 0:
        z = math.sqrt(n + 1) * radial
    elif m > 0:
        z = math.sqrt(2 * (n + 1)) * radial * np.cos(am * theta)
    else:
        z = math.sqrt(2 * (n + 1)) * radial * np.sin(am * theta)
    return np.where(rho <= 1.0, z, 0.0)


# --------------------------------------------------------------------------------------
# PSF
# --------------------------------------------------------------------------------------
def psf_support_px(
    defocus_um: float,
    *,
    na: float,
    wavelength_um: float,
    pixel_size_um: float,
    immersion_index: float = 1.0,
    aberration_waves: float = 0.0,
) -> int:
    """Odd side length (camera pixels) that holds a PSF without wrap-around.

    The geometric disc radius ``|z| tan(theta)`` is padded by 25 % and by eight Airy
    radii (plus a term for aberrations), so the diffraction tails that leave the box carry
    a negligible fraction of the energy.
    """
    tan_t = math.tan(math.asin(na / immersion_index))
    r_geo = abs(defocus_um) * tan_t
    airy = 0.61 * wavelength_um / na
    # each wave of low-order aberration spreads the PSF by about lambda/NA
    r = 1.25 * r_geo + 8 * airy + 2.0 * abs(aberration_waves) * wavelength_um / na
    half = math.ceil(r / pixel_size_um) + 2
    return 2 * half + 1


def _oversample(na: float, wavelength_um: float, pixel_size_um: float) -> int:
    """Odd oversampling factor so the intensity band limit 2NA/lambda is Nyquist sampled."""
    need = pixel_size_um / (wavelength_um / (4 * na))
    os_ = max(3, math.ceil(need))
    return os_ if os_ % 2 else os_ + 1


def widefield_psf(
    defocus_um: float,
    *,
    na: float,
    wavelength_um: float,
    pixel_size_um: float,
    immersion_index: float = 1.0,
    zernike_waves: Mapping[int, float] | None = None,
    size: int | None = None,
    oversample: int | None = None,
    return_fine: bool = False,
) -> FloatArray:
    """Incoherent widefield PSF at a defocus, integrated over camera pixels.

    Parameters
    ----------
    defocus_um
        Axial distance of the object from the focal plane (um); the sign matters only
        when odd aberrations (e.g. spherical, Noll 11) are present.
    na, wavelength_um, pixel_size_um, immersion_index
        Optical parameters; ``pixel_size_um`` is in the sample plane.
    zernike_waves
        Optional aberrations ``{noll_index: coefficient_in_waves}`` (RMS-normalized).
    size
        Odd side length in pixels; default :func:`psf_support_px`.
    oversample
        Odd sub-pixel factor for the pupil computation; default chosen so that the
        intensity band limit is Nyquist sampled (at least 3).
    return_fine
        Also return the oversampled intensity (normalized) and the factor:
        ``(psf, fine, oversample)``.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 PSF, non-negative, summing to 1, centred on pixel
        ``(size // 2, size // 2)``.

    Examples
    --------
    >>> p = widefield_psf(0.0, na=0.3, wavelength_um=0.52, pixel_size_um=0.65)
    >>> round(float(p.sum()), 6), p.shape[0] % 2
    (1.0, 1)
    """
    if not 0 < na < immersion_index:
        raise ValueError(f"NA={na!r} must be in (0, n={immersion_index!r}).")
    if not np.isfinite(defocus_um):
        raise ValueError(f"defocus_um={defocus_um!r} is not finite.")
    ab = float(sum(abs(v) for v in (zernike_waves or {}).values()))
    if size is None:
        size = psf_support_px(
            defocus_um,
            na=na,
            wavelength_um=wavelength_um,
            pixel_size_um=pixel_size_um,
            immersion_index=immersion_index,
            aberration_waves=ab,
        )
    if size % 2 == 0 or size < 3:
        raise ValueError(f"PSF size must be odd and >= 3, got {size!r}.")
    os_ = oversample or _oversample(na, wavelength_um, pixel_size_um)
    if os_ % 2 == 0:
        raise ValueError(f"oversample must be odd so the PSF stays centred, got {os_!r}.")
    n_grid = size * os_
    dx = pixel_size_um / os_
    fc = na / wavelength_um
    k = immersion_index / wavelength_um
    if not return_fine and n_grid > FINE_GRID_MAX and 4 * fc * pixel_size_um <= 1.0:
        # the camera pixels already sample the intensity's band (|f| <= 2 NA/lambda)
        # without aliasing: the same PSF from the pixel grid, with the sum over each
        # pixel's os x os sub-samples done in Fourier space (see _pixel_grid_psf)
        return _pixel_grid_psf(defocus_um, size, os_, pixel_size_um, fc, k, zernike_waves)
    f = np.fft.fftfreq(n_grid, d=dx)
    amp = _pupil_amplitude(f, defocus_um, fc, k, zernike_waves)
    fine = np.fft.fftshift(amp.real**2 + amp.imag**2)
    fine /= fine.sum()
    inten = fine.reshape(size, os_, size, os_).sum(axis=(1, 3))
    if return_fine:
        return np.asarray(inten, dtype=np.float64), fine, os_  # type: ignore[return-value]
    return np.asarray(inten, dtype=np.float64)


def _pupil_amplitude(
    f: NDArray[np.floating[Any]],
    defocus_um: float,
    fc: float,
    k: float,
    zernike_waves: Mapping[int, float] | None,
) -> NDArray[np.complex128]:
    """Inverse 2-D DFT (unshifted) of the defocused pupil sampled at frequencies ``f``
    (both axes): the amplitude PSF on that grid.

    The pupil fills only the rows/columns with ``|f| <= fc`` (a small part of a defocused
    PSF's grid): it is built there and the all-zero rows are skipped in the first pass of
    the 2-D inverse FFT (the same per-axis transforms as ifft2, in the same order: the same
    numbers, ~2x faster far from focus)."""
    n = len(f)
    band = np.flatnonzero(np.abs(f) <= fc)
    fb = f[band]
    fx, fy = np.meshgrid(f, fb, indexing="xy")  # rows: the band; columns: every frequency
    f2 = fx * fx + fy * fy
    inside = f2 <= fc * fc
    kz = np.sqrt(np.maximum(k * k - f2[inside], 0.0))
    phase = 2 * np.pi * defocus_um * (kz - k)
    if zernike_waves:  # evaluated inside the pupil only
        rho = np.sqrt(f2[inside]) / fc
        theta = np.arctan2(fy[inside], fx[inside])
        for j, c in zernike_waves.items():
            if c:
                phase = phase + 2 * np.pi * c * zernike(int(j), rho, theta)
    rows = np.zeros(f2.shape, dtype=np.complex128)
    rows[inside] = np.exp(1j * phase)
    amp = np.zeros((n, n), dtype=np.complex128)
    amp[band] = np.fft.ifft(rows, axis=1)
    return np.fft.ifft(amp, axis=0)


#: largest side of the oversampled grid on which :func:`widefield_psf` computes a PSF
#: directly; beyond it (a 40x/0.75 PSF > ~75 um out of focus: 150 um out, an 8000^2
#: complex grid, 2.7 GB at its peak and 7 s) a PSF whose band the camera pixels already
#: sample is computed on the pixel grid instead (:func:`_pixel_grid_psf`, the same numbers
#: to rounding, ~os^2 less memory)
FINE_GRID_MAX = 4096


def _pixel_grid_psf(
    defocus_um: float,
    size: int,
    os_: int,
    pixel_size_um: float,
    fc: float,
    k: float,
    zernike_waves: Mapping[int, float] | None,
) -> FloatArray:
    """:func:`widefield_psf` computed on the camera-pixel grid, for pixels that sample
    the intensity's band (``4 fc pixel <= 1``).

    The amplitude at the pixel centres is the same DFT of the same pupil samples as on
    the ``os_``-times finer grid (the frequency step ``1 / (size pixel)`` is the same), and
    the intensity, band-limited to ``2 fc``, is then fully determined by its samples there.
    Summing a pixel's ``os_ x os_`` fine sub-samples (offsets ``a pixel / os_``,
    ``|a| <= os_ // 2``) is a convolution: in Fourier space a product with
    ``D(f) = sum_a exp(2 pi i f a pixel / os_)`` per axis."""
    f = np.fft.fftfreq(size, d=pixel_size_um)
    amp = _pupil_amplitude(f, defocus_um, fc, k, zernike_waves)
    otf = np.fft.fft2(amp.real**2 + amp.imag**2)
    del amp
    a = np.arange(1, os_ // 2 + 1)
    d = 1.0 + 2.0 * np.cos(2 * np.pi * np.outer(f, a) * (pixel_size_um / os_)).sum(axis=1)
    otf *= d[:, None] * d[None, :]
    psf = np.fft.fftshift(np.fft.ifft2(otf).real)
    np.maximum(psf, 0.0, out=psf)  # rounding: a few 1e-20 below zero in the far tails
    psf /= psf.sum()
    return psf


#: the PSF cache's bounds: at most this many PSFs and this many bytes in all. PSFs far out
#: of focus at high NA are large (a 40x/0.75 PSF 40 um out is ~9 MB, 150 um out ~30 MB):
#: with a count alone a long benchmark's process held 10 GB of them and was killed
PSF_CACHE_ENTRIES = 256
PSF_CACHE_BYTES = 512 * 2**20
_psf_cache: OrderedDict[tuple[Any, ...], FloatArray] = OrderedDict()
_psf_cache_lock = threading.Lock()


def _cached_psf(
    defocus_um: float,
    na: float,
    wavelength_um: float,
    pixel_size_um: float,
    immersion_index: float,
    zernike_items: tuple[tuple[int, float], ...],
    size: int | None,
) -> FloatArray:
    """:func:`widefield_psf`, read-only, kept in a least-recently-used cache bounded by
    :data:`PSF_CACHE_ENTRIES` and :data:`PSF_CACHE_BYTES` (the newest PSF is always kept)."""
    key = (defocus_um, na, wavelength_um, pixel_size_um, immersion_index, zernike_items, size)
    with _psf_cache_lock:
        hit = _psf_cache.get(key)
        if hit is not None:
            _psf_cache.move_to_end(key)
            return hit
    out = widefield_psf(
        defocus_um,
        na=na,
        wavelength_um=wavelength_um,
        pixel_size_um=pixel_size_um,
        immersion_index=immersion_index,
        zernike_waves=dict(zernike_items),
        size=size,
    )
    out.setflags(write=False)
    with _psf_cache_lock:
        _psf_cache[key] = out
        _psf_cache.move_to_end(key)
        total = _psf_bytes()
        while len(_psf_cache) > 1 and (
            len(_psf_cache) > PSF_CACHE_ENTRIES or total > PSF_CACHE_BYTES
        ):
            _, old = _psf_cache.popitem(last=False)
            total -= old.nbytes
    return out


def _psf_bytes() -> int:
    return sum(a.nbytes for a in _psf_cache.values())  # the caller holds the lock


def psf_cache_bytes() -> int:
    """Bytes held by the PSF cache (see :data:`PSF_CACHE_BYTES`)."""
    with _psf_cache_lock:
        return _psf_bytes()


def objective_psf(
    objective: Objective,
    defocus_um: float,
    *,
    zernike_waves: Mapping[int, float] | None = None,
    size: int | None = None,
    quantum_um: float = 0.01,
) -> FloatArray:
    """Cached :func:`widefield_psf` for an objective (defocus rounded to ``quantum_um``)."""
    z = round(float(defocus_um) / quantum_um) * quantum_um
    return _cached_psf(
        round(z, 6),
        objective.na,
        objective.wavelength_um,
        objective.pixel_size_um,
        objective.immersion_index,
        tuple(sorted((zernike_waves or {}).items())),
        size,
    )


def encircled_energy_radius(psf: ArrayLike, fraction: float = 0.9) -> float:
    """Radius (pixels) around the PSF centroid that holds ``fraction`` of its energy.

    Energy is accumulated in rings a quarter pixel wide and interpolated (O(N)).
    """
    p = np.asarray(psf, dtype=float)
    total = p.sum()
    yy, xx = np.indices(p.shape)
    cy, cx = (p * yy).sum() / total, (p * xx).sum() / total
    r = np.hypot(yy - cy, xx - cx).ravel()
    ring = np.floor(r * 4).astype(np.intp)
    energy = np.bincount(ring, p.ravel(), minlength=int(ring.max()) + 1)
    cum = np.cumsum(energy) / total
    edges = (np.arange(len(cum)) + 1) / 4.0
    return float(np.interp(fraction, np.r_[0.0, cum], np.r_[0.0, edges]))


# --------------------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------------------
def blur(obj: ArrayLike, psf: ArrayLike, mode: Literal["valid", "same"] = "valid") -> FloatArray:
    """Incoherent image of ``obj`` through ``psf`` by linear FFT convolution.

    ``mode="valid"`` (default) returns ``obj.shape - psf.shape + 1`` pixels, each fully
    lit by object pixels that exist: give the object a margin of ``psf.shape // 2`` on
    every side. ``mode="same"`` treats the object as zero outside (no wrap-around either,
    but dark borders).
    """
    o = np.asarray(obj, dtype=np.float64)
    p = np.asarray(psf, dtype=np.float64)
    if mode == "valid" and (o.shape[0] < p.shape[0] or o.shape[1] < p.shape[1]):
        raise ValueError(
            f"Object {o.shape} is smaller than the PSF {p.shape}: give the object a margin "
            "of psf.shape // 2 pixels on every side, or use mode='same'."
        )
    out = signal.fftconvolve(o, p, mode=mode)
    return np.maximum(out, 0.0)


#: geometric blur radius (camera pixels) beyond which :func:`far_defocus_image` renders a
#: field instead of a PSF convolution: 40x/0.75 ~147 um out of focus, 20x/0.75 ~293 um,
#: 60x/1.4 ~46 um, 100x/1.45 ~20 um, 20x/0.45 ~660 um, 10x/0.3 ~2.1 mm (so the 10x and
#: 20x/0.45 benchmarks never use it). There the defocus phase spans tens to hundreds of
#: waves and the stationary-phase OTF is the exact one to ~1e-3; the exact PSF takes
#: seconds (4 s and 7 GB for a 40x field 300 um out, plus 10 s to convolve)
FAR_DEFOCUS_BLUR_PX = 1024.0


def far_defocus_image(
    obj: ArrayLike,
    defocus_um: float,
    objective: Objective,
    shape: tuple[int, int],
    *,
    blur_per_cell: float = 64.0,
) -> FloatArray:
    """Image of the central ``shape`` pixels of ``obj`` far out of focus, fast.

    Far out of focus the image holds only spatial frequencies far below the camera's
    Nyquist limit. Its OTF there is the geometric-optics (stationary-phase) limit of the
    defocused pupil's: each pupil frequency ``f`` lands at radius ``r(f) = |z| f / kz``
    (``kz = sqrt(k^2 - f^2)``), so ``OTF(q) = int J0(2 pi q r(f)) 2 pi f df / (pi fc^2)``
    (a 1-D integral, tabulated). The object's spectrum is cut to the band where that OTF
    is not negligible (``|q| < 1 / (2 m)`` cycles per pixel, ``m`` a power of two with
    the blur radius >= ``blur_per_cell * m`` pixels), multiplied by the OTF, inverse-transformed on
    the ``m``-times coarser grid and interpolated back to the pixels (cubic spline: the
    image is band-limited well inside that grid's band). ``obj`` needs a margin of
    ``psf_support_px(defocus_um, ...) // 2`` pixels on every side, as for :func:`blur`.
    Measured against the PSF convolution on 40x fields 150-290 um out (6 families): the
    mean within 2.4e-3 (mostly < 5e-4) and the pattern within 0.51 % of the mean (the
    noisy frames' own sd is 1.5-15 % of their mean; ``tests/test_optics.py``). Its OTF
    is ~1e-3 off the exact one beyond the first lobes (the stationary-phase limit). Time and memory grow with the crop, ``(field + 2.5 r)^2``
    pixels (r the blur radius): 40x 1 mm out of focus, ~18000^2 pixels, ~2.6 GB.
    """
    from scipy import fft, ndimage, special

    o = np.asarray(obj, dtype=np.float32)
    H, W = shape
    px = objective.pixel_size_um
    r_px = objective.geometric_blur_radius_um(defocus_um) / px
    m = 1 << math.floor(math.log2(max(r_px / blur_per_cell, 1.0)))
    my, mx = (o.shape[0] - H) // 2, (o.shape[1] - W) // 2
    # the crop: the field plus whole coarse pixels of margin on each side
    ny, nx = (o.shape[0] // m) * m, (o.shape[1] // m) * m
    oy, ox = (o.shape[0] - ny) // 2, (o.shape[1] - nx) // 2
    crop = o[oy : oy + ny, ox : ox + nx]
    spec = fft.rfft2(crop)
    cy, cx = ny // m, nx // m
    ky, kx = cy // 2, cx // 2
    band = np.zeros((cy, kx + 1), dtype=spec.dtype)
    # the coarse grid's frequencies (at its band edge -- Nyquist; for odd sizes the last
    # row pair, dropped -- the OTF is ~1e-3 of its peak)
    band[:ky, : kx + 1] = spec[:ky, : kx + 1]
    band[cy - ky + 1 :, : kx + 1] = spec[ny - ky + 1 :, : kx + 1]
    q = np.hypot(np.fft.fftfreq(cy, d=m)[:, None], np.fft.rfftfreq(cx, d=m)[None, :]) / px
    fc = objective.na / objective.wavelength_um
    k = objective.immersion_index / objective.wavelength_um
    n_f = 2048
    fp = (np.arange(n_f) + 0.5) / n_f * fc  # pupil radii (midpoints)
    r = abs(float(defocus_um)) * fp / np.sqrt(k * k - fp * fp)  # where each lands (um)
    weight = 2.0 * fp / (n_f * fc)  # 2 pi f df / (pi fc^2)
    qs = np.linspace(0.0, float(q.max()) * (1 + 1e-6) + 1e-12, 2048)
    otf = special.j0(2 * np.pi * qs[:, None] * r[None, :]) @ weight
    band *= np.interp(q, qs, otf)
    coarse = fft.irfft2(band, s=(cy, cx)) / (m * m)
    # camera pixel i of the field is crop pixel (my - oy + i), coarse coordinate / m
    yy = (my - oy + np.arange(H)) / m
    xx = (mx - ox + np.arange(W)) / m
    image = ndimage.map_coordinates(
        coarse, np.meshgrid(yy, xx, indexing="ij"), order=3, mode="grid-wrap"
    )
    return np.maximum(image, 0.0)


def render_depth_variant(
    obj: ArrayLike,
    defocus_map_um: ArrayLike,
    objective: Objective,
    *,
    zernike_waves: Mapping[int, float] | None = None,
    level_step_dof: float = 0.1,
    max_levels: int = 24,
) -> FloatArray:
    """Image of a (possibly tilted) thin specimen whose defocus varies across the field.

    The object must carry a margin of ``(obj.shape - defocus_map.shape) / 2`` pixels on
    each side (the PSF footprint at the largest defocus, see :func:`psf_support_px`). The
    field is blurred at a few defocus levels spanning the map (``level_step_dof`` DOF
    apart) and each output pixel interpolates linearly between the two levels around
    its own defocus, which converges to the exact depth-variant image as the step shrinks.

    Parameters
    ----------
    obj
        Object intensity, shape ``(H + 2m, W + 2m)``.
    defocus_map_um
        Scalar or ``(H, W)`` defocus of each output pixel (um).
    """
    o = np.asarray(obj, dtype=np.float64)
    dmap = np.asarray(defocus_map_um, dtype=np.float64)
    margin_y = o.shape[0] - (dmap.shape[0] if dmap.ndim else 0)
    margin_x = o.shape[1] - (dmap.shape[1] if dmap.ndim else 0)
    if dmap.ndim == 0:
        raise ValueError("render_depth_variant needs a 2-D defocus map; use blur() for a scalar.")
    if margin_y < 0 or margin_x < 0 or margin_y % 2 or margin_x % 2:
        raise ValueError(
            f"Object {o.shape} must exceed the defocus map {dmap.shape} by an even margin."
        )
    size = min(margin_y, margin_x) + 1
    lo, hi = float(dmap.min()), float(dmap.max())
    n_levels = int(
        min(max_levels, max(2, math.ceil((hi - lo) / (level_step_dof * objective.dof_um)) + 1))
    )
    levels = np.linspace(lo, hi, n_levels) if hi > lo else np.array([lo])
    images = [
        blur(o, objective_psf(objective, z, zernike_waves=zernike_waves, size=size))
        for z in levels
    ]
    if len(levels) == 1:
        return images[0]
    pos = (dmap - lo) / (hi - lo) * (len(levels) - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, len(levels) - 2)
    w = pos - i0
    stack = np.stack(images)
    rows, cols = np.indices(dmap.shape)
    return (1 - w) * stack[i0, rows, cols] + w * stack[i0 + 1, rows, cols]


# --------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraModel:
    """sCMOS-like camera: shot noise, read noise, gain, offset and bit depth.

    The expected photo-electrons of a pixel are
    ``photons_per_ms * exposure_ms * intensity`` where ``intensity`` is the optical
    image (object units, ~1 for bright structures in focus).

    Parameters
    ----------
    photons_per_ms
        Photo-electrons per ms per unit image intensity.
    read_noise_e
        Gaussian read noise (e- RMS).
    gain_e_per_adu
        Electrons per digital count.
    offset_adu
        Digital offset added to every pixel.
    bit_depth
        Saturation at ``2**bit_depth - 1``.
    """

    photons_per_ms: float = 50.0
    read_noise_e: float = 1.6
    gain_e_per_adu: float = 0.5
    offset_adu: float = 100.0
    bit_depth: int = 16
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def max_adu(self) -> int:
        return int(2**self.bit_depth - 1)

    def expose(
        self,
        intensity: ArrayLike,
        exposure_ms: float,
        rng: np.random.Generator | None = None,
        *,
        noise: bool = True,
    ) -> NDArray[np.uint16]:
        """Digitize an optical image into a ``uint16`` frame with camera noise."""
        img = np.asarray(intensity, dtype=np.float64)
        if exposure_ms < 0 or not np.isfinite(exposure_ms):
            raise ValueError(f"exposure_ms={exposure_ms!r} must be a finite value >= 0.")
        electrons = np.maximum(img, 0.0) * (self.photons_per_ms * exposure_ms)
        if noise:
            rng = rng if rng is not None else np.random.default_rng()
            electrons = rng.poisson(electrons).astype(np.float64)
            electrons += rng.normal(0.0, self.read_noise_e, size=electrons.shape)
        adu = electrons / self.gain_e_per_adu + self.offset_adu
        return np.clip(np.rint(adu), 0, self.max_adu).astype(np.uint16)
