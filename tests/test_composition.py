"""Autofocus composed into scans, preprocessors and timelapses (plans/_composition.py).

One calibration per module (61 frames over +/-150 um at 10x/0.3 on a 256 x 256 simulated
camera). The shipped weights are still being trained: these tests use a partially
trained model (``BLUESKY_DEEPFOCUS_WEIGHTS``), accurate to ~0.1-1 um, so focus is
asserted to a few um while the structure (runs, streams, counts, messages) is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky.utils import Msg

from bluesky_deepfocus import Calibration, CalibrationError, DeepFocusScorer
from bluesky_deepfocus.devices import MMCamera, MMFocusStage, MMXYStage
from bluesky_deepfocus.plans import (
    calibration_plan,
    refocus_decorator,
    refocus_per_step,
    refocus_wrapper,
    timelapse_plan,
)
from bluesky_deepfocus.search import field_plane, pool_field_tilts
from bluesky_deepfocus.sim import MicroscopeSimulation, get_simulation, simulated_microscope

from ._rig import close_run_engine, private_run_engine

SENSOR = (256, 256)
FOCUS_TOL_UM = 3.0  # partial model; tighten with the final weights
FAST = {"max_travel": 30.0, "max_images": 6}  # small posterior grid: fast searches


@dataclass
class Rig:
    core: Any
    sim: MicroscopeSimulation
    camera: MMCamera
    focus: MMFocusStage
    xy: MMXYStage
    scorer: DeepFocusScorer
    cal: Calibration


@pytest.fixture(scope="module")
def rig() -> Rig:
    core = simulated_microscope(
        specimen="tissue", sensor_shape=SENSOR, seed=1, slide_size_um=800.0, time_scale=0.0
    )
    camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    xy = MMXYStage(core, name="xy")
    scorer = DeepFocusScorer()
    re, loop = private_run_engine()
    try:
        cal = re(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result
    finally:
        close_run_engine(re, loop)
    return Rig(core, get_simulation(core), camera, focus, xy, scorer, cal)


@pytest.fixture
def sim(rig):
    """The shared simulation, reset after the test (no tilt, no drift, stage at 0)."""
    yield rig.sim
    rig.sim.tilt = (0.0, 0.0)
    rig.sim.drift_um_per_s = 0.0
    rig.sim.set_true_focus(0.0, x_um=0.0, y_um=0.0)
    rig.core.setXYPosition(0.0, 0.0)
    rig.core.setPosition(0.0)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def runs_of(docs) -> list[dict[str, Any]]:
    """Per run: its start document and events by stream name, in order."""
    out: list[dict[str, Any]] = []
    stream_of: dict[str, str] = {}
    for name, doc in docs:
        if name == "start":
            out.append({"start": doc, "streams": {}, "stop": None})
        elif name == "descriptor":
            stream_of[doc["uid"]] = doc["name"]
        elif name == "event":
            out[-1]["streams"].setdefault(stream_of[doc["descriptor"]], []).append(doc)
        elif name == "stop":
            out[-1]["stop"] = doc
    return out


def field(events: list[dict[str, Any]], key: str) -> list[Any]:
    return [e["data"][key] for e in events]


def trace(msgs: list[Msg]) -> list[str]:
    """Messages as 'command:name' tokens (device name, or stream name for 'create')."""
    out = []
    for m in msgs:
        if m.command == "create":
            out.append(f"create:{m.kwargs.get('name')}")
        elif m.obj is not None and hasattr(m.obj, "name"):
            out.append(f"{m.command}:{m.obj.name}")
        else:
            out.append(m.command)
    return out


def last_index(tokens: list[str], token: str) -> int:
    return len(tokens) - 1 - tokens[::-1].index(token)


def segments(tokens: list[str]) -> list[list[str]]:
    """The messages leading to each primary event (from the previous 'save' on)."""
    segs, current, in_primary = [], [], False
    for t in tokens:
        if t == "create:primary":
            segs.append(current)
            current, in_primary = [], True
        elif t == "save" and in_primary:
            in_primary = False
        elif not in_primary:
            current.append(t)
    return segs


# --------------------------------------------------------------------------------------
# per_step hook
# --------------------------------------------------------------------------------------
def test_per_step_messages_every_2_and_reuse(RE, docs, rig, sim):
    """Moves, then the refocus (at points 0 and 2), then triggers; a new scan restarts."""
    msgs: list[Msg] = []
    RE.msg_hook = msgs.append
    RE.subscribe(docs)
    hook = refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, every=2, **FAST)
    for _ in range(2):  # the same hook in two scans (two runs)
        RE(bp.list_scan([rig.camera], rig.xy.x, [-100.0, 0.0, 100.0], per_step=hook))
        assert len(hook.results) == 2

    runs = runs_of(docs)
    assert len(runs) == 2
    for run, segs in zip(runs, _split_runs(trace(msgs)), strict=True):
        streams = run["streams"]
        assert len(streams["primary"]) == 3
        assert len(streams["autofocus_result"]) == 2
        assert field(streams["autofocus_refocus"], "autofocus_refocus_seq_num") == [1, 3]
        assert field(streams["autofocus_refocus"], "autofocus_refocus_reason") == [
            "first",
            "every",
        ]
        # one counter per run: image indices 1..N, consistent with the results
        n_images = sum(field(streams["autofocus_result"], "autofocus_result_images_used"))
        assert field(streams["autofocus_scores"], "autofocus_scores_image_index") == list(
            range(1, n_images + 1)
        )
        assert [e["seq_num"] for e in streams["autofocus_images"]] == list(range(1, n_images + 1))
        # primary holds the image, the scan motor and the focus of every point
        assert {"camera_image", "xy_x", "focus"} <= set(streams["primary"][0]["data"])
        assert len(segs) == 3
        for i, seg in enumerate(segs):
            n_refocus = seg.count("create:autofocus_result")
            assert n_refocus == (1 if i in (0, 2) else 0)
            if n_refocus:  # moved, refocused, then triggered the camera for primary
                assert (
                    seg.index("set:xy_x")
                    < seg.index("create:autofocus_refocus")
                    < last_index(seg, "create:autofocus_result")
                    < last_index(seg, "trigger:camera")
                )
    assert hook.results[0].run_uid == runs[1]["start"]["uid"]


def _split_runs(tokens: list[str]) -> list[list[list[str]]]:
    out, current = [], []
    for t in tokens:
        current.append(t)
        if t == "close_run":
            out.append(segments(current))
            current = []
    return out


def test_grid_scan_refocuses_every_tile(RE, docs, rig, sim):
    """3 x 3 tiles of a tilted slide: one refocus per tile, warm-started from a neighbour."""
    sim.tilt = (0.02, -0.01)
    sim.set_true_focus(5.0, x_um=0.0, y_um=0.0)
    RE.subscribe(docs)
    hook = refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, **FAST)
    step = 150.0  # ~ one field of view (256 px * 0.65 um)
    grid = bp.grid_scan(
        [rig.camera], rig.xy.y, -step, step, 3, rig.xy.x, -step, step, 3, per_step=hook, md=hook.md
    )
    RE(grid)

    (run,) = runs_of(docs)
    streams = run["streams"]
    assert run["stop"]["exit_status"] == "success"
    assert run["start"]["deepfocus"]["calibration_uid"] == rig.cal.uid
    assert run["start"]["deepfocus"]["refocus"]["kind"] == "per_step"
    assert len(streams["primary"]) == 9
    assert all(np.shape(img) == SENSOR for img in field(streams["primary"], "camera_image"))
    assert len(streams["autofocus_result"]) == 9
    assert len(hook.results) == 9
    images_used = field(streams["autofocus_result"], "autofocus_result_images_used")
    assert images_used == [r.images_used for r in hook.results]
    assert len(streams["autofocus_images"]) == sum(images_used)
    prior_sd = field(streams["autofocus_refocus"], "autofocus_refocus_prior_sd")
    assert math.isnan(prior_sd[0]) and all(np.isfinite(prior_sd[1:]))
    assert all(sd >= 0.25 * rig.cal.dof_um - 1e-9 for sd in prior_sd[1:])
    assert run["start"]["deepfocus"]["refocus"]["learn_tilt"] is True
    # every tile imaged in focus: the primary focus readback vs. the tile's true focus
    for event in streams["primary"]:
        x, y, z = event["data"]["xy_x"], event["data"]["xy_y"], event["data"]["focus"]
        assert abs(z - sim.true_focus_at(x, y)) < FOCUS_TOL_UM, (x, y, z)
    assert [r.run_uid for r in hook.results] == [run["start"]["uid"]] * 9


def test_per_step_learns_the_slide_tilt_from_earlier_tiles(RE, docs, rig):
    """Each refocus after a converged tile gets the tilt pooled from the focus-map planes
    of the tiles before it (a 512-px field: 4 x 4 patches), recorded in the refocus
    stream; the pooled tilt is the slide's as the camera sees it."""
    core = simulated_microscope(
        specimen="tissue", sensor_shape=(512, 512), seed=2, slide_size_um=1400.0, time_scale=0.0
    )
    sim = get_simulation(core)
    camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    xy = MMXYStage(core, name="xy")
    cal = RE(calibration_plan(camera, focus, -150, 150, 61, scorer=rig.scorer)).plan_result
    sim.tilt = (0.02, -0.01)
    sim.set_true_focus(5.0, x_um=0.0, y_um=0.0)
    RE.subscribe(docs)
    hook = refocus_per_step(camera, focus, cal, scorer=rig.scorer, **FAST)
    RE(bp.list_scan([camera], xy.x, [-330.0, 0.0, 330.0], per_step=hook, md=hook.md))
    (run,) = runs_of(docs)
    streams = run["streams"]
    recorded = [
        field(streams["autofocus_refocus"], f"autofocus_refocus_tilt_prior_{k}")
        for k in ("x", "y", "sd")
    ]
    planes: list = []
    for i, result in enumerate(hook.results):
        expected = pool_field_tilts(planes)
        got = tuple(r[i] for r in recorded)
        if expected is None:
            assert all(math.isnan(v) for v in got), (i, got)
        else:
            assert got == pytest.approx(expected), (i, got, expected)
        plane = field_plane(result.focus_map, 0.2 * cal.dof_um) if result.converged else None
        if plane is not None:
            planes.append(plane)
    assert planes == hook.planes and len(planes) == 3, hook.results
    # 0.02 / -0.01 um of focus per um of x / y: 6.7 / -3.3 um across the 333-um field
    tx, ty, sd = pool_field_tilts(planes)
    assert abs(tx - 0.02 * 512 * 0.65) < max(3 * sd, 1.5), (tx, ty, sd)
    assert abs(ty + 0.01 * 512 * 0.65) < max(3 * sd, 1.5), (tx, ty, sd)
    for event in streams["primary"]:  # (y stays at 0)
        x, z = event["data"]["xy_x"], event["data"]["focus"]
        assert abs(z - sim.true_focus_at(x, 0.0)) < FOCUS_TOL_UM, (x, z)


