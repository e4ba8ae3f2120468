"""The budgeted-batch threshold search on synthetic confidences with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dync.calib.budget import (
    NEAR_BUDGET,
    budgeted_curve,
    choose,
    flops_cost,
    geometric_shares,
    simulate_exits,
)
from dync.calib.search import calibrate
from dync.errors import InputError
from tests.helpers import expected_exits

CUMULATIVE = [10.0, 30.0, 60.0, 100.0]


def synthetic_confidences(size: int, seed: int) -> list[np.ndarray]:
    """Independent uniform confidences per exit, later exits a little more confident."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 0.9, size) + 0.03 * k for k in range(len(CUMULATIVE))]


@pytest.mark.parametrize("q", [0.01, 0.5, 1.0, 2.0, 100.0])
def test_geometric_shares_sum_to_one_and_follow_q(q: float) -> None:
    shares = geometric_shares(q, 5)
    assert shares.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(shares[1:] / shares[:-1], q)


def test_simulated_exits_follow_the_runtime_rule() -> None:
    confidences = synthetic_confidences(500, seed=0)
    thresholds = np.array([0.8, 0.5, 0.9])
    np.testing.assert_array_equal(simulate_exits(confidences, thresholds), expected_exits(confidences, thresholds))


def test_flops_cost_is_mean_cumulative_fraction() -> None:
    cost = flops_cost(CUMULATIVE)
    assert cost(np.array([0, 0, 3, 3])) == pytest.approx((10 + 10 + 100 + 100) / 4 / 100)
    assert cost(np.full(7, 3)) == pytest.approx(1.0)


def test_curve_realizes_the_geometric_shares() -> None:
    """Distinct confidences: each exit receives exactly its share (rounded) for every q."""
    confidences = synthetic_confidences(1000, seed=1)
    for setting in budgeted_curve(confidences, flops_cost(CUMULATIVE))[::50]:
        wanted = np.round(geometric_shares(setting.q, len(CUMULATIVE)) * 1000)
        np.testing.assert_allclose(setting.exit_counts[:-1], wanted[:-1], atol=1)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_is_met_closely_without_labels(budget: float) -> None:
    result = calibrate(synthetic_confidences(2000, seed=2), flops_cost(CUMULATIVE), budget)
    assert NEAR_BUDGET * budget <= result.chosen.cost <= budget
    assert result.min_cost == pytest.approx(0.1)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_holds_on_held_out_data_from_the_same_distribution(budget: float) -> None:
    result = calibrate(synthetic_confidences(4000, seed=3), flops_cost(CUMULATIVE), budget)
    held_out = simulate_exits(synthetic_confidences(4000, seed=4), result.chosen.thresholds)
    assert 0.85 * budget <= flops_cost(CUMULATIVE)(held_out) <= 1.05 * budget


def test_with_labels_the_choice_is_at_least_the_best_geometric_setting_near_the_budget() -> None:
    """The direct search starts from the geometric settings, so it can only do better within the budget."""
    confidences = synthetic_confidences(2000, seed=5)
    rng = np.random.default_rng(6)
    correct = [rng.uniform(size=2000) < accuracy for accuracy in (0.6, 0.8, 0.85, 0.9)]
    result = calibrate(confidences, flops_cost(CUMULATIVE), 0.5, correct)
    near = [s for s in result.curve if NEAR_BUDGET * 0.5 <= s.cost <= 0.5]
    assert result.chosen.cost <= 0.5 and result.chosen.accuracy >= max(s.accuracy for s in near)
    assert [accuracy for _, accuracy in result.anytime] == pytest.approx([c.mean() for c in correct])
    assert [cost for cost, _ in result.anytime] == pytest.approx([0.1, 0.3, 0.6, 1.0])


def test_budget_below_the_cheapest_exit_names_the_minimum() -> None:
    with pytest.raises(InputError, match=r"below the cheapest achievable cost 0\.100"):
        calibrate(synthetic_confidences(100, seed=7), flops_cost(CUMULATIVE), 0.05)


def test_budget_above_one_runs_everything_to_the_end() -> None:
    curve = budgeted_curve(synthetic_confidences(300, seed=8), flops_cost(CUMULATIVE))
    assert choose(curve, 1.5, 0.1).cost == pytest.approx(max(s.cost for s in curve))


def test_budget_the_q_grid_cannot_reach_names_the_cheapest_reachable_cost() -> None:
    """On 5000 samples even the smallest q sends a few samples past exit 0, so a budget of exactly the
    all-at-exit-0 cost is refused with the cheapest cost the search reaches, not an assertion."""
    confidences = synthetic_confidences(5000, seed=9)
    curve = budgeted_curve(confidences, flops_cost(CUMULATIVE))
    cheapest = min(s.cost for s in curve)
    assert cheapest > 0.1
    with pytest.raises(InputError, match=r"cheapest cost the threshold search reaches .*ask for at least") as caught:
        choose(curve, 0.1, 0.1)
    suggested = float(str(caught.value).rsplit(" ", 1)[-1].rstrip("."))
    assert cheapest <= suggested < cheapest + 1e-4
    assert choose(curve, suggested, 0.1).cost == cheapest
