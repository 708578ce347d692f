"""Synthetic calibrations and observations from a closed-form defocus model (no CNN, no
rendering): blur radius r(z) = sqrt(r0^2 + (a z)^2) px, transfer exp(-2 (pi k r(z) / 2)^2),
specimen spectra as power laws. Used to test the search algorithms exactly."""

from __future__ import annotations

import math

import numpy as np

from bluesky_deepfocus.calibration import Calibration
from bluesky_deepfocus.search import Observation
from bluesky_deepfocus.spectral import EDGES, Spectrum

DOF = 11.3
A = 0.3145 / 0.65  # px per um of defocus (10x/0.3 geometry)
R0 = 0.95
K = np.sqrt(EDGES[1:] * EDGES[:-1])
COUNTS = np.maximum(np.round(2 * np.pi * K * 512 * np.diff(EDGES) * 512), 1.0)


def radius(z: float) -> float:
    return math.sqrt(R0 * R0 + (A * z) ** 2)


def blur_score(z: float, offset: float = 0.0) -> float:
    return math.log(radius(z)) + offset


def power(z: float, slope: float, level: float = 1e4) -> np.ndarray:
    spec = level * (K / K[0]) ** (-slope)
    mtf2 = np.exp(-2 * (math.pi * K * radius(z) / 2.0) ** 2)
    return spec * mtf2


def spectrum(
    z: float, *, slope: float = 2.0, noise: float = 1.0, rng: np.random.Generator | None = None
) -> Spectrum:
    p = power(z, slope) + noise
    if rng is not None:  # periodogram scatter: mean of `counts` exponential variables
        p = p * rng.gamma(COUNTS, 1.0 / COUNTS)
    return Spectrum(power=p, counts=COUNTS.copy(), noise=noise)


def calibration(
    half_range: float = 150.0, num: int = 121, *, slope: float = 1.5, offset: float = 0.0
) -> Calibration:
    z = np.linspace(-half_range, half_range, num)
    return Calibration.from_stack(
        z,
        [blur_score(v, offset) for v in z],
        [spectrum(v, slope=slope) for v in z],
        objective="synthetic",
        pixel_size_um=0.65,
        dof_um=DOF,
        model_id="closed-form",
    )


def observe(
    z: float,
    focus: float,
    *,
    slope: float = 2.5,
    offset: float = 0.0,
    rng: np.random.Generator | None = None,
    blur_noise: float = 0.0,
) -> Observation:
    b = blur_score(z - focus, offset)
    if rng is not None and blur_noise:
        b += float(rng.normal(0, blur_noise))
    return Observation(z=z, blur=b, spectrum=spectrum(z - focus, slope=slope, rng=rng))


def gradient_sharpness(z: float, focus: float) -> float:
    """A frame's gradient sharpness: falls monotonically and symmetrically with |z - focus|
    (log of the gradient energy of a blur of radius r, ~ -2 log r)."""
    return -2.0 * math.log(radius(z - focus))
