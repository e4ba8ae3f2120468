"""The packed form of a token dispatch: the MLP runs on the kept rows of the whole batch only.

With `x` the MLP input `[..., Cin]`, `mask` the binary gate `[..., 1]` and `K` the kept rows over the batch::

    kept = NonZero(Reshape(mask, [-1]))                  [1, K] flat row indices over (batch, token)
    rows = Gather(Reshape(x, [-1, Cin]), kept[0])        [K, Cin]
    y    = mlp(rows)                                     the same nodes, last-axis ops on 2-D rows
    out  = Reshape(ScatterND(Reshape(residual, [-1, Cout]), kept^T, y, add), Shape(residual))

Exact: a kept row is `residual + mlp(x)` as in eager (`mlp(x) * 1`), a skipped row is `residual` (eager adds
`mlp(x) * 0 = 0`), up to the GEMM's summation order on fewer rows. No mask gives `K = 0` and `out =
residual`.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from dync.exporter.passes.tokens.match import LAST_AXIS, Dispatch
from dync.graph import Builder


def emit_packed(graph: gs.Graph, dispatch: Dispatch) -> None:
    """Replace the dispatch's Add by the packed form, writing the Add's own output tensor."""
    b = Builder(graph.nodes, f"{dispatch.name}/tokens/")
    output = dispatch.add.outputs[0]
    kept = b.op("NonZero", "kept", [b.op("Reshape", "mask_flat", [dispatch.mask, b.const("flat", [-1])])])
    rows = b.op("Reshape", "rows", [dispatch.source, b.const("rows_shape", [-1, dispatch.width_in])])
    packed = b.op("Gather", "packed", [rows, b.op("Squeeze", "kept_rows", [kept, b.const("axis0", [0])])], axis=0)
    y = _mlp_on_rows(b, dispatch, packed)
    residual = b.op("Reshape", "residual_rows", [dispatch.residual, b.const("out_rows_shape",
                                                                           [-1, dispatch.width_out])])
    index = b.op("Transpose", "kept_index", [kept], perm=[1, 0])
    scattered = b.op("ScatterND", "scatter", [residual, index, y], reduction="add")
    dispatch.add.outputs.clear()
    b.op("Reshape", "out", [scattered, b.op("Shape", "out_shape", [dispatch.residual])])
    graph.nodes[-1].outputs = [output]


def _mlp_on_rows(b: Builder, dispatch: Dispatch, packed: gs.Tensor) -> gs.Tensor:
    """Copies of the MLP's nodes reading `packed` instead of the MLP input; returns the copy of its output."""
    renamed: dict[int, gs.Tensor] = {id(dispatch.source): packed}
    for node in dispatch.mlp:
        attrs = dict(node.attrs)
        if node.op in LAST_AXIS:
            attrs["axis"] = -1
        inputs = [renamed.get(id(t), t) for t in node.inputs]
        renamed[id(node.outputs[0])] = b.op(node.op, f"mlp/{node.name}", inputs, **attrs)
        b.nodes[-1].domain = node.domain
    return renamed[id(dispatch.output)]
