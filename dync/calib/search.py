"""Thresholds searched directly: the most accurate setting within a budget, whatever family it belongs to.

The geometric family of exit shares (`budget.py`, as the MSDNet/RANet scripts do) fits poorly when early
exits are already accurate: a uniform threshold at every exit can then be both cheaper and more accurate.
So the search here evaluates, on the validation data, every setting of three kinds and keeps the best:

* `uniform`: one threshold t for every exit, t over quantiles of the pooled confidences;
* `geometric`: the budgeted-batch family (its settings come from `budget.budgeted_curve`);
* `direct`: per-exit thresholds over a grid of each exit's confidence quantiles (and "never"). Exhaustive
  when the grid's product is small (two or three exits), else coordinate ascent from the best settings of
  the other two kinds: each exit's threshold in turn is set to its best grid value, the others fixed,
  until no change helps. It starts from them, so it is never worse than either on the data it searches.

"Best" is the highest accuracy at a cost within the budget, the costlier on a tie (compute that the budget
allows can only help on unseen data). The accuracy/cost curve reported is the Pareto front of everything
evaluated. Without labels, the accuracy is the agreement with the last exit's prediction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dync.calib.budget import Calibration, CostOfExits, Setting, budgeted_curve, choose, simulate_exits

UNIFORM_GRID = 201
"""Quantiles of the pooled confidences tried as the uniform threshold."""
DIRECT_GRID = 32
"""Quantiles of each exit's confidences tried as its threshold by the direct search (plus "never")."""
EXHAUSTIVE_LIMIT = 20_000
"""The direct search tries every combination when there are at most this many, else coordinate ascent."""
STARTS = 3
"""Coordinate ascent starts from this many of the best uniform and geometric settings within the budget."""
MAX_ROUNDS = 20
GEOMETRIC_STRIDE = 10
"""Every this many geometric settings seed a bootstrap round's search."""


@dataclass
class Evaluation:
    """The validation data a setting is scored on: confidences and correctness per exit, and the cost model."""

    confidences: Sequence[np.ndarray]
    correct: np.ndarray  # [K, N] bool
    cost_of: CostOfExits

    def setting(self, thresholds: np.ndarray, family: str, q: float | None = None) -> Setting:
        exits = simulate_exits(self.confidences, thresholds)
        accuracy = float(self.correct[exits, np.arange(len(exits))].mean())
        return Setting(q, np.asarray(thresholds, dtype=np.float64), np.bincount(exits, minlength=len(self.correct)),
                       self.cost_of(exits), accuracy, family)


def uniform_curve(evaluation: Evaluation) -> list[Setting]:
    """One threshold at every exit, over quantiles of the confidences of the exits that can fire."""
    pooled = np.concatenate(list(evaluation.confidences[:-1]))
    exits = len(evaluation.confidences) - 1
    return [evaluation.setting(np.full(exits, t), "uniform") for t in _grid(pooled, UNIFORM_GRID)]


def _grid(values: np.ndarray, size: int) -> np.ndarray:
    """Distinct quantiles of `values`, and infinity (the exit never fires)."""
    return np.append(np.unique(np.quantile(values, np.linspace(0.0, 1.0, size))), np.inf)


def _key(setting: Setting, budget: float) -> tuple[bool, float, float]:
    """Within the budget first, then accuracy, then cost (the costlier on a tie)."""
    within = setting.cost <= budget
    return within, setting.accuracy, setting.cost if within else -setting.cost


def best_within(settings: Sequence[Setting], budget: float, moved: Callable[[Setting], int] | None = None
                ) -> Setting | None:
    """The most accurate setting costing at most `budget`; on a tie the costlier, or with `moved` (how many
    samples a setting sends elsewhere than a reference does) the one moving the fewest, then the costlier.
    None when no setting fits."""
    feasible = [s for s in settings if s.cost <= budget]
    if not feasible:
        return None
    if moved is None:
        return max(feasible, key=lambda s: (s.accuracy, s.cost))
    top = max(s.accuracy for s in feasible)
    return min((s for s in feasible if s.accuracy >= top), key=lambda s: (moved(s), -s.cost))


def direct_search(evaluation: Evaluation, budget: float, starts: Sequence[Setting]) -> list[Setting]:
    """Every setting the direct search evaluates (see the module docstring)."""
    grids = [_grid(c, DIRECT_GRID) for c in evaluation.confidences[:-1]]
    if np.prod([len(g) for g in grids], dtype=np.float64) <= EXHAUSTIVE_LIMIT:
        return [evaluation.setting(np.array(t), "direct") for t in itertools.product(*grids)]
    visited = []
    for start in starts:
        visited += _coordinate_ascent(evaluation, budget, grids, start)
    return visited


