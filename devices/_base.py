"""Shared pieces of the Micro-Manager ophyd devices: errors, core-backed signals, statuses.

Only the public ``CMMCorePlus`` API is used, so everything here works on a real
``MMConfig.cfg`` and on the simulated microscope alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ophyd import Signal
from ophyd.status import Status, StatusBase
from ophyd.utils import InvalidState, ReadOnlyError
from ophyd.utils import LimitError as _OphydLimitError

from bluesky_deepfocus.errors import DeepFocusError, DeviceFault

__all__ = ["CoreSignal", "DeviceTimeoutError", "LimitError", "run_on_thread"]

logger = logging.getLogger("bluesky_deepfocus.devices")


class LimitError(DeepFocusError, _OphydLimitError):
    """A move was requested outside a positioner's limits (raised before any motion).

    A ``ValueError`` (through ``ophyd.utils.LimitError``).
    """


class DeviceTimeoutError(DeviceFault, TimeoutError):
    """A camera snap or a stage move did not complete within its timeout."""


class CoreSignal(Signal):
    """A signal whose value is read from (and written to) the core on every access.

    Parameters
    ----------
    fget, fset
        Names of methods of the parent device that read / write the value; without
        ``fset`` the signal is read-only.
    dtype, dtype_numpy, shape, units
        Data-key description (event-model ``dtype``: ``"number"``, ``"integer"``,
        ``"string"`` or ``"array"``).
    """

    def __init__(
        self,
        *,
        fget: str,
        fset: str | None = None,
        dtype: str = "number",
        dtype_numpy: str | None = None,
        shape: tuple[int, ...] = (),
        units: str | None = None,
        name: str = "",
        parent: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, parent=parent, **kwargs)
        self._fget = fget
        self._fset = fset
        self._describe_dtype = dtype
        self._dtype_numpy = dtype_numpy
        self._describe_shape = list(shape)
        self._units = units
        self._metadata.update(write_access=fset is not None)

    def get(self, **kwargs: Any) -> Any:
        value = getattr(self.parent, self._fget)()
        self._readback = value
        self._metadata["timestamp"] = time.time()
        return value

    def put(self, value: Any, **kwargs: Any) -> None:
        if self._fset is None:
            raise ReadOnlyError(f"Signal {self.name!r} is read-only; it reports the core's state.")
        old = self._readback
        getattr(self.parent, self._fset)(value)
        new = self.get()
        self._run_subs(sub_type=self.SUB_VALUE, old_value=old, value=new, timestamp=time.time())

    def set(self, value: Any, **kwargs: Any) -> StatusBase:
        """Write through the core (synchronous) and return a finished Status."""
        status = Status(obj=self)
        try:
            self.put(value)
        except Exception as exc:
            status.set_exception(exc)
        else:
            status.set_finished()
        return status

    def describe(self) -> dict[str, dict[str, Any]]:
        desc: dict[str, Any] = {
            "source": self.source_name,
            "dtype": self._describe_dtype,
            "shape": list(self._describe_shape),
        }
        if self._dtype_numpy:
            desc["dtype_numpy"] = self._dtype_numpy
        if self._units:
            desc["units"] = self._units
        return {self.name: desc}

    @property
    def source_name(self) -> str:
        label = getattr(self.parent, "device_label", "")
        return f"pymmcore:{label}:{self._fget.lstrip('_')}"


def _complete(status: StatusBase, exc: BaseException | None) -> None:
    """Finish ``status`` unless it already is (a timeout may have beaten the worker)."""
    try:
        if exc is None:
            status.set_finished()
        else:
            status.set_exception(exc)
    except InvalidState:
        if exc is not None and not isinstance(exc, DeviceTimeoutError):
            logger.warning("%r finished after its status had already failed: %s", status, exc)


def run_on_thread(
    status: StatusBase,
    work: Callable[[], None],
    *,
    timeout: float,
    what: str,
    timeout_hint: str,
) -> None:
    """Run blocking core calls on a daemon thread and complete ``status`` from them.

    The status fails with a :class:`~bluesky_deepfocus.errors.DeviceFault` carrying
    the device's message if ``work`` raises, or with :class:`DeviceTimeoutError` if it
    has not returned after ``timeout`` seconds (the thread is then abandoned; it ends
    when the core call returns).

    Parameters
    ----------
    what
        What is being done, for messages (e.g. ``"MMCamera 'camera' snap"``).
    timeout_hint
        The fix suggested by the timeout message.
    """

    def target() -> None:
        try:
            work()
        except DeviceFault as exc:
            _complete(status, exc)
        except Exception as exc:
            err = DeviceFault(f"{what} failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            _complete(status, err)
        else:
            _complete(status, None)

    def on_timeout() -> None:
        if not status.done:
            _complete(
                status,
                DeviceTimeoutError(
                    f"{what} did not complete within timeout={timeout!r} s. {timeout_hint}"
                ),
            )

    timer = threading.Timer(timeout, on_timeout)
    timer.daemon = True
    status.add_callback(lambda _status: timer.cancel())
    timer.start()
    threading.Thread(target=target, name=f"deepfocus: {what}", daemon=True).start()
