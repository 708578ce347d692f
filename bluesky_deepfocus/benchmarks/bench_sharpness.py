"""Benchmark: does gradient sharpness order frames by |defocus| on every specimen?

``DeepFocusSearch`` uses the frames' own sharpness order as a specimen-free constraint
(:meth:`.search.DeepFocusSearch._order_cost`): of two frames of one field, the sharper one
is taken to be nearer to focus. This measures how far that holds. For each field (test
families never used in training, the calibration family, and at 10x the real
micrographs bundled with scikit-image) it renders a z-stack over +/-13 DOF and prints

* the worst *violation*: over all pairs where a frame is sharper than another by more than
  ``d0``, the largest ``|z_sharper| - |z_other|`` (in DOF; negative: never violated --
  the sharper frame was always at least that much nearer to focus);
* the asymmetry: sharpness at +0.7 DOF minus at -0.7 DOF, and the largest
  ``|s(+dz) - s(-dz)|`` over the stack.

Run ``python -m bluesky_deepfocus.benchmarks.bench_sharpness [--objectives 10x/0.3 40x/0.75]``.

``--model`` instead measures how closely the frames' sharpness follows the symmetric
curve the search fits (:meth:`.search.DeepFocusSearch._sharpness_fit_cost`): per field,
the signal's part of the gradient sharpness (camera-noise floor taken off) of 25 frames
over +/-3 DOF, fitted with ``A - B log(1 + (z / w)^2)`` about the true focus (``A``,
``B`` by least squares, ``w`` over 0.1-2 DOF), and prints the rms residual (the scatter
that ``DeepFocusSettings.sharpness_fit_sigma`` stands for) and the fitted width.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics import gradient_sharpness, gradient_sharpness_floor
from ..optics import get_objective
from ..sim import get_simulation, simulated_microscope
from ..specimens import TEST_FAMILIES
from ._real import specimen_for

__all__ = ["main", "measure_field", "model_scatter"]

THRESHOLDS = (0.02, 0.05, 0.1)


def _field(objective: str, specimen: str, seed: int, half: float, sensor: int) -> Any:
    obj = get_objective(objective)
    spec, px = specimen_for(specimen)
    core = simulated_microscope(
        objective=objective,
        specimen=spec,
        specimen_pixel_um=px,
        seed=seed,
        sensor_shape=(sensor, sensor),
        # a bundled image is its own slide; a family's slide reaches beyond the blur
        slide_size_um=None
        if px is not None
        else sensor * obj.pixel_size_um * 1.3 + 2 * half * 0.35,
    )
    sim = get_simulation(core)
    sim.auto_expose()
    sim.set_true_focus(0.0)
    return sim


def measure_field(
    objective: str, specimen: str, seed: int, *, num: int = 81, sensor: int = 512
) -> dict[str, float]:
    """Violation and asymmetry figures of one field (see the module docstring)."""
    obj = get_objective(objective)
    half = 13 * obj.dof_um
    zs = np.linspace(-half, half, num)
    sim = _field(objective, specimen, seed, half, sensor)
    g = np.array([gradient_sharpness(sim.render(float(z)).astype(np.float32)) for z in zs])
    d = g[:, None] - g[None, :]
    v = np.abs(zs)[:, None] - np.abs(zs)[None, :]
    out: dict[str, float] = {}
    for d0 in THRESHOLDS:
        m = d > d0
        out[f"violation_dof_d{d0:g}"] = float(v[m].max()) / obj.dof_um if m.any() else -np.inf
    out["asym_0.7dof"] = float(
        np.interp(0.7 * obj.dof_um, zs, g) - np.interp(-0.7 * obj.dof_um, zs, g)
    )
    out["max_asym"] = float(np.max(np.abs(g - g[::-1])))
    out["range"] = float(g.max() - g.min())
    return out


def model_scatter(
    objective: str, specimen: str, seed: int, *, num: int = 25, sensor: int = 512
) -> dict[str, float]:
    """Rms residual of the symmetric sharpness curve about one field's frames over
    +/-3 DOF, the focus known (see the module docstring); NaN with < 5 frames above
    the camera noise."""
    from ..search import FLOOR_REL
    from ..spectral import frame_spectrum

    obj = get_objective(objective)
    zs = np.linspace(-3, 3, num) * obj.dof_um
    sim = _field(objective, specimen, seed, 13 * obj.dof_um, sensor)
    y = np.full(num, np.nan)
    for i, z in enumerate(zs):
        frame = sim.render(float(z)).astype(np.float32)
        g = gradient_sharpness(frame)
        floor = gradient_sharpness_floor(float(frame.mean()), frame_spectrum(frame).noise)
        if np.expm1(g - floor) > FLOOR_REL:
            y[i] = g + np.log(-np.expm1(floor - g))
    ok = np.isfinite(y)
    if ok.sum() < 5:
        return {"rms": float("nan"), "width_dof": float("nan"), "frames": float(ok.sum())}
    best = (np.inf, np.nan)
    for w in np.geomspace(0.1, 2.0, 40):
        A = np.column_stack([np.ones(ok.sum()), -np.log1p((zs[ok] / (w * obj.dof_um)) ** 2)])
        coef, *_ = np.linalg.lstsq(A, y[ok], rcond=None)
        rms = float(np.sqrt(np.sum((y[ok] - A @ coef) ** 2) / (ok.sum() - 3)))
        if rms < best[0]:
            best = (rms, float(w))
    return {"rms": best[0], "width_dof": best[1], "frames": float(ok.sum())}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bluesky-deepfocus bench sharpness", description=__doc__.split("\n")[0]
    )
    p.add_argument("--objectives", nargs="+", default=["10x/0.3"])
    p.add_argument("--seeds", type=int, default=3, help="fields per family")
    p.add_argument("--num", type=int, default=81, help="frames per stack")
    p.add_argument(
        "--model", action="store_true", help="the symmetric curve's scatter instead (docstring)"
    )
    args = p.parse_args(argv)
    if args.model:
        return _main_model(args.objectives, args.seeds)
    print(
        "| objective | field | violation (DOF) at d0 = "
        + " / ".join(f"{t:g}" for t in THRESHOLDS)
        + " | s(+0.7 DOF) - s(-0.7 DOF) | max asym | range |"
    )
    print("|---|---|---|---|---|---|")
    worst = -np.inf
    for name in args.objectives:
        fams: list[tuple[str, int]] = [
            (f, 2000 + s) for f in TEST_FAMILIES for s in range(args.seeds)
        ]
        if name.startswith("10x"):
            from ._real import REAL_SPECIMENS

            fams += [(r, 0) for r in REAL_SPECIMENS]
        for fam, seed in fams:
            r = measure_field(name, fam, seed, num=args.num)
            worst = max(worst, r["violation_dof_d0.02"])
            viol = " / ".join(f"{r[f'violation_dof_d{t:g}']:+.2f}" for t in THRESHOLDS)
            print(
                f"| {name} | {fam} {seed} | {viol} | {r['asym_0.7dof']:+.3f} | "
                f"{r['max_asym']:.3f} | {r['range']:.2f} |",
                flush=True,
            )
    print(
        f"\nworst violation at d0 = 0.02: {worst:+.2f} DOF (negative: a sharper frame was "
        "always nearer to focus; the grid step bounds how near)"
    )
    return 0


def _main_model(objectives: Sequence[str], seeds: int) -> int:
    print("| objective | field | frames above noise | rms about the curve | width (DOF) |")
    print("|---|---|---|---|---|")
    for name in objectives:
        rms = []
        for fam in TEST_FAMILIES:
            for seed in range(2000, 2000 + seeds):
                r = model_scatter(name, fam, seed)
                rms.append(r["rms"])
                print(
                    f"| {name} | {fam} {seed} | {r['frames']:.0f} | {r['rms']:.3f} | "
                    f"{r['width_dof']:.2f} |",
                    flush=True,
                )
        v = np.array(rms)
        v = v[np.isfinite(v)]
        print(f"| {name} | median / max | | {np.median(v):.3f} / {v.max():.3f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
