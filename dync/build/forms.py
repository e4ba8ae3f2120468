"""A stage as TensorRT builds it: plugin nodes kept or decomposed, and in fp16 when asked.

Networks are strongly typed (TensorRT 11 removed the weak-typing precision flags, and 10.x deprecates them),
so the precision is in the graph itself: an fp16 engine is built from the stage converted to fp16 here, with
its inputs and outputs kept float32 so that the executor's carried state and exit decisions are unchanged in
type; int8 and fp8 engines are built from the TensorRT-form Q/DQ stages `dync quantize` wrote.
"""

from __future__ import annotations

import onnx

from dync.layers import decision_layers
from dync.plugins.op_registry import DOMAIN, registry
from dync.plugins.splice import custom_nodes, decompose_custom_nodes

FP16_KEPT_FLOAT = ("TopK", "ArgMax", "ArgMin", "Range", "CumSum", "NonZero", "Softmax")
"""Ops that stay float32 in an fp16 stage, with onnxruntime's converter's own list: decisions (the kept tokens,
the chosen block), index arithmetic, and the softmax whose sums overflow fp16 on long rows."""


def plugins_kept(model: onnx.ModelProto, mode: str) -> set[str]:
    """The `dync::` ops of `model` that stay plugin nodes in `mode` (aot: those with a TensorRT face)."""
    if mode == "decomposed":
        return set()
    with_plugin = set(registry().with_face("tensorrt"))
    return {node.op_type for node in custom_nodes(model)} & with_plugin


def stage_for_tensorrt(model: onnx.ModelProto, *, plugins: str, precision: str) -> onnx.ModelProto:
    """The stage TensorRT parses: `dync::` nodes without a kept plugin replaced by their portable decomposition;
    at fp16, converted with its decision layers (`dync.layers.decision_layers`) kept in float32."""
    used = {node.op_type for node in custom_nodes(model)}
    decomposed = used - plugins_kept(model, plugins)
    if decomposed:
        model = decompose_custom_nodes(model, ops=decomposed)
    if precision == "fp16":
        model = _to_fp16(model)
    return model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's float16 converter, keeping I/O float32, decision layers and plugin ops that take no fp16."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    no_fp16 = [op.name for op in registry() if "float16" not in op.dtypes]
    kept = [n.name for n in model.graph.node if n.domain == DOMAIN and n.op_type in no_fp16]
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                    op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEPT_FLOAT],
                                    node_block_list=[*decision_layers(model), *kept])
