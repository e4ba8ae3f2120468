"""The exit rule's pieces: the max-softmax confidence, threshold resolution, forcing thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from dync.errors import InputError
from dync.runtime.exit_rule import confidence, forcing_thresholds, max_softmax, resolve_thresholds
from tests.helpers import softmax_confidence

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "logits",
    [
        RNG.standard_normal((16, 10)).astype(np.float32),
        RNG.standard_normal((5, 1000)) * 8,
        RNG.standard_normal((4, 3, 7)).astype(np.float32),  # per-sample logits of any shape are flattened
        np.zeros((3, 4), dtype=np.float32),
        np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 1e-3]]),
    ],
    ids=["float32", "wide_float64", "3d", "uniform", "small"],
)
def test_max_softmax_equals_direct_computation(logits: np.ndarray) -> None:
    got = max_softmax(logits)
    assert got.shape == (len(logits),) and got.dtype == np.float64
    np.testing.assert_allclose(got, softmax_confidence(logits), rtol=1e-12, atol=0)


def test_max_softmax_known_values() -> None:
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [np.log(3.0), 0.0, 0.0, 0.0], [5.0, 5.0, -np.inf, -np.inf]])
    np.testing.assert_allclose(max_softmax(logits), [0.25, 0.5, 0.5], rtol=1e-12)


def test_max_softmax_is_stable_for_huge_logits() -> None:
    logits = np.array([[1e4, 0.0, -1e4], [1e30, 1e30, 0.0], [-1e4, -1e4 + np.log(3.0), -1e9]], dtype=np.float64)
    got = max_softmax(logits)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [1.0, 0.5, 0.75], rtol=1e-12)


def test_max_softmax_single_class_is_certain() -> None:
    np.testing.assert_array_equal(max_softmax(np.array([[3.0], [-7.0]])), [1.0, 1.0])


def test_max_softmax_is_shift_invariant() -> None:
    logits = RNG.standard_normal((8, 10))
    np.testing.assert_allclose(max_softmax(logits + 123.0), max_softmax(logits), rtol=1e-12)


def test_confidence_dispatches_by_criterion() -> None:
    logits = RNG.standard_normal((4, 10))
    np.testing.assert_array_equal(confidence("max_softmax", logits), max_softmax(logits))
    with pytest.raises(InputError, match="entropy"):
        confidence("entropy", logits)


# --------------------------------------------------------------------------- #
# resolve_thresholds
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("given", "num_exits", "expected"),
    [
        (None, 4, [np.inf, np.inf, np.inf]),
        (None, 1, []),
        ([0.9, 0.8, 0.7], 4, [0.9, 0.8, 0.7]),
        ([0.9, 0.8, 0.7, 0.1], 4, [0.9, 0.8, 0.7]),  # K values: the last is ignored
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
