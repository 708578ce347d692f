"""Procedural thin specimens in physical units.

Every generator returns a non-negative ``float32`` map of emitted (or transmitted)
intensity sampled at ``pixel_size_um``; object sizes are in micrometres, so the same
seed looks the same under any objective. Bright structures are around 1; the in-focus
image of point-like objects peaks near 1 as well (their integrated flux is larger).

Families are split in two disjoint sets: :data:`TRAIN_FAMILIES` are the only ones the
CNN is trained on; :data:`TEST_FAMILIES` (including the hard cases -- sparse smooth
nuclei on a dark background, isolated beads, dense stained tissue, smooth large
objects) are kept for benchmarks and tests. Keep it that way: a result on a training
family says little about an unseen specimen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "FAMILIES",
    "TEST_FAMILIES",
    "TRAIN_FAMILIES",
    "Slide",
    "make_specimen",
]

Array = NDArray[np.float32]
Rng = np.random.Generator


# --------------------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------------------
def _grid(shape: tuple[int, int]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return yy.astype(np.float64), xx.astype(np.float64)


def _fractal_noise(shape: tuple[int, int], rng: Rng, beta: float, cutoff_px: float) -> NDArray:
    """Gaussian noise with a 1/f^beta amplitude spectrum, high-cut at ``cutoff_px`` period."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta) * np.exp(-((f * cutoff_px) ** 2))
    amp[0, 0] = 0.0
    spec = amp * (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape))
    out = np.fft.irfft2(spec, s=shape)
    out -= out.mean()
    sd = out.std()
    return out / sd if sd > 0 else out


def _blob_mask(
    shape: tuple[int, int],
    centers: NDArray,
    radii: NDArray,
    rng: Rng,
    *,
    ecc: tuple[float, float] = (0.7, 1.0),
    wobble: float = 0.0,
    edge_px: float = 0.5,
    values: NDArray | None = None,
    mode: str = "max",
) -> NDArray:
    """Anti-aliased (optionally wobbly) ellipses; returns coverage in [0, 1] (or values)."""
    out = np.zeros(shape, dtype=np.float64)
    for i, ((cy, cx), r) in enumerate(zip(centers, radii, strict=True)):
        a = r
        b = r * rng.uniform(*ecc)
        th = rng.uniform(0, np.pi)
        ext = math.ceil(max(a, b) * (1 + wobble) + 3 * edge_px + 2)
        y0, y1 = max(0, int(cy) - ext), min(shape[0], int(cy) + ext + 1)
        x0, x1 = max(0, int(cx) - ext), min(shape[1], int(cx) + ext + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        rr = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        if wobble:
            ang = np.arctan2(v, u)
            k = rng.integers(2, 6, size=3)
            ph = rng.uniform(0, 2 * np.pi, size=3)
            amp = rng.uniform(0, wobble, size=3)
            mod = 1 + sum(amp[j] * np.sin(k[j] * ang + ph[j]) for j in range(3)) / 2
            rr = rr / mod
        dist = (rr - 1.0) * min(a, b)  # ~signed distance in px
        cov = np.clip(0.5 - dist / max(edge_px, 1e-3), 0.0, 1.0)
        val = 1.0 if values is None else float(values[i])
        sl = out[y0:y1, x0:x1]
        if mode == "max":
            np.maximum(sl, cov * val, out=sl)
        else:
            sl += cov * val
    return out


def _splat(shape: tuple[int, int], ys: NDArray, xs: NDArray, w: NDArray) -> NDArray:
    """Bilinear deposit of weights ``w`` at sub-pixel points."""
    h, wd = shape
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    fy, fx = ys - y0, xs - x0
    idx_all, val_all = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < wd)
            idx_all.append((yy * wd + xx)[ok])
            val_all.append((w * wy * wx)[ok])
    flat = np.bincount(np.concatenate(idx_all), np.concatenate(val_all), minlength=h * wd)
    return flat.reshape(shape).astype(np.float64)


