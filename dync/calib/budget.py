"""Exit thresholds for a cost budget: the budgeted-batch procedure of MSDNet and RANet (`search.py` puts
it beside a uniform and a direct search and chooses).

Exit shares come from a geometric family, p_k proportional to q^k (q < 1 favours early exits, q > 1 late
ones). For a given q, each exit's threshold is set from the sorted confidences of the samples still running
so that its share leaves there (`thresholds_for_shares`). Searching q over a fine log grid traces the
accuracy/cost curve; the chosen setting costs at most the budget and close to it, and with labels it is the
most accurate among those close to the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dync.calib.thresholds import thresholds_for_shares
from dync.errors import InputError

Q_GRID = np.geomspace(1e-3, 1e3, 601)
NEAR_BUDGET = 0.9
"""Settings costing at least this fraction of the budget count as close to it."""

CostOfExits = Callable[[np.ndarray], float]
"""Mean cost of a batch whose samples take the given exits, as a fraction of the full model's cost."""


@dataclass
class Setting:
    """One setting of the thresholds: the exit counts, cost and accuracy it gives on the validation data, and
    the family it came from ("geometric", with its q; "uniform"; "direct", see `search.py`)."""

    q: float | None
    thresholds: np.ndarray
    exit_counts: np.ndarray
    cost: float
    accuracy: float | None
    family: str = "geometric"


@dataclass
class Calibration:
    """The chosen setting; the geometric `curve`, the `uniform` one and the Pareto `front` of every setting
    evaluated (empty without accuracies); `stability`: the (min, max) cost and accuracy of the choice rerun
    on bootstrap resamples (None when not measured)."""

    chosen: Setting
    curve: list[Setting]
    anytime: list[tuple[float, float | None]]
    budget: float
    min_cost: float
    uniform: list[Setting] = field(default_factory=list)
    front: list[Setting] = field(default_factory=list)
    stability: tuple[tuple[float, float], tuple[float, float]] | None = None


def geometric_shares(q: float, num_exits: int) -> np.ndarray:
    weights = q ** np.arange(num_exits, dtype=np.float64)
    return weights / weights.sum()


def simulate_exits(confidences: Sequence[np.ndarray], thresholds: np.ndarray) -> np.ndarray:
    """The exit each sample takes under the runtime's rule, without running the model."""
    num_exits = len(confidences)
    exits = np.full(len(confidences[0]), num_exits - 1, dtype=np.int64)
    running = np.ones(len(exits), dtype=bool)
    for k in range(num_exits - 1):
        leave = running & (confidences[k] >= thresholds[k])
        exits[leave] = k
        running &= ~leave
    return exits


def flops_cost(cumulative_macs: Sequence[float]) -> CostOfExits:
    cumulative = np.asarray(cumulative_macs, dtype=np.float64)
    return lambda exits: float(cumulative[exits].mean() / cumulative[-1])


def budgeted_curve(
    confidences: Sequence[np.ndarray],
    cost_of: CostOfExits,
    correct: Sequence[np.ndarray] | None = None,
) -> list[Setting]:
    """The setting for every q of the grid; `correct[k][i]` says whether exit k classifies sample i right."""
    num_exits = len(confidences)
    index = np.arange(len(confidences[0]))
    curve = []
    for q in Q_GRID:
        thresholds = thresholds_for_shares(confidences, geometric_shares(q, num_exits))
        exits = simulate_exits(confidences, thresholds)
        accuracy = None if correct is None else float(np.stack(correct)[exits, index].mean())
        curve.append(Setting(float(q), thresholds, np.bincount(exits, minlength=num_exits), cost_of(exits), accuracy))
    return curve


def choose(curve: list[Setting], budget: float, min_cost: float) -> Setting:
    """The most accurate setting among those at most the budget and close to it (without labels: the
    costliest setting within the budget)."""
    if budget < min_cost:
        raise InputError(
            f"budget {budget:g} is below the cheapest achievable cost {min_cost:.3f} of the full model "
            f"(every sample at exit 0); ask for at least {min_cost:.3f}."
        )
    feasible = [s for s in curve if s.cost <= budget]
    if not feasible:  # on many samples, even the smallest q of the grid sends a few past exit 0
        cheapest = math.ceil(min(s.cost for s in curve) * 1e4) / 1e4
        raise InputError(
            f"budget {budget:g} is below the cheapest cost the threshold search reaches on this data, about "
            f"{cheapest:.4f} (a few samples always go past exit 0); ask for at least {cheapest:.4f}."
        )
    closest = max(s.cost for s in feasible)
    near = [s for s in feasible if s.cost >= min(NEAR_BUDGET * budget, closest)]
    if near[0].accuracy is None:
        return max(near, key=lambda s: s.cost)
    return max(near, key=lambda s: (s.accuracy, s.cost))