def test_per_step_rejects_the_focus_as_scan_motor(RE, rig, sim):
    hook = refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer)
    with pytest.raises(ValueError, match="'focus' is a motor of this scan"):
        RE(bp.scan([rig.camera], rig.focus, -1.0, 1.0, 2, per_step=hook))


def test_per_step_focuses_tile_centres_by_default(rig):
    """Tiles are placed by their centres: the hook's searches focus a tilted tile's centre
    (``DeepFocusSettings.focus_at``), keeping the other settings passed; ``"detail"``
    focuses where the detail is; anything else is refused before any run."""
    from bluesky_deepfocus import DeepFocusSettings

    hook = refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer)
    assert hook.settings["settings"].focus_at == "centre"
    mine = DeepFocusSettings(tol_dof=0.05)
    hook = refocus_per_step(
        rig.camera, rig.focus, rig.cal, scorer=rig.scorer, settings=mine, focus_at="detail"
    )
    assert hook.settings["settings"] == DeepFocusSettings(tol_dof=0.05, focus_at="detail")
    with pytest.raises(ValueError, match="focus_at='middle'"):
        refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, focus_at="middle")
    with pytest.raises(ValueError, match="refocus_per_step: it learns the slide's tilt"):
        refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, field_tilt=(1, 1, 1))
    with pytest.raises(ValueError, match="learn_tilt='yes' must be True or False"):
        refocus_per_step(rig.camera, rig.focus, rig.cal, scorer=rig.scorer, learn_tilt="yes")
    assert not refocus_per_step(
        rig.camera, rig.focus, rig.cal, scorer=rig.scorer, focus_at="detail"
    ).learn_tilt