def _gauss_blur(img: NDArray, sigma_px: float) -> NDArray:
    if sigma_px <= 0.05:
        return img
    h, w = img.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    g = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fx * fx + fy * fy))
    return np.fft.irfft2(np.fft.rfft2(img) * g, s=img.shape)


def _curves(
    shape: tuple[int, int], rng: Rng, n: int, length_px: float, persistence_px: float
) -> tuple[NDArray, NDArray, NDArray]:
    """Points (0.35 px apart) along ``n`` smooth random curves, with a per-curve weight."""
    step = 0.5
    m = max(4, int(length_px / step))
    ys_all, xs_all, w_all = [], [], []
    for _ in range(n):
        y, x = rng.uniform(-0.1, 1.1) * shape[0], rng.uniform(-0.1, 1.1) * shape[1]
        ang = rng.uniform(0, 2 * np.pi)
        dang = rng.normal(0, math.sqrt(2 * step / max(persistence_px, 1.0)), size=m)
        angs = ang + np.cumsum(dang)
        ys = y + np.cumsum(step * np.sin(angs))
        xs = x + np.cumsum(step * np.cos(angs))
        ys_all.append(ys)
        xs_all.append(xs)
        w_all.append(np.full(m, rng.uniform(0.4, 1.0) * step))
    return np.concatenate(ys_all), np.concatenate(xs_all), np.concatenate(w_all)


def _n_for_density(
    shape: tuple[int, int], px: float, per_1000um2: float, rng: Rng, cap: int = 400
) -> int:
    """Poisson object count for a density, capped (a coarse field would hold thousands)."""
    area = shape[0] * shape[1] * px * px / 1000.0
    return min(cap, int(rng.poisson(max(per_1000um2 * area, 0.0))))


def _uniform_points(n: int, shape: tuple[int, int], rng: Rng, pad: float = 0) -> NDArray:
    return np.column_stack(
        [rng.uniform(-pad, shape[0] + pad, n), rng.uniform(-pad, shape[1] + pad, n)]
    )


# --------------------------------------------------------------------------------------
# training families
# --------------------------------------------------------------------------------------
def _cells(shape, px, rng):
    """Irregular cultured cells with cytoplasmic texture, dimmer nuclei, bright rims."""
    n = max(1, _n_for_density(shape, px, rng.uniform(0.3, 3.0), rng))
    centers = _uniform_points(n, shape, rng, pad=10 / px)
    radii = rng.uniform(8, 25, n) / px
    body = _blob_mask(shape, centers, radii, rng, wobble=0.6, edge_px=rng.uniform(0.3, 0.8))
    tex = _fractal_noise(shape, rng, rng.uniform(0.5, 1.5), rng.uniform(0.5, 2.0) / px)
    cyto = body * np.clip(0.6 + 0.25 * tex, 0.05, None)
    nuc = _blob_mask(shape, centers, radii * rng.uniform(0.25, 0.45), rng, edge_px=0.8)
    img = cyto * (1 - rng.uniform(0.3, 0.8) * nuc)
    return img + rng.uniform(0.0, 0.08)


def _filaments(shape, px, rng):
    """Cytoskeleton-like smooth curves (sub-resolution to ~0.5 um wide)."""
    n = min(300, max(1, _n_for_density(shape, px, rng.uniform(2, 30), rng)))
    length = min(rng.uniform(20, 200) / px, 4.0 * max(shape))
    ys, xs, w = _curves(shape, rng, n, length, rng.uniform(5, 60) / px)
    img = _splat(shape, ys, xs, w)
    img = _gauss_blur(img, rng.uniform(0.0, 0.1) / px)
    img *= 1.0 / max(1e-6, np.percentile(img[img > 0], 99) if np.any(img > 0) else 1.0)
    return img + rng.uniform(0.0, 0.1)


