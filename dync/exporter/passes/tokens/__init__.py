"""Lower DyT-style token dispatch: the gated MLP runs on the kept tokens of the whole batch only.

`match.py` finds `Add(Mul(mlp(x), mask), residual)` with a binary per-token mask and a row-wise MLP (see
`docs/tokens.md`); `rows.py` replaces it by NonZero -> Gather -> the MLP on packed rows -> ScatterND(add).
Candidates that fail a check stay as they are and get a `DispatchReport` naming the node and the reason.

Token pruning with static keep ratios (DynamicViT) needs no pass: its TopK and gathers have static shapes
apart from the batch and export as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from dync.errors import TokenLoweringWarning
from dync.exporter.passes.spatial.graph import restore_metadata
from dync.exporter.passes.tokens.match import Ineligible, Order, candidates, match
from dync.exporter.passes.tokens.rows import emit_packed

__all__ = ["DispatchReport", "lower_token_dispatch", "report_dispatches"]

MIN_OPSET = 16  # ScatterND reduction="add"


@dataclass(frozen=True)
class DispatchReport:
    """What the pass did with one gated residual Add, named by that node."""

    node: str
    lowered: bool
    reason: str
    mlp_nodes: int = 0


def lower_token_dispatch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[DispatchReport]]:
    """Lower every eligible token dispatch of `model`; returns the new model and one report per candidate.

    Precondition: an ONNX model as `torch.onnx.export(dynamo=True)` writes it. Guarantee: graph inputs and
    outputs (names, shapes, the dynamic batch dim) are unchanged and every output equals the input model's
    up to float summation order. `model` itself is not modified.
    """
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    order = Order(graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    reports = []
    for add in list(candidates(graph)):
        try:
            if opset < MIN_OPSET:
                raise Ineligible(f"the model's opset {opset} has no ScatterND add (needs {MIN_OPSET}); re-export "
                                 f"it with opset_version={MIN_OPSET} or later")
            dispatch = match(add, order)
            emit_packed(graph, dispatch)
        except Ineligible as why:
            reports.append(DispatchReport(add.name, False, str(why)))
            continue
        reports.append(DispatchReport(add.name, True, "lowered (packed rows)", len(dispatch.mlp)))
    if not any(r.lowered for r in reports):
        return model, reports
    graph.cleanup().toposort()
    lowered = gs.export_onnx(graph)
    restore_metadata(lowered, model)
    return lowered, reports


def report_dispatches(reports: list[DispatchReport], progress: Callable[[str], None]) -> None:
    """Progress for each lowered dispatch; a warning for each left as it is, since its MLP runs on every token."""
    for report in reports:
        if report.lowered:
            progress(f"token dispatch {report.node}: lowered, MLP of {report.mlp_nodes} nodes on kept tokens only")
        else:
            warnings.warn(f"token dispatch {report.node} is left dense: {report.reason}.", TokenLoweringWarning,
                          stacklevel=3)
