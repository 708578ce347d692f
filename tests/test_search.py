"""The search strategies on closed-form curves: exact recovery, noise, bounds, budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from bluesky_deepfocus.search import (
    BrentSearch,
    DeepFocusSearch,
    DeepFocusSettings,
    Observation,
    PaperSearch,
    field_plane,
    make_search,
    pool_field_tilts,
)

from . import _synthetic as syn


@pytest.fixture(scope="module")
def cal():
    return syn.calibration()


def drive(search, focus, **kw):
    while (z := search.ask()) is not None:
        search.tell(syn.observe(z, focus, **kw))
    return search.result()


@pytest.mark.parametrize("focus", [-57.3, -12.0, 0.4, 23.9, 58.0])
def test_ours_recovers_focus_exactly_without_noise(cal, focus):
    res = drive(DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=6), focus)
    assert res.converged
    assert abs(res.z_focus - focus) < 0.05
    assert res.images <= 6


@pytest.mark.parametrize("offset", [-0.4, 0.4])
def test_ours_cancels_the_specimen_offset_paper_does_not(cal, offset):
    """A specimen whose raw CNN scores sit `offset` above the calibration curve, and whose
    spectrum has another slope: relative information cancels it, raw matching does not."""
    focus = 31.0
    ours = drive(
        DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=6), focus, offset=offset
    )
    paper = drive(
        PaperSearch(cal, start=0.0, lo=-150, hi=150, min_images=3, max_images=6),
        focus,
        offset=offset,
    )
    assert abs(ours.z_focus - focus) < 0.1
    assert abs(paper.z_focus - focus) > max(0.5, 5 * abs(ours.z_focus - focus))


def test_paper_recovers_focus_when_specimen_matches(cal):
    res = drive(PaperSearch(cal, start=0.0, lo=-150, hi=150, min_images=3, max_images=8), 17.0)
    assert abs(res.z_focus - 17.0) < 0.3


def test_ours_is_graceful_with_noise(cal):
    rng = np.random.default_rng(4)
    errs = []
    for focus in rng.uniform(-60, 60, 12):
        res = drive(
            DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=6),
            float(focus),
            rng=rng,
            blur_noise=0.1,
        )
        assert np.isfinite(res.z_focus)
        errs.append(abs(res.z_focus - focus))
    assert np.mean(errs) < 0.5
    assert np.max(errs) < 2.0


def test_exact_budget_is_honoured(cal):
    for n in (2, 3, 5):
        res = drive(
            DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, min_images=n, max_images=n), 20.0
        )
        assert res.images == n
        res = drive(PaperSearch(cal, start=0.0, lo=-150, hi=150, min_images=n, max_images=n), 20.0)
        assert res.images == n


def test_blank_field_moves_nowhere_blindly(cal):
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=5)
    while (z := s.ask()) is not None:
        s.tell(Observation(z=z))  # no CNN information, no spectrum
    res = s.result()
    assert not res.converged
    assert res.confidence == 0.0
    assert "no focus information" in res.reason
    assert res.z_focus == 0.0


def test_warm_start_prior_refocuses_in_three_images(cal):
    """Timelapse refocus: the last result as prior, a budget of 3 images."""
    for truth in (2.0, -3.1, 0.2):
        warm = drive(
            DeepFocusSearch(
                cal, start=0.0, lo=-150, hi=150, min_images=2, max_images=3, prior=(0.0, 4.0)
            ),
            truth,
        )
        assert warm.images <= 3
        assert abs(warm.z_focus - truth) < 0.15


def test_brent_finds_the_sharpest_position():
    f = 12.3
    s = BrentSearch(start=0.0, lo=-60, hi=60, xtol=0.05, max_images=40)
    while (z := s.ask()) is not None:
        s.tell(Observation(z=z, sharpness=-((z - f) ** 2)))
    res = s.result()
    assert abs(res.z_focus - f) < 0.1
    assert res.converged


def test_search_argument_validation(cal):
    with pytest.raises(ValueError, match="outside the search bounds"):
        DeepFocusSearch(cal, start=200.0, lo=-150, hi=150)
    with pytest.raises(ValueError, match="min_images <= max_images"):
        DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, min_images=5, max_images=3)
    with pytest.raises(ValueError, match="Unknown strategy 'gss'"):
        make_search("gss", cal, start=0.0, lo=-1, hi=1)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lo=st.floats(-300, 0),
    width=st.floats(0.5, 400),
    frac=st.floats(0, 1),
    max_images=st.integers(1, 10),
    strategy=st.sampled_from(["deepfocus", "paper", "brent"]),
    seed=st.integers(0, 2**16),
    blanks=st.floats(0, 1),
)
def test_never_outside_bounds_and_always_terminates(
    cal, lo, width, frac, max_images, strategy, seed, blanks
):
    """Hostile input: arbitrary bounds, adversarial (random, NaN, inf, huge) scores and
    spectra. The search never proposes a position outside [lo, hi] and stops within
    max_images asks."""
    rng = np.random.default_rng(seed)
    hi = lo + width
    start = lo + frac * width
    kw = {"start": start, "lo": lo, "hi": hi, "min_images": 1, "max_images": max_images}
    s = make_search(strategy, cal, **kw)
    asked = 0
    while (z := s.ask()) is not None:
        asked += 1
        assert lo <= z <= hi
        assert asked <= max_images
        choice = rng.random()
        if choice < blanks * 0.5:
            obs = Observation(z=z)
        else:
            b = float(rng.choice([rng.normal(1, 3), np.nan, np.inf, -np.inf, 1e9]))
            spec = syn.spectrum(
                float(rng.uniform(-200, 200)), slope=float(rng.uniform(0, 4)), rng=rng
            )
            obs = Observation(
                z=z, blur=b, spectrum=spec if rng.random() < 0.7 else None, sharpness=b
            )
        s.tell(obs)
    res = s.result()
    assert asked <= max_images
    # an estimate beyond the bounds may be reported, but never as converged (not moved to)
    assert math.isnan(res.z_focus) or lo - 1e-9 <= res.z_focus <= hi + 1e-9 or not res.converged


def test_settings_are_recorded(cal):
    s = DeepFocusSearch(cal, start=0.0, lo=-10, hi=10, settings=DeepFocusSettings(tol_dof=0.05))
    rec = s.settings()
    assert rec["tol_dof"] == 0.05 and rec["name"] == "deepfocus" and rec["lo"] == -10


@pytest.mark.parametrize("truth", [-45.0, 12.0, 60.0])
def test_images_that_contradict_a_warm_start_prior_win(cal, truth):
    """A focus jump far beyond a tight prior (sd = DOF/4): the candidates still cover the
    whole range, and the images, not the prior, decide."""
    res = drive(
        DeepFocusSearch(
            cal, start=0.0, lo=-150, hi=150, min_images=2, max_images=5, prior=(0.0, 2.8)
        ),
        truth,
    )
    assert res.converged and abs(res.z_focus - truth) < 0.3, res
    assert res.details["prior_weight"] < 0.5  # the prior was recognised as contradicted


def test_prior_floor_setting(cal):
    with pytest.raises(ValueError, match=r"prior_floor=1\.0 must be in \[0, 1\)"):
        DeepFocusSearch(
            cal,
            start=0.0,
            lo=-150,
            hi=150,
            prior=(0, 4),
            settings=DeepFocusSettings(prior_floor=1.0),
        )
    # prior_floor=0: a plain Gaussian prior (trusts it fully); still refocuses a small drift
    res = drive(
        DeepFocusSearch(
            cal,
            start=0.0,
            lo=-150,
            hi=150,
            min_images=2,
            max_images=3,
            prior=(0.0, 4.0),
            settings=DeepFocusSettings(prior_floor=0.0),
        ),
        2.0,
    )
    assert abs(res.z_focus - 2.0) < 0.15 and res.details["prior_weight"] == 1.0


def _wide_search(start: float, **settings) -> DeepFocusSearch:
    """A search over +/-150 um on the synthetic calibration, up to 8 images."""
    return DeepFocusSearch(
        syn.calibration(),
        start=start,
        lo=-150,
        hi=150,
        max_images=8,
        settings=DeepFocusSettings(**settings),
    )


def _misleading(cal_focus: float, true_focus: float, zs, **settings):
    """A search told frames whose CNN scores and spectra say focus is at ``cal_focus``
    (a specimen the calibration misdescribes) while their sharpness order says
    ``true_focus``."""
    s = _wide_search(zs[0], **settings)
    for z in zs:
        o = syn.observe(z, cal_focus)
        o.gradient_sharpness = syn.gradient_sharpness(z, true_focus)
        s.tell(o)
    return s.result()


def test_sharpness_order_overrules_a_misleading_calibration_match():
    """All frames on one side of focus, fitting a calibration curve whose focus is 18 um
    off: the frame at 10 um is sharper than the one at 14, so focus is below 12 um."""
    zs = [10.0, 14.0, 22.0, 30.0, 18.0]
    blind = _misleading(18.0, 0.0, zs, use_sharpness_order=False)
    assert blind.converged and abs(blind.z_focus - 18.0) < 0.5  # the trap is real
    res = _misleading(18.0, 0.0, zs)
    assert not (res.converged and res.z_focus > 12.0), res
    assert res.z_focus < 12.0 + 0.2 * syn.DOF


def test_sharpness_order_costs_nothing_when_it_agrees(cal):
    zs = [40.0, 20.0, -5.0, 5.0, 0.3]
    res = _misleading(0.0, 0.0, zs)
    assert res.converged and abs(res.z_focus) < 0.05
    assert res.details["order_cost"] < 1e-6


def test_ours_images_the_other_side_before_stopping(cal):
    """A tight estimate from frames all on one side of it: one more frame on the other
    side (within bracket_dof) before the search stops."""
    s = DeepFocusSearch(cal, start=40.0, lo=-150, hi=150, max_images=8)
    while (z := s.ask()) is not None:
        o = syn.observe(z, 0.0)
        o.gradient_sharpness = syn.gradient_sharpness(z, 0.0)
        s.tell(o)
    zs = np.array([o.z for o in s.observations])
    f = s.result().z_focus
    reach = s.s.bracket_dof * syn.DOF
    assert np.any((zs > f) & (zs <= f + reach)) and np.any((zs < f) & (zs >= f - reach))


def test_frames_the_calibration_cannot_explain_are_never_converged(cal):
    """Spectra whose shape changes from frame to frame in a way no defocus explains
    (content entering the field from beyond it): refused, and the reason says why."""
    rng = np.random.default_rng(0)
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=6)
    while (z := s.ask()) is not None:
        o = syn.observe(z, 10.0)
        o.spectrum = syn.spectrum(z - 10.0, slope=float(rng.uniform(1.0, 4.0)))
        s.tell(o)
    res = s.result()
    assert not res.converged
    assert "do not fit the calibration" in res.reason
    assert res.details["spec_chi2_red"] > s.s.misfit_chi2


def _cnn_only(zs, **settings):
    s = _wide_search(zs[0], **settings)
    for z in zs:
        o = syn.observe(z, 0.0)
        o.spectrum = None  # no spectral detail: the CNN's raw score alone
        o.gradient_sharpness = syn.gradient_sharpness(z, 0.0)
        s.tell(o)
    return s.result()


def test_a_cnn_only_estimate_needs_images_on_both_sides():
    """The CNN's raw score depends on the specimen: with no spectral detail, an estimate
    is converged only when images on both sides of it confirm it."""
    one_side = _cnn_only([3.0, 5.0, 7.0, 9.0, 11.0, 13.0])
    assert not one_side.converged, one_side
    # the rule itself, where the CNN alone would be precise enough to call it converged
    sure = _cnn_only([3.0, 5.0, 7.0, 9.0, 11.0, 13.0], cnn_sigma=0.1)
    assert sure.sigma_um < 0.1 * syn.calibration().dof_um, sure
    assert not sure.converged, sure
    assert "only the CNN" in sure.reason
    both = _cnn_only([8.0, 12.0, -7.0, 0.2])
    assert both.converged and abs(both.z_focus) < 0.5, both


def _tilted_observations(zs, rng):
    """Frames of a 3 x 3-patch field tilted by 0.6 DOF across it (patch focus
    ``syn.DOF * 0.3 * (col - 1) + 0.1 * DOF * (row - 1)`` about 20 um), each patch with
    its own specimen (spectral slope, CNN offset), a few patches missing a spectrum in
    one frame and one patch's CNN score unconfident in one frame."""
    focus = 20.0 + syn.DOF * (
        0.3 * (np.arange(3)[None, :] - 1) + 0.1 * (np.arange(3)[:, None] - 1)
    )
    slopes = rng.uniform(1.5, 3.0, (3, 3))
    offsets = rng.normal(0.0, 0.2, (3, 3))
    obs = []
    for n, z in enumerate(zs):
        blur = np.array(
            [[syn.blur_score(z - focus[i, j], offsets[i, j]) for j in range(3)] for i in range(3)]
        )
        conf = np.ones((3, 3))
        specs = [
            [syn.spectrum(z - focus[i, j], slope=slopes[i, j], rng=rng) for j in range(3)]
            for i in range(3)
        ]
        if n == 1:
            specs[0][2] = None  # e.g. a saturated patch in this frame
            conf[2, 0] = 0.1
        o = syn.observe(z, 20.0, rng=rng)
        o.blur_map, o.confidence, o.patch_spectra = blur, conf, specs
        obs.append(o)
    return obs, focus


