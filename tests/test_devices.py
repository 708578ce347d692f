"""Ophyd devices over CMMCorePlus: bluesky plans, contracts, failures and timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky.utils import FailedStatus
from event_model import DocumentNames, schema_validators
from ophyd.utils import LimitError as OphydLimitError
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, StageDevice

from bluesky_deepfocus.devices import (
    DeviceTimeoutError,
    LimitError,
    MMCamera,
    MMFocusStage,
    MMXYStage,
    frame_spec,
)
from bluesky_deepfocus.errors import DeviceFault
from bluesky_deepfocus.sim import SimFaults, get_simulation, new_unicore, simulated_microscope

SMALL = (128, 128)


def normalized_variance(img: np.ndarray) -> float:
    """Classic sharpness: variance over mean (higher is sharper)."""
    a = np.asarray(img, dtype=np.float64)
    return float(a.var() / a.mean())


@pytest.fixture
def core():
    return simulated_microscope(sensor_shape=SMALL, seed=4, time_scale=0.0)


@pytest.fixture
def sim(core):
    return get_simulation(core)


@pytest.fixture
def camera(core):
    return MMCamera(core, name="camera", timeout=5.0)


@pytest.fixture
def focus(core):
    return MMFocusStage(core, name="focus", timeout=5.0)


def validate(docs) -> None:
    for name, doc in docs:
        schema_validators[DocumentNames(name)].validate(doc)


# ---------------------------------------------------------------- plans on the simulator
@pytest.mark.parametrize("true_focus", [0.0, 15.0])
def test_scan_images_sharpest_at_true_focus(RE, docs, core, sim, camera, focus, true_focus):
    sim.set_true_focus(true_focus)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(bp.scan([camera], focus, -50, 50, 21))
    events = docs.of("event")
    assert len(events) == 21
    zs = np.array([e["data"]["focus"] for e in events])
    np.testing.assert_allclose(zs, np.linspace(-50, 50, 21))
    scores = [normalized_variance(e["data"]["camera_image"]) for e in events]
    assert zs[int(np.argmax(scores))] == pytest.approx(true_focus)
    (descriptor,) = docs.of("descriptor")
    key = descriptor["data_keys"]["camera_image"]
    assert key["shape"] == list(SMALL)
    assert key["dtype"] == "array" and key["dtype_numpy"] == "<u2"
    assert descriptor["hints"]["focus"]["fields"] == ["focus"]
    config = descriptor["configuration"]["camera"]["data"]
    assert config["camera_pixel_size_um"] == pytest.approx(0.65)
    assert config["camera_objective"] == "10x/0.3"
    assert config["camera_pixel_config"] == "10x_0.3"
    assert list(config["camera_roi"]) == [0, 0, SMALL[1], SMALL[0]]
    validate(docs)


def test_read_keys_equal_describe_keys(RE, camera, focus, core):
    RE(bps.trigger(camera, wait=True))
    for dev in (camera, focus):
        assert set(dev.read()) == set(dev.describe())
        assert set(dev.read_configuration()) == set(dev.describe_configuration())
    assert set(camera.read()) == {"camera_image"}
    assert set(focus.read()) == {"focus", "focus_setpoint"}
    assert camera.read()["camera_image"]["value"].dtype == np.uint16


def test_exposure_is_configurable(RE, camera, core):
    RE(bps.mv(camera.exposure_ms, 25.0))
    assert core.getExposure() == 25.0
    assert camera.read_configuration()["camera_exposure_ms"]["value"] == 25.0
    core.setROI(0, 0, 64, 32)
    assert camera.describe()["camera_image"]["shape"] == [32, 64]
    camera.trigger().wait(5)
    assert camera.image.get().shape == (32, 64)


def test_relative_moves(RE, focus, core):
    RE(bps.mv(focus, 10.0))
    RE(bps.mvr(focus, -4.0))
    assert core.getPosition() == pytest.approx(6.0)
    assert focus.position == pytest.approx(6.0)
    RE(bp.rel_scan([focus], focus, -2, 2, 3))
    assert core.getPosition() == pytest.approx(6.0)  # rel_scan returns to the start


def test_grid_scan_xy_keeps_other_axis(RE, docs, core, camera):
    xy = MMXYStage(core, name="xy", limits=((-500, 500), (-500, 500)))
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(bp.grid_scan([camera], xy.y, -10, 10, 2, xy.x, 0, 30, 3))
    events = docs.of("event")
    got = [(e["data"]["xy_x"], e["data"]["xy_y"]) for e in events]
    assert got == [(x, y) for y in (-10.0, 10.0) for x in (0.0, 15.0, 30.0)]
    images = [e["data"]["camera_image"] for e in events]
    assert not np.array_equal(images[0], images[1])
    RE(bps.mv(xy.x, 100.0))
    assert core.getXYPosition() == pytest.approx((100.0, 10.0))
    RE(bps.mv(xy.x, -1.0, xy.y, 2.0))  # both axes at once
    assert core.getXYPosition() == pytest.approx((-1.0, 2.0))
    assert xy.x.limits == (-500.0, 500.0)
    with pytest.raises(LimitError, match=r"requested position 600\.0 um is outside"):
        RE(bps.mv(xy.y, 600.0))
    assert core.getXYPosition() == pytest.approx((-1.0, 2.0))


# ---------------------------------------------------------------- other Python devices
class BareCamera(SimpleCameraDevice):
    """A minimal camera: a ramp image whose contrast falls with |z - 3| of a shared dict."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = state
        self._exposure = 5.0

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = exposure

    def sensor_shape(self) -> tuple[int, int]:
        return (40, 60)

    def dtype(self):
        return np.uint8

    def snap(self, buffer: np.ndarray) -> Mapping:
        if self._state.get("block") is not None:
            self._state["block"].wait(10)
        if self._state.get("fail"):
            raise RuntimeError("sensor overheated (bare camera)")
        contrast = 100.0 / (1.0 + abs(self._state["z"] - 3.0))
        ramp = np.linspace(-1, 1, 60)[None, :] * np.ones((40, 1))
        buffer[:] = np.clip(120 + contrast * ramp, 0, 255).astype(np.uint8)
        return {}


