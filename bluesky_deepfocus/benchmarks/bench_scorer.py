"""Focus-function benchmark: the DeepFocus paper's Table 1 and Fig. 1/3, on specimens of
families never used in training, rendered by the simulated microscope.

For every focus function (the DeepFocus CNN and the classic functions) and every
specimen, the ROI score is measured over a z range (+/-150 um at 10x/0.3). Reported:

* **SD** -- curves normalized per specimen (1 blurriest, 0 sharpest), standard deviation
  across specimens, averaged over the central 100 um (paper: 0.03 for DeepFocus);
* **H** -- the paper's conditional entropy between the normalized score and the distance
  ``|z|`` (20 score bins): ``-sum_{b,z} p(b|z) log(p(b|z) / sum_z' p(b|z'))``, plus the
  standard ``H(|Z| | B)`` in bits;
* **depth range** -- the largest ``|z|`` at which the mean normalized curve still rises by
  more than 5 % of its range out to the end of the scan (reported as a total range);
* **monotone** -- fraction of specimens whose (3-point smoothed, normalized) curve never
  falls by more than 0.03 as ``|z|`` grows out to 120 um on either side;
* **still rising** -- fraction of specimens that are monotone *and* still rise by more
  than 0.05 from 60 to 120 um on both sides (a saturated, flat curve is monotone within
  noise but carries no distance information);
* **raw offset spread** -- SD across specimens of the *raw* score at focus divided by the
  median rise of the raw score from focus to 60 um: what matching raw scores against a
  calibration made on another specimen has to overcome;
* speed on a 2048x2048 uint16 frame (and peak memory), CPU, and GPU when available.

Run ``python -m bluesky_deepfocus.benchmarks.bench_scorer --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import CLASSIC_FUNCTIONS
from ..optics import get_objective
from ..scorer import DeepFocusScorer
from ..scoring import FocusFunction
from ..specimens import TEST_FAMILIES
from ._real import specimen_for

SETUPS = {"10x/0.3": 150.0, "20x/0.45": 60.0, "40x/0.75": 20.0}
PAPER_FUNCTIONS = ("hpf", "tenengrad", "lapv", "ewc", "sml", "ws")


def measure_curves(
    objective: str,
    half_range: float,
    n_z: int,
    specimens: Sequence[tuple[str, int]],
    functions: dict[str, FocusFunction],
    sensor: int,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw ROI scores ``(n_specimens, n_z)`` per function (each field auto-exposed:
    in-focus 99.9th percentile at 30 % of full scale, at most 500 ms)."""
    from ..sim import get_simulation, simulated_microscope

    z = np.linspace(-half_range, half_range, n_z)
    obj = get_objective(objective)
    out = {name: np.full((len(specimens), n_z), np.nan) for name in functions}
    gated = {name: np.zeros((len(specimens), n_z), bool) for name in functions}
    t0 = time.time()
    for i, (family, seed) in enumerate(specimens):
        spec, spec_px = specimen_for(family)
        core = simulated_microscope(
            objective=objective,
            specimen=spec,
            specimen_pixel_um=spec_px,
            seed=seed,
            sensor_shape=(sensor, sensor),
            slide_size_um=sensor * obj.pixel_size_um * 1.2
            + 2.6 * half_range * math.tan(obj.half_angle),
        )
        sim = get_simulation(core)
        sim.auto_expose()  # as a microscopist would, per specimen
        for j, zz in enumerate(z):
            frame = np.asarray(sim.render(float(zz)))
            for name, fn in functions.items():
                res = fn.score(frame)
                # the gated ROI score is what autofocus uses; curves need a value at every
                # plane, so fall back to the ungated median where no patch is confident
                out[name][i, j] = res.score if np.isfinite(res.score) else res.ungated
                gated[name][i, j] = not np.isfinite(res.score)
        if progress:
            el = time.time() - t0
            print(
                f"  {objective}: specimen {i + 1}/{len(specimens)} ({family}) {el:.0f}s",
                flush=True,
            )
    for name in functions:
        out[f"{name}__gated"] = gated[name].astype(float)
    return z, out


