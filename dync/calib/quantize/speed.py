"""Which op types of a stage run in int8 on this CPU: those whose int8 form measured faster, per stage.

onnxruntime's int8 kernels are fast for convolutions and matrix products on a CPU with VNNI, but the Q/DQ
pairs around cheap or memory-bound ops (a residual Add, a Concat, a pooling) can cost more than the op
saves, and which do depends on the machine and the shapes. So each stage is timed in float32 and in int8,
then with each quantized op type left in float in turn, keeping every change that is faster, side by side
(`dync.timing.median_times`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from dync.runtime.backends.ort import OrtSettings, session_from_onnx, with_batch
from dync.timing import median_times

MEASURE_BATCH = 8
REPEATS = 10
FASTER = 0.97
"""A change is kept when it takes at most this fraction of the time without it (noise is a few percent)."""

Quantize = Callable[[Sequence[str]], onnx.ModelProto]
"""The stage quantized with these op types (the others in float)."""
Timer = Callable[[dict[str, onnx.ModelProto]], dict[str, float]]
"""Seconds per call of each named model, measured side by side."""


@dataclass(frozen=True)
class CpuChoice:
    """The CPU form chosen: None where no int8 form beat float32; the op types left in float because they
    measured slower; float32's time over the chosen form's (None where nothing was timed)."""

    model: onnx.ModelProto | None
    reverted: list[str]
    speedup: float | None


def fastest_cpu_form(stage: onnx.ModelProto, quantize: Quantize, op_types: Sequence[str], timer: Timer,
                     floats: Collection[str] = ()) -> CpuChoice:
    """Greedy over the op types the stage has outside the nodes kept in float (`floats`), the most frequent
    first: an op type goes back to float when that is faster."""
    kept = list(op_types)
    best = quantize(kept)
    present = Counter(node.op_type for node in stage.graph.node if node.op_type in kept and node.name not in floats)
    times = timer({"float32": stage, "int8": best})
    float_time, best_time = times["float32"], times["int8"]
    reverted: list[str] = []
    for op_type, _count in present.most_common():
        trial_types = [t for t in kept if t != op_type]
        trial = quantize(trial_types)
        trial_time = timer({"kept": best, "trial": trial})
        if trial_time["trial"] <= FASTER * trial_time["kept"]:
            best_time *= trial_time["trial"] / trial_time["kept"]
            kept, best = trial_types, trial
            reverted.append(op_type)
    if best_time > FASTER * float_time:
        return CpuChoice(None, sorted(present), 1.0)
    return CpuChoice(best, reverted, float_time / best_time)


def onnxruntime_timer(feeds: dict[str, np.ndarray], settings: OrtSettings | None = None) -> Timer:
    """Times models on the first `MEASURE_BATCH` rows of `feeds` under the settings stages run with (fixed
    batch, plugin nodes on their fast CPU path, no spinning: stages run one after another)."""
    from dync.plugins.splice import specialize_custom_nodes

    settings = settings or OrtSettings()
    rows = {name: value[:MEASURE_BATCH] for name, value in feeds.items()}
    batch = len(next(iter(rows.values())))

    def time_models(models: dict[str, onnx.ModelProto]) -> dict[str, float]:
        sessions = {name: session_from_onnx(with_batch(specialize_custom_nodes(model, batch), batch), settings,
                                            spinning=False) for name, model in models.items()}
        return median_times({name: (lambda s=s: s.run(None, rows)) for name, s in sessions.items()},
                            repeats=REPEATS)

    return time_models
