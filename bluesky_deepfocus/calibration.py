"""Calibration: one z-stack of any flat object -> the instrument's response curves.

From a stack of frames at known stage positions a :class:`Calibration` holds

* ``blur``: the CNN blur score ``b_calib(z)`` (the paper's calibration curve), with a
  Moffat fit of ``exp(-(b - b_min))`` (for a blur radius ``r = sqrt(r0^2 + (a z)^2)``
  the sharpness ``1/r`` *is* a Moffat profile with beta = 1/2) and its FWHM;
* ``log_signal``: the radially binned ``log(P - N)`` power spectrum of each frame
  (:mod:`.spectral`), i.e. the defocus transfer function up to a per-frequency constant,
  which autofocus matches with the specimen cancelled;
* the z axis centred on the stack's focus: the position about which the spectra are
  most symmetric (precise and specimen-independent), cross-checked against the Moffat
  centre;
* the objective, pixel size, scorer model id/hash, fit quality and the run uid.

A stack whose minimum sits at an end of the range, or whose fit is too poor to trust, is
refused with a :class:`~.errors.CalibrationError` that says what to change.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import interpolate, optimize

from .errors import CalibrationError
from .spectral import EDGES, Spectrum

__all__ = ["Calibration", "fit_moffat", "moffat"]

FORMAT = "bluesky-deepfocus-calibration/1"


def moffat(
    z: ArrayLike, amplitude: float, center: float, alpha: float, beta: float, background: float
) -> NDArray[np.float64]:
    """Moffat profile ``background + amplitude * (1 + ((z - center)/alpha)^2)^-beta``."""
    u = (np.asarray(z, dtype=float) - center) / alpha
    return background + amplitude * (1.0 + u * u) ** (-beta)


def fit_moffat(z: ArrayLike, y: ArrayLike) -> tuple[dict[str, float], float]:
    """Least-squares Moffat fit; returns parameters (with ``fwhm``) and R^2."""
    za = np.asarray(z, dtype=float)
    ya = np.asarray(y, dtype=float)
    ok = np.isfinite(ya)
    zz, yy = za[ok], ya[ok]
    if len(zz) < 5:
        raise CalibrationError(
            f"Only {len(zz)} informative frames; a Moffat fit needs at least 5."
        )
    i = int(np.argmax(yy))
    span = float(zz.max() - zz.min())
    p0 = [float(yy[i] - yy.min()), float(zz[i]), span / 20, 0.5, float(yy.min())]
    bounds = ([0, zz.min(), span / 2000, 0.1, -np.inf], [np.inf, zz.max(), span, 5.0, np.inf])
    try:
        p, _ = optimize.curve_fit(moffat, zz, yy, p0=p0, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        raise CalibrationError(f"The Moffat fit of the calibration curve failed ({exc}).") from exc
    resid = yy - moffat(zz, *p)
    ss = float(((yy - yy.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else 0.0
    amp, c, a, b, bg = (float(v) for v in p)
    fwhm = 2 * a * math.sqrt(2 ** (1 / b) - 1)
    return {
        "amplitude": amp,
        "center": c,
        "alpha": a,
        "beta": b,
        "background": bg,
        "fwhm": fwhm,
    }, r2


def _interp_columns(
    zq: NDArray[np.float64], z: NDArray[np.float64], table: NDArray[np.float64], max_gap: float
) -> NDArray[np.float64]:
    """Linear interpolation of each column of ``table`` (NaN = missing) at ``zq``.

    A query is NaN when either neighbour is missing or lies farther than ``max_gap``.
    """
    j = np.clip(np.searchsorted(z, zq) - 1, 0, len(z) - 2)
    z0, z1 = z[j], z[j + 1]
    t = ((zq - z0) / (z1 - z0))[:, None]
    a, b = table[j], table[j + 1]
    out = (1 - t) * a + t * b
    bad = (zq < z[0]) | (zq > z[-1]) | ((z1 - z0) > max_gap)
    out[bad] = np.nan
    return out


@dataclass
class Calibration:
    """The instrument's focus response for one objective / pixel configuration.

    Build one with :meth:`from_stack` (the calibration plan does) or load one with
    :meth:`from_run` / :meth:`load`.
    """

    z_um: NDArray[np.float64]
    blur: NDArray[np.float64]
    log_signal: NDArray[np.float64]
    signal_weight: NDArray[np.float64]
    detection_limit: NDArray[np.float64]
    objective: str
    pixel_size_um: float
    dof_um: float
    model_id: str
    model_sha256: str = ""
    scorer: str = "deepfocus"
    moffat_params: dict[str, float] = field(default_factory=dict)
    moffat_r2: float = float("nan")
    focus_um: float = float("nan")
    center_method: str = "spectral-symmetry"
    quality: dict[str, float] = field(default_factory=dict)
    uid: str | None = None
    created: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_stack(
        cls,
        z_um: Sequence[float] | NDArray,
        blur: Sequence[float] | NDArray,
        spectra: Sequence[Spectrum],
        *,
        objective: str,
        pixel_size_um: float,
        dof_um: float,
        model_id: str,
        model_sha256: str = "",
        scorer: str = "deepfocus",
        min_r2: float = 0.9,
        uid: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Calibration:
        """Fit a calibration to a z-stack (absolute stage positions, any order).

        Raises
        ------
        CalibrationError
            Fewer than 7 frames; no informative frame near the minimum; the minimum at an
            end of the range (extend ``start``/``stop`` or centre the stack on focus); a
            Moffat fit with R^2 below ``min_r2`` (use a flat, textured, well-exposed object
            and a finer step).
        """
        z = np.asarray(z_um, dtype=float)
        b = np.asarray(blur, dtype=float)
        if len(z) != len(b) or len(z) != len(spectra):
            raise CalibrationError(
                f"z ({len(z)}), blur ({len(b)}) and spectra ({len(spectra)}) lengths differ."
            )
        if len(z) < 7:
            raise CalibrationError(
                f"A calibration stack needs at least 7 frames, got {len(z)}; use num >= 21 over "
                "+/- 10 depths of field."
            )
        order = np.argsort(z)
        z, b = z[order], b[order]
        spectra = [spectra[i] for i in order]
        step = float(np.median(np.diff(z)))
        if step <= 0:
            raise CalibrationError(f"Stack positions are not distinct: {z.tolist()!r}.")
        if np.sum(np.isfinite(b)) < 5:
            raise CalibrationError(
                f"Only {int(np.sum(np.isfinite(b)))} of {len(b)} frames hold focus information "
                "(blank, dark or saturated): check the light path, exposure and that the object "
                "is in the field of view."
            )
        i_min = int(np.nanargmin(b))
        informative = np.flatnonzero(np.isfinite(b))
        if i_min in (informative[0], informative[-1]):
            raise CalibrationError(
                f"The blur minimum is at the end of the stack (z = {z[i_min]:.2f} um of "
                f"[{z[0]:.2f}, {z[-1]:.2f}]): focus is not inside the range. Start the "
                "calibration closer to focus or widen start/stop."
            )
        fin = np.flatnonzero(np.isfinite(b))
        from scipy.stats import spearmanr

        # near the minimum (far out the score may saturate on a small frame)
        near = fin[np.abs(z[fin] - z[i_min]) <= max(10 * step, 0.3 * (z[-1] - z[0]))]
        rho = (
            float(spearmanr(b[near], np.abs(z[near] - z[i_min])).statistic)
            if len(near) >= 5
            else float("nan")
        )
        if not rho >= 0.7:
            raise CalibrationError(
                f"The blur score does not grow away from its minimum (rank correlation "
                f"{rho:.2f} < 0.7): the stack holds no focus, or the object has no texture. "
                "Centre the stack on focus, widen start/stop to about +/-10 depths of field, "
                "and use a flat, textured, well-exposed object."
            )
        rise = min(b[fin[0]], b[fin[-1]]) - b[i_min]
        if rise < 0.7:
            raise CalibrationError(
                f"The stack shows no clear focus: the blur score rises only {rise:.2f} from its "
                "minimum to the ends of the stack (at least 0.7 is needed). Centre the stack on "
                "focus, widen start/stop to about +/-10 depths of field, and use a textured object."
            )
        logs = np.full((len(z), len(EDGES) - 1), np.nan)
        weights = np.zeros_like(logs)
        limits = np.array([sp.detection_limit() for sp in spectra])
        for j, sp in enumerate(spectra):
            logs[j], weights[j] = sp.log_signal()
        sharp = np.exp(-(b - np.nanmin(b)))
        params, r2 = fit_moffat(z, sharp)
        if not np.isfinite(r2) or r2 < min_r2:
            raise CalibrationError(
                f"The calibration curve is too irregular to trust (Moffat R^2 = {r2:.3f} < "
                f"{min_r2}). Use a flat, textured, well-exposed object filling the field, and a "
                "step of at most a quarter depth of field near focus."
            )
        if params["fwhm"] > 0.5 * (z[-1] - z[0]):
            raise CalibrationError(
                f"The blur dip is too wide for the stack (Moffat FWHM {params['fwhm']:.1f} um over a "
                f"{z[-1] - z[0]:.1f} um range): widen start/stop so the stack spans many depths "
                "of field on both sides of focus."
            )
        center_moffat = params["center"]
        center, sym_cost = _symmetric_center(z, logs, weights, center_moffat, step)
        method = "spectral-symmetry"
        if not np.isfinite(center) or abs(center - center_moffat) > max(2 * dof_um, 3 * step):
            center, method = center_moffat, "moffat"
        if not (z[0] + step <= center <= z[-1] - step):
            raise CalibrationError(
                f"The fitted focus z = {center:.2f} um lies at the edge of the stack "
                f"[{z[0]:.2f}, {z[-1]:.2f}] um; centre the calibration stack on focus."
            )
        params = dict(params, center=params["center"] - center)
        if not (np.isfinite(dof_um) and dof_um > 0):
            # unknown objective: the Moffat FWHM of the blur curve scales with the depth of
            # field (ratio 1.65 for the aberration-free presets of .optics)
            dof_um = 1.65 * params["fwhm"]
        return cls(
            z_um=z - center,
            blur=b,
            log_signal=logs,
            signal_weight=weights,
            detection_limit=limits,
            objective=str(objective),
            pixel_size_um=float(pixel_size_um),
            dof_um=float(dof_um),
            model_id=str(model_id),
            model_sha256=str(model_sha256),
            scorer=str(scorer),
            moffat_params=params,
            moffat_r2=float(r2),
            focus_um=float(center),
            center_method=method,
            quality={
                "moffat_r2": float(r2),
                "symmetry_rms": float(sym_cost),
                "moffat_vs_spectral_um": float(center_moffat - center),
                "n_frames": float(len(z)),
                "step_um": step,
                "informative_frames": float(np.sum(np.isfinite(b))),
            },
            uid=uid,
            metadata=dict(metadata or {}),
        )

    # ---------------------------------------------------------------- evaluation
    @property
    def fwhm_um(self) -> float:
        return float(self.moffat_params.get("fwhm", float("nan")))

    @property
    def z_range(self) -> tuple[float, float]:
        return float(self.z_um[0]), float(self.z_um[-1])

    @property
    def step_um(self) -> float:
        return float(np.median(np.diff(self.z_um)))

    def b_calib(self, z: ArrayLike, *, clamp: bool = False) -> NDArray[np.float64]:
        """Calibration blur score at defocus ``z`` (um from focus).

        Outside the informative part of the stack: NaN, or the end values with ``clamp``.
        """
        zq = np.atleast_1d(np.asarray(z, dtype=float))
        zs, bs, curve = self._blur_curve()
        inside = (zq >= zs[0]) & (zq <= zs[-1])
        out = np.full(zq.shape, np.nan)
        if curve is not None:
            out[inside] = curve(zq[inside])
        else:
            out[inside] = np.interp(zq[inside], zs, bs)
        if clamp:
            out[zq < zs[0]] = bs[0]
            out[zq > zs[-1]] = bs[-1]
        return out

    def _blur_curve(self) -> tuple[NDArray, NDArray, interpolate.PchipInterpolator | None]:
        """The finite (z, blur) points and their PCHIP interpolant (``None`` below 3
        points), built once per calibration (the search evaluates it at every update)."""
        cached = getattr(self, "_blur_cache", None)
        if cached is not None and cached[0] is self.blur and cached[1] is self.z_um:
            return cached[2]
        ok = np.isfinite(self.blur)
        zs, bs = self.z_um[ok], self.blur[ok]
        curve = interpolate.PchipInterpolator(zs, bs) if len(zs) >= 3 else None
        self._blur_cache = (self.blur, self.z_um, (zs, bs, curve))
        return zs, bs, curve

    def log_transfer(self, z: ArrayLike) -> NDArray[np.float64]:
        """Calibration ``log(P - N)`` spectra at defocus ``z`` (shape ``(len(z), K)``)."""
        zq = np.atleast_1d(np.asarray(z, dtype=float))
        return _interp_columns(zq, self.z_um, self.log_signal, 1.6 * self.step_um)

    def transfer_table(self, z: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
        """At defocus ``z``: ``log(P - N)`` (NaN where undetected), its weight, and an upper
        bound where undetected (:meth:`_bounds`); each ``(len(z), K)``.

        The stack is resampled once with shape-preserving cubic interpolation (PCHIP) along
        z per frequency bin, 8 points per calibration step, so the table is smooth near
        focus; beyond the stack's range the end frames are used.
        """
        zd, Td, Wd, Bd = self._dense()
        zq = np.clip(np.atleast_1d(np.asarray(z, dtype=float)), zd[0], zd[-1])
        pos = (zq - zd[0]) / (zd[1] - zd[0])
        j = np.clip(np.floor(pos).astype(int), 0, len(zd) - 2)
        t = (pos - j)[:, None]
        a, b = Td[j], Td[j + 1]
        val = np.where(
            np.isfinite(a) & np.isfinite(b), (1 - t) * a + t * b, np.where(t < 0.5, a, b)
        )
        w = np.where(np.isfinite(val), (1 - t) * Wd[j] + t * Wd[j + 1], 0.0)
        lim = (1 - t) * Bd[j] + t * Bd[j + 1]
        return val, w, lim

    def _dense(self) -> tuple[NDArray, NDArray, NDArray, NDArray]:
        cached = getattr(self, "_dense_cache", None)
        if cached is not None:
            return cached
        z = self.z_um
        zd = np.linspace(z[0], z[-1], 8 * (len(z) - 1) + 1)
        T = self.log_signal
        Td = np.full((len(zd), T.shape[1]), np.nan)
        for k in range(T.shape[1]):
            ok = np.isfinite(T[:, k])
            # contiguous runs of detected frames, each interpolated on its own span
            edges = np.flatnonzero(np.diff(np.r_[0, ok.astype(int), 0]))
            for s, e in zip(edges[::2], edges[1::2], strict=True):
                zs, ts = z[s:e], T[s:e, k]
                sel = (zd >= zs[0] - 1e-12) & (zd <= zs[-1] + 1e-12)
                if len(zs) >= 3:
                    Td[sel, k] = interpolate.PchipInterpolator(zs, ts)(zd[sel])
                elif len(zs) == 2:
                    Td[sel, k] = np.interp(zd[sel], zs, ts)
                else:
                    Td[np.abs(zd - zs[0]) <= (zd[1] - zd[0]) / 2, k] = ts[0]
        Wd = np.stack(
            [np.interp(zd, z, self.signal_weight[:, k]) for k in range(T.shape[1])], axis=1
        )
        B = self._bounds()
        Bd = np.stack([np.interp(zd, z, B[:, k]) for k in range(T.shape[1])], axis=1)
        Bd = np.where(np.isfinite(Td), Td, Bd)
        self._dense_cache = (zd, Td, Wd, Bd)
        return self._dense_cache

    def _bounds(self) -> NDArray[np.float64]:
        """Upper bounds of ``log(P - N)`` where the stack did not detect a bin.

        The frame's detection limit, tightened by the decay of any defocus transfer
        function's envelope beyond the last detected defocus: at least ``r^-3`` in power
        for a blur radius ``r`` (the geometric defocus OTF falls as ``(k r)^-3/2`` in
        amplitude; a Gaussian blur falls faster), with ``r(z)`` from the Moffat fit.
        """
        cached = getattr(self, "_bounds_cache", None)
        if cached is not None:
            return cached
        z, T = self.z_um, self.log_signal
        lim = np.repeat(self.detection_limit[:, None], T.shape[1], axis=1)
        alpha = float(self.moffat_params.get("alpha", np.nan))
        if np.isfinite(alpha) and alpha > 0:
            r2 = alpha * alpha + z * z
            centre = int(np.argmin(np.abs(z)))
            for k in range(T.shape[1]):
                for rng_ in (range(centre, len(z)), range(centre, -1, -1)):
                    last = None
                    for j in rng_:
                        if np.isfinite(T[j, k]):
                            last = j
                        elif last is not None:
                            env = T[last, k] - 1.5 * np.log(r2[j] / r2[last])
                            lim[j, k] = min(lim[j, k], env)
        lim = np.where(np.isfinite(T), T, lim)
        self._bounds_cache = lim
        return lim

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        def arr(a: NDArray) -> list:
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]

        return {
            "format": FORMAT,
            "z_um": arr(self.z_um),
            "blur": arr(self.blur),
            "log_signal": arr(self.log_signal),
            "signal_weight": arr(self.signal_weight),
            "detection_limit": arr(self.detection_limit),
            "shape": list(self.log_signal.shape),
            "edges": arr(EDGES),
            "objective": self.objective,
            "pixel_size_um": self.pixel_size_um,
            "dof_um": self.dof_um,
            "model_id": self.model_id,
            "model_sha256": self.model_sha256,
            "scorer": self.scorer,
            "moffat_params": self.moffat_params,
            "moffat_r2": self.moffat_r2,
            "focus_um": self.focus_um,
            "center_method": self.center_method,
            "quality": self.quality,
            "uid": self.uid,
            "created": self.created,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Rebuild from :meth:`to_dict` output; refuses anything malformed.

        Raises
        ------
        CalibrationError
            Not a JSON object, another format, missing or mistyped fields, inconsistent
            lengths, a z axis that is not finite and increasing, fewer than 5 finite blur
            values, or a depth of field / Moffat FWHM that is not a finite positive number.
        """
        if not isinstance(d, Mapping):
            raise CalibrationError(
                f"Not a calibration: the data is a JSON {_json_type(d)}, not an object with "
                f"format {FORMAT!r}; load a file written by Calibration.save() or recalibrate."
            )
        try:
            if d.get("format") != FORMAT:
                raise CalibrationError(
                    f"Not a calibration (format {d.get('format')!r}, expected {FORMAT!r})."
                )
            shape = tuple(int(v) for v in d["shape"])

            def arr(v: Any, shp: tuple[int, ...] | None = None) -> NDArray[np.float64]:
                a = np.array([np.nan if x is None else float(x) for x in v], dtype=float)
                return a.reshape(shp) if shp else a

            edges = arr(d["edges"])
            if len(edges) != len(EDGES) or not np.allclose(edges, EDGES):
                raise CalibrationError(
                    "The calibration was made with other spectral bins than this version uses; "
                    "recalibrate."
                )
            z = arr(d["z_um"])
            cal = cls(
                z_um=z,
                blur=arr(d["blur"]),
                log_signal=arr(d["log_signal"], shape),
                signal_weight=arr(d["signal_weight"], shape),
                detection_limit=arr(d["detection_limit"]),
                objective=str(d["objective"]),
                pixel_size_um=float(d["pixel_size_um"]),
                dof_um=float(d["dof_um"]),
                model_id=str(d["model_id"]),
                model_sha256=str(d.get("model_sha256", "")),
                scorer=str(d.get("scorer", "deepfocus")),
                moffat_params={k: float(v) for k, v in dict(d.get("moffat_params", {})).items()},
                moffat_r2=float(d.get("moffat_r2", float("nan"))),
                focus_um=float(d.get("focus_um", float("nan"))),
                center_method=str(d.get("center_method", "")),
                quality={k: float(v) for k, v in dict(d.get("quality", {})).items()},
                uid=d.get("uid"),
                created=float(d.get("created", 0.0)),
                metadata=dict(d.get("metadata", {})),
            )
        except CalibrationError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"Calibration data is corrupted or truncated ({type(exc).__name__}: {exc}); "
                "recalibrate or load another calibration."
            ) from exc
        if len(cal.z_um) != len(cal.blur) or cal.log_signal.shape[0] != len(cal.z_um):
            raise CalibrationError("Calibration arrays have inconsistent lengths; recalibrate.")
        if len(cal.z_um) < 2 or np.any(np.diff(cal.z_um) <= 0):
            raise CalibrationError("Calibration z axis is not increasing; recalibrate.")
        bad_z = int(np.count_nonzero(~np.isfinite(cal.z_um)))
        if bad_z:
            raise CalibrationError(
                f"Calibration field 'z_um' holds {bad_z} NaN/inf position(s) of "
                f"{len(cal.z_um)}; the positions must be finite. The data is corrupted; "
                "recalibrate."
            )
        n_blur = int(np.count_nonzero(np.isfinite(cal.blur)))
        if n_blur < 5:
            raise CalibrationError(
                f"Calibration field 'blur' holds only {n_blur} finite value(s) of "
                f"{len(cal.blur)} (the rest NaN/null/inf); at least 5 are needed for the "
                "calibration curve. The data is corrupted or the stack was blank; recalibrate."
            )
        if np.any(np.isinf(cal.blur)) or np.any(np.isinf(cal.log_signal)):
            field_name = "blur" if np.any(np.isinf(cal.blur)) else "log_signal"
            raise CalibrationError(
                f"Calibration field {field_name!r} holds infinite values; it must be finite "
                "(or null where a frame held no information). Recalibrate."
            )
        for name, value in (("dof_um", cal.dof_um), ("moffat_params['fwhm']", cal.fwhm_um)):
            if not (math.isfinite(value) and value > 0):
                raise CalibrationError(
                    f"Calibration field {name} = {value!r} must be a finite positive number "
                    "of um (not NaN, inf or <= 0); the data is corrupted. Recalibrate."
                )
        return cal

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict()))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise CalibrationError(
                f"Calibration file {str(p)!r} does not exist; run calibration_plan first."
            ) from None
        except (OSError, ValueError) as exc:
            raise CalibrationError(
                f"Calibration file {str(p)!r} is not valid JSON ({exc}); it is corrupted or "
                "truncated. Recalibrate."
            ) from exc
        return cls.from_dict(d)

    @classmethod
    def from_run(cls, run: Any) -> Calibration:
        """Rebuild the calibration stored by ``calibration_plan`` in a catalog run.

        Reads the one event of stream ``calibration_result`` (data key
        ``calibration_calibration``, as ``calibration_plan`` writes it, or ``calibration``).

        Raises
        ------
        CalibrationError
            The run has no such stream, the stream is empty or holds no calibration, or
            the stored calibration is not valid JSON or is refused by :meth:`from_dict`.
        """
        from .schema import CALIBRATION_STREAM

        uid = _run_uid(run)
        try:
            stream = run[CALIBRATION_STREAM]
        except KeyError:
            raise CalibrationError(
                f"Run {uid!r} has no {CALIBRATION_STREAM!r} stream: it is not a calibration run."
            ) from None
        try:
            data = stream.read() if hasattr(stream, "read") else stream
            key = _calibration_key(data)
        except CalibrationError:
            raise
        except Exception as exc:  # a stream the catalog cannot read back
            raise CalibrationError(
                f"The {CALIBRATION_STREAM!r} stream of run {uid!r} could not be read "
                f"({type(exc).__name__}: {exc})."
            ) from exc
        if key is None:
            raise CalibrationError(
                f"The {CALIBRATION_STREAM!r} stream of run {uid!r} holds no calibration "
                f"(data keys {_keys(data)!r}; expected 'calibration' or one ending in "
                "'_calibration'): it was not written by calibration_plan."
            )
        raw = data[key]
        if isinstance(raw, str | bytes):
            value: Any = raw
        else:
            try:
                n = len(raw)
            except TypeError:
                n = 1
                value = raw
            else:
                if n == 0:
                    raise CalibrationError(
                        f"The {CALIBRATION_STREAM!r} stream of run {uid!r} is empty: the "
                        "calibration run stopped before storing its result. Recalibrate."
                    )
                value = raw[n - 1]  # the last (only) event
        if hasattr(value, "item"):  # a numpy / xarray scalar
            value = value.item()
        return cls._from_json(value)

    @classmethod
    def _from_json(cls, value: Any) -> Calibration:
        try:
            d = json.loads(value)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"Stored calibration is not valid JSON ({exc}).") from exc
        return cls.from_dict(d)

    @classmethod
    def from_documents(cls, documents: Any) -> Calibration:
        """Rebuild from a calibration run's ``(name, doc)`` pairs (no catalog needed)."""
        from .schema import CALIBRATION_STREAM

        desc = None
        for name, doc in documents:
            if name == "descriptor" and doc.get("name") == CALIBRATION_STREAM:
                desc = doc["uid"]
            elif name == "event" and desc is not None and doc.get("descriptor") == desc:
                key = _calibration_key(doc.get("data", {}))
                if key is None:
                    raise CalibrationError(
                        f"The {CALIBRATION_STREAM!r} event holds no calibration (data keys "
                        f"{_keys(doc.get('data', {}))!r}; expected 'calibration' or one "
                        "ending in '_calibration')."
                    )
                return cls._from_json(doc["data"][key])
        raise CalibrationError(
            f"No {CALIBRATION_STREAM!r} event in these documents: not a calibration run."
        )

    def summary(self) -> str:
        return (
            f"Calibration {self.objective} ({self.pixel_size_um:.3f} um/px): focus at stage "
            f"{self.focus_um:.2f} um ({self.center_method}), FWHM {self.fwhm_um:.2f} um, "
            f"Moffat R^2 {self.moffat_r2:.3f}, {len(self.z_um)} frames, model {self.model_id}"
        )


