"""The exit rule's pieces: the criteria against torch, the per-package criteria, threshold resolution, forcing.

`softmax` and the criteria built on it are compared with torch's CPU kernel to a few float32 ulps (its
vectorized exp and summation order are its own), and exactly at saturation, where both give 1.0; entropy to
within 5e-7 absolute (a few float32 ulps of 1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dync.errors import InputError, PackageError
from dync.package import MANIFEST_FILE, ExitSpec
from dync.runtime.exit_rule import (
    BUILTIN_CRITERIA,
    ExitCriteria,
    entropy,
    forcing_thresholds,
    margin,
    max_softmax,
    resolve_thresholds,
    softmax,
)
from tests.conftest import ExportCache
from tests.criteria_fixture import TORCH_CRITERIA
from tests.helpers import softmax_confidence

RNG = np.random.default_rng(0)
ULPS = 16


def _logit_sets() -> list[np.ndarray]:
    """Random logits over class counts around the vector widths and scales from flat to saturated."""
    sets = [(RNG.standard_normal((400, c)) * scale).astype(np.float32)
            for c in (1, 2, 3, 7, 8, 9, 10, 15, 16, 17, 31, 33, 100, 1000) for scale in (0.1, 1.0, 5.0, 30.0, 300.0)]
    masked = RNG.standard_normal((50, 12)).astype(np.float32)
    masked[:, ::3] = -np.inf
    return [*sets, masked]


LOGIT_SETS = _logit_sets()


def _torch(name: str, logits: np.ndarray) -> np.ndarray:
    return TORCH_CRITERIA[name](torch.from_numpy(logits)).numpy()


def test_softmax_is_torch_softmax_to_a_few_ulps() -> None:
    for logits in LOGIT_SETS:
        expected = torch.softmax(torch.from_numpy(logits), -1).numpy()
        got = softmax(logits)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_array_max_ulp(got[finite], expected[finite], maxulp=ULPS)


@pytest.mark.parametrize("name", ["max_softmax", "margin"])
def test_criterion_is_torch_to_a_few_ulps(name: str) -> None:
    for logits in LOGIT_SETS:
        if name == "margin" and logits.shape[1] == 1:
            continue  # topk(2) needs two classes; see test_single_class_is_certain
        got = BUILTIN_CRITERIA[name](logits)
        assert got.dtype == np.float32 and got.shape == (len(logits),)
        np.testing.assert_allclose(got, _torch(name, logits), rtol=0, atol=ULPS * 2**-24)


def test_entropy_matches_torch() -> None:
    for logits in LOGIT_SETS:
        if logits.shape[1] == 1:
            continue  # ln 1 = 0; see test_single_class_is_certain
        got = entropy(logits)
        assert got.dtype == np.float32 and ((got >= 0) & (got <= 1)).all()
        np.testing.assert_allclose(got, _torch("entropy", logits), rtol=0, atol=5e-7)


@pytest.mark.parametrize("logits", [
    np.array([[30.0, 0.0, -5.0, 1.0]], dtype=np.float32),
    np.concatenate([[40.0], RNG.standard_normal(999)]).astype(np.float32)[None],
    np.array([[1e4, 0.0, -1e4], [-3.0, 60.0, 2.0]], dtype=np.float64),
], ids=["gap30", "1000_classes", "huge_float64"])
def test_saturated_samples_are_exactly_certain(logits: np.ndarray) -> None:
    """float32 softmax of a confident sample is exactly 1.0 in torch and in dync, for every criterion, so a
    threshold of 1.0 takes it."""
    for name, criterion in BUILTIN_CRITERIA.items():
        np.testing.assert_array_equal(_torch(name, logits), 1.0)
        np.testing.assert_array_equal(criterion(logits), 1.0)
    assert (max_softmax(logits) >= resolve_thresholds([1.0], 2)[0]).all()


def test_decisions_at_one_are_torch_decisions() -> None:
    """`confidence >= 1.0` takes exactly the samples torch's float32 softmax saturates, away from the narrow band
    of logit gaps (about 16-17.5) where float32 rounds the max probability to 1 or to the float just below it."""
    gaps = np.concatenate([np.linspace(8.0, 15.5, 200), np.linspace(18.0, 40.0, 200)]).astype(np.float32)
    logits = np.stack([gaps, np.zeros_like(gaps), np.full_like(gaps, -1.0)], axis=1)
    ours, theirs = max_softmax(logits), torch.from_numpy(_torch("max_softmax", logits))
    assert (ours == 1.0).any() and (ours < 1.0).any()
    np.testing.assert_array_equal(ours >= resolve_thresholds([1.0], 2)[0], (theirs >= 1.0).numpy())


def test_thresholds_round_to_float32_as_torch_compares() -> None:
    """A float32 confidence just below 1 against 0.9999999, which torch compares as the float32 0.99999988."""
    below_one = np.nextafter(np.float32(1), np.float32(0))
    t = resolve_thresholds([0.9999999], 2)[0]
    assert (below_one >= t) == bool(torch.tensor([below_one]) >= 0.9999999)


def test_entropy_and_margin_known_values() -> None:
    uniform = np.zeros((2, 5), dtype=np.float32)
    assert (entropy(uniform) >= 0).all() and (entropy(uniform) < 1e-6).all()
    np.testing.assert_array_equal(margin(uniform), 0.0)
    two = np.array([[np.log(3.0), 0.0]], dtype=np.float32)  # p = [0.75, 0.25]
    np.testing.assert_allclose(margin(two), [0.5], rtol=1e-6)
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(entropy(two), [1 - h / np.log(2)], rtol=1e-6)


def test_max_softmax_known_values() -> None:
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [np.log(3.0), 0.0, 0.0, 0.0], [5.0, 5.0, -np.inf, -np.inf]])
    np.testing.assert_allclose(max_softmax(logits), [0.25, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    "logits",
    [
        RNG.standard_normal((16, 10)).astype(np.float32),
        RNG.standard_normal((5, 1000)) * 8,
        RNG.standard_normal((4, 3, 7)).astype(np.float32),  # per-sample logits of any shape are flattened
    ],
    ids=["float32", "wide_float64", "3d"],
)
def test_max_softmax_is_the_float32_textbook_value(logits: np.ndarray) -> None:
    np.testing.assert_allclose(max_softmax(logits), softmax_confidence(logits), rtol=1e-6, atol=0)


def test_huge_logits_are_stable() -> None:
    logits = np.array([[1e30, 1e30, 0.0], [-1e4, -1e4 + np.log(3.0), -1e9]], dtype=np.float64)
    for criterion in BUILTIN_CRITERIA.values():
        assert np.isfinite(criterion(logits)).all()
    np.testing.assert_allclose(max_softmax(logits), [0.5, 0.75], rtol=1e-4)  # float32 -1e4 + ln 3: ln 3 +- 5e-4


def test_single_class_is_certain() -> None:
    for criterion in BUILTIN_CRITERIA.values():
        np.testing.assert_array_equal(criterion(np.array([[3.0], [-7.0]])), [1.0, 1.0])


def test_max_softmax_is_shift_invariant() -> None:
    logits = RNG.standard_normal((8, 10)).astype(np.float32)
    np.testing.assert_allclose(max_softmax(logits + 123.0), max_softmax(logits), rtol=1e-5)


# --------------------------------------------------------------------------- #
# ExitCriteria: each exit's criterion in one package
# --------------------------------------------------------------------------- #


def _exit(criterion: str, criterion_onnx: str | None = None) -> ExitSpec:
    return ExitSpec(output="exit", criterion=criterion, macs=0, cumulative_macs=0, criterion_onnx=criterion_onnx)


def test_exit_criteria_dispatch_per_exit(tmp_path: Path) -> None:
    logits = RNG.standard_normal((4, 10)).astype(np.float32)
    criteria = ExitCriteria(tmp_path, [_exit("entropy"), _exit("margin"), _exit("max_softmax")])
    np.testing.assert_array_equal(criteria.confidence(0, logits), entropy(logits))
    got = criteria.confidences([logits, logits, logits])
    for value, criterion in zip(got, (entropy, margin, max_softmax), strict=True):
        np.testing.assert_array_equal(value, criterion(logits))


def test_unknown_criterion_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="exit 1's criterion 'softmax_temperature' is unknown") as info:
        ExitCriteria(tmp_path, [_exit("max_softmax"), _exit("softmax_temperature")])
    assert "re-export" in str(info.value) and str(tmp_path / MANIFEST_FILE) in str(info.value)


def test_packages_without_criterion_onnx_load(exports: ExportCache, tmp_path: Path) -> None:
    """Packages written before user criteria have no `criterion_onnx` field: they load, with max_softmax."""
    import dync

    package = shutil.copytree(exports.get("msdnet").package, tmp_path / "old.dync")
    raw = json.loads((package / MANIFEST_FILE).read_text())
    for stage in raw["stages"]:
        del stage["exit"]["criterion_onnx"]
    (package / MANIFEST_FILE).write_text(json.dumps(raw))
    engine = dync.load(package)
    assert [e.criterion_onnx for e in engine.manifest.exits] == [None] * 4
    logits = RNG.standard_normal((3, 10)).astype(np.float32)
    np.testing.assert_array_equal(engine.criteria.confidence(0, logits), max_softmax(logits))


# --------------------------------------------------------------------------- #
# resolve_thresholds
# --------------------------------------------------------------------------- #


def _f32(value: float) -> float:
    return float(np.float32(value))


@pytest.mark.parametrize(
    ("given", "num_exits", "expected"),
    [
        (None, 4, [np.inf, np.inf, np.inf]),
        (None, 1, []),
        ([0.9, 0.8, 0.7], 4, [_f32(0.9), _f32(0.8), _f32(0.7)]),  # compared as torch does: in float32
        ([0.9, 0.8, 0.7, 0.1], 4, [_f32(0.9), _f32(0.8), _f32(0.7)]),  # K values: the last is ignored
        ([0.9999999, 1.0 + 1e-9, -1e39], 4, [1 - 2**-23, 1.0 + 1e-9, -np.inf]),  # above 1 stays above 1
        ((0.5,), 2, [0.5]),
        (np.array([0.0, 2.0]), 3, [0.0, 2.0]),
        ([], 1, []),
        ([0.3], 1, []),
        ([1, 0], 3, [1.0, 0.0]),
        ([np.inf, -1.0], 3, [np.inf, -1.0]),
    ],
)
def test_resolve_thresholds(given: object, num_exits: int, expected: list[float]) -> None:
    got = resolve_thresholds(given, num_exits)  # type: ignore[arg-type]
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.asarray(expected, dtype=np.float64))


@pytest.mark.parametrize(
    ("given", "num_exits"),
    [([0.5], 4), ([0.5, 0.5], 4), ([0.5] * 5, 4), ([], 2), ([0.1, 0.2, 0.3], 1)],
)
def test_resolve_thresholds_rejects_the_wrong_count(given: list[float], num_exits: int) -> None:
    with pytest.raises(InputError) as info:
        resolve_thresholds(given, num_exits)
    message = str(info.value)
    assert f"got {len(given)} thresholds" in message
    assert f"{num_exits} exits" in message
    assert f"give {num_exits - 1}" in message


@pytest.mark.parametrize("given", [[np.nan, 0.5, 0.5], [0.5, 0.5, float("nan")]])
def test_resolve_thresholds_rejects_nan(given: list[float]) -> None:
    with pytest.raises(InputError, match="NaN"):
        resolve_thresholds(given, 4)


def test_resolve_thresholds_rejects_a_matrix() -> None:
    with pytest.raises(InputError, match="thresholds"):
        resolve_thresholds(np.zeros((1, 3)), 4)


def test_resolve_thresholds_does_not_alias_its_argument() -> None:
    given = np.array([0.5, 0.6, 0.7])
    resolve_thresholds(given, 4)[0] = 9.0
    assert given[0] == 0.5


@pytest.mark.parametrize(
    ("k", "num_exits", "expected"),
    [
        (0, 1, []),
        (0, 2, [0.0]),
        (1, 2, [np.inf]),
        (0, 4, [0.0, 0.0, 0.0]),
        (1, 4, [np.inf, 0.0, 0.0]),
        (2, 4, [np.inf, np.inf, 0.0]),
        (3, 4, [np.inf, np.inf, np.inf]),
    ],
)
def test_forcing_thresholds(k: int, num_exits: int, expected: list[float]) -> None:
    np.testing.assert_array_equal(forcing_thresholds(k, num_exits), np.asarray(expected, dtype=np.float64))
