"""Common machinery of focus functions: input checks, patch grid, ROI, Bluesky callback.

Every focus function (the DeepFocus CNN and the classic metrics) is a
:class:`FocusFunction`: ``score(image, roi=None)`` returns a :class:`ScoreResult` with a
per-patch map, per-patch confidences and a robust ROI score, and the object is also a
Bluesky document consumer (``RE.subscribe(fn)``) that scores the camera image of every
event and keeps ``(z, result)`` pairs for plans to read, or re-scores a stored run by
replaying its documents (:meth:`FocusFunction.rescore`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import ImageError

__all__ = [
    "ROI",
    "FocusFunction",
    "ScoreResult",
    "ScoredImage",
    "check_image",
]

ROI = tuple[int, int, int, int]  # x, y, width, height (Micro-Manager order)


@dataclass(frozen=True)
class ScoreResult:
    """The score of one image.

    Attributes
    ----------
    score
        Robust ROI score: confidence-weighted median of the confident patches (NaN when
        no patch holds focus information -- never a made-up number).
    blur_map, confidence
        ``(rows, cols)`` per-patch values and confidences in [0, 1].
    patch_size, origin
        Patch side (pixels) and the image pixel ``(y, x)`` of the grid's top-left corner.
    scorer, higher_is_sharper
        Who scored, and which direction is "better focused".
    """

    score: float
    blur_map: NDArray[np.float64]
    confidence: NDArray[np.float64]
    patch_size: int
    origin: tuple[int, int]
    scorer: str
    higher_is_sharper: bool
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ungated(self) -> float:
        """Median of the whole map, ignoring confidences (for comparisons with functions
        that have no notion of confidence; not used for decisions)."""
        v = self.blur_map[np.isfinite(self.blur_map)]
        return float(np.median(v)) if v.size else float("nan")

    @property
    def informative(self) -> bool:
        """True when at least one patch carries focus information."""
        return bool(np.isfinite(self.score))

    @property
    def informative_fraction(self) -> float:
        """Fraction of patches with confidence >= 0.5."""
        return float(np.mean(self.confidence >= 0.5)) if self.confidence.size else 0.0

    def patch_centers(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Image coordinates ``(y, x)`` (pixels) of the patch centres, shaped like the map."""
        rows, cols = self.blur_map.shape
        ys = self.origin[0] + (np.arange(rows) + 0.5) * self.patch_size
        xs = self.origin[1] + (np.arange(cols) + 0.5) * self.patch_size
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return yy, xx

    @property
    def blur(self) -> float:
        """The score oriented as blur (lower is sharper)."""
        return -self.score if self.higher_is_sharper else self.score


@dataclass(frozen=True)
class ScoredImage:
    """One scored event: where it came from and its result."""

    run_uid: str
    stream: str
    seq_num: int
    z: float
    time: float
    result: ScoreResult


def check_image(
    image: ArrayLike, min_size: int = 1, *, rgb: str = "luminance"
) -> NDArray[np.float32]:
    """Validate a camera frame and return it as a 2-D float32 array.

    Raises
    ------
    ImageError
        Not a 2-D (or RGB/RGBA ``(H, W, 3|4)``) numeric array, NaN/inf values, or smaller than
        ``min_size`` on a side. RGB frames are converted to luminance (Rec. 601 weights)
        when ``rgb="luminance"`` and refused when ``rgb="error"``.
    """
    arr = np.asarray(image)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ImageError(
            f"Image dtype {arr.dtype!r} is not numeric; pass the camera frame as a numeric "
            "numpy array (uint8/uint16/float)."
        )
    if np.iscomplexobj(arr):
        raise ImageError(f"Image dtype {arr.dtype!r} is complex; pass intensities (real values).")
    raw = arr  # checked for NaN/inf and the float32 range before any conversion
    is_rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    if is_rgb:
        if rgb == "error":
            raise ImageError(
                f"Image shape {arr.shape!r} is RGB; convert it to grayscale or use rgb='luminance'."
            )
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageError(
            f"Image shape {arr.shape!r} is not a 2-D frame (or (H, W, 3) RGB); pass one camera "
            "frame, not a stack."
        )
    if np.issubdtype(raw.dtype, np.floating):  # integers are always finite and in range
        _check_values(raw[..., :3] if is_rgb else raw, rgb=is_rgb)
    out = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(out)):  # e.g. an RGB luminance sum overflowing float32
        raise ImageError(
            "Image values overflow the float32 range once converted; scale the frame down "
            "(e.g. divide it by its maximum) before scoring."
        )
    if min(out.shape) < min_size:
        raise ImageError(
            f"Image shape {out.shape!r} is smaller than the minimum {min_size}x{min_size} "
            f"pixels needed for one patch; use a larger ROI or frame."
        )
    return out


