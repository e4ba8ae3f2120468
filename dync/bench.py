"""`dync bench`: a package's early-exit run against the static full model, side by side in one run.

Reported per setting, all as ratios of medians measured in interleaved rounds:
- realized speedup: static full model time / dync time;
- theoretical speedup: full MACs / average MACs per sample at the exits taken;
- efficiency: ideal time / dync time, where the ideal charges each sample only for the stages up to its
  exit, using the times measured by forcing the whole batch to each exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dync.calib.thresholds import even_split_thresholds
from dync.errors import PackageError
from dync.inputs import Inputs, batch_of
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds, resolve_thresholds
from dync.timing import median_times


@dataclass
class BenchReport:
    batch: int
    thresholds: list[float]
    threshold_source: str
    exit_counts: list[int]
    theoretical_speedup: float
    realized_speedup: float
    ideal_speedup: float
    efficiency: float
    forced_exit_speedup: list[float]
    static_ms: float
    dync_ms: float
    predicted_over_measured: float | None
    settings: dict

    def to_json(self) -> dict:
        return asdict(self)


def spreading_thresholds(engine: Engine, x: Inputs) -> np.ndarray:
    """Thresholds sending an equal share of `x` to each exit, for packages that carry none."""
    outputs = engine.backend.run_static(engine.input_feeds(x))
    return even_split_thresholds(engine.criteria.confidences(outputs))


def predicted_seconds(engine: Engine, exits: np.ndarray) -> float | None:
    """The run's time predicted from the package's latency profile, when it has one for this backend."""
    from dync.calib.profile import load_profile

    try:
        profile = load_profile(engine.package_dir, engine.backend.name)
    except PackageError:
        return None
    return profile.predict_batch_seconds(exits)


def bench(
    engine: Engine,
    x: Inputs,
    thresholds: Sequence[float] | None = None,
    repeats: int = 15,
    warmup: int = 2,
) -> BenchReport:
    engine.check_input(x)
    source = "given" if thresholds is not None else "package"
    if thresholds is None:
        thresholds = engine.manifest.thresholds
    if thresholds is None:
        thresholds, source = spreading_thresholds(engine, x), "even split of this data"
    resolved = resolve_thresholds(thresholds, engine.num_exits)
    feeds = engine.input_feeds(x)
    variants = {"static": lambda: engine.backend.run_static(feeds), "dync": lambda: engine.execute(x, resolved)}
    for k in range(engine.num_exits):
        forced = forcing_thresholds(k, engine.num_exits)
        variants[f"exit{k}"] = lambda forced=forced: engine.execute(x, forced)
    times = median_times(variants, repeats=repeats, warmup=warmup)
    exits = engine.execute(x, resolved).exit
    counts = np.bincount(exits, minlength=engine.num_exits)
    predicted = predicted_seconds(engine, exits)
    shares = counts / counts.sum()
    cumulative = np.array([e.cumulative_macs for e in engine.manifest.exits], dtype=np.float64)
    forced_times = np.array([times[f"exit{k}"] for k in range(engine.num_exits)])
    ideal = float(shares @ forced_times)
    return BenchReport(
        batch=batch_of(engine.input_feeds(x)),
        thresholds=[float(t) for t in resolved],
        threshold_source=source,
        exit_counts=counts.tolist(),
        theoretical_speedup=float(cumulative[-1] / (shares @ cumulative)),
        realized_speedup=times["static"] / times["dync"],
        ideal_speedup=times["static"] / ideal,
        efficiency=ideal / times["dync"],
        forced_exit_speedup=[times["static"] / t for t in forced_times],
        static_ms=times["static"] * 1e3,
        dync_ms=times["dync"] * 1e3,
        predicted_over_measured=None if predicted is None else predicted / times["dync"],
        settings=engine.backend.describe(),
    )


def format_report(report: BenchReport) -> str:
    lines = [
        f"batch {report.batch}, thresholds {[round(t, 4) for t in report.thresholds]} ({report.threshold_source})",
        f"exit counts {report.exit_counts}",
        f"backend {report.settings}",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| realized speedup (static / dync) | {report.realized_speedup:.2f}x |",
        f"| theoretical speedup (MACs) | {report.theoretical_speedup:.2f}x |",
        f"| ideal speedup (forced-exit times) | {report.ideal_speedup:.2f}x |",
        f"| efficiency (ideal / dync time) | {report.efficiency:.2f} |",
    ]
    lines += [f"| all samples at exit {k}: speedup | {s:.2f}x |" for k, s in enumerate(report.forced_exit_speedup)]
    predicted = report.predicted_over_measured
    lines.append("| dync time predicted by the profile / measured | "
                 + ("no profile: run `dync profile` |" if predicted is None else f"{predicted:.2f} |"))
    return "\n".join(lines)
