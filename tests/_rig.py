"""A calibrated simulated microscope shared by the plan tests (built once per module)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from bluesky import RunEngine

from bluesky_deepfocus import Calibration, DeepFocusScorer
from bluesky_deepfocus.devices import MMCamera, MMFocusStage
from bluesky_deepfocus.plans import calibration_plan
from bluesky_deepfocus.sim import MicroscopeSimulation, get_simulation, simulated_microscope


@dataclass
class Rig:
    core: Any
    sim: MicroscopeSimulation
    camera: MMCamera
    focus: MMFocusStage
    scorer: DeepFocusScorer
    cal: Calibration
    cal_docs: list[tuple[str, dict[str, Any]]]


def private_run_engine() -> tuple[RunEngine, asyncio.AbstractEventLoop]:
    """A RunEngine on its own event loop (module fixtures must not share the test's)."""
    loop = asyncio.new_event_loop()
    return RunEngine({}, call_returns_result=True, loop=loop), loop


def close_run_engine(re: RunEngine, loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon_threadsafe(loop.stop)
    re._th.join()
    loop.close()


def calibrated_rig(
    *, limits: tuple[float, float] | None = (-1000.0, 1000.0), **sim_kwargs: Any
) -> Rig:
    """A simulated tissue slide, its devices and a +/-150 um, 61-frame calibration (with
    the calibration run's documents)."""
    core = simulated_microscope(specimen="tissue", **sim_kwargs)
    camera = MMCamera(core, name="camera")
    focus = MMFocusStage(core, name="focus", limits=limits)
    scorer = DeepFocusScorer()
    re, loop = private_run_engine()
    docs: list[tuple[str, dict[str, Any]]] = []
    re.subscribe(lambda n, d: docs.append((n, d)))
    try:
        cal = re(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result
    finally:
        close_run_engine(re, loop)
    return Rig(core, get_simulation(core), camera, focus, scorer, cal, docs)
