"""GatherPatches / ScatterAddPatches: move S x S spatial blocks (with a halo) between images and a patch batch.

They lower LASNet-style masked convolutions to gather-scatter execution: gather the active blocks of
`x [N,C,H,W]` listed in `index [M,3]` (rows `(n, by, bx)`), each with `halo` extra rows/columns on every side
(zeros outside the image, as a padded conv sees), run the conv on the `[M,C,S+2h,S+2h]` batch, then add
the `[M,C,S,S]` results back into a base image. H and W need not be multiples of S: gathered positions past
the edge read zeros, scattered ones are dropped. Blocks are distinct per `(n, by, bx)`, so scatter-add has
no write conflicts.

Faces: reference (`torch.ops.dync.*` custom ops), ONNX custom-domain nodes, a decomposition into
Pad/Transpose/GatherND/ScatterND, Triton kernels, and the TensorRT AOT plugin for GatherPatches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dync.errors import PluginError
from dync.plugins import PluginOp, register

if TYPE_CHECKING:
    import onnx

OPSET = 18  # ScatterND's reduction="add" needs 16; Shape's start/end 15

# --------------------------------------------------------------------------------------------- reference


def _check(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> None:
    """Reject shapes and attributes the kernels cannot index, before any of them runs."""
    if x.dim() != 4 or index.dim() != 2 or index.shape[1] != 3:
        raise PluginError(
            f"Patch ops need x [N,C,H,W] and index [M,3], got {tuple(x.shape)} and {tuple(index.shape)}."
        )
    if index.dtype != torch.int64 or patch < 1 or halo < 0:
        raise PluginError(
            f"Patch ops need an int64 index, patch >= 1 and halo >= 0; got {index.dtype}, {patch}, {halo}."
        )


def _patch_coords(index: torch.Tensor, patch: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcastable (n [M,1,1], rows [M,size,1], cols [M,1,size]) of each block's top-left-anchored window."""
    offsets = torch.arange(size, device=index.device)
    n = index[:, 0].view(-1, 1, 1)
    rows = (index[:, 1:2] * patch + offsets).unsqueeze(2)
    cols = (index[:, 2:3] * patch + offsets).unsqueeze(1)
    return n, rows, cols


def _padded_nhwc(x: torch.Tensor, patch: int, before: int, after: int) -> torch.Tensor:
    """x zero-padded by `before` on top/left and `after + patch - 1` on bottom/right, as [N,H',W',C].

    `patch - 1` extra covers the last partial block, so every window of every valid block is in range.
    """
    pad = after + patch - 1
    return F.pad(x, (before, pad, before, pad)).permute(0, 2, 3, 1)