def _json_type(value: Any) -> str:
    """JSON's name for the type of a decoded value (for messages)."""
    if value is None:
        return "null"
    for types, name in (
        (bool, "boolean"),
        (str, "string"),
        (int | float, "number"),
        (list | tuple, "array"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _run_uid(run: Any) -> str:
    md = getattr(run, "metadata", None) or {}
    start = md.get("start", {}) if isinstance(md, Mapping) else {}
    return str(start.get("uid", "?")) if isinstance(start, Mapping) else "?"


def _keys(data: Any) -> list[str]:
    try:
        return [str(k) for k in data]
    except TypeError:
        return []


def _calibration_key(data: Any) -> str | None:
    """The data key holding the calibration JSON in a calibration stream / event.

    ``calibration_plan`` records it as component ``calibration`` of the ophyd device
    ``calibration``, i.e. data key ``calibration_calibration``; a bare ``calibration``
    (older writers, hand-made runs) is accepted too.
    """
    keys = _keys(data)
    if "calibration" in keys:
        return "calibration"
    found = [k for k in keys if k.endswith("_calibration")]
    return found[0] if found else None


def _symmetric_center(
    z: NDArray[np.float64],
    logs: NDArray[np.float64],
    weights: NDArray[np.float64],
    guess: float,
    step: float,
) -> tuple[float, float]:
    """Position about which the stack's log spectra are most symmetric (weighted RMS)."""
    span = min(guess - z[0], z[-1] - guess)
    if span < 2 * step:
        return float("nan"), float("nan")
    u = np.arange(step, span, step / 2)

    def cost(c: float) -> float:
        a = _interp_columns(c + u, z, logs, 1.6 * step)
        b = _interp_columns(c - u, z, logs, 1.6 * step)
        wa = _interp_columns(c + u, z, weights, 1.6 * step)
        wb = _interp_columns(c - u, z, weights, 1.6 * step)
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 10:
            return float("inf")
        w = (1.0 / (1.0 / np.maximum(wa, 1e-9) + 1.0 / np.maximum(wb, 1e-9) + 0.01))[ok]
        return float(np.sqrt(np.sum(w * (a - b)[ok] ** 2) / np.sum(w)))

    grid = guess + np.arange(-3 * step, 3 * step + 1e-9, step / 4)
    costs = np.array([cost(c) for c in grid])
    if not np.any(np.isfinite(costs)):
        return float("nan"), float("nan")
    c0 = float(grid[int(np.nanargmin(costs))])

    def finite_cost(c: float) -> float:  # inf - inf in Brent's steps would give NaN
        v = cost(c)
        return v if math.isfinite(v) else 1e12

    res = optimize.minimize_scalar(
        finite_cost,
        bounds=(c0 - step / 4, c0 + step / 4),
        method="bounded",
        options={"xatol": step / 200},
    )
    return float(res.x), (float(res.fun) if res.fun < 1e12 else float("inf"))
