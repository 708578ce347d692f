"""Hostile input: arbitrary calibrations, scores, bounds and priors for the search;
corrupted weights, calibration files and catalog entries; malformed images.

Every bad input ends in a clear error of the package (the message says what is wrong)
or in "no focus information" (NaN score, confidence 0) -- never in a made-up number, a
position outside the bounds, or an unbounded search.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bluesky_deepfocus import DeepFocusScorer
from bluesky_deepfocus.calibration import Calibration
from bluesky_deepfocus.errors import CalibrationError, ImageError, WeightsError
from bluesky_deepfocus.metrics import Tenengrad
from bluesky_deepfocus.model import default_weights_path, file_sha256, load_model
from bluesky_deepfocus.search import (
    BrentSearch,
    DeepFocusSearch,
    Observation,
    PaperSearch,
)

from . import _synthetic as syn

PROPERTY = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def cal() -> Calibration:
    return syn.calibration()


# ======================================================================================
# 1. the search: arbitrary calibrations, observations, bounds and warm starts
# ======================================================================================
def _random_calibration(rng: np.random.Generator) -> Calibration | None:
    """A monotone-ish V curve with noise, bumps, NaN frames and another specimen slope;
    ``None`` when ``from_stack`` refuses it (that is allowed, only with CalibrationError)."""
    n = int(rng.integers(9, 41))
    half = float(rng.uniform(20, 200))
    centre = float(rng.uniform(-0.3, 0.3) * half)
    z = np.sort(rng.uniform(-half, half, n)) if rng.random() < 0.3 else np.linspace(-half, half, n)
    a = float(rng.uniform(0.05, 2.0))
    b = np.log(np.sqrt(1.0 + (a * (z - centre)) ** 2)) + rng.normal(0, rng.uniform(0, 0.3), n)
    if rng.random() < 0.3:  # a bump somewhere (dust, a bubble)
        b += rng.uniform(0, 1) * np.exp(-(((z - rng.uniform(-half, half)) / 10.0) ** 2))
    b[rng.random(n) < rng.uniform(0, 0.2)] = np.nan  # uninformative frames
    slope = float(rng.uniform(0.5, 3.5))
    spectra = [syn.spectrum(float(v - centre), slope=slope, rng=rng) for v in z]
    try:
        return Calibration.from_stack(
            z,
            b,
            spectra,
            objective="random",
            pixel_size_um=0.65,
            dof_um=float("nan") if rng.random() < 0.5 else float(rng.uniform(1, 30)),
            model_id="hypothesis",
        )
    except CalibrationError:
        return None


def _adversarial_observation(z: float, rng: np.random.Generator, focus: float) -> Observation:
    kind = rng.random()
    if kind < 0.2:
        return Observation(z=z)  # blank field
    if kind < 0.5:  # plausible but noisy
        obs = syn.observe(z, focus, rng=rng, blur_noise=float(rng.uniform(0, 0.5)))
        obs.sharpness = -abs(z - focus) + float(rng.normal(0, 1))
        return obs
    b = float(rng.choice([rng.normal(1, 3), np.nan, np.inf, -np.inf, 1e9, -1e9, 0.0]))
    spec = syn.spectrum(float(rng.uniform(-300, 300)), slope=float(rng.uniform(0, 4)), rng=rng)
    if rng.random() < 0.2:
        spec.power[:] = rng.choice([np.nan, np.inf, 0.0, -1.0])
    return Observation(
        z=z,
        blur=b,
        spectrum=spec if rng.random() < 0.7 else None,
        sharpness=float(rng.choice([b, np.nan, -np.inf, rng.normal()])),
        blur_map=np.full((2, 2), b) if rng.random() < 0.5 else None,
    )


def _plan_bounds(stage: tuple[float, float], z0: float, max_travel: float) -> tuple[float, float]:
    """What autofocus_plan passes to the search: stage limits and start +/- max_travel."""
    return max(stage[0], z0 - max_travel), min(stage[1], z0 + max_travel)


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    strategy=st.sampled_from(["deepfocus", "paper", "brent"]),
    stage_lo=st.floats(-500, 0),
    stage_width=st.floats(1, 800),
    start_frac=st.floats(0, 1),
    max_travel=st.floats(0.5, 300),
    max_images=st.integers(1, 9),
    warm=st.booleans(),
)
def test_search_never_leaves_the_bounds_for_arbitrary_calibrations(
    seed, strategy, stage_lo, stage_width, start_frac, max_travel, max_images, warm
):
    """For random calibration curves, stage limits, max_travel, budgets, priors and
    adversarial observations, no strategy proposes a position outside the stage limits
    or farther than max_travel from the start, and every one stops within max_images."""
    rng = np.random.default_rng(seed)
    calibration = _random_calibration(rng)
    assume(calibration is not None or strategy == "brent")
    stage = (stage_lo, stage_lo + stage_width)
    z0 = stage[0] + start_frac * stage_width
    lo, hi = _plan_bounds(stage, z0, max_travel)
    min_images = int(rng.integers(1, max_images + 1))
    kw = {"start": z0, "lo": lo, "hi": hi, "min_images": min_images, "max_images": max_images}
    if strategy == "deepfocus":
        prior = (float(z0 + rng.normal(0, 30)), float(rng.uniform(0.5, 50))) if warm else None
        search = DeepFocusSearch(calibration, prior=prior, **kw)  # type: ignore[arg-type]
    elif strategy == "paper":
        search = PaperSearch(calibration, **kw)  # type: ignore[arg-type]
    else:
        search = BrentSearch(**kw)
    focus = float(rng.uniform(stage[0] - 100, stage[1] + 100))
    asked = 0
    while (z := search.ask()) is not None:
        asked += 1
        assert asked <= max_images
        assert math.isfinite(z)
        assert lo - 1e-9 <= z <= hi + 1e-9
        assert stage[0] - 1e-9 <= z <= stage[1] + 1e-9
        assert abs(z - z0) <= max_travel + 1e-9
        search.tell(_adversarial_observation(z, rng, focus))
    res = search.result()
    assert res.images == asked <= max_images
    assert 0.0 <= res.confidence <= 1.0
    if res.converged:  # the plan moves only to a converged, finite estimate in bounds
        assert math.isfinite(res.z_focus) and lo - 1e-9 <= res.z_focus <= hi + 1e-9


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    prior_offset=st.floats(-400, 400),
    prior_sd=st.floats(0.5, 500),
    truth=st.floats(-200, 200),
    max_travel=st.floats(1, 150),
)
def test_warm_start_from_anywhere_stays_in_bounds(
    cal, seed, prior_offset, prior_sd, truth, max_travel
):
    """A warm start whose prior sits anywhere (also outside the reachable range) never
    pulls a proposal or a converged estimate beyond start +/- max_travel."""
    rng = np.random.default_rng(seed)
    lo, hi = -max_travel, max_travel
    s = DeepFocusSearch(
        cal, start=0.0, lo=lo, hi=hi, min_images=2, max_images=3, prior=(prior_offset, prior_sd)
    )
    n = 0
    while (z := s.ask()) is not None:
        n += 1
        assert lo - 1e-9 <= z <= hi + 1e-9 and n <= 3
        s.tell(syn.observe(z, truth, rng=rng, blur_noise=0.05))
    res = s.result()
    if res.converged:
        assert lo - 1e-9 <= res.z_focus <= hi + 1e-9


@pytest.mark.parametrize(
    "prior",
    [(math.nan, 1.0), (0.0, math.nan), (math.inf, 1.0), (0.0, 0.0), (0.0, -1.0)],
    ids=["nan-z", "nan-sd", "inf-z", "zero-sd", "negative-sd"],
)
def test_invalid_prior_is_refused_with_a_clear_message(cal, prior):
    with pytest.raises(ValueError, match=r"prior=.*finite.*sd > 0"):
        DeepFocusSearch(cal, start=0.0, lo=-50, hi=50, prior=prior)


@pytest.mark.parametrize(
    "prior_sd, truth",
    [(1e-6, 5.0), (0.5, 10.0), (2.8, 30.0)],
    ids=["sd-1e-6-jump-5um", "sd-0.5-jump-10um", "sd-DOF/4-jump-30um"],
)
def test_a_tight_prior_never_yields_a_confident_wrong_focus(cal, prior_sd, truth):
    """Timelapse warm start with a focus jump (a bumped stage, drift faster than assumed):
    the images say focus moved; the result must follow them or not claim convergence."""
    s = DeepFocusSearch(
        cal, start=0.0, lo=-150, hi=150, min_images=2, max_images=3, prior=(0.0, prior_sd)
    )
    while (z := s.ask()) is not None:
        s.tell(syn.observe(z, truth))
    res = s.result()
    assert not res.converged or abs(res.z_focus - truth) < 1.0, res


def test_a_prior_wider_than_the_jump_follows_the_images(cal):
    s = DeepFocusSearch(cal, start=0.0, lo=-150, hi=150, min_images=2, max_images=3, prior=(0, 5))
    while (z := s.ask()) is not None:
        s.tell(syn.observe(z, 30.0))
    res = s.result()
    assert res.converged and abs(res.z_focus - 30.0) < 1.0


# ======================================================================================
# 2. weights files
# ======================================================================================
@pytest.fixture
def weights_copy(tmp_path) -> Path:
    src = default_weights_path()
    dst = tmp_path / "weights"
    dst.mkdir()
    shutil.copy(src, dst / src.name)
    shutil.copy(src.with_suffix(".json"), dst / src.with_suffix(".json").name)
    return dst / src.name


def _set_card(path: Path, **changes) -> None:
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _edit_card_hash(p: Path) -> None:
    _set_card(p, sha256="0" * 64)


def _drop_card_hash(p: Path) -> None:
    card_path = p.with_suffix(".json")
    card = json.loads(card_path.read_text())
    del card["sha256"]
    card_path.write_text(json.dumps(card))


def _delete_card(p: Path) -> None:
    p.with_suffix(".json").unlink()


def _truncate_card(p: Path) -> None:
    text = p.with_suffix(".json").read_text()
    p.with_suffix(".json").write_text(text[: len(text) // 2])


def _delete_weights(p: Path) -> None:
    p.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, r"have SHA-256 [0-9a-f]{16}\.\.\., but the model card records"),
        (_flip_byte, r"have SHA-256 .* the file is corrupted or was replaced"),
        (_edit_card_hash, r"model card records '0000000000000000'"),
        (_drop_card_hash, r"model card records 'None'"),
        (_delete_card, r"Model card .*deepfocus\.json' is missing or not valid JSON"),
        (_truncate_card, r"Model card .* is missing or not valid JSON"),
        (_delete_weights, r"Model weights .*deepfocus\.pt' do not exist"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "",
)
def test_damaged_weights_are_refused(weights_copy, damage, message):
    damage(weights_copy)
    with pytest.raises(WeightsError, match=message):
        load_model(weights_copy)
    with pytest.raises(WeightsError, match=message):
        DeepFocusScorer(weights=weights_copy)


def test_truncated_weights_are_refused_even_without_the_hash_check(weights_copy):
    _truncate(weights_copy)
    with pytest.raises(WeightsError, match=r"could not be loaded \(RuntimeError: .*zip"):
        load_model(weights_copy, check_hash=False)


def _rehash(p: Path) -> None:
    _set_card(p, sha256=file_sha256(p))


class _Exploit:
    """A pickle that would run a command when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo exploited > exploited.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_malicious_pickle_with_a_matching_hash_is_not_executed(weights_copy, tmp_path):
    weights_copy.write_bytes(pickle.dumps(_Exploit()))
    _rehash(weights_copy)  # an attacker who can write the folder can also fix the card
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(WeightsError, match=r"could not be loaded \(UnpicklingError"):
            load_model(weights_copy)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "exploited.txt").exists()


