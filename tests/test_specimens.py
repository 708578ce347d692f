"""Procedural specimens: shape, dtype, reproducibility, physical units, the train/test split."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bluesky_deepfocus.specimens import (
    FAMILIES,
    TEST_FAMILIES,
    TRAIN_FAMILIES,
    Slide,
    make_specimen,
)


def _skip_without_dependencies(family: str) -> None:
    """Skip the "photos" family without scikit-image (an optional dependency)."""
    if family == "photos":
        pytest.importorskip("skimage")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_specimen_has_the_requested_shape_and_is_a_finite_intensity(family):
    _skip_without_dependencies(family)
    img = make_specimen(family, (96, 80), 0.65, seed=1)
    assert img.shape == (96, 80)
    assert img.dtype == np.float32
    assert np.all(np.isfinite(img))
    assert img.min() >= 0
    assert img.max() > 0
    assert img.std() > 0  # something to focus on


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_specimen_is_reproducible_for_a_seed_and_differs_for_another(family):
    _skip_without_dependencies(family)
    a = make_specimen(family, 64, 0.65, seed=11)
    b = make_specimen(family, 64, 0.65, seed=11)
    c = make_specimen(family, 64, 0.65, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a Generator is consumed like the seed it was made from
    d = make_specimen(family, 64, 0.65, seed=np.random.default_rng(11))
    np.testing.assert_array_equal(a, d)


def test_brightness_multiplies_the_map():
    base = make_specimen("nuclei", 64, 0.65, seed=3)
    bright = make_specimen("nuclei", 64, 0.65, seed=3, brightness=2.5)
    np.testing.assert_allclose(bright, 2.5 * base, rtol=1e-6)


@pytest.mark.parametrize("family", ["edges", "nuclei", "sparse_nuclei", "text"])
def test_same_seed_gives_the_same_physical_field_at_any_sampling(family):
    # object sizes and positions are in micrometres: the field seen with 0.325 um pixels,
    # binned 2x2, is the field seen with 0.65 um pixels
    corr = []
    for seed in (0, 1, 2):
        coarse = make_specimen(family, 80, 0.65, seed=seed).astype(np.float64)
        fine = make_specimen(family, 160, 0.325, seed=seed).astype(np.float64)
        binned = fine.reshape(80, 2, 80, 2).mean(axis=(1, 3))
        corr.append(np.corrcoef(coarse.ravel(), binned.ravel())[0, 1])
    assert min(corr) > 0.85


@pytest.mark.parametrize(
    "family", ["edges", "nuclei", "sparse_nuclei", "tissue", "smooth", "text"]
)
def test_mean_intensity_does_not_depend_on_the_pixel_size(family):
    def mean_over_seeds(n, px):
        return np.mean([make_specimen(family, n, px, seed=s).mean() for s in range(3)])

    reference = mean_over_seeds(80, 0.65)
    assert mean_over_seeds(40, 1.3) == pytest.approx(reference, rel=0.1)
    assert mean_over_seeds(160, 0.325) == pytest.approx(reference, rel=0.1)


def test_texture_statistics_do_not_depend_on_the_pixel_size():
    # each texture draw is independent across samplings (the noise field has as many
    # samples as pixels), so compare the ensemble mean over many seeds: the per-seed
    # spread is ~30 %, so 40 seeds give ~5 % and the tolerance is 15 %
    def ensemble_mean(n, px):
        return np.mean([make_specimen("texture", n, px, seed=s).mean() for s in range(40)])

    reference = ensemble_mean(64, 0.65)
    assert ensemble_mean(32, 1.3) == pytest.approx(reference, rel=0.15)
    assert ensemble_mean(128, 0.325) == pytest.approx(reference, rel=0.15)


@pytest.mark.parametrize("pixel_size_um", [0.325, 0.65, 1.3])
def test_sparse_nuclei_have_their_physical_size(pixel_size_um):
    # radii U(4, 8) um, axis ratio U(0.7, 1): mean area pi E[r^2] E[ratio] = 100 um^2;
    # nuclei in one pixel unit would be 0.1x to 1.7x that, merged pairs at most 2x
    n = round(130 / pixel_size_um)
    areas = []
    for seed in range(4):
        img = make_specimen("sparse_nuclei", n, pixel_size_um, seed=seed)
        labels, _ = ndimage.label(img > 0.15)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            inside = sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < n and sl[1].stop < n
            if inside:
                areas.append((labels[sl] == k).sum() * pixel_size_um**2)
    assert len(areas) >= 10
    assert np.median(areas) == pytest.approx(100.0, rel=0.25)


def test_train_and_test_families_are_disjoint_and_cover_all():
    assert set(TRAIN_FAMILIES).isdisjoint(TEST_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(TEST_FAMILIES) | {"photos"} == set(FAMILIES)
    assert len(set(TRAIN_FAMILIES)) == len(TRAIN_FAMILIES)
    assert len(set(TEST_FAMILIES)) == len(TEST_FAMILIES)
    # the hard cases are kept for evaluation
    assert {"sparse_nuclei", "beads", "tissue", "smooth"} <= set(TEST_FAMILIES)


def test_unknown_family_names_the_choices():
    with pytest.raises(KeyError, match=r"Unknown specimen family 'bacteria'.*'cells'.*'text'"):
        make_specimen("bacteria", 32, 0.65, seed=0)


@pytest.mark.parametrize("pixel_size_um", [0.0, -0.65])
def test_non_positive_pixel_size_is_refused(pixel_size_um):
    with pytest.raises(ValueError, match=r"pixel_size_um=.* must be positive"):
        make_specimen("nuclei", 32, pixel_size_um, seed=0)


# --------------------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slide() -> Slide:
    return Slide("nuclei", size_um=100.0, pixel_size_um=1.0, seed=4)


def test_slide_is_the_specimen_of_its_seed(slide):
    assert slide.data.shape == (100, 100)
    np.testing.assert_array_equal(slide.data, make_specimen("nuclei", 100, 1.0, seed=4))
    assert slide.fill == pytest.approx(float(np.median(slide.data)))


@pytest.mark.parametrize(("shape", "margin"), [((20, 30), 0), ((20, 30), 5), ((64, 64), 8)])
def test_slide_crop_shape_includes_the_margin(slide, shape, margin):
    out = slide.crop(0.0, 0.0, shape, margin=margin)
    assert out.shape == (shape[0] + 2 * margin, shape[1] + 2 * margin)
    assert out.dtype == np.float32


def test_slide_crop_at_the_centre_and_stage_axes(slide):
    np.testing.assert_array_equal(slide.crop(0.0, 0.0, (20, 20)), slide.data[40:60, 40:60])
    # +x moves the field to later columns, +y to later rows (1 um = 1 px here)
    np.testing.assert_array_equal(slide.crop(10.0, 0.0, (20, 20)), slide.data[40:60, 50:70])
    np.testing.assert_array_equal(slide.crop(0.0, -15.0, (20, 20)), slide.data[25:45, 40:60])
    np.testing.assert_array_equal(
        slide.crop(0.0, 0.0, (20, 20), margin=3), slide.data[37:63, 37:63]
    )


def test_slide_crop_outside_the_slide_is_mounting_medium(slide):
    far = slide.crop(500.0, -500.0, (16, 16), margin=2)
    assert far.shape == (20, 20)
    assert np.all(far == np.float32(slide.fill))
    # half on, half off the right edge
    edge = slide.crop(50.0, 0.0, (20, 20))
    np.testing.assert_array_equal(edge[:, :10], slide.data[40:60, 90:100])
    assert np.all(edge[:, 10:] == np.float32(slide.fill))
