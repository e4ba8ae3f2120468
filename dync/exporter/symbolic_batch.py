"""A graph that takes any batch, from a forward whose code fixes the batch to the example's.

Research code often computes the batch with float arithmetic, e.g. Swin's `window_reverse`:
`B = int(windows.shape[0] / (H * W / window_size / window_size))`. `torch.export` cannot keep `int()` of a
float symbolic, so it specializes the batch, and every shape constant that holds it is the example's number.
Unmodified such code still has one graph per batch size, and those graphs differ only in those constants.

So the forward is captured statically at two batch sizes b1 and b2. The two graphs must agree node for node;
each constant that differs must be, element by element, `a * batch + c` with integers a and c fitted from the
two captures (a Reshape to `[b * nW, ws, ws, C]` gives a = [nW, 0, 0, 0]). Each such constant is then computed
from the first input's batch at run time (Shape, Mul, Add: a few scalar ops), and the input and output batch
axes are made symbolic. Anything else that differs (an attribute, a float constant, the node list) means the
forward does more with the batch than shape arithmetic, and capture is refused with the model line.

Export verification then checks the result against eager at batches neither capture saw (1 and 3), which is
what makes a fit from two points safe: a constant that is not affine in the batch fails there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.errors import CaptureError
from dync.graph import Builder, export_graph, import_graph
from dync.package import BATCH_DIM


@dataclass(frozen=True)
class BatchConstant:
    """A graph constant that holds the batch: its value is `scale * batch + offset`, element by element."""

    name: str
    scale: np.ndarray
    offset: np.ndarray


def symbolic_batch(first: onnx.ModelProto, b1: int, second: onnx.ModelProto, b2: int,
                   site: str) -> tuple[onnx.ModelProto, list[str]]:
    """`first` (captured at batch b1) with every constant that differs from `second` (batch b2) computed from
    the input's batch; the names of those constants. `site` names the model line, for the refusal."""
    assert b1 != b2
    graph, other = import_graph(first), import_graph(second)
    _check_same_structure(graph, other, site)
    found = _batch_constants(graph, other, b1, b2, site)
    _compute_from_input_batch(graph, found)
    _make_batch_symbolic(graph)
    return export_graph(graph.cleanup().toposort(), like=first), [c.name for c in found]


def _check_same_structure(graph: gs.Graph, other: gs.Graph, site: str) -> None:
    ours = [(n.op, n.domain, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    theirs = [(n.op, n.domain, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in other.nodes]
    if ours != theirs:
        where = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                     min(len(ours), len(theirs)))
        node = f"node '{graph.nodes[where].name}'" if where < len(graph.nodes) else "its end"
        raise _refusal(site, f"the graphs captured at two batch sizes differ from {node} on")
    for node, twin in zip(graph.nodes, other.nodes, strict=True):
        differing = [k for k in node.attrs if not _same_attr(node.attrs[k], twin.attrs.get(k))]
        if differing:
            raise _refusal(site, f"attribute {differing[0]} of {node.op} node '{node.name}' changes with the batch")


def _same_attr(a: object, b: object) -> bool:
    if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
        return a.values.shape == b.values.shape and np.array_equal(a.values, b.values)
    return type(a) is type(b) and (a == b if not isinstance(a, gs.Graph) else True)


def _batch_constants(graph: gs.Graph, other: gs.Graph, b1: int, b2: int, site: str) -> list[BatchConstant]:
    theirs = {name: t for name, t in other.tensors().items() if isinstance(t, gs.Constant)}
    found = []
    for name, tensor in graph.tensors().items():
        if not isinstance(tensor, gs.Constant) or name not in theirs:
            continue
        v1, v2 = tensor.values, theirs[name].values
        if v1.shape == v2.shape and np.array_equal(v1, v2):
            continue
        found.append(_fitted(name, v1, b1, v2, b2, site))
    return found


def _fitted(name: str, v1: np.ndarray, b1: int, v2: np.ndarray, b2: int, site: str) -> BatchConstant:
    """The integer affine function of the batch through both values, or a refusal."""
    if v1.shape != v2.shape or v1.dtype != np.int64:
        raise _refusal(site, f"constant '{name}' changes shape or is not integer shape arithmetic "
                             f"({v1.dtype}{list(v1.shape)} at batch {b1}, {v2.dtype}{list(v2.shape)} at {b2})")
    step = v2 - v1
    if (step % (b2 - b1)).any():
        raise _refusal(site, f"constant '{name}' is not a whole multiple of the batch plus a constant")
    scale = step // (b2 - b1)
    return BatchConstant(name, scale, v1 - scale * b1)


def _compute_from_input_batch(graph: gs.Graph, found: list[BatchConstant]) -> None:
    """Each batch constant becomes `scale * batch + offset`, the batch read from the first input's shape."""
    if not found:
        return
    tensors = graph.tensors()
    build = Builder(graph.nodes, "dync/batch/")
    shape = build.op("Shape", "shape", [graph.inputs[0]], start=0, end=1)
    batch = build.op("Squeeze", "scalar", [shape, build.const("axis", [0])])
    for constant in found:
        target = _replace_with_variable(tensors[constant.name])
        scaled = build.op("Mul", f"{constant.name}/scaled", [build.const(f"{constant.name}/scale", constant.scale),
                                                              batch])
        build.op("Add", constant.name, [scaled, build.const(f"{constant.name}/offset", constant.offset)], out=target)


def _replace_with_variable(captured: gs.Constant) -> gs.Variable:
    """A variable of the constant's name, dtype and shape that its readers read instead."""
    variable = gs.Variable(captured.name, dtype=captured.values.dtype, shape=list(captured.values.shape))
    for reader in list(captured.outputs):
        for i, tensor in enumerate(reader.inputs):
            if tensor is captured:
                reader.inputs[i] = variable
    captured.name = f"{captured.name}/as_captured"
    return variable


def _make_batch_symbolic(graph: gs.Graph) -> None:
    """Inputs and exits take the symbolic batch first; intermediate shapes, captured static, are forgotten."""
    for tensor in [*graph.inputs, *graph.outputs]:
        if tensor.shape:
            tensor.shape = [BATCH_DIM, *tensor.shape[1:]]
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None


def _refusal(site: str, why: str) -> CaptureError:
    return CaptureError(
        f"the forward fixes the batch size{site}, and no single graph serves every batch ({why}); compute the "
        "batch from x.shape[0] with integer arithmetic (a // b, not int(a / b)) or let view/reshape infer it "
        "with -1."
    )