@pytest.mark.parametrize(
    "blob, message",
    [
        ({"config": {"width": 8}, "state_dict": {"x": torch.zeros(3)}}, r"Missing key\(s\)"),
        ({"config": {"bogus": 1}, "state_dict": {}}, r"unexpected keyword argument 'bogus'"),
        ({"state_dict": {}}, r"KeyError: 'config'"),
    ],
    ids=["wrong-network", "wrong-config", "no-config"],
)
def test_well_formed_files_of_the_wrong_model_are_refused(weights_copy, blob, message):
    torch.save(blob, weights_copy)
    _rehash(weights_copy)
    with pytest.raises(WeightsError, match=r"(?s)could not be loaded .*" + message):
        load_model(weights_copy)


def test_a_card_that_is_not_a_json_object_is_refused(weights_copy):
    weights_copy.with_suffix(".json").write_text("[1, 2, 3]")
    with pytest.raises(WeightsError, match="Model card"):
        load_model(weights_copy)


def test_nan_weights_give_no_information_never_a_number(weights_copy):
    model, _ = load_model()
    state = {
        k: (torch.full_like(v, math.nan) if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    torch.save({"config": model.config.as_dict(), "state_dict": state}, weights_copy)
    _rehash(weights_copy)
    scorer = DeepFocusScorer(weights=weights_copy)
    res = scorer.score(_textured_frame())
    assert math.isnan(res.score) and not res.informative
    assert np.all(res.confidence == 0.0)


# ======================================================================================
# 3. calibration files and catalog entries
# ======================================================================================
@pytest.fixture
def cal_dict(cal) -> dict:
    return cal.to_dict()


def test_calibration_round_trip(cal, tmp_path):
    back = Calibration.load(cal.save(tmp_path / "cal.json"))
    np.testing.assert_allclose(back.z_um, cal.z_um)
    np.testing.assert_allclose(back.blur, cal.blur, equal_nan=True)
    assert back.fwhm_um == pytest.approx(cal.fwhm_um)


@pytest.mark.parametrize(
    "content, message",
    [
        ("TRUNCATE", r"is not valid JSON .* corrupted or truncated"),
        (b"\xff\xfe\x00\x01binary", r"is not valid JSON .*codec can't decode"),
        ('{"format": "something-else/2"}', r"Not a calibration \(format 'something-else/2'"),
        ("{}", r"Not a calibration \(format None"),
    ],
    ids=["truncated", "binary", "other-format", "empty-object"],
)
def test_damaged_calibration_files_are_refused(cal, tmp_path, content, message):
    path = cal.save(tmp_path / "cal.json")
    if content == "TRUNCATE":
        text = path.read_text()
        path.write_text(text[: len(text) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        Calibration.load(path)


def test_missing_calibration_file_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match=r"does not exist; run calibration_plan first"):
        Calibration.load(tmp_path / "nowhere.json")
    with pytest.raises(CalibrationError, match=r"is not valid JSON .*Is a directory"):
        Calibration.load(tmp_path)


def _edit(d: dict, key: str, value) -> dict:
    return {**d, key: value(d) if callable(value) else value}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("z_um", None, r"corrupted or truncated \(TypeError"),
        ("z_um", lambda d: d["z_um"][::-1], r"z axis is not increasing"),
        ("z_um", lambda d: d["z_um"][:-1], r"inconsistent lengths"),
        ("z_um", lambda d: [*d["z_um"][:5], math.inf, *d["z_um"][6:]], r"not increasing"),
        ("blur", lambda d: ["a"] * len(d["blur"]), r"could not convert string to float: 'a'"),
        ("log_signal", lambda d: d["log_signal"][:-5], r"cannot reshape array"),
        ("shape", [3, 3], r"cannot reshape array"),
        ("edges", [1, 2, 3], r"other spectral bins"),
        ("dof_um", "wide", r"could not convert string to float: 'wide'"),
        ("moffat_params", {"fwhm": "x"}, r"corrupted or truncated"),
    ],
    ids=[
        "z-null",
        "z-reversed",
        "z-short",
        "z-inf",
        "blur-strings",
        "spectra-truncated",
        "bad-shape",
        "other-bins",
        "dof-string",
        "fwhm-string",
    ],
)
def test_malformed_calibration_data_is_refused(cal_dict, key, value, message):
    with pytest.raises(CalibrationError, match=message):
        Calibration.from_dict(_edit(cal_dict, key, value))


@pytest.mark.parametrize(
    "key, value",
    [
        ("z_um", lambda d: [math.nan] * len(d["z_um"])),
        ("z_um", lambda d: [*d["z_um"][:5], math.nan, *d["z_um"][6:]]),
        ("blur", lambda d: [None] * len(d["blur"])),
        ("dof_um", math.nan),
        ("moffat_params", {"fwhm": math.nan}),
    ],
    ids=["z-all-nan", "z-one-nan", "blur-all-null", "dof-nan", "fwhm-nan"],
)
def test_calibration_with_nans_is_refused(cal_dict, tmp_path, key, value):
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(_edit(cal_dict, key, value)))  # NaN as JSON's NaN token
    with pytest.raises(CalibrationError, match=r"(NaN|finite)"):
        Calibration.load(path)


