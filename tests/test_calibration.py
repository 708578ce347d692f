"""Calibration fitting, refusals with actionable messages, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bluesky_deepfocus.calibration import Calibration, fit_moffat, moffat
from bluesky_deepfocus.errors import CalibrationError

from . import _synthetic as syn


def stack(z, *, shift=0.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    b = [syn.blur_score(v - shift) + rng.normal(0, noise) for v in z]
    s = [syn.spectrum(v - shift, slope=1.5) for v in z]
    return b, s


def fit(z, b, s, **kw):
    return Calibration.from_stack(
        z, b, s, objective="synthetic", pixel_size_um=0.65, dof_um=syn.DOF, model_id="m", **kw
    )


def test_moffat_fit_recovers_parameters():
    z = np.linspace(-50, 50, 101)
    y = moffat(z, 2.0, 3.0, 4.0, 0.5, 0.1)
    p, r2 = fit_moffat(z, y)
    assert r2 > 0.9999
    assert p["center"] == pytest.approx(3.0, abs=1e-3)
    assert p["fwhm"] == pytest.approx(2 * 4.0 * np.sqrt(2**2 - 1), rel=1e-3)


def test_calibration_centres_on_focus_and_fits_moffat():
    z = np.linspace(-150, 150, 121) + 7.3  # stage positions around a focus at 7.3 um
    b, s = stack(z, shift=7.3)
    cal = fit(z, b, s)
    assert cal.focus_um == pytest.approx(7.3, abs=0.05)
    assert cal.center_method == "spectral-symmetry"
    assert cal.moffat_r2 > 0.99
    # for r = sqrt(r0^2 + (a z)^2), 1/r is a Moffat with beta 1/2 and alpha = r0 / a
    assert cal.moffat_params["beta"] == pytest.approx(0.5, rel=0.05)
    assert cal.fwhm_um == pytest.approx(2 * np.sqrt(3) * syn.R0 / syn.A, rel=0.05)
    assert np.nanargmin(cal.b_calib(cal.z_um)) == np.argmin(np.abs(cal.z_um))


def test_b_calib_is_the_pchip_of_the_finite_points_and_follows_a_replaced_curve():
    from scipy.interpolate import PchipInterpolator

    z = np.linspace(-150, 150, 61)
    b, s = stack(z, noise=0.01)
    cal = fit(z, b, s)
    zq = np.array([-200.0, -140.0, -3.3, 0.0, 12.5, 140.0, 200.0])
    ok = np.isfinite(cal.blur)
    want = PchipInterpolator(cal.z_um[ok], cal.blur[ok])(zq[1:-1])
    got = cal.b_calib(zq)
    assert np.isnan(got[0]) and np.isnan(got[-1])  # beyond the stack: no value
    np.testing.assert_array_equal(got[1:-1], want)
    np.testing.assert_array_equal(cal.b_calib(zq), got)  # the kept interpolant: same values
    np.testing.assert_array_equal(cal.b_calib(zq, clamp=True)[[0, -1]], cal.blur[ok][[0, -1]])
    # a new blur array (not an in-place edit) is picked up, not the kept curve
    cal.blur = cal.blur + 1.0
    np.testing.assert_allclose(cal.b_calib(zq)[1:-1], want + 1.0)


def test_minimum_at_the_end_of_the_stack_is_refused():
    z = np.linspace(0, 100, 41)
    b, s = stack(z, shift=-20.0)
    with pytest.raises(
        CalibrationError, match="minimum is at the end of the stack.*closer to focus or widen"
    ):
        fit(z, b, s)


def test_irregular_curve_is_refused():
    z = np.linspace(-100, 100, 41)
    rng = np.random.default_rng(1)
    b = list(rng.uniform(0, 3, len(z)))
    b[20] = -1.0
    s = [syn.spectrum(0.0) for _ in z]
    with pytest.raises(
        CalibrationError, match="(too irregular to trust|does not grow).*textured, well-exposed"
    ):
        fit(z, b, s)


def test_stack_without_focus_is_refused():
    z = np.linspace(-50, 50, 41)
    b, s = stack(z, shift=400.0)  # every frame far out of focus: a nearly flat curve
    b = [v + 0.01 * np.sin(i) for i, v in enumerate(b)]
    b[20] -= 0.05
    with pytest.raises(CalibrationError, match="(no clear focus|end of the stack|does not grow)"):
        fit(z, b, s)


def test_too_few_frames_and_blank_stack_are_refused():
    z = np.linspace(-10, 10, 5)
    b, s = stack(z)
    with pytest.raises(CalibrationError, match="at least 7 frames"):
        fit(z, b, s)
    z = np.linspace(-100, 100, 21)
    _, s = stack(z)
    with pytest.raises(CalibrationError, match="hold focus information.*exposure"):
        fit(z, [float("nan")] * len(z), s)


def test_roundtrip_json(tmp_path):
    z = np.linspace(-150, 150, 61)
    b, s = stack(z, noise=0.01)
    cal = fit(z, b, s, uid="abc")
    path = cal.save(tmp_path / "cal.json")
    back = Calibration.load(path)
    assert back.uid == "abc"
    np.testing.assert_allclose(back.z_um, cal.z_um)
    np.testing.assert_allclose(back.log_signal, cal.log_signal, equal_nan=True)
    zq = np.linspace(-20, 20, 9)
    np.testing.assert_allclose(back.b_calib(zq), cal.b_calib(zq))
    t1, _, _ = cal.transfer_table(zq)
    t2, _, _ = back.transfer_table(zq)
    np.testing.assert_allclose(t1, t2, equal_nan=True)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("z_um"), "corrupted or truncated"),
        (lambda d: d.update(format="something-else"), "Not a calibration"),
        (lambda d: d.update(z_um=d["z_um"][::-1]), "not increasing"),
        (lambda d: d.update(edges=d["edges"][:-1]), "other spectral bins"),
        (lambda d: d.update(blur=d["blur"][:3]), "inconsistent lengths"),
    ],
)
def test_corrupted_calibration_data_is_refused(tmp_path, mutate, match):
    z = np.linspace(-150, 150, 31)
    b, s = stack(z)
    d = fit(z, b, s).to_dict()
    mutate(d)
    with pytest.raises(CalibrationError, match=match):
        Calibration.from_dict(d)


def test_truncated_or_missing_file_is_refused(tmp_path):
    z = np.linspace(-150, 150, 31)
    b, s = stack(z)
    text = json.dumps(fit(z, b, s).to_dict())
    p = tmp_path / "cal.json"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(CalibrationError, match="not valid JSON.*Recalibrate"):
        Calibration.load(p)
    with pytest.raises(CalibrationError, match="does not exist; run calibration_plan"):
        Calibration.load(tmp_path / "nope.json")


@pytest.fixture(scope="module")
def calibration_run():
    """calibration_plan through a RunEngine on a small simulated microscope: the returned
    calibration and every document the run emitted."""
    import asyncio

    from bluesky import RunEngine

    from bluesky_deepfocus import DeepFocusScorer
    from bluesky_deepfocus.devices import MMCamera, MMFocusStage
    from bluesky_deepfocus.plans import calibration_plan
    from bluesky_deepfocus.sim import simulated_microscope

    core = simulated_microscope(
        specimen="tissue", sensor_shape=(256, 256), seed=3, slide_size_um=600.0
    )
    camera = MMCamera(core, name="camera")
    focus = MMFocusStage(core, name="focus", limits=(-1000.0, 1000.0))
    loop = asyncio.new_event_loop()
    re = RunEngine({}, call_returns_result=True, loop=loop)
    docs: list[tuple[str, dict]] = []
    re.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        cal = re(
            calibration_plan(camera, focus, -150, 150, 61, scorer=DeepFocusScorer())
        ).plan_result
    finally:
        loop.call_soon_threadsafe(loop.stop)
        re._th.join()
        loop.close()
    return cal, docs


def _assert_same(back: Calibration, cal: Calibration) -> None:
    assert back.uid == cal.uid
    np.testing.assert_allclose(back.z_um, cal.z_um)
    np.testing.assert_allclose(back.blur, cal.blur, equal_nan=True)
    np.testing.assert_allclose(back.log_signal, cal.log_signal, equal_nan=True)
    assert back.fwhm_um == pytest.approx(cal.fwhm_um)
    assert back.dof_um == pytest.approx(cal.dof_um)


class _Stream:
    """A catalog stream as ``Calibration.from_run`` reads it: ``read()`` -> columns."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def read(self) -> dict[str, list]:
        return self.columns