class BareStage(StageDevice):
    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = state

    def get_position_um(self) -> float:
        return self._state["z"]

    def set_position_um(self, val: float) -> None:
        if self._state.get("stage_fail"):
            raise RuntimeError("motor stalled (bare stage)")
        self._state["z"] = val

    def busy(self) -> bool:
        return bool(self._state.get("stuck"))

    def home(self) -> None:
        self._state["z"] = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        pass


@pytest.fixture
def bare():
    state: dict = {"z": 0.0}
    core = new_unicore()
    core.loadPyDevice("Cam", BareCamera(state))
    core.loadPyDevice("Z", BareStage(state))
    core.initializeAllDevices()
    core.setCameraDevice("Cam")
    core.setFocusDevice("Z")
    return core, state


def test_devices_work_on_other_python_devices(RE, docs, bare):
    core, _ = bare
    camera = MMCamera(core, name="cam")
    focus = MMFocusStage(core, name="z", limits=(-10, 10))
    assert focus.limits == (-10.0, 10.0)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(bp.scan([camera], focus, -3, 9, 7))
    events = docs.of("event")
    assert [e["data"]["z"] for e in events] == [-3.0, -1.0, 1.0, 3.0, 5.0, 7.0, 9.0]
    images = [e["data"]["cam_image"] for e in events]
    assert images[0].shape == (40, 60) and images[0].dtype == np.uint8
    assert int(np.argmax([np.ptp(i) for i in images])) == 3  # z = 3
    (descriptor,) = docs.of("descriptor")
    assert descriptor["data_keys"]["cam_image"]["dtype_numpy"] == "|u1"
    config = descriptor["configuration"]["cam"]["data"]
    assert config["cam_pixel_size_um"] == 0.0 and config["cam_objective"] == ""
    validate(docs)


def test_bare_stage_without_limits(bare):
    core, _ = bare
    focus = MMFocusStage(core, name="z")
    assert focus.limits == (0.0, 0.0)  # unknown: ophyd's "no limits"
    focus.set(1234.0).wait(5)
    assert core.getPosition() == 1234.0


def test_rgb_frame_spec():
    class RGBCamera(BareCamera):
        def sensor_shape(self):
            return (8, 10, 3)

        def snap(self, buffer):
            buffer[:] = 7
            return {}

    core = new_unicore()
    core.loadPyDevice("Cam", RGBCamera({"z": 0.0}))
    core.initializeAllDevices()
    core.setCameraDevice("Cam")
    shape, dtype = frame_spec(core)
    assert shape == (8, 10, 3) and dtype.str == "|u1"
    camera = MMCamera(core, name="rgb")
    camera.trigger().wait(5)
    assert camera.describe()["rgb_image"]["shape"] == [8, 10, 3]
    assert camera.read()["rgb_image"]["value"].shape == (8, 10, 3)


# ---------------------------------------------------------------- bad input and failures
def test_move_outside_limits_raises_before_motion(RE, core, focus):
    assert focus.limits == (-5000.0, 5000.0)  # from the Position property limits
    RE(bps.mv(focus, 12.0))
    with pytest.raises(
        LimitError, match=r"12000\.0 um is outside the limits \(-5000\.0, 5000\.0\)"
    ):
        RE(bps.mv(focus, 12000.0))
    assert core.getPosition() == 12.0
    soft = MMFocusStage(core, name="soft", limits=(-100.0, 100.0))
    with pytest.raises(LimitError, match=r"outside the limits \(-100\.0, 100\.0\)") as info:
        soft.set(150.0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OphydLimitError)
    with pytest.raises(LimitError, match=r"112\.0 um"):
        RE(bps.mvr(soft, 100.0))
    assert core.getPosition() == 12.0
    with pytest.raises(ValueError, match="finite"):
        soft.set(float("nan"))
    with pytest.raises(ValueError, match="low < high"):
        MMFocusStage(core, name="bad", limits=(5.0, -5.0))