# --------------------------------------------------------------------------------------
# preprocessor
# --------------------------------------------------------------------------------------
def test_refocus_wrapper_every_2_over_count(RE, docs, rig, sim):
    sim.set_true_focus(12.0)
    msgs: list[Msg] = []
    RE.msg_hook = msgs.append
    RE.subscribe(docs)
    plan = refocus_wrapper(
        bp.count([rig.camera], num=4),
        rig.camera,
        rig.focus,
        rig.cal,
        scorer=rig.scorer,
        every=2,
        **FAST,
    )
    RE(plan)

    (run,) = runs_of(docs)
    streams = run["streams"]
    assert len(streams["primary"]) == 4
    assert len(streams["autofocus_result"]) == 2
    assert field(streams["autofocus_refocus"], "autofocus_refocus_seq_num") == [1, 3]
    assert run["start"]["plan_name"] == "count"
    assert run["start"]["deepfocus"]["refocus"] == {
        "kind": "wrapper",
        "every": 2,
        "drift_threshold": None,
        "warm_start": True,
        "prior_sd": pytest.approx(0.25 * rig.cal.dof_um),
        "max_drift_rate": 0.05,
        "max_tilt": 0.0,
    }
    # each refocus comes before the trigger of the image it is for
    segs = segments(trace(msgs))
    assert [s.count("create:autofocus_result") for s in segs] == [1, 0, 1, 0]
    for seg in (segs[0], segs[2]):
        assert last_index(seg, "create:autofocus_result") < last_index(seg, "trigger:camera")
        assert seg[-2:] == ["trigger:camera", "wait"]
    assert abs(rig.focus.position - 12.0) < FOCUS_TOL_UM


