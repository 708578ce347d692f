"""The DeepFocus network: 128x128 patch -> log blur radius (pixels), its spread, and
whether the patch holds focus information at all.

Target
    ``ln r`` where ``r = sqrt(2 r50^2 + 0.25)`` is the blur radius in *pixels* of the
    actual PSF (``r50``: its 50 % encircled-energy radius; ``sqrt(2) r50`` is the radius of
    a uniform defocus disc, so far from focus ``r`` is the geometric blur radius, and near
    focus it includes diffraction, aberrations and the pixel's own half-width). Unlike the Zernike
    defocus coefficient of the paper, this is determined by the pixels alone when the pixel
    size relative to the optical resolution is unknown, so one network serves every
    objective; the calibration maps it to micrometres.

Architecture
    Two compact branches over the same standardized patch, fused by a small head:

    * a pixel branch of depthwise-separable residual convolutions (stride-2 stem, four
      stages down to 4x4, global average and max pooling), which sees shapes, edges and
      the texture of noise;
    * a spectral branch: a 1-D convolution stack over the patch's Hann-windowed, radially
      averaged log power spectrum, which sees the defocus transfer function's ripples
      directly (the specimen's spectrum is smooth, the defocus OTF has zeros at ~0.6/r).

    Outputs: ``mu`` (ln r), ``log_sigma`` (predicted spread of mu) and ``info_logit``
    (patch informative or not). The head is trained with a beta-NLL regression loss on
    informative patches and a binary loss on the flag (see :mod:`.training`).

Weights are loaded by :func:`load_model` with ``torch.load(weights_only=True)`` on an
explicit device after checking the file's SHA-256 against the one recorded in the model
card; a missing, corrupted or mismatching file raises :class:`~.errors.WeightsError`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import WeightsError

__all__ = [
    "PATCH",
    "DeepFocusNet",
    "ModelConfig",
    "default_weights_path",
    "file_sha256",
    "for_inference",
    "load_model",
    "prepare_patches",
    "save_model",
]

PATCH = 128
WEIGHTS_ENV = "BLUESKY_DEEPFOCUS_WEIGHTS"
WEIGHTS_NAME = "deepfocus.pt"
CARD_NAME = "deepfocus.json"


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters stored with the weights (so a file rebuilds its own network)."""

    width: int = 24
    spectral_bins: int = 64
    spectral_width: int = 32
    head: int = 96

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _SepBlock(nn.Module):
    """Residual depthwise-separable block (dw3x3 -> BN -> ReLU -> pw1x1 -> BN, + skip)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.dw(x)))
        return F.relu(x + self.bn2(self.pw(y)))


class _Down(nn.Module):
    """Stride-2 depthwise 3x3 + pointwise widening."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


def _radial_index(n: int, bins: int) -> torch.Tensor:
    f = torch.fft.fftfreq(n)
    fy, fx = torch.meshgrid(f, torch.fft.rfftfreq(n), indexing="ij")
    r = torch.sqrt(fx * fx + fy * fy) * n  # in cycles per patch
    idx = torch.clamp(torch.round(r).long(), max=bins)  # bin == bins collects the corners
    return idx.flatten()


class DeepFocusNet(nn.Module):
    """Two-branch blur regressor for 128x128 standardized patches (see module docstring)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )  # 64x64
        self.stages = nn.Sequential(
            _SepBlock(w),
            _SepBlock(w),
            _Down(w, 2 * w),  # 32
            _SepBlock(2 * w),
            _SepBlock(2 * w),
            _Down(2 * w, 3 * w),  # 16
            _SepBlock(3 * w),
            _SepBlock(3 * w),
            _Down(3 * w, 4 * w),  # 8
            _SepBlock(4 * w),
            _Down(4 * w, 6 * w),  # 4
            _SepBlock(6 * w),
        )
        sw = config.spectral_width
        self.spec = nn.Sequential(
            nn.Conv1d(1, sw, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(sw, sw, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(sw, sw, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        spec_out = sw * (config.spectral_bins // 4)
        self.head = nn.Sequential(
            nn.Linear(12 * w + spec_out, config.head),
            nn.ReLU(),
            nn.Linear(config.head, config.head),
            nn.ReLU(),
            nn.Linear(config.head, 3),
        )
        self.register_buffer("_ridx", _radial_index(PATCH, config.spectral_bins), persistent=False)
        win = torch.hann_window(PATCH, periodic=False)
        self.register_buffer("_win", torch.outer(win, win), persistent=False)
        counts = torch.bincount(
            _radial_index(PATCH, config.spectral_bins), minlength=config.spectral_bins + 1
        ).float()
        self.register_buffer("_rcount", counts, persistent=False)

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """Radially averaged log power spectrum of standardized patches, ``(N, bins)``."""
        bins = self.config.spectral_bins
        win: torch.Tensor = self._win  # type: ignore[assignment]
        ridx: torch.Tensor = self._ridx  # type: ignore[assignment]
        rcount: torch.Tensor = self._rcount  # type: ignore[assignment]
        p = torch.fft.rfft2(x[:, 0] * win)
        power = (p.real**2 + p.imag**2).flatten(1)
        sums = torch.zeros(x.shape[0], bins + 1, device=x.device, dtype=power.dtype)
        sums.index_add_(1, ridx, power)
        prof = torch.log(sums[:, 1:bins] / rcount[1:bins] + 1e-6)
        prof = torch.cat([prof, prof[:, -1:]], dim=1)  # pad to `bins`
        return prof - prof.mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: standardized patches ``(N, 1, 128, 128)`` -> ``(N, 3)``: mu, log_sigma, info."""
        h = self.stages(self.stem(x))
        feats = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        s = self.spec(self.spectrum(x).unsqueeze(1)).flatten(1)
        return self.head(torch.cat([feats, s], dim=1))