def test_constructor_errors(core):
    with pytest.raises(ValueError, match="'Nope' is not a camera loaded"):
        MMCamera(core, name="c", camera_label="Nope")
    with pytest.raises(ValueError, match="is not a \\(Z\\) stage"):
        MMFocusStage(core, name="f", stage_label="Camera")
    with pytest.raises(ValueError, match="timeout=0"):
        MMCamera(core, name="c", timeout=0)
    empty = new_unicore()
    with pytest.raises(ValueError, match="no current camera"):
        MMCamera(empty, name="c")


def test_read_before_trigger_says_what_to_do(camera):
    with pytest.raises(RuntimeError, match="trigger\\(\\) the camera before read"):
        camera.read()


def test_camera_error_fails_status_with_device_message(RE, sim, camera):
    sim.faults = SimFaults(snap_failure_rate=1.0)
    status = camera.trigger()
    with pytest.raises(DeviceFault, match="Simulated camera fault: the snap failed"):
        status.wait(5)
    assert "MMCamera 'camera'" in str(status.exception())
    with pytest.raises(FailedStatus):
        RE(bp.count([camera]))
    sim.faults.snap_failure_rate = 0.0
    camera.trigger().wait(5)


def test_bare_camera_error_and_block(bare):
    core, state = bare
    camera = MMCamera(core, name="cam", timeout=0.2)
    state["fail"] = True
    with pytest.raises(DeviceFault, match="sensor overheated \\(bare camera\\)"):
        camera.trigger().wait(5)
    state["fail"] = False
    state["block"] = release = threading.Event()
    t0 = time.perf_counter()
    status = camera.trigger()
    with pytest.raises(DeviceTimeoutError, match=r"did not complete within timeout=0\.2"):
        status.wait(5)
    assert time.perf_counter() - t0 < 2.0
    release.set()


def test_hanging_snap_fails_after_timeout(sim, core):
    camera = MMCamera(core, name="camera", timeout=0.2)
    sim.faults.snap_hang_s = 30.0
    t0 = time.perf_counter()
    status = camera.trigger()
    with pytest.raises(DeviceTimeoutError, match="snap did not complete within timeout"):
        status.wait(5)
    assert 0.2 <= time.perf_counter() - t0 < 2.0
    assert isinstance(status.exception(), TimeoutError)
    # a retry while the camera still hangs does not block the caller (the RunEngine)
    t0 = time.perf_counter()
    retry = camera.trigger()
    assert time.perf_counter() - t0 < 0.1
    with pytest.raises(DeviceTimeoutError):
        retry.wait(5)
    sim.faults.snap_hang_s = 0.0  # release the hung snaps
    camera.trigger().wait(5)


def test_wrong_shape_frame_fails_status(sim, camera):
    sim.faults.wrong_shape_rate = 1.0
    with pytest.raises(DeviceFault, match=r"returned a frame of shape \(64, 128\)"):
        camera.trigger().wait(5)


def test_stage_error_fails_status(RE, sim, core, focus):
    sim.faults = SimFaults(stage_error_rate=1.0)
    status = focus.set(10.0)
    with pytest.raises(DeviceFault, match=r"Simulated stage fault: focus move to z=10\.0"):
        status.wait(5)
    assert "MMFocusStage 'focus'" in str(status.exception())
    assert core.getPosition() == 0.0
    with pytest.raises(FailedStatus):
        RE(bps.mv(focus, 10.0))


def test_bare_stage_error(bare):
    core, state = bare
    focus = MMFocusStage(core, name="z")
    state["stage_fail"] = True
    with pytest.raises(DeviceFault, match="motor stalled \\(bare stage\\)"):
        focus.set(1.0).wait(5)


def test_stage_that_never_settles_times_out(sim, core):
    focus = MMFocusStage(core, name="focus", timeout=0.2)
    sim.faults.stage_never_settles = True
    t0 = time.perf_counter()
    status = focus.set(3.0)
    with pytest.raises(DeviceTimeoutError, match=r"move to 3\.0 um did not complete"):
        status.wait(5)
    assert time.perf_counter() - t0 < 2.0
    sim.faults.stage_never_settles = False
    focus.set(4.0).wait(5)
    assert focus.position == 4.0
    focus.stop()  # bluesky calls it on pause/abort: must not raise
