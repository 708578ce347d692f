"""bluesky-deepfocus: DeepFocus CNN autofocus as Bluesky plans for Micro-Manager microscopes.

The core package holds no RunEngine: optics, specimens, the simulated microscope, the CNN
scorer, classic focus functions, the search algorithm, calibration, storage and audit.
Devices live in :mod:`bluesky_deepfocus.devices`, plans in :mod:`bluesky_deepfocus.plans`.
"""

from __future__ import annotations

from .calibration import Calibration
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
from .metrics import CLASSIC_FUNCTIONS, get_focus_function
from .optics import OBJECTIVES, CameraModel, Objective, get_objective
from .results import AutofocusResult, fit_focus_plane
from .schema import AutofocusSummary
from .scorer import DeepFocusScorer
from .scoring import FocusFunction, ScoreResult
from .search import BrentSearch, DeepFocusSearch, DeepFocusSettings, Observation, PaperSearch

__version__ = "0.1.0"

__all__ = [
    "CLASSIC_FUNCTIONS",
    "OBJECTIVES",
    "AutofocusFailed",
    "AutofocusResult",
    "AutofocusSummary",
    "BrentSearch",
    "Calibration",
    "CalibrationError",
    "CameraModel",
    "CatalogError",
    "DeepFocusError",
    "DeepFocusScorer",
    "DeepFocusSearch",
    "DeepFocusSettings",
    "DeepFocusWarning",
    "DeviceFault",
    "FocusFunction",
    "ImageError",
    "NoFocusInformation",
    "Objective",
    "Observation",
    "PaperSearch",
    "ScoreResult",
    "WeightsError",
    "__version__",
    "fit_focus_plane",
    "get_focus_function",
    "get_objective",
]
