"""`dync calibrate`: thresholds for a compute or latency budget, stored in the package.

The static full model is run once over the validation data to get every exit's logits; everything after
that (the q search, accuracy, predicted cost) is simulated from those logits, so calibration costs one pass.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dync.calib.budget import Calibration, CostOfExits, flops_cost
from dync.calib.search import calibrate
from dync.errors import InputError
from dync.inputs import Inputs, batch_of
from dync.package import load_manifest, write_manifest
from dync.records import CalibrationRecord
from dync.runtime.engine import Engine

METRICS = ("flops", "latency")
MIN_SAMPLES = 2
"""Fewer leave no share to put at any exit but one."""
PASS_BATCH = 256


@dataclass
class BudgetRequest:
    """Either `budget` (fraction of the full model) or, with the latency metric, `budget_ms` per sample."""

    metric: str = "flops"
    budget: float | None = None
    budget_ms: float | None = None
    batch_size: int = 64

    def check(self) -> None:
        if self.metric not in METRICS:
            raise InputError(f"metric '{self.metric}' is unknown; choose one of {list(METRICS)}.")
        if (self.budget is None) == (self.budget_ms is None):
            raise InputError("give exactly one of --budget (fraction of the full model) and --budget-ms.")
        if self.budget_ms is not None and self.metric != "latency":
            raise InputError("--budget-ms is a latency budget; add --metric latency.")
        if self.budget is not None and not 0 < self.budget < math.inf:
            raise InputError(f"budget {self.budget} must be a positive fraction of the full model, e.g. 0.5.")
        if self.budget_ms is not None and not 0 < self.budget_ms < math.inf:
            raise InputError(f"--budget-ms {self.budget_ms} must be a positive number of milliseconds.")
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size} must be at least 1.")


def exit_outputs(engine: Engine, data: Inputs) -> list[np.ndarray]:
    """Every exit's output for every sample, from the static full model, in bounded-size batches."""
    feeds = engine.input_feeds(data)
    chunks = [engine.backend.run_static({name: value[i : i + PASS_BATCH] for name, value in feeds.items()})
              for i in range(0, batch_of(feeds), PASS_BATCH)]
    return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(engine.num_exits)]


