"""A simulated widefield microscope as a pymmcore-plus ``UniMMCore``.

:func:`simulated_microscope` returns a real ``CMMCorePlus`` (a ``UniMMCore``) with Python
devices: a camera that renders a specimen slide at the stage's defocus, a focus (Z)
stage, an XY stage and an objective turret. Everything built on Micro-Manager (the ophyd
devices in :mod:`bluesky_deepfocus.devices`, the plans) therefore runs unchanged on it
and on a real ``MMConfig.cfg``.

The physics and the state live in a plain object, :class:`MicroscopeSimulation`
(objective, slide, camera model, true focus with tilt and drift, simulated clock,
stage positions, :class:`SimFaults`); the unicore devices only forward to it (the
ophyd-async ``sim/_motor.py`` pattern). Tests and benchmarks reach it with
:func:`get_simulation`; runtime code never imports this module.

Image formation: the field of view at the XY stage position is cropped from the slide
with a margin of half the PSF footprint at the largest defocus and blurred with
:func:`~bluesky_deepfocus.optics.blur` (``mode="valid"``, nothing wraps around) for a
uniform defocus, or with :func:`~bluesky_deepfocus.optics.render_depth_variant` for a
tilted specimen (far out of focus at high NA -- a geometric blur wider than
:data:`~bluesky_deepfocus.optics.FAR_DEFOCUS_BLUR_PX`, 40x beyond ~147 um -- with
:func:`~bluesky_deepfocus.optics.far_defocus_image`, from the geometric-optics OTF: the
pattern within ~0.5 % of the mean intensity, in 0.1-0.25 s instead of 1-15 s); then :meth:`~bluesky_deepfocus.optics.CameraModel.expose` adds shot
and read noise. The defocus of a pixel at stage coordinates ``(X, Y)`` and simulated time
``t`` is ``z - (true_focus_um + tilt[0] * X + tilt[1] * Y + drift_um_per_s * t)``.

Examples
--------
>>> core = simulated_microscope(sensor_shape=(128, 128), true_focus_um=5.0, seed=1)
>>> core.getCameraDevice(), core.getFocusDevice(), core.getXYStageDevice()
('Camera', 'Focus', 'XY')
>>> round(core.getPixelSizeUm(), 3), core.getStateLabel("Objective")
(0.65, '10x/0.3')
>>> sim = get_simulation(core)
>>> sim.true_focus_at()
5.0
>>> core.setPosition(5.0)
>>> core.snapImage()
>>> core.getImage().shape
(128, 128)
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import (
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    UniMMCore,
    XYStageDevice,
)

from .optics import (
    FAR_DEFOCUS_BLUR_PX,
    OBJECTIVES,
    CameraModel,
    Objective,
    blur,
    far_defocus_image,
    get_objective,
    objective_psf,
    render_depth_variant,
)
from .specimens import FAMILIES, Slide

__all__ = [
    "ImageSlide",
    "MicroscopeSimulation",
    "SimClock",
    "SimFaults",
    "SimulatedHardwareError",
    "get_simulation",
    "install_simulation",
    "new_unicore",
    "pixel_config_name",
    "simulated_microscope",
]

FloatImage = NDArray[np.float64]
Frame = NDArray[np.uint16]

#: Device labels used by :func:`simulated_microscope`.
CAMERA_LABEL = "Camera"
FOCUS_LABEL = "Focus"
XY_LABEL = "XY"
OBJECTIVE_LABEL = "Objective"

_SIMULATIONS: weakref.WeakKeyDictionary[CMMCorePlus, MicroscopeSimulation] = (
    weakref.WeakKeyDictionary()
)
_LIVE_CORES: weakref.WeakSet[CMMCorePlus] = weakref.WeakSet()


class SimulatedHardwareError(RuntimeError):
    """A fault of the simulated hardware (injected by :class:`SimFaults` or a bad move).

    A ``RuntimeError`` like the errors pymmcore raises for real device failures.
    """


# --------------------------------------------------------------------------------------
# Core construction
# --------------------------------------------------------------------------------------
@atexit.register
def _detach_core_callbacks() -> None:
    # A UniMMCore with Python devices that is still alive when the interpreter shuts
    # down aborts the process ("FATAL: exception not rethrown"): the C++ destructor
    # calls back into Python after finalization started. Unregistering the callback
    # relay first (what CMMCorePlus.__del__ does) avoids that.
    for core in list(_LIVE_CORES):
        try:
            super(CMMCorePlus, core).registerCallback(None)
        except Exception:  # pragma: no cover - best effort at exit
            pass


def new_unicore(mm_path: str | os.PathLike[str] | None = None) -> UniMMCore:
    """A ``UniMMCore`` that logs no error when no Micro-Manager installation exists.

    ``UniMMCore()`` searches for a Micro-Manager installation (for C++ device adapters)
    and logs an error when there is none. Python devices need no installation, so the
    search is skipped: ``mm_path`` (or ``$MICROMANAGER_PATH`` if set) is used when given,
    otherwise this package's directory stands in as an adapter search path that holds
    no adapters. The core is also made safe to leave alive at interpreter exit.

    Parameters
    ----------
    mm_path
        A Micro-Manager folder, if C++ adapters should be loadable too.

    Examples
    --------
    >>> core = new_unicore()
    >>> core.getLoadedDevices()
    ('Core',)
    """
    path = mm_path or os.environ.get("MICROMANAGER_PATH") or os.path.dirname(__file__)
    core = UniMMCore(mm_path=str(path))
    _LIVE_CORES.add(core)
    return core


def pixel_config_name(objective: str | Objective) -> str:
    """Pixel-size configuration name for an objective.

    Micro-Manager reserves ``/`` (and ``,`` and ``\\``) in preset names, so
    ``"10x/0.3"`` becomes ``"10x_0.3"``. The objective's own name is the state label of
    the simulated ``Objective`` turret.

    >>> pixel_config_name("10x/0.3")
    '10x_0.3'
    """
    name = get_objective(objective).name
    for ch in "/,\\":
        name = name.replace(ch, "_")
    return name


# --------------------------------------------------------------------------------------
# Plain simulation objects
# --------------------------------------------------------------------------------------
class SimClock:
    """Simulated time: real time scaled by ``time_scale`` plus explicit advances.

    Parameters
    ----------
    time_scale
        Simulated seconds per real second (``0`` freezes the clock; only
        :meth:`advance` moves it). Use e.g. ``60`` for a time-compressed timelapse.

    Examples
    --------
    >>> clock = SimClock(time_scale=0.0)
    >>> clock.advance(90.0)
    >>> clock.now()
    90.0
    """

    def __init__(self, time_scale: float = 1.0) -> None:
        if not (math.isfinite(time_scale) and time_scale >= 0):
            raise ValueError(
                f"time_scale={time_scale!r} must be a finite number >= 0 "
                "(simulated seconds per real second; 0 freezes the clock)."
            )
        self._lock = threading.Lock()
        self._time_scale = float(time_scale)
        self._t0_real = time.perf_counter()
        self._t0_sim = 0.0

    @property
    def time_scale(self) -> float:
        """Simulated seconds per real second."""
        return self._time_scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"time_scale={value!r} must be a finite number >= 0.")
        with self._lock:
            now_real = time.perf_counter()
            self._t0_sim += (now_real - self._t0_real) * self._time_scale
            self._t0_real = now_real
            self._time_scale = float(value)

    def now(self) -> float:
        """Simulated seconds since the simulation started."""
        with self._lock:
            return self._t0_sim + (time.perf_counter() - self._t0_real) * self._time_scale

    def advance(self, seconds: float) -> None:
        """Move simulated time forward by ``seconds`` (>= 0)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                f"Cannot advance the clock by {seconds!r} s: give a finite value >= 0."
            )
        with self._lock:
            self._t0_sim += float(seconds)


