"""Benchmark: does the frames' power spectrum cancel the specimen?

Our search compares the frames of one field through ``log P(k; z) - log P(k; z')``: for
an infinite, thin, incoherently imaged specimen that difference is the instrument's alone
(``log |H(k; z)|^2 - log |H(k; z')|^2``), whatever the specimen. A frame is not infinite:
light of objects beyond its edge (or tapered by the window at it) moves into the frame
as it defocuses, and the difference then depends on the field. This measures by how much:
for each family and seed, optical images (before the camera) at focus and at ``dz`` DOF from it, the log
power ratio ``log P(dz) / P(0)`` per spectral bin against the same ratio on the
calibration's family (the benchmark's ``tissue``), as the RMS difference over the bins
where both hold signal, below and above ``--split`` cycles/px; and the frame's mean change
(light that entered from beyond the edge).

Run ``python -m bluesky_deepfocus.benchmarks.bench_spectra [--objective 40x/0.75]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from ..optics import get_objective
from ..specimens import TEST_FAMILIES
from ..spectral import EDGES, frame_spectrum
from ._harness import CAL_FAMILY, CAL_SEED, Bench, field_is_blank

__all__ = ["main", "measure"]


def _log_ratios(
    bench: Bench, objective: str, family: str, seed: int, dzs: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``log P(dz) / P(0)`` per bin for each ``dz``, and the mean's change; None for a
    field blank at its focus (nothing to compare, as in the autofocus benchmark)."""
    sim = bench.microscope(objective, family, seed)[3]
    sim.set_true_focus(0.0)
    if field_is_blank(sim, 0.0):
        return None
    f0 = np.asarray(sim.optical_image(0.0))  # before the camera: no noise, no digitizing
    p0 = frame_spectrum(f0).power
    out, means = [], []
    for dz in dzs:
        f = np.asarray(sim.optical_image(float(dz)))
        p = frame_spectrum(f).power
        with np.errstate(divide="ignore", invalid="ignore"):
            # bins with no signal at either defocus (beyond the band limit) are left out
            r = np.where((p > 0) & (p0 > 0), np.log(p / p0), np.nan)
        out.append(r)
        means.append(float(f.mean() / f0.mean() - 1.0))
    return np.array(out), np.array(means)


def measure(
    objective: str = "40x/0.75",
    families: Sequence[str] = TEST_FAMILIES,
    seeds: Sequence[int] = (101, 102, 103),
    dz_dof: Sequence[float] = (0.5, 1.0, 2.0, 3.0),
    split: float = 0.03,
) -> list[dict[str, float | str | int]]:
    """One row per (family, seed, dz): RMS difference of the log power ratio from the
    calibration family's, below / above ``split`` cycles/px, and the mean's change."""
    obj = get_objective(objective)
    bench = Bench()
    dzs = [d * obj.dof_um for d in dz_dof]
    got = _log_ratios(bench, objective, CAL_FAMILY, CAL_SEED, dzs)
    if got is None:
        raise RuntimeError(f"The calibration field ({CAL_FAMILY}, seed {CAL_SEED}) is blank.")
    ref = got[0]
    centres = np.sqrt(EDGES[1:] * EDGES[:-1])
    low = centres < split
    rows: list[dict[str, float | str | int]] = []
    for family in families:
        for seed in seeds:
            got = _log_ratios(bench, objective, family, seed, dzs)
            if got is None:
                print(f"{family} seed {seed}: blank at its focus, skipped")
                continue
            r, means = got
            for i, d in enumerate(dz_dof):
                diff = r[i] - ref[i]
                row: dict[str, float | str | int] = {"family": family, "seed": seed, "dz_dof": d}
                for name, sel in (("low", low), ("high", ~low)):
                    v = diff[sel & np.isfinite(diff)]
                    row[f"rms_{name}"] = float(np.sqrt(np.mean(v * v))) if len(v) else np.nan
                row["mean_change"] = float(means[i])
                rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bluesky-deepfocus bench spectra", description=__doc__.split("\n")[0]
    )
    p.add_argument("--objective", default="40x/0.75")
    p.add_argument("--families", nargs="+", default=list(TEST_FAMILIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    p.add_argument("--dz-dof", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    p.add_argument("--split", type=float, default=0.03, help="cycles/px between low and high")
    a = p.parse_args(argv)
    rows = measure(a.objective, a.families, a.seeds, a.dz_dof, a.split)
    print(
        f"{a.objective}: RMS of log P(dz)/P(0) minus the same on {CAL_FAMILY} (seed {CAL_SEED}), "
        f"over bins below / above {a.split:g} cycles/px; mean: the frame mean's change"
    )
    print("| family | seed | dz (DOF) | RMS low | RMS high | mean |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['seed']} | {r['dz_dof']:g} | {r['rms_low']:.2f} | "
            f"{r['rms_high']:.2f} | {r['mean_change']:+.3f} |"
        )
    for family in a.families:
        sel = [r for r in rows if r["family"] == family]
        if not sel:
            continue
        print(
            f"{family}: max RMS low {max(float(r['rms_low']) for r in sel):.2f}, "
            f"high {max(float(r['rms_high']) for r in sel):.2f}, "
            f"max |mean change| {max(abs(float(r['mean_change'])) for r in sel):.3f}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