def test_the_focus_map_batches_patches_exactly_and_recovers_a_tilt(cal):
    """The per-patch focus map solves all patches at once (patches grouped by which frames
    have a spectrum there): every patch's costs equal the frame-level costs computed for
    that patch alone, and the map recovers the tilt."""
    rng = np.random.default_rng(3)
    zs = [0.0, 14.0, 24.0, 19.0, 21.5]
    obs, focus = _tilted_observations(zs, rng)
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=8)
    for o in obs:
        s.tell(o)
    grid = np.linspace(5.0, 35.0, 33)
    z = np.array(zs)
    cells = list(np.ndindex(3, 3))
    bs = np.array(
        [[o.blur_map[c] if o.confidence[c] >= 0.5 else np.nan for o in obs] for c in cells]
    )
    rows = s._cnn_cost_rows(z, bs, grid)
    chi2, dof = s._patch_spec_costs(z, cells, grid)
    for p, c in enumerate(cells):
        np.testing.assert_allclose(rows[p], s._cnn_cost(z, bs[p], grid), rtol=1e-9, atol=1e-9)
        one_chi2, one_dof = s._spec_cost(z, [o.patch_spectra[c[0]][c[1]] for o in obs], grid)
        np.testing.assert_allclose(chi2[p], one_chi2, rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(dof[p], one_dof)
    assert np.any(dof > 0)
    fmap = s.result().focus_map
    assert fmap is not None and np.isfinite(fmap).all()
    assert np.abs(fmap - focus).max() < 0.1 * syn.DOF, fmap - focus


def test_the_specimens_own_sharpness_curve_locates_focus_the_calibration_misses():
    """Frames on both sides of focus whose CNN scores and spectra say focus is 18 um off
    (a specimen the calibration misdescribes): the sharpness order alone only bounds the
    focus and the search refuses; the fit of the frames' own symmetric sharpness curve
    locates it, and the estimate is then the sharpness's."""
    zs = [-20.0, 12.0, -6.0, 5.0, 1.0]
    order_only = _misleading(18.0, 0.0, zs, sharpness_fit_sigma=0.0)
    assert not order_only.converged and abs(order_only.z_focus) > 1.0, order_only  # the trap
    fit = _misleading(18.0, 0.0, zs, sharpness_fit_sigma=0.1)
    assert fit.converged, fit
    assert abs(fit.z_focus) < 0.03 * syn.DOF, fit
    assert fit.details.get("from_sharpness") == 1.0
    assert "own sharpness curve" in fit.reason


@pytest.mark.parametrize("cal_focus", [2.0, 4.0, 8.0, 12.0])
def test_a_sharpness_curve_bracketed_by_images_overrules_a_moderately_wrong_match(cal_focus):
    """Spectra and CNN that put the focus 0.2-1 DOF off: the combined estimate sits between
    them and the frames' own sharpness, more than 2 of its sd from the latter, and was
    refused; with images within ``bracket_dof`` on both sides of the sharpness curve's
    mode, that curve alone locates the focus, and the estimate is the sharpness's."""
    zs = [-20.0, 12.0, -6.0, 5.0, 1.0]
    old = _misleading(cal_focus, 0.0, zs, sharpness_fit_sigma=0.1, overrule_when_bracketed=False)
    assert not old.converged and abs(old.z_focus) > 0.5, old  # the trap
    new = _misleading(cal_focus, 0.0, zs, sharpness_fit_sigma=0.1)
    assert new.converged, new
    assert abs(new.z_focus) < 0.01 * syn.DOF, new
    assert new.details.get("from_sharpness") == 1.0
    assert "own sharpness curve" in new.reason


def test_a_sharpness_mode_cut_off_by_the_window_does_not_overrule():
    """The fine window around a combined estimate pulled 9 um off can end before the
    sharpness curve's peak (at 0): the part inside it has its mode at the window's edge
    (-1.76 um) and a small sd. That is no location of the focus: not overruled, not
    converged there (found by a review's random search)."""
    zs = [-12.3, -5.6, 11.4, 14.4, 19.1, 24.9]
    res = _misleading(-8.8, 0.0, zs, sharpness_fit_sigma=0.1)
    assert res.details.get("sharp_contained") == 0.0, res.details
    assert res.details.get("from_sharpness") != 1.0, res
    assert not res.converged, res


def test_an_overruling_sharpness_curve_is_not_refused_for_the_spectras_misfit():
    """Once the sharpness curve overrules, the estimate is its mode (``details["f"]``, the
    combined one kept as ``combined_f``): spectra that misfit the table are no reason to
    refuse it, as for an estimate the curve confirms."""
    zs = [-20.0, 12.0, -6.0, 5.0, 1.0]
    res = _misleading(8.0, 0.0, zs, sharpness_fit_sigma=0.1, misfit_chi2=1.0)
    assert res.details["spec_chi2_red"] > 1.0
    assert res.converged and abs(res.z_focus) < 0.01 * syn.DOF, res
    assert res.details["f"] == res.z_focus and abs(res.details["combined_f"]) > 0.5
    assert "own sharpness curve" in res.reason


def test_the_sharpness_curve_overrules_only_in_a_conflict_when_tight_and_bracketed(cal):
    """The rule's conditions one by one, on a search with images at -20, -6, 1, 5, 12 um
    (bracket_dof 1.5 DOF = 17 um): a conflict, spectra with detail, a sharpness sd within
    converged_dof, the sharpness posterior inside its window, and images within
    bracket_dof on both sides of the sharpness mode."""

    def search(**settings):
        s = DeepFocusSearch(
            cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(**settings)
        )
        for z in (-20.0, 12.0, -6.0, 5.0, 1.0):
            s.tell(Observation(z=z, gradient_sharpness=-abs(z) / 10))
        return s

    s = search()
    tight = 0.5 * s.s.converged_dof * s.dof
    info = {"order_penalty": 50.0, "order_cost": 0.0, "f": 4.0, "sharp_mode": 0.0}
    info["sharp_contained"] = 1.0
    info["spec_dof"] = 40.0
    assert s._sharpness_overrules({**info, "sharp_sd": tight})
    # spectra without detail (a blank field lit from beyond its edge): not overruled;
    # with the spectra switched off there is no such test to pass
    assert not s._sharpness_overrules({**info, "sharp_sd": tight, "spec_dof": 1.0})
    assert search(use_spectra=False)._sharpness_overrules(
        {**info, "sharp_sd": tight, "spec_dof": 0.0}
    )
    assert not s._sharpness_overrules({**info, "sharp_sd": tight, "sharp_contained": 0.0})
    assert not s._sharpness_overrules({**info, "sharp_sd": 1.1 * s.s.converged_dof * s.dof})
    assert not s._sharpness_overrules({**info, "sharp_sd": tight, "order_penalty": 1.0})
    # images on one side of the mode only: 30 um (the nearest below is 18 um away), -25 um
    assert not s._sharpness_overrules({**info, "sharp_sd": tight, "sharp_mode": 30.0})
    assert not s._sharpness_overrules({**info, "sharp_sd": tight, "sharp_mode": -25.0})
    assert not search(overrule_when_bracketed=False)._sharpness_overrules(
        {**info, "sharp_sd": tight}
    )
    # an estimate within 2 sd of the sharpness mode: overruled without the bracket
    assert search(overrule_when_bracketed=False)._sharpness_overrules(
        {**info, "sharp_sd": tight, "f": 30.0 + 0.5 * tight, "sharp_mode": 30.0}
    )


def test_the_sharpness_fit_leaves_out_frames_at_the_noise_floor(cal):
    """Frames whose gradient energy is (almost) all camera noise carry no shape: with
    fewer than 4 frames above ``floor_rel`` of the floor the fit adds nothing; frames
    with a known floor are fitted on their signal part."""
    s = DeepFocusSearch(
        cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(sharpness_fit_sigma=0.1)
    )
    grid = np.linspace(-40.0, 40.0, 161)
    zs = np.array([-30.0, -8.0, 3.0, 9.0, 60.0])
    signal = np.array([syn.gradient_sharpness(z, 2.0) for z in zs])
    floor = float(signal.min()) + 0.5
    gs = np.logaddexp(signal, floor)  # the frame's energy: signal + noise floor
    cost = s._sharpness_fit_cost(zs, gs, np.full(5, floor), grid)
    assert cost.min() == 0.0 and abs(grid[np.argmin(cost)] - 2.0) <= 0.5, grid[np.argmin(cost)]
    # the same frames with the floor raised above all but three of them: nothing
    high = float(np.sort(gs)[-3]) - 0.01
    assert not s._sharpness_fit_cost(zs, np.maximum(gs, high), np.full(5, high), grid).any()
    # off by setting
    off = DeepFocusSearch(
        cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(sharpness_fit_sigma=0.0)
    )
    assert not off._sharpness_fit_cost(zs, gs, np.full(5, floor), grid).any()


def test_straddle_ties_go_to_the_side_of_the_sharper_image(cal):
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150)
    for z, g in ((0.0, -4.0), (16.0, -3.7)):
        s.tell(Observation(z=z, gradient_sharpness=g))
    zs = np.array([0.0, 16.0])
    pick = np.array([True, True])
    assert s._sharpest_side(9.0, zs, pick, 0.5) == 1.0
    assert s._sharpest_side(20.0, zs, pick, 0.5) == 0.0  # both below: no side to tell
    s.observations[1].gradient_sharpness = -4.0 + 0.5 * s.s.order_sigma  # within the noise
    assert s._sharpest_side(9.0, zs, pick, 0.5) == 0.0


