"""Radial power spectra: noise floor, specimen cancellation, detection and patch grid."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_deepfocus.metrics import Tenengrad
from bluesky_deepfocus.optics import CameraModel, blur, get_objective, objective_psf
from bluesky_deepfocus.specimens import make_specimen
from bluesky_deepfocus.spectral import EDGES, Spectrum, frame_spectrum, patch_spectra

CENTERS = np.sqrt(EDGES[1:] * EDGES[:-1])
N = 256


@pytest.fixture(scope="module")
def fields() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two specimens, each imaged noise-free in focus and at 0.5 DOF (10x/0.3)."""
    obj = get_objective("10x/0.3")
    z = 0.5 * obj.dof_um
    blurred_psf = objective_psf(obj, z)
    size = blurred_psf.shape[0]
    sharp_psf = objective_psf(obj, 0.0, size=size)
    out = {}
    for family, seed in (("tissue", 1), ("nuclei", 2)):
        specimen = make_specimen(family, N + size - 1, obj.pixel_size_um, seed=seed)
        out[family] = (blur(specimen, sharp_psf), blur(specimen, blurred_psf))
    return out


def test_edges_are_log_spaced_up_to_nyquist():
    assert EDGES[0] == pytest.approx(1 / 256)
    assert EDGES[-1] == pytest.approx(0.5)
    np.testing.assert_allclose(np.diff(np.log(EDGES)), np.log(128) / 36)


@pytest.mark.parametrize("shape", [(256, 256), (200, 301)])
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_white_noise_has_a_flat_power_equal_to_its_variance(shape, sigma):
    rng = np.random.default_rng(0)
    spec = frame_spectrum(rng.normal(10.0, sigma, shape))
    assert spec.power.shape == spec.counts.shape == (len(EDGES) - 1,)
    # a bin of k periodogram values (exponential, correlated by the Hann window over ~2
    # neighbours) scatters by ~1.5/sqrt(k): 5 % at k >= 1000
    many = spec.counts >= 1000
    assert many.sum() >= 8
    np.testing.assert_allclose(spec.power[many], sigma**2, rtol=0.2)
    weighted = np.nansum(spec.power * spec.counts) / spec.counts.sum()
    assert weighted == pytest.approx(sigma**2, rel=0.05)
    # empty bins (below the frame's lowest frequency spacing) are NaN, not zero
    assert np.all(np.isnan(spec.power[spec.counts == 0]))


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_white_noise_floor_estimate_equals_the_variance(sigma):
    rng = np.random.default_rng(1)
    spec = frame_spectrum(rng.normal(10.0, sigma, (256, 256)))
    assert spec.noise == pytest.approx(sigma**2, rel=0.2)


def test_noise_floor_is_proportional_to_the_variance():
    # holds even with the biased median estimator
    rng = np.random.default_rng(2)
    noise = rng.normal(0.0, 1.0, (256, 256))
    assert frame_spectrum(3.0 * noise).noise == pytest.approx(9.0 * frame_spectrum(noise).noise)


def test_blur_removes_high_frequencies(fields):
    sharp, blurred = (frame_spectrum(img) for img in fields["tissue"])
    ratio = np.log(sharp.power / blurred.power)
    band = (CENTERS > 0.02) & (CENTERS < 0.2)
    assert np.all(ratio[band] > 0)
    assert np.all(np.diff(ratio[band]) > 0)  # the OTF falls faster than in focus
    low = ratio[(CENTERS < 0.01) & (sharp.counts > 0)]
    assert low.size >= 3
    np.testing.assert_allclose(low, 0.0, atol=0.02)  # large structures are untouched


