"""PerSampleConv2d: a 2-D convolution whose kernel differs per sample (ARC's rotated, mixed kernels).

`out[b] = conv2d(x[b], weight[b])` for `x [B,Cin,H,W]` and `weight [B,Cout,Cin/group,kh,kw]`. Eager code
writes it as one grouped conv with the batch folded into the channels (`groups = B * group`), which ONNX
cannot express with a dynamic batch: Conv's `group` is a constant attribute.

This module holds the ONNX faces: a portable decomposition that keeps the batch dynamic (unfold each kernel
tap with a one-hot Conv, then one batched MatMul per sample and group), the fast CPU path for one known batch
(the eager idiom itself), the output shape and the MAC count. `reference.py` holds the PyTorch custom op and
its capture-time translation, `kernels.py` the Triton direct-conv kernel, `trt.py` the TensorRT AOT plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from dync.errors import PluginError
from dync.graph import Builder
from dync.plugins.op_registry import Face, OpRecord

OPSET = 18


def output_size(size: Any, kernel: int, stride: int, padding: int, dilation: int) -> Any:
    """Conv output length along one axis; works on ints, SymInts and TensorRT shape expressions alike."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_attributes(kernel_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int) -> dict[str, Any]:
    """The node's attributes, named as ONNX Conv names them (pads are begin_h, begin_w, end_h, end_w)."""
    return {"kernel_shape": list(kernel_shape), "strides": list(stride), "pads": [*padding, *padding],
            "dilations": list(dilation), "group": groups}


def _one_hot_taps(kernel_shape: Sequence[int]) -> np.ndarray:
    """Kernel [kh*kw, 1, kh, kw] whose output channel t copies tap t: a Conv with it unfolds the input."""
    kh, kw = kernel_shape
    return np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw)


def decompose(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *, kernel_shape: Sequence[int],
              strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], group: int) -> None:
    """PerSampleConv2d from standard ops; only kernel size and attributes are static, never B, C, H or W.

    x [B,Cin,H,W] -> [B*Cin,1,H,W] -> one-hot Conv -> taps [B*Cin,kh*kw,H',W'] -> cols [B,g,K,L] with
    K = Cin/g*kh*kw and L = H'*W'; weight [B,Cout,Cin/g,kh,kw] -> [B,g,Cout/g,K]; MatMul -> [B,g,Cout/g,L]
    -> [B,Cout,H',W']. The (channel, tap) order of K is the same on both sides.
    """
    if list(pads[:2]) != list(pads[2:]):
        raise PluginError(f"PerSampleConv2d's decomposition needs symmetric pads, got {list(pads)}.")
    x, weight = inputs
    one_hot = b.op("CastLike", "one_hot", [b.const("taps", _one_hot_taps(kernel_shape), np.float32), x])
    planes = b.op("Reshape", "planes", [x, b.const("planes_shape", [-1, 1, 0, 0])])
    taps = b.op("Conv", "unfold", [planes, one_hot], kernel_shape=list(kernel_shape), strides=list(strides),
                pads=list(pads), dilations=list(dilations))
    batch = b.op("Shape", "batch", [x], end=1)
    out_hw = b.op("Shape", "out_hw", [taps], start=2, end=4)
    grouped_shape = b.op("Concat", "grouped_shape", [batch, b.const("groups", [group, -1]), out_hw], axis=0)
    grouped = b.op("Reshape", "grouped", [taps, grouped_shape])
    cols = b.op("Reshape", "cols", [grouped, b.const("cols_shape", [0, 0, 0, -1])])
    flat_weight = b.op("Reshape", "flat_weight", [weight, b.const("flat_weight_shape", [0, 0, -1])])
    k = b.op("Shape", "k", [flat_weight], start=2)
    kernels_shape = b.op("Concat", "kernels_shape", [b.const("kernel_groups", [0, group, -1]), k], axis=0)
    product = b.op("MatMul", "product", [b.op("Reshape", "kernels", [flat_weight, kernels_shape]), cols])
    out_shape = b.op("Concat", "out_shape", [batch, b.const("channels", [-1]), out_hw], axis=0)
    b.op("Reshape", "out", [product, out_shape], out=outputs[0])


def specialize(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *, batch: int,
               kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
               group: int) -> None:
    """The fast CPU path: for one known batch B, the eager idiom itself, one Conv with `group = B * g`.

    onnxruntime's grouped Conv unfolds one group at a time, which beats the batch-agnostic decomposition;
    the price is a graph per batch size, which the onnxruntime backend builds and caches on demand.
    """
    x, weight = inputs
    images = b.op("Reshape", "images", [x, b.const("images_shape", [1, -1, 0, 0])])
    kernel_dims = b.op("Shape", "kernel_dims", [weight], start=2)
    kernels_shape = b.op("Concat", "kernels_shape", [b.const("all_kernels", [-1]), kernel_dims], axis=0)
    kernels = b.op("Reshape", "kernels", [weight, kernels_shape])
    folded = b.op("Conv", "folded", [images, kernels], kernel_shape=list(kernel_shape), strides=list(strides),
                  pads=list(pads), dilations=list(dilations), group=batch * group)
    b.op("Reshape", "out", [folded, b.const("out_shape", [batch, -1, 0, 0])], out=outputs[0])


def shape(x_shape: Sequence[Any], weight_shape: Sequence[Any], *, kernel_shape: Sequence[int],
          strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], group: int = 1) -> tuple:
    """Output shape [B, Cout, H', W']; works on ints and on TensorRT shape expressions alike."""
    sizes = [output_size(x_shape[2 + i], int(kernel_shape[i]), strides[i], pads[i], dilations[i]) for i in (0, 1)]
    return (x_shape[0], weight_shape[1], *sizes)


def macs(input_shapes: Sequence[Sequence[int]], output_shapes: Sequence[Sequence[int]], **attrs: Any) -> int:
    """Every output value sums Cin/group * kh * kw products; weight [B, Cout, Cin/group, kh, kw] is per sample."""
    return prod(output_shapes[0]) * prod(input_shapes[1][2:])


_HERE = __name__

OP = OpRecord(
    name="PerSampleConv2d",
    decompose=decompose,
    macs=macs,
    shape=shape,
    cpu_fast=specialize,
    reference=Face(f"{_HERE}.reference", "per_sample_conv2d"),
    translation=Face(f"{_HERE}.reference", "TRANSLATION"),
    triton=Face(f"{_HERE}.kernels", "per_sample_conv2d_triton"),
    tensorrt=Face(f"{_HERE}.trt", "register"),
)

OPS = (OP,)
