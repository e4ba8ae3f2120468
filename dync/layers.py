"""Which layers of a stage make its decisions and which are its exit heads: walks back from tensors to the
weighted layers that compute them.

Both are layers to keep in float when the rest of a stage is made cheaper: rounding a spatial masker or a token
scorer flips discrete decisions (`dync quantize`, fp16 TensorRT builds), and rounding an exit head moves
confidences across thresholds. Plain ONNX walks, so quantization and the build share them without one
importing the other.
"""

from __future__ import annotations

import onnx

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""The ops that hold a layer's weights (as an initializer among their inputs after the first)."""

DECISION_OPS = frozenset({"Greater", "GreaterOrEqual", "Less", "LessOrEqual", "TopK", "ArgMax", "ArgMin"})
"""Ops whose output is a discrete decision (a spatial mask, the tokens kept, a dispatch): the layer computing
their input stays float, since rounding it flips decisions, which changes what is computed, not by how much."""


def exit_head(model: onnx.ModelProto, output: str) -> list[str]:
    """The exit's classifier: the nodes from the last weighted op (Conv, Gemm, MatMul with a weight) on the
    way back from the exit output up to it, that op included. Empty when the exit has no such layer."""
    return _BackToWeighted(model)([output])


def decision_layers(model: onnx.ModelProto) -> list[str]:
    """The nodes from each decision op (`DECISION_OPS`) back to the weighted layers that compute its inputs."""
    walk = _BackToWeighted(model)
    found: list[str] = []
    for node in model.graph.node:
        if node.op_type in DECISION_OPS:
            found += [name for name in walk(list(node.input)) if name not in found]
    return found


class _BackToWeighted:
    """Walks a graph back from tensors to the first weighted op on each path (its producers and weights
    indexed once, for every walk)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._producers = {out: node for node in model.graph.node for out in node.output}
        self._weights = {t.name for t in model.graph.initializer}

    def __call__(self, tensors: list[str]) -> list[str]:
        """The nodes on the way back from `tensors`, the weighted ops met included; empty when no path meets
        one."""
        visited: list[str] = []
        found = False
        frontier = list(tensors)
        while frontier:
            node = self._producers.get(frontier.pop())
            if node is None or node.name in visited:
                continue
            visited.append(node.name)
            if node.op_type in WEIGHTED_OPS and any(name in self._weights for name in node.input[1:]):
                found = True
                continue
            frontier += list(node.input)
        return visited if found else []