def test_specimen_cancels_in_the_ratio_of_two_frames(fields):
    # log(P_sharp / P_blurred) at a bin is log |H_0|^2 / |H_z|^2 whatever the specimen. The
    # Hann window smears the spectrum over ~2/N = 0.008 cycles/px, so the ratio is only
    # specimen-free where |H_z|^2 changes little over that width: below 0.15 cycles/px at
    # 0.5 DOF (ratio < 1.2 nats) leakage shifts it by < 0.05 nats.
    band = (CENTERS > 0.015) & (CENTERS < 0.15)
    ratios = []
    for sharp, blurred in fields.values():
        ratios.append(np.log(frame_spectrum(sharp).power / frame_spectrum(blurred).power))
    tissue, nuclei = ratios
    assert tissue[band].max() > 0.5  # the test is not trivially passed by flat ratios
    np.testing.assert_allclose(tissue[band], nuclei[band], atol=0.05, rtol=0.05)
    # ... and it is the ratio of the OTFs
    obj = get_objective("10x/0.3")
    psf_z = objective_psf(obj, 0.5 * obj.dof_um)
    psf_0 = objective_psf(obj, 0.0, size=psf_z.shape[0])

    def otf_power(psf):
        padded = np.zeros((N, N))
        padded[: psf.shape[0], : psf.shape[1]] = psf
        otf = np.fft.rfft2(padded)
        return otf.real**2 + otf.imag**2

    fy = np.fft.fftfreq(N)[:, None]
    fx = np.fft.rfftfreq(N)[None, :]
    r = np.broadcast_to(np.hypot(fx, fy), (N, N // 2 + 1))
    idx = np.searchsorted(EDGES, r, side="right") - 1
    predicted = np.full(len(CENTERS), np.nan)
    for k in np.nonzero(band)[0]:
        sel = idx == k
        predicted[k] = np.log(otf_power(psf_0)[sel].mean() / otf_power(psf_z)[sel].mean())
    np.testing.assert_allclose(tissue[band], predicted[band], atol=0.05, rtol=0.05)


def test_log_signal_masks_bins_below_the_noise():
    power = np.array([np.nan, 100.0, 10.0, 3.5, 2.5, 1.0, 0.5])
    counts = np.array([0.0, 4.0, 16.0, 64.0, 64.0, 256.0, 256.0])
    spec = Spectrum(power=power, counts=counts, noise=1.0)
    logs, weights = spec.log_signal(min_snr=3.0)  # detected: P - N > 2 N
    detected = np.array([False, True, True, True, False, False, False])
    np.testing.assert_array_equal(np.isfinite(logs), detected)
    np.testing.assert_array_equal(weights[~detected], 0.0)
    np.testing.assert_allclose(logs[detected], np.log(power[detected] - 1.0))
    # inverse variance: counts x (S / P)^2
    sig = power[detected] - 1.0
    np.testing.assert_allclose(weights[detected], counts[detected] * (sig / power[detected]) ** 2)
    assert spec.detection_limit(3.0) == pytest.approx(np.log(2.0))
    # kept per threshold, read-only; another threshold is computed afresh
    again, w_again = spec.log_signal(min_snr=3.0)
    assert again is logs and w_again is weights and not logs.flags.writeable
    with pytest.raises(ValueError):
        logs[1] = 0.0
    two, _ = spec.log_signal(min_snr=2.0)
    np.testing.assert_array_equal(np.isfinite(two), power - 1.0 > 1.0)


def test_log_signal_of_a_noisy_blurred_frame_drops_high_frequencies(fields):
    _, blurred = fields["tissue"]
    frame = CameraModel().expose(blurred, 20.0, np.random.default_rng(3))
    spec = frame_spectrum(frame.astype(np.float64))
    logs, weights = spec.log_signal()
    assert np.all(np.isfinite(logs[(CENTERS > 0.01) & (CENTERS < 0.05)]))
    high = CENTERS > 0.3  # beyond the 0.5-DOF transfer function: noise only
    assert np.all(np.isnan(logs[high]))
    assert np.all(weights[high] == 0)
    assert np.all(weights[np.isfinite(logs)] > 0)


@pytest.mark.parametrize("noisy", [False, True])
def test_sharpness_is_larger_for_the_sharper_frame(fields, noisy):
    for sharp, blurred in fields.values():
        if noisy:
            cam = CameraModel()
            sharp = cam.expose(sharp, 20.0, np.random.default_rng(4)).astype(np.float64)
            blurred = cam.expose(blurred, 20.0, np.random.default_rng(5)).astype(np.float64)
        assert frame_spectrum(sharp).sharpness() > frame_spectrum(blurred).sharpness() + 0.5


def test_patch_spectra_grid_matches_the_scorers_grid():
    rng = np.random.default_rng(6)
    img = rng.uniform(0, 1, (300, 400))
    grid, origin = patch_spectra(img, 128)
    assert (len(grid), len(grid[0])) == (2, 3)
    assert all(len(row) == 3 for row in grid)
    assert origin == ((300 - 256) // 2, (400 - 384) // 2)
    scored = Tenengrad(patch_size=128).score(img)
    assert scored.blur_map.shape == (2, 3)
    assert scored.origin == origin
    # each entry is the spectrum of its patch
    y0, x0 = origin
    patch = img[y0 + 128 : y0 + 256, x0 + 256 : x0 + 384]
    expected = frame_spectrum(patch)
    np.testing.assert_allclose(grid[1][2].power, expected.power, equal_nan=True)
    np.testing.assert_array_equal(grid[1][2].counts, expected.counts)
    assert grid[1][2].noise == pytest.approx(expected.noise)