def _puncta(shape, px, rng):
    """Spots of many sizes (vesicles, speckles): from sub-resolution to ~2 um discs."""
    n = max(1, _n_for_density(shape, px, rng.uniform(2, 80), rng))
    pts = _uniform_points(n, shape, rng)
    radii = np.exp(rng.uniform(np.log(0.1), np.log(1.2), n)) / px
    vals = rng.uniform(0.3, 1.0, n)
    big = radii >= 0.7
    img = _blob_mask(shape, pts[big], radii[big], rng, values=vals[big], edge_px=0.6, mode="add")
    small = ~big
    # sub-pixel / sub-resolution spots: deposit their flux (area x value)
    flux = vals[small] * np.pi * np.maximum(radii[small], 0.5) ** 2
    img += _splat(shape, pts[small, 0], pts[small, 1], flux)
    return img + rng.uniform(0.0, 0.1)


def _texture(shape, px, rng):
    """Flat textured object: 1/f^beta noise, optionally thresholded (paper-like calibration)."""
    beta = rng.uniform(0.6, 1.8)
    t = _fractal_noise(shape, rng, beta, rng.uniform(0.0, 0.15) / px)
    if rng.random() < 0.4:
        t = (t > rng.uniform(-0.5, 1.0)).astype(np.float64) + 0.3 * t
    t = t - t.min()
    t /= max(t.max(), 1e-9)
    return rng.uniform(0.3, 1.0) * t + rng.uniform(0.0, 0.3)


def _edges(shape, px, rng):
    """Random polygons, bars and grid lines with flat fills (targets, fabricated parts)."""
    img = np.full(shape, rng.uniform(0.0, 0.3))
    yy, xx = _grid(shape)
    for _ in range(int(rng.integers(2, 10))):
        kind = rng.integers(0, 3)
        val = rng.uniform(0.0, 1.0)
        if kind == 0:  # rotated rectangle
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            hh, hw = rng.uniform(2, 60, 2) / px
            th = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            d = np.maximum(np.abs(u) - hw, np.abs(v) - hh)
        elif kind == 1:  # half-plane edge
            th = rng.uniform(0, 2 * np.pi)
            c = rng.uniform(0.2, 0.8) * np.array(shape)
            d = (xx - c[1]) * np.cos(th) + (yy - c[0]) * np.sin(th)
        else:  # bar pattern
            period = rng.uniform(1.0, 15.0) / px
            th = rng.uniform(0, np.pi)
            u = xx * np.cos(th) + yy * np.sin(th)
            d = (np.abs(((u / period) % 1.0) - 0.5) - 0.25) * period
        cov = np.clip(0.5 - d / rng.uniform(0.3, 0.7), 0, 1)
        img = img * (1 - cov) + val * cov
    return img


# --------------------------------------------------------------------------------------
# test families (never used for training)
# --------------------------------------------------------------------------------------
def _nuclei(shape, px, rng):
    """Dense DAPI-like nuclei with chromatin texture."""
    n = max(1, _n_for_density(shape, px, rng.uniform(3, 10), rng))
    centers = _uniform_points(n, shape, rng)
    radii = rng.uniform(3.5, 7.0, n) / px
    mask = _blob_mask(shape, centers, radii, rng, edge_px=0.6, values=rng.uniform(0.5, 1.0, n))
    tex = _fractal_noise(shape, rng, 1.0, 0.4 / px)
    return mask * np.clip(0.8 + 0.2 * tex, 0.2, None) + rng.uniform(0.0, 0.03)


def _sparse_nuclei(shape, px, rng):
    """A few smooth nuclei on a dark background (the hard case for one-image scores)."""
    area_um2 = shape[0] * shape[1] * px * px
    n = int(rng.integers(3, 12)) * max(1, int(area_um2 / 110_000))
    centers = _uniform_points(n, shape, rng)
    radii = rng.uniform(4.0, 8.0, n) / px
    mask = _blob_mask(
        shape,
        centers,
        radii,
        rng,
        edge_px=rng.uniform(0.1, 0.3) / px + 0.5,
        values=rng.uniform(0.4, 1.0, n),
    )
    shade = 1 + 0.1 * _fractal_noise(shape, rng, 2.5, 2.0 / px)
    return mask * shade + rng.uniform(0.0, 0.02)