def test_refocus_decorator_refocuses_on_drift(RE, docs, rig, sim):
    """After the focus jumps, the next image is blurred and the one after is refocused."""
    sim.drift_um_per_s = 1.0  # clock frozen: only jumps when advanced
    sim.set_true_focus(0.0)
    stream_of: dict[str, str] = {}

    def jump_after_first_image(name, doc):
        if name == "descriptor":
            stream_of[doc["uid"]] = doc["name"]
        elif name == "event" and stream_of[doc["descriptor"]] == "primary" and doc["seq_num"] == 1:
            sim.advance(15.0)  # 15 um off focus (1.3 DOF)

    RE.subscribe(docs)
    RE.subscribe(jump_after_first_image)
    refocused_count = refocus_decorator(
        rig.camera, rig.focus, rig.cal, scorer=rig.scorer, drift_threshold=0.3, **FAST
    )(bp.count)
    roi_before = rig.scorer.roi
    RE(refocused_count([rig.camera, rig.focus], num=4))

    (run,) = runs_of(docs)
    streams = run["streams"]
    refocus = streams["autofocus_refocus"]
    assert field(refocus, "autofocus_refocus_reason") == ["first", "drift"]
    assert field(refocus, "autofocus_refocus_seq_num") == [1, 3]
    blur, ref = (
        refocus[1]["data"]["autofocus_refocus_last_blur"],
        refocus[1]["data"]["autofocus_refocus_reference_blur"],
    )
    assert blur - ref > 0.3
    assert len(streams["primary"]) == 4
    zs = field(streams["primary"], "focus")
    assert abs(zs[0] - 0.0) < FOCUS_TOL_UM
    assert zs[1] == zs[0]  # taken 15 um off focus: the blur it shows triggers the refocus
    assert abs(zs[2] - 15.0) < FOCUS_TOL_UM and abs(zs[3] - 15.0) < FOCUS_TOL_UM
    assert rig.scorer.roi == roi_before


