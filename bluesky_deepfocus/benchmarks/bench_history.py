"""Benchmark: focus history over many stored autofocus runs, and the cost of storing one.

Run ``python -m bluesky_deepfocus.benchmarks.bench_history [--runs 1000]``. It writes
synthetic autofocus runs (following :mod:`bluesky_deepfocus.schema`, no images) into a
temporary embedded catalog and times :func:`bluesky_deepfocus.audit.focus_history` over
them, then times the extra RunEngine time of storing one autofocus run with eight
512x512 uint16 images with the journal (fsync per document, and flush only) and without.

The synthetic plan here is also what the storage/audit tests use; it is a stand-in with
the same documents as the real ``autofocus_plan``, driven by ophyd soft signals.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ophyd import Signal

from ..schema import MD_KEY, RESULT_STREAM, SCORES_STREAM, AutofocusSummary

__all__ = [
    "SyntheticAutofocusSignals",
    "main",
    "synthetic_autofocus_plan",
    "synthetic_calibration_curve",
    "time_focus_history",
    "time_journal_append",
    "time_one_run",
    "write_synthetic_history",
]

FWHM_UM = 10.0


class _ArraySignal(Signal):
    """Soft signal holding an array; describes its numpy dtype as event-model wants."""

    def describe(self) -> dict[str, Any]:
        desc = super().describe()
        value = np.asarray(self.get())
        desc[self.name]["dtype_numpy"] = value.dtype.str
        return desc


def synthetic_calibration_curve(z: Any) -> Any:
    """Blur score of the synthetic instrument at defocus ``z`` (um): a smooth V shape."""
    z = np.asarray(z, dtype=float)
    return np.sqrt(1.0 + (z / (FWHM_UM / 2)) ** 2)


class SyntheticAutofocusSignals:
    """The ophyd soft signals a synthetic autofocus run reads.

    Parameters
    ----------
    image_shape
        Shape of the camera image in ``primary`` (uint16); ``None``: no image.
    """

    def __init__(self, image_shape: tuple[int, int] | None = None) -> None:
        self.focus_z = Signal(name="focus_z", value=0.0)
        self.image = (
            _ArraySignal(name="camera_image", value=np.zeros(image_shape, dtype="<u2"))
            if image_shape is not None
            else None
        )
        self.image_shape = image_shape
        self.z = Signal(name="z", value=0.0)
        self.blur = Signal(name="blur", value=0.0)
        self.informative_fraction = Signal(name="informative_fraction", value=1.0)
        self.image_index = Signal(name="image_index", value=0)
        defaults: dict[str, Any] = {
            "start_z": 0.0,
            "final_z": 0.0,
            "dz": 0.0,
            "images_used": 0,
            "residual": 0.0,
            "confidence": 0.0,
            "converged": False,
            "moved": False,
            "status": "",
            "reason": "",
            "sharpness_start": math.nan,
            "sharpness_final": math.nan,
        }
        self.result = {name: Signal(name=name, value=value) for name, value in defaults.items()}
        self._rng = np.random.default_rng(0)

    @property
    def primary(self) -> list[Signal]:
        return [self.focus_z] + ([self.image] if self.image is not None else [])

    @property
    def scores(self) -> list[Signal]:
        return [self.z, self.blur, self.informative_fraction, self.image_index]

    def render(self, defocus: float) -> Any:
        assert self.image_shape is not None
        level = 1000.0 / synthetic_calibration_curve(defocus)
        return self._rng.poisson(level, size=self.image_shape).astype("<u2")


def synthetic_autofocus_plan(
    signals: SyntheticAutofocusSignals,
    *,
    start_z: float,
    best_z: float,
    n_images: int = 3,
    fail: bool = False,
    calibration_uid: str = "calibration-0",
    objective: str = "10x/0.3",
    model_id: str = "deepfocus-synthetic",
    md: dict[str, Any] | None = None,
) -> Generator[Any, Any, AutofocusSummary]:
    """A run shaped like ``autofocus_plan``'s (schema in :mod:`bluesky_deepfocus.schema`).

    Images at ``start_z`` and around it, their scores in ``SCORES_STREAM``, the decision
    in ``RESULT_STREAM``. ``fail=True`` records a failed run that restores ``start_z``.
    """
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp

    _md = {
        "plan_name": "autofocus_plan",
        "plan_args": {"start_z": start_z, "n_images": n_images},
        "detectors": ["camera"],
        "motors": ["focus_z"],
        "hints": {"dimensions": [[["focus_z"], "primary"]]},
        MD_KEY: {
            "calibration_uid": calibration_uid,
            "objective": objective,
            "model_id": model_id,
            "model_sha256": "0" * 64,
            "algorithm": {"name": "deepfocus", "settings": {"n_images": n_images}},
            "roi": None,
            "start_z": start_z,
            "limits": [-200.0, 200.0],
            "max_travel": 150.0,
            "on_failure": "restore",
        },
        **(md or {}),
    }
    offsets = [0.0, -2 * FWHM_UM, 2 * FWHM_UM, -FWHM_UM, FWHM_UM, -3 * FWHM_UM, 3 * FWHM_UM]
    zs = [start_z + offsets[i % len(offsets)] + 0.1 * (i // len(offsets)) for i in range(n_images)]

    decided: list[AutofocusSummary] = []

    @bpp.run_decorator(md=_md)
    def inner() -> Generator[Any, Any, None]:
        for i, z in enumerate(zs):
            yield from bps.mv(signals.focus_z, z)
            if signals.image is not None:
                signals.image.put(signals.render(z - best_z))
            yield from bps.trigger_and_read(signals.primary)
            signals.z.put(z)
            signals.blur.put(float(synthetic_calibration_curve(z - best_z)))
            signals.informative_fraction.put(1.0)
            signals.image_index.put(i)
            yield from bps.trigger_and_read(signals.scores, name=SCORES_STREAM)
        if fail:
            summary = AutofocusSummary(
                start_z=start_z,
                final_z=start_z,
                dz=math.nan,
                images_used=n_images,
                residual=math.nan,
                confidence=0.1,
                converged=False,
                moved=False,
                status="failed",
                reason="no focus information in the images",
            )
        else:
            summary = AutofocusSummary(
                start_z=start_z,
                final_z=best_z,
                dz=best_z - start_z,
                images_used=n_images,
                residual=0.01,
                confidence=0.95,
                converged=True,
                moved=abs(best_z - start_z) > 0,
                status="converged",
                reason="quadratic fit beat linear fit",
                sharpness_start=0.2,
                sharpness_final=0.9,
            )
        yield from bps.mv(signals.focus_z, summary.final_z)
        for name, value in summary.as_dict().items():
            signals.result[name].put(value)
        yield from bps.trigger_and_read(list(signals.result.values()), name=RESULT_STREAM)
        decided.append(summary)

    yield from inner()
    return decided[0]


def write_synthetic_history(
    RE: Any,
    n: int,
    *,
    signals: SyntheticAutofocusSignals | None = None,
    seed: int = 0,
    fail_every: int = 7,
    objectives: Sequence[str] = ("10x/0.3", "20x/0.45"),
    calibration_uids: Sequence[str] = ("calibration-a", "calibration-b"),
) -> list[str]:
    """Run ``n`` synthetic autofocus runs on ``RE``; return their uids in order."""
    signals = signals or SyntheticAutofocusSignals()
    rng = np.random.default_rng(seed)
    uids: list[str] = []
    best = 0.0
    for i in range(n):
        best += float(rng.normal(0, 0.5))
        start = best + float(rng.normal(0, 5))
        result = RE(
            synthetic_autofocus_plan(
                signals,
                start_z=start,
                best_z=best,
                fail=(fail_every > 0 and i % fail_every == fail_every - 1),
                objective=objectives[i % len(objectives)],
                calibration_uid=calibration_uids[i % len(calibration_uids)],
            )
        )
        uids.extend(getattr(result, "run_start_uids", result))
    return uids


def _make_RE() -> Any:
    from bluesky import RunEngine

    return RunEngine({}, call_returns_result=True)


def time_focus_history(catalog: Any, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of ``focus_history(catalog)``."""
    from ..audit import focus_history

    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        focus_history(catalog)
        best = min(best, time.perf_counter() - t0)
    return best


