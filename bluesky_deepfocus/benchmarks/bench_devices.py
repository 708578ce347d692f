"""Benchmark: simulated frame rendering, and the per-image cost of MMCamera + RunEngine.

Run ``python -m bluesky_deepfocus.benchmarks.bench_devices [--sensor 512] [--num 50]``.

It prints

(a) the time to render one frame of the simulated microscope at 100 um defocus with a
    10x/0.3 objective (median of several): with a new defocus each time (the PSF is
    computed), with the PSF already cached, and the camera noise alone;
(b) the per-image overhead of :class:`~bluesky_deepfocus.devices.MMCamera` driven by a
    RunEngine, with frame rendering excluded: a Python camera copies a precomputed frame,
    and the time per event of ``RE(bp.count([camera], num=N))`` is compared with the bare
    ``core.snapImage(); core.getImage()`` time. No subscribers, no storage.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from pymmcore_plus.experimental.unicore import UniMMCore

__all__ = ["main", "time_count_overhead", "time_render"]


def _median_time(fn: Callable[[int], object], repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_render(
    sensor: int = 512, defocus_um: float = 100.0, repeats: int = 7
) -> dict[str, float]:
    """Median seconds to render one ``sensor x sensor`` frame at ``defocus_um`` (10x/0.3)."""
    from bluesky_deepfocus.sim import MicroscopeSimulation

    sim = MicroscopeSimulation(
        objective="10x/0.3", sensor_shape=(sensor, sensor), seed=0, time_scale=0.0
    )
    sim.render(defocus_um)  # warm up (imports, FFT plans)

    def new_defocus(i: int) -> None:
        sim.clear_cache()
        sim.render(defocus_um + 0.01 * (i + 1))  # a new PSF each time (0.01 um quantum)

    def cached_psf(i: int) -> None:
        sim.clear_cache()
        sim.render(defocus_um)

    optical = sim.optical_image(defocus_um)

    def noise_only(i: int) -> None:
        sim.camera_model.expose(optical, sim.exposure_ms, np.random.default_rng(i))

    return {
        "new_defocus_s": _median_time(new_defocus, repeats),
        "cached_psf_s": _median_time(cached_psf, repeats),
        "noise_only_s": _median_time(noise_only, repeats),
    }


def _precomputed_camera_core(frame: np.ndarray) -> UniMMCore:
    from pymmcore_plus.experimental.unicore import SimpleCameraDevice

    from bluesky_deepfocus.sim import new_unicore

    class PrecomputedCamera(SimpleCameraDevice):
        """Copies a fixed frame: snap cost is a memcpy."""

        def get_exposure(self) -> float:
            return 10.0

        def set_exposure(self, exposure: float) -> None:
            pass

        def sensor_shape(self) -> tuple[int, int]:
            return (int(frame.shape[0]), int(frame.shape[1]))

        def dtype(self) -> type[np.uint16]:
            return np.uint16

        def snap(self, buffer: np.ndarray) -> Mapping:
            buffer[:] = frame
            return {}

    core = new_unicore()
    core.loadPyDevice("Camera", PrecomputedCamera())
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    return core


def time_count_overhead(sensor: int = 512, num: int = 50) -> dict[str, float]:
    """Per-image seconds: bare snap, ``RE(bp.count([camera], num))`` per event, overhead."""
    import bluesky.plans as bp
    from bluesky import RunEngine

    from bluesky_deepfocus.devices import MMCamera

    frame = np.random.default_rng(0).integers(100, 2000, (sensor, sensor), dtype=np.uint16)
    core = _precomputed_camera_core(frame)

    def bare(_: int) -> None:
        core.snapImage()
        core.getImage()

    bare(0)
    t0 = time.perf_counter()
    for i in range(num):
        bare(i)
    bare_s = (time.perf_counter() - t0) / num

    camera = MMCamera(core, name="camera")
    RE = RunEngine({}, call_returns_result=True)
    RE(bp.count([camera], num=2))  # warm up
    per_event = []
    for _ in range(3):
        t0 = time.perf_counter()
        RE(bp.count([camera], num=num))
        per_event.append((time.perf_counter() - t0) / num)
    event_s = statistics.median(per_event)
    return {"bare_snap_s": bare_s, "re_event_s": event_s, "overhead_s": event_s - bare_s}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sensor", type=int, default=512, help="square sensor side (px)")
    parser.add_argument("--defocus", type=float, default=100.0, help="defocus (um)")
    parser.add_argument("--repeats", type=int, default=7, help="renders per median")
    parser.add_argument("--num", type=int, default=50, help="events per bp.count")
    args = parser.parse_args(argv)

    r = time_render(args.sensor, args.defocus, args.repeats)
    s = args.sensor
    print(f"(a) render {s}x{s} frame, 10x/0.3, defocus {args.defocus:g} um (median):")
    print(f"    new defocus (PSF computed) : {r['new_defocus_s'] * 1e3:8.1f} ms")
    print(f"    PSF cached                 : {r['cached_psf_s'] * 1e3:8.1f} ms")
    print(f"    camera noise only          : {r['noise_only_s'] * 1e3:8.1f} ms")
    o = time_count_overhead(args.sensor, args.num)
    print(f"(b) MMCamera + RunEngine, precomputed {s}x{s} frame, bp.count num={args.num}:")
    print(f"    bare snapImage + getImage  : {o['bare_snap_s'] * 1e3:8.2f} ms/image")
    print(f"    RE per event               : {o['re_event_s'] * 1e3:8.2f} ms/image")
    print(f"    overhead (RE + MMCamera)   : {o['overhead_s'] * 1e3:8.2f} ms/image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
