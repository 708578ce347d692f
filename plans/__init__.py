"""Bluesky plans: calibration, autofocus and their composition into scans and timelapses.

Whole runs: :func:`calibration_plan`, :func:`autofocus_plan`, :func:`timelapse_plan`.
Run-less building blocks: :func:`autofocus_stub` (autofocus inside another run),
:func:`refocus_per_step` (a ``per_step`` hook for ``scan_nd``/``grid_scan``/``list_scan``)
and :func:`refocus_wrapper` / :func:`refocus_decorator` (refocus every N steps or when
the score drifts).
"""

from ._autofocus import autofocus_plan, autofocus_stub, calibration_plan
from ._composition import (
    refocus_decorator,
    refocus_per_step,
    refocus_wrapper,
    timelapse_plan,
)

__all__ = [
    "autofocus_plan",
    "autofocus_stub",
    "calibration_plan",
    "refocus_decorator",
    "refocus_per_step",
    "refocus_wrapper",
    "timelapse_plan",
]
