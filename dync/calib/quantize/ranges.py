"""A stage's activation ranges, from onnxruntime's calibrators, stored as their calibration caches.

The calibrators run the stage with every `dync::` node decomposed (onnxruntime has no kernel for them); the
decomposition writes the node's outputs under their own names, so the ranges of every tensor around a plugin
node are those of the stage as the package holds it. onnxruntime calibrates a graph's top level only, and a
spatial block's convolutions live in the branches of its `If`: each branch is calibrated as a model of its
own (`dync.runtime.branches`) on the outer values the stage computes for it, batch by batch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import CalibraterBase, create_calibrator, save_tensors_data

from dync.inputs import batch_of
from dync.plugins.splice import decompose_custom_nodes
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from dync.runtime.branches import Branch, Branches

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
"""`--method` names and onnxruntime's calibrators: min/max, KL-divergence of histograms, 99.999th percentile."""
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class StageRanges:
    """Where a stage's ranges are: its top-level graph's, and each `If` branch's by branch key."""

    graph: Path
    branches: dict[str, Path] = field(default_factory=dict)


class _One(CalibrationDataReader):
    """One batch, as onnxruntime's calibrators read data."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self._feeds: dict[str, np.ndarray] | None = feeds

    def get_next(self) -> dict[str, np.ndarray] | None:
        feeds, self._feeds = self._feeds, None
        return feeds


def _calibrator(model: onnx.ModelProto, method: str, op_types: Collection[str], scratch: Path,
                name: str) -> CalibraterBase:
    source = scratch / f"{name}.onnx"
    onnx.save(decompose_custom_nodes(model), source)
    return create_calibrator(source, list(op_types), augmented_model_path=str(scratch / f"{name}.augmented.onnx"),
                             calibrate_method=METHODS[method])


def _outer_values(model: onnx.ModelProto, branches: list[Branch]) -> tuple[list[str], ort.InferenceSession]:
    """The names of the outer values the branches read, and a session computing them from the stage inputs."""
    names = sorted({name for branch in branches for name in branch.outer_values})
    probe = onnx.ModelProto()
    probe.CopyFrom(decompose_custom_nodes(model))  # a copy: without plugin nodes, that is `model` itself
    declared = {v.name for v in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in declared)
    return names, session_from_onnx(probe, OrtSettings(), optimize_branches=False)


def calibrate_ranges(model: onnx.ModelProto, feeds: dict[str, np.ndarray], method: str, op_types: Collection[str],
                     directory: Path, stem: str) -> StageRanges:
    """Ranges of the tensors around the `op_types` nodes of `model` (and of its top-level branches) over
    `feeds`, written as `stem.ranges.json` (and `stem.branchN.ranges.json`) in `directory`."""
    branches = Branches(model)
    found = list(branches.top_level())
    with tempfile.TemporaryDirectory(prefix="dync-calibrate-") as scratch:
        top = _calibrator(model, method, op_types, Path(scratch), "stage")
        inner = [_calibrator(branches.standalone(b), method, op_types, Path(scratch), f"branch{i}")
                 for i, b in enumerate(found)]
        names, session = _outer_values(model, found) if found else ([], None)
        for start in range(0, batch_of(feeds), CALIBRATION_BATCH):
            batch = {name: value[start : start + CALIBRATION_BATCH] for name, value in feeds.items()}
            top.collect_data(_One(batch))
            if session is not None:
                values = dict(zip(names, session.run(names, batch), strict=True))
                for branch, calibrator in zip(found, inner, strict=True):
                    calibrator.collect_data(_One({name: values[name] for name in branch.outer_values}))
        ranges = StageRanges(directory / f"{stem}.ranges.json",
                             {b.key: directory / f"{stem}.branch{i}.ranges.json" for i, b in enumerate(found)})
        save_tensors_data(top.compute_data(), ranges.graph)
        for branch, calibrator in zip(found, inner, strict=True):
            save_tensors_data(calibrator.compute_data(), ranges.branches[branch.key])
    return ranges
