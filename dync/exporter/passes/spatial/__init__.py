"""Lower LASNet-style masked bottlenecks to gather-scatter execution.

`match.py` finds the blocks (`Relu(Add(Mul(conv chain, binary mask), shortcut))`, see
`docs/spatial_lowering.md`); each block is emitted in one of two forms, chosen by `ops`:

* `portable` (the default, for onnxruntime): `rows.py`, standard ONNX ops, the whole block inside an `If`
  that runs the dense original when the batch's mask density is above the block's crossover;
* `plugins` (for TensorRT): `patches.py`, `dync::GatherPatches` / `dync::ScatterAddPatches` nodes.

Blocks that fail a check stay dense and get a `LoweringReport` naming the node and the reason.
`crossover.py` measures each block's crossover density on this machine. `SpatialPass` is the exporter's
pass: it lowers each stage and records one `SpatialRecord` per candidate in the manifest.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import onnx

from dync.errors import SpatialLoweringError, SpatialLoweringWarning
from dync.exporter.passes.context import FORMS, PassContext
from dync.exporter.passes.spatial.crossover import measure_crossovers
from dync.exporter.passes.spatial.lower import (
    ALWAYS_SPARSE,
    LoweringReport,
    check_crossover,
    lower_masked_bottlenecks,
)
from dync.records import SpatialRecord

__all__ = ["ALWAYS_SPARSE", "LoweringReport", "SpatialLoweringError", "SpatialPass", "check_crossover",
           "lower_masked_bottlenecks"]


class SpatialPass:
    """Masked bottlenecks to gather-scatter execution, in both forms.

    Keeps: stage inputs and outputs, the dynamic batch, outputs equal to the dense model's up to summation
    order. The portable form's crossovers are measured once per export on the whole captured model (every
    block at once), unless the context fixes one crossover for all blocks.
    """

    name = "spatial"
    forms = FORMS

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto, list[SpatialRecord]]:
        lowered, reports = lower_masked_bottlenecks(model, context.form, self._crossover(context),
                                                    skip=context.skipped(self.name))
        for block in reports:
            if block.lowered:
                context.progress(f"masked bottleneck {block.node}: lowered")
            else:
                warnings.warn(f"masked bottleneck {block.node} is left dense: {block.reason}.",
                              SpatialLoweringWarning, stacklevel=2)
        return lowered, [SpatialRecord(r.node, r.lowered, r.reason, r.crossover) for r in reports]

    @staticmethod
    def _crossover(context: PassContext) -> float | Mapping[str, float]:
        if context.spatial_crossover is not None:
            return context.spatial_crossover
        if context.form != "portable":
            return ALWAYS_SPARSE
        return context.once("spatial crossovers", lambda: measure_crossovers(context.whole_model,
                                                                             progress=context.progress))
