"""Calibration and autofocus plans, and the run-less autofocus stub they share.

The focus function is subscribed as a Bluesky callback for the duration of the plan;
bluesky calls callbacks synchronously as each event is emitted, so after
``trigger_and_read`` the score of that image is ready for the next decision. The
decision logic lives in :mod:`bluesky_deepfocus.search` (pure ask/tell objects); these
plans only move, measure, record and keep the sample safe.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import FailedStatus, Msg, RunEngineControlException
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.utils.errors import StatusTimeoutError

from bluesky_deepfocus.calibration import Calibration
from bluesky_deepfocus.errors import AutofocusFailed, CalibrationError, DeviceFault
from bluesky_deepfocus.metrics import gradient_sharpness, gradient_sharpness_floor
from bluesky_deepfocus.results import AutofocusResult
from bluesky_deepfocus.schema import CALIBRATION_STREAM, MD_KEY, RESULT_STREAM, SCORES_STREAM
from bluesky_deepfocus.scoring import ROI, FocusFunction, ScoredImage, crop_roi
from bluesky_deepfocus.search import (
    DeepFocusSettings,
    Observation,
    Search,
    _check_field_tilt,
    make_search,
)
from bluesky_deepfocus.spectral import EDGES, frame_spectrum, patch_spectra

__all__ = ["autofocus_plan", "autofocus_stub", "calibration_plan"]

MsgGenerator = Generator[Msg, Any, Any]
logger = logging.getLogger("bluesky_deepfocus.plans")
ON_FAILURE = ("restore", "raise", "stay", "sharpest")
# on_failure="sharpest": the sharpest image must beat the start image by this much (the
# plans' tolerance on gradient sharpness, log units) and stand this share above its
# camera-noise floor (DeepFocusSettings.min_detail_share: a frame that saw detail)
SHARPEST_MARGIN = 0.05
SHARPEST_DETAIL_SHARE = 0.3
STRATEGIES = ("deepfocus", "paper", "brent")


# --------------------------------------------------------------------------------------
# recorded values
# --------------------------------------------------------------------------------------
class _ScoreRecord(Device):
    """Derived values of one image, read into the :data:`SCORES_STREAM` stream."""

    z = Cpt(Signal, value=0.0, kind="hinted")
    blur = Cpt(Signal, value=0.0, kind="hinted")
    blur_map = Cpt(Signal, value=np.zeros((1, 1)))
    confidence_map = Cpt(Signal, value=np.zeros((1, 1)))
    informative_fraction = Cpt(Signal, value=0.0)
    sharpness = Cpt(Signal, value=0.0)
    image_index = Cpt(Signal, value=0)
    spectrum_power = Cpt(Signal, value=np.zeros(len(EDGES) - 1))
    spectrum_counts = Cpt(Signal, value=np.zeros(len(EDGES) - 1))
    spectrum_noise = Cpt(Signal, value=0.0)

    def update(self, **values: Any) -> None:
        now = time.time()
        for k, v in values.items():
            getattr(self, k).put(v, timestamp=now)


class _ResultRecord(Device):
    """The decision, read into :data:`RESULT_STREAM`."""

    start_z = Cpt(Signal, value=0.0)
    final_z = Cpt(Signal, value=0.0)
    dz = Cpt(Signal, value=0.0)
    images_used = Cpt(Signal, value=0)
    residual = Cpt(Signal, value=0.0)
    confidence = Cpt(Signal, value=0.0)
    converged = Cpt(Signal, value=False)
    moved = Cpt(Signal, value=False)
    status = Cpt(Signal, value="")
    reason = Cpt(Signal, value="")
    sharpness_start = Cpt(Signal, value=0.0)
    sharpness_final = Cpt(Signal, value=0.0)
    sigma_um = Cpt(Signal, value=0.0)
    focus_map = Cpt(Signal, value=np.zeros((1, 1)))

    def update(self, **values: Any) -> None:
        now = time.time()
        for k, v in values.items():
            getattr(self, k).put(v, timestamp=now)


class _CalibrationRecord(Device):
    calibration = Cpt(Signal, value="")
    fwhm_um = Cpt(Signal, value=0.0)
    focus_um = Cpt(Signal, value=0.0)
    moffat_r2 = Cpt(Signal, value=0.0)


def _finite(v: float) -> float:
    """Event data must be JSON-able: NaN is fine for floats, keep them as floats."""
    return float(v)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _limits_of(focus: Any) -> tuple[float, float]:
    lo, hi = getattr(focus, "limits", (0.0, 0.0))
    return (float(lo), float(hi)) if lo < hi else (-math.inf, math.inf)


def _image_key(camera: Any) -> str:
    img = getattr(camera, "image", None)
    return img.name if img is not None else f"{camera.name}_image"


def _config_value(camera: Any, attr: str) -> Any:
    sig = getattr(camera, attr, None)
    if sig is None:
        return None
    try:
        return sig.get()
    except Exception:
        return None


def _check_calibration(calibration: Any, camera: Any) -> Calibration:
    if calibration is None:
        raise CalibrationError(
            "No calibration given for autofocus: run `cal = RE(calibration_plan(camera, focus, "
            "-150, 150, 121, scorer=scorer)).plan_result` first (or load one with "
            "`Calibration.from_run(catalog[uid])`)."
        )
    if not isinstance(calibration, Calibration):
        raise CalibrationError(
            f"calibration must be a bluesky_deepfocus.Calibration, got {type(calibration).__name__!r}."
        )
    objective = _config_value(camera, "objective")
    if objective and calibration.objective and str(objective) != calibration.objective:
        raise CalibrationError(
            f"The calibration was made with objective {calibration.objective!r} but the "
            f"microscope now uses {str(objective)!r}: calibrate this objective first (or load its "
            "calibration)."
        )
    px = _config_value(camera, "pixel_size_um")
    if px and calibration.pixel_size_um and abs(float(px) / calibration.pixel_size_um - 1) > 0.02:
        raise CalibrationError(
            f"The calibration's pixel size {calibration.pixel_size_um:.4f} um differs from the "
            f"camera's {float(px):.4f} um (binning or objective changed): recalibrate."
        )
    return calibration


def _scored(scorer: FocusFunction, before: int, stream: str) -> ScoredImage:
    """The scorer's result for the event just emitted into ``stream``.

    Callbacks run synchronously as events are emitted, so the newest scored image of the
    stream is this one -- provided the scorer's count grew (robust to pauses and replays
    after a checkpoint, unlike counting events on the plan side).
    """
    latest = scorer.latest
    if scorer.scored_count <= before or latest is None or latest.stream != stream:
        raise RuntimeError(
            f"The focus function {scorer.name!r} did not score the image just taken in stream "
            f"{stream!r}: does the camera put its image inline in the event (an 'image' "
            "component, dtype 'array', at least one patch large)?"
        )
    return latest


class _Session:
    """Mutable state of one autofocus pass inside a run (counters, stream names)."""

    def __init__(self, images_stream: str, scores_stream: str, result_stream: str) -> None:
        self.images_stream = images_stream
        self.scores_stream = scores_stream
        self.result_stream = result_stream
        self.run_uid: str | None = None
        self.counter: dict[str, int] = {}
        # one recording device per stream and run: bluesky refuses a second, different
        # object read into an existing stream ("Mismatched objects read")
        self.score_record = _ScoreRecord(name=scores_stream.replace("-", "_"))
        self.result_record = _ResultRecord(name=result_stream.replace("-", "_"))
        self.map_shape: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------
# moves, retries and restores
# --------------------------------------------------------------------------------------
#: Errors of a device that a retry may cure: a failed or timed-out status, a device fault.
#: Limit violations (``ValueError``) and RunEngine interruptions are never retried.
_RETRYABLE = (FailedStatus, DeviceFault, TimeoutError, StatusTimeoutError)

#: Attribute set on an exception once the focus was restored (or restoring it failed),
#: so that an outer wrapper does not try again.
_RESTORED_ATTR = "_deepfocus_focus_restored"


def _device_error(exc: BaseException) -> BaseException:
    """The device's own error behind ``exc``.

    bluesky raises ``FailedStatus(status) from status.exception()`` when a status fails;
    ``str()`` of it is the status' repr, the device's message is in its cause.
    """
    err = exc
    for _ in range(8):  # a FailedStatus wrapping a FailedStatus...: unwrap a few levels
        if not isinstance(err, FailedStatus):
            break
        cause = err.__cause__
        if cause is None:
            status = err.args[0] if err.args else None
            try:
                cause = status.exception(timeout=0) if status is not None else None
            except Exception:
                cause = None
        if not isinstance(cause, BaseException):
            break
        err = cause
    return err


def _describe_error(exc: BaseException) -> str:
    err = _device_error(exc)
    text = f"{type(err).__name__}: {err}"
    notes = getattr(err, "__notes__", None)
    if notes:
        text += " (" + "; ".join(str(n) for n in notes) + ")"
    return text


def _check_retries(retries: Any, retry_delay: Any) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries={retries!r} must be an integer >= 0 (retries after a failure).")
    delay = float(retry_delay) if isinstance(retry_delay, int | float) else math.nan
    if isinstance(retry_delay, bool) or not (math.isfinite(delay) and delay >= 0):
        raise ValueError(f"retry_delay={retry_delay!r} must be a finite number of seconds >= 0.")


def _retrying(
    make_plan: Callable[[], MsgGenerator],
    what: str,
    retries: int,
    retry_delay: float,
) -> MsgGenerator:
    """Run ``make_plan()``; on a device error retry it ``retries`` times, ``retry_delay`` s
    apart, then raise :class:`DeviceFault` naming ``what`` and the device's own error
    (chained to it). Everything else (limit violations, pause / abort / stop) passes."""
    attempt = 0
    while True:
        try:
            return (yield from make_plan())
        except _RETRYABLE as exc:
            attempt += 1
            if attempt > retries:
                raise DeviceFault(
                    f"Giving up after {attempt} attempt{'s' if attempt > 1 else ''} to {what}: "
                    f"{_describe_error(exc)}. Check the camera and the focus stage."
                ) from _device_error(exc)
            logger.warning(
                "Attempt %d of %d to %s failed (%s); retrying in %.3g s.",
                attempt,
                retries + 1,
                what,
                _describe_error(exc),
                retry_delay,
            )
            yield from bps.sleep(retry_delay)


def _check_target(focus: Any, z: float, bounds: tuple[float, float] | None) -> float:
    """``z`` if it is finite and inside the focus limits (and ``bounds``); else ValueError."""
    z = float(z)
    lo, hi = _limits_of(focus)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if not (math.isfinite(z) and lo - 1e-9 <= z <= hi + 1e-9):
        raise ValueError(
            f"Refusing to move the focus {getattr(focus, 'name', focus)!r} to z={z!r} um: "
            f"outside the allowed range [{lo!r}, {hi!r}] um (focus limits / max_travel). "
            "Nothing moved."
        )
    return z


def _move(
    focus: Any,
    z: float,
    *,
    retries: int,
    retry_delay: float,
    bounds: tuple[float, float] | None = None,
    what: str | None = None,
) -> MsgGenerator:
    """Move the focus to ``z`` (inside its limits and ``bounds``) with the retry policy."""
    z = _check_target(focus, z, bounds)
    return (
        yield from _retrying(
            lambda: bps.mv(focus, z),
            what or f"move the focus to z={z!r} um",
            retries,
            retry_delay,
        )
    )


def _restore_focus(
    exc: BaseException, focus: Any, z0: float | None, retries: int, retry_delay: float
) -> MsgGenerator:
    """After ``exc``: put the focus back at ``z0`` with the retry policy.

    Never raises a device error of its own: a failed restore is added to ``exc`` as a
    note (``exc`` is what the caller re-raises, so the original fault is never masked)
    and logged. Done once per exception, however many wrappers catch it.
    """
    if z0 is None or getattr(exc, _RESTORED_ATTR, False):
        return
    try:
        setattr(exc, _RESTORED_ATTR, True)
    except Exception:  # an exception type refusing attributes: restore anyway
        pass
    try:
        here = float((yield from bps.rd(focus)))
    except Exception:
        here = math.nan
    if here == z0:
        return  # nothing moved (e.g. refused before any motion)
    try:
        yield from _move(
            focus,
            z0,
            retries=retries,
            retry_delay=retry_delay,
            what=f"restore the focus to its start position z={z0!r} um",
        )
    except Exception as restore_exc:
        note = (
            f"The focus could not be restored to its start position z={z0!r} um either: "
            f"{_describe_error(restore_exc)}. Check the focus stage; the focus may be anywhere "
            "between the start and the last position commanded."
        )
        try:
            exc.add_note(note)
        except Exception:
            pass
        logger.error("%s (after %s)", note, _describe_error(exc))


# per (RunEngine run, stream) image counters are kept on the plan side
def _measure(
    camera: Any,
    focus: Any,
    scorer: FocusFunction,
    z: float,
    roi: ROI | None,
    session: _Session,
    counter: dict[str, int],
    record: _ScoreRecord,
    settle_time: float,
    retries: int = 2,
    retry_delay: float = 0.5,
    bounds: tuple[float, float] | None = None,
) -> Generator[Msg, Any, tuple[Observation, np.ndarray]]:
    """Move, snap, score (via the subscribed callback), record; return the observation.

    A failed move or snap (device error, timeout, wrong frame) is retried ``retries``
    times after ``retry_delay`` s; then :class:`DeviceFault` is raised (the callers restore
    the focus). Limit violations are never retried, and RunEngine interruptions (pause,
    abort, stop) pass straight through.

    Rewinding: the move and the snap are rewindable (a pause or suspension during them
    re-does them on resume), the image event and its score event are recorded together
    with rewinding off, so a pause between the two resumes where it stopped instead of
    re-taking the image (which would repeat the image's ``seq_num``).
    """
    z = _check_target(focus, z, bounds)
    # the per-image path yields bare messages: bluesky's plan stubs capture the call
    # stack at every call (to warn about plans never iterated), about 1 ms each here
    yield Msg("checkpoint")

    def attempt() -> Generator[Msg, Any, tuple[Observation, np.ndarray]]:
        group = f"deepfocus-move-{time.monotonic_ns()}"
        yield Msg("set", focus, z, group=group)
        yield Msg("wait", None, group=group)
        if settle_time:
            yield Msg("sleep", None, settle_time)
        group = f"deepfocus-snap-{time.monotonic_ns()}"
        for obj in (camera, focus):
            if hasattr(obj, "trigger"):
                yield Msg("trigger", obj, group=group)
        yield Msg("wait", None, group=group)
        return (
            yield from bpp.rewindable_wrapper(
                _record(camera, focus, scorer, z, roi, session, counter, record), False
            )
        )

    return (yield from _retrying(attempt, f"image at z={z!r} um", retries, retry_delay))


def _record(
    camera: Any,
    focus: Any,
    scorer: FocusFunction,
    z: float,
    roi: ROI | None,
    session: _Session,
    counter: dict[str, int],
    record: _ScoreRecord,
) -> Generator[Msg, Any, tuple[Observation, np.ndarray]]:
    """The image event and its score event (run with rewinding off, see :func:`_measure`)."""
    before = scorer.scored_count
    yield Msg("create", name=session.images_stream)
    reading: dict[str, Any] = {}
    try:
        for obj in (camera, focus):
            got = yield Msg("read", obj)
            if got is not None:
                reading.update(got)
    except Exception:
        yield Msg("drop")
        raise
    yield Msg("save")
    seq = counter[session.images_stream] = counter.get(session.images_stream, 0) + 1
    image = np.asarray(reading[_image_key(camera)]["value"])
    z_read = float(reading[focus.name]["value"]) if focus.name in reading else float(z)
    item = _scored(scorer, before, session.images_stream)
    if session.run_uid is None and item.run_uid:
        session.run_uid = item.run_uid
    session.map_shape = session.map_shape or (
        int(item.result.blur_map.shape[0]),
        int(item.result.blur_map.shape[1]),
    )
    res = item.result
    img = image.astype(np.float64)
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    crop, _ = crop_roi(img.astype(np.float32), roi, scorer.patch_size)
    spec = frame_spectrum(crop)
    pspecs, _ = patch_spectra(crop, scorer.patch_size)
    blur = res.score if not res.higher_is_sharper else float("nan")
    sharp = res.score if res.higher_is_sharper else spec.sharpness()
    check = gradient_sharpness(crop)
    floor = gradient_sharpness_floor(float(crop.mean(dtype=np.float64)), spec.noise)
    obs = Observation(
        z=z_read,
        blur=blur,
        blur_map=res.blur_map,
        confidence=res.confidence,
        spectrum=spec,
        patch_spectra=pspecs,
        sharpness=sharp,
        gradient_sharpness=check,
        sharpness_floor=floor,
    )
    record.update(
        z=z_read,
        blur=_finite(res.score),
        blur_map=np.asarray(res.blur_map, dtype=float),
        confidence_map=np.asarray(res.confidence, dtype=float),
        informative_fraction=float(res.informative_fraction),
        sharpness=_finite(check),
        image_index=seq,
        spectrum_power=np.nan_to_num(spec.power, nan=0.0),
        spectrum_counts=spec.counts.astype(float),
        spectrum_noise=float(spec.noise),
    )
    yield Msg("create", name=session.scores_stream)
    yield Msg("read", record)
    yield Msg("save")
    return obs, image


def _emit(stream: str, device: Any) -> MsgGenerator:
    """One event of ``device`` in ``stream``, recorded with rewinding off (a pause right
    after it must not replay the moves before it and emit it twice)."""

    def inner() -> MsgGenerator:
        yield Msg("create", name=stream)
        yield Msg("read", device)
        yield Msg("save")

    return (yield from bpp.rewindable_wrapper(inner(), False))


def _bounds(focus: Any, z0: float, max_travel: float) -> tuple[float, float]:
    lo, hi = _limits_of(focus)
    return max(lo, z0 - max_travel), min(hi, z0 + max_travel)


def autofocus_stub(
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    *,
    scorer: FocusFunction,
    roi: ROI | None = None,
    min_images: int = 3,
    max_images: int = 8,
    on_failure: str = "restore",
    strategy: str = "deepfocus",
    max_travel: float | None = None,
    min_confidence: float = 0.5,
    settings: DeepFocusSettings | None = None,
    prior: tuple[float, float] | None = None,
    settle_time: float = 0.0,
    retries: int = 2,
    retry_delay: float = 0.5,
    stream_prefix: str = "autofocus",
    field_tilt: tuple[float, float, float] | None = None,
    _session: _Session | None = None,
) -> Generator[Msg, Any, AutofocusResult]:
    """Autofocus inside an already open run (opens no run; a plan stub).

    Images go to stream ``f"{stream_prefix}_images"``, the (z, blur) pairs to
    ``f"{stream_prefix}_scores"`` and the decision to ``f"{stream_prefix}_result"`` of the
    host run, so its ``primary`` stream stays the host's. Same arguments as
    :func:`autofocus_plan`; returns an :class:`~bluesky_deepfocus.AutofocusResult`.
    """
    _validate(min_images, max_images, on_failure, strategy, min_confidence)
    _check_retries(retries, retry_delay)
    field_tilt = _check_field_tilt(field_tilt)
    if strategy != "brent":
        calibration = _check_calibration(calibration, camera)
    session = _session or _Session(
        f"{stream_prefix}_images", f"{stream_prefix}_scores", f"{stream_prefix}_result"
    )
    z0 = float((yield from bps.rd(focus)))
    if max_travel is None:
        max_travel = calibration.z_range[1] if calibration is not None else 150.0
    if not (math.isfinite(max_travel) and max_travel > 0):
        raise ValueError(f"max_travel={max_travel!r} must be a positive number of um.")
    lo, hi = _bounds(focus, z0, float(max_travel))
    if not lo <= z0 <= hi:
        raise ValueError(
            f"The focus is at {z0!r} um, outside its limits {_limits_of(focus)!r}: move it inside "
            "the limits before autofocus."
        )
    kw: dict[str, Any] = {
        "start": z0,
        "lo": lo,
        "hi": hi,
        "min_images": min_images,
        "max_images": max_images,
    }
    if strategy == "deepfocus":
        kw.update(settings=settings, prior=prior)
        if field_tilt is not None:
            kw["field_tilt"] = field_tilt
    search: Search = make_search(strategy, calibration, **kw)
    record = session.score_record
    result_rec = session.result_record
    counter = session.counter
    old_roi = scorer.roi
    scorer.roi = roi
    observations: list[Observation] = []
    bounds = (lo, hi)
    tol = _image_tolerance(calibration)

    def measure(z: float) -> Generator[Msg, Any, Observation]:
        obs, _ = yield from _measure(
            camera,
            focus,
            scorer,
            z,
            roi,
            session,
            counter,
            record,
            settle_time,
            retries,
            retry_delay,
            bounds,
        )
        observations.append(obs)
        return obs

    def move(z: float) -> MsgGenerator:
        yield from _move(focus, z, retries=retries, retry_delay=retry_delay, bounds=bounds)

    def body() -> Generator[Msg, Any, AutofocusResult]:
        while (z := search.ask()) is not None:
            if not lo - 1e-9 <= z <= hi + 1e-9:  # defence in depth: never outside the bounds
                raise AssertionError(f"search proposed z={z!r} outside [{lo!r}, {hi!r}]")
            search.tell((yield from measure(z)))
        return (yield from decide(search.result()))

    chosen: list[Observation] = []  # the image on_failure="sharpest" went to

    def refuse(why: str) -> tuple[float, str, str]:
        # where an estimate is refused: the start position, or with on_failure="sharpest"
        # the sharpest image taken if it is clearly sharper than the start and saw detail
        if on_failure != "sharpest":
            return z0, "restored", f"restored the start position: {why}"
        best, verdict = _sharpest_image(observations, z0, tol, lo, hi)
        if best is None:
            return z0, "restored", f"restored the start position: {why}; {verdict}"
        chosen.append(best)
        # (a read-back a hair beyond a bound counts as taken there; never commanded beyond)
        target = min(max(best.z, lo), hi)
        return target, "sharpest", f"{why}; moved to the sharpest image taken: {verdict}"

    def decide(res: Any) -> Generator[Msg, Any, AutofocusResult]:
        start_sharp = _sharpness_at(observations, z0, tol)
        ok = (
            res.converged
            and res.confidence >= min_confidence
            and math.isfinite(res.z_focus)
            and lo <= res.z_focus <= hi
        )
        if ok:
            target = float(res.z_focus)
            status, reason = "converged", res.reason
        else:
            reason = f"not moved to the estimate: {res.reason} (confidence {res.confidence:.2f})"
            if on_failure == "sharpest":
                target, status, reason = refuse(reason)
            else:
                status = {"restore": "restored", "stay": "stayed", "raise": "failed"}[on_failure]
                target = (
                    z0 if on_failure in ("restore", "raise") else float((yield from bps.rd(focus)))
                )
        if ok and not math.isfinite(_sharpness_at(observations, target, tol)):
            # no image at the estimate (the paper's search does not aim for one; ours not when
            # its budget ran out): image it, so that the sharpness check below can run
            if len(observations) >= max_images:
                # the image budget is spent (a user's limit on exposures: kept). Instead of
                # an image there, the estimate must agree with the images' sharpness: the
                # sharpest within 1.5 DOF of it, no sharper image farther from it than a
                # less sharp one
                clash = _order_clash(observations, target, 2 * tol, 15 * tol)
                if clash is None:
                    yield from move(target)
                    reason += (
                        f"; not verified by an image (image budget max_images={max_images} "
                        "used); consistent with the images' sharpness (the sharpest within 1.5 DOF)"
                    )
                else:
                    ok = False
                    why = (
                        f"the estimate ({res.z_focus:.2f} um) contradicts the images' "
                        f"sharpness: {clash} (image budget max_images={max_images} used, so "
                        "it could not be imaged)"
                    )
                    target, status, reason = refuse(why)
                    yield from move(target)
            else:
                yield from measure(target)
        elif ok or on_failure != "stay":
            yield from move(target)
        # on_failure="stay": nothing to move, the focus is where the last image was taken
        final_sharp = _sharpness_at(observations, target, tol)
        if (
            ok
            and math.isfinite(start_sharp)
            and math.isfinite(final_sharp)
            and final_sharp < start_sharp - 0.05
        ):
            # the image at the estimate is less sharp than the start: go back, and say so
            why = (
                f"the image at the estimate ({res.z_focus:.2f} um) was less sharp than at the "
                f"start (sharpness {final_sharp:.2f} < {start_sharp:.2f})"
            )
            target, status, reason = refuse(why)
            yield from move(target)
            ok = False
        final = float((yield from bps.rd(focus)))
        if not ok and status == "converged":
            status = "failed"
        result = AutofocusResult(
            start_z=z0,
            final_z=final,
            dz=float(res.dz),
            images_used=len(observations),
            residual=float(res.residual),
            confidence=float(res.confidence),
            converged=bool(res.converged and ok),
            moved=abs(final - z0) > 1e-6,
            status=status,
            reason=reason,
            sharpness_start=start_sharp,
            # the image the decision compared (another image near the same z may differ)
            sharpness_final=(
                chosen[-1].gradient_sharpness
                if status == "sharpest"
                else _sharpness_at(observations, final, tol)
            ),
            run_uid=session.run_uid or "",
            strategy=strategy,
            z_measured=tuple(o.z for o in observations),
            blur_measured=tuple(float(o.blur) for o in observations),
            focus_map=res.focus_map,
            sigma_um=float(res.sigma_um),
            detail_z=float((res.details or {}).get("detail_focus", res.z_focus)),
        )
        shape = session.map_shape or (1, 1)
        fmap = np.full(shape, np.nan)  # same shape every time in a run (the writer needs it)
        if res.focus_map is not None and res.focus_map.shape == shape:
            fmap = np.asarray(res.focus_map, dtype=float)
        result_rec.update(
            start_z=result.start_z,
            final_z=result.final_z,
            dz=result.dz,
            images_used=result.images_used,
            residual=result.residual,
            confidence=result.confidence,
            converged=result.converged,
            moved=result.moved,
            status=result.status,
            reason=result.reason,
            sharpness_start=result.sharpness_start,
            sharpness_final=result.sharpness_final,
            sigma_um=result.sigma_um,
            focus_map=np.asarray(fmap, dtype=float),
        )
        yield from _emit(session.result_stream, result_rec)
        return result

    def restore(exc: Exception) -> Generator[Msg, Any, None]:
        # an error mid-search (or an abort, stop, Ctrl-C): back to the start position
        yield from _restore_focus(exc, focus, z0, retries, retry_delay)

    def cleanup() -> Generator[Msg, Any, None]:
        yield from bps.unsubscribe(token)
        scorer.roi = old_roi

    # a private forwarder: subscribing the scorer itself would, on unsubscribe, also remove
    # a session-wide RE.subscribe(scorer) (bluesky registers one callable once); the
    # scorer ignores events it already scored
    def forward(name: str, doc: dict[str, Any]) -> None:
        scorer(name, doc)

    token = yield from bps.subscribe("all", forward)
    result: AutofocusResult = yield from bpp.contingency_wrapper(
        body(), except_plan=restore, final_plan=cleanup
    )
    del forward
    if on_failure == "raise" and not result.converged:
        raise AutofocusFailed(
            f"Autofocus did not converge ({result.reason}); the focus was restored to "
            f"{z0:.3f} um. Check the field (blank? saturated?), the calibration, or use "
            "on_failure='restore' to continue without raising."
        )
    return result


def _image_tolerance(calibration: Calibration | None) -> float:
    """How close (um) an image must be to a position to count as taken there: a tenth of
    the depth of field (what the searches call converged), 1 nm without a calibration."""
    dof = calibration.dof_um if calibration is not None else math.nan
    return max(0.1 * dof, 1e-3) if math.isfinite(dof) and dof > 0 else 1e-3


def _order_clash(
    observations: list[Observation], z: float, slack: float, reach: float
) -> str | None:
    """Why ``z`` cannot be taken as the focus without an image there, or None.

    Gradient sharpness falls monotonically with ``|z - focus|`` on any specimen, so the
    sharpest image must lie within ``reach`` um of it, and an image sharper than another (by
    more than the plans' 0.05 tolerance) must not be farther from it than that one by more
    than ``slack`` um.
    """
    obs = [o for o in observations if math.isfinite(o.gradient_sharpness)]
    if not obs:
        return "no image has a finite sharpness"
    best = max(obs, key=lambda o: o.gradient_sharpness)
    if abs(best.z - z) > reach:
        return (
            f"the sharpest image (at {best.z:.2f} um) is {abs(best.z - z):.2f} um from it, "
            f"more than {reach:.2f} um (1.5 DOF)"
        )
    for a in obs:
        for b in obs:
            # on opposite sides of z the slack absorbs an asymmetric sharpness curve; on the
            # same side none is needed (a less sharp image between the sharpest one and z
            # means sharpness fell on the way to z)
            opposite = (a.z - z) * (b.z - z) < 0
            if a.gradient_sharpness > b.gradient_sharpness + 0.05 and (
                abs(a.z - z) > abs(b.z - z) + (slack if opposite else 0.0)
            ):
                return (
                    f"the image at {a.z:.2f} um (sharpness {a.gradient_sharpness:.2f}) is "
                    f"sharper than the one at {b.z:.2f} um ({b.gradient_sharpness:.2f}) but "
                    "farther from the estimate"
                )
    return None


def _sharpest_image(
    observations: list[Observation], z0: float, tol: float, lo: float, hi: float
) -> tuple[Observation | None, str]:
    """The image ``on_failure="sharpest"`` moves to, and why; or None and why not.

    The sharpest image (gradient sharpness) taken within ``[lo, hi]`` (``tol`` of slack
    for read-backs) and more than ``tol`` from the start position ``z0``, when it is
    sharper than the sharpest image taken at ``z0`` by :data:`SHARPEST_MARGIN` and its
    gradient energy stands :data:`SHARPEST_DETAIL_SHARE` above its camera-noise floor (when
    that is known). It was imaged, so the focus ends no less sharp than it started, and
    nowhere that was not measured; it is not a focus estimate (the result is not
    converged). Needs an image at the start (Brent's search takes none: it restores).
    """
    at_start = [
        o.gradient_sharpness
        for o in observations
        if abs(o.z - z0) <= tol and math.isfinite(o.gradient_sharpness)
    ]
    if not at_start:
        return None, "no image at the start position to compare with"
    start = max(at_start)
    obs = [
        o
        for o in observations
        if math.isfinite(o.gradient_sharpness)
        and lo - tol <= o.z <= hi + tol
        and abs(o.z - z0) > tol
    ]
    if not obs:
        return None, "no image away from the start has a finite sharpness"
    best = max(obs, key=lambda o: o.gradient_sharpness)
    g = best.gradient_sharpness
    if g <= start + SHARPEST_MARGIN:
        return None, (
            f"no image was sharper than the start (the sharpest, at {best.z:.2f} um, "
            f"{g:.2f} vs {start:.2f} at the start; needs > {SHARPEST_MARGIN:g} more)"
        )
    floor = best.sharpness_floor
    if math.isfinite(floor) and math.exp(g) < (1 + SHARPEST_DETAIL_SHARE) * math.exp(floor):
        share = math.exp(g - floor) - 1
        return None, (
            f"the sharpest image (at {best.z:.2f} um) saw no detail: its gradient energy "
            f"stands {100 * share:.0f} % above the camera noise's (needs "
            f"{100 * SHARPEST_DETAIL_SHARE:g} %)"
        )
    return best, (
        f"at {best.z:.2f} um, sharpness {g:.2f} vs {start:.2f} at the start (an imaged "
        "position, not a verified focus)"
    )


def _sharpness_at(observations: list[Observation], z: float, tol: float = 1e-3) -> float:
    """Gradient sharpness (:func:`~bluesky_deepfocus.metrics.gradient_sharpness`) of the
    image taken nearest to ``z`` within ``tol`` um (the latest of equally near ones); NaN
    if none was taken there."""
    near = [(abs(o.z - z), -i, o) for i, o in enumerate(observations) if abs(o.z - z) <= tol]
    if not near:
        return float("nan")
    return float(min(near, key=lambda t: (t[0], t[1]))[2].gradient_sharpness)


def _validate(
    min_images: int, max_images: int, on_failure: str, strategy: str, min_confidence: float
) -> None:
    if not (
        isinstance(min_images, int)
        and isinstance(max_images, int)
        and 1 <= min_images <= max_images
    ):
        raise ValueError(
            f"Need integers 1 <= min_images <= max_images, got min_images={min_images!r}, "
            f"max_images={max_images!r}."
        )
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure={on_failure!r} must be one of {ON_FAILURE!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES!r}.")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence={min_confidence!r} must be within [0, 1].")


def _run_returning(inner: Any, md: Mapping[str, Any]) -> Generator[Msg, Any, Any]:
    """Like ``bpp.run_wrapper`` but returns the inner plan's value; passes it the run uid."""
    uid = yield from bps.open_run(dict(md))

    def except_plan(e: Exception) -> Generator[Msg, Any, None]:
        if isinstance(e, RunEngineControlException):
            yield from bps.close_run(exit_status=getattr(e, "exit_status", "abort"))
        else:
            yield from bps.close_run(exit_status="fail", reason=_describe_error(e))

    def else_plan() -> Generator[Msg, Any, None]:
        yield from bps.close_run()

    return (
        yield from bpp.contingency_wrapper(
            inner(uid), except_plan=except_plan, else_plan=else_plan
        )
    )


def _base_md(
    plan_name: str,
    camera: Any,
    focus: Any,
    plan_args: dict[str, Any],
    extra: dict[str, Any],
    md: Mapping[str, Any] | None,
) -> dict[str, Any]:
    _md: dict[str, Any] = {
        "plan_name": plan_name,
        "plan_args": plan_args,
        "detectors": [camera.name],
        "motors": [focus.name],
        "hints": {"dimensions": [([focus.name], "primary")]},
        MD_KEY: extra,
    }
    _md.update(md or {})
    return _md


def _provenance(
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    scorer: FocusFunction,
    *,
    strategy: str,
    settings: Mapping[str, Any],
    min_images: int,
    max_images: int,
    min_confidence: float,
    roi: ROI | None,
    max_travel: float | None,
    on_failure: str,
) -> dict[str, Any]:
    """What a later reader needs to redo an autofocus (the start document's ``deepfocus``)."""
    lo, hi = _limits_of(focus)
    return {
        "calibration_uid": (calibration.uid or "") if calibration is not None else "",
        "objective": calibration.objective
        if calibration is not None
        else str(_config_value(camera, "objective") or ""),
        "model_id": getattr(scorer, "model_id", scorer.name),
        "model_sha256": getattr(scorer, "model_sha256", ""),
        "scorer": scorer.describe(),
        "algorithm": {
            "strategy": strategy,
            "settings": dict(settings),
            "min_images": min_images,
            "max_images": max_images,
            "min_confidence": min_confidence,
        },
        "roi": list(roi) if roi is not None else None,
        "start_z": float(focus.position) if hasattr(focus, "position") else float("nan"),
        "limits": [lo, hi] if math.isfinite(lo) else None,
        "max_travel": max_travel,
        "on_failure": on_failure,
    }


def autofocus_plan(
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    *,
    scorer: FocusFunction,
    roi: ROI | None = None,
    min_images: int = 3,
    max_images: int = 8,
    on_failure: str = "restore",
    strategy: str = "deepfocus",
    max_travel: float | None = None,
    min_confidence: float = 0.5,
    settings: DeepFocusSettings | None = None,
    prior: tuple[float, float] | None = None,
    settle_time: float = 0.0,
    retries: int = 2,
    retry_delay: float = 0.5,
    md: Mapping[str, Any] | None = None,
    field_tilt: tuple[float, float, float] | None = None,
) -> Generator[Msg, Any, AutofocusResult]:
    """Bring the sample into focus in a few images; one run, every decision recorded.

    Parameters
    ----------
    camera, focus
        An :class:`~bluesky_deepfocus.devices.MMCamera` (or any readable with an ``image``
        component) and a focus positioner with ``limits``.
    calibration
        The :class:`~bluesky_deepfocus.Calibration` of this objective (not needed for
        ``strategy="brent"``).
    scorer
        The focus function, subscribed as a callback for the run (a
        :class:`~bluesky_deepfocus.DeepFocusScorer` for ``"deepfocus"``/``"paper"``, any
        classic function for ``"brent"``).
    roi
        ``(x, y, width, height)`` in pixels; default the whole frame.
    min_images, max_images
        Image budget of the search; ``min_images == max_images == N`` uses exactly N
        images. When the search ends at an estimate it did not image (within a tenth of
        the depth of field), one more image is taken there to check it is not less sharp
        than the start (counted in ``images_used``), except with an exact budget, where
        the ``reason`` says "not verified by an image" instead.
    on_failure
        When the estimate is not trustworthy (no focus information, low confidence, not
        converged, beyond the bounds): ``"restore"`` the start position, ``"stay"`` where
        the last image was taken, ``"raise"`` :class:`~bluesky_deepfocus.AutofocusFailed`
        (after restoring the start position), or go to the ``"sharpest"`` image taken when
        it is clearly sharper than the start image and saw detail (status ``"sharpest"``,
        not converged: a measured position, not a focus estimate; else the start position
        is restored; it needs an image at the start, which ``strategy="brent"`` never
        takes, so there it restores). With ``"sharpest"`` this also replaces the restore
        after the sharpness checks (the image at the estimate less sharp than the start,
        or, with the budget spent, an estimate the images contradict). Nothing is moved
        blindly in any case.
    strategy
        ``"deepfocus"`` (ours), ``"paper"`` (the paper's algorithm) or ``"brent"``.
    max_travel
        Largest distance from the start position ever commanded (um); default the
        calibration's half range. The stage limits always apply too.
    min_confidence
        Minimum confidence to move to the estimate.
    settings, prior
        Tuning of the ``"deepfocus"`` strategy; ``prior=(z, sd)`` warm-starts it.
    field_tilt
        ``(tilt_x, tilt_y, sd)``: the slide's tilt seen across the field (um of focus from
        the first to the last column / row of the image) when known from other fields,
        e.g. :func:`~bluesky_deepfocus.search.pool_field_tilts` of earlier tiles
        (:func:`refocus_per_step` does this itself); with ``settings.focus_at="centre"``
        it lets a field with few informative patches be placed by its centre. Ignored by
        the other strategies.
    settle_time
        Seconds to wait after each move before the snap.
    retries, retry_delay
        Every move (search, final, restore) and every snap that fails is retried this many
        times, this many seconds apart; then :class:`~bluesky_deepfocus.DeviceFault` is
        raised with the device's own error, and the focus restored (also with retries; if
        that fails too, a note on the ``DeviceFault`` says so).
    md
        Extra metadata for the start document.

    Returns
    -------
    AutofocusResult
        Also recorded: every (z, blur) pair and blur map in stream ``deepfocus_scores``,
        the decision in stream ``autofocus_result``.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> from bluesky_deepfocus import DeepFocusScorer
    >>> from bluesky_deepfocus.devices import MMCamera, MMFocusStage
    >>> from bluesky_deepfocus.plans import autofocus_plan, calibration_plan
    >>> from bluesky_deepfocus.sim import get_simulation, simulated_microscope
    >>> core = simulated_microscope(specimen="tissue", sensor_shape=(256, 256), seed=1)
    >>> camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    >>> RE = RunEngine(call_returns_result=True)
    >>> scorer = DeepFocusScorer()
    >>> cal = RE(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result
    >>> get_simulation(core).set_true_focus(23.0)
    >>> result = RE(autofocus_plan(camera, focus, cal, scorer=scorer)).plan_result
    >>> abs(focus.position - 23.0) < 1.0
    True
    """
    _validate(min_images, max_images, on_failure, strategy, min_confidence)
    _check_retries(retries, retry_delay)
    field_tilt = _check_field_tilt(field_tilt)
    if strategy != "brent":
        calibration = _check_calibration(calibration, camera)
    settings_dict: dict[str, Any] = (
        dict((settings or DeepFocusSettings()).__dict__) if strategy == "deepfocus" else {}
    )
    extra = {
        **_provenance(
            camera,
            focus,
            calibration,
            scorer,
            strategy=strategy,
            settings=settings_dict,
            min_images=min_images,
            max_images=max_images,
            min_confidence=min_confidence,
            roi=roi,
            max_travel=max_travel,
            on_failure=on_failure,
        ),
        "prior": list(prior) if prior is not None else None,
        # (only the deepfocus search takes it)
        "field_tilt": list(field_tilt)
        if field_tilt is not None and strategy == "deepfocus"
        else None,
        "retries": retries,
    }
    _md = _base_md(
        "autofocus_plan",
        camera,
        focus,
        {
            "camera": repr(camera),
            "focus": repr(focus),
            "calibration": (calibration.uid or calibration.objective)
            if calibration is not None
            else None,
            "roi": roi,
            "min_images": min_images,
            "max_images": max_images,
            "on_failure": on_failure,
            "strategy": strategy,
            "max_travel": max_travel,
        },
        extra,
        md,
    )
    _md["hints"] = {"dimensions": [([focus.name], "primary")]}

    def inner(uid: str) -> Generator[Msg, Any, AutofocusResult]:
        session = _Session("primary", SCORES_STREAM, RESULT_STREAM)
        session.run_uid = uid
        result = yield from autofocus_stub(
            camera,
            focus,
            calibration,
            scorer=scorer,
            roi=roi,
            min_images=min_images,
            max_images=max_images,
            on_failure=on_failure,
            strategy=strategy,
            max_travel=max_travel,
            min_confidence=min_confidence,
            settings=settings,
            prior=prior,
            settle_time=settle_time,
            retries=retries,
            retry_delay=retry_delay,
            field_tilt=field_tilt,
            _session=session,
        )
        return result

    plan = _safe_focus(
        focus,
        lambda: _run_returning(inner, _md),
        restore_on_error=True,
        retries=retries,
        retry_delay=retry_delay,
    )
    return (yield from bpp.stage_wrapper(plan, [camera, focus]))


def _safe_focus(
    focus: Any,
    make_plan: Any,
    *,
    restore_on_error: bool,
    retries: int = 2,
    retry_delay: float = 0.5,
) -> Generator[Msg, Any, Any]:
    """Run a plan; on error, abort, stop or Ctrl-C put the focus back where it started
    (with the retry policy; a failed restore is noted on the error, never replaces it)."""
    z0 = float(focus.position) if hasattr(focus, "position") else None

    def restore(exc: Exception) -> Generator[Msg, Any, None]:
        yield from _restore_focus(exc, focus, z0, retries, retry_delay)

    return (
        (yield from bpp.contingency_wrapper(make_plan(), except_plan=restore, auto_raise=True))
        if restore_on_error
        else (yield from make_plan())
    )


def calibration_plan(
    camera: Any,
    focus: Any,
    start: float,
    stop: float,
    num: int,
    *,
    scorer: FocusFunction,
    roi: ROI | None = None,
    settle_time: float = 0.0,
    min_r2: float = 0.9,
    retries: int = 2,
    retry_delay: float = 0.5,
    md: Mapping[str, Any] | None = None,
) -> Generator[Msg, Any, Calibration]:
    """Acquire a relative z-stack of a flat object and fit the instrument's calibration.

    Like ``rel_scan``: positions ``start..stop`` (``num`` of them) relative to the current
    focus; the focus is returned to where it was, also on error, abort or Ctrl-C.

    Returns
    -------
    Calibration
        Also stored: every (z, blur) pair in stream ``deepfocus_scores`` and the fitted
        calibration (JSON) in stream ``calibration_result``; rebuild it with
        :meth:`Calibration.from_run(catalog[uid]) <bluesky_deepfocus.Calibration.from_run>`.

    Raises
    ------
    CalibrationError
        No minimum inside the range, or a fit too poor to trust (the message says what to
        change); the run is closed as failed and the focus restored.
    ValueError
        Bad arguments, or positions outside the focus limits (before any motion).
    DeviceFault
        A move or snap still failing after ``retries`` retries ``retry_delay`` s apart
        (every move is retried, the return to the start position too).
    """
    if not isinstance(num, int) or num < 7:
        raise ValueError(f"num={num!r} must be an integer >= 7 (use ~121 over +/-13 DOF).")
    _check_retries(retries, retry_delay)
    if scorer.higher_is_sharper:
        raise ValueError(
            f"calibration_plan needs the DeepFocus blur score (lower is sharper); got the focus "
            f"function {scorer.name!r}. Pass scorer=DeepFocusScorer()."
        )
    if not (math.isfinite(start) and math.isfinite(stop) and start < stop):
        raise ValueError(
            f"Need finite start < stop (relative um), got start={start!r}, stop={stop!r}."
        )
    z0 = float(focus.position)
    lo, hi = _limits_of(focus)
    if z0 + start < lo or z0 + stop > hi:
        raise ValueError(
            f"The calibration stack {z0 + start:.2f}..{z0 + stop:.2f} um leaves the focus limits "
            f"{(lo, hi)!r}: narrow start/stop or move closer to the middle of the range. Nothing moved."
        )
    objective = str(_config_value(camera, "objective") or "")
    px = _config_value(camera, "pixel_size_um")
    extra = {
        "objective": objective,
        "pixel_size_um": float(px) if px else None,
        "model_id": getattr(scorer, "model_id", scorer.name),
        "model_sha256": getattr(scorer, "model_sha256", ""),
        "scorer": scorer.describe(),
        "roi": list(roi) if roi is not None else None,
        "start_z": z0,
        "start": start,
        "stop": stop,
        "num": num,
    }
    _md = _base_md(
        "calibration_plan",
        camera,
        focus,
        {
            "camera": repr(camera),
            "focus": repr(focus),
            "start": start,
            "stop": stop,
            "num": num,
            "roi": roi,
        },
        extra,
        md,
    )
    positions = z0 + np.linspace(start, stop, num)

    def inner(uid: str) -> Generator[Msg, Any, Calibration]:
        session = _Session("primary", SCORES_STREAM, CALIBRATION_STREAM)
        session.run_uid = uid
        record = _ScoreRecord(name="deepfocus_scores")
        old_roi = scorer.roi
        scorer.roi = roi
        zs: list[float] = []
        bs: list[float] = []
        specs: list[Any] = []

        def stack() -> Generator[Msg, Any, None]:
            for z in positions:
                obs, _ = yield from _measure(
                    camera,
                    focus,
                    scorer,
                    float(z),
                    roi,
                    session,
                    session.counter,
                    record,
                    settle_time,
                    retries,
                    retry_delay,
                )
                zs.append(obs.z)
                bs.append(obs.blur)
                specs.append(obs.spectrum)

        def cleanup() -> Generator[Msg, Any, None]:
            yield from bps.unsubscribe(token)
            scorer.roi = old_roi

        def forward(name: str, doc: dict[str, Any]) -> None:
            scorer(name, doc)

        token = yield from bps.subscribe("all", forward)
        yield from bpp.finalize_wrapper(stack(), cleanup)
        del forward
        yield from _move(
            focus,
            z0,
            retries=retries,
            retry_delay=retry_delay,
            what=f"return the focus to its start position z={z0!r} um",
        )
        dof = _dof_guess(objective)
        cal = Calibration.from_stack(
            zs,
            bs,
            specs,
            objective=objective,
            pixel_size_um=float(px) if px else float("nan"),
            dof_um=dof,
            model_id=getattr(scorer, "model_id", scorer.name),
            model_sha256=getattr(scorer, "model_sha256", ""),
            scorer=scorer.name,
            min_r2=min_r2,
            uid=uid,
            metadata={"roi": list(roi) if roi is not None else None, "start_z": z0},
        )
        rec = _CalibrationRecord(name="calibration")
        rec.calibration.put(json.dumps(cal.to_dict()))
        rec.fwhm_um.put(cal.fwhm_um)
        rec.focus_um.put(cal.focus_um)
        rec.moffat_r2.put(cal.moffat_r2)
        yield from _emit(CALIBRATION_STREAM, rec)
        return cal

    plan = _safe_focus(
        focus,
        lambda: _run_returning(inner, _md),
        restore_on_error=True,
        retries=retries,
        retry_delay=retry_delay,
    )
    return (yield from bpp.stage_wrapper(plan, [camera, focus]))


def _dof_guess(objective: str) -> float:
    """Depth of field of a preset objective; NaN (estimated from the Moffat fit) otherwise."""
    from bluesky_deepfocus.optics import OBJECTIVES

    if objective in OBJECTIVES:
        return OBJECTIVES[objective].dof_um
    return float("nan")