def _two_images(
    cal,
    probe: bool = True,
    focus: float = 15.0,
    *,
    zs: tuple[float, ...] = (0.0, 18.0),
    hi: float = 150.0,
    max_images: int = 4,
    **settings,
) -> DeepFocusSearch:
    """A search told images at ``zs`` (default 0 and 18 um: the one at 18 the sharper, and
    the outermost) of a field in focus at ``focus``, with their gradient sharpness. The
    probe beyond the sharpest image is a straddle step unless ``probe_gap_max_dof`` is
    given (the repeated step is tested on its own)."""
    settings.setdefault("probe_gap_max_dof", 0.0)
    s = DeepFocusSearch(
        cal,
        start=0.0,
        lo=-150,
        hi=hi,
        max_images=max_images,
        settings=DeepFocusSettings(probe_beyond_sharpest=probe, **settings),
    )
    for z in zs:
        obs = syn.observe(z, focus)
        obs.gradient_sharpness = syn.gradient_sharpness(z, focus)
        s.tell(obs)
    return s


def test_the_next_image_goes_beyond_the_sharpest_image_when_it_is_the_outermost(cal):
    """The estimate (15 um) lies inside the sharper, outermost image (18 um), within a
    straddle step of it: the next image goes a straddle step beyond that image, not
    between the two (where the usual straddle of the estimate would put it)."""
    delta = DeepFocusSettings().straddle_dof * cal.dof_um
    on = _two_images(cal, probe=True)
    f, sd, _ = on._refined()
    assert abs(f - 15.0) < 0.5 and sd < delta
    assert on.ask() == pytest.approx(18.0 + delta)
    off = _two_images(cal, probe=False)
    assert off.ask() == pytest.approx(f + delta)  # the usual straddle, inside 18 um


