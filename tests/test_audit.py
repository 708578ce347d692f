"""Focus history and plots from stored autofocus runs."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from bluesky_deepfocus.audit import (
    HISTORY_COLUMNS,
    focus_history,
    plot_autofocus_run,
    plot_focus_trajectory,
)
from bluesky_deepfocus.benchmarks.bench_history import (
    SyntheticAutofocusSignals,
    synthetic_autofocus_plan,
    synthetic_calibration_curve,
    write_synthetic_history,
)
from bluesky_deepfocus.schema import SCORES_STREAM, SUMMARY_KEY
from bluesky_deepfocus.storage import close_catalog, open_catalog, subscribe_writer

N_RUNS = 8


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A catalog with N_RUNS synthetic autofocus runs (every 7th failed) and other runs."""
    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import det

    folder = tmp_path_factory.mktemp("audit") / "catalog"
    catalog = open_catalog(folder)
    loop = asyncio.new_event_loop()
    RE = RunEngine({}, call_returns_result=True, loop=loop)
    writer = subscribe_writer(RE, catalog, fsync=False)
    t0 = time.time()
    uids = write_synthetic_history(RE, N_RUNS)
    t1 = time.time()
    RE(count([det], 2))  # not an autofocus run
    # A run written by a plain TiledWriter has no summary metadata: fallback path.
    writer.flush()  # one writer at a time on the embedded (SQLite) catalog
    RE.unsubscribe(writer.token)
    RE.subscribe(TiledWriter(catalog))
    (plain_uid,) = RE(
        synthetic_autofocus_plan(SyntheticAutofocusSignals(), start_z=7.0, best_z=3.0)
    ).run_start_uids
    yield SimpleNamespace(catalog=catalog, uids=uids, plain_uid=plain_uid, t0=t0, t1=t1)
    loop.call_soon_threadsafe(loop.stop)
    RE._th.join()
    loop.close()
    close_catalog(catalog)


def test_one_row_per_autofocus_run(history):
    df = focus_history(history.catalog)
    assert list(df.columns) == HISTORY_COLUMNS
    assert list(df["uid"]) == [*history.uids, history.plain_uid]  # sorted by time
    assert isinstance(df["time"].dtype, pd.DatetimeTZDtype)
    ok = df[df["status"] == "converged"]
    np.testing.assert_allclose(ok["dz"], ok["final_z"] - ok["start_z"])
    assert (ok["exit_status"] == "success").all() and ok["converged"].all()
    failed = df[df["status"] == "failed"]
    assert list(failed["uid"]) == [history.uids[6]]
    assert failed["dz"].isna().all() and not failed["converged"].any()
    assert (failed["final_z"] == failed["start_z"]).all()
    # the sharp local measure at the start and at the final position, as the run stored it
    np.testing.assert_allclose(ok["sharpness_start"], 0.2)
    np.testing.assert_allclose(ok["sharpness_final"], 0.9)
    assert failed["sharpness_final"].isna().all()  # never imaged: NaN, not a number made up
    assert failed["reason"].iloc[0] == "no focus information in the images"
    assert set(df["objective"]) == {"10x/0.3", "20x/0.45"}
    assert (df["images_used"] == 3).all()


def test_summary_from_metadata_with_fallback_to_the_result_stream(history):
    df = focus_history(history.catalog).set_index("uid")
    assert (df.loc[history.uids, "summary_source"] == "metadata").all()
    plain = df.loc[history.plain_uid]
    assert plain["summary_source"] == "stream"
    assert plain["final_z"] == pytest.approx(3.0) and plain["status"] == "converged"
    assert plain["sharpness_final"] == pytest.approx(0.9)  # from the result stream too
    assert SUMMARY_KEY not in history.catalog[history.plain_uid].metadata


def test_filters_and_time_range(history):
    cat = history.catalog
    by_objective = focus_history(cat, objective="20x/0.45")
    assert list(by_objective["uid"]) == history.uids[1::2]
    by_calibration = focus_history(cat, calibration_uid="calibration-a", objective="10x/0.3")
    assert list(by_calibration["uid"]) == history.uids[0::2]
    assert focus_history(cat, objective=["10x/0.3", "20x/0.45"]).shape[0] == N_RUNS + 1
    assert focus_history(cat, model_id="no-such-model").empty
    assert list(focus_history(cat, plan_name="count")["status"]) == ["incomplete"]
    assert list(focus_history(cat, until=history.t0)["uid"]) == []
    assert list(focus_history(cat, since=history.t0, until=history.t1)["uid"]) == history.uids
    assert list(focus_history(cat, since=history.t1)["uid"]) == [history.plain_uid]


