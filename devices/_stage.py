"""Ophyd positioners for Micro-Manager focus (Z) and XY stages over any ``CMMCorePlus``."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.positioner import PositionerBase
from ophyd.status import MoveStatus, StatusBase
from pymmcore_plus import CMMCorePlus, DeviceType

from ._base import CoreSignal, LimitError, logger, run_on_thread

__all__ = ["MMFocusStage", "MMXYStage"]

Limits = tuple[float, float]
NO_LIMITS: Limits = (0.0, 0.0)


def _check_limits(value: Sequence[float] | None, what: str) -> Limits | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{what}={value!r} must be a pair (low, high) of numbers in um."
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what}={value!r} must be finite with low < high (um).")
    return lo, hi


def _check_timeout(timeout: float) -> float:
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"timeout={timeout!r} must be a finite number of seconds > 0, so that every "
            "move completes or fails."
        )
    return float(timeout)


def _target(positioner: Any, value: Any) -> float:
    """Validate a requested position against the positioner's limits (before motion)."""
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{type(positioner).__name__} {positioner.name!r}: position {value!r} is not a "
            "number (um)."
        ) from None
    if not math.isfinite(target):
        raise ValueError(
            f"{type(positioner).__name__} {positioner.name!r}: position {value!r} must be a "
            "finite number (um)."
        )
    lo, hi = positioner.limits
    if lo < hi and not lo <= target <= hi:
        raise LimitError(
            f"{type(positioner).__name__} {positioner.name!r}: requested position "
            f"{target!r} um is outside the limits {(lo, hi)!r} um (low <= position <= high);"
            " nothing moved. Request a position within the limits, or construct the device "
            "with other limits=(low, high)."
        )
    return target


class _CorePositioner(Device, PositionerBase):
    """Positioner base: validation before motion, core calls on a thread, finite timeout."""

    readback = Cpt(
        CoreSignal, fget="_read_position", units="um", dtype_numpy="<f8", kind=Kind.hinted
    )
    setpoint = Cpt(Signal, value=0.0, kind=Kind.normal)

    def __init__(
        self, prefix: str = "", *, name: str, timeout: float = 30.0, **kwargs: Any
    ) -> None:
        super().__init__(prefix, name=name, timeout=_check_timeout(timeout), **kwargs)
        self.readback.name = self.name
        self._moving = False

    # -- to implement ------------------------------------------------------------
    @property
    def device_label(self) -> str:
        raise NotImplementedError

    def _read_position(self) -> float:
        raise NotImplementedError

    def _start_motion(self, target: float) -> Callable[[], None]:
        """Prepare a move (synchronously) and return the blocking work for the thread."""
        raise NotImplementedError

    # -- ophyd / bluesky API ------------------------------------------------------
    @property
    def egu(self) -> str:
        """Engineering units of positions."""
        return "um"

    @property
    def position(self) -> float:
        """Current position reported by the core (um)."""
        return float(self._read_position())

    def check_value(self, value: Any) -> None:
        """Raise ``ValueError`` / :class:`LimitError` if ``value`` cannot be moved to."""
        _target(self, value)

    def move(
        self,
        position: Any,
        wait: bool = False,
        moved_cb: Callable[..., None] | None = None,
        timeout: float | None = None,
    ) -> StatusBase:
        """Move to ``position`` (um); the Status completes when the device is idle.

        Raises before any motion if the position is not finite or outside
        :attr:`limits`.
        """
        target = _target(self, position)
        timeout = _check_timeout(timeout) if timeout is not None else float(self.timeout)
        status = MoveStatus(self, target, timeout=None, settle_time=self.settle_time)
        if moved_cb is not None:
            status.add_callback(lambda st: moved_cb(st, obj=self))
        self.setpoint.put(target)
        self._moving = True
        self._run_subs(sub_type=self.SUB_START, timestamp=time.time())
        work = self._start_motion(target)
        status.add_callback(self._motion_finished)
        run_on_thread(
            status,
            work,
            timeout=timeout,
            what=(
                f"{type(self).__name__} {self.name!r} (Micro-Manager device "
                f"{self.device_label!r}) move to {target!r} um"
            ),
            timeout_hint=(
                "The stage still reports busy: check it, or pass a longer timeout "
                f"(now {timeout!r} s)."
            ),
        )
        if wait:
            status.wait()
        return status

    def _motion_finished(self, status: StatusBase) -> None:
        self._moving = False
        try:
            value = self.position
        except Exception:  # the core is in trouble; the status carries the error
            return
        now = time.time()
        self._run_subs(sub_type=self.SUB_READBACK, value=value, timestamp=now)
        if status.success:
            self._run_subs(sub_type=self.SUB_DONE, value=value, timestamp=now)

    def stop(self, *, success: bool = False) -> None:
        """Ask the stage to stop (``core.stop``)."""
        try:
            self._stop_device()
        except Exception as exc:  # a stop must not raise in bluesky's cleanup
            logger.warning("%s: stopping %r failed: %s", self.name, self.device_label, exc)
        super().stop(success=success)

    def _stop_device(self) -> None:
        raise NotImplementedError