def check_labels(labels: np.ndarray | None, samples: int, num_classes: int) -> None:
    if labels is None:
        return
    if labels.ndim != 1 or len(labels) != samples:
        raise InputError(
            f"labels have shape {list(labels.shape)} but the data has {samples} samples; "
            f"give one integer class per sample, shape [{samples}]."
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(f"labels must be integer classes in 0..{num_classes - 1}; got {labels.dtype} values.")


def latency_cost(engine: Engine, batch_size: int) -> CostOfExits:
    """Predicted time of running the data in batches of `batch_size`, as a fraction of the full model's."""
    from dync.calib.profile import load_profile

    profile = load_profile(engine.package_dir, engine.profile_name)
    full: dict[int, float] = {}  # the denominator depends on the sample count only; searches ask thousands of times

    def cost(exits: np.ndarray) -> float:
        counts = np.zeros((-(-len(exits) // batch_size), profile.num_stages), dtype=np.int64)
        np.add.at(counts, (np.arange(len(exits)) // batch_size, exits), 1)  # exit counts per batch of the data
        if len(exits) not in full:
            full[len(exits)] = sum(profile.predict_full_seconds(int(n)) for n in counts.sum(axis=1))
        return profile.predict_batches_seconds(counts) / full[len(exits)]

    return cost


def full_model_ms_per_sample(engine: Engine, batch_size: int) -> float:
    from dync.calib.profile import load_profile

    profile = load_profile(engine.package_dir, engine.profile_name)
    return profile.predict_full_seconds(batch_size) / batch_size * 1e3


BOOTSTRAPS = 5
"""Resamples the choice is rerun on to say how stable it is."""


def calibrate_package(
    engine: Engine, data: Inputs, request: BudgetRequest, labels: np.ndarray | None = None,
    anchor: np.ndarray | None = None, outputs: list[np.ndarray] | None = None,
) -> Calibration:
    """Choose thresholds for the budget, store them in the package, and return the whole curve; `anchor`:
    thresholds to stay near among equally accurate settings (`dync.calib.search.search`); `outputs`: every
    exit's outputs on `data` (`exit_outputs`), when the caller has them already."""
    request.check()
    feeds = engine.input_feeds(data)
    engine.check_feeds(feeds)
    if batch_of(feeds) < MIN_SAMPLES:
        raise InputError(f"calibration needs at least {MIN_SAMPLES} samples to set thresholds from, got "
                         f"{batch_of(feeds)}; give a validation set.")
    outputs = exit_outputs(engine, feeds) if outputs is None else outputs
    check_labels(labels, batch_of(feeds), outputs[0].shape[-1])
    if request.metric == "flops":
        cost_of = flops_cost([e.cumulative_macs for e in engine.manifest.exits])
    else:
        cost_of = latency_cost(engine, request.batch_size)
    budget = request.budget
    if budget is None:
        budget = request.budget_ms / full_model_ms_per_sample(engine, request.batch_size)
    confidences = engine.criteria.confidences(outputs)
    truth = outputs[-1].argmax(axis=-1) if labels is None else labels  # without labels: agreement with the full model
    correct = [o.argmax(axis=-1) == truth for o in outputs]
    result = calibrate(confidences, cost_of, budget, correct, bootstraps=BOOTSTRAPS, anchor=anchor)
    _store(engine, result, request, batch_of(feeds))
    return result


def _store(engine: Engine, result: Calibration, request: BudgetRequest, samples: int) -> None:
    """The thresholds go to the engine (its runs use them) and to the manifest on disk, for the engine's
    precision: the exits' for float32, the quantization record's for int8 and fp8."""
    chosen = result.chosen
    thresholds = [float(t) if np.isfinite(t) else 2.0 for t in chosen.thresholds]  # above 1: never fires
    for exit_spec, threshold in zip(engine.manifest.exits[:-1], thresholds, strict=True):
        exit_spec.threshold = threshold
    record = CalibrationRecord(
        metric=request.metric,
        budget=result.budget,
        budget_ms=request.budget_ms,
        batch_size=request.batch_size if request.metric == "latency" else None,
        q=chosen.q,
        family=chosen.family,
        expected_cost=chosen.cost,
        expected_accuracy=chosen.accuracy,
        exit_counts=chosen.exit_counts.tolist(),
        samples=samples,
        min_cost=result.min_cost,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest = load_manifest(engine.package_dir)
    if engine.precision == "fp32":
        for exit_spec, threshold in zip(manifest.exits[:-1], thresholds, strict=True):
            exit_spec.threshold = threshold
        manifest.calibration = record
    else:
        assert manifest.quantization is not None and manifest.quantization.format == engine.precision
        manifest.quantization = replace(manifest.quantization, thresholds=thresholds, calibration=record)
    write_manifest(Path(engine.package_dir), manifest)


def format_calibration(result: Calibration, metric: str) -> str:
    chosen = result.chosen
    source = f"q={chosen.q:.3g}" if chosen.q is not None else f"{chosen.family} search"
    lines = [
        f"budget {result.budget:.3f} x full ({metric}); cheapest possible {result.min_cost:.3f}",
        f"chosen ({source}): expected cost {chosen.cost:.3f} x full, accuracy {chosen.accuracy:.2%}, "
        f"exits {chosen.exit_counts.tolist()}",
        f"thresholds {[round(float(t), 4) for t in chosen.thresholds]}",
    ]
    if result.stability is not None:
        (low_cost, high_cost), (low_accuracy, high_accuracy) = result.stability
        lines.append(f"stability: rerun on {BOOTSTRAPS} bootstrap resamples, the choice costs {low_cost:.3f}-"
                     f"{high_cost:.3f} and scores {low_accuracy:.2%}-{high_accuracy:.2%} on this data")
    lines += ["", "best accuracy within each cost (without labels: agreement with the last exit):",
              "| cost <= | all searches (Pareto front) | uniform thresholds | geometric shares |",
              "| --- | --- | --- | --- |"]
    for level in np.linspace(0.1, 1.0, 10):
        cells = [_best_under(settings, level) for settings in (result.front, result.uniform, result.curve)]
        lines.append(f"| {level:.1f} | {' | '.join(cells)} |")
    lines += ["", "anytime (every sample at one exit):", "| exit | cost | accuracy |", "| --- | --- | --- |"]
    lines += [f"| {k} | {cost:.3f} | {acc:.2%} |" for k, (cost, acc) in enumerate(result.anytime)]
    return "\n".join(lines)


def _best_under(settings: list, level: float) -> str:
    under = [s.accuracy for s in settings if s.cost <= level + 1e-9]
    return f"{max(under):.2%}" if under else "-"
