"""The facility session: the IPython profile, configure_session and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bluesky_deepfocus import configure_session, focus_history, open_catalog
from bluesky_deepfocus.schema import SCORES_STREAM
from bluesky_deepfocus.storage import close_catalog

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "profile_deepfocus"


def test_ipython_profile_runs_autofocus_and_the_pairs_are_stored(tmp_path):
    """IPython, non-interactive, with the profile: calibrate, defocus, autofocus; then the
    run and all its (z, blur) pairs are found through open_catalog and databroker."""
    catalog_dir = tmp_path / "catalog"
    script = tmp_path / "session.ipy"
    script.write_text(
        "from bluesky_deepfocus.sim import get_simulation\n"
        "cal = RE(calibration_plan(camera, focus, -150, 150, 41, scorer=scorer)).plan_result\n"
        "get_simulation(core).set_true_focus(21.0)\n"
        "res = RE(autofocus_plan(camera, focus, cal, scorer=scorer, max_images=5)).plan_result\n"
        "writer.flush()\n"
        "open('uid.txt', 'w').write(res.run_uid + ' ' + ' '.join(map(str, res.z_measured)))\n"
        "close_session()\n"
    )
    env = dict(
        os.environ,
        BLUESKY_DEEPFOCUS_CATALOG=str(catalog_dir),
        BLUESKY_DEEPFOCUS_SENSOR="256",
        MPLBACKEND="Agg",
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            f"--profile-dir={PROFILE}",
            "--no-banner",
            "--colors=NoColor",
            str(script),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uid, *zs = (tmp_path / "uid.txt").read_text().split()
    z_measured = [float(v) for v in zs]
    cat = open_catalog(catalog_dir, writable=False)
    try:
        run = cat[uid]
        assert run.metadata["start"]["plan_name"] == "autofocus_plan"
        stored = run[SCORES_STREAM].read()
        np.testing.assert_allclose(stored[f"{SCORES_STREAM}_z"].values, z_measured)
        assert np.all(np.isfinite(stored[f"{SCORES_STREAM}_blur"].values))
        assert len(focus_history(cat)) == 1
        import databroker

        db = databroker.Broker(cat)
        table = db[uid].table(stream_name=SCORES_STREAM)
        np.testing.assert_allclose(table[f"{SCORES_STREAM}_z"].values, z_measured)
    finally:
        close_catalog(cat)


def test_configure_session_is_idempotent_and_reports_missing_calibration(tmp_path, capsys):
    ns: dict = {}
    added = configure_session(
        ns, catalog=tmp_path / "cat", sensor=128, live_table=False, progress=False
    )
    assert {
        "RE",
        "catalog",
        "writer",
        "core",
        "camera",
        "focus",
        "scorer",
        "close_session",
    } <= set(added)
    assert ns["calibration"] is None
    assert "No calibration for objective '10x/0.3'" in capsys.readouterr().out
    assert (
        configure_session(
            ns, catalog=tmp_path / "cat", sensor=128, live_table=False, progress=False
        )
        == []
    )
    ns["close_session"]()


def test_cli_help_on_every_command():
    for cmd in (
        [],
        ["demo"],
        ["calibrate"],
        ["autofocus"],
        ["history"],
        ["train"],
        ["bench", "scorer"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bluesky_deepfocus.cli", *cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        assert "usage" in proc.stdout.lower()


@pytest.mark.slow
def test_cli_demo_end_to_end(tmp_path):
    """The README's main job, small: prints where the catalog and the plot are; a rerun appends."""
    for expected_runs in (1, 2):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bluesky_deepfocus.cli",
                "demo",
                "--catalog",
                str(tmp_path / "cat"),
                "--sensor",
                "256",
                "--num",
                "61",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (
            f"Catalog: {tmp_path / 'cat'} ({expected_runs} autofocus runs stored)" in proc.stdout
        )
        assert "Plot:" in proc.stdout and (tmp_path / "cat" / "demo_autofocus.png").exists()
