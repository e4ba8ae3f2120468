"""`lower_masked_bottlenecks`: the spatial rule applied to one model, in the form asked for (see the package
docstring), with one `LoweringReport` per candidate."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import onnx

from dync.errors import SpatialLoweringError
from dync.exporter.passes.context import FORMS
from dync.exporter.passes.spatial.match import Block, Ineligible, candidates, match
from dync.exporter.passes.spatial.patches import emit_patches
from dync.exporter.passes.spatial.rows import emit_rows
from dync.graph import default_opset, export_graph, import_graph

MIN_OPSET = 16  # ScatterND reduction="add" needs opset 16
ALWAYS_SPARSE = 1.0  # a crossover density no batch exceeds: the lowered form always runs


@dataclass(frozen=True)
class LoweringReport:
    """What the pass did with one `Relu(Add(Mul(.), .))` candidate, named by its final Relu node."""

    node: str
    lowered: bool
    reason: str
    crossover: float | None = None
    inputs: tuple[str, ...] = ()
    output: str = ""


def lower_masked_bottlenecks(
    model: onnx.ModelProto, ops: str = "portable", crossover: float | Mapping[str, float] = ALWAYS_SPARSE,
    skip: Collection[str] = (),
) -> tuple[onnx.ModelProto, list[LoweringReport]]:
    """Lower every eligible masked bottleneck of `model`; returns the new model and one report per candidate.

    Precondition: `model` is an ONNX model (default-domain opset >= 16) as `torch.onnx.export(dynamo=True)`
    writes it, BatchNorms folded into conv biases. Guarantee: graph inputs and outputs (names, shapes, the
    dynamic batch dim) are unchanged and every output equals the input model's up to float summation
    order. `crossover` (portable form only) is the mask density above which a block runs dense, one value
    or one per block name (missing names get ALWAYS_SPARSE). Blocks named in `skip` are left as they are,
    without a report. `model` itself is not modified.
    """
    if ops not in FORMS:
        raise SpatialLoweringError(f"Unknown spatial ops form {ops!r}; use one of {', '.join(FORMS)}.")
    _check_opset(model)
    graph = import_graph(model, infer_shapes=True)
    reports = []
    for relu in [r for r in candidates(graph) if r.name not in skip]:
        try:
            block = match(relu)
            value = _crossover_for(block, crossover)
            inputs, output = (block.x.name, block.shortcut.name, block.decision.name), relu.outputs[0].name
            if ops == "plugins":
                emit_patches(graph, block)
            else:
                emit_rows(graph, block, value)
        except Ineligible as why:
            reports.append(LoweringReport(relu.name, False, str(why)))
            continue
        reports.append(LoweringReport(relu.name, True, f"lowered ({ops})", value if ops == "portable" else None,
                                      inputs, output))
    if not any(r.lowered for r in reports):
        return model, reports
    graph.cleanup().toposort()
    return export_graph(graph, like=model), reports


def _crossover_for(block: Block, crossover: float | Mapping[str, float]) -> float:
    value = crossover.get(block.name, ALWAYS_SPARSE) if isinstance(crossover, Mapping) else crossover
    return check_crossover(value, block.name)


def check_crossover(value: float, where: str = "all blocks") -> float:
    """A crossover density must lie in [0, 1] (NaN does not)."""
    if not 0.0 <= value <= 1.0:
        raise SpatialLoweringError(
            f"Spatial crossover {value!r} for {where} is not a mask density in [0, 1]; pass e.g. 0.5, or 1.0 "
            "to always run the gather-scatter form."
        )
    return float(value)


def _check_opset(model: onnx.ModelProto) -> None:
    """Reject models whose default-domain opset is too old for the lowered forms' ops."""
    version = default_opset(model)
    if version < MIN_OPSET:
        raise SpatialLoweringError(
            f"Spatial lowering needs default-domain opset >= {MIN_OPSET}, the model has {version}; "
            f"re-export it with opset_version={MIN_OPSET} or later."
        )
