"""What a restriction rule may look at (`NodeContext` over a `_Scope` of tensor facts), and the rules themselves.

Each rule checks the restrictions of one or more ops that can be read off attributes and constant inputs, and
quotes in its docstring the restriction text of the support matrix it checks. `@_rule(op, ...)` registers it in
`RULES`; an op with a rule gets no generic check-by-hand note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dync.graph import DEFAULT_DOMAINS
from dync.lint.report import ERROR, NOTE, RESTRICTION, Finding

# --------------------------------------------------------------------------- #
# Graph context: what a rule may look at
# --------------------------------------------------------------------------- #


@dataclass
class _Scope:
    """Tensor facts visible in one graph (its own plus the enclosing graphs'): element types, shapes, constants."""

    types: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    constants: dict[str, onnx.TensorProto | np.ndarray] = field(default_factory=dict)  # converted when asked

    def child(self, graph: onnx.GraphProto) -> _Scope:
        scope = _Scope(dict(self.types), dict(self.shapes), dict(self.constants))
        scope.add_graph(graph)
        return scope

    def add_graph(self, graph: onnx.GraphProto) -> None:
        for info in [*graph.input, *graph.output, *graph.value_info]:
            self._add_value_info(info)
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = tuple(init.dims)
            self.constants[init.name] = init
        for node in graph.node:
            value = _constant_node_value(node)
            if value is not None and node.output:
                self.constants[node.output[0]] = value

    def _add_value_info(self, info: onnx.ValueInfoProto) -> None:
        if not info.type.HasField("tensor_type"):
            return
        tensor = info.type.tensor_type
        if tensor.elem_type:
            self.types[info.name] = tensor.elem_type
        if tensor.HasField("shape"):
            self.shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
            )


def _constant_node_value(node: onnx.NodeProto) -> onnx.TensorProto | np.ndarray | None:
    """The value of a default-domain Constant node; TensorRT's parser imports these as weights, like initializers."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    return None


@dataclass
class NodeContext:
    """One node with what rules need: its attributes, its scope, and helpers that build findings."""

    node: onnx.NodeProto
    stage: str
    label: str
    scope: _Scope

    @property
    def op(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default: Any = None) -> Any:
        for attr in self.node.attribute:
            if attr.name == name:
                value = helper.get_attribute_value(attr)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def has_attr(self, name: str) -> bool:
        return any(attr.name == name for attr in self.node.attribute)

    def input(self, index: int) -> str:
        """The name of input `index`, or "" when it is absent (omitted optional inputs are "" in ONNX too)."""
        return self.node.input[index] if index < len(self.node.input) else ""

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, None for a tensor computed at run time."""
        value = self.scope.constants.get(name)
        return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value

    def rank(self, name: str) -> int | None:
        shape = self.scope.shapes.get(name)
        return None if shape is None else len(shape)

    def finding(self, severity: str, code: str, message: str) -> Finding:
        return Finding(self.stage, self.label, self.op, severity, message, code)

    def error(self, problem: str, fix: str) -> Finding:
        """A restriction the node breaks: 'node X (Op) <problem>; <fix>.'"""
        return self.finding(ERROR, RESTRICTION, f"node '{self.label}' ({self.op}) {problem}; {fix}.")

    def note(self, problem: str, fix: str) -> Finding:
        return self.finding(NOTE, RESTRICTION, f"node '{self.label}' ({self.op}) {problem}; {fix}.")


# --------------------------------------------------------------------------- #
# Restriction rules
# --------------------------------------------------------------------------- #

Rule = Callable[[NodeContext], list[Finding]]
RULES: dict[str, Rule] = {}
"""op name -> the rule checking that op's restrictions; an op with a rule gets no generic restriction note."""


def _rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def _needs_constant(ctx: NodeContext, index: int, what: str) -> list[Finding]:
    """Input `index` (when given) must be an initializer or a Constant node's output."""
    name = ctx.input(index)
    if not name or ctx.constant(name) is not None:
        return []
    return [ctx.error(f"computes its `{what}` input '{name}' at run time but TensorRT needs an initializer",
                      f"make `{what}` a constant when exporting")]


_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")


@_rule(*_REDUCE_OPS, "Slice", "Pad")
def axes_initializer(ctx: NodeContext) -> list[Finding]:
    """"`axes` must be an initializer" (the Reduce* ops, Slice, Pad); attribute axes (old opsets) are constant."""
    index = {"Slice": 3, "Pad": 3}.get(ctx.op, 1)
    return _needs_constant(ctx, index, "axes")


