"""Choose, per attention shape, whichever of the fused `Attention` node and the unfused chain runs faster here.

Each distinct `AttentionShape` becomes a model of its own in both forms: Q, K and V inputs, the bias a
constant as it is after onnxruntime's folding, and the unfused chain written as torch.onnx exports it
(MatMul by K transposed, Mul by the scale, Add of the bias, Softmax, MatMul by V; with merged heads, the
head split and merge around it, which the 3-D fused form does without). Both are timed in
onnxruntime under the default session options (those `dync.load` uses unless told otherwise), at batch 1
and at batch 8, in interleaved rounds. The
fused form is kept where the geometric mean of its two time ratios is below 1. Like the spatial crossovers,
this is measured on the exporting machine: another CPU or thread count can choose differently.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dync.exporter.passes.attention.fuse import ATTENTION_OPSET
from dync.records import AttentionShape
from dync.timing import median_times, onnx_session

if TYPE_CHECKING:
    from dync.runtime.backends.ort import OrtSettings

BATCHES = (1, 8)


class FasterForm:
    """A `fuse_attention` choice that fuses where the fused form measures faster; one measurement per shape.

    `ratios` keeps, per shape measured, the fused form's time over the unfused chain's.
    """

    def __init__(self, settings: OrtSettings | None = None, repeats: int = 15,
                 progress: Callable[[str], None] = lambda message: None) -> None:
        self._settings = settings
        self._repeats = repeats
        self._progress = progress
        self.ratios: dict[AttentionShape, float] = {}

    def __call__(self, shape: AttentionShape) -> bool:
        if shape not in self.ratios:
            self.ratios[shape] = fused_over_unfused(shape, self._settings, self._repeats)
            verdict = "fused" if self.ratios[shape] < 1.0 else "left unfused"
            self._progress(f"attention {describe(shape)}: the fused form takes {self.ratios[shape]:.2f}x the unfused "
                           f"time, {verdict}")
        return self.ratios[shape] < 1.0


def describe(shape: AttentionShape) -> str:
    """E.g. '6 heads x 197 queries x 197 keys, head dim 64, with a [6, 197, 197] bias'."""
    bias = "" if shape.bias is None else f", with a {list(shape.bias)} bias"
    return (f"{shape.heads} heads x {shape.queries} queries x {shape.keys} keys, head dim {shape.head_dim}"
            f"{'' if shape.value_dim == shape.head_dim else f' (values {shape.value_dim})'}{bias}")


def fused_over_unfused(shape: AttentionShape, settings: OrtSettings | None, repeats: int) -> float:
    """The fused form's median time over the unfused chain's, geometric mean over BATCHES."""
    rng = np.random.default_rng(0)
    ratios = []
    for batch in BATCHES:
        forms = {fused: onnx_session(attention_model(shape, batch, fused), settings) for fused in (True, False)}
        feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in forms[True].get_inputs()}
        times = median_times({fused: functools.partial(s.run, None, feeds) for fused, s in forms.items()},
                             repeats=repeats, opening_seconds=0.0)  # one opening call: it runs in every export
        ratios.append(times[True] / times[False])
    return float(np.exp(np.mean(np.log(ratios))))


def attention_model(shape: AttentionShape, batch: int, fused: bool) -> onnx.ModelProto:
    """One attention of `shape` at `batch`, as an `Attention` node or as the unfused chain; with merged heads,
    inputs and output are [batch, tokens, heads * dim] and the chain splits and merges the heads itself."""
    h, n, m, d, dv = shape.heads, shape.queries, shape.keys, shape.head_dim, shape.value_dim
    dims = {"q": [h, n, d], "k": [h, m, d], "v": [h, m, dv]}
    if shape.merged_heads:
        dims = {name: [tokens, heads * width] for name, (heads, tokens, width) in dims.items()}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *each]) for name, each in dims.items()]
    scale = float(d) ** -0.5
    biased = shape.bias is not None
    constants = [numpy_helper.from_array(np.random.default_rng(1).standard_normal(shape.bias).astype(np.float32),
                                         "bias")] if biased else []
    if fused:
        heads = {"q_num_heads": h, "kv_num_heads": h} if shape.merged_heads else {}
        nodes = [helper.make_node("Attention", ["q", "k", "v", *(["bias"] if biased else [])], ["y"], scale=scale,
                                  **heads)]
    else:
        constants.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
        nodes = [
            *_split_heads(shape, constants),
            helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q4", "kt"], ["scores"]),
            helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
            *([helper.make_node("Add", ["scaled", "bias"], ["biased"])] if biased else []),
            helper.make_node("Softmax", ["biased" if biased else "scaled"], ["weights"], axis=-1),
            helper.make_node("MatMul", ["weights", "v4"], ["y4" if shape.merged_heads else "y"]),
            *_merge_heads(shape, constants)]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ATTENTION_OPSET)])


def _split_heads(shape: AttentionShape, constants: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """q4, k4, v4 [batch, heads, tokens, dim]: the inputs themselves, or split as exports split them."""
    if not shape.merged_heads:
        return [helper.make_node("Identity", [name], [f"{name}4"]) for name in "qkv"]
    constants.append(numpy_helper.from_array(np.array([0, 0, shape.heads, -1], np.int64), "heads_shape"))
    return [node for name in "qkv" for node in (
        helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_split"]),
        helper.make_node("Transpose", [f"{name}_split"], [f"{name}4"], perm=[0, 2, 1, 3]))]


def _merge_heads(shape: AttentionShape, constants: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """y [batch, tokens, heads * dim] from y4, as exports merge the heads; nothing without merged heads."""
    if not shape.merged_heads:
        return []
    constants.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merged_shape"))
    return [helper.make_node("Transpose", ["y4"], ["y_split"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["y_split", "merged_shape"], ["y"])]