def _check_values(a: NDArray[Any], *, rgb: bool = False) -> None:
    """Refuse NaN/inf pixels and values beyond the float32 range the scorers compute in
    (``rgb``: ``a`` is ``(H, W, 3)`` and a pixel counts once)."""
    finite = np.isfinite(a)
    if rgb:
        finite = finite.all(axis=-1)
    bad = int(np.size(finite) - np.count_nonzero(finite))
    if bad:
        raise ImageError(
            f"Image holds {bad} NaN/inf pixel(s); check the camera or the preprocessing that "
            "produced it (dark/flat correction dividing by zero?)."
        )
    if a.dtype.itemsize > 4:
        limit = float(np.finfo(np.float32).max)
        big = np.abs(a) > limit
        if rgb:
            big = big.any(axis=-1)
        n = int(np.count_nonzero(big))
        if n:
            largest = float(np.max(np.abs(a)))
            raise ImageError(
                f"Image holds {n} pixel(s) beyond the float32 range (|value| up to "
                f"{largest:.3g} > {limit:.3g}): the focus functions compute in float32. "
                "Scale the frame down (e.g. divide it by its maximum) before scoring."
            )


def crop_roi(
    image: NDArray[np.float32], roi: ROI | None, min_size: int
) -> tuple[NDArray[np.float32], tuple[int, int]]:
    """Crop ``(x, y, width, height)``; returns the crop and its top-left ``(y, x)``."""
    if roi is None:
        return image, (0, 0)
    try:
        x, y, w, h = (int(v) for v in roi)
    except (TypeError, ValueError):
        raise ImageError(f"ROI {roi!r} must be (x, y, width, height) in pixels.") from None
    H, W = image.shape
    if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > W or y + h > H:
        raise ImageError(f"ROI {roi!r} (x, y, width, height) does not fit in the {W}x{H} image.")
    if min(w, h) < min_size:
        raise ImageError(
            f"ROI {roi!r} is smaller than the minimum {min_size}x{min_size} pixels of one patch; "
            "enlarge it."
        )
    return image[y : y + h, x : x + w], (y, x)


def patch_grid(shape: tuple[int, int], patch: int) -> tuple[int, int, int, int]:
    """Centred grid of non-overlapping patches: ``(rows, cols, y0, x0)``."""
    rows, cols = shape[0] // patch, shape[1] // patch
    return rows, cols, (shape[0] - rows * patch) // 2, (shape[1] - cols * patch) // 2


def to_patches(
    img: NDArray[np.float32], patch: int
) -> tuple[NDArray[np.float32], tuple[int, int, int, int]]:
    rows, cols, y0, x0 = patch_grid((img.shape[0], img.shape[1]), patch)
    sub = img[y0 : y0 + rows * patch, x0 : x0 + cols * patch]
    p = sub.reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3).reshape(-1, patch, patch)
    return p, (rows, cols, y0, x0)


def weighted_median(values: NDArray, weights: NDArray) -> float:
    ok = np.isfinite(values) & (weights > 0)
    if not np.any(ok):
        return float("nan")
    v, w = values[ok], weights[ok]
    order = np.argsort(v)
    v, w = v[order], w[order]
    c = np.cumsum(w)
    return float(np.interp(0.5 * c[-1], c - 0.5 * w, v))


def structure_snr(patches: NDArray[np.float32]) -> NDArray[np.float64]:
    """Signal standard deviation over an estimate of the noise, per patch.

    The noise is estimated from diagonal pixel differences (median absolute deviation),
    which pure noise dominates; a blank, dark or flat patch scores ~1 or less, and an
    exactly constant patch 0.
    """
    d = patches[:, 1:, 1:] - patches[:, :-1, :-1]
    mad = np.median(np.abs(d - np.median(d, axis=(1, 2), keepdims=True)), axis=(1, 2))
    noise = 1.4826 * mad / math.sqrt(2.0)
    std = patches.std(axis=(1, 2), dtype=np.float64)
    flat = patches.max(axis=(1, 2)) == patches.min(axis=(1, 2))
    snr = np.where(std > 0, std / np.maximum(noise, 1e-6 * np.maximum(std, 1e-12)), 0.0)
    return np.where(flat, 0.0, snr)


