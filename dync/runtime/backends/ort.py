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


def _stage_model(path: Path, manifest: Manifest) -> onnx.ModelProto | Path:
    """The stage file, with `dync::` plugin nodes decomposed to standard ops when the package has any."""
    if not manifest.custom_ops:
        return path
    from dync.plugins import decompose_custom_nodes

    return decompose_custom_nodes(onnx.load(path))


class OrtBackend:
    name = "ort"

    def __init__(self, package_dir: Path, manifest: Manifest, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(OrtSettings.__dataclass_fields__))
        if unknown:
            raise InputError(
                f"onnxruntime backend options {unknown} are unknown; use {sorted(OrtSettings.__dataclass_fields__)}."
            )
        self.settings = OrtSettings(**settings)
        self._sessions = {s.name: session_from_onnx(_stage_model(Path(package_dir) / s.onnx, manifest), self.settings)
                          for s in manifest.stages}
        self._outputs = {s.name: [s.exit.output, *[w for w in s.writes if w != s.exit.output]] for s in manifest.stages}

    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[stage.name]
        return dict(zip(names, self._sessions[stage.name].run(names, feeds), strict=True))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort.__version__, **self.settings.describe()}
