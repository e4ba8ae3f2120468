"""Find LASNet-style masked bottlenecks in an exported graph, whoever wrote the model.

The rule (either operand order of Mul and Add)::

    Relu(Add(Mul(Conv1x1(Relu(ConvKxK/s(Relu(Conv1x1(x))))), mask), shortcut))

where `mask` is a provably binary `[B, 1, Ho, Wo]` float tensor: a Cast of a bool decision to float, possibly
through value-preserving ops (nearest Resize, Reshape, Expand, ...). What fails a check raises `Ineligible`
with the reason the user sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.graph import constant, producer

# Ops that copy or rearrange values without creating new ones: a binary tensor stays binary through them.
VALUE_PRESERVING = ("Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Tile", "Flatten")


class Ineligible(Exception):
    """A candidate block fails a check; the message is the reason reported to the user."""


@dataclass(frozen=True)
class Block:
    """A matched bottleneck: its nodes (in compute order, final Relu last) and what the lowered forms read."""

    nodes: tuple[gs.Node, ...]
    convs: tuple[gs.Node, gs.Node, gs.Node]
    x: gs.Tensor
    shortcut: gs.Tensor
    mask: gs.Tensor
    decision: gs.Tensor
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    kernel: int
    stride: int
    pad: int

    @property
    def relu(self) -> gs.Node:
        return self.nodes[-1]

    @property
    def name(self) -> str:
        return self.relu.name


def candidates(graph: gs.Graph) -> Iterator[gs.Node]:
    """Relu nodes whose input is an Add with a Mul of two computed tensors: the join of a masked residual
    block. A Mul by a constant (NF-ResNet's residual gain, a layer scale) scales a residual; it masks nothing."""
    for node in graph.nodes:
        add = producer(node.inputs[0], "Add") if node.op == "Relu" else None
        if add is not None and any(_masking(producer(t, "Mul")) for t in add.inputs):
            yield node


def _masking(mul: gs.Node | None) -> bool:
    return mul is not None and not any(constant(t) is not None for t in mul.inputs)


def masked_operands(add: gs.Node) -> Iterator[tuple[gs.Node, gs.Tensor, gs.Tensor, gs.Tensor]]:
    """Every reading of `add` as `Add(Mul(main, mask), other)`: `(mul, main, mask, other)`, both operand orders."""
    for mul_side, other in (add.inputs, add.inputs[::-1]):
        mul = producer(mul_side, "Mul")
        if mul is not None:
            for main, mask in (mul.inputs, mul.inputs[::-1]):
                yield mul, main, mask, other


def no_reading_fits(reasons: list[str]) -> Ineligible:
    """The error for a candidate none of whose readings matched: every distinct reason, in order."""
    return Ineligible("; ".join(dict.fromkeys(reasons)))


def match(relu: gs.Node) -> Block:
    """Match `Relu(Add(Mul(chain, mask), shortcut))` in any operand order; raise `Ineligible` otherwise."""
    add = relu.inputs[0].inputs[0]
    reasons = []
    for mul, main, mask, shortcut in masked_operands(add):
        try:
            return _match_operands(relu, add, mul, main, mask, shortcut)
        except Ineligible as why:
            reasons.append(str(why))
    raise no_reading_fits(reasons)


def _match_operands(relu: gs.Node, add: gs.Node, mul: gs.Node, main: gs.Tensor, mask: gs.Tensor,
                    shortcut: gs.Tensor) -> Block:
    """Check one assignment of the Mul and Add operands to (main, mask) and shortcut."""
    chain = _match_chain(main)
    conv1, conv2, conv3 = chain[0], chain[2], chain[4]
    x = conv1.inputs[0]
    if main.shape is None or shortcut.shape is None or list(main.shape) != list(shortcut.shape):
        raise Ineligible(f"shortcut {shortcut.name} shape {shortcut.shape} differs from main {main.shape}")
    if x.dtype != np.float32:
        raise Ineligible(f"block input {x.name} is {x.dtype}, only float32 is supported")
    in_hw, out_hw = static_hw(x, "block input"), static_hw(main, "conv3 output")
    kernel, stride, pad = _conv2_geometry(conv2, in_hw, out_hw)
    decision = _match_mask(mask, main)
    return Block((*chain, mul, add, relu), (conv1, conv2, conv3), x, shortcut, mask, decision, in_hw, out_hw,
                 kernel, stride, pad)


def _match_chain(main: gs.Tensor) -> tuple[gs.Node, ...]:
    """`main = Conv1x1(Relu(ConvKxK(Relu(Conv1x1(x)))))`: the five nodes, conv1 first."""
    conv3 = producer(main, "Conv")
    if conv3 is None:
        raise Ineligible(f"{main.name} is not produced by a Conv")
    relu2, conv2 = _conv_after_relu(conv3, "conv3")
    relu1, conv1 = _conv_after_relu(conv2, "conv2")
    _check_pointwise(conv1)
    _check_pointwise(conv3)
    return conv1, relu1, conv2, relu2, conv3


def _conv_after_relu(conv: gs.Node, what: str) -> tuple[gs.Node, gs.Node]:
    """The Relu feeding `conv` and the Conv feeding that Relu."""
    relu = producer(conv.inputs[0], "Relu")
    inner = None if relu is None else producer(relu.inputs[0], "Conv")
    if inner is None:
        raise Ineligible(f"input of {what} {conv.name} is not Relu(Conv(.))")
    return relu, inner


def _conv_attrs(conv: gs.Node) -> dict[str, list[int] | int | str]:
    attrs = conv.attrs
    return {"strides": list(attrs.get("strides", [1, 1])), "pads": list(attrs.get("pads", [0, 0, 0, 0])),
            "dilations": list(attrs.get("dilations", [1, 1])), "group": attrs.get("group", 1),
            "auto_pad": attrs.get("auto_pad", "NOTSET")}


def _weight_shape(conv: gs.Node) -> list[int]:
    weight = conv.inputs[1]
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 4:
        raise Ineligible(f"{conv.name} has no constant 2-D conv weight")
    return list(weight.shape)


def _check_pointwise(conv: gs.Node) -> None:
    """A dense 1x1 conv, stride 1, no padding: one matrix product per pixel."""
    want = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1, "auto_pad": "NOTSET"}
    if _weight_shape(conv)[2:] != [1, 1]:
        raise Ineligible(f"{conv.name} is not a 1x1 conv (weight {conv.inputs[1].shape})")
    for name, have in _conv_attrs(conv).items():
        if have != want[name]:
            raise Ineligible(f"{conv.name} has {name}={have}, needs {want[name]}")