class FocusFunction:
    """Base class: subclasses implement :meth:`_score_patches` (and may override :meth:`score`).

    Parameters
    ----------
    patch_size
        Side of the square patches of the map.
    image_key, position_key
        Event data keys of the camera image and the focus position when used as a
        callback; default: the first 2-D array field, and the run's first motor.
    min_snr
        Patches whose structure SNR (:func:`structure_snr`) is below this have confidence
        0 (pure noise scores ~1); the confidence reaches 1 at ``min_snr + 0.4``. Only
        blank, dark, flat or saturated patches are excluded: an in-focus undersampled
        texture inflates the noise estimate, so the threshold stays close to 1.
    saturation
        Pixel value counted as saturated (default: the dtype's maximum for integer frames).
    roi
        ``(x, y, width, height)`` scored when used as a callback (plans set it per run).
    max_results
        Scored images kept in :attr:`results` (oldest dropped first).
    """

    name: str = "focus_function"
    higher_is_sharper: bool = True

    def __init__(
        self,
        *,
        patch_size: int = 128,
        image_key: str | None = None,
        position_key: str | None = None,
        min_snr: float = 1.1,
        saturation: float | None = None,
        max_saturated_fraction: float = 0.3,
        roi: ROI | None = None,
        max_results: int = 10_000,
    ) -> None:
        self.patch_size = int(patch_size)
        self.image_key = image_key
        self.position_key = position_key
        self.min_snr = float(min_snr)
        self.saturation = saturation
        self.max_saturated_fraction = float(max_saturated_fraction)
        self.min_confidence = 0.5
        self.roi = roi
        self.results: deque[ScoredImage] = deque(maxlen=int(max_results))
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.scored_count = 0  # events scored so far (plans check it grew after a snap)
        self._lock = threading.Lock()
        self._start: dict[str, Any] = {}
        self._keys: dict[str, tuple[str | None, str | None, str]] = {}
        self._desc_run: dict[str, str] = {}

    # -- scoring --------------------------------------------------------------------
    def _score_patches(self, patches: NDArray[np.float32]) -> NDArray[np.float64]:
        raise NotImplementedError

    def _saturated_fraction(
        self, patches: NDArray[np.float32], sat: float | None
    ) -> NDArray[np.float64]:
        if sat is None:
            return np.zeros(len(patches))
        return (patches >= sat).mean(axis=(1, 2))

    def _saturation_level(self, raw: ArrayLike) -> float | None:
        if self.saturation is not None:
            return float(self.saturation)
        dt = np.asarray(raw).dtype
        if np.issubdtype(dt, np.integer):
            return float(np.iinfo(dt).max)
        return None

    def score(self, image: ArrayLike, roi: ROI | None = None) -> ScoreResult:
        """Score one frame (optionally inside ``roi = (x, y, width, height)``)."""
        img = check_image(image, self.patch_size)
        sat = self._saturation_level(image)
        img, (oy, ox) = crop_roi(img, roi, self.patch_size)
        patches, (rows, cols, y0, x0) = to_patches(img, self.patch_size)
        values = np.asarray(self._score_patches(patches), dtype=np.float64)
        snr = structure_snr(patches)
        conf = np.clip((snr - self.min_snr) / 0.4, 0.0, 1.0)
        conf[self._saturated_fraction(patches, sat) > self.max_saturated_fraction] = 0.0
        return self._result(values, conf, rows, cols, (oy + y0, ox + x0))

    def _result(
        self,
        values: NDArray,
        conf: NDArray,
        rows: int,
        cols: int,
        origin: tuple[int, int],
        **extra: Any,
    ) -> ScoreResult:
        values = values.reshape(rows, cols)
        conf = conf.reshape(rows, cols)
        confident = conf >= self.min_confidence
        score = (
            weighted_median(values[confident], conf[confident])
            if np.any(confident)
            else float("nan")
        )
        return ScoreResult(
            score=score,
            blur_map=values,
            confidence=conf,
            patch_size=self.patch_size,
            origin=origin,
            scorer=self.name,
            higher_is_sharper=self.higher_is_sharper,
            extra=extra,
        )

    def describe(self) -> dict[str, Any]:
        """Settings to record with the data (start document)."""
        return {
            "name": self.name,
            "patch_size": self.patch_size,
            "higher_is_sharper": self.higher_is_sharper,
        }

    # -- Bluesky callback -------------------------------------------------------------
    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(doc)

    def _on_start(self, doc: Mapping[str, Any]) -> None:
        self._start[doc["uid"]] = doc

    def _on_descriptor(self, doc: Mapping[str, Any]) -> None:
        self._desc_run[doc["uid"]] = doc.get("run_start", "")
        keys = doc.get("data_keys", {})
        start = self._start.get(doc.get("run_start", ""), {})
        image_key = self.image_key if self.image_key in keys else None
        if image_key is None and self.image_key is None:
            # camera frames: 2-D (or RGB) arrays at least one patch large, preferring the
            # run's detectors (derived maps of our own streams are small and not detectors)
            detectors = set(start.get("detectors", []) or [])
            candidates = [
                k
                for k, dk in keys.items()
                if dk.get("dtype") == "array"
                and len(dk.get("shape") or []) in (2, 3)
                and min((dk.get("shape") or [0, 0])[:2]) >= self.patch_size
            ]
            preferred = [k for k in candidates if keys[k].get("object_name") in detectors]
            image_key = (preferred or candidates or [None])[0]
        position_key = self.position_key if self.position_key in keys else None
        if position_key is None and self.position_key is None:
            for motor in start.get("motors", []) or []:
                for k in keys:
                    if k == motor or k == f"{motor}_readback" or k.startswith(f"{motor}"):
                        position_key = k
                        break
                if position_key:
                    break
        self._keys[doc["uid"]] = (image_key, position_key, doc.get("name", "primary"))

    def _on_event(self, doc: Mapping[str, Any]) -> None:
        keys = self._keys.get(doc.get("descriptor", ""))
        if not keys or keys[0] is None:
            return
        image_key, position_key, stream = keys
        data = doc["data"]
        image = data.get(image_key)
        if image is None or isinstance(image, str):  # external (datum id): not inline
            return
        key = (str(doc.get("descriptor", "")), int(doc.get("seq_num", 0)))
        if key in self._seen:  # subscribed twice (session and plan): score once
            return
        self._seen[key] = None
        while len(self._seen) > 4 * (self.results.maxlen or 10_000):
            self._seen.popitem(last=False)
        z = float(data[position_key]) if position_key and position_key in data else float("nan")
        result = self.score(np.asarray(image), roi=self.roi)
        run_uid = self._run_of_descriptor(doc.get("descriptor", ""))
        with self._lock:
            self.scored_count += 1
            self.results.append(
                ScoredImage(
                    run_uid,
                    stream,
                    int(doc.get("seq_num", 0)),
                    z,
                    float(doc.get("time", 0.0)),
                    result,
                )
            )

    def _on_event_page(self, doc: Mapping[str, Any]) -> None:
        n = len(doc.get("seq_num", []))
        for i in range(n):
            self._on_event(
                {
                    "descriptor": doc["descriptor"],
                    "seq_num": doc["seq_num"][i],
                    "time": doc["time"][i],
                    "data": {k: v[i] for k, v in doc["data"].items()},
                }
            )

    def _run_of_descriptor(self, desc_uid: str) -> str:
        return self._desc_run.get(desc_uid, "")

    def results_for(
        self, run_uid: str | None = None, stream: str | None = None
    ) -> list[ScoredImage]:
        """Scored images of a run (default: the latest run seen) and stream."""
        with self._lock:
            items = list(self.results)
        if run_uid is None and items:
            run_uid = items[-1].run_uid
        return [
            r for r in items if r.run_uid == run_uid and (stream is None or r.stream == stream)
        ]

    @property
    def latest(self) -> ScoredImage | None:
        with self._lock:
            return self.results[-1] if self.results else None

    def clear(self) -> None:
        with self._lock:
            self.results.clear()
            self._seen.clear()

    def rescore(self, run: Any) -> list[ScoredImage]:
        """Re-score a stored run by replaying its documents through this callback.

        ``run`` is a BlueskyRun from the catalog (anything with ``.documents()``) or an
        iterable of ``(name, doc)`` pairs. Returns the scored images of that run.
        """
        docs: Iterable[tuple[str, Mapping[str, Any]]] = (
            run.documents() if hasattr(run, "documents") else run
        )
        uid = None
        for name, doc in docs:
            if name == "start":
                uid = doc["uid"]
            self(name, doc)
        return self.results_for(uid) if uid else []


def as_blur(results: Sequence[ScoreResult]) -> NDArray[np.float64]:
    """ROI scores oriented so that lower is sharper."""
    return np.array([r.blur for r in results], dtype=float)
