"""Image formation against physics: PSF normalization, width and defocus, blur, camera.

These are acceptance criteria of the simulator: the CNN learns blur from these images, so
the PSF must match diffraction theory in focus and geometric optics far from it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import signal

from bluesky_deepfocus.optics import (
    OBJECTIVES,
    CameraModel,
    Objective,
    blur,
    encircled_energy_radius,
    get_objective,
    noll_to_nm,
    objective_psf,
    psf_support_px,
    render_depth_variant,
    widefield_psf,
    zernike,
)

WAVELENGTH = 0.52


def _psf(objective: Objective, defocus_um: float, **kwargs) -> np.ndarray:
    return widefield_psf(
        defocus_um,
        na=objective.na,
        wavelength_um=objective.wavelength_um,
        pixel_size_um=objective.pixel_size_um,
        immersion_index=objective.immersion_index,
        **kwargs,
    )


def _fwhm_px(profile: np.ndarray) -> float:
    """FWHM of a centred, single-peaked profile; half-maximum crossings found by linear
    interpolation between the samples on either side of them."""
    c = len(profile) // 2
    half = profile[c] / 2
    right = c
    while profile[right] > half:
        right += 1
    left = c
    while profile[left] > half:
        left -= 1
    x_right = right - 1 + (profile[right - 1] - half) / (profile[right - 1] - profile[right])
    x_left = left + 1 - (profile[left + 1] - half) / (profile[left + 1] - profile[left])
    return x_right - x_left


def _margin(objective: Objective, max_defocus_um: float) -> int:
    size = psf_support_px(
        max_defocus_um,
        na=objective.na,
        wavelength_um=objective.wavelength_um,
        pixel_size_um=objective.pixel_size_um,
        immersion_index=objective.immersion_index,
    )
    return size // 2


# --------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------
def test_dof_of_10x_is_the_non_paraxial_axial_extent():
    obj = get_objective("10x/0.3")
    assert obj.wavelength_um == WAVELENGTH
    assert obj.dof_um == pytest.approx(WAVELENGTH / (1 - math.sqrt(1 - 0.09)), rel=1e-12)
    assert obj.pixel_size_um == pytest.approx(0.65)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_dof_formula_for_every_preset(name):
    obj = OBJECTIVES[name]
    n, na, lam = obj.immersion_index, obj.na, obj.wavelength_um
    assert obj.dof_um == pytest.approx(lam / (n - math.sqrt(n * n - na * na)), rel=1e-12)
    # paraxial limit 2 n lambda / NA^2 is an upper bound that is close at low NA
    paraxial = 2 * n * lam / na**2
    assert obj.dof_um < paraxial
    if na / n < 0.2:
        assert obj.dof_um == pytest.approx(paraxial, rel=0.01)


def test_blur_radius_px_grows_with_abs_defocus_and_is_symmetric():
    obj = get_objective("10x/0.3")
    zs = np.linspace(0, 10 * obj.dof_um, 41)
    radii = np.array([obj.blur_radius_px(z) for z in zs])
    assert np.all(np.diff(radii) > 0)
    assert [obj.blur_radius_px(-z) for z in zs] == pytest.approx(list(radii))
    airy_px = 0.5 * obj.resolution_um / obj.pixel_size_um
    assert radii[0] == pytest.approx(math.hypot(airy_px, 0.5))
    # far from focus it is the geometric disc
    assert radii[-1] == pytest.approx(
        obj.geometric_blur_radius_um(zs[-1]) / obj.pixel_size_um, rel=0.02
    )


def test_get_objective_passes_objectives_through_and_names_choices():
    custom = Objective("5x/0.15", 5, 0.15)
    assert get_objective(custom) is custom
    with pytest.raises(KeyError, match=r"Unknown objective '7x/0\.2'.*10x/0\.3"):
        get_objective("7x/0.2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"na": 1.1}, r"NA=1\.1 must be positive and below the immersion index"),
        ({"na": 0.0}, r"NA=0\.0"),
        ({"na": 0.3, "magnification": 0}, "must be positive"),
    ],
)
def test_objective_rejects_impossible_optics(kwargs, match):
    args = {"magnification": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        Objective("bad", **args)


# --------------------------------------------------------------------------------------
# Zernike polynomials
# --------------------------------------------------------------------------------------
NOLL_TABLE = {
    1: (0, 0),
    2: (1, 1),
    3: (1, -1),
    4: (2, 0),
    5: (2, -2),
    6: (2, 2),
    7: (3, -1),
    8: (3, 1),
    9: (3, -3),
    10: (3, 3),
    11: (4, 0),
    12: (4, 2),
    13: (4, -2),
    14: (4, 4),
    15: (4, -4),
}


@pytest.mark.parametrize(("j", "nm"), sorted(NOLL_TABLE.items()))
def test_noll_to_nm_matches_the_noll_table(j, nm):
    assert noll_to_nm(j) == nm


def test_noll_index_below_one_is_refused():
    with pytest.raises(ValueError, match="Noll index must be >= 1, got 0"):
        noll_to_nm(0)


def test_zernike_polynomials_are_orthonormal_on_the_unit_disc():
    # Gauss-Legendre in rho (weight rho) x uniform theta: exact for these polynomials
    x, w = np.polynomial.legendre.leggauss(24)
    rho = (x + 1) / 2
    w_rho = w / 2 * rho
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    rr, tt = np.meshgrid(rho, theta, indexing="ij")
    weights = np.outer(w_rho, np.full(theta.size, 2 * np.pi / theta.size)) / np.pi
    zs = np.array([zernike(j, rr, tt) for j in range(1, 16)])
    gram = np.einsum("iab,jab,ab->ij", zs, zs, weights)
    np.testing.assert_allclose(gram, np.eye(15), atol=1e-9)


def test_zernike_is_zero_outside_the_disc():
    assert np.all(zernike(11, np.array([1.01, 2.0]), np.array([0.0, 1.0])) == 0)


# --------------------------------------------------------------------------------------
# PSF: normalization, centring, width
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["4x/0.13", "10x/0.3", "20x/0.75", "60x/1.4"])
@pytest.mark.parametrize("defocus_dof", [0.0, 0.5, 2.0, -3.0])
def test_psf_is_normalized_non_negative_odd_and_centred(name, defocus_dof):
    obj = OBJECTIVES[name]
    psf = _psf(obj, defocus_dof * obj.dof_um)
    assert psf.dtype == np.float64
    assert psf.shape[0] == psf.shape[1]
    assert psf.shape[0] % 2 == 1
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    assert psf.min() >= 0
    yy, xx = np.indices(psf.shape)
    c = psf.shape[0] // 2
    assert (psf * yy).sum() == pytest.approx(c, abs=1e-6)
    assert (psf * xx).sum() == pytest.approx(c, abs=1e-6)
    # circular symmetry of an aberration-free pupil: the PSF is invariant under transposition
    np.testing.assert_allclose(psf, psf.T, atol=1e-12)
    if defocus_dof == 0:
        assert np.unravel_index(np.argmax(psf), psf.shape) == (c, c)


@pytest.mark.parametrize(
    ("na", "n"),
    [(0.3, 1.0), (0.75, 1.0), (1.4, 1.515)],
    ids=["0.3-air", "0.75-air", "1.4-oil"],
)
def test_in_focus_fwhm_is_0_51_lambda_over_na(na, n):
    pixel = WAVELENGTH / (20 * na)
    psf = widefield_psf(
        0.0, na=na, wavelength_um=WAVELENGTH, pixel_size_um=pixel, immersion_index=n
    )
    c = psf.shape[0] // 2
    expected = 0.51 * WAVELENGTH / na
    for profile in (psf[c, :], psf[:, c]):
        assert _fwhm_px(profile) * pixel == pytest.approx(expected, rel=0.10)


@pytest.mark.parametrize(("fraction", "radius_lambda_na"), [(0.8, 0.4485), (0.9, 0.9503)])
def test_in_focus_encircled_energy_matches_the_airy_pattern(fraction, radius_lambda_na):
    # EE(v) = 1 - J0(v)^2 - J1(v)^2 with v = 2 pi NA r / lambda (Born & Wolf 8.5)
    na = 0.75
    pixel = WAVELENGTH / (20 * na)
    psf = widefield_psf(0.0, na=na, wavelength_um=WAVELENGTH, pixel_size_um=pixel)
    r = encircled_energy_radius(psf, fraction) * pixel
    assert r == pytest.approx(radius_lambda_na * WAVELENGTH / na, rel=0.02)


@pytest.mark.parametrize(
    ("name", "defocus_um"),
    [("10x/0.3", 100.0), ("10x/0.3", 150.0), ("10x/0.3", -150.0), ("20x/0.45", 40.0)],
)
def test_far_from_focus_the_psf_is_the_geometric_disc(name, defocus_um):
    obj = OBJECTIVES[name]
    psf = objective_psf(obj, defocus_um)
    r90 = encircled_energy_radius(psf, 0.9) * obj.pixel_size_um
    geometric = abs(defocus_um) * math.tan(math.asin(obj.na / obj.immersion_index))
    assert r90 == pytest.approx(geometric, rel=0.15)


@pytest.mark.parametrize(
    ("name", "defocus_um"),
    [("10x/0.3", 150.0), ("20x/0.45", 40.0), ("40x/0.75", 20.0), ("60x/1.4", 5.0)],
)
def test_far_from_focus_encircled_energy_follows_ray_optics_of_a_uniform_pupil(name, defocus_um):
    # The pupil is uniformly filled in spatial frequency, so 90 % of the rays leave
    # through sin(theta) <= sqrt(0.9) NA/n and land within z tan of that angle. At high NA
    # this is well inside z tan(asin(NA/n)) (0.75x at 60x/1.4).
    obj = OBJECTIVES[name]
    psf = objective_psf(obj, defocus_um)
    r90 = encircled_energy_radius(psf, 0.9) * obj.pixel_size_um
    ray = abs(defocus_um) * math.tan(math.asin(math.sqrt(0.9) * obj.na / obj.immersion_index))
    assert r90 == pytest.approx(ray, rel=0.06)


def test_encircled_energy_grows_with_defocus():
    obj = get_objective("10x/0.3")
    radii = [encircled_energy_radius(objective_psf(obj, k * obj.dof_um)) for k in (0, 1, 2, 4, 8)]
    assert np.all(np.diff(radii) > 0)


def test_pixel_integration_converges_with_oversampling():
    kwargs = {"na": 0.3, "wavelength_um": WAVELENGTH, "pixel_size_um": 0.65, "size": 31}
    coarse = widefield_psf(0.0, oversample=5, **kwargs)
    fine = widefield_psf(0.0, oversample=15, **kwargs)
    np.testing.assert_allclose(coarse, fine, atol=0.01 * fine.max())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 30}, "PSF size must be odd and >= 3, got 30"),
        ({"oversample": 4}, "oversample must be odd"),
        ({"na": 1.2}, r"NA=1\.2 must be in \(0, n=1\.0\)"),
    ],
)
def test_widefield_psf_rejects_bad_arguments(kwargs, match):
    args = {"na": 0.3, "wavelength_um": WAVELENGTH, "pixel_size_um": 0.65, **kwargs}
    with pytest.raises(ValueError, match=match):
        widefield_psf(0.0, **args)


def test_widefield_psf_rejects_non_finite_defocus():
    with pytest.raises(ValueError, match="defocus_um=nan is not finite"):
        widefield_psf(float("nan"), na=0.3, wavelength_um=WAVELENGTH, pixel_size_um=0.65)


def _textbook_psf(defocus_um, *, na, wavelength_um, pixel_size_um, n=1.0, zernike_waves=None):
    """The Debye pupil integral on the full fine grid (one 2-D inverse FFT), as
    widefield_psf computed it before it skipped the pupil's empty rows."""
    size = psf_support_px(
        defocus_um,
        na=na,
        wavelength_um=wavelength_um,
        pixel_size_um=pixel_size_um,
        immersion_index=n,
        aberration_waves=sum(abs(v) for v in (zernike_waves or {}).values()),
    )
    os_ = max(3, math.ceil(pixel_size_um / (wavelength_um / (4 * na))))
    os_ += 1 - os_ % 2
    f = np.fft.fftfreq(size * os_, d=pixel_size_um / os_)
    fx, fy = np.meshgrid(f, f, indexing="xy")
    f2 = fx * fx + fy * fy
    fc = na / wavelength_um
    inside = f2 <= fc * fc
    k = n / wavelength_um
    phase = 2 * np.pi * defocus_um * (np.sqrt(np.maximum(k * k - f2, 0.0))[inside] - k)
    for j, c in (zernike_waves or {}).items():
        phase = phase + 2 * np.pi * c * zernike(
            j, np.sqrt(f2[inside]) / fc, np.arctan2(fy[inside], fx[inside])
        )
    pupil = np.zeros(f2.shape, dtype=complex)
    pupil[inside] = np.exp(1j * phase)
    amp = np.fft.fftshift(np.fft.ifft2(pupil))
    fine = np.abs(amp) ** 2
    return (fine / fine.sum()).reshape(size, os_, size, os_).sum(axis=(1, 3))