def _conv2_geometry(conv: gs.Node, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(kernel, stride, pad) of the spatial conv: square, same stride and padding on both axes, no groups."""
    kernel = _weight_shape(conv)[2:]
    attrs = _conv_attrs(conv)
    strides, pads = attrs["strides"], attrs["pads"]
    if kernel[0] != kernel[1] or strides[0] != strides[1] or len(set(pads)) != 1:
        raise Ineligible(f"{conv.name} is not square (kernel {kernel}, strides {strides}, pads {pads})")
    for name, want in (("dilations", [1, 1]), ("group", 1), ("auto_pad", "NOTSET")):
        if attrs[name] != want:
            raise Ineligible(f"{conv.name} has {name}={attrs[name]}, needs {want}")
    k, s, p = kernel[0], strides[0], pads[0]
    if p >= k:
        raise Ineligible(f"{conv.name} pads {p} are not smaller than its kernel {k}")
    if tuple((size + 2 * p - k) // s + 1 for size in in_hw) != out_hw:
        raise Ineligible(f"{conv.name} maps {in_hw} to {out_hw}, not to the conv output size")
    return k, s, p


def static_hw(tensor: gs.Tensor, what: str) -> tuple[int, int]:
    """The static spatial size of a 4-D tensor."""
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise Ineligible(f"{what} {tensor.name} has no static 4-D shape ({shape})")
    return shape[2], shape[3]


def _match_mask(mask: gs.Tensor, main: gs.Tensor) -> gs.Tensor:
    """Check `mask` is a binary `[B, 1, Ho, Wo]` map; return the bool decision it is cast from."""
    want = [main.shape[0], 1, *static_hw(main, "conv3 output")]
    if mask.shape is None or list(mask.shape) != want:
        channels = mask.shape[1] if mask.shape is not None and len(mask.shape) == 4 else None
        hint = " (several mask groups are not lowered)" if isinstance(channels, int) and channels > 1 else ""
        raise Ineligible(f"mask {mask.name} shape {mask.shape} is not [B, 1, Ho, Wo] = {want}{hint}")
    return binary_decision(mask)


def binary_decision(mask: gs.Tensor) -> gs.Tensor:
    """The bool tensor `mask` is a float copy of, through value-preserving ops; `Ineligible` if none."""
    tensor = mask
    while (node := producer(tensor)) is not None:
        if node.op == "Cast":
            if node.attrs.get("to") == onnx.TensorProto.FLOAT and node.inputs[0].dtype == np.bool_:
                return node.inputs[0]
            break
        nearest_resize = node.op == "Resize" and node.attrs.get("mode", "nearest") == "nearest"
        if node.op not in VALUE_PRESERVING and not nearest_resize:
            break
        tensor = node.inputs[0]
    raise Ineligible(f"mask {mask.name} is not provably binary (not a Cast of a bool tensor to float)")


BINARY_PRESERVING = (*VALUE_PRESERVING, "Transpose", "Slice", "Gather", "GatherElements", "Cast")
"""Ops whose output holds only values of their first input (Cast: of a tensor already known to be 0/1)."""
BINARY_OF_BINARIES = ("Concat", "Mul", "Min", "Max", "And", "Or")
"""Ops whose output is 0/1 when all their data inputs are."""


def provably_binary(tensor: gs.Tensor, depth: int = 16) -> bool:
    """Whether every value of `tensor` is 0 or 1 by construction: a bool cast, a 0/1 constant, `Where` between
    0/1 values (`masked_fill` of zeros with 1.0), and 0/1 tensors joined, multiplied or rearranged.

    Values are what matters here, not which bool they came from: DyT's mask is `cat([ones, zeros_like(l)
    .masked_fill(c, 1.0)])`, which no single bool tensor is a Cast of.
    """
    values = constant(tensor)
    if values is not None:
        return bool(np.isin(values, (0, 1)).all())
    node = producer(tensor)
    if node is None or depth == 0:
        return tensor.dtype == np.bool_
    if node.op == "Cast" and node.inputs[0].dtype == np.bool_:
        return True
    if node.op in BINARY_PRESERVING or (node.op == "Resize" and node.attrs.get("mode", "nearest") == "nearest"):
        return provably_binary(node.inputs[0], depth - 1)
    if node.op == "Where":
        return all(provably_binary(t, depth - 1) for t in node.inputs[1:])
    if node.op in BINARY_OF_BINARIES:
        return all(provably_binary(t, depth - 1) for t in node.inputs)
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return value is None or bool(np.isin(np.asarray(value.values), (0, 1)).all())
    return False