def gather_patches_reference(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    """Eager semantics of GatherPatches, vectorized: one advanced-indexing gather on the padded image."""
    _check(x, index, patch, halo)
    n, rows, cols = _patch_coords(index, patch, patch + 2 * halo)
    return _padded_nhwc(x, patch, halo, halo)[n, rows, cols].permute(0, 3, 1, 2).contiguous()


def scatter_add_patches_reference(
    base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int
) -> torch.Tensor:
    """Eager semantics of ScatterAddPatches: accumulate into the padded image, then crop the padding away."""
    _check(base, index, patch, 0)
    n, rows, cols = _patch_coords(index, patch, patch)
    height, width = base.shape[2:]
    out = _padded_nhwc(base, patch, 0, 0).index_put((n, rows, cols), patches.permute(0, 2, 3, 1), accumulate=True)
    return out[:, :height, :width].permute(0, 3, 1, 2).contiguous()


@torch.library.custom_op("dync::gather_patches", mutates_args=())
def gather_patches(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    """GatherPatches as one opaque op, so torch.export keeps it as a single node."""
    return gather_patches_reference(x, index, patch, halo)


@gather_patches.register_fake
def _gather_patches_fake(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    side = patch + 2 * halo
    return x.new_empty((index.shape[0], x.shape[1], side, side))


@torch.library.custom_op("dync::scatter_add_patches", mutates_args=())
def scatter_add_patches(base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int) -> torch.Tensor:
    """ScatterAddPatches as one opaque op, so torch.export keeps it as a single node."""
    return scatter_add_patches_reference(base, patches, index, patch)


@scatter_add_patches.register_fake
def _scatter_add_patches_fake(
    base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int
) -> torch.Tensor:
    return torch.empty_like(base)


# --------------------------------------------------------------------------------------------- ONNX


def _plugin_node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None, **attrs: Any):
    """A custom-domain node with the attributes TensorRT's ONNX parser reads to find the plugin."""
    import onnx.helper

    record = {"GatherPatches": GATHER, "ScatterAddPatches": SCATTER}[op]
    return onnx.helper.make_node(
        op, list(inputs), list(outputs), name=name or op, domain=record.domain,
        plugin_version=record.version, plugin_namespace=record.namespace, **attrs,
    )


def emit_gather_patches(
    inputs: Sequence[str], outputs: Sequence[str], *, patch: int, halo: int, name: str | None = None
) -> onnx.NodeProto:
    """The `dync::GatherPatches(x, index) -> patches` node."""
    return _plugin_node("GatherPatches", inputs, outputs, name, patch=patch, halo=halo)


def emit_scatter_add_patches(
    inputs: Sequence[str], outputs: Sequence[str], *, patch: int, name: str | None = None
) -> onnx.NodeProto:
    """The `dync::ScatterAddPatches(base, patches, index) -> out` node."""
    return _plugin_node("ScatterAddPatches", inputs, outputs, name, patch=patch)


def _const(name: str, values: Any) -> onnx.NodeProto:
    """An int64 Constant node, so a decomposition is a node list that needs no initializers."""
    import numpy as np
    import onnx.helper
    import onnx.numpy_helper

    array = onnx.numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)
    return onnx.helper.make_node("Constant", [], [name], name=name, value=array)


def _window_indices(index: str, patch: int, size: int, p: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing GatherND/ScatterND indices [M,size,size,3] = (n, by*S+i, bx*S+j) from index [M,3]."""
    import numpy as np
    import onnx.helper as oh

    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), axis=-1)
    offsets = np.concatenate([np.zeros((size, size, 1), dtype=np.int64), grid], axis=-1)
    nodes = [
        _const(f"{p}scale", [1, patch, patch]),
        _const(f"{p}axes12", [1, 2]),
        _const(f"{p}offsets", offsets),
        oh.make_node("Mul", [index, f"{p}scale"], [f"{p}corner"], name=f"{p}corner"),
        oh.make_node("Unsqueeze", [f"{p}corner", f"{p}axes12"], [f"{p}corner4"], name=f"{p}corner4"),
        oh.make_node("Add", [f"{p}corner4", f"{p}offsets"], [f"{p}windows"], name=f"{p}windows"),
    ]
    return nodes, f"{p}windows"


def _pad_to_nhwc(x: str, patch: int, before: int, after: int, p: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes for `_padded_nhwc`: Pad by constants (no shape arithmetic needed), then Transpose to NHWC."""
    import onnx.helper as oh

    pad = after + patch - 1
    nodes = [
        _const(f"{p}pads", [0, 0, before, before, 0, 0, pad, pad]),
        oh.make_node("Pad", [x, f"{p}pads"], [f"{p}padded"], name=f"{p}pad"),
        oh.make_node("Transpose", [f"{p}padded"], [f"{p}nhwc"], name=f"{p}nhwc", perm=[0, 2, 3, 1]),
    ]
    return nodes, f"{p}nhwc"


def decompose_gather_patches(
    inputs: Sequence[str], outputs: Sequence[str], *, patch: int, halo: int, prefix: str = "gather_patches/"
) -> list[onnx.NodeProto]:
    """GatherPatches from standard ops: Pad, Transpose, GatherND on window indices, Transpose back."""
    import onnx.helper as oh

    x, index = inputs
    pad_nodes, nhwc = _pad_to_nhwc(x, patch, halo, halo, prefix)
    idx_nodes, windows = _window_indices(index, patch, patch + 2 * halo, prefix)
    gathered = f"{prefix}gathered"
    return [
        *pad_nodes,
        *idx_nodes,
        oh.make_node("GatherND", [nhwc, windows], [gathered], name=gathered),
        oh.make_node("Transpose", [gathered], [outputs[0]], name=f"{prefix}nchw", perm=[0, 3, 1, 2]),
    ]


def decompose_scatter_add_patches(
    inputs: Sequence[str], outputs: Sequence[str], *, patch: int, prefix: str = "scatter_add_patches/"
) -> list[onnx.NodeProto]:
    """ScatterAddPatches from standard ops: Pad, Transpose, ScatterND(add), Transpose, Slice back to H x W."""
    import onnx.helper as oh

    base, patches, index = inputs
    p = prefix
    pad_nodes, nhwc = _pad_to_nhwc(base, patch, 0, 0, p)
    idx_nodes, windows = _window_indices(index, patch, patch, p)
    return [
        *pad_nodes,
        *idx_nodes,
        oh.make_node("Transpose", [patches], [f"{p}updates"], name=f"{p}updates", perm=[0, 2, 3, 1]),
        oh.make_node("ScatterND", [nhwc, windows, f"{p}updates"], [f"{p}added"], name=f"{p}add", reduction="add"),
        oh.make_node("Transpose", [f"{p}added"], [f"{p}nchw"], name=f"{p}nchw", perm=[0, 3, 1, 2]),
        oh.make_node("Shape", [base], [f"{p}hw"], name=f"{p}hw", start=2, end=4),
        _const(f"{p}zeros", [0, 0]),
        _const(f"{p}axes23", [2, 3]),
        oh.make_node("Slice", [f"{p}nchw", f"{p}zeros", f"{p}hw", f"{p}axes23"], [outputs[0]], name=f"{p}crop"),
    ]


# --------------------------------------------------------------------------------------------- Triton

BLOCK_C = 4  # channels per program; the patch is one power-of-two tile of BLOCK_P >= side * side elements


def _block_p(side: int) -> int:
    """The smallest power of two holding a side x side patch (Triton tiles have power-of-two sizes)."""
    return 1 << max(0, (side * side - 1).bit_length())


def _kernels() -> tuple[Any, Any]:
    """The two Triton kernels, defined on first use so triton is imported only where a kernel is wanted.

    Argument order is (input pointers, int32 scalars, output pointer, constexprs): the calling convention of
    TensorRT AOT plugins, so the same kernel serves the PyTorch launcher and `@trtp.aot_impl`.
    """
    global _KERNELS
    if _KERNELS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def gather_patches_kernel(x_ptr, idx_ptr, C, H, W, S, HALO, out_ptr,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
            m = tl.program_id(0)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
            q = tl.arange(0, BLOCK_P)[None, :]
            side = S + 2 * HALO
            n = tl.load(idx_ptr + 3 * m)
            row = tl.load(idx_ptr + 3 * m + 1) * S - HALO + q // side
            col = tl.load(idx_ptr + 3 * m + 2) * S - HALO + q % side
            keep = (c < C) & (q < side * side)
            inside = keep & (row >= 0) & (row < H) & (col >= 0) & (col < W)
            values = tl.load(x_ptr + ((n * C + c) * H + row) * W + col, mask=inside, other=0.0)
            tl.store(out_ptr + (m * C + c) * side * side + q, values, mask=keep)

        @triton.jit
        def scatter_add_patches_kernel(patches_ptr, idx_ptr, C, H, W, S, out_ptr,
                                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
            m = tl.program_id(0)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
            q = tl.arange(0, BLOCK_P)[None, :]
            n = tl.load(idx_ptr + 3 * m)
            row = tl.load(idx_ptr + 3 * m + 1) * S + q // S
            col = tl.load(idx_ptr + 3 * m + 2) * S + q % S
            keep = (c < C) & (q < S * S)
            inside = keep & (row < H) & (col < W)
            target = out_ptr + ((n * C + c) * H + row) * W + col
            values = tl.load(patches_ptr + (m * C + c) * S * S + q, mask=keep, other=0.0)
            tl.store(target, tl.load(target, mask=inside, other=0.0) + values, mask=inside)

        _KERNELS = (gather_patches_kernel, scatter_add_patches_kernel)
    return _KERNELS


_KERNELS: tuple[Any, Any] | None = None


def gather_patches_triton(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    """GatherPatches on the Triton kernel: one program per (patch, channel block), masked loads for the halo."""
    _check(x, index, patch, halo)
    x, index = x.contiguous(), index.contiguous()
    side = patch + 2 * halo
    out = x.new_empty((index.shape[0], x.shape[1], side, side))
    if out.numel():
        _, channels, height, width = x.shape
        grid = (index.shape[0], -(-channels // BLOCK_C))
        _kernels()[0][grid](x, index, channels, height, width, patch, halo, out,
                            BLOCK_C=BLOCK_C, BLOCK_P=_block_p(side))
    return out


def scatter_add_patches_triton(
    base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int
) -> torch.Tensor:
    """ScatterAddPatches on the Triton kernel: copy base, then each program adds one (patch, channel block)."""
    _check(base, index, patch, 0)
    out, patches, index = base.contiguous().clone(), patches.contiguous(), index.contiguous()
    if patches.numel():
        _, channels, height, width = base.shape
        grid = (index.shape[0], -(-channels // BLOCK_C))
        _kernels()[1][grid](patches, index, channels, height, width, patch, out,
                            BLOCK_C=BLOCK_C, BLOCK_P=_block_p(patch))
    return out


# --------------------------------------------------------------------------------------------- TensorRT


def gather_patches_shape(x_shape: Sequence[Any], index_shape: Sequence[Any], patch: int, halo: int) -> tuple:
    """Output shape [M, C, S+2h, S+2h]; works on ints and on TensorRT shape expressions alike."""
    side = patch + 2 * halo
    return (index_shape[0], x_shape[1], side, side)


def compile_gather_kernel(dtype: str, patch: int, halo: int, target: Any = None) -> Any:
    """The gather kernel compiled ahead of time (PTX in `.asm["ptx"]`), as TensorRT's AOT plugin embeds it.

    `dtype` is Triton's name ("fp32", "fp16"); `target` a `triton.backends.compiler.GPUTarget`, or None for
    the current GPU. Arguments: x and index pointers, int32 C, H, W, S, halo, then the output pointer.
    """
    import triton

    scalars = dict.fromkeys(("C", "H", "W", "S", "HALO"), "i32")
    signature = {"x_ptr": f"*{dtype}", "idx_ptr": "*i64", **scalars, "out_ptr": f"*{dtype}",
                 "BLOCK_C": "constexpr", "BLOCK_P": "constexpr"}
    constexprs = {"BLOCK_C": BLOCK_C, "BLOCK_P": _block_p(patch + 2 * halo)}
    kernel = _kernels()[0]
    if not isinstance(kernel, triton.runtime.jit.JITFunction):  # TRITON_INTERPRET=1 wraps it for the interpreter
        kernel = triton.runtime.jit.JITFunction(kernel.fn)
    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs), target=target)


def register_tensorrt() -> None:
    """Register `dync::GatherPatches` with `tensorrt.plugin` (TensorRT >= 10.9): shapes and the AOT kernel.

    The AOT kernel is the Triton gather kernel compiled to PTX, so engines run it without Python. Idempotent;
    the definitions live in `_gather_scatter_trt`, imported here so tensorrt loads only when asked for.
    """
    from dync.plugins import _gather_scatter_trt

    _gather_scatter_trt.register(GATHER.plugin_id)

# --------------------------------------------------------------------------------------------- registry

# namespace "dync": TensorRT looks plugins up by (op_type, plugin_version, plugin_namespace), and
# `tensorrt.plugin` reserves the empty namespace, so the plugin lives in "dync" and the nodes say so.
GATHER = register(PluginOp(
    name="GatherPatches",
    namespace="dync",
    reference=gather_patches,
    emit_onnx=emit_gather_patches,
    decompose_onnx=decompose_gather_patches,
    triton=gather_patches_triton,
    tensorrt=register_tensorrt,
))

SCATTER = register(PluginOp(
    name="ScatterAddPatches",
    namespace="dync",
    reference=scatter_add_patches,
    emit_onnx=emit_scatter_add_patches,
    decompose_onnx=decompose_scatter_add_patches,
    triton=scatter_add_patches_triton,
))
