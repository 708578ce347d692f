"""calibration_plan and autofocus_plan on the RunEngine: results, records, safety rules."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_deepfocus import AutofocusFailed, Calibration
from bluesky_deepfocus.devices import LimitError, MMCamera, MMFocusStage
from bluesky_deepfocus.errors import CalibrationError
from bluesky_deepfocus.metrics import Tenengrad
from bluesky_deepfocus.plans import autofocus_plan, calibration_plan
from bluesky_deepfocus.schema import MD_KEY, RESULT_STREAM, SCORES_STREAM
from bluesky_deepfocus.sim import get_simulation, simulated_microscope

from ._rig import Rig, calibrated_rig

SENSOR = (256, 256)
TOL_UM = 2.0  # focus tolerance of these functional tests (accuracy is the benchmark's job)


@pytest.fixture(scope="module")
def rig() -> Rig:
    return calibrated_rig(sensor_shape=SENSOR, seed=3, slide_size_um=600.0)


@pytest.fixture
def sim(rig):
    yield rig.sim
    rig.sim.set_true_focus(0.0)
    rig.focus.move(0.0).wait(10)
    rig.sim.specimen_override = None


def test_calibration_plan_returns_and_records_the_calibration(rig):
    cal = rig.cal
    assert isinstance(cal, Calibration)
    assert abs(cal.focus_um) < 1.0  # the stack was centred on the true focus (0)
    assert cal.objective == "10x/0.3" and cal.model_id == rig.scorer.model_id
    assert cal.uid is not None
    assert rig.focus.position == pytest.approx(0.0, abs=1e-6)  # focus returned
    start = next(d for n, d in rig.cal_docs if n == "start")
    assert start["plan_name"] == "calibration_plan"
    assert start[MD_KEY]["num"] == 61 and start[MD_KEY]["objective"] == "10x/0.3"
    stop = next(d for n, d in rig.cal_docs if n == "stop")
    assert stop["exit_status"] == "success"
    assert stop["num_events"]["primary"] == 61 and stop["num_events"][SCORES_STREAM] == 61
    back = Calibration.from_documents(rig.cal_docs)
    assert back.uid == cal.uid
    np.testing.assert_allclose(back.blur, cal.blur, equal_nan=True)


@pytest.mark.parametrize("true_focus", [-37.0, 18.5])
def test_autofocus_plan_finds_focus_and_records_every_pair(RE, docs, rig, sim, true_focus):
    sim.set_true_focus(true_focus)
    RE.subscribe(docs)
    res = RE(
        autofocus_plan(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, max_images=6)
    ).plan_result
    assert res.converged, res.reason
    assert abs(rig.focus.position - true_focus) < TOL_UM
    assert res.final_z == pytest.approx(rig.focus.position)
    assert res.images_used == len(res.z_measured) <= 6
    scores = [d for d in docs.of("event") if d["data"].get(f"{SCORES_STREAM}_z") is not None]
    assert [d["data"][f"{SCORES_STREAM}_z"] for d in scores] == pytest.approx(list(res.z_measured))
    assert all(d["data"][f"{SCORES_STREAM}_blur_map"].shape == (2, 2) for d in scores)
    (result_event,) = [d for d in docs.of("event") if "autofocus_result_final_z" in d["data"]]
    assert result_event["data"]["autofocus_result_final_z"] == pytest.approx(res.final_z)
    assert result_event["data"]["autofocus_result_status"] == "converged"
    start = docs.of("start")[0]
    assert start[MD_KEY]["calibration_uid"] == rig.cal.uid
    assert start[MD_KEY]["model_sha256"] == rig.scorer.model_sha256
    assert docs.of("stop")[0]["num_events"][RESULT_STREAM] == 1


@pytest.mark.parametrize("n", [2, 3, 5])
def test_exact_image_budget(RE, rig, sim, n):
    sim.set_true_focus(11.0)
    for strategy in ("deepfocus", "paper"):
        rig.focus.move(0.0).wait(10)
        res = RE(
            autofocus_plan(
                rig.camera,
                rig.focus,
                rig.cal,
                scorer=rig.scorer,
                min_images=n,
                max_images=n,
                strategy=strategy,
            )
        ).plan_result
        assert res.images_used == n


def test_brent_with_a_classic_function(RE, rig, sim):
    sim.set_true_focus(6.0)
    res = RE(
        autofocus_plan(
            rig.camera,
            rig.focus,
            None,
            scorer=Tenengrad(),
            strategy="brent",
            max_travel=20.0,
            max_images=20,
        )
    ).plan_result
    assert abs(res.final_z - 6.0) < TOL_UM


def _moves(RE, focus_name="focus"):
    moves: list[float] = []

    def hook(msg):
        if msg.command == "set" and getattr(msg.obj, "name", None) == focus_name:
            moves.append(float(msg.args[0]))

    RE.msg_hook = hook
    return moves


def test_never_outside_limits_or_max_travel(RE, rig, sim):
    sim.set_true_focus(80.0)  # focus far beyond the allowed travel
    moves = _moves(RE)
    res = RE(
        autofocus_plan(
            rig.camera, rig.focus, rig.cal, scorer=rig.scorer, max_travel=25.0, max_images=6
        )
    ).plan_result
    assert moves and max(abs(m) for m in moves) <= 25.0 + 1e-9
    assert not res.converged  # the estimate sits at the bound: no blind move
    assert res.status == "restored" and rig.focus.position == pytest.approx(0.0)


def test_stage_limits_are_respected(RE, rig, sim):
    narrow = MMFocusStage(rig.core, name="focus", limits=(-10.0, 15.0))
    sim.set_true_focus(40.0)
    moves = _moves(RE)
    RE(autofocus_plan(rig.camera, narrow, rig.cal, scorer=rig.scorer, max_images=5))
    assert moves and all(-10.0 <= m <= 15.0 for m in moves)


def test_blank_field_does_not_move(RE, rig, sim):
    blank = simulated_microscope(
        specimen=np.zeros((64, 64)), specimen_pixel_um=10.0, sensor_shape=SENSOR
    )
    cam, foc = MMCamera(blank, name="camera"), MMFocusStage(blank, name="focus")
    foc.move(3.0).wait(10)
    res = RE(autofocus_plan(cam, foc, rig.cal, scorer=rig.scorer, max_images=4)).plan_result
    assert not res.converged and res.status == "restored"
    assert foc.position == pytest.approx(3.0)
    assert "no focus information" in res.reason


def test_on_failure_sharpest_goes_to_the_sharpest_image_taken(RE, docs, rig, sim):
    # the focus lies 10 um beyond max_travel: the search cannot converge, but its images
    # nearer the bound are sharper than the start; "sharpest" ends at the sharpest of them
    sim.set_true_focus(35.0)
    RE.subscribe(docs)
    moves = _moves(RE)
    res = RE(
        autofocus_plan(
            rig.camera,
            rig.focus,
            rig.cal,
            scorer=rig.scorer,
            max_travel=25.0,
            max_images=5,
            on_failure="sharpest",
        )
    ).plan_result
    assert moves and max(abs(m) for m in moves) <= 25.0 + 1e-9
    assert not res.converged and res.status == "sharpest" and res.moved
    assert "moved to the sharpest image taken" in res.reason, res.reason
    assert str(res).startswith("Autofocus not converged, at the sharpest image taken: z 0.00 ->")
    # an imaged position, the sharpest of them, clearly sharper than the start
    assert rig.focus.position == pytest.approx(res.final_z)
    assert min(abs(z - res.final_z) for z in res.z_measured) < 1e-9
    assert res.sharpness_final > res.sharpness_start + 0.05
    # the recorded images' sharpness (what an audit sees) names the same image
    scores = [d["data"] for d in docs.of("event") if f"{SCORES_STREAM}_z" in d["data"]]
    sharp = {d[f"{SCORES_STREAM}_z"]: d[f"{SCORES_STREAM}_sharpness"] for d in scores}
    assert len(sharp) >= 3 and max(sharp, key=sharp.get) == pytest.approx(res.final_z)
    assert abs(res.final_z - 35.0) < 35.0 - 20.0  # well nearer the focus than the start
    (stored,) = [d["data"] for d in docs.of("event") if "autofocus_result_status" in d["data"]]
    assert stored["autofocus_result_status"] == "sharpest"
    assert not stored["autofocus_result_converged"]


def test_sharpest_image_rules():
    import importlib

    from bluesky_deepfocus.search import Observation

    _sharpest_image = importlib.import_module(autofocus_plan.__module__)._sharpest_image

    def obs(z, g, floor=float("nan")):
        return Observation(z=z, gradient_sharpness=g, sharpness_floor=floor)

    ok, why = _sharpest_image([obs(0.0, -2.0), obs(5.0, -1.0), obs(9.0, -1.5)], 0.0, 0.1, -20, 20)
    assert ok is not None and ok.z == 5.0 and "at 5.00 um" in why
    # no image at the start to compare with (a prior moved the first image elsewhere)
    none, why = _sharpest_image([obs(5.0, -1.0)], 0.0, 0.1, -20, 20)
    assert none is None and "no image at the start" in why
    # not sharper than the start by the margin
    none, why = _sharpest_image([obs(0.0, -2.0), obs(5.0, -1.96)], 0.0, 0.1, -20, 20)
    assert none is None and "no image was sharper than the start" in why
    # sharper, but hardly above the camera noise: no detail seen
    none, why = _sharpest_image([obs(0.0, -2.0, -1.9), obs(5.0, -1.8, -1.9)], 0.0, 0.1, -20, 20)
    assert none is None and "saw no detail" in why and "11 %" in why
    # an image outside the bounds (cannot happen in a plan) is never chosen
    ok, _ = _sharpest_image([obs(0.0, -2.0), obs(30.0, 0.0), obs(4.0, -1.0)], 0.0, 0.1, -20, 20)
    assert ok is not None and ok.z == 4.0
    # a second image at the start is the start, not a place to move to; the start's
    # sharpness is the better of its images
    none, _ = _sharpest_image([obs(0.0, -2.0), obs(0.05, -1.0)], 0.0, 0.1, -20, 20)
    assert none is None
    none, _ = _sharpest_image([obs(0.0, -1.0), obs(0.0, -2.0), obs(5.0, -0.98)], 0.0, 0.1, -20, 20)
    assert none is None  # -0.98 beats the later start image (-2.0) but not the first (-1.0)
    # a read-back a hair beyond a bound still counts as the image taken there
    ok, _ = _sharpest_image([obs(0.0, -2.0), obs(20.0 + 1e-7, -1.0)], 0.0, 0.1, -20, 20)
    assert ok is not None and ok.z == pytest.approx(20.0)
    # NaN sharpness is skipped
    ok, _ = _sharpest_image(
        [obs(0.0, -2.0), obs(3.0, float("nan")), obs(4.0, -1.0)], 0.0, 0.1, -20, 20
    )
    assert ok is not None and ok.z == 4.0


def test_on_failure_sharpest_with_brent_restores(RE, rig, sim):
    # Brent's search never images the start position, so nothing says an image is
    # sharper than the start: "sharpest" restores it, and says why
    sim.set_true_focus(35.0)
    res = RE(
        autofocus_plan(
            rig.camera,
            rig.focus,
            None,
            scorer=Tenengrad(),
            strategy="brent",
            max_travel=25.0,
            max_images=4,
            on_failure="sharpest",
        )
    ).plan_result
    assert all(abs(z) > 1e-3 for z in res.z_measured)
    assert res.status == "restored" and rig.focus.position == pytest.approx(0.0)
    assert "no image at the start position" in res.reason, res.reason


@pytest.mark.parametrize("mode", ["restore", "stay", "raise", "sharpest"])
def test_on_failure_modes(RE, rig, sim, mode):
    blank = simulated_microscope(
        specimen=np.zeros((64, 64)), specimen_pixel_um=10.0, sensor_shape=SENSOR
    )
    cam, foc = MMCamera(blank, name="camera"), MMFocusStage(blank, name="focus")
    plan = autofocus_plan(
        cam, foc, rig.cal, scorer=rig.scorer, min_images=3, max_images=3, on_failure=mode
    )
    if mode == "raise":
        with pytest.raises(AutofocusFailed, match="did not converge.*restored to 0.000 um"):
            RE(plan)
        assert foc.position == pytest.approx(0.0)
        return
    res = RE(plan).plan_result
    if mode == "restore":
        assert res.status == "restored" and foc.position == pytest.approx(0.0)
    elif mode == "sharpest":  # a blank field: no image is sharper than the start
        assert res.status == "restored" and foc.position == pytest.approx(0.0)
        assert "no image was sharper than the start" in res.reason, res.reason
    else:
        assert res.status == "stayed" and foc.position == pytest.approx(res.z_measured[-1])


def test_refused_calibration_restores_focus_and_fails_the_run(RE, docs, rig, sim):
    sim.set_true_focus(400.0)  # focus far outside the stack
    RE.subscribe(docs)
    with pytest.raises(
        CalibrationError,
        match="(end of the stack|too irregular|hold focus information|no clear focus|too wide|does not grow)",
    ):
        RE(calibration_plan(rig.camera, rig.focus, -50, 50, 21, scorer=rig.scorer))
    assert rig.focus.position == pytest.approx(0.0)
    assert docs.of("stop")[-1]["exit_status"] == "fail"


def test_bad_arguments_fail_before_anything_moves(RE, rig, sim):
    with pytest.raises(CalibrationError, match="No calibration given.*calibration_plan"):
        RE(autofocus_plan(rig.camera, rig.focus, None, scorer=rig.scorer))
    with pytest.raises(ValueError, match="min_images <= max_images"):
        RE(
            autofocus_plan(
                rig.camera, rig.focus, rig.cal, scorer=rig.scorer, min_images=5, max_images=2
            )
        )
    with pytest.raises(ValueError, match="on_failure='explode'"):
        RE(autofocus_plan(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, on_failure="explode"))
    with pytest.raises(ValueError, match="leaves the focus limits"):
        RE(
            calibration_plan(
                rig.camera,
                MMFocusStage(rig.core, name="focus", limits=(-5, 5)),
                -50,
                50,
                21,
                scorer=rig.scorer,
            )
        )
    with pytest.raises(ValueError, match="DeepFocus blur score"):
        RE(calibration_plan(rig.camera, rig.focus, -50, 50, 21, scorer=Tenengrad()))
    with pytest.raises(LimitError):
        rig.focus.move(5000.0)
    assert rig.focus.position == pytest.approx(0.0)


def test_objective_mismatch_is_refused(RE, rig, sim):
    other = get_simulation(rig.core)
    other.set_objective("20x/0.45")
    try:
        with pytest.raises(CalibrationError, match="objective '10x/0.3'.*now uses '20x/0.45'"):
            RE(autofocus_plan(rig.camera, rig.focus, rig.cal, scorer=rig.scorer))
    finally:
        other.set_objective("10x/0.3")


def test_user_subscription_of_the_scorer_survives_the_plan(RE, rig, sim):
    """A session-wide RE.subscribe(scorer) keeps working after the plan unsubscribes its own."""
    import bluesky.plans as bp

    RE.subscribe(rig.scorer)
    sim.set_true_focus(2.0)
    RE(autofocus_plan(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, max_images=3))
    before = rig.scorer.scored_count
    RE(bp.count([rig.camera], num=2))
    assert rig.scorer.scored_count == before + 2
