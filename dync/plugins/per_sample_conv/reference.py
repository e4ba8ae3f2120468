"""The PyTorch faces of PerSampleConv2d: eager semantics, the `torch.library` custom op that capture keeps as
one node with a symbolic batch, and its torch.onnx translation into the `dync::PerSampleConv2d` node."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dync.errors import PluginError
from dync.plugins.per_sample_conv import OP, conv_attributes, output_size


def check_inputs(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    """Reject shapes the faces cannot agree on, before any of them runs."""
    if x.dim() != 4 or weight.dim() != 5 or x.shape[0] != weight.shape[0]:
        raise PluginError(f"PerSampleConv2d needs x [B,Cin,H,W] and weight [B,Cout,Cin/groups,kh,kw] with one "
                          f"batch, got {tuple(x.shape)} and {tuple(weight.shape)}.")
    if groups < 1 or x.shape[1] != weight.shape[2] * groups or weight.shape[1] % groups:
        raise PluginError(f"PerSampleConv2d with groups={groups} needs Cin = weight.shape[2] * groups and Cout "
                          f"divisible by groups, got x {tuple(x.shape)} and weight {tuple(weight.shape)}.")


def per_sample_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                                padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Eager semantics: the batch folded into the channels, one grouped conv, unfolded again."""
    check_inputs(x, weight, groups)
    batch, cout = weight.shape[:2]
    if batch == 0:
        return _per_sample_conv2d_fake(x, weight, stride, padding, dilation, groups)
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]), stride=tuple(stride),
                   padding=tuple(padding), dilation=tuple(dilation), groups=batch * groups)
    return out.reshape(batch, cout, *out.shape[2:])


@torch.library.custom_op("dync::per_sample_conv2d", mutates_args=())
def per_sample_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                      dilation: list[int], groups: int) -> torch.Tensor:
    """PerSampleConv2d as one opaque op, so torch.export keeps it as a single node with a symbolic batch."""
    return per_sample_conv2d_reference(x, weight, stride, padding, dilation, groups)


@per_sample_conv2d.register_fake
def _per_sample_conv2d_fake(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], groups: int) -> torch.Tensor:
    sizes = [output_size(x.shape[2 + i], weight.shape[3 + i], stride[i], padding[i], dilation[i]) for i in (0, 1)]
    return x.new_empty((x.shape[0], weight.shape[1], *sizes))


def register_onnx_schema() -> None:
    """Tell onnx (and so onnxscript, which torch.onnx's translations use) the node's signature, once."""
    import onnx.defs
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema(OP.name, 1, OP.domain)
        return
    except onnx.defs.SchemaError:
        pass
    ints, text = OpSchema.AttrType.INTS, OpSchema.AttrType.STRING
    onnx.defs.register_schema(OpSchema(
        OP.name, OP.domain, 1,
        doc="Convolution with one kernel per sample: x [B,Cin,H,W], weight [B,Cout,Cin/group,kh,kw].",
        inputs=[OpSchema.FormalParameter("x", "T"), OpSchema.FormalParameter("weight", "T")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "Floating-point tensors.")],
        attributes=[*(OpSchema.Attribute(name, ints, "As ONNX Conv.") for name in
                      ("kernel_shape", "strides", "pads", "dilations")),
                    OpSchema.Attribute("group", OpSchema.AttrType.INT, "As ONNX Conv."),
                    OpSchema.Attribute("plugin_version", text, "TensorRT plugin version."),
                    OpSchema.Attribute("plugin_namespace", text, "TensorRT plugin namespace.")],
    ))


def translate(x: Any, weight: Any, stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Any:
    """torch.onnx translation of `dync::per_sample_conv2d`: the `dync::PerSampleConv2d` plugin node.

    Runtimes take it from there: onnxruntime through the op's fast CPU path (a graph per batch size) or its
    portable decomposition, TensorRT through the plugin.
    """
    from onnxscript.values import Opset

    register_onnx_schema()
    attrs = conv_attributes([int(d) for d in weight.shape[3:]], stride, padding, dilation, groups)
    return Opset(OP.domain, 1).PerSampleConv2d(x, weight, plugin_version=OP.version,
                                               plugin_namespace=OP.namespace, **attrs)


TRANSLATION = {torch.ops.dync.per_sample_conv2d.default: translate}
"""The op's entry in torch.onnx's `custom_translation_table`."""
