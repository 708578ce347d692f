"""An ophyd camera over any ``CMMCorePlus`` (a real configuration or the simulator)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus, StatusBase
from pymmcore_plus import CMMCorePlus, DeviceType

from bluesky_deepfocus.errors import DeviceFault

from ._base import CoreSignal, run_on_thread

__all__ = ["MMCamera", "frame_spec"]


def frame_spec(core: CMMCorePlus) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype that ``core.getImage()`` returns for the current camera and ROI.

    From ``getImageHeight/Width``, ``getBytesPerPixel`` and ``getNumberOfComponents``:
    grey frames are ``(h, w)`` unsigned integers of the pixel size; 4-component
    (RGB32) frames are ``(h, w, 3)`` bytes, as ``CMMCorePlus.getImage()`` returns them.
    """
    h, w = int(core.getImageHeight()), int(core.getImageWidth())
    nbytes = int(core.getBytesPerPixel())
    ncomp = int(core.getNumberOfComponents())
    if ncomp <= 1:
        return (h, w), np.dtype(f"<u{nbytes}")
    if ncomp == 4 and nbytes >= 4:
        return (h, w, 3), np.dtype(f"<u{nbytes // 4}")
    return (h, w, ncomp), np.dtype(f"<u{nbytes}")


class _ImageSignal(Signal):
    """The last frame; described from the core (shape, event-model ``dtype_numpy``)."""

    def describe(self) -> dict[str, dict[str, Any]]:
        parent = self.parent
        shape, dtype = frame_spec(parent.core)
        return {
            self.name: {
                "source": f"pymmcore:{parent.device_label}:image",
                "dtype": "array",
                "shape": list(shape),
                "dtype_numpy": dtype.str,
            }
        }

    def get(self, **kwargs: Any) -> Any:
        if self._readback is None or isinstance(self._readback, str):
            raise RuntimeError(
                f"{self.name!r} holds no image yet: trigger() the camera before read() "
                "(bluesky's trigger_and_read does), e.g. RE(bp.count([camera]))."
            )
        return self._readback