@dataclass
class SimFaults:
    """Faults injected into the simulated hardware (all off by default).

    Change them at run time through ``get_simulation(core).faults``; every decision
    draws from a generator seeded with ``seed``, so a faulty run is reproducible.

    Parameters
    ----------
    snap_failure_rate
        Probability that a snap raises :class:`SimulatedHardwareError`.
    snap_hang_s
        A snap blocks this long (seconds) before returning; setting it back to ``0``
        releases snaps that are hanging now.
    snap_hang_rate
        Probability that a snap hangs when ``snap_hang_s > 0``.
    wrong_shape_rate
        Probability that a snap returns a frame of half the sensor height (the camera
        fills a buffer of another shape; ``core.getImage()`` returns it while
        ``core.getImageHeight()`` still reports the sensor height).
    stage_error_rate
        Probability that a focus or XY move raises :class:`SimulatedHardwareError`.
    stage_never_settles
        After a move the stages stay busy until this is cleared, so
        ``core.waitForDevice`` times out.
    seed
        Seed of the fault generator.

    Examples
    --------
    >>> faults = SimFaults(snap_failure_rate=1.0, seed=0)
    >>> faults.roll(faults.snap_failure_rate)
    True
    """

    snap_failure_rate: float = 0.0
    snap_hang_s: float = 0.0
    snap_hang_rate: float = 1.0
    wrong_shape_rate: float = 0.0
    stage_error_rate: float = 0.0
    stage_never_settles: bool = False
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in (
            "snap_failure_rate",
            "snap_hang_rate",
            "wrong_shape_rate",
            "stage_error_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SimFaults.{name}={value!r} must be a probability in [0, 1].")
        if self.snap_hang_s < 0:
            raise ValueError(f"SimFaults.snap_hang_s={self.snap_hang_s!r} must be >= 0.")
        self._rng = np.random.default_rng(self.seed)

    def roll(self, rate: float) -> bool:
        """Draw one fault decision with probability ``rate``."""
        if rate <= 0.0:
            return False
        return bool(self._rng.random() < rate)

    @property
    def any(self) -> bool:
        """Whether any fault is switched on."""
        return bool(
            self.snap_failure_rate
            or self.snap_hang_s
            or self.wrong_shape_rate
            or self.stage_error_rate
            or self.stage_never_settles
        )


class SlideLike(Protocol):
    """What the simulation needs from a specimen slide (see :class:`~.specimens.Slide`)."""

    pixel_size_um: float
    data: NDArray[np.float32]

    def crop(
        self, x_um: float, y_um: float, shape: tuple[int, int], margin: int = 0
    ) -> NDArray[np.float32]: ...