@pytest.mark.parametrize("content", ["[1, 2, 3]", "null", '"a string"'], ids=str)
def test_calibration_file_that_is_not_a_json_object_is_refused(tmp_path, content):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="calibration"):
        Calibration.load(path)


class _FakeStream:
    """What ``run["calibration_result"]`` offers to Calibration.from_run: ``read()``."""

    def __init__(self, data):
        self._data = data

    def read(self):
        return self._data


class _FakeRun(dict):
    """A catalog run: streams by name, and metadata with the start document."""

    metadata = {"start": {"uid": "fake-run-uid"}}  # noqa: RUF012


@pytest.mark.parametrize(
    "streams, message",
    [
        ({}, r"Run 'fake-run-uid' has no 'calibration_result' stream"),
        ({"calibration": ["{not json"]}, r"Stored calibration is not valid JSON"),
        ({"calibration": [42]}, r"Stored calibration is not valid JSON"),
        ({"calibration": ['{"format": "x"}']}, r"Not a calibration \(format 'x'"),
    ],
    ids=["no-stream", "garbage-text", "a-number", "other-format"],
)
def test_garbage_calibration_runs_are_refused(streams, message):
    run = _FakeRun({"calibration_result": _FakeStream(streams)} if streams else {})
    with pytest.raises(CalibrationError, match=message):
        Calibration.from_run(run)


