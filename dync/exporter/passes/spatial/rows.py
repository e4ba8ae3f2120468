"""The CPU form of a masked bottleneck: gather active pixels as rows, three GEMMs, scatter back (`--ops portable`).

Channels-last rows make every gather and scatter a contiguous row copy and every conv one MLAS GEMM, and
conv1 runs once per needed pixel (no halo recomputed per patch), so masks need not tile the map. With
`k`, `s`, `p` conv2's kernel, stride and padding and `P2` / `P1` the active output / needed input pixels::

    q2   = NonZero(mask)                                        active output pixels (n, i, j), flat
    need = ConvTranspose(mask, ones[k, k], s, p) > 0            conv1 pixels conv2 reads, at input size
    q1   = NonZero(need);  pos = Where(need, CumSum(need) - 1, P1)   row of each needed pixel, else a zero row
    xt   = NHWC rows of x
    h1   = [Relu(Gemm(xt[q1], W1)); 0]                          [P1 + 1, C1]
    h2   = Relu(Gemm(h1[pos[taps(q2)]] as [P2, k*k*C1], W2))    conv2 as im2col by row gather
    y    = Gemm(h2, W3)                                         [P2, Cout]
    out  = Relu(ScatterND(shortcut rows, q2, y, add))

The whole block sits in an `If` on the batch's mask density: above the block's crossover (measured, see
`crossover.py`) the dense original runs instead, so the lowered block is never much slower than dense.
A block whose crossover is 1.0 runs the row form inline, without the If (see `emit_rows`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.exporter.passes.spatial.match import Block
from dync.graph import Builder

CROSSOVER_SUFFIX = "spatial/crossover"


def emit_rows(graph: gs.Graph, block: Block, crossover: float) -> None:
    """Replace `block` by `If(density > crossover, dense copy, row form)`, writing the block's own output.

    A crossover of 1.0 (never dense) inlines the row form without the If: besides the If's own cost,
    onnxruntime's transpose optimizer cannot see through an If, and inlined it cancels the NCHW -> rows
    transpose of a block against the rows -> NCHW transpose of the block before.
    """
    p = f"{block.name}/"
    output = block.relu.outputs[0]
    sparse = _rows_branch(block, f"{p}rows/")
    dense = None if crossover >= 1.0 else _dense_branch(block, f"{p}dense/")
    block.relu.outputs.clear()
    if dense is None:
        sparse.nodes[-1].outputs = [output]
        graph.nodes.extend(sparse.nodes)
        return
    main = Builder(graph.nodes, p)
    density = main.op("ReduceMean", "spatial/density", [block.mask], keepdims=0)
    threshold = gs.Constant(p + CROSSOVER_SUFFIX, np.array(crossover, np.float32))
    use_dense = main.op("Greater", "spatial/use_dense", [density, threshold])
    for branch in (dense, sparse):
        branch.outputs[0].dtype, branch.outputs[0].shape = output.dtype, output.shape
    graph.nodes.append(gs.Node("If", f"{p}spatial/if", attrs={"then_branch": dense, "else_branch": sparse},
                               inputs=[use_dense], outputs=[output]))


def _dense_branch(block: Block, p: str) -> gs.Graph:
    """A copy of the block's original nodes, reading the same outer tensors."""
    renamed: dict[str, gs.Variable] = {}
    nodes = []
    for node in block.nodes:
        outputs = [gs.Variable(p + t.name, dtype=t.dtype, shape=t.shape) for t in node.outputs]
        inputs = [renamed.get(t.name, t) for t in node.inputs]
        renamed.update((t.name, new) for t, new in zip(node.outputs, outputs, strict=True))
        nodes.append(gs.Node(node.op, p + node.name, dict(node.attrs), inputs, outputs, domain=node.domain))
    return gs.Graph(nodes=nodes, outputs=[nodes[-1].outputs[0]], name=p.rstrip("/"))


def _rows_branch(block: Block, p: str) -> gs.Graph:
    """The row form of the module docstring, as a graph whose one output is the block's NCHW output."""
    nodes: list[gs.Node] = []
    b = Builder(nodes, p)
    out_rows, sample, pixel = _out_rows(b, block)
    need_rows, taps = _needed_rows(b, block, _taps(b, block, sample, pixel))
    xt = _nhwc_rows(b, block.x, "x", block.x.shape[1])
    y = _convs(b, block, xt, need_rows, taps)
    shortcut = xt if block.shortcut is block.x else _nhwc_rows(b, block.shortcut, "shortcut", block.shortcut.shape[1])
    rows = b.op("Unsqueeze", "out_rows_2d", [out_rows, b.const("out_rows_axis", [1])])
    out = b.op("Relu", "relu", [b.op("ScatterND", "scatter", [shortcut, rows, y], reduction="add")])
    cout = block.convs[2].inputs[1].shape[0]
    nhwc = b.op("Reshape", "out_nhwc", [out, b.const("out_shape", [-1, *block.out_hw, cout])])
    result = b.op("Transpose", "out", [nhwc], perm=[0, 3, 1, 2])
    return gs.Graph(nodes=nodes, outputs=[result], name=p.rstrip("/"))


def _nhwc_rows(b: Builder, x: gs.Tensor, what: str, channels: int) -> gs.Variable:
    """`x [N, C, H, W]` as `[N*H*W, C]` rows."""
    nhwc = b.op("Transpose", f"{what}_nhwc", [x], perm=[0, 2, 3, 1])
    return b.op("Reshape", f"{what}_rows", [nhwc, b.const(f"{what}_rows_shape", [-1, channels])])


