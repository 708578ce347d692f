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
from .session import configure_session, latest_calibration
from .storage import (
    CatalogWriter,
    close_catalog,
    deliver_pending,
    open_catalog,
    subscribe_writer,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Lazy access to the audit helpers (they import pandas/matplotlib)."""
    if name in ("focus_history", "plot_focus_trajectory", "plot_autofocus_run"):
        from . import audit

        return getattr(audit, name)
    raise AttributeError(f"module 'bluesky_deepfocus' has no attribute {name!r}")


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
    "CatalogWriter",
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
    "close_catalog",
    "configure_session",
    "deliver_pending",
    "fit_focus_plane",
    "focus_history",
    "get_focus_function",
    "get_objective",
    "latest_calibration",
    "open_catalog",
    "plot_autofocus_run",
    "plot_focus_trajectory",
    "subscribe_writer",
]
