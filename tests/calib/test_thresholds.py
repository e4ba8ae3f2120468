"""Thresholds for wanted exit shares, on synthetic confidences whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from dync.calib.thresholds import even_split_thresholds, thresholds_for_shares
from tests.helpers import expected_exits


def _exit_counts(confidences: list[np.ndarray], thresholds: np.ndarray) -> list[int]:
    return np.bincount(expected_exits(confidences, thresholds), minlength=len(confidences)).tolist()


# Eight samples; exit 0 and exit 1 confidences, all distinct.
C0 = np.array([0.95, 0.30, 0.80, 0.55, 0.20, 0.65, 0.40, 0.90])
C1 = np.array([0.10, 0.85, 0.50, 0.70, 0.60, 0.35, 0.99, 0.45])
C2 = np.full(8, 0.5)  # the last exit's confidences are never used


@pytest.mark.parametrize(
    ("shares", "thresholds", "counts"),
    [
        # 2 of 8 leave at exit 0 (0.95, 0.90); of the six left, 2 leave at exit 1 (0.99, 0.85).
        ([0.25, 0.25, 0.5], [0.90, 0.85], [2, 2, 4]),
        # 4 at exit 0 (0.95, 0.90, 0.80, 0.65); the rest go on to exit 2.
        ([0.5, 0.0, 0.5], [0.65, np.inf], [4, 0, 4]),
        # nobody at exit 0; 3 at exit 1 among all eight (0.99, 0.85, 0.70).
        ([0.0, 0.375, 0.625], [np.inf, 0.70], [0, 3, 5]),
        # everybody at exit 0: its threshold is the lowest confidence; exit 1 never fires.
        ([1.0, 0.0, 0.0], [0.20, np.inf], [8, 0, 0]),
        # everybody at the last exit.
        ([0.0, 0.0, 1.0], [np.inf, np.inf], [0, 0, 8]),
        # 1 at exit 0 (0.95); exit 1 takes all 7 left: threshold = lowest running confidence there (0.35).
        ([0.125, 0.875, 0.0], [0.95, 0.35], [1, 7, 0]),
    ],
)
def test_known_thresholds(shares: list[float], thresholds: list[float], counts: list[int]) -> None:
    got = thresholds_for_shares([C0, C1, C2], shares)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, thresholds)
    assert _exit_counts([C0, C1, C2], got) == counts


def test_single_exit_has_no_thresholds() -> None:
    assert thresholds_for_shares([C0], [1.0]).shape == (0,)


def test_share_rounding_is_to_the_nearest_sample() -> None:
    # 0.3 x 8 = 2.4 -> 2 samples; 0.2 x 8 = 1.6 -> 2 samples.
    got = thresholds_for_shares([C0, C1, C2], [0.3, 0.2, 0.5])
    assert _exit_counts([C0, C1, C2], got) == [2, 2, 4]


def test_ties_can_make_a_share_larger() -> None:
    tied = np.array([0.5, 0.5, 0.5, 0.5, 0.2, 0.1])
    got = thresholds_for_shares([tied, C2[:6]], [1 / 6, 5 / 6])
    assert got.tolist() == [0.5]
    assert _exit_counts([tied, C2[:6]], got) == [4, 2]


@pytest.mark.parametrize("seed", range(5))
def test_shares_are_met_exactly_without_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, num_exits = 200, 5
    confidences = [rng.uniform(0.1, 1.0, n) for _ in range(num_exits)]
    counts = rng.multinomial(n, np.ones(num_exits) / num_exits)
    got = thresholds_for_shares(confidences, (counts / n).tolist())
    assert _exit_counts(confidences, got) == counts.tolist()


def test_even_split_sends_equal_shares() -> None:
    rng = np.random.default_rng(1)
    outputs = [rng.standard_normal((30, 10)) * (k + 1) for k in range(3)]
    confidences = [np.exp(o).max(axis=1) / np.exp(o).sum(axis=1) for o in outputs]
    got = even_split_thresholds(confidences)
    assert got.shape == (2,)
    assert _exit_counts(confidences, got) == [10, 10, 10]