def _beads(shape, px, rng):
    """Isolated sub-resolution beads (100-200 nm) of similar brightness."""
    area_um2 = shape[0] * shape[1] * px * px
    n = max(3, int(rng.integers(5, 25) * area_um2 / 110_000))
    pts = _uniform_points(n, shape, rng)
    # flux chosen so the in-focus peak is ~1 at 10x/0.3 and brighter at high NA
    flux = rng.uniform(0.7, 1.0, n) * 3.0  # in-focus peak ~1 at 10x/0.3
    return _splat(shape, pts[:, 0], pts[:, 1], flux) + rng.uniform(0.0, 0.02)


def _tissue(shape, px, rng):
    """Dense stained tissue: packed nuclei in a fibrous, textured stroma."""
    stroma = _fractal_noise(shape, rng, 1.2, 0.5 / px)
    ys, xs, w = _curves(shape, rng, max(3, _n_for_density(shape, px, 8, rng)), 150 / px, 30 / px)
    fib = _gauss_blur(_splat(shape, ys, xs, w), 0.4 / px)
    fib /= max(1e-9, np.percentile(fib, 99.5))
    n = max(1, _n_for_density(shape, px, 12, rng))
    nuc = _blob_mask(
        shape,
        _uniform_points(n, shape, rng),
        rng.uniform(2.5, 5, n) / px,
        rng,
        edge_px=0.7,
        wobble=0.2,
    )
    img = 0.45 + 0.15 * stroma + 0.3 * np.clip(fib, 0, 1.5) - 0.35 * nuc
    return np.clip(img, 0.02, None)


def _smooth(shape, px, rng):
    """Large smooth objects (oocytes, spheroids, big cells): gentle interior gradients,
    boundaries sharp only at the membrane, almost no fine texture."""
    n = int(rng.integers(1, 4))
    centers = _uniform_points(n, shape, rng)
    radii = rng.uniform(25, 80, n) / px
    edge = rng.uniform(0.1, 0.3) / px + 0.5
    mask = _blob_mask(
        shape, centers, radii, rng, wobble=0.15, edge_px=edge, values=rng.uniform(0.4, 1.0, n)
    )
    yy, xx = _grid(shape)
    grad = 1 + 0.3 * np.cos(
        2
        * np.pi
        * (yy * rng.normal() + xx * rng.normal())
        / (np.hypot(*shape) * rng.uniform(1, 3))
    )
    shade = 1 + 0.15 * _fractal_noise(shape, rng, 3.0, 5.0 / px)
    return mask * grad * shade + rng.uniform(0.0, 0.05)


def _neurons(shape, px, rng):
    """Somata with long thin dendrites/axons."""
    n = max(1, _n_for_density(shape, px, rng.uniform(0.2, 1.0), rng))
    centers = _uniform_points(n, shape, rng)
    soma = _blob_mask(shape, centers, rng.uniform(5, 10, n) / px, rng, wobble=0.3, edge_px=0.8)
    ys_all, xs_all, w_all = [], [], []
    for cy, cx in centers:
        for _ in range(int(rng.integers(3, 8))):
            m = int(rng.uniform(40, 300) / px / 0.35)
            angs = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, m))
            ys_all.append(cy + np.cumsum(0.35 * np.sin(angs)))
            xs_all.append(cx + np.cumsum(0.35 * np.cos(angs)))
            w_all.append(np.linspace(1.0, 0.3, m) * 0.35 * rng.uniform(0.5, 1.5))
    if ys_all:
        neur = _splat(shape, np.concatenate(ys_all), np.concatenate(xs_all), np.concatenate(w_all))
        neur = _gauss_blur(neur, 0.25 / px)
        neur /= max(1e-9, np.percentile(neur[neur > 0], 99))
    else:
        neur = np.zeros(shape)
    return np.clip(neur, 0, 1.5) + 0.9 * soma + rng.uniform(0.0, 0.05)


