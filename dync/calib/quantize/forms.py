"""The graphs one stage's ranges become, all written by onnxruntime's quantizer from the same stored ranges.

- CPU int8: QDQ with unsigned activations and signed per-channel weights, which onnxruntime's CPU provider
  fuses into its VNNI kernels (QLinearConv, QGemm, QLinearMatMul ...).
- TensorRT int8: the form TensorRT's strongly typed networks take: signed symmetric Q/DQ (zero-point 0)
  on the inputs of the weighted ops only, per-tensor activations, per-channel weights on the output axis
  (MatMul's axis 1), float weights behind a Q/DQ pair and float biases, opset >= 19.
- TensorRT fp8: that form with FLOAT8E4M3FN zero-points and scales amax/448 (the int8 scales are amax/127).
- CPU fp8: the fp8 form emulated for onnxruntime as saturating Cast pairs, weights rounded to fp8 in place.
  onnxruntime's QDQ fusions (extended level and up) compute float8 Q/DQ around Conv wrongly (2.5x the
  output's magnitude on the digits model, against 0.12 without the fusions); a Cast pair offers them
  nothing to fuse.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dync.calib.quantize.ranges import METHODS, StageRanges
from dync.layers import WEIGHTED_OPS
from dync.runtime.branches import all_graphs, all_nodes, transform_branches

CPU_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
                "GlobalAveragePool", "Relu", "Clip", "Sigmoid", "Resize", "Reshape", "Transpose", "Flatten",
                "Squeeze", "Unsqueeze", "Split", "Slice", "Pad")
"""What the CPU form quantizes; onnxruntime runs each in int8 (LayerNorm and Softmax stay float: their int8
forms are slower here and lose accuracy)."""
TRT_OP_TYPES = tuple(sorted(WEIGHTED_OPS))
"""TensorRT's explicit-quantization placement: Q/DQ at the inputs of the weighted ops; it fuses the rest."""
INT8_AMAX = 127.0
FP8_AMAX = 448.0
"""The largest magnitudes of symmetric int8 and of float8 e4m3fn: scale = amax / these."""

FP8_TYPE = TensorProto.FLOAT8E4M3FN


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger that the model was not pre-processed: dync does not
    run `quant_pre_process` on purpose (it inlines local functions, which would drop `dync::` nodes)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _quantized(model: onnx.ModelProto, ranges: StageRanges, method: str, activations: object,
               exclude: Collection[str], op_types: Collection[str], extra: dict) -> onnx.ModelProto:
    """onnxruntime's `quantize_static` in QDQ format from the stored ranges (its calibration caches), on the
    top-level graph and on each calibrated `If` branch as a model of its own (`dync.runtime.branches`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    def quantize(graph: onnx.ModelProto, cache: Path) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(prefix="dync-quantize-") as scratch, _quiet():
            output = Path(scratch) / "quantized.onnx"
            quantize_static(_plugin_outputs_typed(graph), output, None, calibration_cache_path=cache,
                            quant_format=QuantFormat.QDQ, activation_type=activations, weight_type=QuantType.QInt8,
                            per_channel=True, calibrate_method=METHODS[method], nodes_to_exclude=list(exclude),
                            op_types_to_quantize=list(op_types), extra_options=extra)
            return onnx.load(output)

    top = quantize(model, ranges.graph)
    if not ranges.branches:
        return top
    return transform_branches(top, lambda branch, key: quantize(branch, ranges.branches[key])
                              if key in ranges.branches else branch)


def _plugin_outputs_typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with a value_info for every `dync::` node output that lacks one, typed as the decomposition
    infers it: ONNX shape inference cannot type a plugin node's outputs, and onnxruntime's quantizer leaves an
    untyped tensor unquantized, then fails on the bias of the Conv reading it (or keeps that Conv's input in
    float)."""
    from dync.plugins.splice import custom_nodes, decompose_custom_nodes

    graph = model.graph
    typed = {v.name for v in [*graph.value_info, *graph.output, *graph.input]}
    missing = {name for node in custom_nodes(model) for name in node.output if name and name not in typed}
    if not missing:
        return model
    inferred = onnx.shape_inference.infer_shapes(decompose_custom_nodes(model))
    completed = onnx.ModelProto()
    completed.CopyFrom(model)
    completed.graph.value_info.extend(v for v in inferred.graph.value_info if v.name in missing)
    return completed


def cpu_int8(model: onnx.ModelProto, ranges: StageRanges, method: str, exclude: Collection[str],
             op_types: Collection[str] = CPU_OP_TYPES) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType

    return _quantized(model, ranges, method, QuantType.QUInt8, exclude, op_types, {})


