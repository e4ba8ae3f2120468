"""PerSampleConv2d: a 2-D convolution whose kernel differs per sample (ARC's rotated, mixed kernels).

`out[b] = conv2d(x[b], weight[b])` for `x [B,Cin,H,W]` and `weight [B,Cout,Cin/groups,kh,kw]`. Eager code
writes it as one grouped conv with the batch folded into the channels (`groups = B * groups`), which ONNX
cannot express with a dynamic batch: Conv's `group` is a constant attribute.

Faces: reference (`torch.ops.dync.per_sample_conv2d`), the `dync::PerSampleConv2d` ONNX node, a portable
decomposition that keeps the batch dynamic (unfold each kernel tap with a one-hot Conv, then one batched
MatMul per sample and group), a Triton direct-conv kernel, and the TensorRT AOT plugin. The decomposition is
written once against a small node builder, so the `onnx.helper` node list (for `decompose_custom_nodes`)
and the onnxscript translation used during capture are the same graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from dync.errors import PluginError
from dync.plugins import PluginOp, register

if TYPE_CHECKING:
    import onnx

OPSET = 18

# --------------------------------------------------------------------------------------------- reference


def _check(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    """Reject shapes the faces cannot agree on, before any of them runs."""
    if x.dim() != 4 or weight.dim() != 5 or x.shape[0] != weight.shape[0]:
        raise PluginError(f"PerSampleConv2d needs x [B,Cin,H,W] and weight [B,Cout,Cin/groups,kh,kw] with one "
                          f"batch, got {tuple(x.shape)} and {tuple(weight.shape)}.")
    if groups < 1 or x.shape[1] != weight.shape[2] * groups or weight.shape[1] % groups:
        raise PluginError(f"PerSampleConv2d with groups={groups} needs Cin = weight.shape[2] * groups and Cout "
                          f"divisible by groups, got x {tuple(x.shape)} and weight {tuple(weight.shape)}.")


def output_size(size: Any, kernel: int, stride: int, padding: int, dilation: int) -> Any:
    """Conv output length along one axis; works on ints, SymInts and TensorRT shape expressions alike."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def per_sample_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                                padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Eager semantics: the batch folded into the channels, one grouped conv, unfolded again."""
    _check(x, weight, groups)
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


# --------------------------------------------------------------------------------------------- ONNX


def conv_attributes(kernel_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int) -> dict[str, Any]:
    """The node's attributes, named as ONNX Conv names them (pads are begin_h, begin_w, end_h, end_w)."""
    return {"kernel_shape": list(kernel_shape), "strides": list(stride), "pads": [*padding, *padding],
            "dilations": list(dilation), "group": groups}


def emit_per_sample_conv2d(inputs: Sequence[str], outputs: Sequence[str], *, kernel_shape: Sequence[int],
                           strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], group: int,
                           name: str | None = None) -> onnx.NodeProto:
    """The `dync::PerSampleConv2d(x, weight) -> out` node, with the attributes TensorRT's parser reads."""
    import onnx.helper

    return onnx.helper.make_node(
        "PerSampleConv2d", list(inputs), list(outputs), name=name or "PerSampleConv2d", domain=OP.domain,
        plugin_version=OP.version, plugin_namespace=OP.namespace, kernel_shape=list(kernel_shape),
        strides=list(strides), pads=list(pads), dilations=list(dilations), group=group,
    )


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


class NodeListBuilder:
    """Builds `onnx.helper` nodes named under `prefix`; `build(..., out=name)` names a node's output."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def build(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        import onnx.helper

        name = f"{self.prefix}{len(self.nodes)}_{op_type}"
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name

    def const(self, values: Any, dtype: type = np.int64) -> str:
        import onnx.numpy_helper

        name = f"{self.prefix}{len(self.nodes)}_const"
        return self.build("Constant", out=name, value=onnx.numpy_helper.from_array(np.asarray(values, dtype), name))


class ScriptBuilder:
    """Builds the same nodes through an onnxscript opset, as torch.onnx's custom translations do."""

    def __init__(self, opset: Any) -> None:
        self.opset = opset

    def build(self, op_type: str, *inputs: Any, out: str | None = None, **attrs: Any) -> Any:
        return getattr(self.opset, op_type)(*inputs, **attrs)

    def const(self, values: Any, dtype: type = np.int64) -> Any:
        import onnx.numpy_helper

        return self.opset.Constant(value=onnx.numpy_helper.from_array(np.asarray(values, dtype)))


def _one_hot_taps(kernel_shape: Sequence[int]) -> np.ndarray:
    """Kernel [kh*kw, 1, kh, kw] whose output channel t copies tap t: a Conv with it unfolds the input."""
    kh, kw = kernel_shape
    return np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw)


