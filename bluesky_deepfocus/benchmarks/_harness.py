"""Shared benchmark machinery: simulated microscopes, calibrations and autofocus trials
driven through the real plans on a RunEngine (the benchmarks measure what users run)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..calibration import Calibration
from ..optics import get_objective
from ..scoring import FocusFunction
from ..search import DeepFocusSettings
from ..sim import MicroscopeSimulation, get_simulation, simulated_microscope
from ..spectral import frame_spectrum

__all__ = ["CAL_FAMILY", "CAL_SEED", "Bench", "Trial", "field_is_blank", "summarize"]

#: every benchmark calibrates on this family's field of this seed (the test specimens are
#: of other families, or other fields of it)
CAL_FAMILY = "tissue"
CAL_SEED = 7


@dataclass
class Trial:
    objective: str
    family: str
    seed: int
    strategy: str
    scorer: str
    budget: tuple[int, int]
    start_z: float
    true_focus: float
    final_z: float
    images: int
    converged: bool
    status: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.final_z - self.true_focus


class Bench:
    """One RunEngine, devices rebuilt per simulated microscope."""

    def __init__(
        self,
        sensor: int = 512,
        quiet: bool = True,
        settings: DeepFocusSettings | None = None,
        on_failure: str = "restore",
    ) -> None:
        from bluesky import RunEngine

        self.sensor = sensor
        self.settings = settings  # tuning of every strategy="deepfocus" trial
        self.on_failure = on_failure  # of every trial that does not set its own
        self.loop = asyncio.new_event_loop()
        self.RE = RunEngine({}, call_returns_result=True, loop=self.loop)
        self.plan_seconds = 0.0
        self.images = 0

    def microscope(
        self,
        objective: str,
        family: str | np.ndarray,
        seed: int,
        *,
        true_focus: float = 0.0,
        tilt: tuple[float, float] = (0.0, 0.0),
        slide_fovs: float = 1.3,
        specimen_pixel_um: float | None = None,
        auto_expose: bool = True,
        **kw: Any,
    ) -> tuple[Any, Any, Any, MicroscopeSimulation]:
        from ..devices import MMCamera, MMFocusStage

        obj = get_objective(objective)
        fov = self.sensor * obj.pixel_size_um
        core = simulated_microscope(
            objective=objective,
            specimen=family,
            specimen_pixel_um=specimen_pixel_um,
            seed=seed,
            sensor_shape=(self.sensor, self.sensor),
            slide_size_um=None
            if isinstance(family, np.ndarray)
            else fov * slide_fovs + 2 * 60 * math.tan(obj.half_angle) + 40 * obj.pixel_size_um,
            true_focus_um=true_focus,
            tilt=tilt,
            **kw,
        )
        camera = MMCamera(core, name="camera")
        focus = MMFocusStage(core, name="focus", limits=(-2000.0, 2000.0))
        sim = get_simulation(core)
        if auto_expose:
            sim.auto_expose()  # per specimen, as a microscopist would
        return core, camera, focus, sim

    def calibrate(
        self, camera: Any, focus: Any, scorer: FocusFunction, half_range: float, num: int
    ) -> Calibration:
        from ..plans import calibration_plan

        focus.move(0.0).wait(10)
        res = self.RE(calibration_plan(camera, focus, -half_range, half_range, num, scorer=scorer))
        return res.plan_result  # type: ignore[union-attr]

    def autofocus(
        self,
        camera: Any,
        focus: Any,
        sim: MicroscopeSimulation,
        cal: Calibration | None,
        scorer: FocusFunction,
        *,
        strategy: str,
        start_z: float,
        true_focus: float,
        budget: tuple[int, int],
        max_travel: float,
        family: str,
        seed: int,
        **kw: Any,
    ) -> Trial:
        from ..plans import autofocus_plan

        if strategy == "deepfocus" and self.settings is not None:
            kw.setdefault("settings", self.settings)
        kw.setdefault("on_failure", self.on_failure)
        sim.set_true_focus(true_focus)
        focus.move(start_z).wait(10)
        t = time.perf_counter()
        res = self.RE(
            autofocus_plan(
                camera,
                focus,
                cal,
                scorer=scorer,
                strategy=strategy,
                min_images=budget[0],
                max_images=budget[1],
                max_travel=max_travel,
                **kw,
            )
        ).plan_result  # type: ignore[union-attr]
        dt = time.perf_counter() - t
        self.plan_seconds += dt
        self.images += res.images_used
        truth = sim.true_focus_at(0.0, 0.0)
        blank = field_is_blank(sim, float(truth))
        return Trial(
            objective=sim.objective.name,
            family=family,
            seed=seed,
            strategy=strategy,
            scorer=scorer.name,
            budget=budget,
            start_z=start_z,
            true_focus=float(truth),
            final_z=float(res.final_z),
            images=int(res.images_used),
            converged=bool(res.converged),
            status=str(res.status),
            seconds=dt,
            extra={
                "focus_map": res.focus_map,
                "sigma": res.sigma_um,
                "blank_at_focus": blank,
                # where the search put focus, whether or not the plan moved there (the
                # paper's algorithm always moves there)
                "estimate": float(res.start_z + res.dz),
                # an image at the final position (NaN sharpness there: the budget ran out
                # before the estimate could be imaged, "not verified by an image")
                "verified": bool(math.isfinite(res.sharpness_final)),
            },
        )


def field_is_blank(sim: MicroscopeSimulation, true_focus: float) -> bool:
    """Whether the field holds no detail even in focus: fewer than 3 spatial-frequency bins
    of the in-focus frame's expected signal stand above the camera noise (an empty stretch
    of a sparse slide, the uniform inside of a large object). No method can focus such a
    field; the plans refuse it and restore the start position (tests/test_hostile_input.py).

    The signal is the noiseless frame's power, the noise the floor of a noisy frame: the
    same test as ``log_signal() > 0`` on a noisy frame (signal above ``2 x`` the floor) in
    expectation, but without its draw-to-draw flips on a field at the edge of the rule (a
    field that passed when drawn and failed after the trial)."""
    tf = float(true_focus)
    noise = frame_spectrum(sim.render(tf).astype(np.float32)).noise
    signal = frame_spectrum(sim.render(tf, noise=False).astype(np.float32)).power
    return int(np.count_nonzero(np.isfinite(signal) & (signal > noise))) < 3


def summarize(trials: Sequence[Trial], dof: float | None = None) -> dict[str, float]:
    e = np.abs([t.error for t in trials])
    if len(e) == 0:
        return {}
    out = {
        "n": float(len(e)),
        "mean_abs_um": float(e.mean()),
        "median_abs_um": float(np.median(e)),
        "p95_abs_um": float(np.percentile(e, 95)),
        "max_abs_um": float(e.max()),
        "within_1um": float(np.mean(e <= 1.0)),
        "mean_images": float(np.mean([t.images for t in trials])),
        "max_images": float(np.max([t.images for t in trials])),
        "converged": float(np.mean([t.converged for t in trials])),
        "seconds": float(np.mean([t.seconds for t in trials])),
    }
    # how the misses happened: refusals (start restored, said so) or confidently wrong
    ok = np.array([t.status == "converged" for t in trials])
    out["refused"] = float(np.mean(~ok))
    # of those, moved to the sharpest image taken (on_failure="sharpest") instead of the start
    out["to_sharpest"] = float(np.mean([t.status == "sharpest" for t in trials]))
    out["converged_wrong_1um"] = float(np.mean(ok & (e > 1.0)))
    # converged without an image at the final position, and how many of those > 1 um off
    seen = np.array([bool(t.extra.get("verified", True)) for t in trials])
    out["converged_unverified"] = float(np.mean(ok & ~seen))
    out["unverified_wrong_1um"] = float(np.mean(ok & ~seen & (e > 1.0)))
    est = np.array([t.extra.get("estimate", np.nan) - t.true_focus for t in trials])
    if np.all(np.isfinite(est)):
        out["mean_abs_estimate_um"] = float(np.abs(est).mean())
        out["estimate_within_1um"] = float(np.mean(np.abs(est) <= 1.0))
    blank = np.array([bool(t.extra.get("blank_at_focus", False)) for t in trials])
    out["blank_at_focus"] = float(np.mean(blank))
    if np.any(~blank) and np.any(blank):
        out["mean_abs_um_with_information"] = float(e[~blank].mean())
    if dof:
        out["mean_abs_dof"] = out["mean_abs_um"] / dof
    return out
