"""Classic focus functions with the same interface as the DeepFocus scorer.

The six functions of the DeepFocus paper's Table 1 -- HPF, Tenengrad, LAPV, EWC, SML,
WS -- plus Brenner, normalized variance and Vollath's F4. All are "higher is sharper"
and computed per patch. All but normalized variance are divided by the patch's squared
mean intensity (or its mean, for SML) so that exposure and gain do not change them;
normalized variance keeps its classic definition (variance / mean), which scales with
gain. The benchmarks normalize curves per specimen anyway.

References
----------
Pertuz, Puig & Garcia, "Analysis of focus measure operators for shape-from-focus",
Pattern Recognition 46, 1415 (2013) -- definitions of Tenengrad (TENG), variance of the
Laplacian (LAPV), sum-modified-Laplacian (SML), wavelet sum (WAVS) and others.
Krotkov 1988 (Tenengrad); Nayar & Nakagawa 1994 (SML); Yang & Nelson 2003 (wavelet
energies); Brenner et al. 1976; Vollath 1987 (F4); Groen, Young & Ligthart 1985
(normalized variance, HPF-type measures).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .scoring import FocusFunction

__all__ = [
    "CLASSIC_FUNCTIONS",
    "EWC",
    "HPF",
    "LAPV",
    "SML",
    "WS",
    "Brenner",
    "NormalizedVariance",
    "Tenengrad",
    "VollathF4",
    "get_focus_function",
    "gradient_sharpness",
]

P = NDArray[np.floating]


def _mean2(p: P) -> NDArray[np.float64]:
    m = p.mean(axis=(1, 2), dtype=np.float64)
    return np.maximum(m * m, 1e-12)


def _haar(p: NDArray[np.float64]) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    a = p[:, 0::2, 0::2]
    b = p[:, 0::2, 1::2]
    c = p[:, 1::2, 0::2]
    d = p[:, 1::2, 1::2]
    ll = (a + b + c + d) / 2
    lh = (a - b + c - d) / 2
    hl = (a + b - c - d) / 2
    hh = (a - b - c + d) / 2
    return ll, lh, hl, hh


def gradient_sharpness(image: NDArray) -> float:
    """``log(mean |Sobel gradient|^2 / mean^2)`` of a whole frame (higher is sharper).

    For comparing frames *of the same field* ("is the final image less sharp than the
    start image?"): dividing by the squared mean brightness cancels exposure changes, and
    the camera noise adds about the same floor to every frame of a field (it compresses
    the differences of noise-dominated frames, it does not reorder them). Unlike
    band-limited spectral measures it is monotone in defocus for specimens whose power
    sits in narrow spectral peaks (printed text, gratings).
    """
    img = np.asarray(image, dtype=np.float32)
    # the Sobel pair of ``ndimage.sobel(img, axis, mode="nearest")`` (equal to it), with
    # slices of the edge-padded frame: 2x (512^2) to 5x (2048^2) faster, on every image
    p = np.pad(img, 1, mode="edge")
    d = p[:, 2:] - p[:, :-2]  # d/dx, then [1, 2, 1] along y
    gx = d[1:-1] * 2
    gx += d[:-2]
    gx += d[2:]
    s = p[:, 1:-1] * 2  # [1, 2, 1] along x, then d/dy
    s += p[:, :-2]
    s += p[:, 2:]
    gy = s[2:] - s[:-2]
    gx *= gx
    gy *= gy
    gx += gy
    energy = float(np.mean(gx, dtype=np.float64))
    mean = float(np.mean(img, dtype=np.float64))
    if not (energy > 0 and mean > 0):
        return float("nan")
    return float(np.log(energy / (mean * mean)))


def gradient_sharpness_floor(mean: float, noise: float) -> float:
    """The :func:`gradient_sharpness` of a frame of white noise of variance ``noise``
    about ``mean``: ``log(24 noise / mean^2)`` (the Sobel pair's squared taps sum to 24).

    A frame's gradient energy is its signal's plus this floor, so ``exp(g) - exp(floor)``
    is the signal's part (used to fit the specimen's own sharpness curve; NaN when
    ``noise`` or ``mean`` is not positive).
    """
    if not (noise > 0 and mean > 0 and math.isfinite(noise) and math.isfinite(mean)):
        return float("nan")
    return float(math.log(24.0 * noise / (mean * mean)))


class _Classic(FocusFunction):
    higher_is_sharper = True
    _fn: Callable[[P], NDArray[np.float64]]

    def _score_patches(self, patches: P) -> NDArray[np.float64]:
        p = patches.astype(np.float64)
        return type(self)._fn(p)


class HPF(_Classic):
    """Energy of a high-pass filtered image (image minus Gaussian blur, sigma 2 px)."""

    name = "hpf"

    @staticmethod
    def _fn(p):
        low = ndimage.gaussian_filter(p, sigma=(0, 2, 2), mode="nearest")
        return ((p - low) ** 2).mean(axis=(1, 2)) / _mean2(p)


class Tenengrad(_Classic):
    """Mean squared Sobel gradient magnitude (Krotkov)."""

    name = "tenengrad"

    @staticmethod
    def _fn(p):
        gx = ndimage.sobel(p, axis=2, mode="nearest")
        gy = ndimage.sobel(p, axis=1, mode="nearest")
        return (gx * gx + gy * gy)[:, 1:-1, 1:-1].mean(axis=(1, 2)) / _mean2(p)


class LAPV(_Classic):
    """Variance of the Laplacian (Pech-Pacheco)."""

    name = "lapv"

    @staticmethod
    def _fn(p):
        lap = ndimage.laplace(p, mode="nearest")[:, 1:-1, 1:-1]
        return lap.var(axis=(1, 2)) / _mean2(p)


class EWC(_Classic):
    """Energy of the detail wavelet coefficients (one-level Haar), relative to the approximation."""

    name = "ewc"

    @staticmethod
    def _fn(p):
        ll, lh, hl, hh = _haar(p)
        detail = (lh**2 + hl**2 + hh**2).sum(axis=(1, 2))
        return detail / np.maximum((ll**2).sum(axis=(1, 2)), 1e-12)


class SML(_Classic):
    """Sum-modified-Laplacian (Nayar & Nakagawa), step 1, no threshold."""

    name = "sml"

    @staticmethod
    def _fn(p):
        c = p[:, 1:-1, 1:-1]
        mx = np.abs(2 * c - p[:, 1:-1, :-2] - p[:, 1:-1, 2:])
        my = np.abs(2 * c - p[:, :-2, 1:-1] - p[:, 2:, 1:-1])
        return (mx + my).mean(axis=(1, 2)) / np.sqrt(_mean2(p))


class WS(_Classic):
    """Wavelet sum: absolute detail coefficients of a two-level Haar transform (WAVS)."""

    name = "ws"

    @staticmethod
    def _fn(p):
        ll, lh, hl, hh = _haar(p)
        s1 = (np.abs(lh) + np.abs(hl) + np.abs(hh)).mean(axis=(1, 2))
        ll2, lh2, hl2, hh2 = _haar(ll)
        s2 = (np.abs(lh2) + np.abs(hl2) + np.abs(hh2)).mean(axis=(1, 2))
        return (s1 + s2) / np.maximum(np.abs(ll2).mean(axis=(1, 2)), 1e-12)


class Brenner(_Classic):
    """Brenner gradient: squared differences two pixels apart."""

    name = "brenner"

    @staticmethod
    def _fn(p):
        dx = p[:, :, 2:] - p[:, :, :-2]
        dy = p[:, 2:, :] - p[:, :-2, :]
        return ((dx**2).mean(axis=(1, 2)) + (dy**2).mean(axis=(1, 2))) / _mean2(p)


class NormalizedVariance(_Classic):
    """Intensity variance divided by the mean (Groen et al.)."""

    name = "normalized_variance"

    @staticmethod
    def _fn(p):
        m = p.mean(axis=(1, 2))
        return p.var(axis=(1, 2)) / np.maximum(m, 1e-12)


class VollathF4(_Classic):
    """Vollath's F4 autocorrelation measure."""

    name = "vollath_f4"

    @staticmethod
    def _fn(p):
        a = (p[:, :, :-2] * p[:, :, 1:-1]).mean(axis=(1, 2))  # same window for both lags
        b = (p[:, :, :-2] * p[:, :, 2:]).mean(axis=(1, 2))
        return (a - b) / _mean2(p)


CLASSIC_FUNCTIONS: dict[str, type[FocusFunction]] = {
    cls.name: cls
    for cls in (HPF, Tenengrad, LAPV, EWC, SML, WS, Brenner, NormalizedVariance, VollathF4)
}


def get_focus_function(name: str, **kwargs: object) -> FocusFunction:
    """Instantiate a focus function by name: ``"deepfocus"`` or one of :data:`CLASSIC_FUNCTIONS`."""
    key = name.lower()
    if key == "deepfocus":
        from .scorer import DeepFocusScorer

        return DeepFocusScorer(**kwargs)  # type: ignore[arg-type]
    try:
        return CLASSIC_FUNCTIONS[key](**kwargs)  # type: ignore[arg-type]
    except KeyError:
        raise KeyError(
            f"Unknown focus function {name!r}; choose 'deepfocus' or one of {sorted(CLASSIC_FUNCTIONS)}."
        ) from None
