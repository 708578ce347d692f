"""Benchmark: how far a test specimen's CNN score sits from the calibration curve.

Autofocus matches a specimen's scores against ``b_calib(z)`` measured on another
specimen. :class:`~.search.DeepFocusSearch` models the difference as one constant offset
per specimen (prior sd ``cnn_offset_sigma``) plus per-image noise (``cnn_sigma``). This
measures the difference: a calibration on the calibration family (the benchmark's
``tissue``, through ``calibration_plan`` on the RunEngine), then for each test family and
seed, frames over +/-``half`` DOF scored by the shipped network; it prints the mean
difference within 1.5 DOF of focus and beyond, and its spread within the specimen.

Run ``python -m bluesky_deepfocus.benchmarks.bench_offsets [--objective 10x/0.3]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..optics import get_objective
from ..scorer import DeepFocusScorer
from ..specimens import TEST_FAMILIES
from ._harness import CAL_FAMILY, CAL_SEED, Bench

__all__ = ["main", "measure"]


def _nan_stat(stat: Any, values: np.ndarray) -> float:
    """``stat`` (``np.nanmean``/``np.nanstd``) of the finite values; NaN when there are none."""
    return float(stat(values)) if np.any(np.isfinite(values)) else float("nan")


def measure(
    objective: str = "10x/0.3",
    families: Sequence[str] = TEST_FAMILIES,
    seeds: Sequence[int] = (101, 102, 103),
    *,
    half_dof: float = 5.0,
    num: int = 21,
    cal_num: int = 121,
) -> list[dict[str, float | str | int]]:
    """One row per (family, seed): mean score - ``b_calib`` near / far, spread, NaN frames."""
    obj = get_objective(objective)
    bench = Bench()
    scorer = DeepFocusScorer()
    _, cam, foc, _ = bench.microscope(objective, CAL_FAMILY, CAL_SEED)
    cal = bench.calibrate(cam, foc, scorer, 13 * obj.dof_um, cal_num)
    zs = np.linspace(-half_dof * obj.dof_um, half_dof * obj.dof_um, num)
    expected = cal.b_calib(zs)
    near = np.abs(zs) <= 1.5 * obj.dof_um
    rows: list[dict[str, float | str | int]] = []
    for family in families:
        for seed in seeds:
            sim = bench.microscope(objective, family, seed)[3]
            sim.set_true_focus(0.0)
            b = np.array([scorer.score(sim.render(float(z))).score for z in zs])
            d = b - expected
            rows.append(
                {
                    "family": family,
                    "seed": seed,
                    "offset_near": _nan_stat(np.nanmean, d[near]),
                    "offset_far": _nan_stat(np.nanmean, d[~near]),
                    "spread": _nan_stat(np.nanstd, d),
                    "no_information": int(np.isnan(b).sum()),
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bluesky-deepfocus bench offsets", description=__doc__.split("\n")[0]
    )
    p.add_argument("--objective", default="10x/0.3")
    p.add_argument("--families", nargs="+", default=list(TEST_FAMILIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[101, 102, 103])
    p.add_argument("--half-dof", type=float, default=5.0)
    args = p.parse_args(argv)
    rows = measure(args.objective, args.families, args.seeds, half_dof=args.half_dof)
    print(f"CNN score - calibration curve ({args.objective}, calibration on {CAL_FAMILY})")
    print("| family | seed | mean within 1.5 DOF | mean beyond | spread | no-information frames |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['seed']} | {r['offset_near']:+.3f} | {r['offset_far']:+.3f} "
            f"| {r['spread']:.3f} | {r['no_information']} |"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
