"""Exceptions and warnings raised by bluesky-deepfocus.

Every message states the violated condition, shows the offending value with ``!r`` and
says how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AutofocusFailed",
    "CalibrationError",
    "CatalogError",
    "DeepFocusError",
    "DeepFocusWarning",
    "DeviceFault",
    "ImageError",
    "NoFocusInformation",
    "WeightsError",
]


class DeepFocusWarning(UserWarning):
    """Something worth a look that did not stop the measurement."""


class DeepFocusError(Exception):
    """Base class of the package's errors."""


class ImageError(DeepFocusError, ValueError):
    """An image cannot be scored (NaN/inf, wrong shape or dtype, too small)."""


class NoFocusInformation(DeepFocusError):
    """The image holds no focus information (blank, saturated or too dark)."""


class CalibrationError(DeepFocusError, ValueError):
    """A calibration stack or file cannot be trusted or does not fit the instrument."""


class AutofocusFailed(DeepFocusError):
    """Autofocus could not find focus and ``on_failure="raise"`` was asked for."""


class WeightsError(DeepFocusError):
    """Model weights are missing, corrupted or do not match their recorded hash."""


class CatalogError(DeepFocusError):
    """The catalog cannot be opened, is not a catalog, or is locked by another writer."""


class DeviceFault(DeepFocusError):
    """A camera or stage failed (after retries) or timed out."""