def test_beyond_the_sharpest_image_takes_the_place_of_the_final_image_at_the_estimate(cal):
    """With one image left the search would image its estimate; while the sharpest image
    is the outermost one it images beyond it instead."""
    delta = DeepFocusSettings().straddle_dof * cal.dof_um
    on = _two_images(cal, probe=True, max_images=3)
    f, _sd, _ = on._refined()
    assert on.ask() == pytest.approx(18.0 + delta)
    off = _two_images(cal, probe=False, max_images=3)
    assert off.ask() == pytest.approx(f, abs=1e-9)  # the usual last image: the estimate


def test_the_last_image_goes_to_the_estimate_while_no_frame_shows_detail(cal):
    """A result needs a frame with detail above the camera noise (``min_detail_share``):
    while none has it, the last image goes to the estimate, where detail is likeliest,
    not beyond the sharpest image; with images left, or with detail seen, it goes beyond."""
    delta = DeepFocusSettings().straddle_dof * cal.dof_um

    def with_detail(share: float, max_images: int) -> DeepFocusSearch:
        s = _two_images(cal, probe=True, max_images=max_images)
        top = max(o.gradient_sharpness for o in s.observations)
        for o in s.observations:  # the sharpest frame stands ``share`` above its floor
            o.sharpness_floor = top - math.log1p(share)
        return s

    low = 0.5 * DeepFocusSettings().min_detail_share
    s = with_detail(low, max_images=3)
    assert s._detail_share() == pytest.approx(low)
    f, _sd, _ = s._refined()
    assert s.ask() == pytest.approx(f, abs=1e-9)  # the last image: the estimate
    assert with_detail(low, max_images=4).ask() == pytest.approx(18.0 + delta)  # one more left
    assert with_detail(2 * low + 0.2, max_images=3).ask() == pytest.approx(18.0 + delta)


def test_beyond_the_sharpest_image_never_past_the_bounds_nor_onto_an_image(cal):
    delta = DeepFocusSettings().straddle_dof * cal.dof_um
    # the image beyond would lie past hi: not proposed (no image clipped onto the bound)
    s = _two_images(cal, probe=True, hi=18.0 + 0.5 * delta)
    assert s._beyond_sharpest(15.0, 0.5) is None
    z = s.ask()
    assert z is not None and z <= s.hi and z != pytest.approx(s.hi)
    # an image (with no sharpness known) already there: not imaged twice
    s = _two_images(cal, probe=True)
    s.tell(Observation(z=18.0 + delta))
    assert s._beyond_sharpest(15.0, 0.5) is None
    # mirrored: the sharpest image below the others -> beyond it is further down
    m = _two_images(cal, focus=-15.0, zs=(0.0, -18.0))
    assert m._beyond_sharpest(-15.0, 0.5) == pytest.approx(-18.0 - delta)