@pytest.mark.parametrize(
    "data",
    [{"calibration": []}, {"other_key": ["{}"]}, {"calibration": ["[1, 2]"]}],
    ids=["empty-stream", "no-calibration-key", "json-list"],
)
def test_calibration_runs_with_missing_pieces_are_refused(data):
    with pytest.raises(CalibrationError):
        Calibration.from_run(_FakeRun({"calibration_result": _FakeStream(data)}))


# ======================================================================================
# 4. images
# ======================================================================================
def _textured_frame(defocus_um: float = 0.0, seed: int = 0) -> np.ndarray:
    """A 256x256 uint16 camera frame of tissue at 10x/0.3 (Poisson noise)."""
    from bluesky_deepfocus.optics import blur, get_objective, objective_psf
    from bluesky_deepfocus.specimens import make_specimen

    obj = get_objective("10x/0.3")
    spec = make_specimen("tissue", 256 + 96, obj.pixel_size_um, seed=seed)
    mean = blur(spec, objective_psf(obj, defocus_um, size=97)) * 2000 + 100
    return np.random.default_rng(seed).poisson(mean).astype(np.uint16)


@pytest.fixture(scope="module")
def scorer() -> DeepFocusScorer:
    return DeepFocusScorer()


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return _textured_frame()


@pytest.fixture(scope="module")
def reference(scorer, frame):
    res = scorer.score(frame)
    assert res.informative and np.all(res.confidence > 0.5)  # the test frame is informative
    return res


