"""Audit what autofocus did: focus history as a table, and plots of runs.

The history is read from run metadata: the start document (``deepfocus`` settings:
objective, calibration, model), the stop document (exit status) and the decision copied
under :data:`~bluesky_deepfocus.schema.SUMMARY_KEY` by the catalog writer. A thousand runs
are one paged metadata query. Runs stored without that copy (written by another writer,
or cut short) fall back to reading their :data:`~bluesky_deepfocus.schema.RESULT_STREAM`.

Examples
--------
>>> from bluesky_deepfocus.storage import open_catalog
>>> catalog = open_catalog(writable=False)  # doctest: +SKIP
>>> df = focus_history(catalog, since="2025-01-01", objective="10x/0.3")  # doctest: +SKIP
>>> plot_focus_trajectory(df)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .schema import MD_KEY, RESULT_STREAM, SCORES_STREAM, SUMMARY_KEY, AutofocusSummary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["HISTORY_COLUMNS", "focus_history", "plot_autofocus_run", "plot_focus_trajectory"]

_SUMMARY_FIELDS = [f.name for f in fields(AutofocusSummary)]
_MD_FILTERS = ("calibration_uid", "objective", "model_id", "model_sha256", "on_failure")

HISTORY_COLUMNS = [
    "time",
    "uid",
    "start_z",
    "final_z",
    "dz",
    "images_used",
    "converged",
    "moved",
    "status",
    "reason",
    "residual",
    "confidence",
    "sharpness_start",
    "sharpness_final",
    "calibration_uid",
    "objective",
    "model_id",
    "exit_status",
    "summary_source",
]
"""Columns of :func:`focus_history`, in order."""

# What the server sends back per run (JMESPath), so 1000 runs are a few small pages.
_SELECT = (
    f"{{start: {{uid: start.uid, time: start.time, md: start.{MD_KEY}}}, "
    f"stop: {{exit_status: stop.exit_status, reason: stop.reason}}, summary: {SUMMARY_KEY}}}"
)
_PAGE = 300


def _queries(since: Any, until: Any, filters: dict[str, Any]) -> list[Any]:
    from bluesky_tiled_plugins.queries import TimeRange
    from tiled.queries import Eq, In

    queries: list[Any] = []
    filters = {"plan_name": "autofocus_plan", **filters}
    for key, value in filters.items():
        if value is None:
            continue
        path = f"start.{MD_KEY}.{key}" if key in _MD_FILTERS else f"start.{key}"
        if isinstance(value, list | tuple | set):
            queries.append(In(path, list(value)))
        else:
            queries.append(Eq(path, value))
    if since is not None or until is not None:
        queries.append(TimeRange(since=_as_time(since), until=_as_time(until)))
    return queries


def _as_time(value: Any) -> Any:
    """Timestamps, datetimes, numpy/pandas times and strings understood by TimeRange."""
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, np.datetime64 | pd.Timestamp):
        return pd.Timestamp(value).timestamp()
    return value


def _search(catalog: Any, queries: list[Any]) -> Any:
    results = catalog
    for query in queries:
        results = results.search(query)
    return results


def _select(metadata: Any) -> dict[str, Any]:
    """What :data:`_SELECT` picks, done here (for servers without ``select_metadata``)."""
    start = metadata.get("start") or {}
    stop = metadata.get("stop") or {}
    return {
        "start": {"uid": start.get("uid"), "time": start.get("time"), "md": start.get(MD_KEY)},
        "stop": {"exit_status": stop.get("exit_status"), "reason": stop.get("reason")},
        "summary": metadata.get(SUMMARY_KEY),
    }


def _iter_selected(results: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(uid, selected metadata) of every run in ``results``, one HTTP request per page.

    The server picks the few metadata fields needed (``select_metadata``), 300 runs a
    page, and no client object is built per run; paging goes on until the results end
    (not until ``meta.count``, which Tiled caps for large results). If this Tiled client
    lacks the internals used for that, the public (slower) iteration is used instead.
    """
    import httpx
    from tiled.client.utils import handle_error, retry_context

    query_params = getattr(results, "_queries_as_params", None)
    if query_params is None:
        for uid, run in results.items():
            yield uid, _select(run.metadata)
        return
    params: dict[str, Any] = {
        **query_params,
        **getattr(results, "_sorting_params", {}),
        "fields": "metadata",
        "select_metadata": _SELECT,
        "page[limit]": _PAGE,
    }
    link = results.item["links"]["search"]
    offset = 0
    seen: set[str] = set()
    while True:
        params["page[offset]"] = offset
        try:
            for attempt in retry_context():
                with attempt:
                    content = handle_error(
                        results.context.http_client.get(
                            link, params=params, headers={"Accept": "application/json"}
                        )
                    ).json()
        except httpx.HTTPStatusError as err:
            if "select_metadata" not in params or err.response.status_code >= 500:
                raise
            del params["select_metadata"]  # an older server: select here instead
            continue
        data = content["data"]
        new = 0
        for item in data:
            if item["id"] in seen:  # a run seen on an earlier page (catalog changing)
                continue
            seen.add(item["id"])
            new += 1
            md = item["attributes"]["metadata"]
            yield item["id"], md["selected"] if "select_metadata" in params else _select(md)
        offset += len(data)
        if data and not new:
            return  # a server ignoring the offset: nothing new, do not loop forever
        # Tiled caps ``meta.count`` for large results (it counts up to a limit: 101 runs
        # answered for 1000), so the count is only a lower bound and ``links.next``, derived
        # from it, may be missing too. Page on until an empty page, or a short one once the
        # count is reached (a short page before it: a server that caps the page size).
        if not data:
            return
        count = (content.get("meta") or {}).get("count")
        reached = not isinstance(count, int) or offset >= count
        if len(data) < int(params["page[limit]"]) and reached:
            return


