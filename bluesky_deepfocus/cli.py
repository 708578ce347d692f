"""The ``bluesky-deepfocus`` command: demo, calibrate, autofocus, history, train, bench."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
    """Show a spinner with the elapsed time for anything slower than a second."""
    from rich.console import Console

    console = Console(stderr=True)
    t = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[green]done[/green] {message} ({time.perf_counter() - t:.1f} s)")


def _session(args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    from .session import configure_session

    ns: dict[str, Any] = {}
    with _step("opening the catalog and the microscope"):
        configure_session(
            ns,
            config_file=getattr(args, "config", None),
            objective=getattr(args, "objective", "10x/0.3"),
            specimen=getattr(args, "specimen", "tissue"),
            sensor=getattr(args, "sensor", 512),
            catalog=args.catalog or True,
            live_table=False,
            progress=False,
            **kw,
        )
    return ns


def _catalog_path(ns: dict[str, Any]) -> str:
    from .storage import catalog_folder, default_catalog_location

    folder = catalog_folder(ns["catalog"]) if ns.get("catalog") is not None else None
    return str(folder) if folder else default_catalog_location()


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulated microscope -> calibrate -> defocus -> autofocus -> summary and plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .audit import focus_history, plot_autofocus_run, plot_focus_trajectory
    from .plans import autofocus_plan, calibration_plan
    from .sim import get_simulation

    ns = _session(args, load_calibration=False)
    RE, camera, focus, scorer = ns["RE"], ns["camera"], ns["focus"], ns["scorer"]
    sim = get_simulation(ns["core"])
    half = 13 * sim.objective.dof_um
    try:
        with _step(f"calibrating {sim.objective.name} over +/-{half:.0f} um ({args.num} images)"):
            cal = RE(
                calibration_plan(camera, focus, -half, half, args.num, scorer=scorer)
            ).plan_result
        print(cal.summary())
        target = float(args.defocus)
        sim.set_true_focus(sim.true_focus_at() + target)
        print(f"Moved the sample: the true focus is now {target:+.2f} um from the stage position.")
        with _step("autofocus"):
            result = RE(
                autofocus_plan(camera, focus, cal, scorer=scorer, max_images=args.max_images)
            ).plan_result
        truth = sim.true_focus_at()
        print(result)
        print(
            f"True focus {truth:.3f} um; final position {result.final_z:.3f} um; error {result.final_z - truth:+.3f} um."
        )
        ns["writer"].flush()
        run = ns["catalog"][result.run_uid]
        history = focus_history(ns["catalog"])
        plot_path = (
            Path(args.plot) if args.plot else Path(_catalog_path(ns)) / "demo_autofocus.png"
        )
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        plot_autofocus_run(run, cal, ax=axes[0])
        plot_focus_trajectory(history, ax=axes[1])
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
        print(f"Catalog: {_catalog_path(ns)} ({len(history)} autofocus runs stored)")
        print(f"Plot: {plot_path}")
        return 0 if result.converged else 1
    finally:
        ns["close_session"]()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .plans import calibration_plan

    ns = _session(args, load_calibration=False)
    try:
        with _step(f"calibration z-stack {args.start}..{args.stop} um, {args.num} images"):
            cal = ns["RE"](
                calibration_plan(
                    ns["camera"], ns["focus"], args.start, args.stop, args.num, scorer=ns["scorer"]
                )
            ).plan_result
        print(cal.summary())
        print(f"Stored as run {cal.uid} in {_catalog_path(ns)}")
        if args.save:
            print(f"Saved {cal.save(args.save)}")
        return 0
    finally:
        ns["close_session"]()


def cmd_autofocus(args: argparse.Namespace) -> int:
    from .calibration import Calibration
    from .plans import autofocus_plan

    ns = _session(args, load_calibration=args.calibration is None)
    try:
        cal = Calibration.load(args.calibration) if args.calibration else ns.get("calibration")
        if cal is None:
            print("No calibration: run `bluesky-deepfocus calibrate` first.", file=sys.stderr)
            return 2
        if getattr(args, "defocus", None):
            from .sim import get_simulation

            sim = get_simulation(ns["core"])
            sim.set_true_focus(sim.true_focus_at() + float(args.defocus))
        with _step("autofocus"):
            result = ns["RE"](
                autofocus_plan(
                    ns["camera"],
                    ns["focus"],
                    cal,
                    scorer=ns["scorer"],
                    min_images=args.min_images,
                    max_images=args.max_images,
                    strategy=args.strategy,
                )
            ).plan_result
        print(result)
        return 0 if result.converged else 1
    finally:
        ns["close_session"]()


def cmd_history(args: argparse.Namespace) -> int:
    import pandas as pd

    from .audit import focus_history, plot_focus_trajectory
    from .storage import close_catalog, open_catalog

    cat = open_catalog(args.catalog, writable=False)
    try:
        filters = {}
        if args.objective:
            filters["objective"] = args.objective
        df = focus_history(cat, since=args.since, until=args.until, **filters)
        with pd.option_context("display.max_rows", args.rows, "display.width", 160):
            print(df.tail(args.rows).to_string() if len(df) else "no autofocus runs")
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4))
            plot_focus_trajectory(df, ax=ax)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=110)
            print(f"Plot: {args.plot}")
        return 0
    finally:
        close_catalog(cat)


def cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from . import training

    return training.main(list(rest))


BENCHES = {
    "scorer": "bench_scorer",
    "autofocus": "bench_autofocus",
    "devices": "bench_devices",
    "history": "bench_history",
    "reliability": "bench_reliability",
    "sharpness": "bench_sharpness",
    "offsets": "bench_offsets",
    "spectra": "bench_spectra",
}


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    import importlib

    mod = importlib.import_module(f".benchmarks.{BENCHES[args.which]}", __package__)
    return int(mod.main(list(rest)) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bluesky-deepfocus",
        description="DeepFocus autofocus for Bluesky / pymmcore-plus microscopes.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--catalog",
            default=None,
            help="catalog folder or http(s) URL (default: per-user folder or $BLUESKY_DEEPFOCUS_CATALOG)",
        )
        sp.add_argument(
            "--config",
            default=None,
            help="Micro-Manager MMConfig.cfg (default: the simulated microscope)",
        )
        sp.add_argument("--objective", default="10x/0.3", help="simulated objective")
        sp.add_argument("--specimen", default="tissue", help="simulated specimen family")
        sp.add_argument("--sensor", type=int, default=512, help="simulated sensor size (pixels)")

    d = sub.add_parser(
        "demo", help="simulated microscope: calibrate, defocus, autofocus, summary + plot"
    )
    common(d)
    d.add_argument("--defocus", type=float, default=37.0, help="move the sample by this many um")
    d.add_argument("--num", type=int, default=121, help="calibration images")
    d.add_argument("--max-images", type=int, default=6)
    d.add_argument(
        "--plot", default=None, help="where to save the plot (default: next to the catalog)"
    )
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("calibrate", help="acquire and store a calibration z-stack")
    common(c)
    c.add_argument("--start", type=float, default=-150.0)
    c.add_argument("--stop", type=float, default=150.0)
    c.add_argument("--num", type=int, default=121)
    c.add_argument("--save", default=None, help="also save the calibration as JSON")
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser(
        "autofocus", help="run autofocus with the latest calibration of the objective"
    )
    common(a)
    a.add_argument(
        "--calibration", default=None, help="calibration JSON (default: latest in the catalog)"
    )
    a.add_argument("--min-images", type=int, default=3)
    a.add_argument("--max-images", type=int, default=8)
    a.add_argument("--strategy", default="deepfocus", choices=["deepfocus", "paper"])
    a.add_argument("--defocus", type=float, default=None, help="(simulated) move the sample first")
    a.set_defaults(func=cmd_autofocus)

    h = sub.add_parser("history", help="table of autofocus runs (and --plot)")
    h.add_argument("--catalog", default=None)
    h.add_argument("--since", default=None, help="ISO time or Unix time")
    h.add_argument("--until", default=None)
    h.add_argument("--objective", default=None)
    h.add_argument("--rows", type=int, default=50)
    h.add_argument("--plot", default=None, help="save the focus trajectory plot here")
    h.set_defaults(func=cmd_history)

    t = sub.add_parser(
        "train", help="train the CNN (see `bluesky-deepfocus train --help`)", add_help=False
    )
    t.set_defaults(func=None, passthrough=cmd_train)

    b = sub.add_parser(
        "bench", help="benchmarks: scorer, autofocus, devices, history, reliability"
    )
    b.add_argument("which", choices=list(BENCHES))
    b.add_argument(
        "options", nargs=argparse.REMAINDER, help="options of that benchmark (try --help)"
    )
    b.set_defaults(func=None, passthrough=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", None) is not None:
        if args.command == "train":
            rest = argv[argv.index("train") + 1 :]
        else:
            rest = list(args.options) + list(rest)
        return int(args.passthrough(args, rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
