"""Names and layout of the documents that calibration and autofocus runs write.

One place for the contract between plans (which write), storage/audit (which read) and
users (who query). Changing a name here is a breaking change for stored data.

Autofocus run (``plan_name == "autofocus_plan"``)
    start document
        ``deepfocus``: dict with ``calibration_uid``, ``objective``, ``model_id``,
        ``model_sha256``, ``algorithm`` (name and settings), ``roi``, ``start_z``,
        ``limits``, ``max_travel``, ``on_failure``.
    stream ``primary``
        one event per image: the camera image and the focus readback.
    stream :data:`SCORES_STREAM`
        one event per image: ``z``, ``blur`` (ROI score), ``blur_map``,
        ``confidence_map``, ``informative_fraction``, ``image_index``.
    stream :data:`RESULT_STREAM`
        one event: the fields of :class:`AutofocusSummary` (the decision).
    run metadata :data:`SUMMARY_KEY`
        a copy of the decision added after the run closes, so that focus history over
        thousands of runs is one metadata query; it is derived from the stream above and
        can be rebuilt from it.

Autofocus inside another run (``autofocus_stub``, ``refocus_per_step``, ``refocus_wrapper``,
``timelapse_plan``)
    streams ``<prefix>_images``, ``<prefix>_scores``, ``<prefix>_result`` (prefix
    ``autofocus`` by default) with the layouts above, and ``<prefix>_refocus``: one event
    per refocus saying why (first / every N / drift), the primary event it precedes, and
    the warm-start prior.

Calibration run (``plan_name == "calibration_plan"``)
    start document ``deepfocus``: ``objective``, ``model_id``, ``model_sha256``, ``roi``,
    ``start_z``, relative ``start``/``stop``/``num``.
    streams ``primary`` and :data:`SCORES_STREAM` as above; stream
    :data:`CALIBRATION_STREAM` with one event holding the fitted calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "CALIBRATION_STREAM",
    "MD_KEY",
    "RESULT_STREAM",
    "SCORES_STREAM",
    "SUMMARY_KEY",
    "AutofocusSummary",
]

MD_KEY = "deepfocus"
SCORES_STREAM = "deepfocus_scores"
RESULT_STREAM = "autofocus_result"
CALIBRATION_STREAM = "calibration_result"
SUMMARY_KEY = "deepfocus_summary"


@dataclass(frozen=True)
class AutofocusSummary:
    """The decision of one autofocus run, as stored in :data:`RESULT_STREAM`.

    Attributes
    ----------
    start_z, final_z
        Focus position before and after the run (um).
    dz
        Estimated shift to focus from ``start_z`` (um; NaN when none).
    images_used
        Images acquired by the run.
    residual
        RMS misfit of the final estimate (units of the matched quantity).
    confidence
        0..1; below the plan's threshold nothing is moved blindly.
    converged
        Whether the estimate met the stopping rule.
    moved
        Whether the focus ended somewhere else than it started.
    status
        ``"converged"``, ``"restored"``, ``"stayed"``, ``"failed"``, ``"sharpest"`` (not
        converged; moved to the sharpest image taken, ``on_failure="sharpest"``).
    reason
        Human-readable why.
    sharpness_start, sharpness_final
        Sharp local measure at the start and final positions (NaN when not measured).
    """

    start_z: float
    final_z: float
    dz: float
    images_used: int
    residual: float
    confidence: float
    converged: bool
    moved: bool
    status: str
    reason: str
    sharpness_start: float = float("nan")
    sharpness_final: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutofocusSummary:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