def _nan(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read(run: Any, stream: str) -> Any:
    """``run[stream].read()`` without the TiledWriter's square-array warning: it names equal
    sizes alike, so a 4 x 4 blur map is stored with dims ``(time, dim_int_1, dim_int_1)``
    and xarray warns about the duplicate name on every read (the values are unaffected)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Duplicate dimension names", category=UserWarning
        )
        return run[stream].read()


def _result_from_stream(catalog: Any, uid: str) -> dict[str, Any] | None:
    """The decision read from the run's result stream (slow path), or None."""
    from .storage import summary_from_result

    try:
        run = catalog[uid]
        if RESULT_STREAM not in run:
            return None
        ds = _read(run, RESULT_STREAM)
    except (KeyError, ValueError):
        return None
    if ds.sizes.get("time", 0) == 0:
        return None
    data = {name: ds[name].values[-1] for name in ds.data_vars}
    return summary_from_result(data)


def _row(catalog: Any, uid: str, md: dict[str, Any]) -> dict[str, Any]:
    start = md.get("start") or {}
    stop = md.get("stop") or {}
    settings = start.get("md") or {}
    summary = md.get("summary")
    source = "metadata"
    if not summary:
        summary = _result_from_stream(catalog, uid)
        source = "stream" if summary else "none"
    summary = summary or {}
    start_z = summary.get("start_z", settings.get("start_z"))
    reason = summary.get("reason")
    if not reason and stop.get("exit_status") not in (None, "success"):
        reason = stop.get("reason") or ""
    return {
        "time": pd.to_datetime(_nan(start.get("time")), unit="s", utc=True),
        "uid": uid,
        "start_z": _nan(start_z),
        "final_z": _nan(summary.get("final_z")),
        "dz": _nan(summary.get("dz")),
        "images_used": summary.get("images_used"),
        "converged": summary.get("converged"),
        "moved": summary.get("moved"),
        "status": summary.get("status") or ("incomplete" if source == "none" else None),
        "reason": reason,
        "residual": _nan(summary.get("residual")),
        "confidence": _nan(summary.get("confidence")),
        "sharpness_start": _nan(summary.get("sharpness_start")),
        "sharpness_final": _nan(summary.get("sharpness_final")),
        "calibration_uid": settings.get("calibration_uid"),
        "objective": settings.get("objective"),
        "model_id": settings.get("model_id"),
        "exit_status": stop.get("exit_status"),
        "summary_source": source,
    }


def focus_history(
    catalog: Any, since: Any = None, until: Any = None, **filters: Any
) -> pd.DataFrame:
    """One row per autofocus run: where it started, where it ended, and why.

    Parameters
    ----------
    catalog
        A catalog of Bluesky runs (:func:`bluesky_deepfocus.storage.open_catalog`).
    since, until
        Time range of the runs' start (timestamp, datetime or a string such as
        ``"2025-06-01 08:00"``, local time zone).
    **filters
        Equality on start-document fields; a list/tuple means "any of". ``objective``,
        ``calibration_uid``, ``model_id``, ``model_sha256``, ``on_failure`` are looked up
        in the ``deepfocus`` settings, anything else (``plan_name`` — default
        ``"autofocus_plan"`` —, ``sample``, ...) at the top of the start document.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`HISTORY_COLUMNS` (``time`` is UTC), sorted by time. ``status`` is
        ``"incomplete"`` for a run that stored no decision (e.g. cut short by a crash);
        ``summary_source`` says whether the decision came from the run metadata
        (fast) or its result stream (fallback). ``sharpness_start`` /
        ``sharpness_final``: the plan's sharp local measure (log gradient energy) of the
        images at the start and final positions; ``sharpness_final`` is NaN when the final
        position was not imaged (an exact image budget spent before the estimate could be
        checked: "not verified by an image" in ``reason``).

    Examples
    --------
    >>> focus_history(catalog, objective="10x/0.3", since="2025-06-01")  # doctest: +SKIP
    """
    results = _search(catalog, _queries(since, until, filters))
    rows = [_row(catalog, uid, md) for uid, md in _iter_selected(results)]
    df = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    if not df.empty:
        df = df.sort_values("time", kind="stable").reset_index(drop=True)
    return df


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    return ax


def _failed(df: pd.DataFrame) -> Any:
    converged = df["converged"].map(lambda v: bool(v) if v is not None else False)
    return (df["exit_status"] != "success") | (~converged) | (df["status"] == "failed")


def plot_focus_trajectory(history: Any, ax: Axes | None = None) -> Axes:
    """Final focus position of each autofocus run over time; failures marked (runs that
    ended at their sharpest image, ``on_failure="sharpest"``, apart).

    Parameters
    ----------
    history
        A :func:`focus_history` table, or a catalog (then its whole history is read).
    ax
        Axes to draw into; a new figure if ``None``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    df = history if isinstance(history, pd.DataFrame) else focus_history(history)
    ax = _new_axes(ax)
    if df.empty:
        ax.text(0.5, 0.5, "no autofocus runs", ha="center", va="center", transform=ax.transAxes)
        return ax
    times = pd.to_datetime(df["time"]).dt.tz_convert(None)
    ok = ~_failed(df)
    # on_failure="sharpest": not converged, but moved to the sharpest image taken
    sharpest = (df["status"] == "sharpest") & (df["exit_status"] == "success")
    ax.plot(times, df["final_z"], "-", color="0.6", lw=1, zorder=1)
    ax.plot(times[ok], df["final_z"][ok], "o", color="C0", ms=4, label="final z")
    if sharpest.any():
        ax.plot(
            times[sharpest],
            df["final_z"][sharpest],
            "^",
            color="C1",
            ms=6,
            label="not converged: at the sharpest image",
        )
    failed = ~ok & ~sharpest
    if failed.any():
        z_failed = df["final_z"].where(df["final_z"].notna(), df["start_z"])
        ax.plot(times[failed], z_failed[failed], "x", color="C3", ms=7, mew=2, label="failed")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("focus z (um)")
    ax.set_title("Autofocus history")
    ax.legend(loc="best")
    return ax


def _calibration_curve(calibration: Any) -> tuple[np.ndarray, np.ndarray]:
    """(z relative to focus, blur) of a calibration object."""
    if hasattr(calibration, "z") and hasattr(calibration, "b"):
        z = np.asarray(calibration.z, dtype=float) - float(getattr(calibration, "shift", 0.0))
        return z, np.asarray(calibration.b, dtype=float)
    if hasattr(calibration, "z_um") and hasattr(calibration, "blur"):
        return np.asarray(calibration.z_um, dtype=float), np.asarray(calibration.blur, dtype=float)
    raise TypeError(
        f"calibration {calibration!r} has neither `z` and `b` nor `z_um` and `blur` "
        "attributes; pass a Calibration (or an object with those arrays)."
    )


def _stream_column(ds: Any, name: str) -> np.ndarray:
    if name in ds:
        return np.asarray(ds[name].values, dtype=float)
    matches = [k for k in ds.data_vars if str(k).endswith("_" + name)]
    if len(matches) == 1:
        return np.asarray(ds[matches[0]].values, dtype=float)
    raise KeyError(f"no {name!r} data key in stream {SCORES_STREAM!r} (has {list(ds.data_vars)})")


def plot_autofocus_run(run: Any, calibration: Any = None, ax: Axes | None = None) -> Axes:
    """The (z, blur) points an autofocus run measured, over the calibration curve.

    Parameters
    ----------
    run
        A ``BlueskyRun`` of ``autofocus_plan`` (``catalog[uid]``).
    calibration
        Optional calibration: an object with arrays ``z``, ``b`` and a scalar ``shift``
        (the curve's own focus position, subtracted from ``z``), or with arrays ``z_um``
        (relative to focus) and ``blur``. The curve is drawn centred on the run's chosen
        final z, so measured points that fall on it mean the estimate is consistent.
    ax
        Axes to draw into; a new figure if ``None``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    from .storage import summary_from_result

    ax = _new_axes(ax)
    ds = _read(run, SCORES_STREAM)
    z = _stream_column(ds, "z")
    blur = _stream_column(ds, "blur")
    summary = dict(run.metadata.get(SUMMARY_KEY) or {})
    if not summary and RESULT_STREAM in run:
        res = _read(run, RESULT_STREAM)
        if res.sizes.get("time", 0):
            summary = summary_from_result({k: res[k].values[-1] for k in res.data_vars})
    final_z = _nan(summary.get("final_z"))
    if calibration is not None:
        cz, cb = _calibration_curve(calibration)
        centre = final_z if math.isfinite(final_z) else 0.0
        ax.plot(cz + centre, cb, "-", color="0.5", label="calibration")
    ax.plot(z, blur, "o", color="C0", label="measured")
    for i, (zi, bi) in enumerate(zip(z, blur, strict=True)):
        ax.annotate(str(i), (zi, bi), textcoords="offset points", xytext=(3, 3), fontsize=8)
    if math.isfinite(final_z):
        ax.axvline(final_z, color="C2", ls="--", label=f"final z = {final_z:.2f} um")
    start = run.metadata.get("start", {})
    status = summary.get("status") or "no decision stored"
    ax.set_title(f"Autofocus {str(start.get('uid', ''))[:8]}: {status}")
    ax.set_xlabel("z (um)")
    ax.set_ylabel("blur score")
    ax.legend(loc="best")
    return ax
