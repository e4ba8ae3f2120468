"""`dync bench`: a package's early-exit run against the static full model, side by side in one run.

Reported per setting, all as ratios of medians measured in interleaved rounds:
- realized speedup: static full model time / dync time;
- theoretical speedup: full MACs / average MACs per sample at the exits taken;
- efficiency: ideal time / dync time, where the ideal charges each sample only for the stages up to its
  exit, using the times measured by forcing the whole batch to each exit.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
        profile = load_profile(engine.package_dir, engine.profile_name)
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


@dataclass
class TimeShares:
    """Where a package's run spends its time, from the backend's per-node profile: kernel seconds per stage
    (and the one-graph executor's exit rule) and per op type, over `runs` runs."""

    batch: int
    runs: int
    wall_seconds: float
    by_stage: dict[str, dict[str, float]]
    by_op_type: dict[str, tuple[float, int]]
    """op type -> (seconds, number of nodes)."""

    @property
    def kernel_seconds(self) -> float:
        return sum(sum(ops.values()) for ops in self.by_stage.values())


def time_shares(package: Path, x: Inputs, thresholds: Sequence[float] | None = None, runs: int = 20,
                **settings: Any) -> TimeShares:
    """Runs the package `runs` times (after one untimed run) on onnxruntime sessions that profile every node,
    with the package's thresholds unless given, and sums the kernel times."""
    from dync.runtime.backends.kernels import EXIT_RULE

    with tempfile.TemporaryDirectory(prefix="dync-profile-") as scratch:
        engine = Engine.load(package, **settings, profile_dir=scratch)
        resolved = resolve_thresholds(thresholds if thresholds is not None else engine.manifest.thresholds,
                                      engine.num_exits)
        engine.execute(x, resolved)
        start = time.perf_counter()
        for _ in range(runs):
            engine.execute(x, resolved)
        wall = time.perf_counter() - start
        kernels = engine.backend.kernel_times()
    names = {k: s.name for k, s in enumerate(engine.manifest.stages)} | {EXIT_RULE: EXIT_RULE}
    by_stage: dict[str, dict[str, float]] = {name: {} for name in names.values()}
    by_op: dict[str, list] = {}
    nodes: dict[str, set[str]] = {}
    for kernel in kernels:
        ops = by_stage.setdefault(names[kernel.stage], {})
        ops[kernel.op_type] = ops.get(kernel.op_type, 0.0) + kernel.seconds
        by_op.setdefault(kernel.op_type, []).append(kernel.seconds)
        nodes.setdefault(kernel.op_type, set()).add(kernel.node)
    by_stage = {name: ops for name, ops in by_stage.items() if ops}
    return TimeShares(batch=batch_of(engine.input_feeds(x)), runs=runs, wall_seconds=wall, by_stage=by_stage,
                      by_op_type={op: (sum(t), len(nodes[op])) for op, t in by_op.items()})


def format_time_shares(shares: TimeShares, top: int = 12) -> str:
    kernel = shares.kernel_seconds
    lines = [f"where the time goes: {shares.runs} runs at batch {shares.batch} (onnxruntime's profiler)",
             f"kernels take {kernel / shares.wall_seconds:.0%} of the wall time; the rest is the executor's own "
             "cost and onnxruntime's per-call cost", "",
             "| stage | share of kernel time | op types (share of the stage) |", "| --- | --- | --- |"]
    for stage, ops in shares.by_stage.items():
        total = sum(ops.values())
        mix = ", ".join(f"{op} {t / total:.0%}" for op, t in sorted(ops.items(), key=lambda i: -i[1])[:4])
        lines.append(f"| {stage} | {total / kernel:.1%} | {mix} |")
    lines += ["", "| op type | share of kernel time | nodes |", "| --- | --- | --- |"]
    ranked = sorted(shares.by_op_type.items(), key=lambda item: -item[1][0])
    lines += [f"| {op} | {seconds / kernel:.1%} | {count} |" for op, (seconds, count) in ranked[:top]]
    if len(ranked) > top:
        rest = sum(seconds for _, (seconds, _) in ranked[top:])
        lines.append(f"| {len(ranked) - top} other op types | {rest / kernel:.1%} | |")
    return "\n".join(lines)
