"""Ophyd devices over any pymmcore-plus ``CMMCorePlus``.

They use only the public ``CMMCorePlus`` API, so the same objects drive a microscope
loaded from a real ``MMConfig.cfg`` and the simulated one of
:func:`bluesky_deepfocus.sim.simulated_microscope`. Blocking core calls (snap, move and
wait) run on threads and every Status completes or fails within a finite timeout.

Examples
--------
>>> from bluesky import RunEngine
>>> import bluesky.plans as bp
>>> from bluesky_deepfocus.sim import simulated_microscope
>>> core = simulated_microscope(sensor_shape=(64, 64))
>>> camera, focus = MMCamera(core, name="camera"), MMFocusStage(core, name="focus")
>>> RE = RunEngine(call_returns_result=True)
>>> result = RE(bp.scan([camera], focus, -10, 10, 3))
>>> result.exit_status, focus.position
('success', 10.0)
"""

from __future__ import annotations

from ._base import DeviceTimeoutError, LimitError
from ._camera import MMCamera, frame_spec
from ._stage import MMFocusStage, MMXYStage

__all__ = [
    "DeviceTimeoutError",
    "LimitError",
    "MMCamera",
    "MMFocusStage",
    "MMXYStage",
    "frame_spec",
]
