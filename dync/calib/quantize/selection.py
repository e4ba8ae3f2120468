"""Which op types of a stage run in int8 on this CPU: those that keep the stage's accuracy and measured faster.

Convolutions and matrix products with weights are what int8 is for. The other op types onnxruntime can run
in int8 (a residual Add, a Concat, a pooling) are judged per stage, in two passes:

- **accuracy**: an op type goes back to float when that at least halves the stage's output error against
  float32 on the calibration samples. A transformer's residual stream carries outliers that one per-tensor
  int8 scale rounds away: quantizing its Adds took a random-weight ViT-S's logit error from 0.10 to 0.39 of
  the largest logit, while a ResNet's residual Adds cost next to nothing;
- **speed**: the Q/DQ pairs around cheap or memory-bound ops can cost more than the op saves, and which do
  depends on the machine and the shapes. The stage is timed in float32 and in int8, then with each
  remaining op type left in float in turn, keeping every change that is faster, side by side
  (`dync.timing.median_times`). A stage whose int8 form is no faster than float32 runs float32.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from dync.layers import WEIGHTED_OPS
from dync.runtime.backends.ort import OrtSettings, session_from_onnx, with_batch
from dync.timing import median_times

MEASURE_BATCH = 8
ERROR_SAMPLES = 32
REPEATS = 10
FASTER = 0.97
"""A change is kept when it takes at most this fraction of the time without it (noise is a few percent)."""
MORE_ACCURATE = 0.5
"""An op type goes back to float when that leaves at most this fraction of the stage's error."""

Quantize = Callable[[Sequence[str]], onnx.ModelProto]
"""The stage quantized with these op types (the others in float)."""
Timer = Callable[[dict[str, onnx.ModelProto]], dict[str, float]]
"""Seconds per call of each named model, measured side by side."""
Error = Callable[[onnx.ModelProto], float]
"""A quantized stage's largest output error against float32, relative to each output's largest value."""


@dataclass(frozen=True)
class CpuChoice:
    """The CPU form chosen: None where no int8 form beat float32; the op types left in float because they
    cost accuracy (`inaccurate`) or measured slower (`reverted`); float32's time over the chosen form's
    (None where nothing was timed)."""

    model: onnx.ModelProto | None
    reverted: list[str]
    speedup: float | None
    inaccurate: list[str]


def choose_cpu_form(stage: onnx.ModelProto, quantize: Quantize, op_types: Sequence[str], error: Error,
                    timer: Timer | None, floats: Collection[str] = ()) -> CpuChoice:
    """Both passes over the op types the stage has outside the nodes kept in float (`floats`), the most
    frequent first; `timer` None skips the speed pass."""
    forms: dict[tuple[str, ...], onnx.ModelProto] = {}

    def form(types: Sequence[str]) -> onnx.ModelProto:
        if tuple(types) not in forms:
            forms[tuple(types)] = quantize(types)
        return forms[tuple(types)]

    kept = list(op_types)
    present = Counter(node.op_type for node in stage.graph.node if node.op_type in kept and node.name not in floats)
    order = [op_type for op_type, _ in present.most_common()]
    kept, inaccurate = _accuracy_pass(kept, [t for t in order if t not in WEIGHTED_OPS], form, error)
    if timer is None:
        return CpuChoice(form(kept), [], None, inaccurate)
    times = timer({"float32": stage, "int8": form(kept)})
    float_time, best_time = times["float32"], times["int8"]
    reverted: list[str] = []
    for op_type in (t for t in order if t in kept):
        trial = [t for t in kept if t != op_type]
        pair = timer({"kept": form(kept), "trial": form(trial)})
        if pair["trial"] <= FASTER * pair["kept"]:
            best_time *= pair["trial"] / pair["kept"]
            kept = trial
            reverted.append(op_type)
    if best_time > FASTER * float_time:
        return CpuChoice(None, sorted(set(order) - set(inaccurate)), 1.0, inaccurate)
    return CpuChoice(form(kept), reverted, float_time / best_time, inaccurate)


def _accuracy_pass(kept: list[str], candidates: list[str], form: Quantize, error: Error
                   ) -> tuple[list[str], list[str]]:
    current = error(form(kept))
    inaccurate = []
    for op_type in candidates:
        trial = [t for t in kept if t != op_type]
        trial_error = error(form(trial))
        if trial_error <= MORE_ACCURATE * current:
            kept, current = trial, trial_error
            inaccurate.append(op_type)
    return kept, inaccurate


def _session(model: onnx.ModelProto, batch: int, settings: OrtSettings):
    """The stage as the runtime runs it at a fixed batch: plugin nodes on their fast CPU path, no spinning
    (stages run one after another)."""
    from dync.plugins.splice import specialize_custom_nodes

    return session_from_onnx(with_batch(specialize_custom_nodes(model, batch), batch), settings, spinning=False)


def onnxruntime_timer(feeds: dict[str, np.ndarray], settings: OrtSettings | None = None) -> Timer:
    """Times models on the first `MEASURE_BATCH` rows of `feeds` under the settings stages run with."""
    settings = settings or OrtSettings()
    rows = {name: value[:MEASURE_BATCH] for name, value in feeds.items()}
    batch = len(next(iter(rows.values())))

    def time_models(models: dict[str, onnx.ModelProto]) -> dict[str, float]:
        sessions = {name: _session(model, batch, settings) for name, model in models.items()}
        return median_times({name: (lambda s=s: s.run(None, rows)) for name, s in sessions.items()},
                            repeats=REPEATS)

    return time_models


def onnxruntime_error(stage: onnx.ModelProto, feeds: dict[str, np.ndarray], settings: OrtSettings | None = None
                      ) -> Error:
    """The error of a quantized stage against `stage` on the first `ERROR_SAMPLES` rows of `feeds`."""
    settings = settings or OrtSettings()
    rows = {name: value[:ERROR_SAMPLES] for name, value in feeds.items()}
    batch = len(next(iter(rows.values())))
    reference = _session(stage, batch, settings).run(None, rows)

    def error(model: onnx.ModelProto) -> float:
        outputs = _session(model, batch, settings).run(None, rows)
        return max(float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-12))
                   for got, ref in zip(outputs, reference, strict=True) if ref.dtype.kind == "f" and ref.size)

    return error