def _text(shape, px, rng):
    """Printed characters (a fabricated resolution target / labelled slide)."""
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    img = np.full(shape, rng.uniform(0.0, 0.2))
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    yy, xx = _grid(shape)
    pts = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5])
    n_words = int(rng.integers(3, 10))
    for _ in range(n_words):
        size_px = rng.uniform(4, 25) / px
        word = "".join(rng.choice(list(letters), size=int(rng.integers(1, 6))))
        tp = TextPath((0, 0), word, size=size_px)
        verts = tp.vertices.copy()
        verts[:, 1] = -verts[:, 1]
        verts += [rng.uniform(0, shape[1]), rng.uniform(0, shape[0])]
        path = Path(verts, tp.codes)
        ext = path.get_extents()
        if ext.x1 < 0 or ext.y1 < 0 or ext.x0 > shape[1] or ext.y0 > shape[0]:
            continue
        inside = path.contains_points(pts).reshape(shape)
        img[inside] = rng.uniform(0.5, 1.0)
    return img


_PHOTO_FILES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "grass.png",
    "gravel.png",
    "horse.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "phantom.png",
    "clock_motion.png",
    "color.png",
)
_photo_cache: list[NDArray] = []


def _load_photos() -> list[NDArray]:
    """Natural photographs bundled with scikit-image (no microscopy: those are kept for
    evaluation). Needs the optional dependency scikit-image."""
    if not _photo_cache:
        try:
            import skimage.data as skd
            from skimage.color import rgb2gray
            from skimage.io import imread
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise ImportError(
                "The 'photos' specimen family needs scikit-image: pip install scikit-image"
            ) from exc
        from pathlib import Path

        folder = Path(skd.__file__).parent
        for name in _PHOTO_FILES:
            img = np.asarray(imread(folder / name), dtype=np.float64)
            if img.ndim == 3:
                img = rgb2gray(img[..., :3])
            img = img - img.min()
            _photo_cache.append(img / max(img.max(), 1e-9))
    return _photo_cache


def _photos(shape, px, rng):
    """Random crops of natural photographs at random zoom, gamma and polarity."""
    from scipy.ndimage import zoom

    photos = _load_photos()
    img = photos[int(rng.integers(len(photos)))]
    h0, w0 = img.shape
    min_scale = max((shape[0] + 4) / (h0 - 2), (shape[1] + 4) / (w0 - 2))
    # downsampled or at most slightly magnified: photographs stay sharp at the pixel
    # level, so all blur in the training data is optical blur
    scale = max(float(np.exp(rng.uniform(np.log(0.4), np.log(1.2)))), min_scale)
    need = (
        min(h0, int(np.ceil(shape[0] / scale)) + 2),
        min(w0, int(np.ceil(shape[1] / scale)) + 2),
    )
    y0 = int(rng.integers(0, h0 - need[0] + 1))
    x0 = int(rng.integers(0, w0 - need[1] + 1))
    crop = zoom(img[y0 : y0 + need[0], x0 : x0 + need[1]], scale, order=1)[: shape[0], : shape[1]]
    if crop.shape != shape:
        crop = np.pad(
            crop, [(0, shape[0] - crop.shape[0]), (0, shape[1] - crop.shape[1])], mode="edge"
        )
    crop = np.clip(crop, 0, 1) ** rng.uniform(0.5, 2.0)
    if rng.random() < 0.5:
        crop = 1.0 - crop
    return rng.uniform(0.3, 1.0) * crop + rng.uniform(0.0, 0.2)


