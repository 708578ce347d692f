"""bluesky-deepfocus: DeepFocus CNN autofocus as Bluesky plans for Micro-Manager microscopes.

The core package holds no RunEngine: optics, specimens, the simulated microscope, the CNN
scorer, classic focus functions, the search algorithm, calibration, storage and audit.
Devices live in :mod:`bluesky_deepfocus.devices`, plans in :mod:`bluesky_deepfocus.plans`.
"""

from __future__ import annotations

from .errors import (
    AutofocusFailed,
    CalibrationError,
    CatalogError,
    DeepFocusError,
    DeepFocusWarning,
    DeviceFault,
    ImageError,
    NoFocusInformation,
    WeightsError,
)
from .optics import OBJECTIVES, CameraModel, Objective, get_objective

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "AutofocusFailed",
    "CalibrationError",
    "CameraModel",
    "CatalogError",
    "DeepFocusError",
    "DeepFocusWarning",
    "DeviceFault",
    "ImageError",
    "NoFocusInformation",
    "Objective",
    "WeightsError",
    "__version__",
    "get_objective",
]
