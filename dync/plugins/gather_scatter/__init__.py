"""GatherPatches / ScatterAddPatches: move S x S spatial blocks (with a halo) between images and a patch batch.

They lower LASNet-style masked convolutions to gather-scatter execution: gather the active blocks of
`x [N,C,H,W]` listed in `index [M,3]` (rows `(n, by, bx)`), each with `halo` extra rows/columns on every side
(zeros outside the image, as a padded conv sees), run the conv on the `[M,C,S+2h,S+2h]` batch, then add
the `[M,C,S,S]` results back into a base image. H and W need not be multiples of S: gathered positions past
the edge read zeros, scattered ones are dropped. Blocks are distinct per `(n, by, bx)`, so the scattered
windows are disjoint: scatter-add is a gather, an add and a plain scatter, with no write conflicts.

This module holds the ONNX faces (decompositions into Pad/Transpose/GatherND/ScatterND, output shape, MACs);
`reference.py` the PyTorch custom ops, `kernels.py` the Triton kernels, `trt.py` the TensorRT AOT plugin of
GatherPatches. ScatterAddPatches has no TensorRT plugin: TensorRT runs its decomposition, which uses only
ops its parser supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from dync.graph import Builder
from dync.plugins.op_registry import Face, OpRecord

OPSET = 18  # Shape's start/end need 15


def _window_indices(b: Builder, index: gs.Tensor, patch: int, size: int) -> gs.Tensor:
    """GatherND/ScatterND indices [M,size,size,3] = (n, by*S+i, bx*S+j) from index [M,3]."""
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), axis=-1)
    offsets = np.concatenate([np.zeros((size, size, 1), dtype=np.int64), grid], axis=-1)
    corner = b.op("Mul", "corner", [index, b.const("scale", [1, patch, patch])])
    corner4 = b.op("Unsqueeze", "corner4", [corner, b.const("axes12", [1, 2])])
    return b.op("Add", "windows", [corner4, b.const("offsets", offsets)])


def _pad_to_nhwc(b: Builder, x: gs.Tensor, patch: int, before: int, after: int) -> gs.Tensor:
    """x zero-padded by `before` on top/left and `after + patch - 1` on bottom/right, as [N,H',W',C].

    `patch - 1` extra covers the last partial block, so every window of every valid block is in range.
    """
    pad = after + patch - 1
    padded = b.op("Pad", "pad", [x, b.const("pads", [0, 0, before, before, 0, 0, pad, pad])])
    return b.op("Transpose", "nhwc", [padded], perm=[0, 2, 3, 1])


def decompose_gather_patches(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *, patch: int,
                             halo: int) -> None:
    """GatherPatches from standard ops: Pad, Transpose, GatherND on window indices, Transpose back."""
    x, index = inputs
    gathered = b.op("GatherND", "gathered", [_pad_to_nhwc(b, x, patch, halo, halo),
                                             _window_indices(b, index, patch, patch + 2 * halo)])
    b.op("Transpose", "nchw", [gathered], out=outputs[0], perm=[0, 3, 1, 2])


def decompose_scatter_add_patches(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *,
                                  patch: int) -> None:
    """ScatterAddPatches from standard ops: Pad and Transpose the base, add the patches to the windows gathered
    from it, scatter the sums back (disjoint windows: no reduction needed), Transpose, Slice back to H x W."""
    base, patches, index = inputs
    nhwc = _pad_to_nhwc(b, base, patch, 0, 0)
    windows = _window_indices(b, index, patch, patch)
    updates = b.op("Transpose", "updates", [patches], perm=[0, 2, 3, 1])
    summed = b.op("Add", "summed", [b.op("GatherND", "current", [nhwc, windows]), updates])
    nchw = b.op("Transpose", "nchw", [b.op("ScatterND", "scatter", [nhwc, windows, summed])], perm=[0, 3, 1, 2])
    hw = b.op("Shape", "hw", [base], start=2, end=4)
    b.op("Slice", "crop", [nchw, b.const("zeros", [0, 0]), hw, b.const("axes23", [2, 3])], out=outputs[0])


def gather_patches_shape(x_shape: Sequence[Any], index_shape: Sequence[Any], *, patch: int, halo: int) -> tuple:
    """Output shape [M, C, S+2h, S+2h]; works on ints and on TensorRT shape expressions alike."""
    side = patch + 2 * halo
    return (index_shape[0], x_shape[1], side, side)


def scatter_add_patches_shape(base_shape: Sequence[Any], patches_shape: Sequence[Any], index_shape: Sequence[Any],
                              *, patch: int) -> tuple:
    """Output shape: the base's."""
    return tuple(base_shape)


def no_macs(input_shapes: Sequence[Sequence[int]], output_shapes: Sequence[Sequence[int]], **attrs: Any) -> int:
    """Moving blocks multiplies nothing (the papers count convolutions and fully connected layers only)."""
    return 0


_HERE = __name__

# namespace "dync": TensorRT looks plugins up by (op_type, plugin_version, plugin_namespace), and
# `tensorrt.plugin` reserves the empty namespace, so the plugin lives in "dync" and the nodes say so.
GATHER = OpRecord(
    name="GatherPatches",
    decompose=decompose_gather_patches,
    macs=no_macs,
    shape=gather_patches_shape,
    reference=Face(f"{_HERE}.reference", "gather_patches"),
    triton=Face(f"{_HERE}.kernels", "gather_patches_triton"),
    tensorrt=Face(f"{_HERE}.trt", "register"),
)

SCATTER = OpRecord(
    name="ScatterAddPatches",
    decompose=decompose_scatter_add_patches,
    macs=no_macs,
    shape=scatter_add_patches_shape,
    reference=Face(f"{_HERE}.reference", "scatter_add_patches"),
    triton=Face(f"{_HERE}.kernels", "scatter_add_patches_triton"),
)

OPS = (GATHER, SCATTER)