def test_the_probe_beyond_the_sharpest_image_repeats_a_short_step_that_raised_the_sharpness(
    cal,
):
    """The 18-um image, 18 um (1.6 DOF) from the less sharp one, is the sharper: the probe
    goes as far again beyond it (the sharpness rose over that step; a straddle step would
    crawl toward a focus the spectra place short), not a straddle step. After a step
    longer than ``probe_gap_max_dof`` DOF, and with it 0, a straddle step; never shorter
    than one. After a short step the estimate may lie up to half of it from the image."""
    delta = DeepFocusSettings().straddle_dof * cal.dof_um
    gap_max = DeepFocusSettings().probe_gap_max_dof
    assert 18.0 <= gap_max * cal.dof_um
    s = _two_images(cal, probe=True, probe_gap_max_dof=gap_max)
    assert s._beyond_sharpest(15.0, 0.5) == pytest.approx(36.0)
    assert s.ask() == pytest.approx(36.0)
    m = _two_images(cal, focus=-15.0, zs=(0.0, -18.0), probe_gap_max_dof=gap_max)
    assert m._beyond_sharpest(-15.0, 0.5) == pytest.approx(-36.0)  # mirrored
    # the last step longer than the limit: a straddle step
    short = _two_images(cal, probe=True, probe_gap_max_dof=17.0 / cal.dof_um)
    assert short._beyond_sharpest(15.0, 0.5) == pytest.approx(18.0 + delta)
    assert _two_images(cal, probe=True)._beyond_sharpest(15.0, 0.5) == pytest.approx(18.0 + delta)
    # a step shorter than a straddle step: a straddle step
    near = _two_images(cal, focus=4.0, zs=(0.0, 3.0), probe_gap_max_dof=gap_max)
    assert near._beyond_sharpest(4.0, 0.5) == pytest.approx(3.0 + delta)
    # the nearest less sharp image sets the step (9 um, not 18 um to the one at 0)
    three = _two_images(cal, zs=(0.0, 9.0, 18.0), probe_gap_max_dof=gap_max)
    assert three._beyond_sharpest(15.0, 0.5) == pytest.approx(27.0)
    three = _two_images(cal, zs=(-10.0, 4.0, 18.0), probe_gap_max_dof=gap_max)
    assert three._beyond_sharpest(15.0, 0.5) == pytest.approx(32.0)
    # after that short step the estimate may lie up to half of it (+ the order's slack)
    # from the sharpest image, either side, not only a straddle step
    reach = 9.0 + 0.5 * s.s.order_tol_dof * cal.dof_um
    assert reach > 1.1 * delta
    for f in (18.0 - 0.99 * reach, 18.0 + 0.99 * reach):
        assert s._beyond_sharpest(f, 0.5) == pytest.approx(36.0)
    for f in (18.0 - 1.01 * reach, 18.0 + 1.01 * reach):
        assert s._beyond_sharpest(f, 0.5) is None
    assert s._beyond_sharpest(15.0, 1.01 * delta) is None  # posterior still wide
    # after a longer step, a straddle step from the image as before
    assert short._beyond_sharpest(18.0 - 1.01 * delta, 0.5) is None
    # a step between a straddle step and twice the order's reach: the window is never
    # narrower than a straddle step (10 um: half of it + slack 6.1 um < delta 7.9 um)
    mid = _two_images(cal, focus=8.0, zs=(0.0, 10.0), probe_gap_max_dof=gap_max)
    assert 0.5 * 10.0 + 0.5 * s.s.order_tol_dof * cal.dof_um < 0.9 * delta < 10.0
    assert mid._beyond_sharpest(10.0 - 0.9 * delta, 0.5) == pytest.approx(20.0)
    # a step exactly at the limit counts as short (the capped first step is exactly 2 DOF)
    edge = _two_images(cal, probe=True, probe_gap_max_dof=18.0 / cal.dof_um)
    assert edge._beyond_sharpest(15.0, 0.5) == pytest.approx(36.0)


def test_the_repeated_step_past_the_bounds_falls_back_to_a_straddle_step(cal):
    """The long probe would land past ``hi`` (36 um > 30 um): a straddle step beyond the
    sharpest image instead while the estimate lies within one of it, else no probe;
    never a position outside ``[lo, hi]``."""
    delta = DeepFocusSettings().straddle_dof * cal.dof_um
    gap_max = DeepFocusSettings().probe_gap_max_dof
    s = _two_images(cal, probe=True, hi=30.0, probe_gap_max_dof=gap_max)
    assert s._beyond_sharpest(15.0, 0.5) == pytest.approx(18.0 + delta)
    assert 18.0 + delta <= s.hi
    assert s._beyond_sharpest(18.0 - 1.2 * delta, 0.5) is None  # within reach, not delta
    # an image (no sharpness known) already at the long step's position: the same
    s = _two_images(cal, probe=True, probe_gap_max_dof=gap_max)
    s.tell(Observation(z=36.0))
    assert s._beyond_sharpest(15.0, 0.5) == pytest.approx(18.0 + delta)


def test_beyond_the_sharpest_image_only_when_it_is_outermost_clearly_sharpest_and_near(cal):
    delta = DeepFocusSettings().straddle_dof * cal.dof_um
    s = _two_images(cal, probe=True)
    assert s._beyond_sharpest(15.0, 0.5) == pytest.approx(18.0 + delta)
    assert s._beyond_sharpest(18.5, 0.5) == pytest.approx(18.0 + delta)  # just beyond it
    assert s._beyond_sharpest(18.0 - 1.01 * delta, 0.5) is None  # estimate too far inside
    assert s._beyond_sharpest(18.0 + 1.01 * delta, 0.5) is None  # already beyond: usual
    assert s._beyond_sharpest(15.0, 1.01 * delta) is None  # posterior still wide
    # the two images within the sharpness noise of each other: no sharpest image
    g0 = s.observations[0].gradient_sharpness
    s.observations[1].gradient_sharpness = g0 + 0.5 * s.s.order_sigma
    assert s._beyond_sharpest(15.0, 0.5) is None
    # an image beyond the sharpest one: it is not the outermost
    s = _two_images(cal, zs=(0.0, 18.0, 30.0))
    assert s._beyond_sharpest(15.0, 0.5) is None
    # the frames' sharpness unused: nothing to go by
    s = _two_images(cal, use_sharpness_order=False)
    assert s._beyond_sharpest(15.0, 0.5) is None


@pytest.mark.parametrize(
    ("family", "focus"),
    [("text", 7.0), ("smooth", -4.0), ("sparse_nuclei", 3.0), ("beads", -9.0), ("tissue", 0.0)],
)
def test_the_sharpness_curve_fit_locates_focus_on_rendered_frames(cal, family, focus):
    """On frames of the simulated microscope (10x), placed unevenly on both sides of
    focus, the fit of the frames' own sharpness curve (noise floor taken off) puts the
    focus within 0.05 DOF of the truth, whatever the specimen."""
    from bluesky_deepfocus.metrics import gradient_sharpness, gradient_sharpness_floor
    from bluesky_deepfocus.sim import get_simulation, simulated_microscope
    from bluesky_deepfocus.spectral import frame_spectrum

    sim = get_simulation(
        simulated_microscope(
            objective="10x/0.3",
            specimen=family,
            sensor_shape=(512, 512),
            seed=1012,
            slide_size_um=550.0,
        )
    )
    sim.auto_expose()
    sim.set_true_focus(focus)
    zs = np.array([-24.0, -8.5, 3.0, 12.5, 31.0]) + focus
    frames = [sim.render(float(z)).astype(np.float32) for z in zs]
    gs = np.array([gradient_sharpness(f) for f in frames])
    floors = np.array(
        [gradient_sharpness_floor(float(f.mean()), frame_spectrum(f).noise) for f in frames]
    )
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150)
    grid = np.linspace(focus - 15.0, focus + 15.0, 301)
    cost = s._sharpness_fit_cost(zs, gs, floors, grid)
    assert cost.any(), (gs, floors)
    assert abs(grid[np.argmin(cost)] - focus) < 0.05 * syn.DOF, (
        grid[np.argmin(cost)],
        gs - floors,
    )


def _plane_map(tilt_dof: float, scatter_dof: float, *, seed: int) -> np.ndarray:
    """A 4 x 4-patch focus map on a plane tilted by ``tilt_dof`` DOF across the field
    (centre 20 um), patch scatter ``scatter_dof`` DOF (normal, from ``seed``)."""
    dof = syn.DOF
    cols = np.arange(4)[None, :] - 1.5
    rows = np.arange(4)[:, None] - 1.5
    fmap = 20.0 + tilt_dof * dof / 4 * (0.8 * cols - 0.6 * rows)
    return fmap + np.random.default_rng(seed).normal(0.0, scatter_dof * dof, fmap.shape)