def trt_int8(model: onnx.ModelProto, ranges: StageRanges, method: str, exclude: Collection[str]
             ) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "AddQDQPairToWeight": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             "OpTypesToExcludeOutputQuantization": list(TRT_OP_TYPES)}
    return _quantized(model, ranges, method, QuantType.QInt8, exclude, TRT_OP_TYPES, extra)


def _qdq_parameters(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """The scale and zero-point initializers of every Q/DQ node, in every graph."""
    scales, zero_points = set(), set()
    for node in all_nodes(model.graph):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scales.add(node.input[1])
            zero_points.add(node.input[2])
    return scales, zero_points


def fp8_qdq(trt_int8_model: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT int8 form with float8 e4m3fn Q/DQ: each scale amax/448 instead of amax/127."""
    model = onnx.ModelProto()
    model.CopyFrom(trt_int8_model)
    scales, zero_points = _qdq_parameters(model)
    for tensor in (t for graph in all_graphs(model.graph) for t in graph.initializer):
        if tensor.name in scales:
            tensor.CopyFrom(numpy_helper.from_array(
                (numpy_helper.to_array(tensor) * (INT8_AMAX / FP8_AMAX)).astype(np.float32), tensor.name))
        elif tensor.name in zero_points:
            zero = numpy_helper.to_array(tensor)
            assert zero.dtype == np.int8 and not zero.any(), f"{tensor.name}: the TensorRT form is symmetric int8"
            tensor.CopyFrom(helper.make_tensor(tensor.name, FP8_TYPE, list(zero.shape), [0.0] * zero.size))
    return model


def fp8_casts(fp8_model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp8 Q/DQ form as onnxruntime CPU computes it exactly: each weight's Q/DQ pair folded into the
    weight rounded to fp8, each activation's Q a Div and a saturating Cast to fp8, each DQ a Cast back and
    a Mul; in every graph (a branch reads the weights of the graphs around it)."""
    model = onnx.ModelProto()
    model.CopyFrom(fp8_model)
    _casts_in(model.graph, {})
    return model


def _casts_in(graph: onnx.GraphProto, outer_weights: dict[str, TensorProto]) -> None:
    weights = {**outer_weights, **{t.name: t for t in graph.initializer}}
    producer = {out: node for node in graph.node for out in node.output}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for branch in (a.g for a in node.attribute if a.HasField("g")):
            _casts_in(branch, weights)
        if node.op_type == "QuantizeLinear" and node.input[0] in weights:
            continue  # folded into its DequantizeLinear below
        if node.op_type == "DequantizeLinear" and (quantize := producer.get(node.input[0])) is not None \
                and quantize.op_type == "QuantizeLinear" and quantize.input[0] in weights:
            graph.initializer.append(_rounded_weight(weights, quantize, node.output[0]))
        elif node.op_type == "QuantizeLinear":
            _assert_per_tensor(weights, node)
            scaled = f"{node.output[0]}/scaled"
            nodes += [helper.make_node("Div", [node.input[0], node.input[1]], [scaled], name=f"{node.name}/div"),
                      helper.make_node("Cast", [scaled], [node.output[0]], name=f"{node.name}/cast", to=FP8_TYPE,
                                       saturate=1)]
        elif node.op_type == "DequantizeLinear":
            _assert_per_tensor(weights, node)
            widened = f"{node.output[0]}/widened"
            nodes += [helper.make_node("Cast", [node.input[0]], [widened], name=f"{node.name}/cast",
                                       to=TensorProto.FLOAT),
                      helper.make_node("Mul", [widened, node.input[1]], [node.output[0]], name=f"{node.name}/mul")]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in all_nodes(graph) for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _rounded_weight(weights: dict[str, TensorProto], quantize: onnx.NodeProto, name: str) -> TensorProto:
    """The weight as fp8 holds it: divided by its (per-channel) scale, rounded to e4m3fn with saturation, and
    multiplied back, in float32."""
    weight = numpy_helper.to_array(weights[quantize.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(weights[quantize.input[1]]).astype(np.float32)
    axis = next((a.i for a in quantize.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * weight.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    scaled = np.clip(weight / scale, -FP8_AMAX, FP8_AMAX)
    return numpy_helper.from_array((scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale)
                                   .astype(np.float32), name)


def _assert_per_tensor(weights: dict[str, TensorProto], node: onnx.NodeProto) -> None:
    assert numpy_helper.to_array(weights[node.input[1]]).size == 1, f"{node.name}: activations are per tensor"


def quantized_node_count(model: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Nodes of the original stage that now read a dequantized tensor."""
    dequantized = {out for node in all_nodes(model.graph) if node.op_type == "DequantizeLinear" for out in node.output}
    names = {node.name for node in all_nodes(original.graph)}
    return sum(1 for node in all_nodes(model.graph) if node.name in names and set(node.input) & dequantized)
