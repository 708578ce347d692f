"""The simulated microscope: physics, Micro-Manager integration and fault injection."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from bluesky_deepfocus.optics import get_objective
from bluesky_deepfocus.sim import (
    ImageSlide,
    MicroscopeSimulation,
    SimFaults,
    SimulatedHardwareError,
    get_simulation,
    new_unicore,
    pixel_config_name,
    simulated_microscope,
)

SMALL = (128, 128)


def normalized_variance(img: np.ndarray) -> float:
    """Classic sharpness: variance over mean (higher is sharper)."""
    a = np.asarray(img, dtype=np.float64)
    return float(a.var() / a.mean())


def gradient_energy(img: np.ndarray) -> float:
    a = np.asarray(img, dtype=np.float64)
    return float((np.diff(a, axis=0) ** 2).mean() + (np.diff(a, axis=1) ** 2).mean())


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def pymm_log():
    """Warnings and errors of pymmcore-plus's logger (it may not propagate to root)."""
    handler = _Capture()
    log = logging.getLogger("pymmcore-plus")
    log.addHandler(handler)
    yield handler.records
    log.removeHandler(handler)


@pytest.fixture
def core():
    return simulated_microscope(sensor_shape=SMALL, seed=1, time_scale=0.0)


@pytest.fixture
def sim(core):
    return get_simulation(core)


# ---------------------------------------------------------------- construction
def test_construction_logs_no_error(pymm_log, monkeypatch):
    monkeypatch.delenv("MICROMANAGER_PATH", raising=False)
    core = simulated_microscope(sensor_shape=(32, 32))
    new_unicore()
    assert core.getLoadedDevices()  # really constructed
    assert [r.getMessage() for r in pymm_log if r.levelno >= logging.ERROR] == []


def test_devices_are_current_and_pixel_config(core):
    assert core.getCameraDevice() == "Camera"
    assert core.getFocusDevice() == "Focus"
    assert core.getXYStageDevice() == "XY"
    assert core.getPixelSizeUm() == pytest.approx(0.65)
    assert core.getCurrentPixelSizeConfig() == pixel_config_name("10x/0.3") == "10x_0.3"
    assert core.getStateLabel("Objective") == "10x/0.3"
    assert core.guessObjectiveDevices() == ["Objective"]


def test_switch_objective_updates_pixel_config_and_field(core, sim):
    core.snapImage()
    before = core.getImage().copy()
    sim.set_objective("20x/0.45")
    assert core.getStateLabel("Objective") == "20x/0.45"
    assert core.getPixelSizeUm() == pytest.approx(0.325)
    assert core.getCurrentPixelSizeConfig() == "20x_0.45"
    assert sim.objective == get_objective("20x/0.45")
    core.setStateLabel("Objective", "10x/0.3")  # through Micro-Manager, back again
    assert sim.objective.name == "10x/0.3"
    assert core.getPixelSizeUm() == pytest.approx(0.65)
    assert core.getAvailablePixelSizeConfigs() == ("10x_0.3",)
    core.snapImage()
    assert core.getImage().shape == before.shape
    with pytest.raises(ValueError, match="not on the simulated turret"):
        sim.set_objective("13x/0.2")


def test_get_simulation_of_a_plain_core_raises():
    with pytest.raises(KeyError, match="not a simulated microscope"):
        get_simulation(new_unicore())


def test_bad_arguments_are_rejected():
    with pytest.raises(KeyError, match="Unknown specimen family 'nope'"):
        MicroscopeSimulation(specimen="nope")
    with pytest.raises(ValueError, match="2-D array"):
        MicroscopeSimulation(specimen=np.zeros((8, 8, 3)), sensor_shape=(8, 8))
    with pytest.raises(ValueError, match="probability"):
        SimFaults(snap_failure_rate=2.0)
    with pytest.raises(ValueError, match="time_scale"):
        MicroscopeSimulation(time_scale=-1.0, sensor_shape=(8, 8))


# ---------------------------------------------------------------- rendering
def test_snap_through_micromanager(core, sim):
    core.setPosition(0.0)
    core.snapImage()
    img = core.getImage()
    assert img.shape == SMALL and img.dtype == np.uint16
    assert core.getImageWidth() == SMALL[1] and core.getBytesPerPixel() == 2
    core.setROI(10, 20, 64, 32)
    core.snapImage()
    roi = core.getImage()
    assert roi.shape == (32, 64)
    core.clearROI()


