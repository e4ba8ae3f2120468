"""Lower DyT-style token dispatch: the gated MLP runs on the kept tokens of the whole batch only.

`match.py` finds `Add(Mul(mlp(x), mask), residual)` with a binary per-token mask and a row-wise MLP (see
`docs/tokens.md`); `rows.py` replaces it by NonZero -> Gather -> the MLP on packed rows -> ScatterND(add).
Candidates that fail a check stay as they are and get a `TokenRecord` naming the node and the reason.
`TokenPass` is the exporter's pass; it serves only the portable form, since TensorRT's parser refuses the
ScatterND with `reduction="add"` the packed form needs.

Token pruning with static keep ratios (DynamicViT) needs no pass: its TopK and gathers have static shapes
apart from the batch and export as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection

import onnx

from dync.errors import TokenLoweringWarning
from dync.exporter.passes.context import PassContext
from dync.exporter.passes.tokens.match import Ineligible, Order, candidates, match
from dync.exporter.passes.tokens.rows import emit_packed
from dync.graph import default_opset, export_graph, import_graph
from dync.records import TokenRecord

__all__ = ["TokenPass", "lower_token_dispatch", "report_dispatches"]

MIN_OPSET = 16  # ScatterND reduction="add"


def lower_token_dispatch(model: onnx.ModelProto, skip: Collection[str] = ()) -> tuple[onnx.ModelProto,
                                                                                     list[TokenRecord]]:
    """Lower every eligible token dispatch of `model`; returns the new model and one report per candidate.

    Precondition: an ONNX model as `torch.onnx.export(dynamo=True)` writes it. Guarantee: graph inputs and
    outputs (names, shapes, the dynamic batch dim) are unchanged and every output equals the input model's
    up to float summation order. Candidates named in `skip` are left as they are, without a report. `model`
    itself is not modified.
    """
    graph = import_graph(model, infer_shapes=True)
    order = Order(graph)
    opset = default_opset(model)
    reports = []
    for add in [a for a in candidates(graph) if a.name not in skip]:
        try:
            if opset < MIN_OPSET:
                raise Ineligible(f"the model's opset {opset} has no ScatterND add (needs {MIN_OPSET}); re-export "
                                 f"it with opset_version={MIN_OPSET} or later")
            dispatch = match(add, order)
            emit_packed(graph, dispatch)
        except Ineligible as why:
            reports.append(TokenRecord(add.name, False, str(why)))
            continue
        reports.append(TokenRecord(add.name, True, "lowered (packed rows)", len(dispatch.mlp)))
    if not any(r.lowered for r in reports):
        return model, reports
    graph.cleanup().toposort()
    return export_graph(graph, like=model), reports


def report_dispatches(reports: list[TokenRecord], progress: Callable[[str], None]) -> None:
    """Progress for each lowered dispatch; a warning for each left as it is, since its MLP runs on every token."""
    for report in reports:
        if report.lowered:
            progress(f"token dispatch {report.node}: lowered, MLP of {report.mlp_nodes} nodes on kept tokens only")
        else:
            warnings.warn(f"token dispatch {report.node} is left dense: {report.reason}.", TokenLoweringWarning,
                          stacklevel=3)


class TokenPass:
    """DyT-style gated token MLPs run on the kept tokens of the whole batch only (portable form).

    Keeps: stage inputs and outputs, the dynamic batch, outputs equal to the unlowered model's up to the GEMMs'
    summation order on fewer rows.
    """

    name = "tokens"
    forms = ("portable",)

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto, list[TokenRecord]]:
        lowered, records = lower_token_dispatch(model, skip=context.skipped(self.name))
        report_dispatches(records, context.progress)
        return lowered, records
