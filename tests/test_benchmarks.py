"""The benchmark harness itself: which fields count as blank, and the Fig. 4 cell's
points run in worker processes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from bluesky_deepfocus.benchmarks._harness import Bench, field_is_blank
from bluesky_deepfocus.benchmarks.bench_autofocus import _Fig4Task, _run_fig4
from bluesky_deepfocus.spectral import frame_spectrum


@pytest.fixture(scope="module")
def bench():
    return Bench()


def _noisy_rule(sim, z: float) -> bool:
    """The rule on one noisy frame (what the harness used before)."""
    s = frame_spectrum(sim.render(z).astype(np.float32))
    return int(np.count_nonzero(s.log_signal()[1] > 0)) < 3


def test_uniform_field_is_blank_and_tissue_is_not(bench):
    _, _, _, flat = bench.microscope("10x/0.3", np.full((900, 900), 0.5), 1)
    _, _, _, tissue = bench.microscope("10x/0.3", "tissue", 1)
    assert field_is_blank(flat, flat.true_focus_at())
    assert not field_is_blank(tissue, tissue.true_focus_at())


def test_a_field_at_the_edge_of_the_rule_gets_one_answer(bench):
    """A nearly empty beads field at 20x (drawn by the obj20 cell): one noisy frame says
    'not blank' now and then, so it once ran as a trial with detail and counted as blank
    after it. The expected signal against the noise floor answers the same every time."""
    _, _, _, sim = bench.microscope("20x/0.45", "beads", 15038)
    z = sim.true_focus_at()
    noisy = [_noisy_rule(sim, z) for _ in range(12)]
    assert any(noisy) and not all(noisy), noisy  # the old rule flips on this field
    assert {field_is_blank(sim, z) for _ in range(6)} == {True}


def test_fig4_points_in_worker_processes_equal_the_points_run_here(bench):
    """``--jobs 2`` hands the points to spawned workers (their own RunEngine): the same
    trials, in the order of the tasks (classic metrics: no CNN, so to the last digit)."""
    tasks = [
        _Fig4Task("10x/0.3", "brent+tenengrad", 2, 60.0, 61.0),
        _Fig4Task("10x/0.3", "brent+ws", 3, 60.0, 61.0),
    ]
    args = argparse.Namespace(
        fig4_trials=2, jobs=1, sensor=512, settings="{}", on_failure="restore"
    )
    cals = {"10x/0.3": None}  # Brent needs none
    here = list(_run_fig4(tasks, bench, cals, None, args))
    args.jobs = 2
    there = list(_run_fig4(tasks, bench, cals, None, args))
    assert [r["label"] for r, _ in there] == ["brent+tenengrad +/-60, N=2", "brent+ws +/-60, N=3"]
    for (a, pa), (b, pb) in zip(here, there, strict=True):
        assert pa == pb == []
        keys = ("n", "mean_abs_um", "max_abs_um", "mean_images", "mean_abs_estimate_um")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        assert a["mean_images"] == float(a["label"][-1])


def test_bench_spectra_dense_fields_cancel_an_edge_object_does_not():
    """bench_spectra: a dense field's log power ratio between two defocus positions is the
    calibration field's (the specimen cancels); a smooth 40x field with a bright object at
    its edge is not (light from beyond the edge; docs/method.md, "Known failure modes")."""
    from bluesky_deepfocus.benchmarks.bench_spectra import measure

    (dense,) = measure("10x/0.3", families=["nuclei"], seeds=[101], dz_dof=[1.0])
    assert dense["rms_low"] < 0.1 and dense["rms_high"] < 0.15, dense
    (edge,) = measure("40x/0.75", families=["smooth"], seeds=[15039], dz_dof=[2.0])
    assert edge["rms_low"] > 0.3 and edge["mean_change"] > 0.01, edge


def test_fig4_methods_option():
    """``--fig4-methods`` picks the Fig. 4 methods (default all; a typo is refused)."""
    from bluesky_deepfocus.benchmarks.bench_autofocus import FIG4_METHODS, build_parser

    p = build_parser()
    assert p.parse_args([]).fig4_methods == list(FIG4_METHODS)
    assert p.parse_args(["--fig4-methods", "deepfocus", "brent+ws"]).fig4_methods == [
        "deepfocus",
        "brent+ws",
    ]
    with pytest.raises(SystemExit):
        p.parse_args(["--fig4-methods", "brent+sobel"])


def test_summary_counts_converged_runs_whose_final_position_was_not_imaged():
    from bluesky_deepfocus.benchmarks._harness import Trial, summarize

    def trial(err: float, status: str, verified: bool) -> Trial:
        return Trial(
            "10x/0.3",
            "text",
            0,
            "deepfocus",
            "deepfocus",
            (3, 3),
            0.0,
            10.0,
            10.0 + err,
            3,
            status == "converged",
            status,
            0.1,
            extra={"verified": verified},
        )

    s = summarize(
        [
            trial(0.1, "converged", True),
            trial(0.2, "converged", False),
            trial(-3.0, "converged", False),
            trial(2.0, "converged", True),
            trial(-10.0, "restored", False),  # a refusal is not a convergence, imaged or not
        ]
    )
    assert s["refused"] == pytest.approx(0.2)
    assert s["converged_wrong_1um"] == pytest.approx(0.4)
    assert s["converged_unverified"] == pytest.approx(0.4)
    assert s["unverified_wrong_1um"] == pytest.approx(0.2)


def test_seeds_option_runs_a_cell_once_per_seed_and_pools_them(tmp_path):
    """``--seeds`` on the command line: a row per seed (each the cell's draw for that
    seed) and one of all their trials together."""
    import json

    from bluesky_deepfocus.benchmarks.bench_autofocus import build_parser, run

    argv = ["--cells", "obj40", "--trials", "1", "--cal-num", "41", "--seeds", "5", "6"]
    run(build_parser().parse_args([*argv, "--out", str(tmp_path)]))
    rows = json.loads((tmp_path / "autofocus_benchmark.json").read_text())["cells"]["obj40"]
    labels = [r["label"] for r in rows]
    assert labels[0].endswith("seed 5") and labels[1].endswith("seed 6")
    assert labels[2].endswith("seeds 5, 6 together")
    assert rows[2]["n"] == rows[0]["n"] + rows[1]["n"] == 2
    pooled = (rows[0]["mean_abs_um"] + rows[1]["mean_abs_um"]) / 2
    assert rows[2]["mean_abs_um"] == pytest.approx(pooled)
    assert build_parser().parse_args([]).seeds is None


def test_seeded_rows_label_every_seed_and_keep_the_default_row():
    """Without ``--seeds`` the cell's one row keeps its label and its own seed; with one
    seed the row says which; a seed given twice runs once."""
    from bluesky_deepfocus.benchmarks._harness import Trial
    from bluesky_deepfocus.benchmarks.bench_autofocus import _seeded_rows

    ran: list[int] = []

    def trials_for(seed: int) -> list[Trial]:
        ran.append(seed)
        return [
            Trial(
                "10x/0.3",
                "text",
                seed,
                "deepfocus",
                "deepfocus",
                (3, 3),
                0.0,
                0.0,
                0.1 * seed,
                3,
                True,
                "converged",
                0.0,
            )
        ]

    (row,) = _seeded_rows("cell", None, 5, 1.0, trials_for)
    assert row["label"] == "cell" and ran == [5]
    ran.clear()
    (row,) = _seeded_rows("cell", [7], 5, 1.0, trials_for)
    assert row["label"] == "cell, seed 7" and ran == [7]
    ran.clear()
    rows = _seeded_rows("cell", [6, 7, 6], 5, 1.0, trials_for)
    assert ran == [6, 7]
    assert [r["label"] for r in rows] == [
        "cell, seed 6",
        "cell, seed 7",
        "cell, seeds 6, 7 together",
    ]
    assert rows[2]["n"] == 2


def test_a_benchmark_worker_exits_when_its_parent_is_killed(tmp_path):
    """The Fig. 4 workers watch their parent (exit_with_parent): a benchmark killed by
    its main process leaves no worker running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    # parent: starts a child that watches it, then sleeps until killed
    parent_code = (
        "import os, subprocess, sys, time\n"
        "child = (\n"
        "    'import os, sys, time\\n'\n"
        "    'from bluesky_deepfocus.benchmarks.bench_autofocus import exit_with_parent\\n'\n"
        "    'exit_with_parent(int(sys.argv[1]), interval=0.1)\\n'\n"
        "    'open(sys.argv[2], \"w\").write(str(os.getpid()))\\n'\n"
        "    'time.sleep(120)\\n'\n"
        ")\n"
        "subprocess.Popen([sys.executable, '-c', child, str(os.getpid()), sys.argv[1]])\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(pidfile)])
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pidfile.read_text())
        os.kill(child, 0)  # alive while its parent is
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        alive = True
        while alive and time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                time.sleep(0.1)
            except ProcessLookupError:
                alive = False
        if alive:  # reparented to a subreaper that has not reaped it yet: a zombie is gone
            with open(f"/proc/{child}/stat") as fh:
                alive = fh.read().split(")")[-1].split()[0] != "Z"
        assert not alive, f"worker {child} still running after its parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_fig4_worker_initializer_starts_the_parent_watch(monkeypatch):
    """Each Fig. 4 worker watches the process that started it (the pid passed in)."""
    import torch

    from bluesky_deepfocus.benchmarks import bench_autofocus as ba

    watched = []
    monkeypatch.setattr(ba, "exit_with_parent", lambda pid, interval=1.0: watched.append(pid))
    monkeypatch.setattr(ba, "_WORKER", {})
    ba._fig4_worker_init(64, "{}", "sharpest", {}, torch.get_num_threads(), 12345)
    assert watched == [12345]
    assert ba._WORKER["bench"].on_failure == "sharpest"  # every trial of the worker