def test_noiseless_render_is_deterministic_and_cached(sim):
    a = sim.render(12.0, noise=False)
    b = sim.render(12.0, noise=False)
    np.testing.assert_array_equal(a, b)
    assert sim.optical_image(12.0) is sim.optical_image(12.0)  # cache hit
    other = MicroscopeSimulation(sensor_shape=SMALL, seed=1, time_scale=0.0)
    np.testing.assert_array_equal(other.render(12.0, noise=False), a)
    # noise differs from snap to snap
    assert not np.array_equal(sim.render(12.0), sim.render(12.0))


def test_psf_conserves_energy_no_dark_borders():
    flat = MicroscopeSimulation(specimen=np.full((300, 300), 7.0), sensor_shape=SMALL)
    for z in (0.0, 40.0, -120.0):
        np.testing.assert_allclose(flat.optical_image(z), 1.0, rtol=1e-6)
    sim = MicroscopeSimulation(specimen="tissue", sensor_shape=SMALL, seed=3)
    focused, blurred = sim.optical_image(0.0), sim.optical_image(60.0)
    assert blurred.mean() == pytest.approx(focused.mean(), rel=0.03)
    inner = (slice(32, -32), slice(32, -32))
    assert blurred[inner].mean() == pytest.approx(focused[inner].mean(), rel=0.05)
    assert normalized_variance(blurred) < 0.5 * normalized_variance(focused)


def test_sharpness_peaks_at_true_focus(sim):
    sim.set_true_focus(-7.0)
    zs = np.arange(-40.0, 41.0, 5.0)
    scores = [normalized_variance(sim.optical_image(z)) for z in zs]
    assert zs[int(np.argmax(scores))] == pytest.approx(-5.0, abs=2.6)  # nearest grid point
    assert sim.true_focus_at() == pytest.approx(-7.0)


def test_tilt_makes_one_side_sharper():
    sim = MicroscopeSimulation(sensor_shape=(128, 256), tilt=(0.25, 0.0), seed=2)
    half_width_um = 128 * sim.pixel_size_um
    right_focus = sim.true_focus_at(x_um=0.8 * half_width_um)
    left_focus = sim.true_focus_at(x_um=-0.8 * half_width_um)
    assert right_focus - left_focus == pytest.approx(0.25 * 1.6 * half_width_um)
    img = sim.optical_image(right_focus)
    left, right = img[:, :96], img[:, -96:]
    assert gradient_energy(right) > 2 * gradient_energy(left)
    img = sim.optical_image(left_focus)
    assert gradient_energy(img[:, :96]) > 2 * gradient_energy(img[:, -96:])


def test_drift_moves_focus_with_simulated_time():
    sim = MicroscopeSimulation(
        sensor_shape=SMALL, drift_um_per_s=0.5, time_scale=0.0, true_focus_um=2.0
    )
    assert sim.true_focus_at() == pytest.approx(2.0)
    sharp_before = normalized_variance(sim.optical_image(2.0))
    sim.advance(60.0)
    assert sim.now() == pytest.approx(60.0)
    assert sim.true_focus_at() == pytest.approx(32.0)
    assert normalized_variance(sim.optical_image(2.0)) < 0.5 * sharp_before
    assert normalized_variance(sim.optical_image(32.0)) == pytest.approx(sharp_before, rel=1e-6)


def test_time_scale_compresses_time():
    sim = MicroscopeSimulation(sensor_shape=(16, 16), drift_um_per_s=1.0, time_scale=100.0)
    t0 = sim.now()
    time.sleep(0.05)
    assert sim.now() - t0 >= 4.0


def test_xy_moves_change_the_field(core, sim):
    core.snapImage()
    img0 = sim.optical_image()
    shift_px = 10
    core.setXYPosition(shift_px * sim.pixel_size_um, 0.0)
    assert core.getXYPosition() == pytest.approx((6.5, 0.0))
    img1 = sim.optical_image()
    assert not np.allclose(img0, img1)
    # the field moved by exactly 10 pixels (no wrap-around, shift-invariant blur)
    np.testing.assert_allclose(img1[:, :-shift_px], img0[:, shift_px:], rtol=1e-6, atol=1e-9)


