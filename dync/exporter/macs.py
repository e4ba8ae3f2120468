"""Multiply-accumulate counts per sample, read off the ONNX graph with the probe's shapes.

The multi-exit papers (MSDNet, RANet) report "FLOPs" as multiply-adds of convolutions and fully connected
layers; dync counts the same: Conv, ConvTranspose, Gemm and MatMul. Elementwise ops, pooling and
normalization are left out, as in those papers. One counter per standard op type, registered by decorator;
a `dync::` plugin op is counted by its record's `macs` face, which every record has.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import onnx_graphsurgeon as gs

from dync.exporter.probe import PROBE_BATCHES, Probe
from dync.plugins.op_registry import DOMAIN, PLUGIN_ATTRIBUTES, registry

MacCounter = Callable[[gs.Node, Callable[[gs.Tensor], tuple[int, ...]]], int]
MAC_COUNTERS: dict[str, MacCounter] = {}


def counts(op_type: str) -> Callable[[MacCounter], MacCounter]:
    def register(fn: MacCounter) -> MacCounter:
        MAC_COUNTERS[op_type] = fn
        return fn

    return register


@counts("Conv")
def _conv(node: gs.Node, shape: Callable[[gs.Tensor], tuple[int, ...]]) -> int:
    weight = shape(node.inputs[1])  # [Cout, Cin / groups, *kernel]
    return prod(shape(node.outputs[0])) * prod(weight[1:])


@counts("ConvTranspose")
def _conv_transpose(node: gs.Node, shape: Callable[[gs.Tensor], tuple[int, ...]]) -> int:
    weight = shape(node.inputs[1])  # [Cin, Cout / groups, *kernel]
    return prod(shape(node.inputs[0])) * prod(weight[1:])


@counts("Gemm")
def _gemm(node: gs.Node, shape: Callable[[gs.Tensor], tuple[int, ...]]) -> int:
    a = shape(node.inputs[0])
    reduced = a[0] if node.attrs.get("transA", 0) else a[1]
    return prod(shape(node.outputs[0])) * reduced


@counts("MatMul")
def _matmul(node: gs.Node, shape: Callable[[gs.Tensor], tuple[int, ...]]) -> int:
    return prod(shape(node.outputs[0])) * shape(node.inputs[0])[-1]


def node_macs(node: gs.Node, probe: Probe) -> int:
    """MACs one sample costs in `node`; batch-independent nodes are charged whole (their cost at batch 1)."""
    def shape(tensor: gs.Tensor) -> tuple[int, ...]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.values.shape)
        return probe.shapes[tensor.name]

    if node.domain == DOMAIN:
        op = registry().get(node.op)
        attrs = {k: v for k, v in node.attrs.items() if k not in PLUGIN_ATTRIBUTES}
        total = op.macs([shape(t) for t in node.inputs], [shape(t) for t in node.outputs], **attrs)
    elif node.op in MAC_COUNTERS:
        total = MAC_COUNTERS[node.op](node, shape)
    else:
        return 0
    if node.outputs[0].name in probe.batched:
        return total // PROBE_BATCHES[0]
    return total