def _tilted_field(cal, *, tilt_dof, detail_dof, wild=(), focus_at="centre"):
    """Frames of a field whose whole frame is in focus ``detail_dof`` DOF off its centre
    (where its detail is), and its 4 x 4-patch focus map: a plane tilted by ``tilt_dof``
    DOF across the field (centre 20 um), patch scatter 0.03 DOF, the patches in ``wild``
    (index, um) that far off the plane (per-patch estimates that failed)."""
    dof = syn.DOF
    fmap = _plane_map(tilt_dof, 0.03, seed=5)
    for idx, off in wild:
        fmap[idx] += off
    fmap[1, 1] = np.nan  # a patch with no information
    detail = 20.0 + detail_dof * dof
    s = DeepFocusSearch(
        cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(focus_at=focus_at)
    )
    s._focus_map = lambda f, sd: fmap  # the map under test (its estimation: test above)
    return drive(s, detail), detail


def test_focus_at_centre_focuses_the_tilted_fields_centre_not_its_detail(cal):
    """``focus_at="centre"``: a field tilted by 1 DOF whose detail is 0.3 DOF off its
    centre is focused at the centre of the focus map's plane (a few wild patches do not
    pull it); ``"detail"`` focuses the detail; a field hardly tilted keeps the detail's
    focus (the plane's centre is less precise than the whole frame)."""
    wild = [((0, 3), -9.0), ((2, 0), 12.0), ((3, 2), -7.0)]
    centre, detail = _tilted_field(cal, tilt_dof=1.0, detail_dof=0.3, wild=wild)
    assert centre.converged, centre
    assert abs(centre.z_focus - 20.0) < 0.03 * syn.DOF, centre
    assert "field centre" in centre.reason
    assert abs(centre.details["tilt_um_across_field"] - syn.DOF) < 0.1 * syn.DOF
    at_detail, _ = _tilted_field(cal, tilt_dof=1.0, detail_dof=0.3, focus_at="detail")
    assert abs(at_detail.z_focus - detail) < 0.03 * syn.DOF, at_detail
    flat, detail = _tilted_field(cal, tilt_dof=0.1, detail_dof=0.04)
    assert abs(flat.z_focus - detail) < 0.01 * syn.DOF, flat
    assert "field centre" not in flat.reason


def _sparse_map(n_patches: int, scatter_dof: float) -> np.ndarray:
    """:func:`_plane_map` tilted by 1 DOF with patch scatter ``scatter_dof`` DOF, only
    ``n_patches`` of its patches informative."""
    fmap = _plane_map(1.0, scatter_dof, seed=3)
    keep = np.zeros(16, bool)
    keep[:n_patches] = True
    np.random.default_rng(1).shuffle(keep)
    fmap[~keep.reshape(4, 4)] = np.nan
    return fmap


def test_a_plane_through_few_patches_needs_a_wider_margin_to_move_the_focus(cal):
    """The plane's centre moves the focus only when its standard error is below
    ``centre_sd_dof``; from 5 patches (2 residual degrees of freedom) the scatter itself
    is uncertain, so the error is widened by the Student t quantile (x2.2): a plane
    whose plain standard error (0.024 DOF) would pass is not trusted from 5 patches,
    and the same scatter over 8 or 16 patches is."""
    s = DeepFocusSearch(
        cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(focus_at="centre")
    )
    limit = s.s.centre_sd_dof * syn.DOF
    info: dict[str, float] = {}
    assert s._field_centre(20.0, _sparse_map(5, 0.05), info) is None
    widening = stats.t.ppf(0.975, 2) / stats.norm.ppf(0.975)
    assert info["plane_patches"] == 5
    assert info["field_centre_sd"] > limit > info["field_centre_sd"] / widening
    for n in (8, 16):
        info = {}
        centre = s._field_centre(20.0, _sparse_map(n, 0.05), info)
        assert centre is not None and abs(centre - 20.0) < 0.1 * syn.DOF, (n, info)
        assert info["field_centre_sd"] <= limit


def test_a_known_field_tilt_places_a_sparse_field_by_its_centre(cal):
    """Detail in one corner of a field tilted by 1 DOF (6 informative patches): their
    own plane extrapolates to the centre with a wide error and is not trusted; with the
    slide's tilt known from other fields (``field_tilt``) the patches need only fix the
    plane's level, and the centre is trusted and right. The fit's own tilt estimate
    (what is pooled for later fields) stays the map's alone; a vague prior changes
    nothing."""
    dof = syn.DOF
    full = _plane_map(1.0, 0.03, seed=3)
    fmap = np.full((4, 4), np.nan)
    for idx in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (0, 2)]:
        fmap[idx] = full[idx]
    tilt = (0.8 * dof, -0.6 * dof)  # _plane_map's plane at 1 DOF
    limit = DeepFocusSettings().centre_sd_dof * dof
    own = field_plane(fmap, 0.2 * dof)
    assert own is not None and own.n == 6 and own.centre_sd > 1.5 * limit, own
    s = DeepFocusSearch(
        cal,
        start=0.0,
        lo=-150,
        hi=150,
        settings=DeepFocusSettings(focus_at="centre"),
        field_tilt=(*tilt, 0.05 * dof),
    )
    info: dict[str, float] = {}
    centre = s._field_centre(20.0, fmap, info)
    assert centre is not None and abs(centre - 20.0) < 0.03 * dof, info
    assert abs(centre - 20.0) < 0.5 * abs(own.centre - 20.0)
    assert info["field_centre_sd"] <= limit and info["tilt_prior_used"] == 1.0
    with_prior = field_plane(fmap, 0.2 * dof, prior=(*tilt, 0.05 * dof))
    assert with_prior is not None
    assert (with_prior.own_tilt_x_um, with_prior.own_tilt_y_um) == (
        own.own_tilt_x_um,
        own.own_tilt_y_um,
    )
    assert s.settings()["field_tilt"] == (*tilt, 0.05 * dof)
    plain = DeepFocusSearch(
        cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(focus_at="centre")
    )
    assert plain._field_centre(20.0, fmap, {}) is None
    vague = field_plane(fmap, 0.2 * dof, prior=(0.0, 0.0, 100 * dof))
    assert vague is not None and vague.centre_sd > limit
    assert abs(vague.centre - own.centre) < 0.01 * dof


def test_field_tilts_pool_by_their_errors_and_widen_when_fields_disagree():
    """The tilt expected in the next field: agreeing fields pool by their errors (the
    error of the mean); fields that disagree by more than their errors add the spread
    between fields (random effects), so the prior is as wide as the fields' tilts really
    vary; planes with no slope estimate (inf errors) are left out."""
    from bluesky_deepfocus.search import FieldPlane

    def plane(tx, ty, sd):
        return FieldPlane(0.0, 0.1, tx, ty, 8, -1.0, 1.0, tx, ty, sd, sd)

    assert pool_field_tilts([]) is None
    assert pool_field_tilts([plane(math.nan, math.nan, math.inf)]) is None
    tx, ty, sd = pool_field_tilts([plane(5.0, -2.0, 1.0)] * 4)
    assert (tx, ty, sd) == pytest.approx((5.0, -2.0, 0.5))
    # two fields 2 um apart with errors 1: the spread between fields tau^2 = 1
    tx, ty, sd = pool_field_tilts([plane(4.0, -2.0, 1.0), plane(6.0, -2.0, 1.0)])
    assert (tx, ty, sd) == pytest.approx((5.0, -2.0, math.sqrt(1.0 + 1.0)))
    # a precise field and a far-off one: not trusted to 0.1 um -- the spread dominates
    tx, _, sd = pool_field_tilts([plane(0.0, 0.0, 0.1), plane(10.0, 0.0, 1.0)])
    assert 4.0 < tx < 6.0 and sd > 5.0, (tx, sd)
    nine = [plane(t, 0.0, 0.5) for t in np.random.default_rng(0).normal(5.0, 2.0, 9)]
    _, _, sd = pool_field_tilts(nine)
    assert sd > 1.2, sd  # ~ the fields' spread (2), not the error of their mean (~0.2)


