"""Benchmark: a simulated 24 h timelapse, one autofocus run per frame, all stored.

Run ``python -m bluesky_deepfocus.benchmarks.bench_reliability [--runs 1000] [--out DIR]``.

A simulated microscope (10x/0.3, tissue, 256x256 sensor) drifts in focus by
``--drift`` um/min plus a random walk (``--walk`` um per frame, Gaussian). Simulated
time is compressed: the clock is frozen during each autofocus run and advanced by
``--interval`` seconds (default 86.4) between frames, so 1000 frames span 24 simulated
hours with ~2.9 um of drift between frames at 2 um/min (``--hours H`` spreads the runs
over H hours instead; long intervals mean large jumps, which the simulator renders with
very large PSFs). After one 61-frame
calibration, every frame is one real :func:`~bluesky_deepfocus.plans.autofocus_plan`
run, warm-started from the last successful one (``prior=(last final z, --prior-sd)``,
``min_images=2``, ``max_images=3``), written into an embedded catalog
(:func:`~bluesky_deepfocus.storage.open_catalog` + ``subscribe_writer``).

It reports, as a markdown summary (also written to ``DIR/summary.md`` with the per-run
table ``DIR/runs.csv`` and the memory samples ``DIR/memory.csv`` when ``--out`` is given):

- the resident memory (RSS) of the process over the runs: start (after the calibration
  and one warm-up run), end, maximum, growth, the growth rate over the second half, the
  documents still waiting for the background catalog writer (they are held in memory),
  and RSS once the writer caught up (before and after ``malloc_trim``);
- the focus error ``|final z - true focus|`` of the runs (mean, p50, p95, max) and the
  outcomes (converged / restored / failed; the plan's default ``on_failure="restore"``);
- data lost: runs emitted by the RunEngine but missing from the catalog, missing from
  :func:`~bluesky_deepfocus.audit.focus_history`, stored without their stop document,
  events missing against the ``num_events`` of each stop document, and runs left in the
  write-ahead journal.

``--writer sync`` stores each document before the RunEngine goes on (no backlog),
``--writer none`` runs without a catalog (the memory of the plans alone). The exit status
is 0 when no data was lost and the memory grew less than ``--max-growth`` MB, 1 otherwise.
The same machinery, at 20 runs, is a test in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LongRunConfig",
    "LongRunReport",
    "RunRecord",
    "StorageCheck",
    "TimelapseRecorder",
    "check_catalog",
    "main",
    "rss_mb",
    "run_timelapse",
    "trim_heap",
]


# --------------------------------------------------------------------------------------
# configuration and records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LongRunConfig:
    """Settings of the simulated timelapse (see the module docstring)."""

    runs: int = 1000
    frame_interval_s: float = 86.4
    drift_um_per_min: float = 2.0
    walk_um: float = 0.3
    prior_sd_um: float = 5.0
    min_images: int = 2
    max_images: int = 3
    seed: int = 0
    memory_every: int = 10

    @property
    def hours(self) -> float:
        """Simulated duration of the timelapse."""
        return self.runs * self.frame_interval_s / 3600.0


@dataclass
class RunRecord:
    """One frame of the timelapse: what autofocus did and where focus truly was."""

    index: int
    uid: str
    sim_time_s: float
    true_focus_um: float
    start_z: float
    final_z: float
    status: str
    images: int
    seconds: float
    error: str = ""

    @property
    def focus_error_um(self) -> float:
        return abs(self.final_z - self.true_focus_um)


@dataclass
class StorageCheck:
    """What the catalog holds compared with what the RunEngine emitted."""

    runs_emitted: int = 0
    runs_in_catalog: int = 0
    runs_in_history: int = 0
    runs_missing: list[str] = field(default_factory=list)
    runs_missing_from_history: list[str] = field(default_factory=list)
    runs_without_stop: list[str] = field(default_factory=list)
    events_expected: int = 0
    events_stored: int = 0
    events_checked_runs: int = 0
    runs_with_missing_events: list[str] = field(default_factory=list)
    journals_pending: int = 0
    seconds: float = 0.0

    @property
    def events_missing(self) -> int:
        return self.events_expected - self.events_stored

    @property
    def data_lost(self) -> bool:
        return bool(
            self.runs_missing
            or self.runs_missing_from_history
            or self.runs_without_stop
            or self.events_missing
            or self.runs_with_missing_events
        )


@dataclass
class LongRunReport:
    """Everything measured by :func:`run_timelapse` and :func:`check_catalog`."""

    config: LongRunConfig
    runs: list[RunRecord]
    memory: list[tuple[int, float, int]]  # (runs done, RSS MB, documents not yet stored)
    storage: StorageCheck | None = None
    rss_drained_mb: float = float("nan")  # after the catalog writer caught up
    rss_trimmed_mb: float = float("nan")  # then after returning free heap to the system
    wall_s: float = 0.0
    store_wait_s: float = 0.0
    exit_statuses: dict[str, int] = field(default_factory=dict)

    # -- memory ----------------------------------------------------------------------
    @property
    def rss_start_mb(self) -> float:
        return self.memory[0][1] if self.memory else float("nan")

    @property
    def rss_end_mb(self) -> float:
        return self.memory[-1][1] if self.memory else float("nan")

    @property
    def rss_max_mb(self) -> float:
        return max(m for _, m, _ in self.memory) if self.memory else float("nan")

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_start_mb

    @property
    def max_backlog(self) -> int:
        """Most documents waiting for the catalog writer at a memory sample."""
        return max((p for _, _, p in self.memory), default=0)

    @property
    def rss_slope_mb_per_100_runs(self) -> float:
        """Least-squares growth rate over the second half of the samples."""
        half = self.memory[len(self.memory) // 2 :]
        if len(half) < 3:
            return float("nan")
        x = np.array([n for n, _, _ in half], dtype=float)
        y = np.array([m for _, m, _ in half], dtype=float)
        if np.ptp(x) == 0:
            return float("nan")
        return float(np.polyfit(x, y, 1)[0] * 100.0)

    # -- focus -----------------------------------------------------------------------
    def focus_errors(self, converged_only: bool = False) -> np.ndarray:
        return np.array(
            [
                r.focus_error_um
                for r in self.runs
                if not r.error and (r.status == "converged" or not converged_only)
            ],
            dtype=float,
        )

    def error_stats(self, converged_only: bool = False) -> dict[str, float]:
        e = self.focus_errors(converged_only)
        if e.size == 0:
            return {"n": 0.0}
        return {
            "n": float(e.size),
            "mean": float(e.mean()),
            "p50": float(np.percentile(e, 50)),
            "p95": float(np.percentile(e, 95)),
            "max": float(e.max()),
            "within_1um": float(np.mean(e <= 1.0)),
        }

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            key = r.status if not r.error else f"error: {r.error.split(':')[0]}"
            out[key] = out.get(key, 0) + 1
        return out

    # -- output ----------------------------------------------------------------------
    def markdown(self) -> str:
        c = self.config
        lines = [
            "# Reliability: simulated timelapse, one autofocus run per frame",
            "",
            f"{len(self.runs)} frames over {c.hours:g} simulated hours "
            f"({c.frame_interval_s:.1f} s apart), drift {c.drift_um_per_min:g} um/min "
            f"+ random walk {c.walk_um:g} um/frame; warm start prior sd {c.prior_sd_um:g} um, "
            f"{c.min_images}-{c.max_images} images per run; wall time {self.wall_s:.0f} s "
            f"(+ {self.store_wait_s:.0f} s waiting for the catalog writer).",
            "",
            "| memory (RSS) | MB |",
            "|---|---|",
            f"| start (after calibration + 1 warm-up run) | {self.rss_start_mb:.1f} |",
            f"| end | {self.rss_end_mb:.1f} |",
            f"| max | {self.rss_max_mb:.1f} |",
            f"| growth end - start | {self.rss_growth_mb:+.1f} |",
            f"| growth rate, second half (MB / 100 runs) | {self.rss_slope_mb_per_100_runs:+.2f} |",
            f"| after the catalog writer caught up | {self.rss_drained_mb:.1f} |",
            f"| then after `malloc_trim` (free heap returned to the system) | "
            f"{self.rss_trimmed_mb:.1f} |",
            f"| documents waiting for the writer: at the end / at most | "
            f"{self.memory[-1][2] if self.memory else 0} / {self.max_backlog} |",
            "",
            "| focus error abs(final z - true focus) (um) | n | mean | p50 | p95 | max | within 1 um |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, conv in (("all runs", False), ("converged runs", True)):
            s = self.error_stats(conv)
            if s.get("n", 0) == 0:
                lines.append(f"| {label} | 0 | | | | | |")
                continue
            lines.append(
                f"| {label} | {int(s['n'])} | {s['mean']:.2f} | {s['p50']:.2f} | "
                f"{s['p95']:.2f} | {s['max']:.2f} | {100 * s['within_1um']:.0f} % |"
            )
        lines += ["", "| outcome | runs |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(self.statuses().items())]
        lines += [
            f"| run exit_status {k!r} | {v} |" for k, v in sorted(self.exit_statuses.items())
        ]
        st = self.storage
        if st is not None:
            lines += [
                "",
                "| data lost | count |",
                "|---|---|",
                f"| runs emitted by the RunEngine | {st.runs_emitted} |",
                f"| runs in the catalog | {st.runs_in_catalog} |",
                f"| runs missing from the catalog | {len(st.runs_missing)} |",
                f"| runs missing from focus_history | {len(st.runs_missing_from_history)} |",
                f"| runs stored without their stop document | {len(st.runs_without_stop)} |",
                f"| events expected (stop documents' num_events, runs checked: "
                f"{st.events_checked_runs}) | {st.events_expected} |",
                f"| events stored | {st.events_stored} |",
                f"| events missing | {st.events_missing} |",
                f"| runs left in the write-ahead journal | {st.journals_pending} |",
                "",
                f"Catalog checked in {st.seconds:.0f} s. Data lost: "
                f"**{'yes' if st.data_lost else 'none'}**.",
            ]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | os.PathLike[str]) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(self.markdown())
        with open(out / "runs.csv", "w", newline="") as f:
            names = [*RunRecord.__dataclass_fields__, "focus_error_um"]
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for r in self.runs:
                w.writerow({**asdict(r), "focus_error_um": r.focus_error_um})
        with open(out / "memory.csv", "w", newline="") as f:
            w2 = csv.writer(f)
            w2.writerow(["runs_done", "rss_mb", "writer_pending"])
            w2.writerows(self.memory)
        return out


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------
def trim_heap() -> bool:
    """Return free heap memory to the system (glibc ``malloc_trim``); False elsewhere.

    Freed memory usually stays in the process (so RSS does not fall when a backlog drains);
    RSS after trimming tells retained-but-free memory from memory still referenced.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def rss_mb() -> float:
    """Resident set size of this process now (MB); peak RSS where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


class TimelapseRecorder:
    """A RunEngine callback keeping, per run, only its plan name and stop document.

    Small on purpose (no events kept), so that it does not distort the memory figures.
    """

    __hash__ = object.__hash__

    def __init__(self) -> None:
        self.plan_names: dict[str, str] = {}
        self.stops: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.plan_names[doc["uid"]] = str(doc.get("plan_name", ""))
        elif name == "stop":
            self.stops[doc["run_start"]] = {
                "exit_status": doc.get("exit_status"),
                "num_events": dict(doc.get("num_events") or {}),
            }

    def uids(self, plan_name: str = "autofocus_plan") -> list[str]:
        return [u for u, p in self.plan_names.items() if p == plan_name]


def run_timelapse(
    RE: Any,
    camera: Any,
    focus: Any,
    calibration: Any,
    scorer: Any,
    sim: Any,
    config: LongRunConfig,
    *,
    writer: Any = None,
    progress: Callable[[RunRecord], None] | None = None,
) -> LongRunReport:
    """Drive ``config.runs`` autofocus runs through a drifting, time-compressed timelapse.

    ``sim`` is the :class:`~bluesky_deepfocus.sim.MicroscopeSimulation` behind the
    devices; its clock is frozen (``time_scale = 0``) and its drift set for the duration
    and restored afterwards. Errors of single runs are recorded, not raised. ``writer``
    (a :class:`~bluesky_deepfocus.storage.CatalogWriter`) is only watched: its backlog is
    sampled with the memory, since documents waiting to be stored are held in memory.
    """
    from ..plans import autofocus_plan

    rng = np.random.default_rng(config.seed)
    dt = config.frame_interval_s
    old_scale, old_drift = sim.clock.time_scale, sim.drift_um_per_s
    sim.clock.time_scale = 0.0
    sim.drift_um_per_s = config.drift_um_per_min / 60.0
    records: list[RunRecord] = []
    memory: list[tuple[int, float, int]] = []
    last_good = float(focus.position)
    t_wall = time.perf_counter()

    def one(index: int) -> RunRecord:
        nonlocal last_good
        start = float(focus.position)
        truth = float(sim.true_focus_at())
        t0 = time.perf_counter()
        plan = autofocus_plan(
            camera,
            focus,
            calibration,
            scorer=scorer,
            min_images=config.min_images,
            max_images=config.max_images,
            prior=(last_good, config.prior_sd_um),
            retry_delay=0.05,
            md={"timelapse_frame": index},
        )
        try:
            result = RE(plan)
        except Exception as exc:  # recorded: a long run must survive single failures
            return RunRecord(
                index,
                "",
                sim.now(),
                truth,
                start,
                float(focus.position),
                "error",
                0,
                time.perf_counter() - t0,
                f"{type(exc).__name__}: {exc}",
            )
        res = result.plan_result
        if res.status == "converged":
            last_good = float(res.final_z)
        return RunRecord(
            index,
            result.run_start_uids[0] if result.run_start_uids else res.run_uid,
            sim.now(),
            truth,
            start,
            float(res.final_z),
            str(res.status),
            int(res.images_used),
            time.perf_counter() - t0,
        )

    try:
        for i in range(config.runs):
            sim.advance(dt)
            sim.true_focus_um += float(rng.normal(0.0, config.walk_um))
            rec = one(i)
            records.append(rec)
            if progress is not None:
                progress(rec)
            if i == 0 or (i + 1) % config.memory_every == 0 or i + 1 == config.runs:
                # the first sample, after one warm-up run, is the baseline
                memory.append((i + 1, rss_mb(), int(writer.pending) if writer else 0))
    finally:
        sim.clock.time_scale = old_scale
        sim.drift_um_per_s = old_drift
    report = LongRunReport(config, records, memory)
    report.wall_s = time.perf_counter() - t_wall
    return report


def _stored_events(run: Any, stream: str) -> int:
    """Number of events of ``stream`` stored for ``run`` (its ``seq_num`` column)."""
    try:
        node = run[stream]
    except KeyError:
        return 0
    try:
        return len(node["seq_num"].read())
    except Exception:
        data = node.read()
        return int(data.sizes.get("time", 0)) if hasattr(data, "sizes") else 0


def check_catalog(
    catalog: Any,
    recorder: TimelapseRecorder,
    *,
    plan_name: str = "autofocus_plan",
    check_events_every: int = 1,
) -> StorageCheck:
    """Compare what the RunEngine emitted (``recorder``) with what ``catalog`` holds.

    Presence, stop documents and summaries of every run come from one
    :func:`~bluesky_deepfocus.audit.focus_history` query; the stored events of every
    ``check_events_every``-th run (0: none) are counted per stream against its stop
    document (about 0.1 s per stream: this is the slow part).
    """
    from tiled.queries import Eq

    from ..audit import focus_history
    from ..storage import pending_journals

    t0 = time.perf_counter()
    check = StorageCheck()
    emitted = recorder.uids(plan_name)
    check.runs_emitted = len(emitted)
    stored = set(catalog.search(Eq("plan_name", plan_name)).keys())
    check.runs_in_catalog = len(stored & set(emitted))
    check.runs_missing = [u for u in emitted if u not in stored]
    history = focus_history(catalog)
    rows = history.set_index("uid") if len(history) else None
    in_history = set(history["uid"]) if len(history) else set()
    check.runs_in_history = len(in_history & set(emitted))
    check.runs_missing_from_history = [u for u in emitted if u not in in_history]
    if rows is not None:
        check.runs_without_stop = [
            u
            for u in emitted
            if u in rows.index and not isinstance(rows.at[u, "exit_status"], str)
        ]
    for i, uid in enumerate(emitted):
        if uid not in stored or check_events_every <= 0 or i % check_events_every:
            continue
        run = catalog[uid]
        expected = recorder.stops.get(uid, {}).get("num_events", {})
        check.events_checked_runs += 1
        missing = False
        for stream, n in expected.items():
            got = _stored_events(run, stream)
            check.events_expected += int(n)
            check.events_stored += min(int(n), got)
            missing = missing or got < int(n)
        if missing:
            check.runs_with_missing_events.append(uid)
    check.journals_pending = len(pending_journals(catalog))
    check.seconds = time.perf_counter() - t0
    return check


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _build(sensor: tuple[int, int], seed: int) -> tuple[Any, Any, Any, Any, Any]:
    from .. import DeepFocusScorer
    from ..devices import MMCamera, MMFocusStage
    from ..sim import get_simulation, simulated_microscope

    core = simulated_microscope(
        specimen="tissue", sensor_shape=sensor, seed=seed, slide_size_um=600.0
    )
    camera = MMCamera(core, name="camera")
    focus = MMFocusStage(core, name="focus", limits=(-4000.0, 4000.0))
    return core, get_simulation(core), camera, focus, DeepFocusScorer()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the markdown summary; 0 when nothing was lost."""
    from bluesky import RunEngine

    from ..plans import calibration_plan
    from ..storage import close_catalog, open_catalog, subscribe_writer

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="autofocus runs (frames)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results")
    parser.add_argument(
        "--interval",
        type=float,
        default=86.4,
        help="simulated seconds between frames (default 86.4: 1000 runs span 24 h)",
    )
    parser.add_argument(
        "--hours", type=float, default=None, help="simulated duration instead of --interval"
    )
    parser.add_argument("--drift", type=float, default=2.0, help="focus drift (um/min)")
    parser.add_argument("--walk", type=float, default=0.3, help="random walk (um/frame)")
    parser.add_argument("--prior-sd", type=float, default=5.0, help="warm-start sd (um)")
    parser.add_argument("--sensor", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random walk")
    parser.add_argument(
        "--specimen-seed", type=int, default=3, help="seed of the simulated specimen and noise"
    )
    parser.add_argument("--fsync", action="store_true", help="fsync the journal per document")
    parser.add_argument(
        "--writer",
        choices=("background", "sync", "none"),
        default="background",
        help="catalog writer in a background thread (default), synchronous (the RunEngine "
        "waits for each document to be stored), or none (no catalog: memory of the plans "
        "alone)",
    )
    parser.add_argument(
        "--check-events-every",
        type=int,
        default=1,
        help="count the stored events of every N-th run (0: none)",
    )
    parser.add_argument("--max-growth", type=float, default=200.0, help="allowed RSS growth (MB)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs={args.runs!r} must be at least 1")

    config = LongRunConfig(
        runs=args.runs,
        frame_interval_s=args.hours * 3600.0 / args.runs if args.hours else args.interval,
        drift_um_per_min=args.drift,
        walk_um=args.walk,
        prior_sd_um=args.prior_sd,
        seed=args.seed,
        memory_every=max(1, args.runs // 100),
    )
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    folder = Path(tmp.name) if tmp is not None else Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    catalog = open_catalog(folder / "catalog") if args.writer != "none" else None
    loop = asyncio.new_event_loop()
    RE = RunEngine({}, call_returns_result=True, loop=loop)
    recorder = TimelapseRecorder()
    RE.subscribe(recorder)
    writer = (
        subscribe_writer(RE, catalog, fsync=args.fsync, background=args.writer == "background")
        if catalog is not None
        else None
    )
    try:
        _, sim, camera, focus, scorer = _build(tuple(args.sensor), args.specimen_seed)
        cal = RE(calibration_plan(camera, focus, -150, 150, 61, scorer=scorer)).plan_result  # type: ignore[union-attr]
        t_last = [time.perf_counter()]

        def progress(rec: RunRecord) -> None:
            if (rec.index + 1) % max(1, args.runs // 20) == 0 and time.perf_counter() > t_last[0]:
                t_last[0] = time.perf_counter()
                print(
                    f"  {rec.index + 1}/{args.runs} runs, RSS {rss_mb():.0f} MB, "
                    f"{writer.pending if writer else 0} documents waiting for the writer, "
                    "last error "
                    f"{rec.focus_error_um:.2f} um ({rec.status})",
                    flush=True,
                )

        report = run_timelapse(
            RE, camera, focus, cal, scorer, sim, config, writer=writer, progress=progress
        )
        t0 = time.perf_counter()
        if writer is not None:
            writer.flush()
        report.store_wait_s = time.perf_counter() - t0
        report.rss_drained_mb = rss_mb()
        if trim_heap():
            report.rss_trimmed_mb = rss_mb()
        for uid in recorder.uids():
            status = str(recorder.stops.get(uid, {}).get("exit_status"))
            report.exit_statuses[status] = report.exit_statuses.get(status, 0) + 1
        if catalog is not None:
            report.storage = check_catalog(
                catalog, recorder, check_events_every=args.check_events_every
            )
        text = report.markdown()
        print(text)
        if args.out is not None:
            report.write(args.out)
    finally:
        if catalog is not None:
            close_catalog(catalog)
        loop.call_soon_threadsafe(loop.stop)
        RE._th.join()
        loop.close()
        if tmp is not None:
            tmp.cleanup()
    ok = args.writer == "none" or (report.storage is not None and not report.storage.data_lost)
    ok = ok and math.isfinite(report.rss_growth_mb) and report.rss_growth_mb < args.max_growth
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