def normalize(raw: np.ndarray, higher_is_sharper: bool) -> np.ndarray:
    """Per specimen: 1 blurriest, 0 sharpest (NaN-safe)."""
    b = -raw if higher_is_sharper else raw
    lo = np.nanmin(b, axis=1, keepdims=True)
    hi = np.nanmax(b, axis=1, keepdims=True)
    return (b - lo) / np.where(hi > lo, hi - lo, np.nan)


def paper_entropy(norm: np.ndarray, z: np.ndarray, bins: int = 20) -> tuple[float, float]:
    """The paper's H and the standard H(|Z| | B) in bits, over |z|."""
    az = np.round(np.abs(z), 6)
    levels = np.unique(az)
    edges = np.linspace(0, 1, bins + 1)
    counts = np.zeros((bins, len(levels)))
    for j, lvl in enumerate(levels):
        v = norm[:, az == lvl].ravel()
        v = v[np.isfinite(v)]
        h, _ = np.histogram(np.clip(v, 0, 1), edges)
        counts[:, j] = h
    p_b_given_z = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
    denom = p_b_given_z.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        paper = -np.nansum(
            np.where(p_b_given_z > 0, p_b_given_z * np.log(p_b_given_z / denom), 0.0)
        )
        joint = counts / counts.sum()
        p_b = joint.sum(axis=1, keepdims=True)
        std = -np.nansum(np.where(joint > 0, joint * np.log2(joint / p_b), 0.0))
    return float(paper), float(std)


def depth_range(norm: np.ndarray, z: np.ndarray) -> float:
    """Total range (um) over which the mean normalized curve still rises by > 5 %."""
    az = np.abs(z)
    levels = np.unique(np.round(az, 6))
    mean = np.array([np.nanmean(norm[:, np.isclose(az, lv)]) for lv in levels])
    end = mean[-1]
    still = levels[(end - mean) > 0.05]
    return float(2 * still.max()) if len(still) else 0.0


def monotone_fraction(norm: np.ndarray, z: np.ndarray, out_to: float, tol: float = 0.03) -> float:
    ok = []
    for row in norm:
        good = True
        for side in (z >= 0, z <= 0):
            zz = np.abs(z[side])
            order = np.argsort(zz)
            v = row[side][order]
            zz = zz[order]
            keep = zz <= out_to + 1e-9
            v = v[keep]
            if np.any(~np.isfinite(v)):
                good = False
                break
            sm = np.convolve(np.r_[v[0], v, v[-1]], np.ones(3) / 3, mode="valid")
            run_max = np.maximum.accumulate(sm)
            if np.any(run_max - sm > tol):
                good = False
        ok.append(good)
    return float(np.mean(ok))


def rising_fraction(
    norm: np.ndarray, z: np.ndarray, out_to: float, tol: float = 0.03, rise: float = 0.05
) -> float:
    """Fraction of specimens whose curve is monotone out to ``out_to`` (as
    :func:`monotone_fraction`) *and still informative there*: on both sides the smoothed
    curve at ``out_to`` exceeds its value at ``out_to / 2`` by more than ``rise`` (a
    function that saturates, like the classic ones far from focus, is flat there)."""
    ok = []
    for row in norm:
        good = monotone_fraction(row[None, :], z, out_to, tol) == 1.0
        for sign in (1.0, -1.0):
            if not good:
                break
            zz = sign * z
            side = zz >= 0
            order = np.argsort(zz[side])
            v, a = row[side][order], zz[side][order]
            sm = np.convolve(np.r_[v[0], v, v[-1]], np.ones(3) / 3, mode="valid")
            far = sm[int(np.argmin(np.abs(a - out_to)))]
            mid = sm[int(np.argmin(np.abs(a - out_to / 2)))]
            good = bool(far - mid > rise)
        ok.append(good)
    return float(np.mean(ok))


def raw_offset_spread(
    raw: np.ndarray, z: np.ndarray, higher_is_sharper: bool, at: float = 60.0
) -> float:
    b = -raw if higher_is_sharper else raw
    j0 = int(np.argmin(np.abs(z)))
    jp, jm = int(np.argmin(np.abs(z - at))), int(np.argmin(np.abs(z + at)))
    focus = b[:, j0]
    rise = 0.5 * (b[:, jp] + b[:, jm]) - focus
    med = np.nanmedian(rise)
    return float(np.nanstd(focus) / med) if med > 0 else float("inf")