def for_inference(model: DeepFocusNet) -> DeepFocusNet:
    """A copy of ``model`` for inference: every batch norm folded into the convolution
    before it (with its running statistics: eval mode), and on the CPU in channels-last
    layout, oneDNN's fast path for the depthwise convolutions. The same outputs to float
    rounding (tests/test_scorer.py), about 2x faster on 2 CPU threads; the trainable
    ``model`` is left as it is."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(model).eval()
    pairs = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}

    def foldable(conv: Any, bn: Any) -> bool:
        return type(conv) in pairs and isinstance(bn, pairs[type(conv)])

    for mod in m.modules():
        if isinstance(mod, nn.Sequential):
            names = list(mod._modules)
            for a, b in itertools.pairwise(names):
                conv, bn = mod._modules[a], mod._modules[b]
                if foldable(conv, bn):
                    mod._modules[a] = fuse_conv_bn_eval(conv, bn)  # type: ignore[type-var,arg-type]
                    mod._modules[b] = nn.Identity()
        if isinstance(mod, (_SepBlock, _Down)):
            for c_name, b_name in (("dw", "bn1"), ("pw", "bn2")):
                folded = fuse_conv_bn_eval(getattr(mod, c_name), getattr(mod, b_name))
                setattr(mod, c_name, folded)
                setattr(mod, b_name, nn.Identity())
    if next(m.parameters()).device.type == "cpu":
        m = m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return m


def prepare_patches(patches: torch.Tensor) -> torch.Tensor:
    """Standardize raw patches ``(N, 128, 128)`` (any offset/gain) for the network.

    Each patch has its mean removed and is divided by its standard deviation (floored so
    that a perfectly constant patch stays finite); the network sees the shape of the
    signal and of the noise, never the absolute brightness.
    """
    x = patches.float()
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True)
    return ((x - mean) / torch.clamp(std, min=1e-3)).unsqueeze(1)


# --------------------------------------------------------------------------------------
# weights: save, hash, load
# --------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_path() -> Path:
    """Shipped weights, or the folder named by ``BLUESKY_DEEPFOCUS_WEIGHTS``."""
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        p = Path(override)
        return p / WEIGHTS_NAME if p.is_dir() else p
    return Path(str(resources.files("bluesky_deepfocus") / "weights" / WEIGHTS_NAME))


def save_model(
    model: DeepFocusNet, path: str | os.PathLike[str], card: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``state_dict`` + config to ``path`` and a JSON card with its SHA-256 beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": model.config.as_dict(), "state_dict": state}, path)
    info = dict(card or {})
    info["weights_file"] = path.name
    info["sha256"] = file_sha256(path)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["config"] = model.config.as_dict()
    with open(path.with_suffix(".json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return info


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    check_hash: bool = True,
) -> tuple[DeepFocusNet, dict[str, Any]]:
    """Load weights (``weights_only=True``) on ``device`` after checking their hash.

    Returns the network in eval mode and its model card (dict).

    Raises
    ------
    WeightsError
        The file or its card is missing, unreadable, not a JSON object, or its SHA-256
        differs from the card.
    """
    path = Path(path) if path is not None else default_weights_path()
    card_path = path.with_suffix(".json")
    if not path.is_file():
        raise WeightsError(
            f"Model weights {str(path)!r} do not exist. Reinstall bluesky-deepfocus, point "
            f"{WEIGHTS_ENV} at a folder holding {WEIGHTS_NAME!r}, or train them with "
            "`bluesky-deepfocus train`."
        )
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"Model card {str(card_path)!r} is missing or not valid JSON ({exc}); it records "
            "the weights' SHA-256. Restore it next to the weights."
        ) from exc
    if not isinstance(card, dict):
        kind = {"list": "array", "str": "string", "NoneType": "null", "bool": "boolean"}.get(
            type(card).__name__, "number"
        )
        raise WeightsError(
            f"Model card {str(card_path)!r} is not a JSON object (it holds a JSON {kind}); "
            "it must record the weights' SHA-256 as "
            '{"sha256": ...}. Restore the card written with the weights, or retrain.'
        )
    if check_hash:
        digest = file_sha256(path)
        if digest != card.get("sha256"):
            raise WeightsError(
                f"Weights {str(path)!r} have SHA-256 {digest[:16]}..., but the model card "
                f"records {str(card.get('sha256'))[:16]!r}...: the file is corrupted or was "
                "replaced. Reinstall the package or retrain."
            )
    try:
        blob = torch.load(path, map_location=torch.device(device), weights_only=True)
        config = ModelConfig(**blob["config"])
        model = DeepFocusNet(config)
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:
        raise WeightsError(
            f"Weights {str(path)!r} could not be loaded ({type(exc).__name__}: {exc}). "
            "Reinstall the package or retrain with `bluesky-deepfocus train`."
        ) from exc
    model.to(device).eval()
    return model, card


def count_macs(model: DeepFocusNet) -> int:
    """Multiply-accumulates of one forward pass on a 128x128 patch (conv/linear layers)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += int(out.numel() * k)
        elif isinstance(mod, nn.Conv1d):
            total += int(out.numel() * mod.kernel_size[0] * mod.in_channels // mod.groups)
        elif isinstance(mod, nn.Linear):
            total += int(out.numel() * mod.in_features)

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, PATCH, PATCH))
    for h in hs:
        h.remove()
    return total