def test_refocus_wrapper_passes_messages_outside_runs(rig):
    """Without a run there is nothing to record into: the plan is left as it is."""
    plan = [Msg("checkpoint"), Msg("trigger", rig.camera, group="g"), Msg("wait", None, group="g")]
    wrapped = refocus_wrapper(
        (m for m in plan), rig.camera, rig.focus, rig.cal, scorer=rig.scorer, every=1
    )
    assert list(wrapped) == plan


# --------------------------------------------------------------------------------------
# timelapse
# --------------------------------------------------------------------------------------
def test_timelapse_follows_drift(RE, docs, rig):
    """The focus drifts 5 um between frames; every frame is taken near focus."""
    core = simulated_microscope(
        specimen="tissue", sensor_shape=SENSOR, seed=3, drift_um_per_s=0.5, time_scale=0.0
    )
    sim = get_simulation(core)
    camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    sim.set_true_focus(-8.0)
    truth: list[float] = []
    stream_of: dict[str, str] = {}

    def drift_between_frames(name, doc):
        if name == "descriptor":
            stream_of[doc["uid"]] = doc["name"]
        elif name == "event" and stream_of[doc["descriptor"]] == "primary":
            truth.append(sim.true_focus_at())
            sim.advance(10.0)

    RE.subscribe(docs)
    RE.subscribe(drift_between_frames)
    plan = timelapse_plan(camera, focus, rig.cal, 4, 0.0, scorer=rig.scorer, **FAST)
    results = RE(plan).plan_result

    (run,) = runs_of(docs)
    streams = run["streams"]
    assert run["start"]["plan_name"] == "timelapse_plan"
    assert run["start"]["deepfocus"]["calibration_uid"] == rig.cal.uid
    assert run["start"]["num_points"] == 4
    assert len(results) == 4 and len(streams["autofocus_result"]) == 4
    assert [r.status for r in results] == ["converged"] * 4
    assert [r.run_uid for r in results] == [run["start"]["uid"]] * 4
    assert len(streams["primary"]) == 4
    zs = field(streams["primary"], "focus")
    assert np.allclose(zs, truth, atol=FOCUS_TOL_UM), (zs, truth)
    assert np.ptp(truth) >= 14.0  # it really drifted
    prior_sd = field(streams["autofocus_refocus"], "autofocus_refocus_prior_sd")
    prior_z = field(streams["autofocus_refocus"], "autofocus_refocus_prior_z")
    assert math.isnan(prior_sd[0])  # the first refocus is cold, the others warm
    assert np.allclose(prior_z[1:], [r.final_z for r in results[:-1]])
    assert all(sd >= 0.25 * rig.cal.dof_um - 1e-9 for sd in prior_sd[1:])


def test_timelapse_refocus_every_2_and_delay(RE, docs, rig, sim):
    msgs: list[Msg] = []
    RE.msg_hook = msgs.append
    RE.subscribe(docs)
    plan = timelapse_plan(
        rig.camera,
        rig.focus,
        rig.cal,
        3,
        0.5,
        scorer=rig.scorer,
        refocus_every=2,
        stream_prefix="af",
        **FAST,
    )
    results = RE(plan).plan_result

    (run,) = runs_of(docs)
    streams = run["streams"]
    assert len(results) == 2
    assert [len(streams[k]) for k in ("primary", "af_refocus", "af_result")] == [3, 2, 2]
    assert not any(name.startswith("autofocus") for name in streams)
    assert field(streams["af_refocus"], "af_refocus_seq_num") == [1, 3]
    sleeps = [m.args[0] for m in msgs if m.command == "sleep"]
    assert sleeps and all(0 < s <= 0.5 for s in sleeps)
    tokens = trace(msgs)
    after_last_frame = tokens[last_index(tokens, "create:primary") :]
    assert "sleep" not in after_last_frame


