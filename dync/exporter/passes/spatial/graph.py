"""Small graph-building helpers shared by the spatial emitters (onnx-graphsurgeon underneath)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs


class Builder:
    """Appends named nodes to a node list (a graph's or an If branch's); names are `prefix` + a local name."""

    def __init__(self, nodes: list[gs.Node], prefix: str) -> None:
        self.nodes = nodes
        self.prefix = prefix
        self._names: set[str] = set()

    def op(self, op: str, name: str, inputs: Sequence[gs.Tensor], **attrs: Any) -> gs.Variable:
        """One node with a single new output named like the node."""
        assert name not in self._names, f"node name {name} used twice under {self.prefix}"
        self._names.add(name)
        out = gs.Variable(self.prefix + name)
        self.nodes.append(gs.Node(op=op, name=self.prefix + name, attrs=attrs, inputs=list(inputs), outputs=[out]))
        return out

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> gs.Constant:
        """A named constant; integers default to int64, as ONNX index and shape inputs want."""
        return gs.Constant(self.prefix + name, np.asarray(value, dtype=dtype))

    def import_protos(self, graph: gs.Graph, protos: Sequence[onnx.NodeProto]) -> gs.Variable:
        """Append the nodes of a decomposition (a NodeProto list); returns the last node's output.

        Inputs resolve to tensors already in `graph` or made by earlier nodes of the list; Constant nodes
        become gs.Constant tensors.
        """
        tensors = graph.tensors()
        for proto in protos:
            if proto.op_type == "Constant":
                value = onnx.numpy_helper.to_array(proto.attribute[0].t)
                tensors[proto.output[0]] = gs.Constant(proto.output[0], value)
                continue
            outputs = [gs.Variable(name) for name in proto.output]
            tensors.update((t.name, t) for t in outputs)
            self.nodes.append(gs.Node(op=proto.op_type, name=proto.name, domain=proto.domain or None,
                                      attrs=plain_attrs(proto), inputs=[tensors[name] for name in proto.input],
                                      outputs=outputs))
        return tensors[protos[-1].output[0]]


def plain_attrs(proto: onnx.NodeProto) -> dict[str, Any]:
    """A NodeProto's attributes as the plain values graphsurgeon expects (str, not bytes)."""
    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode()
        return [plain(v) for v in value] if isinstance(value, list) else value

    return {a.name: plain(onnx.helper.get_attribute_value(a)) for a in proto.attribute}


def producer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The node producing `tensor` (of type `op` when given), if any."""
    if len(tensor.inputs) == 1 and (op is None or tensor.inputs[0].op == op):
        return tensor.inputs[0]
    return None


def restore_metadata(lowered: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Carry over what graphsurgeon drops: IR version, model metadata, metadata of graph inputs/outputs."""
    lowered.ir_version = model.ir_version
    lowered.metadata_props.extend(model.metadata_props)
    for new, old in ((lowered.graph.input, model.graph.input), (lowered.graph.output, model.graph.output)):
        props = {v.name: v.metadata_props for v in old}
        for value in new:
            value.metadata_props.extend(props.get(value.name, []))