def test_history_of_many_runs_is_one_metadata_query(history, monkeypatch):
    """No per-run reads when the summaries are stored (what makes 1000 runs < 2 s)."""
    from bluesky_deepfocus import audit

    calls = []
    original = audit._result_from_stream
    monkeypatch.setattr(audit, "_result_from_stream", lambda *a: calls.append(a) or original(*a))
    focus_history(history.catalog)
    assert [uid for _, uid in calls] == [history.plain_uid]


def test_plot_focus_trajectory_marks_failures(history):
    df = focus_history(history.catalog)
    ax = plot_focus_trajectory(df)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "failed" in labels and "final z" in labels
    failed_line = ax.get_lines()[labels.index("failed")]
    assert len(failed_line.get_xdata()) == 1
    assert failed_line.get_ydata()[0] == pytest.approx(df["start_z"][df["status"] == "failed"])
    ax2 = plot_focus_trajectory(history.catalog)  # reads the history itself
    assert len(ax2.get_lines()) == len(ax.get_lines())


def test_plot_focus_trajectory_marks_runs_at_their_sharpest_image_apart():
    df = pd.DataFrame(
        {
            "time": pd.to_datetime(
                ["2026-01-01T00:00", "2026-01-01T00:01", "2026-01-01T00:02"], utc=True
            ),
            "start_z": [0.0, 1.0, 2.0],
            "final_z": [5.0, 3.5, 2.0],
            "converged": [True, False, False],
            "status": ["converged", "sharpest", "restored"],
            "exit_status": ["success", "success", "success"],
        }
    )
    ax = plot_focus_trajectory(df)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["final z"].get_ydata()) == [5.0]
    assert list(lines["not converged: at the sharpest image"].get_ydata()) == [3.5]
    assert list(lines["failed"].get_ydata()) == [2.0]


@pytest.mark.parametrize("style", ["z_b_shift", "z_um_blur"])
def test_plot_autofocus_run_over_calibration(history, style):
    run = history.catalog[history.uids[0]]
    final_z = run.metadata[SUMMARY_KEY]["final_z"]
    rel = np.linspace(-40, 40, 81)
    if style == "z_b_shift":
        calibration = SimpleNamespace(z=rel + 5.0, b=synthetic_calibration_curve(rel), shift=5.0)
    else:
        calibration = SimpleNamespace(z_um=rel, blur=synthetic_calibration_curve(rel))
    ax = plot_autofocus_run(run, calibration)
    lines = {line.get_label(): line for line in ax.get_lines()}
    curve = lines["calibration"]
    assert curve.get_xdata()[np.argmin(curve.get_ydata())] == pytest.approx(final_z)
    measured = lines["measured"]
    z_scores = run[SCORES_STREAM].read()["z"].values
    np.testing.assert_allclose(measured.get_xdata(), z_scores)
    # The measured points lie on the calibration curve centred on the chosen focus.
    expected = synthetic_calibration_curve(np.asarray(measured.get_xdata()) - final_z)
    np.testing.assert_allclose(measured.get_ydata(), expected, rtol=1e-6)
    assert any(label.startswith("final z") for label in lines)


def test_plot_autofocus_run_without_calibration(history):
    ax = plot_autofocus_run(history.catalog[history.plain_uid])
    assert "converged" in ax.get_title()
    with pytest.raises(TypeError, match="z_um"):
        plot_autofocus_run(history.catalog[history.uids[0]], calibration=object())


def test_empty_history_plots_a_note(tmp_path):
    catalog = open_catalog(tmp_path / "empty")
    df = focus_history(catalog)
    assert df.empty and list(df.columns) == HISTORY_COLUMNS
    ax = plot_focus_trajectory(df)
    assert ax.texts[0].get_text() == "no autofocus runs"
    close_catalog(catalog)


def test_reading_a_stream_hides_only_the_square_array_dims_warning():
    """The TiledWriter names equal array sizes alike, so a square blur map reads back with
    a duplicate-dimension warning from xarray on every read: hidden; others pass."""
    import warnings

    from bluesky_deepfocus.audit import _read

    class Stream:
        def __init__(self, message):
            self.message = message

        def read(self):
            warnings.warn(self.message, UserWarning, stacklevel=1)
            return "dataset"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = {"scores": Stream("Duplicate dimension names present: dimensions {'dim_int_1'}")}
        assert _read(run, "scores") == "dataset"
        with pytest.raises(UserWarning, match="something else"):
            _read({"scores": Stream("something else")}, "scores")
