"""The direct threshold search against exhaustive search on small synthetic confidence tables, and its
guarantees: never below the best uniform or geometric setting within the budget, a Pareto front that is one,
and a known optimum found where the table is built to have one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dync.calib.budget import flops_cost, simulate_exits
from dync.calib.search import Evaluation, best_within, calibrate, pareto_front

CUMULATIVE_3 = [20.0, 55.0, 100.0]
CUMULATIVE_5 = [10.0, 25.0, 45.0, 70.0, 100.0]


def _table(exits: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Confidences per exit and whether each exit is right, right more often where it is confident."""
    rng = np.random.default_rng(seed)
    confidences = [rng.uniform(0.1, 1.0, size) for _ in range(exits)]
    correct = [rng.uniform(0, 1, size) < 0.35 + 0.1 * k + 0.4 * c for k, c in enumerate(confidences)]
    return confidences, correct


def _brute_force(confidences: list[np.ndarray], correct: list[np.ndarray], cumulative: list[float],
                 budget: float) -> float:
    """The best accuracy within the budget over every threshold that changes who leaves (each exit's distinct
    confidences, and never)."""
    cost_of = flops_cost(cumulative)
    truth = np.stack(correct)
    best = -1.0
    grids = [np.append(np.unique(c), np.inf) for c in confidences[:-1]]
    for thresholds in itertools.product(*grids):
        exits = simulate_exits(confidences, np.array(thresholds))
        if cost_of(exits) <= budget:
            best = max(best, float(truth[exits, np.arange(len(exits))].mean()))
    return best


@pytest.mark.parametrize(("seed", "budget"), [(0, 0.45), (1, 0.6), (2, 0.75), (3, 0.5)])
def test_three_exits_match_exhaustive_search(seed: int, budget: float) -> None:
    confidences, correct = _table(3, 30, seed)  # fewer samples than DIRECT_GRID: every partition is on the grid
    result = calibrate(confidences, flops_cost(CUMULATIVE_3), budget, correct)
    assert result.chosen.cost <= budget
    assert result.chosen.accuracy == pytest.approx(_brute_force(confidences, correct, CUMULATIVE_3, budget))


@pytest.mark.parametrize(("seed", "budget"), [(4, 0.3), (5, 0.5), (6, 0.7)])
def test_five_exits_never_below_the_best_uniform_or_geometric_setting(seed: int, budget: float) -> None:
    confidences, correct = _table(5, 400, seed)
    result = calibrate(confidences, flops_cost(CUMULATIVE_5), budget, correct)
    assert result.chosen.cost <= budget
    for family in (result.uniform, result.curve):
        best = best_within(family, budget)
        assert best is not None and result.chosen.accuracy >= best.accuracy


def test_a_built_in_optimum_is_found() -> None:
    """Exit 0 is right exactly where its confidence is above 0.6 (30% of samples), exit 1 always: within a
    budget that lets 30% leave early, the best thresholds send exactly those and lose nothing."""
    rng = np.random.default_rng(7)
    confidence = rng.uniform(0.0, 1.0, 500)
    early = confidence > np.quantile(confidence, 0.7)
    confidences = [confidence, rng.uniform(0, 1, 500)]
    correct = [early, np.ones(500, bool)]
    budget = (0.3 * 50 + 0.7 * 100) / 100
    result = calibrate(confidences, flops_cost([50.0, 100.0]), budget, correct)
    assert result.chosen.accuracy == 1.0 and result.chosen.cost == pytest.approx(budget)


def test_the_front_is_a_pareto_front() -> None:
    confidences, correct = _table(5, 300, 8)
    result = calibrate(confidences, flops_cost(CUMULATIVE_5), 0.5, correct)
    front = result.front
    assert [s.cost for s in front] == sorted(s.cost for s in front)
    assert all(b.accuracy > a.accuracy for a, b in itertools.pairwise(front))
    everything = [*result.uniform, *result.curve, *front]
    assert pareto_front(everything) == front


def test_bootstrap_spread_brackets_the_choice() -> None:
    confidences, correct = _table(3, 200, 9)
    result = calibrate(confidences, flops_cost(CUMULATIVE_3), 0.6, correct, bootstraps=5)
    (low_cost, high_cost), (low_accuracy, high_accuracy) = result.stability
    assert low_cost <= high_cost and low_accuracy <= high_accuracy
    assert low_cost > 0.0 and high_accuracy <= 1.0


def test_settings_are_scored_as_the_runtime_would_exit() -> None:
    confidences, correct = _table(3, 100, 10)
    evaluation = Evaluation(confidences, np.stack(correct), flops_cost(CUMULATIVE_3))
    thresholds = np.array([0.8, 0.5])
    setting = evaluation.setting(thresholds, "direct")
    exits = simulate_exits(confidences, thresholds)
    assert setting.exit_counts.tolist() == np.bincount(exits, minlength=3).tolist()
    assert setting.accuracy == pytest.approx(np.stack(correct)[exits, np.arange(100)].mean())


def test_an_anchor_keeps_exits_in_place_among_equally_accurate_settings() -> None:
    """Every exit is always right, so every setting within the budget is equally accurate: without an anchor
    the search takes the costliest, with one it takes a setting that moves no sample off the anchor's exits
    (the anchor itself, "kept", when nothing else does as well), still within the budget."""
    confidences, _ = _table(3, 300, seed=5)
    correct = [np.ones(300, dtype=bool)] * 3
    cost_of = flops_cost(CUMULATIVE_3)
    anchor = np.array([0.8, 0.6])
    anchored = simulate_exits(confidences, anchor)
    budget = cost_of(anchored) + 0.01
    free = calibrate(confidences, cost_of, budget, correct)
    kept = calibrate(confidences, cost_of, budget, correct, anchor=anchor)
    assert kept.chosen.cost <= budget and kept.chosen.accuracy == free.chosen.accuracy == 1.0
    assert (simulate_exits(confidences, kept.chosen.thresholds) == anchored).all()
    assert (simulate_exits(confidences, free.chosen.thresholds) != anchored).any(), \
        "the test needs the costlier choice to move samples"