def build_decomposition(g: NodeListBuilder | ScriptBuilder, x: Any, weight: Any, out: str | None, *,
                        kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                        dilations: Sequence[int], group: int) -> Any:
    """PerSampleConv2d from standard ops; only kernel size and attributes are static, never B, C, H or W.

    x [B,Cin,H,W] -> [B*Cin,1,H,W] -> one-hot Conv -> taps [B*Cin,kh*kw,H',W'] -> cols [B,g,K,L] with
    K = Cin/g*kh*kw and L = H'*W'; weight [B,Cout,Cin/g,kh,kw] -> [B,g,Cout/g,K]; MatMul -> [B,g,Cout/g,L]
    -> [B,Cout,H',W']. The (channel, tap) order of K is the same on both sides.
    """
    one_hot = g.build("CastLike", g.const(_one_hot_taps(kernel_shape), np.float32), x)
    planes = g.build("Reshape", x, g.const([-1, 1, 0, 0]))
    taps = g.build("Conv", planes, one_hot, kernel_shape=list(kernel_shape), strides=list(strides),
                   pads=list(pads), dilations=list(dilations))
    batch = g.build("Shape", x, end=1)
    out_hw = g.build("Shape", taps, start=2, end=4)
    grouped = g.build("Reshape", taps, g.build("Concat", batch, g.const([group, -1]), out_hw, axis=0))
    cols = g.build("Reshape", grouped, g.const([0, 0, 0, -1]))
    flat_weight = g.build("Reshape", weight, g.const([0, 0, -1]))
    k = g.build("Shape", flat_weight, start=2)
    kernels = g.build("Reshape", flat_weight, g.build("Concat", g.const([0, group, -1]), k, axis=0))
    product = g.build("MatMul", kernels, cols)
    return g.build("Reshape", product, g.build("Concat", batch, g.const([-1]), out_hw, axis=0), out=out)


def decompose_per_sample_conv2d(inputs: Sequence[str], outputs: Sequence[str], *, kernel_shape: Sequence[int],
                                strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
                                group: int, prefix: str = "per_sample_conv2d/") -> list[onnx.NodeProto]:
    """The portable decomposition as an `onnx.helper` node list (what `decompose_custom_nodes` splices in)."""
    if pads[:2] != pads[2:]:
        raise PluginError(f"PerSampleConv2d's decomposition needs symmetric pads, got {list(pads)}.")
    g = NodeListBuilder(prefix)
    build_decomposition(g, inputs[0], inputs[1], outputs[0], kernel_shape=kernel_shape, strides=strides,
                        pads=pads, dilations=dilations, group=group)
    return g.nodes

def specialize_per_sample_conv2d(inputs: Sequence[str], outputs: Sequence[str], *, batch: int,
                                 kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                                 dilations: Sequence[int], group: int,
                                 prefix: str = "per_sample_conv2d/") -> list[onnx.NodeProto]:
    """The fast CPU path: for one known batch B, the eager idiom itself, one Conv with `group = B * g`.

    onnxruntime's grouped Conv unfolds one group at a time, which beats the batch-agnostic decomposition;
    the price is a graph per batch size, which the onnxruntime backend builds and caches on demand.
    """
    g = NodeListBuilder(prefix)
    images = g.build("Reshape", inputs[0], g.const([1, -1, 0, 0]))
    kernels = g.build("Reshape", inputs[1], g.build("Concat", g.const([-1]), g.build("Shape", inputs[1], start=2),
                                                    axis=0))
    folded = g.build("Conv", images, kernels, kernel_shape=list(kernel_shape), strides=list(strides),
                     pads=list(pads), dilations=list(dilations), group=batch * group)
    g.build("Reshape", folded, g.const([batch, -1, 0, 0]), out=outputs[0])
    return g.nodes


# --------------------------------------------------------------------------------------------- Triton

BLOCK_CO = 16  # output channels per program
BLOCK_P = 64  # output pixels per program