@pytest.mark.parametrize(
    ("defocus", "na", "pixel", "n", "zern"),
    [
        (0.0, 0.3, 0.65, 1.0, None),
        (37.3, 0.75, 0.1625, 1.0, None),  # far out at 40x: the pupil fills 1/6 of the rows
        (-6.1, 1.3, 0.1, 1.515, {5: 0.3, 11: 0.2}),
    ],
)
def test_psf_equals_the_full_grid_pupil_integral(defocus, na, pixel, n, zern):
    """Skipping the pupil's empty rows in the inverse FFT changes no number that matters."""
    got = widefield_psf(
        defocus,
        na=na,
        wavelength_um=WAVELENGTH,
        pixel_size_um=pixel,
        immersion_index=n,
        zernike_waves=zern,
    )
    want = _textbook_psf(
        defocus, na=na, wavelength_um=WAVELENGTH, pixel_size_um=pixel, n=n, zernike_waves=zern
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("defocus", "zern"), [(0.0, None), (3.0, None), (20.0, None), (-45.0, {11: 0.3, 5: 0.2})]
)
def test_psf_on_the_pixel_grid_equals_the_oversampled_one(monkeypatch, defocus, zern):
    """Far from focus at 40x the PSF is computed on the camera-pixel grid (the pixels
    sample the intensity's band): the same numbers as the oversampled grid's sub-pixel
    sums, to rounding."""
    import bluesky_deepfocus.optics as optics

    o = get_objective("40x/0.75")
    kw = dict(
        na=o.na,
        wavelength_um=o.wavelength_um,
        pixel_size_um=o.pixel_size_um,
        immersion_index=o.immersion_index,
        zernike_waves=zern,
    )
    monkeypatch.setattr(optics, "FINE_GRID_MAX", 10**9)
    fine = widefield_psf(defocus, **kw)
    monkeypatch.setattr(optics, "FINE_GRID_MAX", 0)
    calls = []
    pixel_grid = optics._pixel_grid_psf
    monkeypatch.setattr(
        optics, "_pixel_grid_psf", lambda *a, **k: calls.append(a) or pixel_grid(*a, **k)
    )
    coarse = widefield_psf(defocus, **kw)
    assert len(calls) == 1  # the pixel grid's path, not the oversampled one again
    assert coarse.shape == fine.shape
    np.testing.assert_allclose(coarse, fine, rtol=0, atol=1e-15)
    assert coarse.min() >= 0.0 and coarse.sum() == pytest.approx(1.0, abs=1e-12)
    # 10x pixels do not sample the band: always the oversampled grid, whatever the size
    t = get_objective("10x/0.3")
    kw10 = dict(na=t.na, wavelength_um=t.wavelength_um, pixel_size_um=t.pixel_size_um)
    got = widefield_psf(defocus, **kw10)
    assert len(calls) == 1
    monkeypatch.setattr(optics, "FINE_GRID_MAX", 10**9)
    np.testing.assert_array_equal(got, widefield_psf(defocus, **kw10))