class ImageSlide:
    """A slide made from a 2-D image (e.g. a real micrograph), centred on stage (0, 0).

    The image is converted to float, scaled so that its 99.5th percentile is
    ``brightness`` (procedural specimens have bright structures near 1) and resampled
    from ``image_pixel_um`` to ``pixel_size_um`` (linear interpolation, with a Gaussian
    pre-filter when shrinking). Outside the image the median level is used.

    Examples
    --------
    >>> s = ImageSlide(np.random.default_rng(0).random((100, 100)), 0.65, image_pixel_um=1.3)
    >>> s.data.shape, s.crop(0.0, 0.0, (32, 32), margin=4).shape
    ((200, 200), (40, 40))
    """

    def __init__(
        self,
        image: ArrayLike,
        pixel_size_um: float,
        *,
        image_pixel_um: float | None = None,
        brightness: float = 1.0,
    ) -> None:
        arr = np.asarray(image)
        if arr.ndim != 2 or min(arr.shape) < 2:
            raise ValueError(
                f"A specimen image must be a 2-D array (height, width), got shape "
                f"{arr.shape!r}; convert colour images to grey first, e.g. img.mean(axis=-1)."
            )
        data = arr.astype(np.float64)
        if not np.all(np.isfinite(data)):
            raise ValueError("The specimen image contains NaN or inf values; clean it first.")
        data = np.maximum(data, 0.0)
        scale = float(np.percentile(data, 99.5))
        if scale <= 0:
            scale = float(data.max()) or 1.0
        data *= brightness / scale
        src_px = float(image_pixel_um) if image_pixel_um else float(pixel_size_um)
        if pixel_size_um <= 0 or src_px <= 0:
            raise ValueError(
                f"Pixel sizes must be positive (pixel_size_um={pixel_size_um!r}, "
                f"image_pixel_um={image_pixel_um!r})."
            )
        factor = src_px / float(pixel_size_um)
        if abs(factor - 1.0) > 1e-3:
            from scipy import ndimage

            if factor < 1.0:  # shrinking: integrate over the new, larger pixels
                data = ndimage.gaussian_filter(data, sigma=0.4 / factor)
            data = ndimage.zoom(data, factor, order=1, mode="nearest", grid_mode=True)
        self.pixel_size_um = float(pixel_size_um)
        self.data: NDArray[np.float32] = np.ascontiguousarray(data, dtype=np.float32)
        self.fill = float(np.median(self.data))

    def crop(
        self, x_um: float, y_um: float, shape: tuple[int, int], margin: int = 0
    ) -> NDArray[np.float32]:
        """Field of view centred on stage ``(x_um, y_um)`` with ``margin`` extra pixels."""
        h, w = shape[0] + 2 * margin, shape[1] + 2 * margin
        ny, nx = self.data.shape
        cy = ny / 2 + y_um / self.pixel_size_um
        cx = nx / 2 + x_um / self.pixel_size_um
        y0, x0 = round(cy - h / 2), round(cx - w / 2)
        out = np.full((h, w), self.fill, dtype=np.float32)
        sy0, sx0 = max(0, y0), max(0, x0)
        sy1, sx1 = min(ny, y0 + h), min(nx, x0 + w)
        if sy0 < sy1 and sx0 < sx1:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = self.data[sy0:sy1, sx0:sx1]
        return out


def _limits(value: Sequence[float], what: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"{what}={tuple(value)!r} must be two finite numbers (low, high), low < high."
        )
    return lo, hi


