"""``configure_session``: everything a facility IPython session needs, in one idempotent call.

In the spirit of ``nslsii.configure_base``: one switch per feature, safe to call again
(existing objects are reused), and it returns what it added. The IPython profile in
``profiles/profile_deepfocus`` only calls this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

from .calibration import Calibration
from .errors import CalibrationError
from .schema import MD_KEY

__all__ = ["configure_session", "latest_calibration"]

logger = logging.getLogger(__name__)

_STATE: dict[str, Any] = {}


def latest_calibration(catalog: Any, objective: str) -> Calibration:
    """The newest successful calibration run for ``objective`` in ``catalog``.

    Raises
    ------
    CalibrationError
        None stored for that objective (the message says how to make one).
    """
    from tiled.queries import Key

    try:
        results = catalog.search(Key("plan_name") == "calibration_plan").search(
            Key(f"{MD_KEY}.objective") == objective
        )
        uids = list(results.keys())
    except Exception as exc:  # a catalog that cannot be searched
        raise CalibrationError(f"Could not search the catalog for calibrations ({exc}).") from exc
    candidates = []
    for uid in uids:
        md = results[uid].metadata
        stop = md.get("stop") or {}
        if stop.get("exit_status") == "success":
            candidates.append((float(md["start"].get("time", 0.0)), uid))
    if not candidates:
        raise CalibrationError(
            f"No calibration for objective {objective!r} in the catalog. Calibrate it once: "
            "RE(calibration_plan(camera, focus, -150, 150, 121, scorer=scorer)) "
            "(or `bluesky-deepfocus calibrate`)."
        )
    _, uid = max(candidates)
    return Calibration.from_run(results[uid])


def configure_session(
    namespace: MutableMapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    objective: str = "10x/0.3",
    specimen: str = "tissue",
    sensor: int = 512,
    catalog: str | os.PathLike[str] | bool | None = True,
    weights: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    live_table: bool = True,
    progress: bool = True,
    load_calibration: bool = True,
    plans: bool = True,
) -> list[str]:
    """Build the RunEngine, catalog writer, devices, scorer and calibration of a session.

    Parameters
    ----------
    namespace
        Where to put the objects (the IPython user namespace); default a module-level dict
        returned by ``session_objects()``.
    config_file
        A Micro-Manager ``MMConfig.cfg``; default the simulated microscope.
    objective, specimen, sensor
        For the simulated microscope (sensor: side in pixels).
    catalog
        ``True``: the default embedded catalog; a folder or ``http(s)://`` URL; ``False``:
        no storage.
    weights, device
        For the :class:`~bluesky_deepfocus.DeepFocusScorer`.
    live_table, progress
        Subscribe a live table of (z, blur) and show progress bars while waiting.
    load_calibration
        Load the newest calibration of the current objective from the catalog.
    plans
        Also put the plans and helpers (``autofocus_plan``, ``focus_history``, ...) in
        the namespace.

    Returns
    -------
    list of str
        Names added to the namespace (empty when everything already existed).

    Examples
    --------
    >>> import tempfile
    >>> from bluesky_deepfocus import configure_session
    >>> ns = {}
    >>> tmp = tempfile.TemporaryDirectory()
    >>> added = configure_session(ns, catalog=tmp.name + "/cat", live_table=False, progress=False)
    >>> sorted(k for k in ("RE", "camera", "focus", "scorer", "catalog") if k in ns)
    ['RE', 'camera', 'catalog', 'focus', 'scorer']
    >>> configure_session(ns, catalog=tmp.name + "/cat", live_table=False, progress=False)
    []
    >>> ns["close_session"]()
    >>> tmp.cleanup()
    """
    ns: MutableMapping[str, Any] = _STATE if namespace is None else namespace
    added: list[str] = []

    def put(name: str, make: Any) -> Any:
        if name not in ns or ns[name] is None:
            ns[name] = make()
            added.append(name)
        return ns[name]

    from bluesky import RunEngine

    RE = put("RE", lambda: RunEngine({}, call_returns_result=True))
    if catalog is not False:
        from .storage import open_catalog, subscribe_writer

        location = None if catalog is True or catalog is None else catalog
        cat = put("catalog", lambda: open_catalog(location))
        put("writer", lambda: subscribe_writer(RE, cat))
    if config_file is not None:
        from pymmcore_plus import CMMCorePlus

        def load_core() -> Any:
            core = CMMCorePlus()
            core.loadSystemConfiguration(str(config_file))
            return core

        core = put("core", load_core)
    else:
        from .sim import simulated_microscope

        core = put(
            "core",
            lambda: simulated_microscope(
                objective=objective, specimen=specimen, sensor_shape=(sensor, sensor)
            ),
        )
    from .devices import MMCamera, MMFocusStage, MMXYStage

    camera = put("camera", lambda: MMCamera(core, name="camera"))
    put("focus", lambda: MMFocusStage(core, name="focus"))
    if core.getXYStageDevice():
        put("xy", lambda: MMXYStage(core, name="xy"))
    from .scorer import DeepFocusScorer

    put("scorer", lambda: DeepFocusScorer(weights, device=device))
    if live_table and "live_table_token" not in ns:
        from bluesky.callbacks import LiveTable

        from .schema import SCORES_STREAM

        table = LiveTable(
            [f"{SCORES_STREAM}_z", f"{SCORES_STREAM}_blur", f"{SCORES_STREAM}_sharpness"],
            stream_name=SCORES_STREAM,
            default_prec=3,
        )
        ns["live_table_token"] = RE.subscribe(table)
        added.append("live_table_token")
    if progress and "progress" not in ns:
        try:
            from bluesky.utils import ProgressBarManager

            RE.waiting_hook = ProgressBarManager()
            ns["progress"] = RE.waiting_hook
            added.append("progress")
        except Exception as exc:  # tqdm missing: no progress bars, not an error
            logger.info("No progress bars (%s)", exc)
    if load_calibration and ns.get("calibration") is None and "catalog" in ns:
        current = str(camera.objective.get() or objective)
        try:
            ns["calibration"] = latest_calibration(ns["catalog"], current)
            added.append("calibration")
        except CalibrationError as exc:
            ns["calibration"] = None
            print(f"bluesky-deepfocus: {exc}")
    if plans:
        from . import audit
        from . import plans as _plans

        for name in getattr(_plans, "__all__", ()):
            if name not in ns:
                ns[name] = getattr(_plans, name)
                added.append(name)
        for name in ("focus_history", "plot_focus_trajectory", "plot_autofocus_run"):
            if name not in ns:
                ns[name] = getattr(audit, name)
                added.append(name)
    if "close_session" not in ns:

        def close_session() -> None:
            """Stop the writer and close the catalog (release its write lock)."""
            from .storage import close_catalog

            w = ns.get("writer")
            if w is not None and hasattr(w, "flush"):
                w.flush()
            if ns.get("catalog") is not None:
                close_catalog(ns["catalog"])
            for key in ("writer", "catalog"):
                ns.pop(key, None)

        ns["close_session"] = close_session
        added.append("close_session")
    return added