def test_calibration_plan_documents_rebuild_the_calibration(calibration_run):
    """The stored data key is the one calibration_plan really writes (ophyd device
    ``calibration``, component ``calibration``: ``calibration_calibration``), and both
    from_documents and from_run read it."""
    from bluesky_deepfocus.schema import CALIBRATION_STREAM

    cal, docs = calibration_run
    desc = next(d for n, d in docs if n == "descriptor" and d["name"] == CALIBRATION_STREAM)
    assert "calibration_calibration" in desc["data_keys"]
    _assert_same(Calibration.from_documents(docs), cal)

    events = [d for n, d in docs if n == "event" and d["descriptor"] == desc["uid"]]
    columns = {k: [e["data"][k] for e in events] for k in desc["data_keys"]}
    run = {CALIBRATION_STREAM: _Stream(columns)}
    _assert_same(Calibration.from_run(run), cal)
    # the bare key of older writers / hand-made runs is accepted as well
    old = {CALIBRATION_STREAM: _Stream({"calibration": columns["calibration_calibration"]})}
    _assert_same(Calibration.from_run(old), cal)


def test_calibration_run_in_a_catalog_rebuilds_the_calibration(calibration_run, tmp_path):
    """The same documents stored in an embedded catalog and read back with from_run."""
    from bluesky_deepfocus.storage import CatalogWriter, close_catalog, open_catalog

    cal, docs = calibration_run
    catalog = open_catalog(tmp_path / "catalog")
    try:
        writer = CatalogWriter(catalog, fsync=False, background=False)
        for name, doc in docs:
            writer(name, doc)
        _assert_same(Calibration.from_run(catalog[cal.uid]), cal)
    finally:
        close_catalog(catalog)


def test_documents_without_a_calibration_are_refused(calibration_run):
    from bluesky_deepfocus.schema import CALIBRATION_STREAM

    _, docs = calibration_run
    stripped = [
        (n, {**d, "data": {k: v for k, v in d["data"].items() if not k.endswith("calibration")}})
        if n == "event"
        else (n, d)
        for n, d in docs
    ]
    with pytest.raises(CalibrationError, match="holds no calibration"):
        Calibration.from_documents(stripped)
    without = [
        (n, d) for n, d in docs if not (n == "descriptor" and d["name"] == CALIBRATION_STREAM)
    ]
    with pytest.raises(CalibrationError, match="not a calibration run"):
        Calibration.from_documents(without)