class MicroscopeSimulation:
    """State and physics of the simulated microscope (no Micro-Manager inside).

    Parameters are those of :func:`simulated_microscope` (which documents them). Stage
    coordinates are those the devices report (``core.getPosition()``,
    ``core.getXYPosition()``); the true focus, tilt, drift and travel limits are given
    in the same coordinates as long as no stage origin was set.

    Attributes
    ----------
    objective, turret, slide, pixel_size_um
        The objective in the light path, all objectives on the turret, the specimen
        slide at the current pixel size (switch with :meth:`set_objective`).
    true_focus_um, tilt, drift_um_per_s, aberrations
        The specimen's focus model and the objective's aberrations; change them at run
        time (or use :meth:`set_true_focus`).
    clock
        :class:`SimClock`; see :meth:`now` and :meth:`advance`.
    camera_model, noise, exposure_ms, realtime_exposure
        Camera behaviour.
    z_um, xy_um, z_limits_um, xy_limits_um, settle_time_s
        Stage state and travel.
    faults
        :class:`SimFaults`, replaceable or editable at run time.

    Examples
    --------
    >>> sim = MicroscopeSimulation(sensor_shape=(64, 64), true_focus_um=3.0, seed=0)
    >>> sim.true_focus_at(), sim.render(3.0, noise=False).shape
    (3.0, (64, 64))
    >>> sim.tilt = (0.01, 0.0)
    >>> round(sim.true_focus_at(x_um=100.0), 6)
    4.0
    """

    def __init__(
        self,
        *,
        objective: str | Objective = "10x/0.3",
        specimen: str | ArrayLike = "tissue",
        specimen_pixel_um: float | None = None,
        brightness: float = 1.0,
        seed: int | None = 0,
        slide_size_um: float | None = None,
        sensor_shape: tuple[int, int] = (512, 512),
        true_focus_um: float = 0.0,
        tilt: tuple[float, float] = (0.0, 0.0),
        drift_um_per_s: float = 0.0,
        time_scale: float = 1.0,
        camera_model: CameraModel | None = None,
        noise: bool = True,
        exposure_ms: float = 10.0,
        realtime_exposure: bool = False,
        aberrations: Mapping[int, float] | None = None,
        z_limits_um: tuple[float, float] = (-5000.0, 5000.0),
        xy_limits_um: tuple[tuple[float, float], tuple[float, float]] = (
            (-50_000.0, 50_000.0),
            (-35_000.0, 35_000.0),
        ),
        settle_time_s: float = 0.0,
        faults: SimFaults | None = None,
    ) -> None:
        obj = get_objective(objective)
        h, w = (int(v) for v in sensor_shape)
        if h < 8 or w < 8:
            raise ValueError(f"sensor_shape={tuple(sensor_shape)!r} must be at least (8, 8).")
        if slide_size_um is not None and not slide_size_um > 0:
            raise ValueError(f"slide_size_um={slide_size_um!r} must be positive (or None).")
        if isinstance(specimen, str):
            if specimen not in FAMILIES:
                raise KeyError(
                    f"Unknown specimen family {specimen!r}; choose from {sorted(FAMILIES)} "
                    "or pass a 2-D image array with specimen_pixel_um."
                )
            self._specimen_image: NDArray[Any] | None = None
            self.specimen_family: str | None = specimen
        else:
            self._specimen_image = np.asarray(specimen)
            self.specimen_family = None
        if exposure_ms < 0 or not math.isfinite(exposure_ms):
            raise ValueError(f"exposure_ms={exposure_ms!r} must be a finite value >= 0.")
        if settle_time_s < 0:
            raise ValueError(f"settle_time_s={settle_time_s!r} must be >= 0.")

        seeds = np.random.SeedSequence(seed)
        slide_seed, noise_seed = seeds.spawn(2)
        self.seed = seed
        self._slide_seed = int(slide_seed.generate_state(1)[0] % (2**31))
        self._rng = np.random.default_rng(noise_seed)
        self.specimen_pixel_um = specimen_pixel_um
        self.brightness = float(brightness)
        self.slide_size_um = slide_size_um
        self.sensor_shape: tuple[int, int] = (h, w)
        self.true_focus_um = float(true_focus_um)
        self.tilt: tuple[float, float] = (float(tilt[0]), float(tilt[1]))
        self.drift_um_per_s = float(drift_um_per_s)
        self.clock = SimClock(time_scale)
        self.camera_model = camera_model if camera_model is not None else CameraModel()
        self.noise = bool(noise)
        self.exposure_ms = float(exposure_ms)
        self.realtime_exposure = bool(realtime_exposure)
        self.aberrations: dict[int, float] = dict(aberrations or {})
        self.z_limits_um = _limits(z_limits_um, "z_limits_um")
        self.xy_limits_um = (
            _limits(xy_limits_um[0], "xy_limits_um[0]"),
            _limits(xy_limits_um[1], "xy_limits_um[1]"),
        )
        self.settle_time_s = float(settle_time_s)
        self.faults = faults if faults is not None else SimFaults()

        turret = list(OBJECTIVES.values())
        if obj.name not in OBJECTIVES or OBJECTIVES[obj.name] != obj:
            turret = [o for o in turret if o.name != obj.name] + [obj]
        self.turret: tuple[Objective, ...] = tuple(turret)
        self._objective_index = next(i for i, o in enumerate(self.turret) if o.name == obj.name)

        # stage state: hardware coordinates = reported + origin
        self._z_hw = 0.0
        self._z_origin = 0.0
        self._xy_hw = (0.0, 0.0)
        self._xy_origin = (0.0, 0.0)
        self._z_settled_at = 0.0
        self._xy_settled_at = 0.0

        self._slides: dict[str, SlideLike] = {}
        self._cache: OrderedDict[tuple[Any, ...], FloatImage] = OrderedDict()
        self._cache_size = 8
        self._lock = threading.RLock()
        self._core_ref: weakref.ReferenceType[CMMCorePlus] | None = None
        self._pixel_config: str | None = None
        self._slide_for(self.objective)  # generate now, so that the first snap is fast

    # ---------------------------------------------------------------- objective/slide
    @property
    def objective(self) -> Objective:
        """The objective in the light path."""
        return self.turret[self._objective_index]

    @property
    def objective_index(self) -> int:
        """Turret position of the current objective."""
        return self._objective_index

    @property
    def pixel_size_um(self) -> float:
        """Sample-plane pixel size of the current objective (um)."""
        return self.objective.pixel_size_um

    @property
    def slide(self) -> SlideLike:
        """The specimen slide sampled at the current objective's pixel size.

        Procedural slides cover ``slide_size_um`` (default three sensor widths at the
        current pixel size, so each objective gets a slide of the same pixel count,
        generated with the same seed); image slides are resampled from the image.
        """
        return self._slide_for(self.objective)

    def _slide_for(self, obj: Objective) -> SlideLike:
        with self._lock:
            slide = self._slides.get(obj.name)
            if slide is None:
                slide = self._make_slide(obj)
                self._slides[obj.name] = slide
            return slide

    def _make_slide(self, obj: Objective) -> SlideLike:
        px = obj.pixel_size_um
        if self._specimen_image is not None:
            return ImageSlide(
                self._specimen_image,
                px,
                image_pixel_um=self.specimen_pixel_um,
                brightness=self.brightness,
            )
        assert self.specimen_family is not None
        size_um = self.slide_size_um or 3 * max(self.sensor_shape) * px
        return Slide(
            self.specimen_family,
            size_um=size_um,
            pixel_size_um=px,
            seed=self._slide_seed,
            brightness=self.brightness,
        )

    def set_objective(self, objective: str | Objective | int) -> None:
        """Turn the turret to ``objective`` (a name, an ``Objective`` or a position).

        When the simulation is installed on a core this goes through the core
        (``core.setState("Objective", position)``), so the pixel-size configuration, the
        property cache and the core's events follow.
        """
        index = self._turret_index(objective)
        core = self.core
        if core is not None and OBJECTIVE_LABEL in core.getLoadedDevices():
            core.setState(OBJECTIVE_LABEL, index)
        else:
            self._apply_objective(index)

    def _turret_index(self, objective: str | Objective | int) -> int:
        if isinstance(objective, int):
            if not 0 <= objective < len(self.turret):
                raise ValueError(
                    f"Turret position {objective!r} does not exist; use 0..{len(self.turret) - 1}."
                )
            return objective
        name = objective.name if isinstance(objective, Objective) else objective
        for i, o in enumerate(self.turret):
            if o.name == name:
                if isinstance(objective, Objective) and o != objective:
                    break
                return i
        raise ValueError(
            f"Objective {objective!r} is not on the simulated turret; use one of "
            f"{[o.name for o in self.turret]} or pass it to simulated_microscope(objective=...)."
        )

    def _apply_objective(self, index: int) -> None:
        with self._lock:
            self._objective_index = int(index)
            self._cache.clear()
        self._slide_for(self.objective)  # generate the new objective's slide now
        self._sync_pixel_config()

    # ---------------------------------------------------------------- core link
    @property
    def core(self) -> CMMCorePlus | None:
        """The core this simulation is installed on (None if not installed or gone)."""
        return self._core_ref() if self._core_ref is not None else None

    def _sync_pixel_config(self) -> None:
        core = self.core
        if core is None:
            return
        name = pixel_config_name(self.objective)
        if self._pixel_config == name:
            return
        if (
            self._pixel_config is not None
            and self._pixel_config in core.getAvailablePixelSizeConfigs()
        ):
            core.deletePixelSizeConfig(self._pixel_config)
        # Empty pixel configurations always match the system state, so only the current
        # objective's is kept defined (Micro-Manager cannot key them on a Python device).
        core.definePixelSizeConfig(name)
        core.setPixelSizeUm(name, self.objective.pixel_size_um)
        core.setPixelSizeConfig(name)
        self._pixel_config = name

    # ---------------------------------------------------------------- time and focus
    def now(self) -> float:
        """Simulated time (s)."""
        return self.clock.now()

    def advance(self, seconds: float) -> None:
        """Advance the simulated clock (e.g. to let the focus drift)."""
        self.clock.advance(seconds)

    def _focus_hw(self, x_hw: float, y_hw: float, t: float) -> float:
        return (
            self.true_focus_um
            + self.tilt[0] * x_hw
            + self.tilt[1] * y_hw
            + self.drift_um_per_s * t
        )

    def true_focus_at(
        self, x_um: float | None = None, y_um: float | None = None, t: float | None = None
    ) -> float:
        """Stage z (reported coordinates) that brings the specimen point ``(x, y)`` into focus.

        Defaults: the centre of the current field of view and the current simulated time.
        """
        x_hw, y_hw = self._xy_hw_of(x_um, y_um)
        t = self.now() if t is None else float(t)
        return self._focus_hw(x_hw, y_hw, t) - self._z_origin

    def set_true_focus(
        self,
        z_um: float,
        *,
        x_um: float | None = None,
        y_um: float | None = None,
        t: float | None = None,
    ) -> None:
        """Shift the specimen so that :meth:`true_focus_at` ``(x, y, t)`` equals ``z_um``."""
        current = self.true_focus_at(x_um, y_um, t)
        self.true_focus_um += float(z_um) - current

    def _xy_hw_of(self, x_um: float | None, y_um: float | None) -> tuple[float, float]:
        x_hw = self._xy_hw[0] if x_um is None else float(x_um) + self._xy_origin[0]
        y_hw = self._xy_hw[1] if y_um is None else float(y_um) + self._xy_origin[1]
        return x_hw, y_hw

    def defocus(
        self,
        z_um: float | None = None,
        x_um: float | None = None,
        y_um: float | None = None,
        t: float | None = None,
    ) -> float:
        """Defocus (um) at the centre of the field: stage z minus true focus."""
        z = self.z_um if z_um is None else float(z_um)
        return z - self.true_focus_at(x_um, y_um, t)

    def defocus_map(
        self,
        z_um: float | None = None,
        x_um: float | None = None,
        y_um: float | None = None,
        t: float | None = None,
    ) -> FloatImage:
        """Per-pixel defocus (um) of the sensor field, ``(H, W)``."""
        h, w = self.sensor_shape
        px = self.pixel_size_um
        d0 = self.defocus(z_um, x_um, y_um, t)
        cols = (np.arange(w) - (w - 1) / 2) * px
        rows = (np.arange(h) - (h - 1) / 2) * px
        return d0 - self.tilt[0] * cols[None, :] - self.tilt[1] * rows[:, None]

    # ---------------------------------------------------------------- rendering
    def optical_image(
        self,
        z_um: float | None = None,
        x_um: float | None = None,
        y_um: float | None = None,
        *,
        t: float | None = None,
    ) -> FloatImage:
        """Noiseless optical image of the sensor field (float, object units), cached.

        ``None`` means the current stage position / simulated time. The result is
        read-only; repeated calls with the same field and defocus (to 1 nm) are free.
        """
        obj = self.objective
        t = self.now() if t is None else float(t)  # one instant for the whole frame
        x_hw, y_hw = self._xy_hw_of(x_um, y_um)
        d0 = self.defocus(z_um, x_um, y_um, t)
        tilted = self.tilt != (0.0, 0.0)
        key = (
            obj.name,
            round(x_hw, 3),
            round(y_hw, 3),
            round(d0, 3),
            self.tilt,
            tuple(sorted(self.aberrations.items())),
            self.sensor_shape,
        )
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            slide = self.slide
        if tilted:
            dmap = self.defocus_map(z_um, x_um, y_um, t)
            dmax = float(np.abs(dmap).max())
            size = obj.psf_support_px(
                dmax, aberration_waves=sum(abs(v) for v in self.aberrations.values())
            )
            crop = slide.crop(x_hw, y_hw, self.sensor_shape, margin=size // 2)
            image = render_depth_variant(crop, dmap, obj, zernike_waves=self.aberrations)
        elif (
            not any(self.aberrations.values())
            and obj.geometric_blur_radius_um(d0) / obj.pixel_size_um > FAR_DEFOCUS_BLUR_PX
        ):
            # far out of focus at high NA: the PSF alone would take seconds (a camera
            # snap timing out); the field's few low frequencies from the geometric OTF
            size = obj.psf_support_px(d0)
            crop = slide.crop(x_hw, y_hw, self.sensor_shape, margin=size // 2)
            image = far_defocus_image(crop, d0, obj, self.sensor_shape)
        else:
            psf = objective_psf(obj, d0, zernike_waves=self.aberrations)
            crop = slide.crop(x_hw, y_hw, self.sensor_shape, margin=psf.shape[0] // 2)
            image = blur(crop, psf, mode="valid")
        image = np.ascontiguousarray(image, dtype=np.float64)
        image.setflags(write=False)
        with self._lock:
            self._cache[key] = image
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return image

    def auto_expose(self, fraction: float = 0.3, max_ms: float = 500.0) -> float:
        """Set the exposure as a microscopist would: the in-focus field's 99.9th percentile
        at ``fraction`` of the camera's full scale (capped at ``max_ms``). Returns it (ms)."""
        z = self.true_focus_at()
        peak = float(np.percentile(self.optical_image(z), 99.9))
        cam = self.camera_model
        full_e = (cam.max_adu - cam.offset_adu) * cam.gain_e_per_adu
        if peak <= 0 or cam.photons_per_ms <= 0:
            return self.exposure_ms
        self.exposure_ms = float(min(max_ms, fraction * full_e / (peak * cam.photons_per_ms)))
        return self.exposure_ms

    def clear_cache(self) -> None:
        """Forget cached optical images (e.g. to time rendering)."""
        with self._lock:
            self._cache.clear()

    def render(
        self,
        z_um: float | None = None,
        x_um: float | None = None,
        y_um: float | None = None,
        *,
        t: float | None = None,
        exposure_ms: float | None = None,
        noise: bool | None = None,
    ) -> Frame:
        """Camera frame (``uint16``) of the field at ``(z, x, y, t)``, no Micro-Manager.

        ``None`` means the current stage state, the current exposure and the
        simulation's ``noise`` setting. Noise differs on each call (seeded generator).
        """
        optical = self.optical_image(z_um, x_um, y_um, t=t)
        exposure = self.exposure_ms if exposure_ms is None else float(exposure_ms)
        use_noise = self.noise if noise is None else bool(noise)
        with self._lock:  # numpy Generators are not thread-safe
            return self.camera_model.expose(optical, exposure, self._rng, noise=use_noise)

    # ---------------------------------------------------------------- camera side
    def acquire(self, exposure_ms: float | None = None) -> Frame:
        """One camera frame at the current stage state, with the injected faults.

        Used by the simulated camera device. May block (``faults.snap_hang_s``), raise
        :class:`SimulatedHardwareError` or return a frame of the wrong shape.
        """
        start = time.perf_counter()
        f = self.faults
        if f.snap_hang_s > 0 and f.roll(f.snap_hang_rate):
            start = time.perf_counter()
            while time.perf_counter() - start < self.faults.snap_hang_s:
                time.sleep(0.01)
        if f.roll(f.snap_failure_rate):
            raise SimulatedHardwareError(
                f"Simulated camera fault: the snap failed (SimFaults.snap_failure_rate="
                f"{f.snap_failure_rate!r}). Set get_simulation(core).faults.snap_failure_rate"
                " = 0 to stop it."
            )
        frame = self.render(exposure_ms=exposure_ms)
        if f.roll(f.wrong_shape_rate):
            frame = frame[: max(1, frame.shape[0] // 2)].copy()
        if self.realtime_exposure:
            exposure = self.exposure_ms if exposure_ms is None else float(exposure_ms)
            remaining = exposure / 1000.0 - (time.perf_counter() - start)
            if remaining > 0:
                time.sleep(remaining)
        return frame

    # ---------------------------------------------------------------- stage side
    @property
    def z_um(self) -> float:
        """Focus stage position (reported coordinates)."""
        return self._z_hw - self._z_origin

    @property
    def xy_um(self) -> tuple[float, float]:
        """XY stage position (reported coordinates)."""
        return (self._xy_hw[0] - self._xy_origin[0], self._xy_hw[1] - self._xy_origin[1])

    @property
    def z_limits_reported(self) -> tuple[float, float]:
        """Focus travel limits in reported coordinates."""
        lo, hi = self.z_limits_um
        return lo - self._z_origin, hi - self._z_origin

    def _stage_fault(self, what: str) -> None:
        f = self.faults
        if f.roll(f.stage_error_rate):
            raise SimulatedHardwareError(
                f"Simulated stage fault: {what} failed (SimFaults.stage_error_rate="
                f"{f.stage_error_rate!r}). Set get_simulation(core).faults.stage_error_rate = 0 "
                "to stop it."
            )

    def move_z(self, z_um: float) -> None:
        """Move the focus stage (reported coordinates); raises outside the travel range."""
        z = float(z_um)
        if not math.isfinite(z):
            raise SimulatedHardwareError(f"Focus position {z_um!r} um is not a finite number.")
        lo, hi = self.z_limits_reported
        if not lo <= z <= hi:
            raise SimulatedHardwareError(
                f"Focus position {z!r} um is outside the stage travel [{lo!r}, {hi!r}] um."
            )
        self._stage_fault(f"focus move to z={z!r} um")
        self._z_hw = z + self._z_origin
        self._z_settled_at = time.perf_counter() + self.settle_time_s

    def move_xy(self, x_um: float, y_um: float) -> None:
        """Move the XY stage (reported coordinates); raises outside the travel range."""
        x, y = float(x_um), float(y_um)
        for value, (lo, hi), origin, axis in (
            (x, self.xy_limits_um[0], self._xy_origin[0], "x"),
            (y, self.xy_limits_um[1], self._xy_origin[1], "y"),
        ):
            if not math.isfinite(value) or not lo - origin <= value <= hi - origin:
                raise SimulatedHardwareError(
                    f"XY stage {axis}={value!r} um is outside the stage travel "
                    f"[{lo - origin!r}, {hi - origin!r}] um."
                )
        self._stage_fault(f"XY move to ({x!r}, {y!r}) um")
        self._xy_hw = (x + self._xy_origin[0], y + self._xy_origin[1])
        self._xy_settled_at = time.perf_counter() + self.settle_time_s

    def z_busy(self) -> bool:
        """Whether the focus stage is still moving / settling."""
        return self.faults.stage_never_settles or time.perf_counter() < self._z_settled_at

    def xy_busy(self) -> bool:
        """Whether the XY stage is still moving / settling."""
        return self.faults.stage_never_settles or time.perf_counter() < self._xy_settled_at

    def set_z_origin(self) -> None:
        """Make the current focus position read 0 (hardware position unchanged)."""
        self._z_origin = self._z_hw

    def set_xy_origin(self, x: bool = True, y: bool = True) -> None:
        """Make the current XY position read 0 on the chosen axes."""
        ox, oy = self._xy_origin
        self._xy_origin = (self._xy_hw[0] if x else ox, self._xy_hw[1] if y else oy)


# --------------------------------------------------------------------------------------
# Thin unicore devices
# --------------------------------------------------------------------------------------
class SimCameraDevice(SimpleCameraDevice):
    """Camera rendering the simulated specimen (all logic in the simulation)."""

    def __init__(self, sim: MicroscopeSimulation) -> None:
        super().__init__()
        self._sim = sim

    def get_exposure(self) -> float:
        return self._sim.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        value = float(exposure)
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"Exposure {exposure!r} ms must be a finite value >= 0.")
        self._sim.exposure_ms = value
        self.core.events.exposureChanged.emit(self.get_label(), value)

    def sensor_shape(self) -> tuple[int, int]:
        return self._sim.sensor_shape

    def dtype(self) -> DTypeLike:
        return np.uint16

    def snap(self, buffer: np.ndarray) -> Mapping:
        buffer[:] = self._sim.acquire()
        return {}

    def start_sequence(self, n: int | None, get_buffer: Any) -> Iterator[Mapping]:
        """Acquire ``n`` frames (or until stopped); crop a software ROI if set."""
        count = 0
        limit = n if n is not None else 2**63
        while count < limit:
            frame = self._sim.acquire()
            if frame.shape == self.sensor_shape():
                x, y, w, h = self.get_roi()
                frame = frame[y : y + h, x : x + w]
            # a faulty frame (other shape) is passed on as it is
            out = get_buffer(frame.shape, np.uint16)
            out[:] = frame
            yield {}
            count += 1


class SimFocusStageDevice(StageDevice):
    """Focus (Z) drive of the simulated microscope, with a limited ``Position`` property."""

    def __init__(self, sim: MicroscopeSimulation) -> None:
        super().__init__()
        self._sim = sim
        cls = type(self)
        self.register_property(
            "Position",
            getter=cls.get_position_um,
            setter=cls.set_position_um,
            limits=sim.z_limits_reported,
            property_type=float,
        )

    def get_position_um(self) -> float:
        return self._sim.z_um

    def set_position_um(self, val: float) -> None:
        self._sim.move_z(val)
        self.core.events.stagePositionChanged.emit(self.get_label(), self._sim.z_um)

    def busy(self) -> bool:
        return self._sim.z_busy()

    def home(self) -> None:
        self.set_position_um(0.0)

    def stop(self) -> None:
        pass  # moves are instantaneous; settling ends by itself

    def set_origin(self) -> None:
        self._sim.set_z_origin()
        self.set_property_limits("Position", self._sim.z_limits_reported)


class SimXYStageDevice(XYStageDevice):
    """XY stage of the simulated microscope."""

    def __init__(self, sim: MicroscopeSimulation) -> None:
        super().__init__()
        self._sim = sim

    def get_position_um(self) -> tuple[float, float]:
        return self._sim.xy_um

    def set_position_um(self, x: float, y: float) -> None:
        self._sim.move_xy(x, y)
        self.core.events.XYStagePositionChanged.emit(self.get_label(), *self._sim.xy_um)

    def busy(self) -> bool:
        return self._sim.xy_busy()

    def home(self) -> None:
        self.set_position_um(0.0, 0.0)

    def stop(self) -> None:
        pass

    def set_origin_x(self) -> None:
        self._sim.set_xy_origin(x=True, y=False)

    def set_origin_y(self) -> None:
        self._sim.set_xy_origin(x=False, y=True)


class SimObjectiveTurret(StateDevice):
    """Objective turret; its labels are the objective names (e.g. ``"10x/0.3"``)."""

    def __init__(self, sim: MicroscopeSimulation) -> None:
        super().__init__({i: o.name for i, o in enumerate(sim.turret)})
        self._sim = sim

    def get_state(self) -> int:
        return self._sim.objective_index

    def set_state(self, position: int) -> None:
        self._sim._apply_objective(int(position))


# --------------------------------------------------------------------------------------
# Public constructors
# --------------------------------------------------------------------------------------
def install_simulation(core: UniMMCore, sim: MicroscopeSimulation) -> None:
    """Load the simulated devices of ``sim`` into ``core`` and make them current.

    Loads ``"Camera"``, ``"Focus"``, ``"XY"`` and ``"Objective"``, sets the core's
    camera / focus / XY stage and defines the pixel-size configuration of the current
    objective (:func:`pixel_config_name`).
    """
    if core in _SIMULATIONS:
        raise ValueError(f"{core!r} already holds a simulated microscope; use a new core.")
    devices = (
        (CAMERA_LABEL, SimCameraDevice(sim)),
        (FOCUS_LABEL, SimFocusStageDevice(sim)),
        (XY_LABEL, SimXYStageDevice(sim)),
        (OBJECTIVE_LABEL, SimObjectiveTurret(sim)),
    )
    for label, device in devices:
        core.loadPyDevice(label, device)
        core.initializeDevice(label)
    core.setCameraDevice(CAMERA_LABEL)
    core.setFocusDevice(FOCUS_LABEL)
    core.setXYStageDevice(XY_LABEL)
    _SIMULATIONS[core] = sim
    _LIVE_CORES.add(core)
    sim._core_ref = weakref.ref(core)
    sim._sync_pixel_config()


def simulated_microscope(
    *,
    objective: str | Objective = "10x/0.3",
    specimen: str | ArrayLike = "tissue",
    specimen_pixel_um: float | None = None,
    brightness: float = 1.0,
    seed: int | None = 0,
    slide_size_um: float | None = None,
    sensor_shape: tuple[int, int] = (512, 512),
    true_focus_um: float = 0.0,
    tilt: tuple[float, float] = (0.0, 0.0),
    drift_um_per_s: float = 0.0,
    time_scale: float = 1.0,
    camera_model: CameraModel | None = None,
    noise: bool = True,
    exposure_ms: float = 10.0,
    realtime_exposure: bool = False,
    aberrations: Mapping[int, float] | None = None,
    z_limits_um: tuple[float, float] = (-5000.0, 5000.0),
    xy_limits_um: tuple[tuple[float, float], tuple[float, float]] = (
        (-50_000.0, 50_000.0),
        (-35_000.0, 35_000.0),
    ),
    settle_time_s: float = 0.0,
    faults: SimFaults | None = None,
    mm_path: str | None = None,
) -> UniMMCore:
    """A ``UniMMCore`` driving a simulated widefield microscope.

    Parameters
    ----------
    objective
        Preset name (see :data:`~bluesky_deepfocus.optics.OBJECTIVES`) or an
        :class:`~bluesky_deepfocus.optics.Objective`. All presets sit on the simulated
        turret (device ``"Objective"``); switch with ``core.setStateLabel("Objective",
        "20x/0.45")`` or ``get_simulation(core).set_objective("20x/0.45")``.
    specimen
        A family of :data:`~bluesky_deepfocus.specimens.FAMILIES` (generated as a
        :class:`~bluesky_deepfocus.specimens.Slide`) or a 2-D image array (e.g. a real
        micrograph), scaled so that its 99.5th percentile is ``brightness``.
    specimen_pixel_um
        Pixel size of an image specimen (um); it is resampled to the objective's pixel
        size. ``None``: the image is taken as sampled at the objective's pixel size.
    brightness
        Intensity scale of the specimen (bright structures near this value).
    seed
        Seeds the specimen and the camera noise (``None``: random).
    slide_size_um
        Side of a procedural slide (um), centred on stage (0, 0). Default: three sensor
        widths at the objective's pixel size (a 1536 px slide for a 512 px sensor,
        ~1 mm at 10x), so any objective generates in about a second.
    sensor_shape
        Camera ``(height, width)`` in pixels.
    true_focus_um
        Stage z at which stage (0, 0) is in focus at time 0.
    tilt
        Focus change (um) per um of x and of y (a tilted slide).
    drift_um_per_s
        Focus drift per simulated second.
    time_scale
        Simulated seconds per real second (``0`` freezes the clock except for
        ``get_simulation(core).advance(s)``).
    camera_model
        Noise, gain, offset and bit depth (default :class:`~.optics.CameraModel`).
    noise
        ``False`` makes frames noiseless (still digitized).
    exposure_ms
        Initial exposure.
    realtime_exposure
        Make each snap last at least the exposure time (real seconds); by default a
        snap takes only the rendering time.
    aberrations
        Zernike aberrations ``{noll_index: waves}`` of the objective (e.g. ``{11: 0.3}``).
    z_limits_um, xy_limits_um
        Stage travel; a move outside raises. The focus stage exposes its travel as the
        limits of its ``Position`` property.
    settle_time_s
        Real seconds a stage stays busy after each move.
    faults
        Injected faults (:class:`SimFaults`); changeable at run time through
        ``get_simulation(core).faults``.
    mm_path
        Micro-Manager folder for C++ adapters (see :func:`new_unicore`).

    Returns
    -------
    UniMMCore
        With devices ``"Camera"``, ``"Focus"``, ``"XY"``, ``"Objective"`` loaded and
        current, and a pixel-size configuration for the objective.

    Examples
    --------
    >>> core = simulated_microscope(sensor_shape=(64, 64), tilt=(0.01, 0.0))
    >>> core.getCurrentPixelSizeConfig()
    '10x_0.3'
    >>> get_simulation(core).set_objective("20x/0.45")
    >>> core.getCurrentPixelSizeConfig(), core.getPixelSizeUm()
    ('20x_0.45', 0.325)
    """
    sim = MicroscopeSimulation(
        objective=objective,
        specimen=specimen,
        specimen_pixel_um=specimen_pixel_um,
        brightness=brightness,
        seed=seed,
        slide_size_um=slide_size_um,
        sensor_shape=sensor_shape,
        true_focus_um=true_focus_um,
        tilt=tilt,
        drift_um_per_s=drift_um_per_s,
        time_scale=time_scale,
        camera_model=camera_model,
        noise=noise,
        exposure_ms=exposure_ms,
        realtime_exposure=realtime_exposure,
        aberrations=aberrations,
        z_limits_um=z_limits_um,
        xy_limits_um=xy_limits_um,
        settle_time_s=settle_time_s,
        faults=faults,
    )
    core = new_unicore(mm_path)
    install_simulation(core, sim)
    return core


def get_simulation(core: CMMCorePlus) -> MicroscopeSimulation:
    """The :class:`MicroscopeSimulation` behind a core made by :func:`simulated_microscope`.

    Raises
    ------
    KeyError
        If ``core`` is not a simulated microscope.
    """
    try:
        return _SIMULATIONS[core]
    except (KeyError, TypeError):
        raise KeyError(
            f"{core!r} is not a simulated microscope: create it with "
            "bluesky_deepfocus.sim.simulated_microscope()."
        ) from None
