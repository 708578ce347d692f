"""Classic focus functions: higher is sharper, gain invariance, defined edge cases, input checks.

Defocus series are rendered with the simulator's optics (10x/0.3, up to 3 DOF) on test
families only, noise-free and with mild camera noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_deepfocus.errors import ImageError
from bluesky_deepfocus.metrics import (
    CLASSIC_FUNCTIONS,
    NormalizedVariance,
    Tenengrad,
    get_focus_function,
)
from bluesky_deepfocus.optics import (
    CameraModel,
    blur,
    get_objective,
    objective_psf,
    psf_support_px,
)
from bluesky_deepfocus.specimens import make_specimen

PATCH = 64
DEFOCUS_DOF = (0.0, 0.5, 1.0, 2.0, 3.0)
SPECIMENS = {"nuclei": 2, "tissue": 2, "neurons": 2}  # test families and their seeds
NAMES = sorted(CLASSIC_FUNCTIONS)
# scale-free functions: all but the normalized variance (var / mean, Groen et al.)
NORMALIZED = [n for n in NAMES if n != "normalized_variance"]


@pytest.fixture(scope="module")
def defocus_series() -> dict[str, list[np.ndarray]]:
    """Noise-free 128x128 images of each specimen at DEFOCUS_DOF (10x/0.3)."""
    obj = get_objective("10x/0.3")
    size = psf_support_px(
        max(DEFOCUS_DOF) * obj.dof_um,
        na=obj.na,
        wavelength_um=obj.wavelength_um,
        pixel_size_um=obj.pixel_size_um,
    )
    series = {}
    for family, seed in SPECIMENS.items():
        specimen = make_specimen(family, 128 + size - 1, obj.pixel_size_um, seed=seed)
        series[family] = [
            blur(specimen, objective_psf(obj, k * obj.dof_um, size=size)) for k in DEFOCUS_DOF
        ]
    return series


@pytest.fixture(scope="module")
def noisy_series(defocus_series) -> dict[str, list[np.ndarray]]:
    """The same series through a camera (5000 e- per unit intensity, fixed noise seed)."""
    cam = CameraModel(photons_per_ms=50.0)
    return {
        family: [cam.expose(img, 100.0, np.random.default_rng(0)) for img in images]
        for family, images in defocus_series.items()
    }


def _scores(name: str, images: list[np.ndarray]) -> np.ndarray:
    fn = get_focus_function(name, patch_size=PATCH)
    results = [fn.score(img) for img in images]
    assert all(r.informative_fraction == 1.0 for r in results)
    return np.array([r.score for r in results])


@pytest.mark.parametrize("family", sorted(SPECIMENS))
@pytest.mark.parametrize("name", NAMES)
def test_score_falls_as_defocus_grows(defocus_series, name, family):
    scores = _scores(name, defocus_series[family])
    if name == "vollath_f4":
        # F4 = R(1) - R(2) flattens to ~0 (and may go negative) beyond ~1 DOF: only its
        # peak and its near-focus slope are meaningful
        assert np.argmax(scores) == 0
        assert scores[0] > scores[1] > scores[2]
    else:
        assert np.all(np.diff(scores) < 0), scores


@pytest.mark.parametrize("family", sorted(SPECIMENS))
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("sml", "vollath_f4")])
def test_score_falls_as_defocus_grows_with_camera_noise(noisy_series, name, family):
    # SML is excluded: an L1 measure of Poisson noise grows as blur spreads the light
    # (E|n| ~ sqrt(I) is concave), which outweighs its signal beyond ~1 DOF
    scores = _scores(name, noisy_series[family])
    assert np.all(np.diff(scores) < 0), scores


@pytest.mark.parametrize("name", NAMES)
def test_every_function_is_higher_is_sharper(name):
    fn = get_focus_function(name)
    assert fn.higher_is_sharper
    assert fn.name == name


@pytest.mark.parametrize("gain", [0.01, 7.3, 1000.0])
@pytest.mark.parametrize("name", NORMALIZED)
def test_normalized_scores_ignore_a_multiplicative_gain(defocus_series, name, gain):
    img = defocus_series["tissue"][1]
    fn = get_focus_function(name, patch_size=PATCH)
    ref = fn.score(img)
    scaled = fn.score(gain * img)
    np.testing.assert_allclose(scaled.blur_map, ref.blur_map, rtol=1e-4)
    np.testing.assert_array_equal(scaled.confidence, ref.confidence)


def test_normalized_variance_scales_with_the_gain(defocus_series):
    # Groen's normalized variance is var / mean: proportional to the gain
    img = defocus_series["tissue"][1]
    fn = NormalizedVariance(patch_size=PATCH)
    assert fn.score(7.3 * img).score == pytest.approx(7.3 * fn.score(img).score, rel=1e-4)


@pytest.mark.parametrize("level", [0.0, 5.0, 1234.0])
@pytest.mark.parametrize("name", NAMES)
def test_a_uniform_image_has_no_focus_information(name, level):
    result = get_focus_function(name, patch_size=PATCH).score(np.full((128, 192), level))
    assert result.blur_map.shape == (2, 3)
    assert np.all(result.confidence == 0)
    assert np.isnan(result.score)
    assert not result.informative


@pytest.mark.parametrize("level", [0.1, 0.7])
def test_a_uniform_image_at_a_non_dyadic_level_has_no_focus_information(level):
    result = Tenengrad(patch_size=PATCH).score(np.full((128, 128), level, dtype=np.float32))
    assert np.all(result.confidence == 0)
    assert np.isnan(result.score)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(bad):
    img = np.ones((128, 128))
    img[3, 5] = bad
    with pytest.raises(ImageError, match=r"1 NaN/inf pixel"):
        Tenengrad().score(img)


def test_an_image_smaller_than_a_patch_is_refused():
    with pytest.raises(ImageError, match=r"smaller than the minimum 128x128"):
        Tenengrad().score(np.ones((127, 300)))
    with pytest.raises(ImageError, match=r"smaller than the minimum 64x64"):
        Tenengrad(patch_size=64).score(np.ones((200, 63)))


def test_rgb_frames_are_scored_as_luminance(defocus_series):
    gray = defocus_series["nuclei"][0].astype(np.float32)
    fn = Tenengrad(patch_size=PATCH)
    ref = fn.score(gray)
    # equal channels: Rec. 601 luminance weights sum to 1
    for channels in (3, 4):
        rgb = np.repeat(gray[..., None], channels, axis=-1)
        np.testing.assert_allclose(fn.score(rgb).blur_map, ref.blur_map, rtol=1e-4)
    # a colour frame is scored as its luminance
    rgb = np.stack([gray, 0.5 * gray, np.zeros_like(gray)], axis=-1)
    lum = (0.299 + 0.587 * 0.5) * gray
    np.testing.assert_allclose(fn.score(rgb).blur_map, fn.score(lum).blur_map, rtol=1e-4)


def test_a_five_channel_array_is_refused():
    with pytest.raises(ImageError, match=r"\(128, 128, 5\) is not a 2-D frame"):
        Tenengrad().score(np.ones((128, 128, 5)))


def test_a_single_frame_stack_is_accepted(defocus_series):
    img = defocus_series["tissue"][0]
    fn = Tenengrad(patch_size=PATCH)
    np.testing.assert_allclose(fn.score(img[None]).blur_map, fn.score(img).blur_map)


def test_non_numeric_images_are_refused():
    with pytest.raises(ImageError, match="not numeric"):
        Tenengrad().score(np.full((128, 128), "a"))


def test_roi_scores_the_cropped_region(defocus_series):
    img = defocus_series["neurons"][0]  # 128 x 128
    fn = Tenengrad(patch_size=PATCH)
    x, y, w, h = 10, 20, 100, 70
    result = fn.score(img, roi=(x, y, w, h))
    crop = fn.score(img[y : y + h, x : x + w])
    assert result.blur_map.shape == (1, 1)
    np.testing.assert_array_equal(result.blur_map, crop.blur_map)
    # the grid is centred in the ROI and reported in image coordinates
    assert result.origin == (y + (h - PATCH) // 2, x + (w - PATCH) // 2)


@pytest.mark.parametrize(
    ("roi", "match"),
    [
        ((100, 0, 64, 64), "does not fit in the 128x128 image"),
        ((-1, 0, 64, 64), "does not fit"),
        ((0, 0, 0, 64), "does not fit"),
        ((0, 0, 63, 64), "smaller than the minimum 64x64"),
        ((0, 0, 64), r"must be \(x, y, width, height\)"),
    ],
)
def test_a_bad_roi_is_refused(roi, match):
    with pytest.raises(ImageError, match=match):
        Tenengrad(patch_size=PATCH).score(np.ones((128, 128)), roi=roi)


def test_get_focus_function_by_name():
    fn = get_focus_function("Tenengrad", patch_size=PATCH)
    assert isinstance(fn, Tenengrad)
    assert fn.patch_size == PATCH


def test_get_focus_function_unknown_name_lists_the_choices():
    with pytest.raises(
        KeyError, match=r"Unknown focus function 'variance'.*'deepfocus'.*'tenengrad'"
    ):
        get_focus_function("variance")


@pytest.mark.parametrize("name", NAMES)
def test_saturated_patches_have_no_confidence(noisy_series, name):
    frame = noisy_series["tissue"][0].copy()  # uint16, 128 x 128
    fn = get_focus_function(name, patch_size=PATCH)
    assert np.all(fn.score(frame).confidence > 0)
    frame[:, :64] = np.where(np.arange(64) % 5 == 0, frame[:, :64], 65535)  # 80 % clipped
    frame[:10, 64:] = 65535  # 16 % clipped: still informative
    result = fn.score(frame)
    np.testing.assert_array_equal(result.confidence[:, 0], 0.0)
    assert np.all(result.confidence[:, 1] > 0)


def test_saturation_level_can_be_given_for_float_frames(defocus_series):
    img = np.asarray(defocus_series["tissue"][0], dtype=np.float64)
    fn = Tenengrad(patch_size=PATCH, saturation=float(np.percentile(img, 50)))
    assert np.all(fn.score(img).confidence == 0)  # half the pixels at or above "saturation"
    assert np.all(Tenengrad(patch_size=PATCH).score(img).confidence > 0)


@pytest.mark.parametrize(
    ("family", "seed"), [("text", 1012), ("beads", 1012), ("smooth", 1012), ("tissue", 1013)]
)
def test_gradient_sharpness_orders_frames_of_one_field_by_defocus(family, seed):
    """The plans' "never less sharp than at the start" measure: on the same field a
    farther frame is never judged sharper (the spectral high/low-band ratio is not
    monotone on text: -2.44, -1.29, -0.45 at 10, 15, 20 um for the text field here)."""
    from bluesky_deepfocus.metrics import gradient_sharpness
    from bluesky_deepfocus.sim import get_simulation, simulated_microscope

    sim = get_simulation(
        simulated_microscope(
            objective="10x/0.3",
            specimen=family,
            sensor_shape=(512, 512),
            seed=seed,
            slide_size_um=550.0,
        )
    )
    sim.auto_expose()
    sim.set_true_focus(0.0)
    zs = (-30.0, -15.0, -6.0, -3.0, 0.0, 3.0, 6.0, 10.0, 15.0, 20.0, 30.0)
    s = np.array([gradient_sharpness(sim.render(z).astype(np.float32)) for z in zs])
    assert np.all(np.isfinite(s))
    # no farther frame (either side of focus) is judged sharper by more than the search's
    # order_sigma (0.02; the plans' tolerance is 0.05), and equally far frames on the two
    # sides are equally sharp: what DeepFocusSearch's sharpness order relies on
    from bluesky_deepfocus.search import DeepFocusSettings

    sigma = DeepFocusSettings().order_sigma
    a = np.abs(zs)
    worst = max(s[j] - s[i] for i in range(len(zs)) for j in range(len(zs)) if a[j] > a[i])
    assert worst < sigma, dict(zip(zs, s.round(3), strict=True))
    for i, j in ((2, 6), (1, 8), (0, 10)):  # -6/6, -15/15, -30/30
        assert abs(s[i] - s[j]) < sigma, (zs[i], zs[j], s[i], s[j])


def test_gradient_sharpness_ignores_exposure():
    from bluesky_deepfocus.metrics import gradient_sharpness

    img = np.random.default_rng(0).random((256, 256)) + 1.0
    assert gradient_sharpness(3.0 * img) == pytest.approx(gradient_sharpness(img))
    assert np.isnan(gradient_sharpness(np.zeros((64, 64))))


def test_gradient_sharpness_floor_is_that_of_a_noise_frame():
    from bluesky_deepfocus.metrics import gradient_sharpness, gradient_sharpness_floor
    from bluesky_deepfocus.spectral import frame_spectrum

    rng = np.random.default_rng(2)
    img = 800.0 + rng.normal(0.0, 15.0, (512, 512))
    floor = gradient_sharpness_floor(float(img.mean()), frame_spectrum(img).noise)
    assert abs(gradient_sharpness(img) - floor) < 0.03
    assert np.isnan(gradient_sharpness_floor(0.0, 1.0))
    assert np.isnan(gradient_sharpness_floor(100.0, float("nan")))


@pytest.mark.parametrize("shape", [(512, 512), (37, 64), (1, 9), (2, 2)])
def test_gradient_sharpness_is_the_sobel_energy_of_the_frame(shape):
    """The sliced Sobel pair equals ``ndimage.sobel`` with edge replication, to float32
    rounding, on frames of any shape (incl. single rows) and dtype."""
    from scipy import ndimage

    from bluesky_deepfocus.metrics import gradient_sharpness

    rng = np.random.default_rng(1)
    raw = (rng.random(shape) * 4000).astype(np.uint16)
    smooth = ndimage.gaussian_filter(raw.astype(np.float32), 2.0) + 50.0
    for img in (raw, smooth):
        f = img.astype(np.float32)
        gx = ndimage.sobel(f, axis=1, mode="nearest")
        gy = ndimage.sobel(f, axis=0, mode="nearest")
        want = np.log(
            np.mean(gx * gx + gy * gy, dtype=np.float64) / np.mean(f, dtype=np.float64) ** 2
        )
        assert gradient_sharpness(img) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("family", ["smooth", "sparse_nuclei"])
def test_sharpness_benchmark_finds_the_order_specimen_free(family):
    """bench_sharpness on a small stack: no frame sharper than a nearer one (violation
    negative), and the two sides of focus agree within the search's order_sigma."""
    from bluesky_deepfocus.benchmarks.bench_sharpness import measure_field
    from bluesky_deepfocus.search import DeepFocusSettings

    r = measure_field("10x/0.3", family, 2001, num=13, sensor=256)
    assert r["violation_dof_d0.02"] < 0, r
    assert r["max_asym"] < DeepFocusSettings().order_sigma, r
    assert r["range"] > 0.5, r  # the stack does span sharp and blurred frames


def test_sharpness_model_benchmark_measures_the_curves_scatter():
    """bench_sharpness --model on a small stack: the symmetric curve fits a smooth field's
    frames to within the search's assumed scatter, with a width inside the fitted range."""
    from bluesky_deepfocus.benchmarks.bench_sharpness import model_scatter
    from bluesky_deepfocus.search import DeepFocusSettings

    r = model_scatter("10x/0.3", "smooth", 2001, num=13, sensor=256)
    assert r["frames"] >= 5, r
    assert 0 < r["rms"] < DeepFocusSettings().sharpness_fit_sigma, r
    assert 0.1 <= r["width_dof"] <= 2.0, r