@_rule("Squeeze", "Unsqueeze")
def squeeze_axes_constant(ctx: NodeContext) -> list[Finding]:
    """Squeeze: "`axes` must be an initializer"; Unsqueeze: "`axes` must be a constant tensor"."""
    return _needs_constant(ctx, 1, "axes")


@_rule("CumSum")
def cumsum_axis(ctx: NodeContext) -> list[Finding]:
    """"`axis` must be an initializer"."""
    return _needs_constant(ctx, 1, "axis")


@_rule("OneHot")
def onehot_depth(ctx: NodeContext) -> list[Finding]:
    """"`depth` must be a build-time constant"."""
    return _needs_constant(ctx, 1, "depth")


_RESIZE_ALLOWED = {
    "coordinate_transformation_mode": ("half_pixel", ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                      "asymmetric", "align_corners")),
    "mode": ("nearest", ("nearest", "linear")),
    "nearest_mode": ("round_prefer_floor", ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")),
    "keep_aspect_ratio_policy": ("stretch", ("stretch",)),
}


_QDQ_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8 e4m3"}


@_rule("QuantizeLinear", "DequantizeLinear")
def symmetric_signed_qdq(ctx: NodeContext) -> list[Finding]:
    """QuantizeLinear: "`y_zero_point` must be 0"; DequantizeLinear: "`x_zero_point` must be zero", types
    INT8, FP8, INT4. The zero-point is a constant of a signed type TensorRT quantizes to, and activations
    (a Q/DQ whose input is not a constant) have one scale: TensorRT quantizes them per tensor."""
    zero_name = ctx.input(2)
    zero = ctx.constant(zero_name) if zero_name else None
    found = _needs_constant(ctx, 2, "zero_point") if zero_name else [
        ctx.error("has no zero-point, so it quantizes to uint8, which TensorRT does not take",
                  "quantize with signed int8 (dync quantize writes that form for TensorRT)")]
    if zero is not None:
        kind = ctx.scope.types.get(zero_name)
        if kind not in _QDQ_TYPES:
            found.append(ctx.error(f"quantizes to {helper.tensor_dtype_to_np_dtype(kind)}, which TensorRT does "
                                   "not take", "quantize to signed int8 or fp8 e4m3"))
        elif np.asarray(zero, dtype=np.float32).any():
            found.append(ctx.error("has a non-zero zero-point", "quantize symmetrically (zero-point 0)"))
    scale = ctx.constant(ctx.input(1))
    activation = ctx.op == "QuantizeLinear" and ctx.constant(ctx.input(0)) is None  # a DQ's Q is checked itself
    if activation and scale is not None and np.asarray(scale).size > 1:
        found.append(ctx.error("quantizes an activation per channel, which TensorRT does not",
                               "quantize activations per tensor"))
    return found


@_rule("Resize")
def resize_modes(ctx: NodeContext) -> list[Finding]:
    """"Supported resize transformation modes: `half_pixel`, `pytorch_half_pixel`, `tf_half_pixel_for_nn`,
    `asymmetric`, and `align_corners`. Supported resize modes: `nearest`, `linear`. Supported nearest modes:
    `floor`, `ceil`, `round_prefer_floor`, `round_prefer_ceil`. Supported aspect ratio policy: `stretch`. When
    `scales` is a tensor input, `axes` must be an iota vector of length rank(input). Antialiasing is not
    supported." (Unset attributes take their ONNX defaults.)"""
    found = []
    for name, (default, allowed) in _RESIZE_ALLOWED.items():
        value = ctx.attr(name, default)
        if value not in allowed:
            found.append(ctx.error(f"uses {name}='{value}', which TensorRT does not support",
                                   f"use one of {', '.join(allowed)}"))
    if ctx.attr("antialias", 0):
        found.append(ctx.error("sets antialias=1, which TensorRT does not support", "resize without antialiasing"))
    return found + _resize_axes(ctx)


def _resize_axes(ctx: NodeContext) -> list[Finding]:
    axes = ctx.attr("axes")
    if axes is None or not ctx.input(2):
        return []
    rank = ctx.rank(ctx.input(0))
    if rank is None:
        return [ctx.note(f"resizes by `scales` over axes {list(axes)} of an input of unknown rank",
                         "make sure the axes are 0..rank-1 in order, as TensorRT requires")]
    if list(axes) != list(range(rank)):
        return [ctx.error(f"resizes by `scales` over axes {list(axes)}, but TensorRT needs all axes 0..{rank - 1}",
                          "give a scale for every axis instead of the `axes` attribute")]
    return []


