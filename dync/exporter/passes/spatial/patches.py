"""The plugin form of a masked bottleneck: `dync::GatherPatches` / `dync::ScatterAddPatches` (`--ops plugins`).

For TensorRT, whose parser maps the custom-domain nodes to the Triton plugins of
`dync/plugins/gather_scatter/`. Blocks must be stride 1 with a 3x3 conv2 and a mask that is a nearest
upsampling of a `[B, 1, m, m']` grid into S x S patches tiling the output (`S = Ho // m`)::

    idx = Transpose(NonZero(Squeeze(grid, 1)))                  [M, 3] rows (n, by, bx)
    p   = GatherPatches(x, idx, S, halo=1)                      [M, Cin, S+2, S+2]
    h   = Relu(Conv1x1(p)) * InImage[idx[:, 1:]]                zeros where the halo leaves the image
    r   = Conv1x1(Relu(Conv3x3_pad0(h)))                        [M, Cout, S, S]
    Relu(ScatterAddPatches(shortcut, r, idx, S))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from dync.exporter.passes.spatial.match import Block, Ineligible, static_hw
from dync.graph import Builder, producer
from dync.plugins.op_registry import registry


def emit_patches(graph: gs.Graph, block: Block) -> None:
    """Replace `block` by its plugin form, writing the block's own output; `Ineligible` if the geometry differs."""
    grid, patch = _grid_and_patch(block)
    b = Builder(graph.nodes, f"{block.name}/patches/")
    index = _block_index(b, grid)
    patches = registry().get("GatherPatches").emit(b, [block.x, index], name="gather", patch=patch, halo=1)
    result = _patch_convs(b, block, patches, index, static_hw(grid, "mask grid"), patch)
    joined = registry().get("ScatterAddPatches").emit(b, [block.shortcut, result, index], name="scatter",
                                                      patch=patch)
    joined.dtype, joined.shape = block.shortcut.dtype, block.shortcut.shape
    block.relu.inputs[0] = joined


def _grid_and_patch(block: Block) -> tuple[gs.Tensor, int]:
    """The `[B, 1, m, m']` grid behind the mask and the side S of the patches it is upsampled to."""
    if (block.kernel, block.stride, block.pad) != (3, 1, 1):
        raise Ineligible(f"the plugin form needs a 3x3 stride-1 conv2, {block.convs[1].name} has kernel "
                         f"{block.kernel}, stride {block.stride}, pad {block.pad}")
    resize = producer(block.mask, "Resize")
    grid = block.mask if resize is None else resize.inputs[0]
    grid_hw = static_hw(grid, "mask grid")
    out_hw = block.out_hw
    if out_hw[0] % grid_hw[0] or out_hw[1] % grid_hw[1] or out_hw[0] // grid_hw[0] != out_hw[1] // grid_hw[1]:
        raise Ineligible(f"mask {block.mask.name}: grid {grid_hw} does not tile {out_hw} with square patches")
    patch = out_hw[0] // grid_hw[0]
    if resize is not None:
        _check_resize(resize)
    return grid, patch


def _check_resize(resize: gs.Node) -> None:
    """A nearest / asymmetric / floor Resize: output pixel (y, x) reads grid cell (y // S, x // S).

    Scales or sizes need no check: the static output size is S times the grid's, and with these modes
    that fixes the mapping.
    """
    wanted = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    for name, want in wanted.items():
        if resize.attrs.get(name) != want:
            raise Ineligible(f"{resize.name} has {name}={resize.attrs.get(name)!r}, needs {want!r}")
    if resize.attrs.get("axes") is not None or resize.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise Ineligible(f"{resize.name} resizes with axes or a kept aspect ratio")


def _block_index(b: Builder, grid: gs.Tensor) -> gs.Variable:
    """`[M, 3]` int64 rows (n, by, bx) of the grid's nonzero cells, in row-major order."""
    squeezed = b.op("Squeeze", "grid", [grid, b.const("axis1", [1])])
    return b.op("Transpose", "index", [b.op("NonZero", "nonzero", [squeezed])], perm=[1, 0])


def _patch_convs(b: Builder, block: Block, patches: gs.Tensor, index: gs.Tensor, grid_hw: tuple[int, int],
                 patch: int) -> gs.Variable:
    """conv1 + Relu on the halo'd patches, zero outside the image, then conv2 (pad 0) + Relu and conv3."""
    conv1, conv2, conv3 = block.convs
    h1 = b.op("Relu", "relu1", [_conv_like(b, conv1, patches, "conv1")])
    cells = b.op("Slice", "cells", [index, b.const("cells_start", [1]), b.const("cells_end", [3]),
                                    b.const("cells_axis", [1])])
    in_image = b.op("GatherND", "in_image", [b.const("in_image_table", _in_image_table(grid_hw, patch), np.float32),
                                             cells])
    h1 = b.op("Mul", "halo_zeroed", [h1, in_image])
    h2 = b.op("Relu", "relu2", [_conv_like(b, conv2, h1, "conv2", pads=[0, 0, 0, 0])])
    return _conv_like(b, conv3, h2, "conv3")


def _conv_like(b: Builder, conv: gs.Node, x: gs.Tensor, name: str, **overrides: Any) -> gs.Variable:
    """A copy of `conv` (same weights and bias) applied to `x`, with some attributes overridden."""
    return b.op("Conv", name, [x, *conv.inputs[1:]], **{**conv.attrs, **overrides})


def _in_image_table(grid_hw: tuple[int, int], patch: int) -> np.ndarray:
    """`[gh, gw, 1, S+2, S+2]`: 1 where cell (by, bx)'s halo'd window lies inside the image."""
    def axis(cells: int) -> np.ndarray:
        pos = np.arange(cells)[:, None] * patch - 1 + np.arange(patch + 2)[None, :]
        return (pos >= 0) & (pos < cells * patch)

    rows, cols = axis(grid_hw[0]), axis(grid_hw[1])
    return (rows[:, None, :, None] & cols[None, :, None, :])[:, :, None]