_Gen = Callable[[tuple[int, int], float, Rng], NDArray]

FAMILIES: dict[str, _Gen] = {
    "cells": _cells,
    "filaments": _filaments,
    "puncta": _puncta,
    "texture": _texture,
    "edges": _edges,
    "nuclei": _nuclei,
    "sparse_nuclei": _sparse_nuclei,
    "beads": _beads,
    "tissue": _tissue,
    "smooth": _smooth,
    "neurons": _neurons,
    "text": _text,
    "photos": _photos,
}
TRAIN_FAMILIES: tuple[str, ...] = ("cells", "filaments", "puncta", "texture", "edges", "photos")
TEST_FAMILIES: tuple[str, ...] = (
    "nuclei",
    "sparse_nuclei",
    "beads",
    "tissue",
    "smooth",
    "neurons",
    "text",
)


def make_specimen(
    family: str,
    shape: tuple[int, int] | int,
    pixel_size_um: float,
    seed: int | Rng | None = None,
    *,
    brightness: float = 1.0,
) -> Array:
    """Generate a specimen intensity map.

    Parameters
    ----------
    family
        One of :data:`FAMILIES`.
    shape
        ``(height, width)`` in pixels (or one int for a square).
    pixel_size_um
        Sample-plane pixel size; object sizes are physical.
    seed
        Integer seed or a numpy Generator (reproducible).
    brightness
        Multiplies the map.

    Examples
    --------
    >>> img = make_specimen("nuclei", 128, 0.65, seed=1)
    >>> img.shape, img.dtype, bool(img.min() >= 0)
    ((128, 128), dtype('float32'), True)
    """
    try:
        gen = FAMILIES[family]
    except KeyError:
        raise KeyError(
            f"Unknown specimen family {family!r}; choose from {sorted(FAMILIES)}."
        ) from None
    if isinstance(shape, int):
        shape = (shape, shape)
    if pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um={pixel_size_um!r} must be positive.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    img = gen((int(shape[0]), int(shape[1])), float(pixel_size_um), rng)
    return (np.maximum(img, 0.0) * brightness).astype(np.float32)


@dataclass
class Slide:
    """A large specimen for XY scanning: a stage position selects a field of view.

    Parameters
    ----------
    family, size_um, pixel_size_um, seed
        The specimen is generated once at ``pixel_size_um`` covering ``size_um`` (square),
        centred on stage coordinates (0, 0).

    Examples
    --------
    >>> s = Slide("tissue", size_um=400.0, pixel_size_um=0.65, seed=3)
    >>> s.crop(0.0, 0.0, (64, 64), margin=8).shape
    (80, 80)
    """

    family: str
    size_um: float
    pixel_size_um: float
    seed: int = 0
    brightness: float = 1.0

    def __post_init__(self) -> None:
        n = math.ceil(self.size_um / self.pixel_size_um)
        self.data = make_specimen(
            self.family, (n, n), self.pixel_size_um, self.seed, brightness=self.brightness
        )
        self.fill = float(np.median(self.data))

    def crop(self, x_um: float, y_um: float, shape: tuple[int, int], margin: int = 0) -> Array:
        """Field of view centred on stage ``(x_um, y_um)``, with ``margin`` extra pixels.

        Outside the slide the median level of the slide is used (mounting medium).
        """
        h, w = shape[0] + 2 * margin, shape[1] + 2 * margin
        n = self.data.shape[0]
        cy = n / 2 + y_um / self.pixel_size_um
        cx = n / 2 + x_um / self.pixel_size_um
        y0, x0 = round(cy - h / 2), round(cx - w / 2)
        out = np.full((h, w), self.fill, dtype=np.float32)
        sy0, sx0 = max(0, y0), max(0, x0)
        sy1, sx1 = min(n, y0 + h), min(n, x0 + w)
        if sy0 < sy1 and sx0 < sx1:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = self.data[sy0:sy1, sx0:sx1]
        return out