class MMCamera(Device):
    """A Micro-Manager camera as an ophyd device: ``trigger()`` snaps one frame.

    The snap (``core.snapImage()`` + ``core.getImage()``) runs on a thread; the Status
    fails with the camera's error message if the snap raises, with a
    :class:`~bluesky_deepfocus.devices.DeviceTimeoutError` if it has not returned after
    ``timeout`` seconds plus the exposure, and with a
    :class:`~bluesky_deepfocus.errors.DeviceFault` if the frame does not have the shape
    the core reports (it is then discarded).

    Readings: ``image`` (``[h, w]`` or ``[h, w, 3]``, ``dtype_numpy`` like ``"<u2"``).
    Configuration: ``exposure_ms`` (writable), ``roi`` (``[x, y, w, h]``),
    ``pixel_size_um`` (0 when no pixel-size configuration applies), ``pixel_config``
    and ``objective`` (state label of the objective turret, if the core can guess it;
    ``""`` otherwise).

    Parameters
    ----------
    core
        Any ``CMMCorePlus``.
    name
        Device name (prefix of the data keys).
    camera_label
        Micro-Manager camera to use; it is made the core's current camera before each
        snap (Micro-Manager snaps the current camera). Default: whatever camera is
        current at each trigger (follows channel presets that switch cameras).
    timeout
        Seconds allowed for a snap beyond the exposure time.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> import bluesky.plans as bp
    >>> from bluesky_deepfocus.sim import simulated_microscope
    >>> core = simulated_microscope(sensor_shape=(64, 64))
    >>> camera = MMCamera(core, name="camera")
    >>> RE = RunEngine(call_returns_result=True)
    >>> uid = RE(bp.count([camera], num=2)).run_start_uids[0]
    >>> key = camera.describe()["camera_image"]
    >>> key["shape"], key["dtype"], key["dtype_numpy"]
    ([64, 64], 'array', '<u2')
    >>> sorted(camera.read_configuration())  # doctest: +NORMALIZE_WHITESPACE
    ['camera_exposure_ms', 'camera_objective', 'camera_pixel_config', 'camera_pixel_size_um',
     'camera_roi']
    """

    image = Cpt(_ImageSignal, value=None, kind=Kind.normal)
    exposure_ms = Cpt(
        CoreSignal,
        fget="_get_exposure",
        fset="_set_exposure",
        units="ms",
        kind=Kind.config,
        dtype_numpy="<f8",
    )
    roi = Cpt(
        CoreSignal,
        fget="_get_roi",
        dtype="array",
        dtype_numpy="<i8",
        shape=(4,),
        units="px",
        kind=Kind.config,
    )
    pixel_size_um = Cpt(
        CoreSignal, fget="_get_pixel_size", units="um", dtype_numpy="<f8", kind=Kind.config
    )
    pixel_config = Cpt(CoreSignal, fget="_get_pixel_config", dtype="string", kind=Kind.config)
    objective = Cpt(CoreSignal, fget="_get_objective", dtype="string", kind=Kind.config)

    def __init__(
        self,
        core: CMMCorePlus,
        *,
        name: str,
        camera_label: str | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"timeout={timeout!r} must be a finite number of seconds > 0, so that every "
                "trigger completes or fails."
            )
        if camera_label is None:
            if not core.getCameraDevice():
                raise ValueError(
                    "The core has no current camera (core.getCameraDevice() is ''): load a "
                    "configuration with a camera, call core.setCameraDevice(label), or pass "
                    "camera_label=..."
                )
        else:
            cameras = list(core.getLoadedDevicesOfType(DeviceType.Camera))
            if camera_label not in cameras:
                raise ValueError(
                    f"camera_label={camera_label!r} is not a camera loaded in the core; "
                    f"loaded cameras: {cameras!r}."
                )
        self._core = core
        self._camera_label = camera_label
        self.timeout = float(timeout)
        self._exposure_s = 0.0
        super().__init__("", name=name, **kwargs)
        self._get_exposure()

    # ------------------------------------------------------------------ properties
    @property
    def core(self) -> CMMCorePlus:
        """The core this camera talks to."""
        return self._core

    @property
    def device_label(self) -> str:
        """Micro-Manager label of the camera used (the current one if not fixed)."""
        return self._camera_label or str(self._core.getCameraDevice())

    # ------------------------------------------------------------------ bluesky API
    def trigger(self) -> StatusBase:
        """Snap one frame off the event loop; the Status completes when it is stored.

        No core call is made on the caller's thread, so a hanging camera cannot block
        the RunEngine: the timeout is ``timeout`` plus the last known exposure.
        """
        core = self._core
        label = self.device_label
        status = DeviceStatus(self)
        what = f"MMCamera {self.name!r} (Micro-Manager camera {label!r}) snap"

        def snap() -> None:
            if self._camera_label and core.getCameraDevice() != self._camera_label:
                core.setCameraDevice(self._camera_label)
            expected_shape, expected_dtype = frame_spec(core)
            core.snapImage()
            frame = np.asarray(core.getImage())
            if frame.shape != expected_shape or frame.dtype.str != expected_dtype.str:
                raise DeviceFault(
                    f"{what} returned a frame of shape {frame.shape!r} and dtype "
                    f"{frame.dtype.str!r}, but the core reports {expected_shape!r} "
                    f"{expected_dtype.str!r}; the frame was discarded. Trigger again, or "
                    "check the camera's ROI and binning."
                )
            self.image.put(frame, timestamp=time.time())
            self._get_exposure()  # refresh the exposure used for the next timeout

        run_on_thread(
            status,
            snap,
            timeout=self.timeout + self._exposure_s,
            what=what,
            timeout_hint=(
                "The camera may hang; check it, or raise MMCamera(timeout=...) for long readouts."
            ),
        )
        return status

    # ------------------------------------------------------------------ core readers
    def _get_exposure(self) -> float:
        exposure = float(self._core.getExposure(self.device_label))
        self._exposure_s = max(0.0, exposure) / 1000.0
        return exposure

    def _set_exposure(self, value: float) -> None:
        exposure = float(value)
        if not (math.isfinite(exposure) and exposure >= 0):
            raise ValueError(
                f"Exposure {value!r} ms must be a finite number >= 0 for camera "
                f"{self.device_label!r}."
            )
        self._core.setExposure(self.device_label, exposure)
        self._exposure_s = exposure / 1000.0

    def _get_roi(self) -> np.ndarray:
        return np.asarray(self._core.getROI(self.device_label), dtype=np.int64)

    def _get_pixel_size(self) -> float:
        return float(self._core.getPixelSizeUm())

    def _get_pixel_config(self) -> str:
        return str(self._core.getCurrentPixelSizeConfig())

    def _get_objective(self) -> str:
        core = self._core
        try:
            devices = core.guessObjectiveDevices()
        except Exception:
            return ""
        if len(devices) != 1:
            return ""
        try:
            return str(core.getStateLabel(devices[0]))
        except Exception:
            return ""