def test_the_plane_with_a_tilt_prior(cal):
    """``field_plane`` with a prior: the prior's tilt across the field is per field edge
    to edge along x (columns) and y (rows), on non-square maps too; a prior that pins the
    slopes leaves one parameter, the level (centre = mean of the patches less the prior
    plane, residual degrees of freedom n - 1); patches all in one row have no slope
    across it: no plane of their own, one with the prior."""
    dof = syn.DOF
    rows, cols, tx, ty = 3, 6, 6.0, -2.0
    yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
    u, v = (xx - (cols - 1) / 2) / cols, (yy - (rows - 1) / 2) / rows
    noise = np.random.default_rng(2).normal(0.0, 0.3, (rows, cols))
    fmap = 10.0 + tx * u + ty * v + noise
    own = field_plane(fmap, 2.0)
    assert own is not None and own.n == 18
    assert abs(own.own_tilt_x_um - tx) < 3 * own.own_tilt_x_sd_um
    assert abs(own.own_tilt_y_um - ty) < 3 * own.own_tilt_y_sd_um
    pinned = field_plane(fmap, 2.0, prior=(tx, ty, 1e-6))
    assert pinned is not None
    assert (pinned.tilt_x_um, pinned.tilt_y_um) == pytest.approx((tx, ty), abs=1e-6)
    level = fmap - tx * u - ty * v
    assert pinned.centre == pytest.approx(level.mean(), abs=1e-6)
    res = level - pinned.centre
    s = 1.4826 * np.median(np.abs(res)) * math.sqrt(18 / 17)
    t = stats.t.ppf(0.975, 17) / stats.norm.ppf(0.975)
    assert pinned.centre_sd == pytest.approx(s / math.sqrt(18) * t, rel=1e-4)
    five = np.full((6, 6), np.nan)
    five[2, 1:6] = 20.0 + (np.arange(1, 6) - 2.5) * 0.8 * dof / 6
    assert field_plane(five, 0.2 * dof) is None
    with_prior = field_plane(five, 0.2 * dof, prior=(0.8 * dof, 0.0, 0.05 * dof))
    assert with_prior is not None and math.isinf(with_prior.own_tilt_x_sd_um)
    assert abs(with_prior.centre - 20.0) < 0.05 * dof, with_prior
    assert pool_field_tilts([with_prior]) is None


def test_field_tilt_is_checked(cal):
    with pytest.raises(ValueError, match=r"field_tilt=\(1.0, 2.0, 0.0\) must be"):
        DeepFocusSearch(cal, start=0.0, lo=-1, hi=1, field_tilt=(1.0, 2.0, 0.0))


def test_focus_at_is_checked():
    with pytest.raises(ValueError, match="focus_at='middle'"):
        DeepFocusSettings(focus_at="middle")


def _with_sharpness(cal, share, *, peak=1.0, **settings):
    """The synthetic frames (which converge), those within 0.25 DOF of the focus (20 um)
    with a gradient energy ``share`` above its camera-noise floor, the others ``peak``
    (log units) less sharp."""
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, settings=DeepFocusSettings(**settings))
    while (z := s.ask()) is not None:
        o = syn.observe(z, 20.0)
        o.sharpness_floor = -4.0
        o.gradient_sharpness = (
            -4.0 + math.log1p(share) - (peak if abs(z - 20.0) > 0.25 * syn.DOF else 0)
        )
        s.tell(o)
    return s.result()


def test_no_convergence_when_no_frame_shows_detail_above_the_noise(cal):
    """Frames of a field far out of focus hold a few low-frequency spectral bins that can
    mimic a focus (40x, 30-50 um out: converged there, 30-50 um off); with no frame's
    gradient energy above the camera noise's floor by ``min_detail_share`` (30 %), the
    estimate is refused, whatever the spectra say."""
    seen = _with_sharpness(cal, 0.5)
    assert seen.converged and abs(seen.z_focus - 20.0) < 0.1, seen
    for share in (-0.03, 0.12):
        blind = _with_sharpness(cal, share)
        assert not blind.converged, blind
        assert "no image shows enough detail above the camera noise" in blind.reason
        assert f"{100 * share:.1f} %" in blind.reason and "< 30 %" in blind.reason
    assert _with_sharpness(cal, 0.12, min_detail_share=0.05).converged


@pytest.mark.parametrize("peak", [-0.01, 0.03])
def test_no_convergence_without_a_sharpness_peak_at_the_estimate(cal, peak):
    """Frames far out of focus all look alike (40x, 30 DOF out: seven frames within 0.04
    of each other converged 45.6 um off): the image at the estimate must be sharper than
    those >= 0.5 DOF from it by ``peak_min_drop``, else the estimate is refused."""
    flat = _with_sharpness(cal, 0.5, peak=peak)
    assert not flat.converged, flat
    assert "no sharpness peak at the estimate" in flat.reason
    assert f"only {peak:.3f}" in flat.reason and flat.details["peak_drop"] == pytest.approx(peak)
    assert _with_sharpness(cal, 0.5, peak=0.3).converged
    assert _with_sharpness(cal, 0.5, peak=peak, peak_min_drop=0).converged


# ------------------------------------------------------------ the spectral fit's numerics


def _pentadiagonal(rng, F, K):
    """Random SPD pentadiagonal systems, as (a0, a1, a2) and dense."""
    a1 = rng.normal(0, 1, (F, K - 1))
    a2 = rng.normal(0, 1, (F, K - 2))
    a0 = 2 * (np.abs(np.pad(a1, ((0, 0), (0, 1)))) + np.abs(np.pad(a1, ((0, 0), (1, 0)))))
    a0 += 2 * (np.abs(np.pad(a2, ((0, 0), (0, 2)))) + np.abs(np.pad(a2, ((0, 0), (2, 0))))) + 0.1
    dense = np.zeros((F, K, K))
    i = np.arange(K)
    dense[:, i, i] = a0
    dense[:, i[:-1], i[1:]] = dense[:, i[1:], i[:-1]] = a1
    dense[:, i[:-2], i[2:]] = dense[:, i[2:], i[:-2]] = a2
    return a0, a1, a2, dense