def test_cached_psf_is_read_only():
    psf = objective_psf(get_objective("10x/0.3"), 3.0)
    with pytest.raises(ValueError, match="read-only"):
        psf[0, 0] = 1.0


# --------------------------------------------------------------------------------------
# PSF: defocus symmetry and aberrations
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["10x/0.3", "60x/1.4"])
def test_defocus_is_symmetric_without_aberrations(name):
    obj = OBJECTIVES[name]
    z = 2.5 * obj.dof_um
    np.testing.assert_allclose(_psf(obj, z), _psf(obj, -z), atol=1e-12)


def test_spherical_aberration_breaks_the_defocus_symmetry():
    obj = get_objective("10x/0.3")
    z = obj.dof_um
    size = psf_support_px(z, na=obj.na, wavelength_um=WAVELENGTH, pixel_size_um=0.65) + 20
    above = _psf(obj, z, zernike_waves={11: 0.5}, size=size)
    below = _psf(obj, -z, zernike_waves={11: 0.5}, size=size)
    assert np.abs(above - below).sum() > 0.2  # L1 distance of two unit-sum PSFs, max 2
    r_above, r_below = encircled_energy_radius(above), encircled_energy_radius(below)
    assert abs(r_above - r_below) > 0.1 * min(r_above, r_below)
    # ... but reversing both the defocus and the aberration conjugates the pupil
    mirrored = _psf(obj, -z, zernike_waves={11: -0.5}, size=size)
    np.testing.assert_allclose(above, mirrored, atol=1e-12)


