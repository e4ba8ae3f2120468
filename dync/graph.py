"""The graph toolkit every graph transformation shares: partition, passes, plugin decompositions, the runtime's
plugin splicing. onnx-graphsurgeon underneath; torch-free.

* import and export: `import_graph` (optionally with inferred shapes) and `export_graph`, which carries over
  what graphsurgeon drops (IR version, model and value metadata);
* queries: `default_opset`, `producer`, `only_consumer`, `constant`, `scalar`, `all_ones`, `shape_of`, `rank`,
  `source_line` (the model source line torch.onnx recorded for a node), `innermost_frame`;
* building: `Builder`, which appends named nodes and constants to a graph's (or a branch's) node list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


# --------------------------------------------------------------------------------------------- import, export


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version; 0 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def import_graph(model: onnx.ModelProto, infer_shapes: bool = False, data_prop: bool = False) -> gs.Graph:
    """`model` as a graphsurgeon graph; `infer_shapes` first runs ONNX shape inference, for rules that check
    ranks and shapes of intermediate tensors; `data_prop` also propagates shape values through shape
    arithmetic (Shape, Slice, Concat into a Reshape: how torch.onnx writes SDPA's key transpose)."""
    if not infer_shapes:
        return gs.import_onnx(model)
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=data_prop))


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` as a model with the IR version and metadata of `like`, the model it was imported from."""
    model = gs.export_onnx(graph)
    model.ir_version = like.ir_version
    model.metadata_props.extend(like.metadata_props)
    for new, old in ((model.graph.input, like.graph.input), (model.graph.output, like.graph.output)):
        props = {v.name: v.metadata_props for v in old}
        for value in new:
            value.metadata_props.extend(props.get(value.name, []))
    return model


# --------------------------------------------------------------------------------------------- queries


def producer(tensor: gs.Tensor, op: str | None = None, single_use: bool = False) -> gs.Node | None:
    """The node writing `tensor` (if it is an `op`, and with `single_use` only if nothing else reads `tensor`);
    None for graph inputs, constants and omitted optional inputs."""
    if not tensor.inputs or (op is not None and tensor.inputs[0].op != op):
        return None
    if single_use and len(tensor.outputs) != 1:
        return None
    return tensor.inputs[0]


def only_consumer(node: gs.Node, op: str) -> gs.Node | None:
    """The one node reading `node`'s first output, if it is an `op`."""
    out = node.outputs[0]
    return out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == op else None


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for a tensor computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor, "Constant")
    if node is None or "value" not in node.attrs:
        return None
    return np.asarray(node.attrs["value"].values)


def scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element constant."""
    values = constant(tensor)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


def all_ones(tensor: gs.Tensor) -> bool:
    values = constant(tensor)
    return values is not None and bool(np.all(values == 1))


def shape_of(tensor: gs.Tensor) -> list | None:
    """The tensor's shape (ints, symbolic names or None per dim), or None when unknown."""
    shape = tensor.values.shape if isinstance(tensor, gs.Constant) else tensor.shape
    return None if shape is None else list(shape)


def rank(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def source_line(node: onnx.NodeProto) -> str:
    """The innermost frame of the stack trace torch.onnx keeps in a node's metadata ('File "f.py", line 3, in
    g'), empty when the node has none (a node dync wrote, or a model from elsewhere)."""
    return innermost_frame(next((p.value for p in node.metadata_props if p.key == STACK_TRACE_KEY), ""))


def innermost_frame(trace: str) -> str:
    """The innermost 'File "f.py", line 3, in g' line of a Python stack trace that is not torch's own code (an
    `nn.ReLU` module's frame is torch's; the model line that called it is the user's); empty when none."""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    users = [f for f in frames if "/torch/" not in f.replace("\\", "/")]
    return (users or frames or [""])[-1]


# --------------------------------------------------------------------------------------------- building


class Builder:
    """Appends named nodes to a node list (a graph's or an If branch's); names are `prefix` + a local name.

    `op` writes a new tensor named like the node, or `out` when the node must write an existing tensor (a
    replacement writing the original's output). Local names are unique per builder, asserted.
    """

    def __init__(self, nodes: list[gs.Node], prefix: str) -> None:
        self.nodes = nodes
        self.prefix = prefix
        self._names: set[str] = set()

    def op(self, op: str, name: str, inputs: Sequence[gs.Tensor], *, out: gs.Tensor | None = None,
           domain: str | None = None, **attrs: Any) -> gs.Tensor:
        """One node with a single output."""
        assert name not in self._names, f"node name {name} used twice under {self.prefix}"
        self._names.add(name)
        output = out if out is not None else gs.Variable(self.prefix + name)
        self.nodes.append(gs.Node(op=op, name=self.prefix + name, attrs=attrs, inputs=list(inputs),
                                  outputs=[output], domain=domain))
        return output

    def ops(self, op: str, name: str, inputs: Sequence[gs.Tensor], count: int, *,
            outs: Sequence[gs.Tensor] | None = None, domain: str | None = None, **attrs: Any) -> list[gs.Tensor]:
        """One node with `count` outputs, named `name:0`, `name:1`, ... (or written to `outs`)."""
        assert name not in self._names, f"node name {name} used twice under {self.prefix}"
        self._names.add(name)
        outputs = list(outs) if outs is not None else [gs.Variable(f"{self.prefix}{name}:{i}") for i in range(count)]
        self.nodes.append(gs.Node(op=op, name=self.prefix + name, attrs=attrs, inputs=list(inputs), outputs=outputs,
                                  domain=domain))
        return outputs

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> gs.Constant:
        """A named constant; integers default to int64, as ONNX index and shape inputs want."""
        assert name not in self._names, f"constant name {name} used twice under {self.prefix}"
        self._names.add(name)
        return gs.Constant(self.prefix + name, np.asarray(value, dtype=dtype))
