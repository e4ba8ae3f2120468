"""Plugin ops inside ONNX models: find the `dync::` nodes, and replace them by standard ONNX ops.

This is how a runtime without an op's plugin (onnxruntime, or TensorRT for an op without a TensorRT face)
runs a package exported with `dync::` nodes: each node is replaced by its portable decomposition, or, for a
graph specialized to one batch size, by its fast CPU path where the op has one.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

from dync.graph import Builder, export_graph, import_graph
from dync.plugins.op_registry import DOMAIN, PLUGIN_ATTRIBUTES, OpRecord, registry
from dync.records import CustomOpRecord


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's top-level `dync::` nodes."""
    return [node for node in model.graph.node if node.domain == DOMAIN]


def has_fast_cpu_path(model: onnx.ModelProto) -> bool:
    """Whether some `dync::` node of `model` has a fast CPU path, which only a batch-specialized graph can use."""
    return any(registry().get(node.op_type).cpu_fast is not None for node in custom_nodes(model))


def custom_ops_used(models: list[onnx.ModelProto]) -> list[CustomOpRecord]:
    """One record per `dync::` op the models use: its plugin id and version, and what runs it without the plugin."""
    used = sorted({node.op_type for model in models for node in custom_nodes(model)})
    return [_custom_op_record(registry().get(name)) for name in used]


def _custom_op_record(op: OpRecord) -> CustomOpRecord:
    if op.cpu_fast is not None:
        fallback = ("onnxruntime: a graph specialized per batch size (fast CPU path); elsewhere the portable "
                    "decomposition")
    else:
        fallback = "portable decomposition"
    return CustomOpRecord(op=f"{DOMAIN}::{op.name}", plugin=op.plugin_id, plugin_version=op.version, fallback=fallback)


def decompose_custom_nodes(model: onnx.ModelProto, ops: Collection[str] | None = None) -> onnx.ModelProto:
    """`model` with every `dync::` node (of the `ops` named, when given) replaced by its portable decomposition."""
    return _replace_custom_nodes(model, None, ops)


def specialize_custom_nodes(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """`model` for one batch size: `dync::` nodes replaced by their fast CPU path where they have one, by their
    portable decomposition otherwise."""
    return _replace_custom_nodes(model, batch, None)


def _replace_custom_nodes(model: onnx.ModelProto, batch: int | None, ops: Collection[str] | None) -> onnx.ModelProto:
    """The replacement behind both: each chosen node's outputs are written by the new nodes instead."""
    chosen = [n for n in custom_nodes(model) if ops is None or n.op_type in ops]
    if not chosen:
        return model
    graph = import_graph(model)
    for node in [n for n in graph.nodes if n.domain == DOMAIN and (ops is None or n.op in ops)]:
        op = registry().get(node.op)
        attrs = {k: v for k, v in node.attrs.items() if k not in PLUGIN_ATTRIBUTES}
        inputs, outputs = list(node.inputs), list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        builder = Builder(graph.nodes, f"{node.name}/")
        if batch is not None and op.cpu_fast is not None:
            op.cpu_fast(builder, inputs, outputs, batch=batch, **attrs)
        else:
            op.decompose(builder, inputs, outputs, **attrs)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    replaced = export_graph(graph, like=model)
    if not custom_nodes(replaced):
        kept = [o for o in replaced.opset_import if o.domain != DOMAIN]
        del replaced.opset_import[:]
        replaced.opset_import.extend(kept)
    return replaced