def _kernel() -> Any:
    """The Triton direct-conv kernel, defined on first use so triton is imported only where it is wanted.

    One program computes BLOCK_CO output channels x BLOCK_P output pixels of one (sample, group), summing
    over the group's input channels and the kernel taps. Argument order is (input pointers, int32 scalars,
    output pointer, constexprs), the calling convention of TensorRT AOT plugins.
    """
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def per_sample_conv2d_kernel(x_ptr, w_ptr, CIN_G, H, W, COUT_G, HO, WO, G, out_ptr,
                                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                     BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
            sample_group = tl.program_id(0)
            b = sample_group // G
            first_channel = (sample_group % G) * COUT_G
            co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)[:, None]
            p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
            row0 = (p // WO) * SH - PH
            col0 = (p % WO) * SW - PW
            keep_co = co < COUT_G
            keep_p = p < HO * WO
            acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
            w_rows = w_ptr + ((b * G * COUT_G + first_channel + co) * CIN_G) * KH * KW
            x_planes = x_ptr + sample_group * CIN_G * H * W
            for ci in range(CIN_G):
                for ki in tl.static_range(KH):
                    for kj in tl.static_range(KW):
                        row = row0 + ki * DH
                        col = col0 + kj * DW
                        inside = keep_p & (row >= 0) & (row < H) & (col >= 0) & (col < W)
                        xv = tl.load(x_planes + (ci * H + row) * W + col, mask=inside, other=0.0)
                        wv = tl.load(w_rows + (ci * KH + ki) * KW + kj, mask=keep_co, other=0.0)
                        acc += wv.to(tl.float32) * xv.to(tl.float32)
            target = out_ptr + (b * G * COUT_G + first_channel + co) * HO * WO + p
            tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=keep_co & keep_p)

        _KERNEL = per_sample_conv2d_kernel
    return _KERNEL


_KERNEL: Any = None


def _constexprs(kernel_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> dict[str, int]:
    """The kernel's compile-time arguments: kernel size, stride, padding, dilation and the tile sizes."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_shape, stride, padding, dilation
    return {"KH": kh, "KW": kw, "SH": sh, "SW": sw, "PH": ph, "PW": pw, "DH": dh, "DW": dw,
            "BLOCK_CO": BLOCK_CO, "BLOCK_P": BLOCK_P}


def per_sample_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], groups: int) -> torch.Tensor:
    """PerSampleConv2d on the Triton kernel: a (B*groups, Cout/groups blocks, pixel blocks) grid."""
    _check(x, weight, groups)
    x, weight = x.contiguous(), weight.contiguous()
    out = _per_sample_conv2d_fake(x, weight, stride, padding, dilation, groups)
    if out.numel():
        batch, cout, cin_g, kh, kw = weight.shape
        ho, wo = out.shape[2:]
        grid = (batch * groups, -(-(cout // groups) // BLOCK_CO), -(-(ho * wo) // BLOCK_P))
        _kernel()[grid](x, weight, cin_g, x.shape[2], x.shape[3], cout // groups, ho, wo, groups, out,
                        **_constexprs((kh, kw), stride, padding, dilation))
    return out


# --------------------------------------------------------------------------------------------- TensorRT


def per_sample_conv2d_shape(x_shape: Sequence[Any], weight_shape: Sequence[Any], strides: Sequence[int],
                            pads: Sequence[int], dilations: Sequence[int]) -> tuple:
    """Output shape [B, Cout, H', W']; works on ints and on TensorRT shape expressions alike."""
    sizes = [output_size(x_shape[2 + i], int(weight_shape[3 + i]), strides[i], pads[i], dilations[i]) for i in (0, 1)]
    return (x_shape[0], weight_shape[1], *sizes)


def compile_kernel(dtype: str, kernel_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], target: Any = None) -> Any:
    """The kernel compiled ahead of time (PTX in `.asm["ptx"]`), as TensorRT's AOT plugin embeds it.

    `dtype` is Triton's name ("fp32", "fp16"); `target` a `triton.backends.compiler.GPUTarget`, or None for
    the current GPU. Arguments: x and weight pointers, int32 CIN_G, H, W, COUT_G, HO, WO, G, then the output.
    """
    import triton

    scalars = dict.fromkeys(("CIN_G", "H", "W", "COUT_G", "HO", "WO", "G"), "i32")
    constexprs = _constexprs(kernel_shape, stride, padding, dilation)
    signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", **scalars, "out_ptr": f"*{dtype}",
                 **dict.fromkeys(constexprs, "constexpr")}
    kernel = _kernel()
    if not isinstance(kernel, triton.runtime.jit.JITFunction):  # TRITON_INTERPRET=1 wraps it for the interpreter
        kernel = triton.runtime.jit.JITFunction(kernel.fn)
    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs), target=target)


def register_tensorrt() -> None:
    """Register `dync::PerSampleConv2d` with `tensorrt.plugin` (TensorRT >= 10.9): shapes and the AOT kernel.

    Idempotent; the definitions live in `_per_sample_conv_trt`, imported here so tensorrt loads only when asked.
    """
    from dync.plugins import _per_sample_conv_trt

    _per_sample_conv_trt.register(OP.plugin_id)


# --------------------------------------------------------------------------------------------- registry

OP = register(PluginOp(
    name="PerSampleConv2d",
    namespace="dync",
    reference=per_sample_conv2d,
    emit_onnx=emit_per_sample_conv2d,
    decompose_onnx=decompose_per_sample_conv2d,
    cpu_fast=specialize_per_sample_conv2d,
    triton=per_sample_conv2d_triton,
    tensorrt=register_tensorrt,
))