@pytest.mark.parametrize("F, K, R", [(1, 3, 1), (7, 36, 4), (130, 12, 6)])
def test_banded_solve_equals_a_dense_solve(F, K, R):
    from bluesky_deepfocus.search import _banded_solve

    rng = np.random.default_rng(F * 100 + K)
    a0, a1, a2, dense = _pentadiagonal(rng, F, K)
    b = rng.normal(0, 1, (F, K, R))
    b_before = b.copy()
    x = _banded_solve(a0, a1, a2, b)
    assert x.shape == (F, K, R)
    np.testing.assert_allclose(x, np.linalg.solve(dense, b), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(b, b_before)  # the right-hand sides are not overwritten


def test_the_two_way_fit_equals_dense_least_squares():
    """c_k + d_i fitted to y with weights w, smoothness P on c and ridge pd on d."""
    from bluesky_deepfocus.search import _smoothness, _solve_two_way

    rng = np.random.default_rng(3)
    F, N, K = 5, 4, 36
    w = rng.uniform(0, 3, (F, N, K)) * (rng.uniform(size=(F, N, K)) > 0.3)
    y = rng.normal(0, 2, (F, N, K))
    _, P = _smoothness(K, 2.0, 0.1)
    pd = 0.5
    c, d = _solve_two_way(w, y, P, pd)
    for f in range(F):
        # normal equations of the whole quadratic in (c, d)
        A = np.zeros((K + N, K + N))
        rhs = np.zeros(K + N)
        A[:K, :K] = P + np.diag(w[f].sum(axis=0))
        A[K:, K:] = np.diag(w[f].sum(axis=1) + pd)
        A[:K, K:] = w[f].T
        A[K:, :K] = w[f]
        rhs[:K] = (w[f] * y[f]).sum(axis=0)
        rhs[K:] = (w[f] * y[f]).sum(axis=1)
        sol = np.linalg.solve(A, rhs)
        np.testing.assert_allclose(c[f], sol[:K], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(d[f], sol[K:], rtol=1e-8, atol=1e-8)


def test_the_coarse_grid_table_is_the_calibrations(cal):
    """The coarse grid's rows are kept per frame; they equal the calibration's table."""
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=8)
    F = len(s.grid)
    for zs in ([0.0, 20.0], [0.0, 20.0, -35.5], [20.0, -35.5, 7.25, 0.0]):
        z = np.array(zs)
        got = s._table(z, s.grid)
        want = cal.transfer_table((z[None, :] - s.grid[:, None]).ravel())
        for g, w_ in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w_.reshape(F, len(z), -1))


def test_a_bin_the_frame_misses_is_bounded_by_the_frames_detection_limit(cal):
    """Where a frame detects nothing, its log signal is at most its detection limit: the
    bound is that limit in every such bin (it once came out NaN there, and the fit then
    bounded the model by 0 instead), and a table that says the bin is far above it costs."""
    from bluesky_deepfocus.search import _spectra_arrays

    specs = [syn.spectrum(dz, slope=2.5) for dz in (30.0, 45.0)]
    L, W, Lub, present = _spectra_arrays(specs)
    missed = ~np.isfinite(L) & present
    assert missed.any() and np.isfinite(L).any()
    for i, s in enumerate(specs):
        np.testing.assert_array_equal(Lub[i], np.full(L.shape[1], s.detection_limit()))

    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, max_images=8)
    T = np.where(np.isfinite(L), L, 0.0)[None]  # the table agrees where the frame detects
    WT = np.where(np.isfinite(L), 1e3, 0.0)[None]

    def chi2(table_minus_limit):
        """The fit's chi^2 with the table at the frame's limit + this, where it missed."""
        t = np.where(missed[None], Lub[None] + table_minus_limit, T)
        wt = np.where(missed[None], 1e3, WT)
        c2, _ = s._spec_chi2(L[None], W[None], Lub[None], present[None], t, wt, t)
        return float(c2[0])

    assert chi2(4.0) > chi2(-2.0) + 10.0


def test_the_second_image_steps_at_most_first_step_max_dof_toward_the_guessed_side(cal):
    """One image cannot tell the side of focus: the second steps toward the side its
    estimate picks by at most ``first_step_max_dof`` (a wrong guess then costs that much,
    not twice the distance); uncapped it steps the whole estimated distance."""
    dof = cal.dof_um
    for cap in (2.0, math.inf):
        s = DeepFocusSearch(
            cal,
            start=0.0,
            lo=-150,
            hi=150,
            max_images=6,
            settings=DeepFocusSettings(first_step_max_dof=cap),
        )
        assert s.ask() == 0.0
        s.tell(syn.observe(0.0, 5 * dof))
        f, _, _ = s._refined()
        z2 = s.ask()
        assert z2 is not None and math.copysign(1.0, z2) == math.copysign(1.0, f)
        want = min(abs(f), cap * dof)
        assert abs(z2) == pytest.approx(want, rel=1e-9), (cap, f, z2)
        assert (abs(z2) < 2.01 * dof) == (cap == 2.0)


def test_a_sharpness_curve_still_rising_at_the_outermost_image_is_not_converged():
    """Every image on one side, the sharpest the outermost, spectra and CNN putting the
    focus at that image (a smooth specimen: 1 DOF short), their sharpness curve rising
    to the last: not converged (the trap is real without the rule), and with images
    left the next goes to where that curve peaks, beyond the sharpest image."""
    dof = syn.DOF
    zs = [x * dof for x in (1.0, 2.0, 4.0, 6.0)]
    blind = _misleading(dof, 0.0, zs, rising_beyond_dof=0.0)
    assert blind.converged and abs(blind.z_focus - dof) < 0.1 * dof  # 1 DOF off
    res = _misleading(dof, 0.0, zs)
    assert not res.converged and "still rises at the outermost image" in res.reason
    assert res.details["sharp_mode"] < dof - 0.2 * dof
    s = _wide_search(zs[0])
    for z in zs:
        o = syn.observe(z, dof)
        o.gradient_sharpness = syn.gradient_sharpness(z, 0.0)
        s.tell(o)
    nxt = s.ask()
    assert nxt is not None and nxt < dof - 0.2 * dof  # beyond the sharpest image
    assert nxt == pytest.approx(s._refined()[2]["sharp_mode"])


def test_a_sharpness_curve_peaking_at_a_bracketed_estimate_does_not_trip_the_rising_rule(cal):
    """Images on both sides of the sharpest: the rule does not apply; converged as before."""
    zs = [40.0, 20.0, -5.0, 5.0, 0.3]
    res = _misleading(0.0, 0.0, zs)
    assert res.converged and abs(res.z_focus) < 0.05


@pytest.mark.parametrize(("n", "hi"), [(3, 40.0), (5, 40.0), (8, 40.0), (6, 45.21)])
def test_an_exact_budget_is_spent_even_when_the_focus_is_out_of_reach(n, hi):
    """min_images == max_images == N takes N images (the Fig. 4 comparison) even where the
    search would stop early: a focus at 90 um with the stage confined to [-40, hi] (two
    images at the bounds and one inside tell it so); the result still says so. No two
    images within 0.05 DOF (hi = 45.21: the outward pattern's 45.2 um lies next to the
    bound image)."""
    s = DeepFocusSearch(syn.calibration(), start=0.0, lo=-40, hi=hi, min_images=n, max_images=n)
    zs = []
    while (z := s.ask()) is not None:
        assert -40 <= z <= hi
        zs.append(z)
        s.tell(syn.observe(z, 90.0))
    assert len(zs) == n
    assert min(abs(a - b) for i, a in enumerate(zs) for b in zs[:i]) > 0.05 * syn.DOF
    res = s.result()
    assert not res.converged and "beyond the allowed range" in res.reason
    # an ordinary budget still stops where the search is done
    s = DeepFocusSearch(syn.calibration(), start=0.0, lo=-40, hi=hi, min_images=2, max_images=8)
    while (z := s.ask()) is not None:
        s.tell(syn.observe(z, 90.0))
    assert s.n == 4