def speed(device: str = "cpu", reps: int = 5) -> dict[str, float]:
    """Seconds to score a 2048x2048 uint16 frame (DeepFocus vs Tenengrad), in a fresh
    process so its peak memory is the scorer's."""
    code = f"""
import json, resource, time, numpy as np, torch
from bluesky_deepfocus.scorer import DeepFocusScorer
from bluesky_deepfocus.metrics import Tenengrad
from bluesky_deepfocus.optics import get_objective, objective_psf, blur
from bluesky_deepfocus.specimens import make_specimen
obj = get_objective('10x/0.3')
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spec = make_specimen('tissue', 2048 + 96, obj.pixel_size_um, seed=1)
out = {{}}
for z in (0.0, 60.0):
    frame = np.clip(blur(spec, objective_psf(obj, z, size=97)) * 3000 + 100, 0, 65535).astype(np.uint16)
    sc = DeepFocusScorer(device={device!r}); ten = Tenengrad()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sc.score(frame)
    if {device!r} == 'cuda': torch.cuda.synchronize()
    ts = []
    for _ in range({reps}):
        t = time.perf_counter(); sc.score(frame)
        if {device!r} == 'cuda': torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    tt = []
    for _ in range({reps}):
        t = time.perf_counter(); ten.score(frame); tt.append(time.perf_counter() - t)
    out[f'deepfocus_s_z{{int(z)}}'] = float(np.median(ts))
    out[f'tenengrad_s_z{{int(z)}}'] = float(np.median(tt))
if {device!r} != 'cpu':  # the network alone, 8 frames' level-0 patches in one batch
    from bluesky_deepfocus.model import prepare_patches
    x = torch.from_numpy(frame[:2048, :2048].astype(np.float32)).reshape(16, 128, 16, 128)
    x = x.permute(0, 2, 1, 3).reshape(256, 128, 128).repeat(8, 1, 1).to({device!r})
    with torch.inference_mode():
        for _ in range(3):
            sc.model(prepare_patches(x))
        torch.cuda.synchronize()
        tn = []
        for _ in range({reps}):
            t = time.perf_counter(); sc.model(prepare_patches(x)); torch.cuda.synchronize()
            tn.append(time.perf_counter() - t)
    out['network_s_per_frame_batch8'] = float(np.median(tn)) / 8
out['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out['peak_rss_above_start_mb'] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
out['threads'] = torch.get_num_threads()
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    functions: dict[str, FocusFunction] = {"deepfocus": DeepFocusScorer()}
    for name in args.functions:
        functions[name] = CLASSIC_FUNCTIONS[name]()
    report: dict[str, Any] = {"model": functions["deepfocus"].describe(), "setups": {}}
    groups: list[tuple[str, str, list[tuple[str, int]]]] = []
    for objective in args.objectives:
        n_spec = args.specimens if objective == "10x/0.3" else max(7, args.specimens // 3)
        per_fam = math.ceil(n_spec / len(TEST_FAMILIES))
        groups.append(
            (
                objective,
                objective,
                [(f, 50_000 + s) for f in TEST_FAMILIES for s in range(per_fam)],
            )
        )
    if args.real and "10x/0.3" in args.objectives:
        from ._real import REAL_SPECIMENS

        groups.append(("10x/0.3 real images", "10x/0.3", [(name, 0) for name in REAL_SPECIMENS]))
    for label, objective, specimens in groups:
        half = SETUPS[objective]
        z, raw = measure_curves(objective, half, args.nz, specimens, functions, args.sensor)
        rows = {}
        norms = {}
        for name, fn in functions.items():
            norm = normalize(raw[name], fn.higher_is_sharper)
            norms[name] = norm
            central = np.abs(z) <= 50.0 * (half / 150.0)
            sd = float(np.nanmean(np.nanstd(norm[:, central], axis=0)))
            h_paper, h_bits = paper_entropy(norm, z)
            rows[name] = {
                "sd_central": sd,
                "entropy_paper": h_paper,
                "entropy_bits": h_bits,
                "depth_range_um": depth_range(norm, z),
                "monotone_fraction": monotone_fraction(norm, z, out_to=120.0 * half / 150.0),
                "rising_fraction": rising_fraction(norm, z, out_to=120.0 * half / 150.0),
                "raw_offset_spread": raw_offset_spread(
                    raw[name], z, fn.higher_is_sharper, at=60.0 * half / 150.0
                ),
                "no_information_fraction": float(np.mean(raw[f"{name}__gated"])),
            }
        families = sorted({f for f, _ in specimens})
        report["setups"][label] = {
            "objective": objective,
            "n_specimens": len(specimens),
            "families": families,
            "z_points": len(z),
            "half_range_um": half,
            "functions": rows,
        }
        tag = label.replace("/", "_").replace(" ", "_")
        np.savez_compressed(out_dir / f"curves_{tag}.npz", z=z, **raw)  # type: ignore[arg-type]
        _plot(out_dir / f"curves_{tag}.png", z, norms, label, specimens)
    if not args.no_speed:
        report["speed_cpu"] = speed("cpu")
        try:
            import torch

            if torch.cuda.is_available():
                report["speed_gpu"] = speed("cuda")
        except Exception as exc:  # pragma: no cover
            report["speed_gpu_error"] = str(exc)
    (out_dir / "scorer_benchmark.json").write_text(json.dumps(report, indent=2))
    md = _markdown(report)
    (out_dir / "scorer_benchmark.md").write_text(md)
    print(md)
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Focus functions on unseen specimen families (model {report['model'].get('model_id')})",
        "",
    ]
    for objective, s in report["setups"].items():
        lines += [
            f"## {objective}: {s['n_specimens']} specimens ({', '.join(s['families'])}), "
            f"z = +/-{s['half_range_um']:g} um, {s['z_points']} planes",
            "",
            "| function | SD (central) | H (paper) | H(|Z| given B) bits | depth range um | monotone to 120 um | still rising 60-120 um | raw offset spread | no-information frames |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in s["functions"].items():
            lines.append(
                f"| {name} | {r['sd_central']:.3f} | {r['entropy_paper']:.2f} | {r['entropy_bits']:.2f} | "
                f"{r['depth_range_um']:.0f} | {r['monotone_fraction']:.2f} | {r['rising_fraction']:.2f} | {r['raw_offset_spread']:.3f} | "
                f"{r['no_information_fraction']:.2f} |"
            )
        lines.append("")
    for key in ("speed_cpu", "speed_gpu"):
        if key in report:
            sp = report[key]
            lines.append(
                f"- {key}: 2048x2048 uint16 frame, DeepFocus {sp['deepfocus_s_z0']:.3f} s (in focus) / "
                f"{sp['deepfocus_s_z60']:.3f} s (60 um), Tenengrad {sp['tenengrad_s_z0']:.3f} s; "
                f"peak RSS {sp['peak_rss_mb']:.0f} MB ({sp['peak_rss_above_start_mb']:.0f} MB above start), "
                f"{sp['threads']} threads"
            )
    return "\n".join(lines) + "\n"


def _plot(
    path: Path,
    z: np.ndarray,
    norms: dict[str, np.ndarray],
    objective: str,
    specimens: Sequence[tuple[str, int]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(norms)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        n = norms[name]
        for row in n:
            ax.plot(z, row, color="0.7", lw=0.4)
        ax.plot(z, np.nanmean(n, axis=0), color="C0", lw=2, label="mean")
        ax.fill_between(
            z,
            np.nanmean(n, 0) - np.nanstd(n, 0),
            np.nanmean(n, 0) + np.nanstd(n, 0),
            color="C0",
            alpha=0.25,
        )
        ax.set_title(name)
        ax.set_xlabel("z (um)")
    np.atleast_1d(axes)[0].set_ylabel("normalized blur (1 blurriest)")
    fig.suptitle(f"{objective}: {len(specimens)} unseen specimens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="bluesky-deepfocus bench scorer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--objectives", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument(
        "--specimens", type=int, default=105, help="specimens at 10x (a third at other objectives)"
    )
    p.add_argument("--nz", type=int, default=101, help="planes per curve")
    p.add_argument("--sensor", type=int, default=512)
    p.add_argument(
        "--functions", nargs="+", default=list(CLASSIC_FUNCTIONS), choices=list(CLASSIC_FUNCTIONS)
    )
    p.add_argument("--out", default="bench_results/scorer")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument(
        "--real", action="store_true", help="also real micrographs (scikit-image) at 10x"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("MPLBACKEND", "Agg")
    raise SystemExit(main())