def _dilations_are_ones(ctx: NodeContext) -> list[Finding]:
    dilations = list(ctx.attr("dilations", []))
    if any(d != 1 for d in dilations):
        return [ctx.error(f"uses dilations {dilations}, but TensorRT needs none or all ones",
                          "remove the pooling dilation")]
    return []


def _pool_is_2d_or_3d(ctx: NodeContext) -> list[Finding]:
    kernel = list(ctx.attr("kernel_shape", []))
    if len(kernel) not in (2, 3):
        return [ctx.error(f"pools over {len(kernel)} spatial dimension(s), but TensorRT pools only 2D or 3D",
                          "reshape the input to 2D or 3D pooling")]
    return []


@_rule("MaxPool")
def maxpool(ctx: NodeContext) -> list[Finding]:
    """"2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or all ones"."""
    found = _pool_is_2d_or_3d(ctx) + _dilations_are_ones(ctx)
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        found.append(ctx.error("asks for the `Indices` output, which TensorRT does not produce",
                               "drop the indices (return_indices=False)"))
    return found


@_rule("AveragePool")
def averagepool(ctx: NodeContext) -> list[Finding]:
    """"2D or 3D Pooling only. `dilations` must be empty or all ones"."""
    return _pool_is_2d_or_3d(ctx) + _dilations_are_ones(ctx)


@_rule("LpPool")
def lppool(ctx: NodeContext) -> list[Finding]:
    """"`dilations` must be empty or all ones"."""
    return _dilations_are_ones(ctx)


@_rule("TopK")
def topk(ctx: NodeContext) -> list[Finding]:
    """"`sorted` must be 1. `K` input must be less than 3840." A K computed at run time is left as a note."""
    found = []
    if ctx.attr("sorted", 1) != 1:
        found.append(ctx.error("sets sorted=0, which TensorRT does not support", "use sorted=1"))
    k = ctx.constant(ctx.input(1)) if ctx.input(1) else _attr_array(ctx, "k")  # K was an attribute before opset 10
    if k is None:
        found.append(ctx.note("takes K at run time", "make sure K stays below 3840, TensorRT's limit"))
    elif int(np.max(k)) >= 3840:
        found.append(ctx.error(f"uses K={int(np.max(k))}, but TensorRT needs K < 3840", "lower K or split the top-k"))
    return found


def _attr_array(ctx: NodeContext, name: str) -> np.ndarray | None:
    return np.asarray(ctx.attr(name)) if ctx.has_attr(name) else None


@_rule("ScatterND")
def scatternd(ctx: NodeContext) -> list[Finding]:
    """"`reduction` is not supported" (only the default 'none' is accepted)."""
    reduction = ctx.attr("reduction", "none")
    if reduction != "none":
        return [ctx.error(f"uses reduction='{reduction}', which TensorRT does not support",
                          "scatter without a reduction or use a plugin")]
    return []


@_rule("If")
def if_branches(ctx: NodeContext) -> list[Finding]:
    """"Output tensors of the two conditional branches must have the same rank and must have different names"."""
    then_branch, else_branch = ctx.attr("then_branch"), ctx.attr("else_branch")
    if then_branch is None or else_branch is None:
        return []
    then_scope, else_scope = ctx.scope.child(then_branch), ctx.scope.child(else_branch)
    found = []
    for a, b in zip(then_branch.output, else_branch.output, strict=False):
        if a.name == b.name:
            found.append(ctx.error(f"has branch outputs both named '{a.name}'", "rename one branch's output"))
        ra, rb = then_scope.shapes.get(a.name), else_scope.shapes.get(b.name)
        if ra is not None and rb is not None and len(ra) != len(rb):
            found.append(ctx.error(f"returns rank {len(ra)} from one branch and rank {len(rb)} from the other "
                                   f"('{a.name}', '{b.name}')", "make both branches return tensors of one rank"))
    return found


@_rule("Constant")
def constant_value(ctx: NodeContext) -> list[Finding]:
    """"`sparse_value`, `value_string`, and `value_strings` attributes are unsupported"."""
    bad = [name for name in ("sparse_value", "value_string", "value_strings") if ctx.has_attr(name)]
    return [ctx.error(f"uses the `{name}` attribute, which TensorRT does not support", "use a dense numeric value")
            for name in bad]


