"""Embedded catalog: opening, bad locations, the writer lock, writing, journal and recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bluesky_deepfocus import CatalogError, DeepFocusWarning
from bluesky_deepfocus._journal import JournalFile, journal_path, read_journal
from bluesky_deepfocus.benchmarks.bench_history import (
    SyntheticAutofocusSignals,
    synthetic_autofocus_plan,
)
from bluesky_deepfocus.schema import RESULT_STREAM, SCORES_STREAM, SUMMARY_KEY
from bluesky_deepfocus.storage import (
    CATALOG_ENV,
    MARKER_NAME,
    SPOOL_ENV,
    CatalogWriter,
    catalog_folder,
    close_catalog,
    default_catalog_location,
    deliver_pending,
    open_catalog,
    pending_journals,
    subscribe_writer,
)

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _no_real_user_folders(tmp_path, monkeypatch):
    """Every catalog here lives under tmp_path, never in the real per-user folder."""
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_data_dir", lambda *a, **k: str(tmp_path / "user"))
    monkeypatch.delenv(CATALOG_ENV, raising=False)
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))


@pytest.fixture
def catalog(tmp_path):
    cat = open_catalog(tmp_path / "catalog")
    yield cat
    close_catalog(cat)


def _snapshot(folder: Path) -> dict[str, tuple[int, float, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- locations -------------------------------------------------------------------------


def test_creates_then_reopens_a_catalog(tmp_path):
    folder = tmp_path / "runs"
    cat = open_catalog(folder)
    assert type(cat).__name__ == "DeepFocusCatalog"
    assert catalog_folder(cat) == folder
    assert "CatalogOfBlueskyRuns" in {s.name for s in cat.specs}
    assert (folder / MARKER_NAME).is_file() and (folder / "catalog.db").is_file()
    assert len(cat) == 0
    close_catalog(cat)
    t0 = time.perf_counter()
    again = open_catalog(str(folder))
    assert time.perf_counter() - t0 < 5  # no second initialisation
    assert len(again) == 0
    close_catalog(again)


def test_default_location_is_per_user_and_overridable(tmp_path, monkeypatch):
    assert default_catalog_location() == str(tmp_path / "user" / "catalog")
    cat = open_catalog()  # creates the per-user folder with its parents
    assert (tmp_path / "user" / "catalog" / MARKER_NAME).is_file()
    close_catalog(cat)
    monkeypatch.setenv(CATALOG_ENV, str(tmp_path / "elsewhere"))
    assert default_catalog_location() == str(tmp_path / "elsewhere")
    cat = open_catalog()
    assert (tmp_path / "elsewhere" / MARKER_NAME).is_file()
    close_catalog(cat)


def test_missing_parent_is_an_error_naming_it(tmp_path):
    target = tmp_path / "no" / "such" / "catalog"
    with pytest.raises(CatalogError, match=r"parent folder .*no/such' does not exist"):
        open_catalog(target)
    assert not (tmp_path / "no").exists()


def test_unrelated_folder_is_refused_and_left_untouched(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("\\section{Focus}")
    (folder / "data.npy").write_bytes(np.arange(10).tobytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("keep me")
    before = _snapshot(folder)
    with pytest.raises(
        CatalogError, match=r"not a bluesky-deepfocus catalog.*nothing was changed"
    ):
        open_catalog(folder)
    with pytest.raises(CatalogError, match="not a bluesky-deepfocus catalog"):
        open_catalog(folder, writable=False)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.tex", "data.npy", "sub"]


def test_a_file_is_not_a_catalog(tmp_path):
    path = tmp_path / "catalog.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with pytest.raises(CatalogError, match="is a file, not a catalog folder"):
        open_catalog(path)
    assert path.read_bytes().startswith(b"SQLite format 3")


def test_read_only_needs_an_existing_catalog(tmp_path):
    with pytest.raises(CatalogError, match=r"nothing to read.*writable=True"):
        open_catalog(tmp_path / "new", writable=False)
    assert not (tmp_path / "new").exists()


def test_damaged_catalog_is_reported(tmp_path):
    folder = tmp_path / "cat"
    close_catalog(open_catalog(folder))
    (folder / "catalog.db").write_bytes(b"garbage")
    with pytest.raises(CatalogError, match=r"not a SQLite database.*damaged"):
        open_catalog(folder)
    assert (folder / "catalog.db").read_bytes() == b"garbage"


def test_writer_refuses_a_read_only_catalog(catalog, tmp_path):
    reader = open_catalog(tmp_path / "catalog", writable=False)
    with pytest.raises(CatalogError, match="read-only"):
        CatalogWriter(reader)
    with pytest.raises(CatalogError, match="open_catalog"):
        CatalogWriter(str(tmp_path / "catalog"))
    with pytest.raises(CatalogError, match="read-only"):
        deliver_pending(reader)
    close_catalog(reader)


# -- writing ---------------------------------------------------------------------------


def test_writes_an_autofocus_run_and_its_summary(RE, catalog, tmp_path):
    writer = subscribe_writer(RE, catalog)
    signals = SyntheticAutofocusSignals(image_shape=(24, 32))
    result = RE(synthetic_autofocus_plan(signals, start_z=10.0, best_z=1.5, n_images=4))
    (uid,) = result.run_start_uids
    assert result.plan_result.final_z == 1.5

    run = catalog[uid]  # waits for the background writer
    assert writer.pending == 0
    assert sorted(run) == sorted(["primary", SCORES_STREAM, RESULT_STREAM])
    assert run.metadata["stop"]["exit_status"] == "success"
    summary = run.metadata[SUMMARY_KEY]
    assert summary["status"] == "converged" and summary["final_z"] == pytest.approx(1.5)
    assert summary["images_used"] == 4 and summary["converged"] is True
    images = run["primary"].read()["camera_image"]
    assert images.shape == (4, 24, 32) and images.dtype == np.uint16
    np.testing.assert_allclose(run[SCORES_STREAM].read()["z"].values, [10, -10, 30, 0])
    names = [name for name, _ in run.documents()]
    assert names[0] == "start" and names[-1] == "stop" and names.count("event") == 9
    assert not list((tmp_path / "catalog" / "journal").iterdir())  # journal removed


def test_synchronous_writer_and_failed_run_summary(RE, catalog):
    subscribe_writer(RE, catalog, background=False, fsync=False)
    signals = SyntheticAutofocusSignals()
    (uid,) = RE(
        synthetic_autofocus_plan(signals, start_z=4.0, best_z=0.0, fail=True)
    ).run_start_uids
    summary = catalog[uid].metadata[SUMMARY_KEY]
    assert summary["status"] == "failed" and summary["dz"] is None  # NaN stored as None
    assert summary["converged"] is False and summary["final_z"] == 4.0


def test_databroker_api_reads_the_same_catalog(RE, catalog):
    import databroker

    subscribe_writer(RE, catalog)
    (uid,) = RE(
        synthetic_autofocus_plan(SyntheticAutofocusSignals(), start_z=2.0, best_z=0.5)
    ).run_start_uids
    db = databroker.Broker(catalog)
    header = db[uid]
    assert header.start["plan_name"] == "autofocus_plan"
    assert header.stop["exit_status"] == "success"
    table = header.table(stream_name=SCORES_STREAM)
    np.testing.assert_allclose(table["z"].to_numpy(), [2.0, -18.0, 22.0])
    assert catalog.v2[uid].metadata["start"]["uid"] == uid


def test_same_process_may_reopen_for_writing(catalog, tmp_path):
    second = open_catalog(tmp_path / "catalog")
    assert len(second) == len(catalog)
    close_catalog(second)


# -- journal ---------------------------------------------------------------------------


def test_journal_round_trip_and_torn_tail(tmp_path):
    image = np.arange(12, dtype="<u2").reshape(3, 4)
    path = journal_path(tmp_path, "run-1")
    journal = JournalFile(path, fsync=True)
    journal.append("start", {"uid": "run-1", "time": 1.0, "shape": (3, 4)})
    journal.append(
        "event",
        {"data": {"img": image, "z": np.float32(1.5), "n": np.int64(3), "ok": np.bool_(True)}},
    )
    journal.close()
    records = list(read_journal(path))
    assert [name for name, _ in records] == ["start", "event"]
    data = records[1][1]["data"]
    np.testing.assert_array_equal(data["img"], image)
    assert data["img"].dtype == np.dtype("<u2")
    assert (data["z"], data["n"], data["ok"]) == (1.5, 3, True)
    assert records[0][1]["shape"] == [3, 4]
    with open(path, "ab") as f:  # a record torn by a crash
        f.write(b"\x40\x00\x00\x00\x01\x02")
    assert [name for name, _ in read_journal(path)] == ["start", "event"]


def test_replaying_a_stored_run_does_not_duplicate_it(RE, catalog, tmp_path, docs):
    subscribe_writer(RE, catalog)
    RE.subscribe(docs)
    (uid,) = RE(
        synthetic_autofocus_plan(SyntheticAutofocusSignals(), start_z=1.0, best_z=0.0)
    ).run_start_uids
    assert len(catalog) == 1
    # As if the process died after storing the run but before deleting its journal:
    journal = JournalFile(journal_path(tmp_path / "catalog" / "journal", uid), fsync=False)
    for name, doc in docs:
        journal.append(name, doc)
    journal.close()
    assert deliver_pending(catalog) == [uid]
    assert len(catalog) == 1 and pending_journals(catalog) == []


def test_runs_still_being_measured_are_not_delivered(catalog, tmp_path):
    live = JournalFile(journal_path(tmp_path / "catalog" / "journal", "live-run"), fsync=False)
    live.append("start", {"uid": "live-run", "time": time.time()})
    assert pending_journals(catalog) == []  # locked by its (live) writer
    assert deliver_pending(catalog) == []
    live.close()  # the writer is gone: now it is a crashed run
    assert [p.stem for p in pending_journals(catalog)] == ["live-run"]


def test_crash_mid_run_is_recovered_on_restart(tmp_path):
    """SIGKILL while measuring: events already measured survive, the run is closed."""
    folder = tmp_path / "catalog"
    env = {**os.environ, SPOOL_ENV: str(tmp_path / "spool")}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_crash_writer.py"), str(folder), "200", "0.25"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    measured: list[tuple[float, float]] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("READY"):
                pid = int(line.split()[1])
            if line.startswith("EVENT"):
                _, _, z, blur = line.split()
                measured.append((float(z), float(blur)))
                if len(measured) == 2:
                    # While the other process writes: a reader may open the catalog, a
                    # second writer gets a clear error naming the lock holder.
                    reader = open_catalog(folder, writable=False)
                    assert len(reader) == 1  # the run in progress (start stored)
                    close_catalog(reader)
                    with pytest.raises(CatalogError, match=rf"process {pid}.*writable=False"):
                        open_catalog(folder)
                if len(measured) == 5:
                    proc.send_signal(signal.SIGKILL)
                    break
        else:  # pragma: no cover - diagnostic
            pytest.fail(f"writer ended early: {proc.stderr.read()}")  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(list((folder / "journal").iterdir())) == 1

    with pytest.warns(DeepFocusWarning, match="Recovered 1 run"):
        catalog = open_catalog(folder)
    run = catalog.values()[-1]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail" and "recovered" in stop["reason"]
    assert stop["num_events"][SCORES_STREAM] >= 5
    scores = run[SCORES_STREAM].read()
    got = list(zip(scores["z"].values.tolist(), scores["blur"].values.tolist(), strict=True))
    assert got[: len(measured)] == measured
    assert not list((folder / "journal").iterdir())
    close_catalog(catalog)