def _out_rows(b: Builder, block: Block) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
    """Kept output pixels flat over `(n, i, j)` `[P2]`, and each one's sample `n` and in-plane index."""
    out_rows = b.op("Squeeze", "out_rows", [b.op("NonZero", "out_nonzero", [
        b.op("Reshape", "mask_flat", [block.mask, b.const("flat", [-1])])]), b.const("axis0", [0])])
    plane = b.const("out_plane", block.out_hw[0] * block.out_hw[1])
    return out_rows, b.op("Div", "out_sample", [out_rows, plane]), b.op("Mod", "out_pixel", [out_rows, plane])


def _taps(b: Builder, block: Block, sample: gs.Tensor, pixel: gs.Tensor) -> gs.Variable:
    """`[P2, k*k]` flat cells of conv2's taps in the input map padded by conv2's padding, batch-major."""
    (h, w), k, p = block.in_hw, block.kernel, block.pad
    corner = b.op("Add", "tap_corner", [
        b.op("Gather", "tap_anchor", [b.const("anchor_table", _anchor_table(block)), pixel]),
        b.op("Mul", "tap_sample", [sample, b.const("padded_plane", (h + 2 * p) * (w + 2 * p))])])
    offsets = b.const("tap_offsets", [[ky * (w + 2 * p) + kx for ky in range(k) for kx in range(k)]])
    return b.op("Add", "tap_cells", [b.op("Unsqueeze", "tap_corner_2d", [corner, b.const("axis1", [1])]), offsets])


def _needed_rows(b: Builder, block: Block, tap_cells: gs.Tensor) -> tuple[gs.Variable, gs.Variable]:
    """Input pixels conv2 reads `[P1]`, and conv2's taps as rows of conv1's output `[P2, k*k]`.

    Taps in the padding, or on pixels no kept output reads, point at row P1: the zero row after conv1.
    """
    k, s, p = block.kernel, block.stride, block.pad
    (h, w), ho = block.in_hw, block.out_hw[0]
    flat, axis0 = b.const("need_flat_shape", [-1]), b.const("need_axis", [0])
    spread = b.op("ConvTranspose", "need_count", [block.mask, b.const("ones", np.ones((1, 1, k, k)), np.float32)],
                  strides=[s, s], pads=[p, p, p, p], output_padding=[h - (ho - 1) * s + 2 * p - k] * 2)
    need = b.op("Greater", "need", [b.op("Reshape", "need_flat", [spread, flat]), b.const("zero", 0.0, np.float32)])
    need_rows = b.op("Squeeze", "need_rows", [b.op("NonZero", "need_nonzero", [need]), axis0])
    count = b.op("Squeeze", "need_count_scalar", [b.op("Shape", "need_shape", [need_rows])])
    order = b.op("Sub", "need_order", [b.op("CumSum", "need_cumsum", [
        b.op("Cast", "need_int", [need], to=onnx.TensorProto.INT64), axis0]), b.const("one", 1)])
    position = b.op("Where", "position", [need, order, count])
    padded = b.op("Reshape", "position_padded_flat", [b.op("Pad", "position_padded", [
        b.op("Reshape", "position_map", [position, b.const("map_shape", [-1, h, w])]),
        b.const("position_pads", [0, p, p, 0, p, p]), count]), flat])
    return need_rows, b.op("Gather", "taps", [padded, tap_cells])


def _anchor_table(block: Block) -> np.ndarray:
    """Flat index, in the padded input map, of the top-left tap of each output pixel `(i, j)`: `(s*i, s*j)`."""
    s, p = block.stride, block.pad
    ho, wo = block.out_hw
    rows, cols = np.divmod(np.arange(ho * wo), wo)
    return (s * rows * (block.in_hw[1] + 2 * p) + s * cols).astype(np.int64)


def _convs(b: Builder, block: Block, xt: gs.Tensor, need_rows: gs.Tensor, taps: gs.Tensor) -> gs.Variable:
    """conv1 on the needed rows, conv2 as a GEMM over gathered taps, conv3: `[P2, Cout]`."""
    conv1, conv2, conv3 = block.convs
    h1 = b.op("Relu", "relu1", [_gemm(b, conv1, b.op("Gather", "x_needed", [xt, need_rows], axis=0), "conv1")])
    h1_channels = conv1.inputs[1].shape[0]
    zero_row = b.const("zero_row", np.zeros((1, h1_channels)), np.float32)
    h1 = b.op("Concat", "relu1_padded", [h1, zero_row], axis=0)
    im2col = b.op("Gather", "im2col", [h1, taps], axis=0)
    flat = b.op("Reshape", "im2col_rows", [im2col, b.const("im2col_shape", [-1, block.kernel ** 2 * h1_channels])])
    h2 = b.op("Relu", "relu2", [_gemm(b, conv2, flat, "conv2")])
    return _gemm(b, conv3, h2, "conv3")


def _gemm(b: Builder, conv: gs.Node, rows: gs.Tensor, name: str) -> gs.Variable:
    """`conv` on channels-last rows: weight `[Cout, Cin, k, k]` flattened tap-major to `[Cout, k*k*Cin]`."""
    weight = conv.inputs[1].values
    matrix = b.const(f"{name}_weight", weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1), weight.dtype)
    bias = list(conv.inputs[2:3])
    return b.op("Gemm", name, [rows, matrix, *bias], transB=1)