def _coordinate_ascent(evaluation: Evaluation, budget: float, grids: list[np.ndarray],
                       start: Setting) -> list[Setting]:
    best, visited = start, []
    for _ in range(MAX_ROUNDS):
        before = best
        for k, grid in enumerate(grids):
            for value in grid:
                thresholds = best.thresholds.copy()
                thresholds[k] = value
                trial = evaluation.setting(thresholds, "direct")
                visited.append(trial)
                if _key(trial, budget) > _key(best, budget):
                    best = trial
        if best is before:
            break
    return visited


def pareto_front(settings: Sequence[Setting]) -> list[Setting]:
    """The settings no other is both cheaper-or-equal and more accurate than, by increasing cost."""
    front: list[Setting] = []
    for setting in sorted(settings, key=lambda s: (s.cost, -s.accuracy)):
        if not front or setting.accuracy > front[-1].accuracy:
            front.append(setting)
    return front


def search(evaluation: Evaluation, budget: float, geometric: Sequence[Setting], anchor: np.ndarray | None = None
           ) -> tuple[Setting, list[Setting], list[Setting]]:
    """(the chosen setting, the uniform curve, the Pareto front of every setting evaluated). With `anchor`
    (thresholds chosen before, e.g. for the float32 package), those are a candidate too ("kept"), and among
    equally accurate settings the one that moves the fewest samples off the anchor's exits wins."""
    uniform = uniform_curve(evaluation)
    known = [*uniform, *geometric]
    moved = None
    if anchor is not None:
        known.append(evaluation.setting(anchor, "kept"))
        anchored = simulate_exits(evaluation.confidences, anchor)

        def moved(setting: Setting) -> int:
            return int((simulate_exits(evaluation.confidences, setting.thresholds) != anchored).sum())

    starts = sorted((s for s in known if s.cost <= budget), key=lambda s: (s.accuracy, s.cost), reverse=True)
    everything = [*known, *direct_search(evaluation, budget, starts[:STARTS])]
    chosen = best_within(everything, budget, moved)
    assert chosen is not None, "the caller checked that some setting fits the budget"
    return chosen, uniform, pareto_front(everything)


def bootstrap_spread(evaluation: Evaluation, budget: float, geometric: Sequence[Setting], rounds: int,
                     seed: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """How stable the choice is: the search rerun on `rounds` resamples of the data (with replacement), each
    choice scored on the whole set; the (min, max) of those costs and accuracies. The geometric settings of
    the whole set (every tenth q) are re-scored on each resample rather than searched again."""
    rng = np.random.default_rng(seed)
    size = len(evaluation.confidences[0])
    costs, accuracies = [], []
    for _ in range(rounds):
        pick = rng.integers(0, size, size)
        # costs depend on the exits taken only, so the same cost model serves a resample
        resampled = Evaluation([c[pick] for c in evaluation.confidences], evaluation.correct[:, pick],
                               evaluation.cost_of)
        rescored = [resampled.setting(s.thresholds, s.family, s.q) for s in geometric[::GEOMETRIC_STRIDE]]
        chosen, _, _ = search(resampled, budget, rescored)
        scored = evaluation.setting(chosen.thresholds, chosen.family)
        costs.append(scored.cost)
        accuracies.append(scored.accuracy)
    return (min(costs), max(costs)), (min(accuracies), max(accuracies))


def calibrate(
    confidences: Sequence[np.ndarray],
    cost_of: CostOfExits,
    budget: float,
    correct: Sequence[np.ndarray] | None = None,
    bootstraps: int = 0,
    anchor: np.ndarray | None = None,
) -> Calibration:
    """Thresholds for `budget`. With `correct` (per exit, whether each sample is classified right), the most
    accurate setting within the budget of the geometric, uniform and direct searches (`search.py`; nearest
    `anchor`'s exits on a tie, see `search`), and with `bootstraps` the spread of that choice over resamples;
    without, the geometric setting closest to the budget."""
    num_exits = len(confidences)
    size = len(confidences[0])
    at_exit = [np.full(size, k, dtype=np.int64) for k in range(num_exits)]
    min_cost = cost_of(at_exit[0])
    curve = budgeted_curve(confidences, cost_of, correct)
    anytime = [(cost_of(e), None if correct is None else float(c.mean()))
               for e, c in zip(at_exit, correct or [None] * num_exits, strict=True)]
    geometric = choose(curve, budget, min_cost)  # also refuses a budget nothing reaches
    if correct is None:
        return Calibration(geometric, curve, anytime, budget, min_cost)
    evaluation = Evaluation(confidences, np.stack(correct), cost_of)
    chosen, uniform, front = search(evaluation, budget, curve, anchor)
    stability = bootstrap_spread(evaluation, budget, curve, bootstraps) if bootstraps else None
    return Calibration(chosen, curve, anytime, budget, min_cost, uniform, front, stability)
