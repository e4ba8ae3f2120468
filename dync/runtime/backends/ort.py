"""onnxruntime CPU backend: one InferenceSession per stage, built once at load, with explicit options.

Session options are explicit (threads, graph optimization level, spinning) so that `bench` compares dync
and the static baseline under identical settings and can print them.

Spinning is off by default: each stage session owns an intra-op thread pool, and pools that spin-wait after
their stage finishes steal the cores the next stage's pool needs (on 2 cores this dominated batch-1
latency through 7 stages).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from dync.errors import InputError
from dync.package import Manifest, StageSpec

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OrtSettings:
    """Session settings shared by every stage and by any baseline measured against them."""

    threads: int = 0
    optimization: str = "all"
    spinning: bool = False

    def __post_init__(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise InputError(
                f"onnxruntime optimization level '{self.optimization}' is unknown; "
                f"choose one of {sorted(OPTIMIZATION_LEVELS)}."
            )
        if self.threads < 0:
            raise InputError(f"thread count {self.threads} must be >= 0 (0 means one per CPU core).")

    @property
    def intra_op_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "intra_op_threads": self.intra_op_threads, "provider": "CPUExecutionProvider"}


def session_from_onnx(model: onnx.ModelProto | str | Path, settings: OrtSettings) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, settings.session_options(), providers=["CPUExecutionProvider"])


MAX_SPECIALIZED = 8  # batch sizes a stage keeps specialized sessions for; others share the portable one


class StageSession:
    """What runs one stage: its session, or for `dync::` plugin nodes, sessions onnxruntime can run.

    Plugin nodes with a fast CPU path (e.g. PerSampleConv2d) get a graph specialized per batch size, built on
    the first call with that size (the first MAX_SPECIALIZED sizes); other sizes and other plugin nodes run
    the portable decomposition.
    """

    def __init__(self, path: Path, settings: OrtSettings, custom_ops: bool) -> None:
        from dync.plugins import decompose_custom_nodes, has_fast_cpu_path

        self._settings = settings
        self._model = onnx.load(path) if custom_ops else None
        self._specialize = self._model is not None and has_fast_cpu_path(self._model)
        portable = path if self._model is None else decompose_custom_nodes(self._model)
        self._portable = session_from_onnx(portable, settings)
        self._by_batch: dict[int, ort.InferenceSession] = {}

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session(len(next(iter(feeds.values())))).run(names, feeds)

    def _session(self, batch: int) -> ort.InferenceSession:
        if not self._specialize or (batch not in self._by_batch and len(self._by_batch) >= MAX_SPECIALIZED):
            return self._portable
        if batch not in self._by_batch:
            from dync.plugins import specialize_custom_nodes

            self._by_batch[batch] = session_from_onnx(_with_batch(specialize_custom_nodes(self._model, batch), batch),
                                                      self._settings)
        return self._by_batch[batch]


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """`model` with its inputs' batch dim fixed, so onnxruntime folds the shape arithmetic that reads it."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return model


class OrtBackend:
    name = "ort"

    def __init__(self, package_dir: Path, manifest: Manifest, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(OrtSettings.__dataclass_fields__))
        if unknown:
            raise InputError(
                f"onnxruntime backend options {unknown} are unknown; use {sorted(OrtSettings.__dataclass_fields__)}."
            )
        self.settings = OrtSettings(**settings)
        self._sessions = {s.name: StageSession(Path(package_dir) / s.onnx, self.settings, bool(manifest.custom_ops))
                          for s in manifest.stages}
        self._outputs = {s.name: [s.exit.output, *[w for w in s.writes if w != s.exit.output]] for s in manifest.stages}

    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[stage.name]
        return dict(zip(names, self._sessions[stage.name].run(names, feeds), strict=True))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort.__version__, **self.settings.describe()}
