"""A stage's activation ranges, from onnxruntime's calibrators, stored as their calibration cache.

The calibrator runs the stage with every `dync::` node decomposed (onnxruntime has no kernel for them); the
decomposition writes the node's outputs under their own names, so the ranges of every tensor around a plugin
node are those of the stage as the package holds it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from dync.inputs import batch_of
from dync.plugins.splice import decompose_custom_nodes

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
"""`--method` names and onnxruntime's calibrators: min/max, KL-divergence of histograms, 99.999th percentile."""
CALIBRATION_BATCH = 64


class _Batches(CalibrationDataReader):
    """The calibration feeds in batches of `CALIBRATION_BATCH`, as onnxruntime's calibrators read them."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{name: value[i : i + CALIBRATION_BATCH] for name, value in feeds.items()}
             for i in range(0, batch_of(feeds), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibrate_ranges(model: onnx.ModelProto, feeds: dict[str, np.ndarray], method: str, op_types: Collection[str],
                     path: Path) -> None:
    """Write the ranges of the tensors around the `op_types` nodes of `model` over `feeds` to `path`."""
    with tempfile.TemporaryDirectory(prefix="dync-calibrate-") as scratch:
        source = Path(scratch) / "stage.onnx"
        onnx.save(decompose_custom_nodes(model), source)
        augmented = str(Path(scratch) / "augmented.onnx")
        calibrator = create_calibrator(source, list(op_types), augmented_model_path=augmented,
                                       calibrate_method=METHODS[method])
        calibrator.collect_data(_Batches(feeds))
        save_tensors_data(calibrator.compute_data(), path)
