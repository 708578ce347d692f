"""Train the DeepFocus network on synthetic physics, reproducibly, on CPU or GPU.

Data recipe (:class:`DataRecipe`), generated on the fly by worker processes from
:mod:`.optics` and :mod:`.specimens`:

* a random instrument per scene: NA log-uniform in [0.1, 1.4], immersion n in
  {1.0, 1.33, 1.515} compatible with the NA, emission wavelength 0.40-0.70 um, small
  random Zernike aberrations (Noll 5-11, up to 0.12 waves RMS);
* a pixel size ``q`` times the Nyquist pixel ``lambda / (4 NA)``, q log-uniform in
  [0.5, 12]: from over-sampled cameras to the coarse levels of the scorer's pyramid
  (the scorer block-averages frames by 2, 4, 8 to see large blurs in a 128 px patch, so
  the network is trained on exactly those samplings; beyond q = 3 only blurs of at least
  2.5 px are drawn, since the scorer uses coarse levels only for large blurs);
* defocus within +/-16 DOF, drawn so that the blur radius in pixels is log-uniform up to
  45 px (plus 15 % near focus);
* a specimen from :data:`.specimens.TRAIN_FAMILIES` only (procedural families and
  natural photographs; never the test families nor any microscopy image), sharp at the
  pixel level so that all blur in the data is optical, 20 % of them inverted
  (transmitted light), rendered without wrap-around, cut into 128x128 patches;
* camera: 10-3000 photo-electrons per unit intensity, read noise 0.5-3 e-, gain,
  offset, 12 or 16 bit, 8 % of scenes pushed into saturation, 5 % blank patches;
* label ``ln r`` with ``r = sqrt(2 r50^2 + 0.25)`` px from the actual PSF's 50 %
  encircled-energy radius (aberrations included; the geometric blur radius far from
  focus; the pixel's extent near focus), and an *informative* flag
  (signal contrast above 0.3 x the noise and less than 30 % saturated pixels).

Validation uses held-back specimen families (:data:`VALIDATION_FAMILIES`) and held-back
seeds of the training families. The command writes checkpoints (resumable), the final
weights (exponential moving average of the parameters) and a model card with the recipe,
steps, wall time, hardware, validation figures and the exact command.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .model import PATCH, DeepFocusNet, ModelConfig, prepare_patches, save_model
from .optics import blur, encircled_energy_radius, widefield_psf
from .specimens import TRAIN_FAMILIES, make_specimen

__all__ = [
    "VALIDATION_FAMILIES",
    "DataRecipe",
    "main",
    "sample_scene",
    "train",
]

VALIDATION_FAMILIES: tuple[str, ...] = ("nuclei", "neurons")
INFO_SNR = 0.3


@dataclass(frozen=True)
class DataRecipe:
    """The distribution the network is trained on (recorded in the model card)."""

    families: tuple[str, ...] = TRAIN_FAMILIES
    na_range: tuple[float, float] = (0.1, 1.4)
    wavelength_range: tuple[float, float] = (0.40, 0.70)
    q_range: tuple[float, float] = (0.5, 12.0)
    max_defocus_dof: float = 16.0
    r_max_px: float = 45.0
    coarse_q: float = 3.0  # beyond this sampling (the scorer's coarse pyramid levels) ...
    coarse_r_min_px: float = 2.5  # ... only blurs of at least this many pixels are drawn
    in_focus_fraction: float = 0.15
    aberration_rms_max: float = 0.12
    photons_range: tuple[float, float] = (10.0, 3000.0)
    read_noise_range: tuple[float, float] = (0.5, 3.0)
    saturate_fraction: float = 0.08
    blank_fraction: float = 0.05
    invert_fraction: float = 0.2
    defocus_per_scene: int = 3
    crops_per_side: int = 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------
# scene generation (numpy; runs in worker processes)
# --------------------------------------------------------------------------------------
def _sample_instrument(rng: np.random.Generator, r: DataRecipe) -> dict[str, Any]:
    na = float(np.exp(rng.uniform(*np.log(r.na_range))))
    if na < 0.95:
        n = 1.0 if rng.random() < 0.7 else (1.33 if rng.random() < 0.5 else 1.515)
    elif na < 1.25:
        n = 1.33 if rng.random() < 0.4 else 1.515
    else:
        n = 1.515
    wl = float(rng.uniform(*r.wavelength_range))
    q = float(np.exp(rng.uniform(*np.log(r.q_range))))
    px = q * wl / (4 * na)
    zern: dict[int, float] = {}
    rms = float(rng.uniform(0, r.aberration_rms_max))
    if rms > 0:
        c = rng.normal(size=7)
        c *= rms / np.linalg.norm(c)
        zern = {j: float(v) for j, v in zip(range(5, 12), c, strict=True)}
    return {"na": na, "n": n, "wavelength_um": wl, "q": q, "pixel_um": px, "zernike": zern}


def _radius_px(inst: dict[str, Any], z: float) -> float:
    tan_t = math.tan(math.asin(inst["na"] / inst["n"]))
    r_geo = abs(z) * tan_t / inst["pixel_um"]
    r_airy = 0.5 * 0.61 * inst["wavelength_um"] / inst["na"] / inst["pixel_um"]
    return math.sqrt(r_geo * r_geo + r_airy * r_airy + 0.25)


def _sample_defocus(rng: np.random.Generator, inst: dict[str, Any], r: DataRecipe) -> float:
    n, na, wl, px = inst["n"], inst["na"], inst["wavelength_um"], inst["pixel_um"]
    dof = wl / (n - math.sqrt(n * n - na * na))
    tan_t = math.tan(math.asin(na / n))
    r0 = _radius_px(inst, 0.0)
    r_hi = min(r.r_max_px, _radius_px(inst, r.max_defocus_dof * dof))
    r_lo = r0 * 1.02
    if inst["q"] > r.coarse_q:
        # the scorer only consults coarse levels for large blurs: no sub-pixel focus here
        r_lo = max(r_lo, r.coarse_r_min_px)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if r_lo >= r_hi:
        r_lo = r_hi / 1.05
    if inst["q"] <= r.coarse_q and (rng.random() < r.in_focus_fraction or r_hi <= r0 * 1.05):
        return float(rng.uniform(-0.5, 0.5) * min(dof, r.max_defocus_dof * dof))
    rad = math.exp(rng.uniform(math.log(r_lo), math.log(r_hi)))
    r_geo = math.sqrt(max(rad * rad - r0 * r0, 0.0))
    return sign * r_geo * px / tan_t


def psf_log_radius(fine: np.ndarray, oversample: int) -> float:
    """The label: ``ln r`` with ``r = sqrt(2 r50^2 + 0.25)`` pixels.

    ``r50`` is the 50 % encircled-energy radius of the actual (aberrated, oversampled) PSF
    in pixels; ``sqrt(2) r50`` equals the radius of a uniform defocus disc, so far from
    focus the label is the geometric blur radius; the 0.5 px term is the pixel's own
    extent, so sub-pixel PSFs keep a finite, continuous label.
    """
    r50 = encircled_energy_radius(fine, 0.5) / oversample
    return math.log(math.sqrt(2.0 * r50 * r50 + 0.25))


def sample_scene(
    rng: np.random.Generator,
    recipe: DataRecipe | None = None,
    families: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random scene: ``(patches uint16 (k,128,128), ln r (k,), informative (k,))``."""
    r = recipe or DataRecipe()
    fams = tuple(families or r.families)
    inst = _sample_instrument(rng, r)
    zs = [_sample_defocus(rng, inst, r) for _ in range(r.defocus_per_scene)]
    made = [
        widefield_psf(
            z,
            na=inst["na"],
            wavelength_um=inst["wavelength_um"],
            pixel_size_um=inst["pixel_um"],
            immersion_index=inst["n"],
            zernike_waves=inst["zernike"],
            return_fine=True,
        )
        for z in zs
    ]
    psfs = [m[0] for m in made]
    labels = [psf_log_radius(m[1], m[2]) for m in made]
    side = PATCH * r.crops_per_side
    big = max(p.shape[0] for p in psfs)
    fam = fams[int(rng.integers(len(fams)))]
    spec = make_specimen(fam, side + big - 1, inst["pixel_um"], rng).astype(np.float64)
    if rng.random() < r.invert_fraction:  # transmitted light: dark objects, bright field
        spec = float(spec.max()) * rng.uniform(1.02, 1.5) - spec
    # photometry for the whole scene (one camera)
    photons = float(np.exp(rng.uniform(*np.log(r.photons_range))))
    read = float(rng.uniform(*r.read_noise_range))
    gain = float(rng.uniform(0.3, 2.0))
    offset = float(rng.uniform(50, 150))
    full = 4095.0 if rng.random() < 0.3 else 65535.0
    saturate = rng.random() < r.saturate_fraction
    if saturate:
        top = float(np.percentile(spec, 99.0)) or 1.0
        photons = rng.uniform(1.2, 4.0) * (full - offset) * gain / top
    out_x, out_t, out_i = [], [], []
    for psf, t in zip(psfs, labels, strict=True):
        pad = (big - psf.shape[0]) // 2
        obj = spec[pad : spec.shape[0] - pad, pad : spec.shape[1] - pad] if pad else spec
        img = blur(obj, psf)  # (side, side)
        for cy in range(r.crops_per_side):
            for cx in range(r.crops_per_side):
                sig = img[cy * PATCH : (cy + 1) * PATCH, cx * PATCH : (cx + 1) * PATCH]
                blank = rng.random() < r.blank_fraction
                if blank:
                    sig = np.full_like(sig, float(sig.mean()))
                e = sig * photons
                noisy = rng.poisson(np.maximum(e, 0)).astype(np.float64)
                noisy += rng.normal(0, read, size=e.shape)
                adu = np.clip(np.rint(noisy / gain + offset), 0, full)
                sat_frac = float(np.mean(adu >= full))
                snr = float(e.std()) / math.sqrt(float(e.mean()) + read * read + 1e-9)
                info = (not blank) and snr > INFO_SNR and sat_frac < 0.3
                out_x.append(adu.astype(np.uint16))
                out_t.append(t)
                out_i.append(info)
    return (
        np.stack(out_x),
        np.asarray(out_t, dtype=np.float32),
        np.asarray(out_i, dtype=bool),
    )


