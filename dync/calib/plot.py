"""The accuracy/cost picture of a calibration: matplotlib, written to a file (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dync.calib.budget import Calibration


def plot_calibration(calibration: Calibration, path: str | Path, metric: str) -> Path:
    """Left: accuracy against cost (the Pareto front of every search, the uniform and geometric curves, anytime
    exits, the chosen point); without accuracies, the cost each q gives. Right: how many samples leave at each
    exit in the chosen setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    chosen = calibration.chosen
    figure, (curve_axes, histogram_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    if chosen.accuracy is not None:
        for settings, style, label in ((calibration.front, "-", "Pareto front of every search"),
                                       (calibration.uniform, ":", "uniform threshold"),
                                       (calibration.curve, "--", "budgeted batch (geometric q)")):
            if settings:
                ordered = sorted(settings, key=lambda s: s.cost)
                curve_axes.plot([s.cost for s in ordered], [s.accuracy for s in ordered], style, label=label)
        anytime_costs, anytime_accuracy = zip(*calibration.anytime, strict=True)
        curve_axes.plot(anytime_costs, anytime_accuracy, "s--", label="anytime (every sample at exit k)")
        curve_axes.plot([chosen.cost], [chosen.accuracy], "r*", markersize=14, label="chosen")
        curve_axes.axvline(calibration.budget, color="gray", linestyle=":", label=f"budget {calibration.budget:.2f}")
        curve_axes.set_xlabel(f"mean {metric} cost / full model")
        curve_axes.set_ylabel("accuracy")
    else:
        costs = np.array([s.cost for s in calibration.curve])
        curve_axes.semilogx([s.q for s in calibration.curve], costs, label="cost for q")
        curve_axes.plot([chosen.q], [chosen.cost], "r*", markersize=14, label="chosen")
        curve_axes.set_xlabel("q (exit shares proportional to q^k)")
        curve_axes.set_ylabel(f"mean {metric} cost / full model")
        curve_axes.axhline(calibration.budget, color="gray", linestyle=":", label=f"budget {calibration.budget:.2f}")
    curve_axes.legend(loc="lower right")
    curve_axes.grid(alpha=0.3)
    exits = np.arange(len(chosen.exit_counts))
    histogram_axes.bar(exits, chosen.exit_counts)
    histogram_axes.set_xticks(exits)
    histogram_axes.set_xlabel("exit")
    histogram_axes.set_ylabel("samples")
    source = f"q = {chosen.q:.3g}" if chosen.q is not None else f"the {chosen.family} search's thresholds"
    histogram_axes.set_title(f"exits taken at {source}, cost {chosen.cost:.3f}")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