@_rule("Dropout")
def dropout(ctx: NodeContext) -> list[Finding]:
    """"`is_traning` [sic] must be an initializer and evaluate to False"."""
    name = ctx.input(2)
    if not name:
        return []
    value = ctx.constant(name)
    if value is None:
        return _needs_constant(ctx, 2, "training_mode")
    if bool(np.any(value)):
        return [ctx.error("runs in training mode", "export the model in eval mode")]
    return []


@_rule("LayerNormalization")
def layernorm_outputs(ctx: NodeContext) -> list[Finding]:
    """"Only the first output `Y` is supported"."""
    if any(ctx.node.output[1:]):
        return [ctx.error("asks for the Mean/InvStdDev outputs, which TensorRT does not produce",
                          "use only the first output Y")]
    return []


@_rule("GridSample")
def gridsample_4d(ctx: NodeContext) -> list[Finding]:
    """"Input must be 4D input"."""
    rank = ctx.rank(ctx.input(0))
    if rank is None:
        return [ctx.note("samples an input of unknown rank", "make sure it is 4D, as TensorRT requires")]
    if rank != 4:
        return [ctx.error(f"samples a {rank}D input, but TensorRT needs 4D", "reshape the input to 4D")]
    return []


@_rule("DeformConv")
def deformconv(ctx: NodeContext) -> list[Finding]:
    """"`input` must have 1D or 2D spatial dimensions. `pads` for the beginning and end along each spatial axis
    must be the same"."""
    found = []
    rank = ctx.rank(ctx.input(0))
    if rank is not None and rank not in (3, 4):
        found.append(ctx.error(f"has {rank - 2} spatial dimensions, but TensorRT needs 1 or 2",
                               "use a 1D or 2D deformable convolution"))
    pads = list(ctx.attr("pads", []))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        found.append(ctx.error(f"pads asymmetrically ({pads}), but TensorRT needs equal begin and end pads",
                               "use symmetric padding"))
    return found


@_rule("EyeLike")
def eyelike_static(ctx: NodeContext) -> list[Finding]:
    """"`input` must have static dimensions"."""
    shape = ctx.scope.shapes.get(ctx.input(0))
    if shape is None:
        return [ctx.note("takes an input of unknown shape", "make sure its dimensions are static")]
    if not all(isinstance(d, int) and d > 0 for d in shape):
        return [ctx.error(f"takes an input of dynamic shape {list(shape)}, but TensorRT needs static dimensions",
                          "fix the input's shape at export")]
    return []


@_rule("Hardmax")
def hardmax_axis(ctx: NodeContext) -> list[Finding]:
    """"`axis` dimension of input must be a build-time constant"."""
    shape = ctx.scope.shapes.get(ctx.input(0))
    if shape is None:
        return [ctx.note("takes an input of unknown shape", "make sure the `axis` dimension is static")]
    axis = ctx.attr("axis", -1)
    dim = shape[axis] if -len(shape) <= axis < len(shape) else None
    if not (isinstance(dim, int) and dim > 0):
        return [ctx.error("reduces over a dynamic dimension, but TensorRT needs it fixed at build time",
                          "fix that dimension at export")]
    return []


@_rule("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike")
def random_seed(ctx: NodeContext) -> list[Finding]:
    """"`seed` value is ignored by TensorRT" (a note only when a seed is set)."""
    if ctx.has_attr("seed"):
        return [ctx.note("sets a seed, which TensorRT ignores", "do not rely on reproducible random values")]
    return []


_DIRECTIONS = {"LSTM": 3, "GRU": 2, "RNN": 1}
"""Activation functions per direction of each recurrent op."""


@_rule("LSTM", "GRU", "RNN")
def recurrent(ctx: NodeContext) -> list[Finding]:
    """"For bidirectional LSTMs [GRUs, RNNs], activation functions must be the same for both the forward and
    reverse pass." LSTM also: "`input_forget` attribute must be 0. `layout` attribute must be 0"."""
    found = []
    activations = [a.decode() if isinstance(a, bytes) else a for a in ctx.attr("activations", [])]
    per = _DIRECTIONS[ctx.op]
    if ctx.attr("direction", "forward") == "bidirectional" and activations[:per] != activations[per : 2 * per]:
        found.append(ctx.error("uses different activations forward and backward", "use the same activations"))
    if ctx.op == "LSTM":
        for name in ("input_forget", "layout"):
            if ctx.attr(name, 0) != 0:
                found.append(ctx.error(f"sets {name}={ctx.attr(name)}, but TensorRT needs 0", f"export with {name}=0"))
    return found

