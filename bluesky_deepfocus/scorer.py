"""DeepFocusScorer: the CNN blur score of a frame, as a map, a robust ROI score and a
Bluesky callback.

The score of a patch is ``ln r``, the natural log of the blur radius in camera pixels
(see :mod:`.model`). A 128 px patch cannot measure a blur much wider than itself, so the
frame is also seen through a pyramid of 2x2 block averages (exactly a camera with
2, 4, 8 times larger pixels, which the network was trained on): a level measures
``ln r_s`` and contributes ``ln r_s + ln s``. Each fine patch fuses the levels that
resolve its blur (a level's estimate counts only between 1.5 and 30 of its own pixels,
with soft edges, and not where a coarser level resolves a blur beyond 30 of its pixels:
a fine level can under-read a blur far larger than its patch), weighted by the
network's confidence and predicted spread. Coarser levels are only computed where a
patch sees a large blur (for every patch when most of the frame does), so a frame near
focus costs one network pass per patch.

References
----------
Shajkofci, A. & Liebling, M. "DeepFocus: a few-shot microscope slide auto-focus using a
sample invariant CNN-based sharpness function", ICIP 2020, doi:10.1109/ICIP40778.2020.9190969
(arXiv:2001.00667); Shajkofci & Liebling, "Spatially-variant CNN-based point spread
function estimation for blind deconvolution and depth estimation in optical
microscopy", IEEE TIP 2020 (arXiv:1904.07282).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from .model import PATCH, DeepFocusNet, for_inference, load_model, prepare_patches
from .scoring import ROI, FocusFunction, ScoreResult, check_image, crop_roi, patch_grid, to_patches

__all__ = ["DeepFocusScorer"]

_LO = math.log(1.5)  # below this many pixels a coarse level only gives an upper bound
_HI = math.log(30.0)  # above this a 128 px patch no longer holds the blur
_SOFT = math.log(12.0)  # above this, prefer a coarser level when one measured the patch
_NEXT = math.log(6.0)  # compute the next coarser level where the blur exceeds this
_EDGE = 0.15


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-x))


def _block_mean(img: NDArray[np.float32], s: int) -> NDArray[np.float32]:
    h, w = (img.shape[0] // s) * s, (img.shape[1] // s) * s
    return img[:h, :w].reshape(h // s, s, w // s, s).mean(axis=(1, 3), dtype=np.float32)


class DeepFocusScorer(FocusFunction):
    """CNN blur score (``ln`` blur radius in pixels; lower is sharper).

    Parameters
    ----------
    weights
        Path of a weights file (default: the shipped weights, or ``BLUESKY_DEEPFOCUS_WEIGHTS``).
    device
        ``"cpu"``, ``"cuda"`` or a torch device; ``"auto"`` picks CUDA when available.
    max_level
        Coarsest pyramid level ``2**max_level`` (default 3: blocks of 8x8 pixels).
    batch_size
        Patches per network call.
    min_confidence
        Patches below this confidence do not enter the ROI score.
    image_key, position_key
        As for :class:`~.scoring.FocusFunction` when used as a Bluesky callback.

    Examples
    --------
    >>> from bluesky_deepfocus import DeepFocusScorer
    >>> from bluesky_deepfocus.optics import get_objective, objective_psf, blur
    >>> from bluesky_deepfocus.specimens import make_specimen
    >>> obj = get_objective("10x/0.3")
    >>> spec = make_specimen("tissue", 256 + 96, obj.pixel_size_um, seed=0)
    >>> sharp = blur(spec, objective_psf(obj, 0.0, size=97)) * 2000
    >>> blurred = blur(spec, objective_psf(obj, 40.0, size=97)) * 2000
    >>> scorer = DeepFocusScorer()
    >>> scorer.score(sharp).score < scorer.score(blurred).score
    True
    """

    name = "deepfocus"
    higher_is_sharper = False

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        *,
        max_level: int = 3,
        batch_size: int = 128,
        min_confidence: float = 0.5,
        image_key: str | None = None,
        position_key: str | None = None,
        saturation: float | None = None,
    ) -> None:
        super().__init__(
            patch_size=PATCH, image_key=image_key, position_key=position_key, saturation=saturation
        )
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        #: the loaded network as trained, and ``model``: the copy inference runs (batch
        #: norms folded in, channels-last on the CPU; :func:`.model.for_inference`)
        self.network: DeepFocusNet
        self.network, self.card = load_model(weights, device=self.device)
        self.model: DeepFocusNet = for_inference(self.network)
        self.weights_path = str(Path(weights) if weights else "")
        self.max_level = int(max_level)
        self.batch_size = int(batch_size)
        self.min_confidence = float(min_confidence)

    @property
    def model_id(self) -> str:
        return str(self.card.get("model_id", "unknown"))

    @property
    def model_sha256(self) -> str:
        return str(self.card.get("sha256", ""))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model_id": self.model_id,
            "model_sha256": self.model_sha256,
            "max_level": self.max_level,
            "units": "ln(blur radius in pixels)",
        }

    @torch.inference_mode()
    def _run(self, patches: NDArray[np.float32] | torch.Tensor) -> NDArray[np.float32]:
        outs = []
        for k in range(0, len(patches), self.batch_size):
            chunk = patches[k : k + self.batch_size]
            if isinstance(chunk, np.ndarray):
                chunk = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
            outs.append(self.model(prepare_patches(chunk)).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 3), np.float32)

    @staticmethod
    def _outputs(out: NDArray[np.float32]) -> dict[str, NDArray[np.float64]]:
        o = out.astype(np.float64)
        return {
            "ln_r": o[:, 0],
            "sigma": np.exp(np.clip(o[:, 1], -5, 3)),
            "p_info": _sigmoid(o[:, 2]),
        }

    def predict_patches(self, patches: ArrayLike) -> dict[str, NDArray[np.float64]]:
        """Raw network output for ``(N, 128, 128)`` patches: ``ln_r``, ``sigma``, ``p_info``."""
        p = np.asarray(patches, dtype=np.float32)
        if p.ndim != 3 or p.shape[1:] != (PATCH, PATCH):
            raise ValueError(f"patches must be (N, {PATCH}, {PATCH}), got {p.shape!r}.")
        return self._outputs(self._run(p))

    @property
    def _on_device(self) -> bool:
        """Build the pyramid and the patches where the network runs (a GPU): the frame
        crosses to the device once, and only the network's outputs come back."""
        return self.device.type != "cpu"

    def _pyramid(self, img: NDArray[np.float32]) -> tuple[Any, Any, Any]:
        """``(level_image(s), cut(image, pick), predict(patches))`` for the frame (``cut``:
        the centred patch grid of one level, or its patches ``pick``), in numpy or,
        :attr:`_on_device`, as tensors on the network's device."""
        if not self._on_device:

            def block(s: int) -> NDArray[np.float32]:
                return img if s == 1 else _block_mean(img, s)

            def cut(a: NDArray[np.float32], pick: NDArray | None = None) -> NDArray[np.float32]:
                p = to_patches(a, PATCH)[0]
                return p if pick is None else p[pick]

            return block, cut, self.predict_patches
        frame = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)

        def pool(s: int) -> torch.Tensor:
            return frame if s == 1 else torch.nn.functional.avg_pool2d(frame[None, None], s)[0, 0]

        def predict(p: torch.Tensor) -> dict[str, NDArray[np.float64]]:
            return self._outputs(self._run(p))

        def cut_t(t: torch.Tensor, pick: NDArray | None = None) -> torch.Tensor:
            p = _patches_t(t, PATCH)
            return p if pick is None else p[torch.from_numpy(pick).to(self.device)]

        return pool, cut_t, predict

    @torch.inference_mode()
    def score(self, image: ArrayLike, roi: ROI | None = None) -> ScoreResult:
        img = check_image(image, PATCH)
        sat = self._saturation_level(image)
        img, (oy, ox) = crop_roi(img, roi, PATCH)
        rows, cols, y0, x0 = patch_grid((img.shape[0], img.shape[1]), PATCH)
        n = rows * cols
        level_image, cut, predict = self._pyramid(img)
        fine = cut(level_image(1))
        # a patch without any variation (blank, clipped, zero-filled) holds no focus
        # information whatever the network says
        ft = torch.as_tensor(fine)  # no copy: numpy shares its memory, a tensor is itself
        flat = (ft.amax(dim=(1, 2)) == ft.amin(dim=(1, 2))).cpu().numpy()
        sat_frac = (
            (ft >= sat).float().mean(dim=(1, 2)).cpu().numpy().astype(np.float64)
            if sat is not None
            else np.zeros(n)
        )
        out = predict(fine)
        # per level and fine patch: ln r (full-resolution pixels), sigma, p_info (NaN: not computed)
        levels: list[tuple[NDArray, NDArray, NDArray, NDArray]] = []
        levels.append((out["ln_r"], out["ln_r"], out["sigma"], out["p_info"]))
        # a coarser level is computed where a patch sees a large blur, and for every patch
        # when most of the frame does: a fine level can *under*-read a blur far beyond its
        # patch (a 90 px disc read as 4 px), and only the coarser level can overrule it
        # (see _fuse)
        need = _needs_coarser(out["ln_r"], np.ones(n, bool))
        level_counts = [n]
        # centre of each fine patch in crop coordinates
        cy = (y0 + (np.arange(rows) + 0.5) * PATCH)[:, None].repeat(cols, 1).ravel()
        cx = (x0 + (np.arange(cols) + 0.5) * PATCH)[None, :].repeat(rows, 0).ravel()
        for level in range(1, self.max_level + 1):
            if not np.any(need):
                break
            s = 2**level
            small = level_image(s)
            shape = (int(small.shape[0]), int(small.shape[1]))
            if min(shape) < PATCH:
                break
            prow, pcol, py0, px0 = patch_grid(shape, PATCH)
            # which coarse patch covers each fine patch centre
            i = np.clip(((cy / s - py0) // PATCH).astype(int), 0, prow - 1)
            j = np.clip(((cx / s - px0) // PATCH).astype(int), 0, pcol - 1)
            wanted = np.unique((i * pcol + j)[need])
            res = predict(cut(small, wanted))
            level_counts.append(len(wanted))
            lut = -np.ones(prow * pcol, dtype=int)
            lut[wanted] = np.arange(len(wanted))
            k = lut[i * pcol + j]
            use = need & (k >= 0)
            own = np.full(n, np.nan)
            sig = np.full(n, np.nan)
            pin = np.zeros(n)
            own[use] = res["ln_r"][k[use]]
            sig[use] = res["sigma"][k[use]]
            pin[use] = res["p_info"][k[use]]
            levels.append((own + math.log(s), own, sig, pin))
            need = _needs_coarser(own, use)
        values, conf = _fuse(levels)
        conf[sat_frac > self.max_saturated_fraction] = 0.0
        conf[flat] = 0.0
        return self._result(values, conf, rows, cols, (oy + y0, ox + x0), levels=level_counts)


def _needs_coarser(ln_r: NDArray, measured: NDArray) -> NDArray:
    """Patches for the next coarser level: those reading a blur above ``_NEXT``, and all
    measured ones when the median measured patch does."""
    big = measured & (np.nan_to_num(ln_r, nan=-np.inf) > _NEXT)
    if np.any(measured) and float(np.nanmedian(ln_r[measured])) > _NEXT:
        return measured.copy()
    return big


def _patches_t(frame: torch.Tensor, patch: int) -> torch.Tensor:
    """:func:`~.scoring.to_patches` for a 2-D tensor (same centred grid, same order)."""
    rows, cols, y0, x0 = patch_grid((int(frame.shape[0]), int(frame.shape[1])), patch)
    sub = frame[y0 : y0 + rows * patch, x0 : x0 + cols * patch]
    return sub.reshape(rows, patch, cols, patch).permute(0, 2, 1, 3).reshape(-1, patch, patch)


def _fuse(levels: list[tuple[NDArray, NDArray, NDArray, NDArray]]) -> tuple[NDArray, NDArray]:
    """Confidence- and range-weighted mean over pyramid levels, per fine patch.

    A level's estimate counts where its own blur radius is resolvable (above 1.5 px for
    the coarse levels, whose finer level exists) and still well inside its 128 px patch:
    above ~12 px it is down-weighted when a coarser level also measured the patch (which
    then sees the blur in its sweet spot), above 30 px always.
    """
    n = len(levels[0][0])
    num = np.zeros(n)
    den = np.zeros(n)
    conf = np.zeros(n)
    for index, (full, own, sigma, p_info) in enumerate(levels):
        ok = np.isfinite(own)
        if not np.any(ok):
            continue
        coarser = np.zeros(n, bool)
        # the largest blur a coarser level resolves (over 1.5 of its pixels, confidently):
        # where it exceeds this level's range, this level's own reading is void
        seen = np.full(n, -np.inf)
        for later in levels[index + 1 :]:
            done = np.isfinite(later[1])
            coarser |= done
            sure = done & (np.nan_to_num(later[1], nan=-np.inf) > _LO) & (later[3] > 0.5)
            seen = np.where(sure, np.maximum(seen, np.nan_to_num(later[0], nan=-np.inf)), seen)
        gate = _sigmoid((_HI - own) / _EDGE)
        gate = np.where(coarser, gate * _sigmoid((_SOFT - own) / 0.25), gate)
        beyond = seen - index * math.log(2.0)  # in this level's pixels
        gate = np.where(np.isfinite(beyond), gate * _sigmoid((_HI - beyond) / _EDGE), gate)
        if index > 0:
            gate = gate * _sigmoid((own - _LO) / _EDGE)
        w = np.where(ok, p_info * gate / np.where(ok, sigma, 1.0) ** 2, 0.0)
        num += np.where(ok, w * np.nan_to_num(full), 0.0)
        den += w
        conf = np.maximum(conf, np.where(ok, p_info * gate, 0.0))
    values = np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)
    return values, np.where(np.isfinite(values), conf, 0.0)
