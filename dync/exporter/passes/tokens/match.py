"""Find DyT-style token dispatch in an exported graph, whoever wrote the model.

The rule (either operand order of Mul and Add)::

    Add(Mul(mlp(x), mask), residual)

where `mask` is a provably binary float tensor with one value per token (`[..., 1]`, the leading dims those
of `mlp(x)`): a Cast of a bool decision or a `Where` between 0/1 values (`masked_fill`), joined, multiplied
or reshaped (`provably_binary`); `residual` has the shape of
`mlp(x)`; and `mlp` is a row-wise subgraph of the single tensor `x`: each output row depends only on the
same row of `x` (MatMul/Gemm by a constant matrix, elementwise ops whose constants broadcast along the
last axis only, LayerNormalization and Softmax over the last axis), with at least one MatMul or Gemm.
What fails a check raises `Ineligible` with the reason the user sees.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from dync.exporter.passes.spatial.match import Ineligible, masked_operands, no_reading_fits, provably_binary
from dync.graph import constant, producer

__all__ = ["Dispatch", "Ineligible", "Order", "candidates", "match"]

UNARY = ("Gelu", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
         "Erf", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Identity",
         "Clip")
"""Elementwise ops of one tensor (further inputs, as Clip's bounds, must be constants)."""
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")
LAST_AXIS = ("LayerNormalization", "Softmax", "LogSoftmax")
"""Ops that mix values within a row only when their axis is the last one."""
PRODUCTS = ("MatMul", "Gemm")


class Order:
    """Where each tensor is made in the graph's node order, and which tensors are graph outputs."""

    def __init__(self, graph: gs.Graph) -> None:
        self._made_at = {id(t): i for i, node in enumerate(graph.nodes) for t in node.outputs}
        self._outputs = {id(t) for t in graph.outputs}

    def position(self, tensor: gs.Tensor) -> int:
        """-1 for graph inputs and constants."""
        return self._made_at.get(id(tensor), -1)

    def is_output(self, tensor: gs.Tensor) -> bool:
        return id(tensor) in self._outputs


@dataclass(frozen=True)
class Dispatch:
    """A matched dispatch: the MLP's nodes in graph order and the tensors the lowered form reads."""

    add: gs.Node
    mlp: tuple[gs.Node, ...]
    source: gs.Tensor
    output: gs.Tensor
    mask: gs.Tensor
    residual: gs.Tensor

    @property
    def name(self) -> str:
        return self.add.name

    @property
    def width_in(self) -> int:
        return int(self.source.shape[-1])

    @property
    def width_out(self) -> int:
        return int(self.output.shape[-1])


def candidates(graph: gs.Graph) -> Iterator[gs.Node]:
    """Add nodes with a Mul operand that scales each row of a tensor by its own value: a gated residual.

    Masks with fewer values (per channel map, per sample: squeeze-excitation, layer skipping) are not
    candidates, so the models of other passes draw no reports from this one.
    """
    for node in graph.nodes:
        if node.op == "Add" and any(_gates_rows(producer(t, "Mul")) for t in node.inputs):
            yield node


def _gates_rows(mul: gs.Node | None) -> bool:
    if mul is None or any(_is_constant(t) or t.shape is None for t in mul.inputs):
        return False
    shapes = [list(t.shape) for t in mul.inputs]
    return any(len(s) >= 2 and s[-1] == 1 and o[-1] != 1 and s[:-1] == o[:-1] for s, o in (shapes, shapes[::-1]))


def match(add: gs.Node, order: Order) -> Dispatch:
    """Match `Add(Mul(mlp(x), mask), residual)` in any operand order; raise `Ineligible` otherwise."""
    reasons = []
    for mul, main, mask, residual in masked_operands(add):
        if mask.shape is None or mask.shape[-1] != 1:
            continue
        try:
            return _match_operands(add, mul, main, mask, residual, order)
        except Ineligible as why:
            reasons.append(str(why))
    raise no_reading_fits(reasons)


def _match_operands(add: gs.Node, mul: gs.Node, main: gs.Tensor, mask: gs.Tensor, residual: gs.Tensor,
                    order: Order) -> Dispatch:
    """Check one assignment of the Mul and Add operands to (mlp output, mask) and residual."""
    shape = _known_shape(main, "the gated branch")
    if _known_shape(mask, "the mask") != [*shape[:-1], 1]:
        raise Ineligible(f"mask {mask.name} shape {mask.shape} is not one value per row of {main.name} {shape}")
    if _known_shape(residual, "the residual") != shape:
        raise Ineligible(f"residual {residual.name} shape {residual.shape} differs from the gated branch {shape}")
    if not provably_binary(mask):
        raise Ineligible(f"mask {mask.name} is not provably binary (not built from a bool tensor or 0/1 "
                         "constants by casts, Where, Concat or reshapes)")
    _check_only_reader(main, mul, order)
    _check_only_reader(mul.outputs[0], add, order)
    mlp, source = _row_wise_mlp(main, order)
    source_shape = _known_shape(source, "the MLP input")
    if source_shape[:-1] != shape[:-1] or not isinstance(source_shape[-1], int) or not isinstance(shape[-1], int):
        raise Ineligible(f"MLP input {source.name} {source_shape} and output {main.name} {shape} do not share "
                         "their rows or have no static width")
    return Dispatch(add, mlp, source, main, mask, residual)


def _known_shape(tensor: gs.Tensor, what: str) -> list:
    if tensor.shape is None:
        raise Ineligible(f"{what} {tensor.name} has no inferred shape")
    return list(tensor.shape)


def _check_only_reader(tensor: gs.Tensor, reader: gs.Node, order: Order) -> None:
    """Skipping rows of `tensor` is only a saving if nothing else reads all of it."""
    others = [n.name for n in tensor.outputs if n is not reader] + (["the graph output"] if order.is_output(tensor)
                                                                     else [])
    if others:
        raise Ineligible(f"{tensor.name} is also read by {', '.join(others)}, so it is needed for every token")


def _row_wise_mlp(main: gs.Tensor, order: Order) -> tuple[tuple[gs.Node, ...], gs.Tensor]:
    """The largest row-wise subgraph computing `main` from one tensor, and that tensor.

    The region of row-wise nodes may reach past the MLP's input (e.g. into a residual Add whose output only
    the MLP reads); the input is then the earliest tensor that alone explains `main`.
    """
    region = _row_wise_region(main, order)
    if not any(n.op in PRODUCTS for n in region):
        raise Ineligible(f"{main.name} is not computed by a row-wise MLP (no MatMul by a constant matrix before "
                         "a non-row-wise op)")
    inputs = sorted({id(t): t for n in region for t in _variables(n.inputs)}.values(), key=order.position)
    for source in inputs:
        nodes = _closure(main, region, source, order)
        if nodes is not None and any(n.op in PRODUCTS for n in nodes):
            return nodes, source
    reads = sorted({t.name for t in _region_inputs(region)})
    raise Ineligible(f"the MLP computing {main.name} reads several tensors ({', '.join(reads)}), not one row-wise "
                     "input")


def _row_wise_region(main: gs.Tensor, order: Order) -> list[gs.Node]:
    """Row-wise nodes computing `main` whose outputs feed only the region: walked latest-first, so a tensor is
    judged after every consumer that can join the region has."""
    first = producer(main)
    if first is None or not _row_wise(first, order):
        what = "a graph input" if first is None else f"{first.op} node {first.name}, not row-wise"
        raise Ineligible(f"the gated branch {main.name} is produced by {what}")
    region = {id(first): first}
    heap = [(-order.position(t), id(t), t) for t in _variables(first.inputs)]
    heapq.heapify(heap)
    while heap:
        tensor = heapq.heappop(heap)[2]
        node = producer(tensor)
        if node is None or id(node) in region or not _row_wise(node, order):
            continue
        if all(id(c) in region for out in node.outputs for c in out.outputs):
            region[id(node)] = node
            for t in _variables(node.inputs):
                heapq.heappush(heap, (-order.position(t), id(t), t))
    return sorted(region.values(), key=lambda n: order.position(n.outputs[0]))


def _closure(main: gs.Tensor, region: list[gs.Node], source: gs.Tensor, order: Order
             ) -> tuple[gs.Node, ...] | None:
    """The region's nodes between `source` and `main`, if they read nothing else."""
    members = {id(n) for n in region}
    found: dict[int, gs.Node] = {}
    stack = [main]
    while stack:
        tensor = stack.pop()
        if tensor is source:
            continue
        node = producer(tensor)
        if node is None or id(node) not in members:
            return None
        if id(node) not in found:
            found[id(node)] = node
            stack.extend(_variables(node.inputs))
    return tuple(sorted(found.values(), key=lambda n: order.position(n.outputs[0])))


def _region_inputs(region: list[gs.Node]) -> Iterable[gs.Tensor]:
    members = {id(n) for n in region}
    return [t for n in region for t in _variables(n.inputs) if id(producer(t)) not in members]


def _row_wise(node: gs.Node, order: Order) -> bool:
    """Whether each output row of `node` (its one used output, not a graph output) depends only on the same
    row of its variable inputs."""
    used = [t for t in node.outputs if t.outputs or order.is_output(t)]
    if used != node.outputs[:1] or order.is_output(used[0]) or node.outputs[0].shape is None:
        return False
    shape = list(node.outputs[0].shape)
    variables = _variables(node.inputs)
    if node.op in UNARY:
        return len(variables) == 1 and node.inputs[0] is variables[0]
    if node.op in BINARY:
        return bool(variables) and all(
            _per_channel(t, len(shape)) if _is_constant(t) else list(t.shape or []) == shape for t in node.inputs)
    if node.op in LAST_AXIS:
        axis = node.attrs.get("axis", -1)
        return len(variables) == 1 and node.inputs[0] is variables[0] and axis in (-1, len(shape) - 1)
    if node.op == "MatMul":
        return _variables(node.inputs[:1]) == variables and _is_constant(node.inputs[1]) and \
            len(_constant_shape(node.inputs[1])) == 2
    if node.op == "Gemm":
        bias = node.inputs[2:3]
        return node.attrs.get("transA", 0) == 0 and len(variables) == 1 and node.inputs[0] is variables[0] and \
            all(len(_constant_shape(t)) <= 1 for t in bias)
    return False


def _per_channel(tensor: gs.Tensor, rank: int) -> bool:
    """A constant that broadcasts along the last axis only (the same for every row)."""
    shape = _constant_shape(tensor)
    return _is_constant(tensor) and len(shape) <= rank and all(d == 1 for d in shape[:-1])


def _is_constant(tensor: gs.Tensor) -> bool:
    return constant(tensor) is not None


def _constant_shape(tensor: gs.Tensor) -> list[int]:
    """The shape of a constant; three unknown dims (no row-wise broadcast) for anything else."""
    value = constant(tensor)
    return [-1, -1, -1] if value is None else list(value.shape)


def _variables(tensors: Iterable[gs.Tensor]) -> list[gs.Tensor]:
    return [t for t in tensors if t.name and not _is_constant(t)]


