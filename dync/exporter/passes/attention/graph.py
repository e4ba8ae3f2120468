"""Small queries on onnx-graphsurgeon tensors, shared by the attention passes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor, op: str | None = None, single_use: bool = False) -> gs.Node | None:
    """The node writing `tensor` if it is an `op` (and, with `single_use`, nothing else reads the tensor)."""
    if not tensor.inputs or (op is not None and tensor.inputs[0].op != op):
        return None
    if single_use and len(tensor.outputs) != 1:
        return None
    return tensor.inputs[0]


def only_consumer(node: gs.Node, op: str) -> gs.Node | None:
    out = node.outputs[0]
    return out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == op else None


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor, "Constant")
    return None if node is None else np.asarray(node.attrs["value"].values)


def scalar(tensor: gs.Tensor) -> float | None:
    values = constant(tensor)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


def all_ones(tensor: gs.Tensor) -> bool:
    values = constant(tensor)
    return values is not None and bool(np.all(values == 1))


def shape_of(tensor: gs.Tensor) -> list | None:
    shape = tensor.values.shape if isinstance(tensor, gs.Constant) else tensor.shape
    return None if shape is None else list(shape)


def rank(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)