def _with_nan(f):
    a = f.astype(float)
    a[10, 20] = np.nan
    return a


def _with_inf(f):
    a = f.astype(float)
    a[-1, -1] = -np.inf
    return a


@pytest.mark.parametrize(
    "make, message",
    [
        (_with_nan, r"Image holds 1 NaN/inf pixel\(s\)"),
        (_with_inf, r"Image holds 1 NaN/inf pixel\(s\)"),
        (lambda f: f.astype(object), r"Image dtype dtype\('O'\) is not numeric"),
        (lambda f: f.astype(complex), r"Image dtype dtype\('complex128'\) is complex"),
        (lambda f: f.astype(str), r"Image dtype dtype\('<U\d+'\) is not numeric"),
        (lambda f: f.ravel(), r"Image shape \(65536,\) is not a 2-D frame"),
        (lambda f: f[None, None], r"Image shape \(1, 1, 256, 256\) is not a 2-D frame"),
        (lambda f: np.stack([f] * 5, axis=-1), r"Image shape \(256, 256, 5\) is not a 2-D frame"),
        (lambda f: np.stack([f, f]), r"Image shape \(2, 256, 256\) is not a 2-D frame"),
        (lambda f: f[:100, :100], r"smaller than the minimum 128x128 pixels"),
        (lambda f: f[:0], r"smaller than the minimum \d+x\d+ pixels"),
        (lambda f: np.float64(3.0), r"Image shape \(\) is not a 2-D frame"),
        (lambda f: None, r"is not numeric"),
    ],
    ids=[
        "nan",
        "inf",
        "object",
        "complex",
        "str",
        "1-D",
        "4-D",
        "HxWx5",
        "stack",
        "too-small",
        "empty",
        "scalar",
        "None",
    ],
)
@pytest.mark.parametrize("which", ["deepfocus", "tenengrad"])
def test_malformed_images_raise_image_error(scorer, frame, which, make, message):
    fn = scorer if which == "deepfocus" else Tenengrad()
    if which == "tenengrad" and "128x128" in message:
        pytest.skip("classic functions score patches smaller than 100 px")
    with pytest.raises(ImageError, match=message):
        fn.score(make(frame))