# --------------------------------------------------------------------------------------
# blur: linear convolution, no wrap-around, energy conservation
# --------------------------------------------------------------------------------------
def test_blur_valid_equals_direct_linear_convolution():
    rng = np.random.default_rng(0)
    obj = rng.uniform(0, 1, (40, 37))
    psf = _psf(get_objective("10x/0.3"), 4.0, size=11)
    expected = signal.convolve(obj, psf, mode="valid", method="direct")
    out = blur(obj, psf, mode="valid")
    assert out.shape == (30, 27)
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_blur_valid_does_not_wrap_light_to_the_opposite_edge():
    psf = _psf(get_objective("10x/0.3"), 20.0)
    m = psf.shape[0] // 2
    obj = np.zeros((2 * m + 64, 2 * m + 64))
    obj[m + 32, m] = 1.0  # on the left edge of the valid region
    out = blur(obj, psf, mode="valid")
    assert out.shape == (64, 64)
    assert out[:, 0].max() > 1e-3
    # columns beyond the PSF's reach (m pixels) get only FFT round-off; a circular
    # convolution on the 64-px frame would put ~5e-3 of the light on the right edge
    assert m < 40
    assert out[:, m + 1 :].max() < 1e-15


def test_blur_same_of_a_corner_point_leaves_the_opposite_corner_dark():
    psf = _psf(get_objective("10x/0.3"), 20.0)
    obj = np.zeros((96, 96))
    obj[0, 0] = 1.0
    out = blur(obj, psf, mode="same")
    assert out.shape == obj.shape
    assert out[0, 0] > 0
    assert out[-16:, -16:].max() < 1e-15
    assert out[-16:, :16].max() < 1e-15
    assert out[:16, -16:].max() < 1e-15


