"""The facility deployment for real: ``tiled serve config deploy/tiled-postgres.yml`` on a
throwaway PostgreSQL cluster, written through ``open_catalog(url)`` + ``CatalogWriter``."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_deepfocus import DeepFocusWarning
from bluesky_deepfocus.benchmarks.bench_history import (
    SyntheticAutofocusSignals,
    synthetic_autofocus_plan,
)
from bluesky_deepfocus.schema import RESULT_STREAM, SCORES_STREAM, SUMMARY_KEY
from bluesky_deepfocus.storage import (
    API_KEY_ENV,
    SPOOL_ENV,
    CatalogWriter,
    close_catalog,
    deliver_pending,
    open_catalog,
    pending_journals,
    subscribe_writer,
)

# Fixtures (facility_server, postgres) are used by name as test arguments.
from ._servers import facility_server, free_port, postgres, start_tiled  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]  # server start-up on a cold machine


@pytest.fixture
def spool(tmp_path, monkeypatch):
    folder = tmp_path / "spool"
    monkeypatch.setenv(SPOOL_ENV, str(folder))
    return folder


def test_write_and_read_back_through_the_server(RE, facility_server, spool, monkeypatch):  # noqa: F811 (fixture)
    monkeypatch.setenv(API_KEY_ENV, facility_server.api_key)
    catalog = open_catalog(facility_server.url)
    assert "CatalogOfBlueskyRuns" in {s.name for s in catalog.specs}
    writer = subscribe_writer(RE, catalog)
    signals = SyntheticAutofocusSignals(image_shape=(24, 32))
    (uid,) = RE(synthetic_autofocus_plan(signals, start_z=12.0, best_z=2.0)).run_start_uids

    run = catalog[uid]
    assert writer.pending == 0
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata[SUMMARY_KEY]["status"] == "converged"
    assert run.metadata[SUMMARY_KEY]["final_z"] == pytest.approx(2.0)
    scores = run[SCORES_STREAM].read()  # event table stored in PostgreSQL
    np.testing.assert_allclose(scores["z"].values, [12.0, -8.0, 32.0])
    assert scores["blur"].values.argmin() == 0
    images = run["primary"].read()["camera_image"]  # arrays in the data folder
    assert images.shape == (3, 24, 32) and images.dtype == np.uint16
    assert run[RESULT_STREAM].read()["status"].values[0] == "converged"
    names = [name for name, _ in run.documents()]
    assert names[0] == "start" and names[-1] == "stop" and names.count("event") == 7
    assert not list(spool.rglob("*.dfjournal"))  # nothing left pending


def test_wrong_api_key_is_a_clear_error(facility_server, spool, monkeypatch):  # noqa: F811 (fixture)
    from bluesky_deepfocus import CatalogError

    monkeypatch.setenv(API_KEY_ENV, "not" + facility_server.api_key)
    with pytest.raises(CatalogError, match="TILED_API_KEY"):
        open_catalog(facility_server.url)


def test_runs_spool_while_server_down_and_are_delivered_later(RE, postgres, spool, monkeypatch):  # noqa: F811 (fixture)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/metadata/"
    writer = CatalogWriter(url)
    RE.subscribe(writer)
    signals = SyntheticAutofocusSignals()
    with pytest.warns(DeepFocusWarning, match="deliver_pending"):
        (uid,) = RE(synthetic_autofocus_plan(signals, start_z=3.0, best_z=1.0)).run_start_uids
        writer.flush()
    assert [p.stem for p in spool.rglob("*.dfjournal")] == [uid]

    server = start_tiled(postgres, port=port)  # the server comes (back) up
    try:
        monkeypatch.setenv(API_KEY_ENV, server.api_key)
        catalog = open_catalog(url, writable=False)
        assert len(pending_journals(catalog)) == 1
        assert deliver_pending(catalog) == [uid]
        assert pending_journals(catalog) == []
        run = catalog[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        assert run.metadata[SUMMARY_KEY]["final_z"] == pytest.approx(1.0)
        np.testing.assert_allclose(run[SCORES_STREAM].read()["z"].values, [3.0, -17.0, 23.0])
        assert deliver_pending(catalog) == []  # idempotent
        close_catalog(catalog)
    finally:
        server.stop()