@pytest.mark.parametrize(
    "convert",
    [
        lambda f: f.astype(np.float64),
        lambda f: f.astype(np.float32) - 5000.0,  # negative after dark subtraction
        lambda f: f.astype(np.int16),
        lambda f: f.astype(np.int64) * 10**12,
        lambda f: f.astype(np.float16),
        lambda f: np.stack([f] * 3, axis=-1),  # RGB
        lambda f: f[None],  # (1, H, W)
    ],
    ids=["float64", "negative", "int16", "huge-int64", "float16", "rgb", "1xHxW"],
)
def test_valid_but_unusual_frames_score_like_the_original(scorer, frame, reference, convert):
    """Offsets, gains and dtypes that keep the information give the same score: the
    network sees each patch standardized."""
    res = scorer.score(convert(frame))
    assert res.score == pytest.approx(reference.score, abs=0.02)
    np.testing.assert_allclose(res.confidence, reference.confidence, atol=0.02)


@pytest.mark.parametrize(
    "make",
    [
        lambda f: np.full_like(f, 65535),  # saturated
        lambda f: np.zeros_like(f),  # dark
        lambda f: np.full_like(f, 1000),  # uniform
        lambda f: np.random.default_rng(1).poisson(500, f.shape).astype(np.uint16),  # noise
        lambda f: f.astype(np.float64) * 1e-30,  # information below float32 resolution
    ],
    ids=["saturated", "dark", "uniform", "pure-noise", "tiny-values"],
)
@pytest.mark.parametrize("which", ["deepfocus", "tenengrad"])
def test_frames_without_information_score_nan_with_zero_confidence(scorer, frame, make, which):
    fn = scorer if which == "deepfocus" else Tenengrad()
    res = fn.score(make(frame))
    assert math.isnan(res.score) and not res.informative
    assert res.informative_fraction == 0.0
    assert float(np.max(res.confidence)) < 0.5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("which", ["deepfocus", "tenengrad"])
def test_huge_values_give_the_true_score_or_none(scorer, frame, which):
    """Values near the float32 limit: the score of the original frame, or NaN with
    confidence 0 (the CNN's patch statistics overflow) -- never another number."""
    fn = scorer if which == "deepfocus" else Tenengrad()
    ref = fn.score(frame)
    res = fn.score(frame.astype(np.float64) * 1e34)
    if math.isnan(res.score):
        assert np.all(res.confidence == 0.0)
    else:
        assert res.score == pytest.approx(ref.score, rel=1e-3)


def test_saturated_patches_get_zero_confidence_and_leave_the_score(scorer, frame, reference):
    a = frame.copy()
    a[:128, :128] = 65535  # one of the four patches blown out
    res = scorer.score(a)
    assert res.confidence[0, 0] == 0.0
    assert np.all(res.confidence.ravel()[1:] > 0.5)
    assert res.score == pytest.approx(reference.score, abs=0.05)
    b = frame.copy()
    b[::2, :] = 65535  # half of every patch saturated
    res = scorer.score(b)
    assert math.isnan(res.score) and np.all(res.confidence == 0.0)


def test_a_bad_roi_is_refused(scorer, frame):
    for roi, message in [
        ((200, 200, 128, 128), r"does not fit in the 256x256 image"),
        ((-1, 0, 128, 128), r"does not fit"),
        ((0, 0, 64, 64), r"smaller than the minimum 128x128"),
        ((0, 0, 128), r"must be \(x, y, width, height\)"),
        (("a", 0, 128, 128), r"must be \(x, y, width, height\)"),
    ]:
        with pytest.raises(ImageError, match=message):
            scorer.score(frame, roi=roi)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_values_beyond_float32_are_named_as_such(scorer, frame):
    with pytest.raises(ImageError, match=r"(float32|too large|range)"):
        scorer.score(frame.astype(np.float64) * 1e36)