def test_blur_conserves_energy_away_from_edges():
    obj = get_objective("10x/0.3")
    psf = objective_psf(obj, 2 * obj.dof_um)
    m = psf.shape[0] // 2
    out = blur(np.full((2 * m + 32, 2 * m + 32), 0.7), psf)
    np.testing.assert_allclose(out, 0.7, rtol=1e-9)
    point = np.zeros((2 * psf.shape[0], 2 * psf.shape[0]))
    point[psf.shape[0], psf.shape[0]] = 3.0
    assert blur(point, psf, mode="same").sum() == pytest.approx(3.0, rel=1e-9)


def test_blur_valid_refuses_an_object_smaller_than_the_psf():
    with pytest.raises(ValueError, match=r"smaller than the PSF .*margin"):
        blur(np.ones((10, 10)), np.ones((11, 11)) / 121)


# --------------------------------------------------------------------------------------
# depth-variant rendering
# --------------------------------------------------------------------------------------
def test_render_with_a_constant_map_equals_blur():
    obj = get_objective("10x/0.3")
    z = 1.5 * obj.dof_um
    m = _margin(obj, z)
    specimen = np.random.default_rng(1).uniform(0, 1, (32 + 2 * m, 40 + 2 * m))
    image = render_depth_variant(specimen, np.full((32, 40), z), obj)
    expected = blur(specimen, objective_psf(obj, z, size=2 * m + 1))
    np.testing.assert_allclose(image, expected, atol=1e-12)