# --------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------
def per_step(r: Rig, **kw):
    return refocus_per_step(r.camera, r.focus, r.cal, scorer=r.scorer, **kw)


def wrapper(r: Rig, **kw):
    return refocus_wrapper(iter([]), r.camera, r.focus, r.cal, scorer=r.scorer, **kw)


def timelapse(r: Rig, num=2, delay=1.0, **kw):
    return timelapse_plan(r.camera, r.focus, r.cal, num, delay, scorer=r.scorer, **kw)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda r: per_step(r, every=0), ValueError, r"every=0 must be an integer >= 1"),
        (lambda r: per_step(r, every=True), ValueError, r"every=True must be an integer"),
        (lambda r: per_step(r, prior=(0.0, 1.0)), ValueError, r"prior=\(0.0, 1.0\) cannot"),
        (lambda r: per_step(r, bogus=1), TypeError, r"keyword\(s\) \['bogus'\]"),
        (
            lambda r: wrapper(r, every=1, field_tilt=(1, 1, 1)),
            ValueError,
            r"field_tilt=\(1, 1, 1\) cannot be given to refocus_wrapper: it refocuses one",
        ),
        (lambda r: per_step(r, prior_sd=-1.0), ValueError, r"prior_sd=-1.0 must be a positive"),
        (lambda r: per_step(r, max_tilt=-0.1), ValueError, r"max_tilt=-0.1 must be"),
        (lambda r: per_step(r, max_travel=0), ValueError, r"max_travel=0 must be"),
        (lambda r: per_step(r, warm_start="yes"), ValueError, r"warm_start='yes' must be"),
        (
            lambda r: per_step(r, min_images=5, max_images=3),
            ValueError,
            r"min_images=5, max_images=3",
        ),
        (lambda r: wrapper(r), ValueError, r"neither was given"),
        (lambda r: wrapper(r, every=0), ValueError, r"every=0 must be an integer"),
        (
            lambda r: wrapper(r, drift_threshold=-0.2),
            ValueError,
            r"drift_threshold=-0.2 must be a positive",
        ),
        (lambda r: wrapper(r, every=1, stream_prefix="a b"), ValueError, r"stream_prefix='a b'"),
        (lambda r: timelapse(r, num=0), ValueError, r"num=0 must be an integer >= 1"),
        (lambda r: timelapse(r, num=2.5), ValueError, r"num=2.5 must be an integer"),
        (lambda r: timelapse(r, delay=-1.0), ValueError, r"delay=-1.0 must be a finite"),
        (lambda r: timelapse(r, refocus_every=0), ValueError, r"refocus_every=0 must be"),
        (lambda r: timelapse(r, max_drift_rate=math.inf), ValueError, r"max_drift_rate=inf"),
        (lambda r: timelapse(r, on_failure="panic"), ValueError, r"on_failure='panic'"),
    ],
)
def test_arguments_are_checked_when_called(rig, call, error, match):
    with pytest.raises(error, match=match):
        call(rig)


def test_missing_calibration_says_how_to_make_one(rig):
    with pytest.raises(CalibrationError, match="No calibration given"):
        refocus_per_step(rig.camera, rig.focus, None, scorer=rig.scorer)
    with pytest.raises(CalibrationError, match="No calibration given"):
        timelapse_plan(rig.camera, rig.focus, None, 2, 0.0, scorer=rig.scorer)


def test_drift_needs_the_deepfocus_blur(rig):
    from bluesky_deepfocus import get_focus_function

    tenengrad = get_focus_function("tenengrad")
    with pytest.raises(ValueError, match="drift_threshold needs the DeepFocus blur"):
        refocus_wrapper(
            iter([]), rig.camera, rig.focus, rig.cal, scorer=tenengrad, drift_threshold=0.2
        )