def test_image_specimen_real_micrograph():
    skdata = pytest.importorskip("skimage.data")
    cell = skdata.cell()  # phase-contrast cells, 660 x 550
    core = simulated_microscope(
        specimen=cell, specimen_pixel_um=0.325, sensor_shape=SMALL, noise=False
    )
    sim = get_simulation(core)
    assert sim.slide.data.shape == pytest.approx((cell.shape[0] / 2, cell.shape[1] / 2), abs=1)
    assert isinstance(sim.slide, ImageSlide)
    core.snapImage()
    assert core.getImage().shape == SMALL
    assert normalized_variance(sim.optical_image(0.0)) > normalized_variance(
        sim.optical_image(50.0)
    )


def test_stage_travel_limits(core, sim):
    assert core.hasPropertyLimits("Focus", "Position")
    assert core.getPropertyUpperLimit("Focus", "Position") == 5000.0
    with pytest.raises(SimulatedHardwareError, match="outside the stage travel"):
        core.setPosition(6000.0)
    assert core.getPosition() == 0.0
    with pytest.raises(SimulatedHardwareError, match="outside the stage travel"):
        core.setXYPosition(0.0, 1e6)


def test_set_origin_keeps_physics(core, sim):
    sim.set_true_focus(20.0)
    core.setPosition(20.0)
    core.setOrigin()
    assert core.getPosition() == 0.0
    assert sim.true_focus_at() == pytest.approx(0.0)
    assert core.getPropertyUpperLimit("Focus", "Position") == pytest.approx(4980.0)


# ---------------------------------------------------------------- faults
def test_fault_snap_failure(core, sim):
    sim.faults = SimFaults(snap_failure_rate=1.0, seed=0)
    with pytest.raises(SimulatedHardwareError, match="snap failed"):
        core.snapImage()
    sim.faults.snap_failure_rate = 0.0
    core.snapImage()


def test_fault_rates_are_seeded():
    a = SimFaults(snap_failure_rate=0.5, seed=7)
    b = SimFaults(snap_failure_rate=0.5, seed=7)
    draws = [a.roll(0.5) for _ in range(50)]
    assert draws == [b.roll(0.5) for _ in range(50)]
    assert 5 < sum(draws) < 45


def test_fault_wrong_shape(core, sim):
    sim.faults.wrong_shape_rate = 1.0
    core.snapImage()
    assert core.getImage().shape == (SMALL[0] // 2, SMALL[1])
    assert core.getImageHeight() == SMALL[0]  # what Micro-Manager reports


def test_fault_snap_hang_and_release(core, sim):
    sim.faults.snap_hang_s = 0.3
    t0 = time.perf_counter()
    core.snapImage()
    assert time.perf_counter() - t0 >= 0.3
    sim.faults.snap_hang_s = 0.0
    t0 = time.perf_counter()
    core.snapImage()
    assert time.perf_counter() - t0 < 0.3


def test_fault_stage_error_and_never_settles(core, sim):
    sim.faults = SimFaults(stage_error_rate=1.0)
    with pytest.raises(SimulatedHardwareError, match="stage fault"):
        core.setPosition(10.0)
    assert core.getPosition() == 0.0
    sim.faults = SimFaults(stage_never_settles=True)
    core.setPosition(10.0)
    core.setTimeoutMs(100)
    assert core.deviceBusy("Focus")
    with pytest.raises(TimeoutError):
        core.waitForDevice("Focus")
    sim.faults.stage_never_settles = False
    core.waitForDevice("Focus")


def test_settle_time(core, sim):
    sim.settle_time_s = 0.1
    core.setPosition(5.0)
    assert core.deviceBusy("Focus")
    core.waitForDevice("Focus")
    assert not core.deviceBusy("Focus")


def test_realtime_exposure():
    core = simulated_microscope(sensor_shape=(16, 16), realtime_exposure=True, exposure_ms=150)
    t0 = time.perf_counter()
    core.snapImage()
    assert time.perf_counter() - t0 >= 0.15