def time_one_run(
    catalog: Any | None,
    *,
    image_shape: tuple[int, int] = (512, 512),
    n_images: int = 8,
    repeats: int = 3,
    **writer_kwargs: Any,
) -> tuple[float, float]:
    """Median seconds of one autofocus run with ``n_images`` images: (RunEngine, stored).

    The first is how long ``RE(plan)`` takes (what the session waits for); the second
    runs until the run is in the catalog (``CatalogWriter.flush``). ``catalog=None``
    times the run with no writer subscribed (the baseline). Runs do not overlap.
    """
    from ..storage import CatalogWriter

    RE = _make_RE()
    writer = None
    if catalog is not None:
        writer = CatalogWriter(catalog, **writer_kwargs)
        RE.subscribe(writer)
    signals = SyntheticAutofocusSignals(image_shape=image_shape)
    engine, stored = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        RE(synthetic_autofocus_plan(signals, start_z=5.0 + i, best_z=0.0, n_images=n_images))
        engine.append(time.perf_counter() - t0)
        if writer is not None:
            writer.flush()
        stored.append(time.perf_counter() - t0)
    # The first run warms up imports and caches.
    return float(np.median(engine[1:])), float(np.median(stored[1:]))


def time_journal_append(
    image_shape: tuple[int, int] = (512, 512), n: int = 50
) -> dict[str, float]:
    """Seconds per journaled event holding one image, with and without fsync."""
    from .._journal import JournalFile

    image = np.random.default_rng(0).integers(0, 4000, size=image_shape).astype("<u2")
    doc = {
        "uid": "x",
        "time": time.time(),
        "descriptor": "d",
        "seq_num": 1,
        "data": {"camera_image": image, "focus_z": 1.0},
        "timestamps": {"camera_image": 1.0, "focus_z": 1.0},
        "filled": {},
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fsync in (True, False):
            journal = JournalFile(Path(tmp) / f"j{fsync}", fsync=fsync)
            t0 = time.perf_counter()
            for _ in range(n):
                journal.append("event", doc)
            out["fsync" if fsync else "flush"] = (time.perf_counter() - t0) / n
            journal.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the timings."""
    from ..storage import close_catalog, open_catalog, subscribe_writer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="autofocus runs to store")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing")
    args = parser.parse_args(argv)

    if args.runs > 0:
        with tempfile.TemporaryDirectory() as tmp:
            catalog = open_catalog(Path(tmp) / "history")
            RE = _make_RE()
            writer = subscribe_writer(RE, catalog, fsync=False)
            t0 = time.perf_counter()
            write_synthetic_history(RE, args.runs)
            t_run = time.perf_counter() - t0
            writer.flush()
            t_write = time.perf_counter() - t0
            print(
                f"wrote {args.runs} synthetic autofocus runs (no images): RunEngine done "
                f"after {t_run:.1f} s, all stored after {t_write:.1f} s "
                f"({1000 * t_write / args.runs:.0f} ms/run stored)"
            )
            t_hist = time_focus_history(catalog, repeats=args.repeats)
            print(f"focus_history over {args.runs} runs: {t_hist:.3f} s (best of {args.repeats})")
            close_catalog(catalog)

    print("one autofocus run, 8 images 512x512 uint16 (+8 score events, 1 result event),")
    print("median seconds: RunEngine returns / run stored in the catalog")
    with tempfile.TemporaryDirectory() as tmp:
        catalog = open_catalog(Path(tmp) / "images")
        cases: list[tuple[str, Any, dict[str, Any]]] = [
            ("RunEngine alone (no writer)", None, {}),
            ("background writer + journal, fsync", catalog, {"fsync": True}),
            ("background writer + journal, flush only", catalog, {"fsync": False}),
            ("background writer, no journal", catalog, {"journal": False}),
            ("synchronous writer + journal, fsync", catalog, {"background": False}),
            ("synchronous writer, no journal", catalog, {"background": False, "journal": False}),
        ]
        base = None
        for label, cat, kwargs in cases:
            engine, stored = time_one_run(cat, repeats=args.repeats, **kwargs)
            base = engine if base is None else base
            print(
                f"  {label:<42} {engine:6.3f} (+{engine - base:.3f}) / {stored:6.3f} "
                f"(+{stored - base:.3f})"
            )
        close_catalog(catalog)
    per_event = time_journal_append()
    print(
        "journal append of one 512x512 uint16 event: "
        f"{1000 * per_event['fsync']:.2f} ms with fsync, {1000 * per_event['flush']:.2f} ms "
        "without"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
