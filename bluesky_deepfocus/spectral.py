"""Radial power spectra of frames: the specimen-cancelling half of our autofocus.

For a thin specimen imaged incoherently, the frame's power spectrum is
``|O(k)|^2 |H(k; z - f)|^2 + N``: specimen spectrum times the defocus transfer function
plus white camera noise. Between two frames of the *same* field at known stage
positions the specimen factor is identical, so differences of ``log(P - N)`` depend
only on the instrument and on the unknown focus ``f`` -- and the calibration stack
measures ``log |H(k; z)|^2`` (up to a per-frequency constant) for any specimen. This is
depth from defocus (Pentland 1987; Subbarao & Surya 1994) with an empirical, per-
objective transfer table instead of a PSF model, so it carries over to optics that do
not match our simulator.

Spectra are radially averaged into logarithmically spaced bins of spatial frequency in
cycles per pixel (:data:`EDGES`), the same for every frame size, with the noise floor
estimated from the spectrum's corners and every bin's sample count kept for weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["EDGES", "Spectrum", "frame_spectrum", "patch_spectra"]

#: bin edges in cycles/pixel: 36 log-spaced bins from 1/256 to the axis Nyquist 0.5
EDGES: NDArray[np.float64] = np.geomspace(1 / 256, 0.5, 37)


@dataclass(frozen=True)
class Spectrum:
    """Radially binned power of one frame (or patch). Immutable: its arrays are not to be
    changed in place (:meth:`log_signal` keeps its result).

    Attributes
    ----------
    power
        ``(K,)`` mean periodogram power per bin (NaN where the bin holds no sample).
    counts
        ``(K,)`` number of 2-D frequency samples averaged in each bin.
    noise
        White noise floor (same units as ``power``), from the corners beyond the axis
        Nyquist frequency.
    """

    power: NDArray[np.float64]
    counts: NDArray[np.float64]
    noise: float

    def detection_limit(self, min_snr: float = 2.0) -> float:
        """``log`` of the smallest signal power counted as detected, ``(min_snr - 1) * N``."""
        return float(np.log(max((min_snr - 1.0) * self.noise, 1e-30)))

    def log_signal(self, min_snr: float = 2.0) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``log(P - N)`` and a weight per bin (0 where the signal is below ``min_snr`` x noise).

        The weight is the inverse variance of the log estimate: each bin averages
        ``counts`` exponential periodogram values, and subtracting the noise amplifies
        the relative error by ``P / (P - N)``.
        """
        cached = self.__dict__.get("_log_signal")
        if cached is not None and cached[0] == min_snr:
            return cached[1], cached[2]
        sig = self.power - self.noise
        ok = (
            np.isfinite(sig) & (self.counts > 0) & (sig > (min_snr - 1.0) * self.noise) & (sig > 0)
        )
        logs = np.full_like(self.power, np.nan)
        logs[ok] = np.log(sig[ok])
        w = np.zeros_like(self.power)
        frac = np.where(ok, sig / np.where(self.power > 0, self.power, 1.0), 0.0)
        w[ok] = self.counts[ok] * frac[ok] ** 2
        # kept (read-only): the search reads every frame's at each posterior update
        logs.setflags(write=False)
        w.setflags(write=False)
        object.__setattr__(self, "_log_signal", (min_snr, logs, w))
        return logs, w

    def sharpness(self) -> float:
        """Detected signal power above 0.1 cycles/px relative to below 0.03 (log ratio).

        Only meaningful to compare frames of the same field (the specimen cancels).
        """
        centers = np.sqrt(EDGES[1:] * EDGES[:-1])
        sig = np.where(np.isfinite(self.power), np.maximum(self.power - self.noise, 0.0), 0.0)
        hi = float((sig * self.counts)[centers > 0.1].sum())
        lo = float((sig * self.counts)[centers < 0.03].sum())
        return float(np.log((hi + 1e-12) / (lo + 1e-12)))


@lru_cache(maxsize=32)
def _binning(h: int, w: int) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.bool_]]:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    r = np.sqrt(fx * fx + fy * fy)
    idx = np.searchsorted(EDGES, r, side="right") - 1
    idx = np.where((r >= EDGES[0]) & (r < EDGES[-1]), idx, -1)
    # rfft: columns 1..(w-1)//2 stand for two frequencies (+/-), count them twice
    mult = np.ones_like(r)
    last = w // 2 if w % 2 == 0 else None
    mult[:, 1 : (last if last is not None else w // 2 + 1)] = 2.0
    corner = (np.abs(fx) > 0.35) & (np.abs(fy) > 0.35)
    return idx.astype(np.intp), mult, np.broadcast_to(corner, r.shape).copy()


def _window(h: int, w: int) -> NDArray[np.float64]:
    return np.outer(np.hanning(h), np.hanning(w))


def _spectrum_of(power2d: NDArray[np.float64], h: int, w: int) -> Spectrum:
    idx, mult, corner = _binning(h, w)
    k = len(EDGES) - 1
    sel = idx >= 0
    sums = np.bincount(idx[sel], (power2d * mult)[sel], minlength=k)
    counts = np.bincount(idx[sel], mult[sel], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        power = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    # periodogram values of white noise are exponential: their median is ln 2 x the mean
    noise = float(np.median(power2d[corner])) / math.log(2.0) if np.any(corner) else 0.0
    return Spectrum(power=power, counts=counts.astype(np.float64), noise=noise)


def frame_spectrum(image: ArrayLike) -> Spectrum:
    """Hann-windowed, mean-removed, radially binned power spectrum of a whole frame/ROI.

    The periodogram is normalized by the window energy, so white noise of variance
    ``s^2`` gives a flat floor of ``s^2`` whatever the frame size.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    win = _window(h, w)
    x = (img - img.mean()) * win
    f = np.fft.rfft2(x)
    p = (f.real**2 + f.imag**2) / float((win**2).sum())
    return _spectrum_of(p, h, w)


def patch_spectra(
    image: ArrayLike, patch: int = 128
) -> tuple[list[list[Spectrum]], tuple[int, int]]:
    """Spectra of the non-overlapping ``patch`` grid (same grid as the scorers' maps).

    Returns the ``rows x cols`` nested list and the grid's top-left ``(y, x)``.
    """
    img = np.asarray(image, dtype=np.float64)
    rows, cols = img.shape[0] // patch, img.shape[1] // patch
    if rows == 0 or cols == 0:
        from .errors import ImageError

        raise ImageError(
            f"Image shape {img.shape!r} is smaller than one {patch}x{patch} patch; use a larger ROI."
        )
    y0, x0 = (img.shape[0] - rows * patch) // 2, (img.shape[1] - cols * patch) // 2
    win = _window(patch, patch)
    norm = float((win**2).sum())
    out: list[list[Spectrum]] = []
    for i in range(rows):
        row = []
        for j in range(cols):
            p = img[y0 + i * patch : y0 + (i + 1) * patch, x0 + j * patch : x0 + (j + 1) * patch]
            f = np.fft.rfft2((p - p.mean()) * win)
            row.append(_spectrum_of((f.real**2 + f.imag**2) / norm, patch, patch))
        out.append(row)
    return out, (y0, x0)