def _worker(seed: int, recipe: DataRecipe, queue: Any, chunk: int) -> None:  # pragma: no cover
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    parent = os.getppid()
    while os.getppid() == parent:  # stop when the trainer is gone (killed, not joined)
        xs, ts, infos = [], [], []
        n = 0
        while n < chunk:
            x, t, i = sample_scene(rng, recipe)
            xs.append(x)
            ts.append(t)
            infos.append(i)
            n += len(t)
        item = (np.concatenate(xs), np.concatenate(ts), np.concatenate(infos))
        while os.getppid() == parent:
            try:
                queue.put(item, timeout=5)
                break
            except Exception:
                continue


def make_dataset(
    n_patches: int,
    seed: int,
    recipe: DataRecipe | None = None,
    families: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed set of patches (validation, tests)."""
    rng = np.random.default_rng(seed)
    xs, ts, infos = [], [], []
    n = 0
    while n < n_patches:
        x, t, i = sample_scene(rng, recipe, families)
        xs.append(x)
        ts.append(t)
        infos.append(i)
        n += len(t)
    return (
        np.concatenate(xs)[:n_patches],
        np.concatenate(ts)[:n_patches],
        np.concatenate(infos)[:n_patches],
    )


class _Stream:
    """Batches from worker processes, each chunk replayed ``reuse`` times (shuffled)."""

    def __init__(
        self, workers: int, seed: int, recipe: DataRecipe, batch: int, reuse: int
    ) -> None:
        self.batch, self.reuse = batch, reuse
        self.rng = np.random.default_rng(seed + 7919)
        ctx = mp.get_context("spawn")
        self.queue: Any = ctx.Queue(maxsize=6)
        self.procs = [
            ctx.Process(
                target=_worker, args=(seed * 1000 + k, recipe, self.queue, 4 * batch), daemon=True
            )
            for k in range(workers)
        ]
        for p in self.procs:
            p.start()
        self.pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.uses: list[int] = []

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        while True:
            try:
                # a bounded replay pool: the workers block on the full queue instead of
                # producing data nobody uses (and memory stays flat)
                while len(self.pool) < 3 or (len(self.pool) < 8 and not self.queue.empty()):
                    self.pool.append(self.queue.get(timeout=600))
                    self.uses.append(0)
            except Exception as exc:  # pragma: no cover
                raise RuntimeError("training data workers stopped producing data") from exc
            k = int(self.rng.integers(len(self.pool)))
            x, t, i = self.pool[k]
            sel = self.rng.choice(len(t), size=min(self.batch, len(t)), replace=False)
            self.uses[k] += 1
            if self.uses[k] >= self.reuse * max(1, len(t) // self.batch):
                self.pool.pop(k)
                self.uses.pop(k)
            yield x[sel], t[sel], i[sel]

    def close(self) -> None:
        for p in self.procs:
            p.terminate()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(-2, -1))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(-1,))
    return x


def loss_fn(
    out: torch.Tensor, t: torch.Tensor, info: torch.Tensor, beta: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """beta-NLL on informative patches (Seitzer et al., ICLR 2022) + BCE on the flag."""
    mu, log_sigma, logit = out[:, 0], out[:, 1].clamp(-5, 3), out[:, 2]
    var = torch.exp(2 * log_sigma)
    nll = 0.5 * (mu - t) ** 2 / var + log_sigma
    w = info.float()
    reg = (nll * var.detach() ** beta * w).sum() / w.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logit, info.float())
    mae = ((mu - t).abs() * w).sum() / w.sum().clamp(min=1)
    parts = {"nll": float(reg.detach()), "bce": float(bce.detach()), "mae": float(mae.detach())}
    return reg + bce, parts


@torch.no_grad()
def evaluate(
    model: DeepFocusNet, data: tuple[np.ndarray, np.ndarray, np.ndarray], device: torch.device
) -> dict[str, float]:
    """MAE of ln r on informative patches, fraction within 0.1/0.25, flag accuracy."""
    model.eval()
    x, t, info = data
    outs = []
    for k in range(0, len(t), 256):
        xb = prepare_patches(torch.from_numpy(x[k : k + 256].astype(np.float32))).to(device)
        outs.append(model(xb).cpu())
    out = torch.cat(outs)
    tt = torch.from_numpy(t)
    ii = torch.from_numpy(info)
    err = (out[:, 0] - tt)[ii].abs()
    pred_info = out[:, 2] > 0
    return {
        "mae_ln_r": float(err.mean()) if len(err) else float("nan"),
        "median_ae_ln_r": float(err.median()) if len(err) else float("nan"),
        "within_0.1": float((err < 0.1).float().mean()) if len(err) else float("nan"),
        "within_0.25": float((err < 0.25).float().mean()) if len(err) else float("nan"),
        "flag_accuracy": float((pred_info == ii).float().mean()),
        "n": float(len(t)),
        "n_informative": float(ii.sum()),
    }


@dataclass
class TrainConfig:
    out: str
    steps: int = 6000
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    seed: int = 0
    workers: int = 1
    reuse: int = 3
    threads: int = 0
    device: str = "auto"
    val_patches: int = 768
    eval_every: int = 500
    ckpt_every: int = 200
    width: int = 24
    minutes: float = 0.0  # wall-time budget (0: none); the LR schedule follows it too
    export: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then a cosine decay over the steps or the time budget, whichever
    runs out first (so a time-boxed run still ends at a low learning rate)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.minutes > 0:
        p = max(p, elapsed_s / (60.0 * cfg.minutes))
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, *, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Train (or resume) into ``cfg.out``; returns the model card written with the weights."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    recipe = DataRecipe()
    model = DeepFocusNet(ModelConfig(width=cfg.width)).to(device)
    ema = DeepFocusNet(ModelConfig(width=cfg.width)).to(device)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path = out / "checkpoint.pt"
    step, wall = 0, 0.0
    history: list[dict[str, Any]] = []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, wall, history = ck["step"], ck["wall"], ck.get("history", [])
        print(f"resumed from {ckpt_path} at step {step} ({wall / 60:.1f} min trained)")
    val_sets = {
        "heldout_families": make_dataset(
            cfg.val_patches, 10_001 + cfg.seed, recipe, VALIDATION_FAMILIES
        ),
        "train_families_new_seeds": make_dataset(cfg.val_patches // 2, 20_002 + cfg.seed, recipe),
    }
    stream = _Stream(cfg.workers, cfg.seed + step, recipe, cfg.batch, cfg.reuse)
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t_start = time.time()
    last = t_start
    running: dict[str, float] = {}

    def save_checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "wall": wall + time.time() - t_start,
            "history": history,
        }
        _atomic_save(state, ckpt_path)

    try:
        it = iter(stream)
        budget = 60.0 * cfg.minutes
        while step < cfg.steps:
            elapsed = wall + time.time() - t_start
            if budget > 0 and elapsed >= budget:
                print(f"time budget of {cfg.minutes} min reached at step {step}", flush=True)
                break
            model.train()
            x, t, info = next(it)
            # standardize and augment where the network runs (the GPU when there is one)
            xb = _augment(prepare_patches(torch.from_numpy(x.astype(np.float32)).to(device)), gen)
            tb = torch.from_numpy(t).to(device)
            ib = torch.from_numpy(info).to(device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg, elapsed)
            out_ = model(xb)
            loss, parts = loss_fn(out_, tb, ib)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            with torch.no_grad():
                decay = min(0.998, (1 + step) / (10 + step))
                for pe, pm in zip(
                    ema.state_dict().values(), model.state_dict().values(), strict=True
                ):
                    if pe.dtype.is_floating_point:
                        pe.mul_(decay).add_(pm, alpha=1 - decay)
                    else:
                        pe.copy_(pm)
            step += 1
            for k, v in parts.items():
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
            now = time.time()
            if progress and (now - last > 30 or step == cfg.steps):
                rate = step / max(1e-9, wall + now - t_start)
                print(
                    f"step {step}/{cfg.steps} loss nll={running['nll']:.3f} bce={running['bce']:.3f} "
                    f"mae={running['mae']:.3f} lr={_lr_at(step, cfg, now - t_start + wall):.2e} "
                    f"{rate * cfg.batch:.0f} patches/s",
                    flush=True,
                )
                last = now
            if step % cfg.eval_every == 0 or step == cfg.steps:
                res = {k: evaluate(ema, v, device) for k, v in val_sets.items()}
                history.append(
                    {"step": step, **{f"{k}/{m}": v for k, r in res.items() for m, v in r.items()}}
                )
                print(
                    f"  val@{step}: "
                    + json.dumps(
                        {k: {m: round(v, 3) for m, v in r.items()} for k, r in res.items()}
                    ),
                    flush=True,
                )
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint()
        save_checkpoint()  # the last step, also when the time budget ended the run
    finally:
        stream.close()
    wall += time.time() - t_start
    final = {k: evaluate(ema, v, device) for k, v in val_sets.items()}
    card = {
        "model_id": f"deepfocus-w{cfg.width}-s{step}-seed{cfg.seed}",
        "target": "ln sqrt(2 r50^2 + 0.25), r50 = 50% encircled-energy radius of the PSF in pixels",
        "patch": PATCH,
        "data_recipe": recipe.as_dict(),
        "validation_families": list(VALIDATION_FAMILIES),
        "train": {k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
        "steps": step,
        "samples_seen": step * cfg.batch,
        "wall_time_s": round(wall, 1),
        "hardware": {
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
        "validation": final,
        "history": history[-20:],
        "command": command,
    }
    dest = Path(cfg.export) if cfg.export else out / "deepfocus.pt"
    written = save_model(ema.cpu(), dest, card)
    _write_card_md(dest.with_suffix(".md"), written)
    print(f"wrote {dest} (sha256 {written['sha256'][:16]}...)")
    return written


def export_checkpoint(
    folder: str | os.PathLike[str], dest: str | os.PathLike[str], *, width: int = 24
) -> dict[str, Any]:
    """Write the EMA weights of a (possibly running) training folder's checkpoint."""
    ck = torch.load(Path(folder) / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = DeepFocusNet(ModelConfig(width=width))
    model.load_state_dict(ck["ema"])
    card = {
        "model_id": f"deepfocus-w{width}-step{ck['step']}-partial",
        "steps": ck["step"],
        "wall_time_s": round(ck["wall"], 1),
        "history": ck.get("history", [])[-5:],
        "note": "exported from a training checkpoint",
    }
    return save_model(model, dest, card)


def _write_card_md(path: Path, card: dict[str, Any]) -> None:
    v = card.get("validation", {})
    lines = [
        "# DeepFocus model card",
        "",
        f"- model id: `{card.get('model_id')}`",
        f"- weights: `{card.get('weights_file')}`, SHA-256 `{card.get('sha256')}`",
        f"- parameters: {card.get('parameters')}",
        f"- target: {card.get('target')}",
        f"- trained: {card.get('steps')} steps, {card.get('samples_seen')} patches, "
        f"{card.get('wall_time_s')} s wall time on {card.get('hardware')}",
        f"- command: `{card.get('command')}`",
        "",
        "## Data recipe",
        "",
        "```json",
        json.dumps(card.get("data_recipe"), indent=2),
        "```",
        "",
        "## Validation (exponential-moving-average weights)",
        "",
        "| set | MAE ln r | median | within 0.1 | within 0.25 | flag accuracy | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in v.items():
        lines.append(
            f"| {k} | {r['mae_ln_r']:.3f} | {r['median_ae_ln_r']:.3f} | {r['within_0.1']:.2f} | "
            f"{r['within_0.25']:.2f} | {r['flag_accuracy']:.2f} | {int(r['n'])} |"
        )
    lines += [
        "",
        "Held-back families (validation): " + ", ".join(card.get("validation_families", [])),
        "",
        "Intended use: blur score for autofocus after a per-objective calibration stack. "
        "Not trained on: "
        + ", ".join(f for f in ("sparse_nuclei", "beads", "tissue", "smooth", "text"))
        + " (kept for benchmarks).",
    ]
    path.write_text("\n".join(lines) + "\n")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="bluesky-deepfocus train", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--out", default="runs/train", help="checkpoint folder (resumes if it holds one)"
    )
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="data generator processes")
    p.add_argument("--reuse", type=int, default=3, help="times each generated chunk is replayed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--val-patches", type=int, default=768)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--export", default=None, help="where to write the final weights (.pt)")
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="wall-time budget: stop after this many minutes of training, the learning rate "
        "decaying over it (0: train --steps)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(
        out=args.out,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        workers=args.workers,
        reuse=args.reuse,
        threads=args.threads,
        device=args.device,
        width=args.width,
        val_patches=args.val_patches,
        eval_every=args.eval_every,
        export=args.export,
        minutes=args.minutes,
    )
    cmd = "bluesky-deepfocus train " + " ".join(sys.argv[1:] if argv is None else list(argv))
    train(cfg, command=cmd.strip())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
