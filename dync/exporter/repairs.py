"""Repairs of known translation defects of `torch.onnx.export(dynamo=True)`, applied to the captured graph.

Each rule fixes one idiom that eager PyTorch accepts and the translation gets wrong, so that models run as
their authors wrote them; each keeps the graph's inputs, outputs and values (it only removes what eager
never did).

* No-op squeeze: `torch.mean(x, dim=1).squeeze(1)` on a (B, N, C) tensor. The mean gives (B, C), and
  PyTorch's `squeeze(1)` leaves a dim that is not 1 alone, but the translation emits `Squeeze(axes=[1])`,
  which onnxruntime refuses at load (`Dimension of input 1 must be 1 instead of C`). The rule drops every
  axis whose static size is not 1 (ONNX shape inference knows it; a symbolic dim is left alone, since it
  might be 1) and turns a Squeeze left with no axes into an Identity.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.graph import constant, export_graph, import_graph, shape_of


def repair_translation_defects(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with every known defect repaired, and one line per repair naming the node."""
    graph = import_graph(model, infer_shapes=True)
    repaired = [line for node in graph.nodes if node.op == "Squeeze" and (line := _noop_squeeze(node)) is not None]
    if not repaired:
        return model, []
    graph.cleanup().toposort()
    return export_graph(graph, like=model), repaired


def _noop_squeeze(node: gs.Node) -> str | None:
    """Drop the axes of a Squeeze whose static size is not 1; the repair made, or None."""
    shape = shape_of(node.inputs[0])
    axes = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or axes is None:
        return None
    rank = len(shape)
    kept = [int(a) for a in axes.reshape(-1) if not (isinstance(shape[int(a) % rank], int)
                                                      and shape[int(a) % rank] != 1)]
    if len(kept) == axes.size:
        return None
    dropped = sorted(set(int(a) % rank for a in axes.reshape(-1)) - {a % rank for a in kept})
    if kept:
        node.inputs[1] = gs.Constant(f"{node.name}/axes", np.asarray(kept, dtype=np.int64))
    else:
        node.op, node.inputs = "Identity", node.inputs[:1]
    return (f"{node.name}: Squeeze of axes {dropped} whose size is not 1 (a no-op in PyTorch) "
            f"{'kept the other axes' if kept else 'became an Identity'}")