class MMFocusStage(_CorePositioner):
    """A Micro-Manager focus (Z) stage as an ophyd positioner (um).

    ``set(z)`` validates ``z`` against :attr:`limits` and raises
    :class:`~bluesky_deepfocus.devices.LimitError` *before* any motion; otherwise it
    calls ``core.setPosition`` and ``core.waitForDevice`` on a thread and returns a
    Status that completes when the stage is idle, fails with the stage's error message
    if the core raises, and fails with
    :class:`~bluesky_deepfocus.devices.DeviceTimeoutError` after ``timeout`` seconds.
    Works with ``bps.mv`` / ``bps.mvr`` / ``bp.scan`` / ``bp.rel_scan``.

    Readings: the readback under the device's name (hinted) and ``<name>_setpoint``.

    Parameters
    ----------
    core
        Any ``CMMCorePlus``.
    name
        Device name; the readback's data key.
    stage_label
        Micro-Manager stage label; default the core's focus device at construction.
    limits
        Soft limits ``(low, high)`` in um. Default: the limits of the stage's
        ``Position`` property if it has some, else none (``(0.0, 0.0)``, ophyd's
        convention for "no limits").
    timeout
        Seconds a move may take before its Status fails.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> import bluesky.plan_stubs as bps
    >>> from bluesky_deepfocus.sim import simulated_microscope
    >>> core = simulated_microscope(sensor_shape=(64, 64))
    >>> focus = MMFocusStage(core, name="focus", limits=(-200.0, 200.0))
    >>> RE = RunEngine(call_returns_result=True)
    >>> _ = RE(bps.mv(focus, 10.0))
    >>> _ = RE(bps.mvr(focus, -2.5))
    >>> focus.position, focus.limits
    (7.5, (-200.0, 200.0))
    >>> RE(bps.mv(focus, 500.0))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    LimitError: MMFocusStage 'focus': requested position 500.0 um is outside the limits ...
    """

    def __init__(
        self,
        core: CMMCorePlus,
        *,
        name: str,
        stage_label: str | None = None,
        limits: Sequence[float] | None = None,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        label = stage_label or str(core.getFocusDevice())
        if not label:
            raise ValueError(
                "The core has no focus device (core.getFocusDevice() is ''): load a "
                "configuration with a focus stage, call core.setFocusDevice(label), or pass "
                "stage_label=..."
            )
        stages = list(core.getLoadedDevicesOfType(DeviceType.Stage))
        if label not in stages:
            raise ValueError(
                f"stage_label={label!r} is not a (Z) stage loaded in the core; loaded stages: "
                f"{stages!r}."
            )
        self._core = core
        self._label = label
        self._user_limits = _check_limits(limits, "limits")
        super().__init__(name=name, timeout=timeout, **kwargs)
        self.setpoint.put(self.position)

    @property
    def core(self) -> CMMCorePlus:
        """The core this stage talks to."""
        return self._core

    @property
    def device_label(self) -> str:
        """Micro-Manager label of the stage."""
        return self._label

    @property
    def limits(self) -> Limits:
        """Soft limits ``(low, high)`` in um; ``(0.0, 0.0)`` means none are known."""
        if self._user_limits is not None:
            return self._user_limits
        core, label = self._core, self._label
        try:
            if core.hasProperty(label, "Position") and core.hasPropertyLimits(label, "Position"):
                return (
                    float(core.getPropertyLowerLimit(label, "Position")),
                    float(core.getPropertyUpperLimit(label, "Position")),
                )
        except Exception:  # pragma: no cover - adapters without the property API
            pass
        return NO_LIMITS

    def _read_position(self) -> float:
        return float(self._core.getPosition(self._label))

    def _start_motion(self, target: float) -> Callable[[], None]:
        core, label = self._core, self._label

        def work() -> None:
            core.setPosition(label, target)
            core.waitForDevice(label)

        return work

    def _stop_device(self) -> None:
        self._core.stop(self._label)


class _XYAxis(_CorePositioner):
    """One axis of an :class:`MMXYStage` (moving it keeps the other axis)."""

    def __init__(
        self, prefix: str = "", *, axis: str, name: str, parent: Any = None, **kwargs: Any
    ) -> None:
        self._axis = axis
        timeout = parent.timeout if parent is not None else 30.0
        super().__init__(prefix, name=name, parent=parent, timeout=timeout, **kwargs)
        self.setpoint.put(self.position)

    @property
    def device_label(self) -> str:
        return str(self.parent.device_label)

    @property
    def limits(self) -> Limits:
        """Soft limits of this axis in um; ``(0.0, 0.0)`` means none."""
        limits = self.parent.axis_limits[self._axis]
        return limits if limits is not None else NO_LIMITS

    def _read_position(self) -> float:
        x, y = self.parent.core.getXYPosition(self.parent.device_label)
        return float(x if self._axis == "x" else y)

    def _start_motion(self, target: float) -> Callable[[], None]:
        return self.parent._start_axis_motion(self._axis, target)

    def _stop_device(self) -> None:
        self.parent.core.stop(self.parent.device_label)


class MMXYStage(Device):
    """A Micro-Manager XY stage with ``x`` and ``y`` sub-positioners (um).

    Each axis is an ophyd positioner usable as a motor in ``bp.grid_scan`` /
    ``bp.scan``; moving one axis keeps the other at its current (or pending) target.
    Moves outside the axis limits raise
    :class:`~bluesky_deepfocus.devices.LimitError` before any motion; errors and
    timeouts fail the Status as for :class:`MMFocusStage`.

    Parameters
    ----------
    core
        Any ``CMMCorePlus``.
    name
        Device name; the axes read as ``<name>_x`` and ``<name>_y``.
    stage_label
        Micro-Manager XY stage label; default the core's XY stage at construction.
    limits
        ``((x_low, x_high), (y_low, y_high))`` in um, or ``None`` (no soft limits).
    timeout
        Seconds a move may take before its Status fails.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> import bluesky.plans as bp
    >>> from bluesky_deepfocus.sim import simulated_microscope
    >>> core = simulated_microscope(sensor_shape=(32, 32))
    >>> xy = MMXYStage(core, name="xy", limits=((-1000, 1000), (-1000, 1000)))
    >>> RE = RunEngine(call_returns_result=True)
    >>> _ = RE(bp.grid_scan([xy], xy.y, 0, 20, 2, xy.x, 0, 30, 2))
    >>> core.getXYPosition()
    (30.0, 20.0)
    """

    x = Cpt(_XYAxis, axis="x")
    y = Cpt(_XYAxis, axis="y")

    def __init__(
        self,
        core: CMMCorePlus,
        *,
        name: str,
        stage_label: str | None = None,
        limits: tuple[Sequence[float], Sequence[float]] | None = None,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        label = stage_label or str(core.getXYStageDevice())
        if not label:
            raise ValueError(
                "The core has no XY stage (core.getXYStageDevice() is ''): load a "
                "configuration with one, call core.setXYStageDevice(label), or pass "
                "stage_label=..."
            )
        stages = list(core.getLoadedDevicesOfType(DeviceType.XYStage))
        if label not in stages:
            raise ValueError(
                f"stage_label={label!r} is not an XY stage loaded in the core; loaded XY "
                f"stages: {stages!r}."
            )
        if limits is not None and len(limits) != 2:
            raise ValueError(
                f"limits={limits!r} must be ((x_low, x_high), (y_low, y_high)) in um, or None."
            )
        self._core = core
        self._label = label
        self.timeout = _check_timeout(timeout)
        self.axis_limits: dict[str, Limits | None] = {
            "x": _check_limits(limits[0], "limits[0] (x)") if limits else None,
            "y": _check_limits(limits[1], "limits[1] (y)") if limits else None,
        }
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()
        super().__init__("", name=name, **kwargs)

    @property
    def core(self) -> CMMCorePlus:
        """The core this stage talks to."""
        return self._core

    @property
    def device_label(self) -> str:
        """Micro-Manager label of the XY stage."""
        return self._label

    @property
    def position(self) -> tuple[float, float]:
        """Current ``(x, y)`` in um."""
        x, y = self._core.getXYPosition(self._label)
        return float(x), float(y)

    def _start_axis_motion(self, axis: str, target: float) -> Callable[[], None]:
        core, label = self._core, self._label
        with self._lock:
            self._pending[axis] = target

        def work() -> None:
            try:
                with self._lock:
                    x, y = core.getXYPosition(label)
                    tx = self._pending.get("x", x)
                    ty = self._pending.get("y", y)
                    core.setXYPosition(label, tx, ty)
                core.waitForDevice(label)
            finally:
                with self._lock:
                    if self._pending.get(axis) == target:
                        del self._pending[axis]

        return work
