"""Autofocus composed into other plans: a scan hook, a refocusing preprocessor, a timelapse.

Everything here runs :func:`~bluesky_deepfocus.plans.autofocus_stub` inside a host run,
so the host's ``primary`` stream keeps its meaning (the data) and every refocus is
recorded next to it, in streams named after ``stream_prefix`` (default ``"autofocus"``):

``autofocus_refocus``
    one event per refocus, *why* it happened: ``reason`` (``"first"``, ``"every"``,
    ``"drift"``), the ``seq_num`` of the primary event it precedes, the warm-start prior
    (``prior_z``, ``prior_sd``; NaN for a cold start), the slide tilt learned from
    earlier tiles (``tilt_prior_x``, ``tilt_prior_y``, ``tilt_prior_sd``, um across the
    field; NaN when none: always, except in :func:`refocus_per_step`) and, for drift
    detection, the blur that triggered it and the reference blur.
``autofocus_images`` / ``autofocus_scores`` / ``autofocus_result``
    the images, (z, blur) pairs and decision of each refocus, as written by the stub.

Warm starts
    After the first refocus of a run, each refocus passes ``prior=(z, sd)`` to the search:
    ``z`` is the final focus of the previous successful refocus (for a scan hook, of the
    nearest previous position), and ``sd`` grows with what may have changed since::

        sd = max(prior_sd, max_drift_rate * seconds_since_that_refocus,
                 max_tilt * distance_to_that_position)       # (scan hook only)

    ``prior_sd`` defaults to a quarter of the calibration's depth of field (below that
    the image barely changes). A prior wider than half the calibration's z range carries
    no information and the refocus starts cold. Failed refocuses are never used as priors.
    A warm-started refocus uses at most :data:`WARM_MAX_IMAGES` (3) images and may stop
    after 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg, MsgGenerator, make_decorator
from ophyd import Component as Cpt
from ophyd import Device, Signal

from bluesky_deepfocus.calibration import Calibration
from bluesky_deepfocus.results import AutofocusResult
from bluesky_deepfocus.schema import MD_KEY
from bluesky_deepfocus.scoring import FocusFunction
from bluesky_deepfocus.search import (
    PLANE_INLIER_DOF,
    DeepFocusSettings,
    FieldPlane,
    field_plane,
    pool_field_tilts,
)

from ._autofocus import (
    _check_calibration,
    _check_retries,
    _emit,
    _limits_of,
    _move,
    _provenance,
    _run_returning,
    _Session,
    _validate,
    autofocus_stub,
)

__all__ = [
    "RefocusPerStep",
    "refocus_decorator",
    "refocus_per_step",
    "refocus_wrapper",
    "timelapse_plan",
]

#: Largest focus drift assumed by default when widening a warm-start prior (um/s).
DEFAULT_MAX_DRIFT_RATE = 0.05
#: Largest focus change per um of stage travel assumed by default (a ~1 degree tilt).
DEFAULT_MAX_TILT = 0.02

# autofocus_stub keywords that the composition sets itself
_OWN_KEYWORDS = ("camera", "focus", "calibration", "scorer", "prior", "field_tilt")
_STUB_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(autofocus_stub).parameters.items()
    if p.default is not inspect.Parameter.empty
    and not name.startswith("_")
    and name not in _OWN_KEYWORDS
}


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------
def _check_count(value: Any, what: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what}={value!r} must be an integer >= 1 ({hint}).")
    return int(value)


def _real(value: Any) -> float:
    """``value`` as a float if it is a real number (not a bool), else NaN."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def _check_nonnegative(value: Any, what: str, unit: str) -> float:
    v = _real(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{what}={value!r} must be a finite number >= 0 ({unit}).")
    return v


def _check_autofocus_kwargs(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """All autofocus settings (defaults filled in), validated before anything runs."""
    if "prior" in kwargs:
        raise ValueError(
            f"prior={kwargs['prior']!r} cannot be given to {where}: every refocus sets its own "
            "warm-start prior from the previous result. Tune it with prior_sd=..., "
            "max_drift_rate=... or turn it off with warm_start=False."
        )
    if "field_tilt" in kwargs:
        why = (
            "it learns the slide's tilt from the tiles it has focused (learn_tilt=True)"
            if where == "refocus_per_step"
            else "it refocuses one field, whose own focus map gives its tilt"
        )
        raise ValueError(
            f"field_tilt={kwargs['field_tilt']!r} cannot be given to {where}: {why}; pass "
            "field_tilt to autofocus_plan / autofocus_stub directly."
        )
    unknown = sorted(set(kwargs) - set(_STUB_DEFAULTS))
    if unknown:
        raise TypeError(
            f"{where} got unexpected autofocus keyword(s) {unknown!r}; autofocus_stub "
            f"accepts {sorted(_STUB_DEFAULTS)!r}."
        )
    settings = {**_STUB_DEFAULTS, **kwargs}
    _validate(
        settings["min_images"],
        settings["max_images"],
        settings["on_failure"],
        settings["strategy"],
        settings["min_confidence"],
    )
    travel = settings["max_travel"]
    if travel is not None and not (math.isfinite(_real(travel)) and _real(travel) > 0):
        raise ValueError(
            f"max_travel={travel!r} must be a positive number of um (or None for the "
            "calibration's half range)."
        )
    _check_nonnegative(settings["settle_time"], "settle_time", "seconds after each move")
    _check_retries(settings["retries"], settings["retry_delay"])
    prefix = settings["stream_prefix"]
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(
            f"stream_prefix={prefix!r} must be a non-empty identifier such as 'autofocus' "
            "(stream names are built from it)."
        )
    return settings


def _check_warm_start(
    calibration: Calibration | None, prior_sd: float | None, max_drift_rate: float
) -> float:
    """The prior spread at zero elapsed time / distance (um)."""
    _check_nonnegative(max_drift_rate, "max_drift_rate", "um of focus drift per second")
    if prior_sd is not None:
        sd = _real(prior_sd)
        if not (math.isfinite(sd) and sd > 0):
            raise ValueError(
                f"prior_sd={prior_sd!r} must be a positive number of um (or None for a quarter "
                "of the calibration's depth of field)."
            )
        return sd
    dof = calibration.dof_um if calibration is not None else float("nan")
    return 0.25 * dof if math.isfinite(dof) and dof > 0 else 1.0


def _prepare(
    where: str,
    camera: Any,
    calibration: Calibration | None,
    scorer: Any,
    autofocus_kwargs: Mapping[str, Any],
) -> tuple[Calibration | None, dict[str, Any]]:
    if not isinstance(scorer, FocusFunction):
        raise TypeError(
            f"scorer={scorer!r} must be a focus function such as "
            "bluesky_deepfocus.DeepFocusScorer()."
        )
    settings = _check_autofocus_kwargs(autofocus_kwargs, where)
    if settings["strategy"] != "brent":
        calibration = _check_calibration(calibration, camera)
    return calibration, settings


def _deepfocus_md(
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    scorer: Any,
    settings: Mapping[str, Any],
    refocus: Mapping[str, Any],
) -> dict[str, Any]:
    """What a later reader needs to redo the refocuses (the start document's ``deepfocus``)."""
    deepfocus_settings = settings.get("settings")
    return {
        **_provenance(
            camera,
            focus,
            calibration,
            scorer,
            strategy=settings["strategy"],
            settings=deepfocus_settings.__dict__ if deepfocus_settings else {},
            min_images=settings["min_images"],
            max_images=settings["max_images"],
            min_confidence=settings["min_confidence"],
            roi=settings["roi"],
            max_travel=settings["max_travel"],
            on_failure=settings["on_failure"],
        ),
        "refocus": dict(refocus),
    }


# --------------------------------------------------------------------------------------
# one host run: counters, records, warm starts
# --------------------------------------------------------------------------------------
class _RefocusRecord(Device):
    """Why a refocus happened, read into ``f"{stream_prefix}_refocus"``."""

    reason = Cpt(Signal, value="")
    seq_num = Cpt(Signal, value=0)
    prior_z = Cpt(Signal, value=float("nan"))
    prior_sd = Cpt(Signal, value=float("nan"))
    # the slide tilt (um across the field) learned from earlier tiles; NaN: none
    tilt_prior_x = Cpt(Signal, value=float("nan"))
    tilt_prior_y = Cpt(Signal, value=float("nan"))
    tilt_prior_sd = Cpt(Signal, value=float("nan"))
    last_blur = Cpt(Signal, value=float("nan"))
    reference_blur = Cpt(Signal, value=float("nan"))

    def update(self, **values: Any) -> None:
        now = time.time()
        for k, v in values.items():
            getattr(self, k).put(v, timestamp=now)


class _Refocuser:
    """Runs autofocus stubs inside ONE host run.

    One :class:`_Session` per run and stream prefix keeps the image counter of the
    ``*_images`` stream increasing across refocuses (the stub looks up the score of
    its n-th image by that counter), and one set of record devices keeps each stream's
    descriptor valid (bluesky refuses a second device object under the same stream).
    """

    def __init__(
        self,
        camera: Any,
        focus: Any,
        calibration: Calibration | None,
        scorer: FocusFunction,
        settings: Mapping[str, Any],
        run_uid: str | None,
    ) -> None:
        self.camera, self.focus, self.calibration, self.scorer = camera, focus, calibration, scorer
        prefix = settings["stream_prefix"]
        self.stub_kwargs = {k: v for k, v in settings.items() if k != "stream_prefix"}
        self.session = _Session(f"{prefix}_images", f"{prefix}_scores", f"{prefix}_result")
        self.session.run_uid = run_uid
        self.refocus_stream = f"{prefix}_refocus"
        self.record = _RefocusRecord(name=self.refocus_stream)
        self.history: list[tuple[AutofocusResult, float]] = []  # result, monotonic end time

    @property
    def results(self) -> list[AutofocusResult]:
        return [r for r, _ in self.history]

    @property
    def last_success(self) -> tuple[AutofocusResult, float] | None:
        """The latest converged result and when it ended (``time.monotonic``)."""
        ok = [h for h in self.history if h[0].status == "converged"]
        return ok[-1] if ok else None

    def refocus(
        self,
        reason: str,
        *,
        prior: tuple[float, float] | None,
        seq_num: int,
        last_blur: float = float("nan"),
        reference_blur: float = float("nan"),
        field_tilt: tuple[float, float, float] | None = None,
    ) -> MsgGenerator[AutofocusResult]:
        tilt = field_tilt if field_tilt is not None else (math.nan,) * 3
        self.record.update(
            reason=reason,
            seq_num=int(seq_num),
            prior_z=float(prior[0]) if prior else float("nan"),
            prior_sd=float(prior[1]) if prior else float("nan"),
            tilt_prior_x=float(tilt[0]),
            tilt_prior_y=float(tilt[1]),
            tilt_prior_sd=float(tilt[2]),
            last_blur=float(last_blur),
            reference_blur=float(reference_blur),
        )
        yield from _emit(self.refocus_stream, self.record)
        kwargs = dict(self.stub_kwargs)
        if prior is not None:  # warm start: a small budget is enough (WARM_MAX_IMAGES)
            kwargs["max_images"] = min(int(kwargs.get("max_images", 8)), WARM_MAX_IMAGES)
            kwargs["min_images"] = min(int(kwargs.get("min_images", 3)), 2, kwargs["max_images"])
        stub = autofocus_stub(
            self.camera,
            self.focus,
            self.calibration,
            scorer=self.scorer,
            prior=prior,
            field_tilt=field_tilt,
            _session=self.session,
            **kwargs,
        )
        result: AutofocusResult = yield from stub
        if not self.session.run_uid:  # learn the host run's uid from the scored images
            latest = self.scorer.latest
            if latest is not None and latest.stream == self.session.images_stream:
                self.session.run_uid = latest.run_uid or None
        if not result.run_uid and self.session.run_uid:
            result = dataclasses.replace(result, run_uid=self.session.run_uid)
        self.history.append((result, time.monotonic()))
        return result


WARM_MAX_IMAGES = 3
"""Image budget of a warm-started refocus (the search starts from the last result)."""


class _WarmStart:
    """The warm-start policy (see the module docstring)."""

    def __init__(
        self,
        calibration: Calibration | None,
        *,
        enabled: bool,
        strategy: str,
        prior_sd: float | None,
        max_drift_rate: float,
        max_tilt: float = 0.0,
    ) -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"warm_start={enabled!r} must be True or False.")
        self.enabled = enabled and strategy == "deepfocus"  # the only search taking a prior
        self.sd0 = _check_warm_start(calibration, prior_sd, max_drift_rate)
        self.max_drift_rate = float(max_drift_rate)
        self.max_tilt = _check_nonnegative(max_tilt, "max_tilt", "um of focus per um of travel")
        if calibration is not None:
            lo, hi = calibration.z_range
            self.max_sd = 0.5 * (hi - lo)
        else:
            self.max_sd = 0.0  # no calibration ("brent"): no prior either

    def prior(self, z: float, since_s: float, distance: float = 0.0) -> tuple[float, float] | None:
        if not self.enabled:
            return None
        sd = max(self.sd0, self.max_drift_rate * since_s, self.max_tilt * distance)
        return (float(z), float(sd)) if sd <= self.max_sd else None

    def settings(self) -> dict[str, Any]:
        return {
            "warm_start": self.enabled,
            "prior_sd": self.sd0,
            "max_drift_rate": self.max_drift_rate,
            "max_tilt": self.max_tilt,
        }


# --------------------------------------------------------------------------------------
# per_step hook
# --------------------------------------------------------------------------------------
def _coordinates(step: Mapping[Any, Any]) -> dict[str, float]:
    return {
        getattr(m, "name", repr(m)): float(p)
        for m, p in step.items()
        if isinstance(p, numbers.Real) and math.isfinite(float(p))
    }


def _distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    common = a.keys() & b.keys()
    return math.sqrt(sum((a[k] - b[k]) ** 2 for k in common)) if common else 0.0


class RefocusPerStep:
    """A ``per_step`` hook that refocuses at scan points (see :func:`refocus_per_step`).

    Attributes
    ----------
    results
        :class:`~bluesky_deepfocus.AutofocusResult` of every refocus of the latest scan.
    positions
        The scan motors' positions (name -> value) of each of those refocuses.
    planes
        The focus-map planes of this scan's converged tiles (what the slide's tilt is
        learned from; see ``learn_tilt`` of :func:`refocus_per_step`).
    md
        Start-document metadata describing the refocusing (calibration uid, model,
        algorithm, warm-start policy); pass it on: ``grid_scan(..., md=hook.md)``.
    """

    def __init__(
        self,
        camera: Any,
        focus: Any,
        calibration: Calibration | None,
        *,
        scorer: FocusFunction,
        every: int,
        warm: _WarmStart,
        settings: Mapping[str, Any],
        learn_tilt: bool = True,
    ) -> None:
        self.camera, self.focus, self.calibration, self.scorer = camera, focus, calibration, scorer
        self.every = every
        self.warm = warm
        self.settings = dict(settings)
        tuning = self.settings.get("settings")
        self.learn_tilt = bool(
            learn_tilt
            and calibration is not None
            and self.settings["strategy"] == "deepfocus"
            and isinstance(tuning, DeepFocusSettings)
            and tuning.focus_at == "centre"
        )
        self._pos_cache: Any = None
        self._steps = 0
        self._refocuser = self._new_refocuser()
        self.positions: list[dict[str, float]] = []
        self.planes: list[FieldPlane] = []

    def _new_refocuser(self) -> _Refocuser:
        return _Refocuser(
            self.camera, self.focus, self.calibration, self.scorer, self.settings, None
        )

    @property
    def results(self) -> list[AutofocusResult]:
        return list(self._refocuser.results)

    @property
    def md(self) -> dict[str, Any]:
        policy = {
            "kind": "per_step",
            "every": self.every,
            **self.warm.settings(),
            "learn_tilt": self.learn_tilt,
        }
        return {
            MD_KEY: _deepfocus_md(
                self.camera, self.focus, self.calibration, self.scorer, self.settings, policy
            )
        }

    def __repr__(self) -> str:
        cal = self.calibration.uid or self.calibration.objective if self.calibration else None
        return (
            f"refocus_per_step(camera={self.camera.name!r}, focus={self.focus.name!r}, "
            f"calibration={cal!r}, every={self.every!r})"
        )

    def __call__(
        self,
        detectors: Sequence[Any],
        step: Mapping[Any, Any],
        pos_cache: dict[Any, Any],
        take_reading: Callable[..., MsgGenerator[Any]] | None = None,
    ) -> MsgGenerator[None]:
        """Move to ``step``, refocus if due, read detectors, motors and focus to primary."""
        return self._per_step(detectors, step, pos_cache, take_reading)

    def _per_step(
        self,
        detectors: Sequence[Any],
        step: Mapping[Any, Any],
        pos_cache: dict[Any, Any],
        take_reading: Callable[..., MsgGenerator[Any]] | None,
    ) -> MsgGenerator[None]:
        if any(m is self.focus for m in step):
            raise ValueError(
                f"The focus {self.focus.name!r} is a motor of this scan: refocusing would undo "
                "the scan's focus positions. Scan other motors, or drop the per_step hook."
            )
        if pos_cache is not self._pos_cache:  # scan_nd makes a new pos_cache per scan (run)
            self._pos_cache = pos_cache
            self._steps = 0
            self._refocuser = self._new_refocuser()
            self.positions = []
            self.planes = []
        yield from bps.move_per_step(step, pos_cache)
        index = self._steps
        self._steps += 1
        if index % self.every == 0:
            here = _coordinates(step)
            prior = self._prior_at(here)
            if prior is not None:  # start where the nearest earlier point was in focus
                lo, hi = _limits_of(self.focus)  # (a readback may sit a hair past a limit)
                yield from _move(
                    self.focus,
                    min(max(prior[0], lo), hi),
                    retries=self.settings["retries"],
                    retry_delay=self.settings["retry_delay"],
                    what=f"move the focus to the warm start z={prior[0]!r} um",
                )
            result = yield from self._refocuser.refocus(
                "first" if index == 0 else "every",
                prior=prior,
                seq_num=index + 1,
                field_tilt=pool_field_tilts(self.planes) if self.learn_tilt else None,
            )
            self.positions.append(here)
            self._learn_plane(result)
        readables = [*detectors, *step]
        if not any(r is self.focus for r in readables):
            readables.append(self.focus)  # record the z of every image
        reader = take_reading if take_reading is not None else bps.trigger_and_read
        yield from reader(readables)

    def _learn_plane(self, result: AutofocusResult) -> None:
        """Keep the plane of a converged tile's focus map (its own tilt estimate)."""
        if not self.learn_tilt or result.status != "converged" or result.focus_map is None:
            return
        assert self.calibration is not None  # (learn_tilt needs one)
        plane = field_plane(result.focus_map, PLANE_INLIER_DOF * self.calibration.dof_um)
        if plane is not None:
            self.planes.append(plane)

    def _prior_at(self, here: Mapping[str, float]) -> tuple[float, float] | None:
        now = time.monotonic()
        best: tuple[float, float, float] | None = None  # distance, final z, time
        for pos, (result, t) in zip(self.positions, self._refocuser.history, strict=True):
            if result.status != "converged":
                continue
            d = _distance(here, pos)
            if best is None or d < best[0]:
                best = (d, result.final_z, t)
        if best is None:
            return None
        return self.warm.prior(best[1], now - best[2], best[0])


def refocus_per_step(
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    *,
    scorer: FocusFunction,
    every: int = 1,
    warm_start: bool = True,
    prior_sd: float | None = None,
    max_drift_rate: float = DEFAULT_MAX_DRIFT_RATE,
    max_tilt: float = DEFAULT_MAX_TILT,
    focus_at: str = "centre",
    learn_tilt: bool = True,
    **autofocus_kwargs: Any,
) -> RefocusPerStep:
    """A ``per_step`` hook for ``scan_nd`` / ``grid_scan`` / ``list_scan`` that refocuses.

    At each scan point it moves the motors (``bps.move_per_step``, as
    :func:`bluesky.plan_stubs.one_nd_step` does), refocuses at the first point and then
    at every ``every``-th one (:func:`~bluesky_deepfocus.plans.autofocus_stub`: no new
    run, its records go to streams ``autofocus_refocus``, ``autofocus_images``,
    ``autofocus_scores`` and ``autofocus_result`` of the scan's run), then reads the
    detectors, the scan motors and the focus into ``primary``.

    Each refocus after the first is warm-started from the nearest earlier scan point
    that refocused successfully (nearest in the scan motors' coordinates, e.g. the
    neighbouring tile of a slide): the focus first moves to that point's final z, and
    the search gets ``prior=(z, sd)`` with
    ``sd = max(prior_sd, max_drift_rate * seconds_since, max_tilt * distance)``.

    Parameters
    ----------
    camera, focus
        The camera whose images are scored and the focus positioner (not a scan motor).
    calibration
        The :class:`~bluesky_deepfocus.Calibration` of the objective in use.
    scorer
        The focus function (subscribed by each refocus for its duration).
    every
        Refocus at scan points 0, ``every``, ``2 * every``, ...
    warm_start
        ``False`` starts every search cold.
    prior_sd
        Prior spread (um) at the same place and time; default a quarter of the
        calibration's depth of field.
    max_drift_rate
        Largest focus drift expected (um/s); widens the prior with the time since.
    max_tilt
        Largest focus change per um of motor travel expected (slide tilt, um/um);
        widens the prior with the distance to the earlier point.
    focus_at
        ``"centre"`` (default): a tile is placed by its centre, so on a tilted slide the
        focus goes to the field centre (the plane fitted to the per-patch focus map, when
        it tilts by >= 0.3 DOF across the field), not to wherever the tile's detail is;
        ``"detail"``: where the image's detail is (as :func:`autofocus_plan`). Sets
        :attr:`DeepFocusSettings.focus_at <bluesky_deepfocus.DeepFocusSettings>` of the
        ``settings`` passed (ignored by the other strategies).
    learn_tilt
        With ``focus_at="centre"``: each refocus after the first gets the slide's tilt
        as seen across the field, pooled from the focus-map planes of the tiles focused
        so far (:func:`~bluesky_deepfocus.search.pool_field_tilts`: the camera sees a
        planar slide's tilt the same way in every tile), as a prior on the slopes of its
        own plane (``field_tilt`` of :func:`~bluesky_deepfocus.plans.autofocus_stub`),
        so that a tile with few informative patches (sparse cells, beads) is placed by
        its centre rather than by wherever its detail is. Recorded per refocus
        (``tilt_prior_x``, ``tilt_prior_y``, ``tilt_prior_sd`` in stream
        ``autofocus_refocus``). ``False``: every tile's plane from its own map alone.
    **autofocus_kwargs
        Passed to :func:`~bluesky_deepfocus.plans.autofocus_stub` (``roi``,
        ``min_images``, ``max_images``, ``on_failure``, ``strategy``, ``max_travel``,
        ``min_confidence``, ``settings``, ``settle_time``, ``stream_prefix``).

    Returns
    -------
    RefocusPerStep
        The hook; after the scan, ``hook.results`` holds every refocus result and
        ``hook.md`` the metadata to pass to the scan.

    Raises
    ------
    ValueError, TypeError, CalibrationError
        Bad arguments (checked now, before any run), or the focus used as a scan motor
        (at the first step).

    Examples
    --------
    >>> import bluesky.plans as bp
    >>> from bluesky import RunEngine
    >>> from bluesky_deepfocus import DeepFocusScorer
    >>> from bluesky_deepfocus.devices import MMCamera, MMFocusStage, MMXYStage
    >>> from bluesky_deepfocus.plans import calibration_plan, refocus_per_step
    >>> from bluesky_deepfocus.sim import simulated_microscope
    >>> core = simulated_microscope(sensor_shape=(256, 256), tilt=(0.01, 0.0), seed=1)
    >>> camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    >>> xy = MMXYStage(core, name="xy")
    >>> RE = RunEngine(call_returns_result=True)
    >>> scorer = DeepFocusScorer()
    >>> cal = RE(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result
    >>> hook = refocus_per_step(camera, focus, cal, scorer=scorer)
    >>> _ = RE(bp.grid_scan([camera], xy.y, -150, 150, 2, xy.x, -150, 150, 2,
    ...                     per_step=hook, md=hook.md))
    >>> len(hook.results)
    4
    """
    if autofocus_kwargs.get("strategy", _STUB_DEFAULTS["strategy"]) == "deepfocus":
        base = autofocus_kwargs.get("settings") or DeepFocusSettings()
        if isinstance(base, DeepFocusSettings):  # (anything else: _prepare says what to pass)
            autofocus_kwargs["settings"] = dataclasses.replace(base, focus_at=focus_at)
    calibration, settings = _prepare(
        "refocus_per_step", camera, calibration, scorer, autofocus_kwargs
    )
    every = _check_count(every, "every", "refocus at every N-th scan point")
    warm = _WarmStart(
        calibration,
        enabled=warm_start,
        strategy=settings["strategy"],
        prior_sd=prior_sd,
        max_drift_rate=max_drift_rate,
        max_tilt=max_tilt,
    )
    if not isinstance(learn_tilt, bool):
        raise ValueError(f"learn_tilt={learn_tilt!r} must be True or False.")
    return RefocusPerStep(
        camera,
        focus,
        calibration,
        scorer=scorer,
        every=every,
        warm=warm,
        settings=settings,
        learn_tilt=learn_tilt,
    )


# --------------------------------------------------------------------------------------
# preprocessor: refocus every N primary events and/or when the blur drifts
# --------------------------------------------------------------------------------------
class _RefocusMutator:
    """``msg_proc`` of :func:`refocus_wrapper` for ``bpp.plan_mutator`` (one instance per plan).

    A refocus due for the next primary event goes before the first ``trigger`` of the
    acquisition that makes it (after the motors of a scan step moved), so the detectors
    are triggered at the new focus; an event made without triggers (read-only
    detectors) gets it before its ``create``.
    """

    def __init__(
        self,
        camera: Any,
        focus: Any,
        calibration: Calibration | None,
        scorer: FocusFunction,
        settings: Mapping[str, Any],
        *,
        every: int | None,
        drift_threshold: float | None,
        warm: _WarmStart,
        extra_md: Mapping[str, Any],
    ) -> None:
        self.camera, self.focus, self.calibration, self.scorer = camera, focus, calibration, scorer
        self.settings = settings
        self.every = every
        self.drift_threshold = drift_threshold
        self.warm = warm
        self.extra_md = dict(extra_md)
        self.busy = False  # our own inserted messages pass through untouched
        self.token: Any = None
        self.old_roi: Any = None
        self._reset(None)

    # -- run state -----------------------------------------------------------------
    def _reset(self, run_uid: str | None) -> None:
        self.run_uid = run_uid
        self.refocuser = (
            _Refocuser(
                self.camera, self.focus, self.calibration, self.scorer, self.settings, run_uid
            )
            if run_uid
            else None
        )
        self.n_primary = 0  # primary events saved in this run
        self.bundle: str | None = None  # name of the open event bundle
        self.acquiring = False  # triggered devices for the next event already
        self.focused_ahead = False  # refocused for the coming primary event already
        self.reference: float | None = None  # blur of the first primary event after a refocus
        self._decided_for = -1
        self._decision: tuple[str, float, float] | None = None

    def _blur_of_primary(self, seq_num: int) -> float:
        for item in reversed(list(self.scorer.results)):
            if (
                item.run_uid == self.run_uid
                and item.stream == "primary"
                and item.seq_num == seq_num
            ):
                return float(item.result.blur)
        raise RuntimeError(
            f"Drift detection found no score of primary event {seq_num} (run {self.run_uid!r}) "
            f"from {self.scorer.name!r}: read the camera into 'primary' with its image inline "
            "in the event, or refocus with every=N instead of drift_threshold."
        )

    def _decide(self) -> tuple[str, float, float] | None:
        """Whether (and why) to refocus before the next primary event; once per event."""
        n = self.n_primary
        if self._decided_for == n:
            return self._decision
        self._decided_for = n
        reason, blur, ref = None, float("nan"), float("nan")
        if self.drift_threshold is not None and n > 0:
            blur = self._blur_of_primary(n)
            if math.isfinite(blur):
                if self.reference is None:
                    self.reference = blur
                elif blur - self.reference > self.drift_threshold:
                    reason = "drift"
            ref = self.reference if self.reference is not None else float("nan")
        if n == 0:
            reason = "first"
        elif self.every is not None and n % self.every == 0:
            reason = "every"
        self._decision = (reason, blur, ref) if reason else None
        return self._decision

    def _refocus(self, decision: tuple[str, float, float]) -> MsgGenerator[AutofocusResult]:
        assert self.refocuser is not None
        reason, blur, ref = decision
        prior = None
        last = self.refocuser.last_success
        if last is not None:
            prior = self.warm.prior(last[0].final_z, time.monotonic() - last[1])
        result = yield from self.refocuser.refocus(
            reason, prior=prior, seq_num=self.n_primary + 1, last_blur=blur, reference_blur=ref
        )
        self.reference = None  # the next primary image sets the new reference
        return result

    # -- subscription of the scorer for drift detection ----------------------------------
    def _forward(self, name: str, doc: Mapping[str, Any]) -> None:
        self.scorer(name, doc)

    def _subscribe(self) -> MsgGenerator[None]:
        # a callable of our own: bluesky gives a callable subscribed twice one registration,
        # so the stub's unsubscribe of ``scorer`` itself would end ours too
        self.old_roi = self.scorer.roi
        self.scorer.roi = self.settings["roi"]
        self.token = yield from bps.subscribe("all", self._forward)

    def unsubscribe(self) -> MsgGenerator[None]:
        if self.token is not None:
            token, self.token = self.token, None
            self.scorer.roi = self.old_roi
            yield from bps.unsubscribe(token)

    # -- msg_proc ------------------------------------------------------------------------
    def _guarded(self, gen: MsgGenerator[Any], msg: Msg | None) -> MsgGenerator[Any]:
        """Yield ``gen`` (ours: not mutated again), then ``msg`` whose reply the plan gets."""
        self.busy = True
        try:
            yield from gen
        finally:
            self.busy = False
        if msg is not None:
            return (yield msg)
        return None

    def __call__(self, msg: Msg) -> tuple[MsgGenerator[Any] | None, MsgGenerator[Any] | None]:
        if self.busy:
            return None, None
        cmd = msg.command
        if cmd == "open_run":
            return self._on_open_run(msg)
        if cmd == "close_run":
            return self._guarded(self.unsubscribe(), msg), self._after_close()
        if self.run_uid is None:
            return None, None
        if cmd == "trigger" and self.bundle is None:
            first, self.acquiring = not self.acquiring, True
            decision = self._decide() if first and not self.focused_ahead else None
            if decision is not None:
                self.focused_ahead = True
                return self._guarded(self._refocus(decision), msg), None
        elif cmd == "create":
            self.bundle = msg.kwargs.get("name", "primary")
            if self.bundle == "primary":
                decision = None if self.focused_ahead else self._decide()
                self.focused_ahead = False  # consumed by this event
                if decision is not None:
                    return self._guarded(self._refocus(decision), msg), None
        elif cmd in ("save", "drop"):
            if cmd == "save" and self.bundle == "primary":
                self.n_primary += 1
            self.bundle = None
            self.acquiring = False
        return None, None

    def _on_open_run(self, msg: Msg) -> tuple[MsgGenerator[Any] | None, MsgGenerator[Any] | None]:
        kwargs = dict(msg.kwargs)
        kwargs.setdefault(MD_KEY, self.extra_md)
        opened = Msg("open_run", msg.obj, *msg.args, run=msg.run, **kwargs)

        def head() -> MsgGenerator[Any]:
            self.busy = True
            try:
                if self.drift_threshold is not None:  # before the start document: it names
                    yield from self._subscribe()  # the detectors whose images are scored
                uid = yield opened
            finally:
                self.busy = False
            self._reset(uid)
            return uid

        return head(), None

    def _after_close(self) -> MsgGenerator[None]:
        self._reset(None)
        return
        yield  # a generator


def refocus_wrapper(
    plan: MsgGenerator[Any],
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    *,
    scorer: FocusFunction,
    every: int | None = None,
    drift_threshold: float | None = None,
    warm_start: bool = True,
    prior_sd: float | None = None,
    max_drift_rate: float = DEFAULT_MAX_DRIFT_RATE,
    **autofocus_kwargs: Any,
) -> MsgGenerator[Any]:
    """Refocus inside a plan's runs: every N primary events and/or when the image blurs.

    A preprocessor (``bluesky.preprocessors.plan_mutator``): in every run of ``plan`` it
    inserts an :func:`~bluesky_deepfocus.plans.autofocus_stub` before the first primary
    event, then

    - ``every=N``: before primary events ``N``, ``2N``, ... (counted from 0);
    - ``drift_threshold=t``: before the next primary event once the DeepFocus blur (ROI
      score, ln blur radius) of the latest primary image rose more than ``t`` above that
      of the first primary image after the last refocus. The scorer is subscribed for
      the run to score the primary images (one CNN pass per image).

    A refocus goes before the triggers of the acquisition (after a scan step's moves),
    so the primary image is taken at the new focus. Refocuses are recorded in streams
    ``autofocus_refocus`` (why: ``"first"``, ``"every"``, ``"drift"``, with the blurs),
    ``autofocus_images``, ``autofocus_scores`` and ``autofocus_result`` of the same run;
    the start document gets the settings under ``"deepfocus"`` (unless the plan sets
    that key). Warm starts: the last successful refocus's final z with
    ``sd = max(prior_sd, max_drift_rate * seconds_since)``.

    Parameters
    ----------
    plan
        The plan to wrap (a generator), e.g. ``bp.count([camera], num=100, delay=60)``.
    camera, focus, calibration, scorer
        As for :func:`~bluesky_deepfocus.plans.autofocus_plan`.
    every
        Refocus before every N-th primary event.
    drift_threshold
        Refocus when the primary image's blur rose this much (ln units; 0.1 is a 10 %
        larger blur radius) above its value after the last refocus. Needs the DeepFocus
        blur score and images inline in the events.
    warm_start, prior_sd, max_drift_rate
        Warm-start policy, as for :func:`refocus_per_step`.
    **autofocus_kwargs
        Passed to :func:`~bluesky_deepfocus.plans.autofocus_stub`.

    Returns
    -------
    Any
        What ``plan`` returns.

    Raises
    ------
    ValueError, TypeError, CalibrationError
        Bad arguments, checked when called, before the plan starts (neither ``every``
        nor ``drift_threshold`` given, a non-positive threshold, unknown autofocus
        keywords).
    RuntimeError
        With ``drift_threshold``, when a primary image was not scored (images not
        inline in the events).

    Examples
    --------
    >>> import bluesky.plans as bp
    >>> from bluesky import RunEngine
    >>> from bluesky_deepfocus import DeepFocusScorer
    >>> from bluesky_deepfocus.devices import MMCamera, MMFocusStage
    >>> from bluesky_deepfocus.plans import calibration_plan, refocus_wrapper
    >>> from bluesky_deepfocus.sim import simulated_microscope
    >>> core = simulated_microscope(sensor_shape=(256, 256), seed=1)
    >>> camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    >>> RE = RunEngine(call_returns_result=True)
    >>> scorer = DeepFocusScorer()
    >>> cal = RE(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result
    >>> plan = refocus_wrapper(bp.count([camera], num=4), camera, focus, cal,
    ...                        scorer=scorer, every=2, drift_threshold=0.3)
    >>> RE(plan).exit_status
    'success'

    The decorator form: ``refocus_decorator(camera, focus, cal, scorer=scorer,
    every=2)(bp.count)([camera], num=4)``.
    """
    calibration, settings = _prepare(
        "refocus_wrapper", camera, calibration, scorer, autofocus_kwargs
    )
    if every is None and drift_threshold is None:
        raise ValueError(
            "refocus_wrapper needs every=N (refocus every N primary events) and/or "
            "drift_threshold=t (refocus when the blur rises by t ln units); neither was given."
        )
    if every is not None:
        every = _check_count(every, "every", "refocus before every N-th primary event")
    if drift_threshold is not None:
        threshold = _real(drift_threshold)
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(
                f"drift_threshold={drift_threshold!r} must be a positive number of ln units "
                "(e.g. 0.2: refocus when the blur radius grew by ~22 %), or None."
            )
        if scorer.higher_is_sharper:
            raise ValueError(
                f"drift_threshold needs the DeepFocus blur score (ln blur radius), but the "
                f"scorer {scorer.name!r} is a sharpness. Pass scorer=DeepFocusScorer(), or use "
                "every=N alone."
            )
        drift_threshold = threshold
    warm = _WarmStart(
        calibration,
        enabled=warm_start,
        strategy=settings["strategy"],
        prior_sd=prior_sd,
        max_drift_rate=max_drift_rate,
    )
    policy = {
        "kind": "wrapper",
        "every": every,
        "drift_threshold": drift_threshold,
        **warm.settings(),
    }
    mutator = _RefocusMutator(
        camera,
        focus,
        calibration,
        scorer,
        settings,
        every=every,
        drift_threshold=drift_threshold,
        warm=warm,
        extra_md=_deepfocus_md(camera, focus, calibration, scorer, settings, policy),
    )
    return bpp.finalize_wrapper(bpp.plan_mutator(plan, mutator), mutator.unsubscribe)


refocus_decorator = make_decorator(refocus_wrapper)


# --------------------------------------------------------------------------------------
# timelapse
# --------------------------------------------------------------------------------------
def timelapse_plan(
    camera: Any,
    focus: Any,
    calibration: Calibration | None,
    num: int,
    delay: float,
    *,
    scorer: FocusFunction,
    refocus_every: int = 1,
    warm_start: bool = True,
    prior_sd: float | None = None,
    max_drift_rate: float = DEFAULT_MAX_DRIFT_RATE,
    md: Mapping[str, Any] | None = None,
    **autofocus_kwargs: Any,
) -> MsgGenerator[list[AutofocusResult]]:
    """A timelapse that keeps the sample in focus: one run, ``num`` frames.

    Each frame: a checkpoint, a refocus (:func:`~bluesky_deepfocus.plans.autofocus_stub`;
    at frame 0 and then every ``refocus_every`` frames), one image of the camera with the
    focus readback in ``primary``, then a wait so that frames start ``delay`` seconds
    apart (as ``bp.count``; none after the last frame, none when a frame took longer).

    The first refocus starts cold; the next ones are warm-started from the last
    successful one: ``prior=(its final z, sd)`` with
    ``sd = max(prior_sd, max_drift_rate * seconds_since_it)``; ``prior_sd`` defaults to
    a quarter of the calibration's depth of field, so short delays search within a
    quarter DOF of the last focus first, and long ones allow for the drift since.

    Parameters
    ----------
    camera, focus, calibration, scorer
        As for :func:`~bluesky_deepfocus.plans.autofocus_plan`.
    num
        Number of frames.
    delay
        Time between the starts of successive frames (s).
    refocus_every
        Refocus before frames 0, N, 2N, ...
    warm_start, prior_sd, max_drift_rate
        Warm-start policy (``warm_start=False``: every search starts cold).
    md
        Extra metadata for the start document.
    **autofocus_kwargs
        Passed to :func:`~bluesky_deepfocus.plans.autofocus_stub` (``roi``,
        ``max_images``, ``on_failure``, ``stream_prefix``, ...).

    Returns
    -------
    list of AutofocusResult
        One per refocus. Also recorded: the frames in ``primary``; each refocus in
        ``autofocus_refocus``, ``autofocus_images``, ``autofocus_scores`` and
        ``autofocus_result``; the settings (calibration uid, model, algorithm, refocus
        policy) under ``"deepfocus"`` in the start document.

    Raises
    ------
    ValueError, TypeError, CalibrationError
        Bad arguments, checked when called, before anything moves.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> from bluesky_deepfocus import DeepFocusScorer
    >>> from bluesky_deepfocus.devices import MMCamera, MMFocusStage
    >>> from bluesky_deepfocus.plans import calibration_plan, timelapse_plan
    >>> from bluesky_deepfocus.sim import simulated_microscope
    >>> core = simulated_microscope(sensor_shape=(256, 256), drift_um_per_s=0.5, seed=1)
    >>> camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
    >>> RE = RunEngine(call_returns_result=True)
    >>> scorer = DeepFocusScorer()
    >>> cal = RE(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result
    >>> results = RE(timelapse_plan(camera, focus, cal, 3, 2.0, scorer=scorer)).plan_result
    >>> [r.status for r in results]
    ['converged', 'converged', 'converged']
    """
    calibration, settings = _prepare(
        "timelapse_plan", camera, calibration, scorer, autofocus_kwargs
    )
    num = _check_count(num, "num", "the number of frames")
    delay = _check_nonnegative(delay, "delay", "seconds between frame starts")
    refocus_every = _check_count(refocus_every, "refocus_every", "refocus every N-th frame")
    warm = _WarmStart(
        calibration,
        enabled=warm_start,
        strategy=settings["strategy"],
        prior_sd=prior_sd,
        max_drift_rate=max_drift_rate,
    )
    policy = {"kind": "timelapse", "every": refocus_every, **warm.settings()}
    _md: dict[str, Any] = {
        "plan_name": "timelapse_plan",
        "plan_args": {
            "camera": repr(camera),
            "focus": repr(focus),
            "calibration": (calibration.uid or calibration.objective) if calibration else None,
            "num": num,
            "delay": delay,
            "refocus_every": refocus_every,
            "warm_start": warm_start,
            "prior_sd": prior_sd,
            "max_drift_rate": max_drift_rate,
            **{k: repr(v) if k == "settings" else v for k, v in autofocus_kwargs.items()},
        },
        "detectors": [camera.name],
        "motors": [focus.name],
        "num_points": num,
        "num_intervals": num - 1,
        "hints": {"dimensions": [(["time"], "primary")]},
        MD_KEY: _deepfocus_md(camera, focus, calibration, scorer, settings, policy),
    }
    _md.update(md or {})

    def frames(uid: str) -> MsgGenerator[list[AutofocusResult]]:
        refocuser = _Refocuser(camera, focus, calibration, scorer, settings, uid)
        for i in range(num):
            started = time.monotonic()
            yield from bps.checkpoint()
            if i % refocus_every == 0:
                last = refocuser.last_success
                prior = warm.prior(last[0].final_z, started - last[1]) if last else None
                reason = "first" if i == 0 else "every"
                yield from refocuser.refocus(reason, prior=prior, seq_num=i + 1)
            yield from bps.trigger_and_read([camera, focus])
            wait = delay - (time.monotonic() - started)
            if i + 1 < num and wait > 0:
                yield from bps.sleep(wait)
        return refocuser.results

    return bpp.stage_wrapper(_run_returning(frames, _md), [camera, focus])