def test_render_of_a_tilted_specimen_is_sharp_where_it_is_in_focus():
    obj = get_objective("10x/0.3")
    h, w = 32, 96
    z_max = 3 * obj.dof_um
    m = _margin(obj, z_max)
    rng = np.random.default_rng(2)
    specimen = rng.uniform(0, 1, (h + 2 * m, w + 2 * m))
    dmap = np.broadcast_to(np.linspace(0.0, z_max, w), (h, w))
    image = render_depth_variant(specimen, dmap, obj)
    assert image.shape == (h, w)
    psf_size = 2 * m + 1
    in_focus = blur(specimen, objective_psf(obj, 0.0, size=psf_size))
    far = blur(specimen, objective_psf(obj, z_max, size=psf_size))
    # the end columns are exactly the images at the end levels
    np.testing.assert_allclose(image[:, 0], in_focus[:, 0], atol=1e-12)
    np.testing.assert_allclose(image[:, -1], far[:, -1], atol=1e-12)

    def grad_energy(a):
        return float((np.diff(a, axis=0) ** 2).mean())

    left, right = slice(0, w // 4), slice(3 * w // 4, w)
    sharp_left = grad_energy(image[:, left]) / grad_energy(in_focus[:, left])
    sharp_right = grad_energy(image[:, right]) / grad_energy(in_focus[:, right])
    assert sharp_left > 5 * sharp_right
    # a middle column is close to the image at its own defocus
    c = w // 2
    mid = blur(specimen, objective_psf(obj, dmap[0, c], size=psf_size))
    np.testing.assert_allclose(image[:, c], mid[:, c], rtol=0.01)


@pytest.mark.parametrize(
    ("dmap", "match"),
    [
        (np.float64(3.0), "needs a 2-D defocus map"),
        (np.zeros((31, 31)), "even margin"),
    ],
)
def test_render_refuses_bad_maps(dmap, match):
    with pytest.raises(ValueError, match=match):
        render_depth_variant(np.ones((40, 40)), dmap, get_objective("10x/0.3"))


# --------------------------------------------------------------------------------------
# camera
# --------------------------------------------------------------------------------------
def test_camera_mean_is_offset_plus_photons_over_gain():
    cam = CameraModel(photons_per_ms=50.0, gain_e_per_adu=0.5, offset_adu=100.0)
    frame = cam.expose(np.full((256, 256), 0.5), 10.0, np.random.default_rng(0))
    assert frame.dtype == np.uint16
    expected = 100.0 + 50.0 * 10.0 * 0.5 / 0.5
    assert frame.mean() == pytest.approx(expected, rel=0.005)


def test_camera_noise_variance_follows_poisson_plus_read_noise():
    cam = CameraModel()
    rng = np.random.default_rng(1)
    variances = []
    for intensity in (0.05, 0.5, 2.0):
        frame = cam.expose(np.full((256, 256), intensity), 10.0, rng).astype(float)
        electrons = cam.photons_per_ms * 10.0 * intensity
        expected = (electrons + cam.read_noise_e**2) / cam.gain_e_per_adu**2 + 1 / 12
        assert frame.var() == pytest.approx(expected, rel=0.05)
        variances.append(frame.var())
    assert np.all(np.diff(variances) > 0)


@pytest.mark.parametrize("bits", [12, 16])
def test_camera_saturates_at_the_bit_depth(bits):
    cam = CameraModel(bit_depth=bits)
    frame = cam.expose(np.array([[0.0, 1e9], [-5.0, 1e12]]), 100.0, np.random.default_rng(2))
    assert frame.dtype == np.uint16
    assert frame[0, 1] == frame[1, 1] == 2**bits - 1
    assert frame.max() == cam.max_adu == 2**bits - 1


def test_camera_without_noise_is_deterministic_and_exact():
    cam = CameraModel()
    intensity = np.linspace(0, 1, 64).reshape(8, 8)
    a = cam.expose(intensity, 20.0, noise=False)
    b = cam.expose(intensity, 20.0, noise=False)
    np.testing.assert_array_equal(a, b)
    expected = np.rint(intensity * cam.photons_per_ms * 20.0 / cam.gain_e_per_adu + 100)
    np.testing.assert_array_equal(a, expected.astype(np.uint16))
    # negative intensities are no light, not negative counts
    assert cam.expose(np.full((2, 2), -1.0), 20.0, noise=False).tolist() == [[100, 100]] * 2


def test_camera_with_a_seeded_rng_is_reproducible():
    cam = CameraModel()
    img = np.full((16, 16), 0.3)
    a = cam.expose(img, 5.0, np.random.default_rng(7))
    b = cam.expose(img, 5.0, np.random.default_rng(7))
    c = cam.expose(img, 5.0, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("exposure", [-1.0, float("nan"), float("inf")])
def test_camera_refuses_a_bad_exposure(exposure):
    with pytest.raises(ValueError, match=r"exposure_ms=.* must be a finite value >= 0"):
        CameraModel().expose(np.ones((4, 4)), exposure)


def test_the_psf_cache_is_bounded_in_bytes_and_keeps_results_exact(monkeypatch):
    """PSFs far out of focus at high NA are tens of MB: the cache holds at most
    ``PSF_CACHE_BYTES`` (the newest PSF always), least recently used out first, and a
    cached PSF is the one computed afresh."""
    from bluesky_deepfocus import optics

    monkeypatch.setattr(optics, "_psf_cache", optics.OrderedDict())
    obj = get_objective("40x/0.75")
    first = objective_psf(obj, 20.0)
    monkeypatch.setattr(optics, "PSF_CACHE_BYTES", int(2.5 * first.nbytes))
    for z in (20.0, 20.5, 21.0, 21.5):
        objective_psf(obj, z)
    assert optics.psf_cache_bytes() <= optics.PSF_CACHE_BYTES
    assert 1 <= len(optics._psf_cache) < 4
    assert objective_psf(obj, 21.5) is objective_psf(obj, 21.5)  # the newest kept
    fresh = widefield_psf(
        21.5,
        na=obj.na,
        wavelength_um=obj.wavelength_um,
        pixel_size_um=obj.pixel_size_um,
        immersion_index=obj.immersion_index,
    )
    np.testing.assert_array_equal(objective_psf(obj, 21.5), fresh)
    # one PSF larger than the whole budget is still kept (alone) and returned
    monkeypatch.setattr(optics, "PSF_CACHE_BYTES", 1)
    big = objective_psf(obj, 30.0)
    assert list(optics._psf_cache.values()) == [big]


@pytest.mark.parametrize("name", ["40x/0.75", "100x/1.45"])
def test_far_out_of_focus_fields_render_from_the_geometric_otf(name):
    """Beyond FAR_DEFOCUS_BLUR_PX of geometric blur (40x: ~147 um out; 100x oil: ~20 um)
    the simulator renders from the stationary-phase OTF instead of a PSF: against the
    PSF convolution of the same crop, the mean within 3e-3 (the largest measured on 6
    families at 40x, 2.4e-3) and the pattern within 1 % of the mean and half the
    pattern; nearer focus the PSF path is kept exactly."""
    from bluesky_deepfocus.optics import FAR_DEFOCUS_BLUR_PX, far_defocus_image
    from bluesky_deepfocus.sim import get_simulation, simulated_microscope

    obj = get_objective(name)
    core = simulated_microscope(
        objective=name,
        specimen="nuclei",
        sensor_shape=(256, 256),
        seed=5,
        slide_size_um=500.0,
    )
    sim = get_simulation(core)
    gate = FAR_DEFOCUS_BLUR_PX * obj.pixel_size_um / math.tan(obj.half_angle)
    for d in (-1.02 * gate, 1.1 * gate):
        psf = objective_psf(obj, d)
        crop = sim.slide.crop(0.0, 0.0, (256, 256), margin=psf.shape[0] // 2)
        exact = blur(crop, psf, mode="valid")
        fast = np.asarray(sim.optical_image(d))
        own = sim.slide.crop(0.0, 0.0, (256, 256), margin=obj.psf_support_px(d) // 2)
        assert np.array_equal(fast, far_defocus_image(own, d, obj, (256, 256)))
        assert abs(fast.mean() / exact.mean() - 1) < 3e-3, d
        pattern = (exact - exact.mean()).std() / exact.mean()
        err = (fast - exact).std() / exact.mean()
        assert err < 0.01 and err < 0.5 * pattern, (d, err, pattern)
    near = 0.98 * gate
    psf = objective_psf(obj, near)
    crop = sim.slide.crop(0.0, 0.0, (256, 256), margin=psf.shape[0] // 2)
    assert np.array_equal(np.asarray(sim.optical_image(near)), blur(crop, psf, mode="valid"))
