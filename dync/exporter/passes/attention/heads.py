"""The 3-D form of a fused attention: Q, K, V read as `[batch, tokens, heads * dim]`, the output written so.

ONNX `Attention` takes its inputs either as `[B, H, N, d]` or as `[B, N, H*d]` with the head counts as
attributes. Exports split the heads with a Reshape and a Transpose, and merge them back the same way after,
and onnxruntime runs those Transposes as copies. Where Q, K and V are each such a head view of a 3-D
tensor, the fused node reads the 3-D tensors directly and its output replaces the merge. The copies go;
see docs/attention.md for the measurements. torch.onnx writes a head view two ways:

* `x.reshape(B, N, H, d).permute(0, 2, 1, 3)`: Transpose[0,2,1,3](Reshape(X [B, N, H*d]));
* a packed projection, `qkv.reshape(B, N, P, H, d).permute(2, 0, 3, 1, 4)[i]`: Gather, or Squeeze of a
  one-wide Slice, on axis 0 of Transpose[2,0,3,1,4](Reshape(X [B, N, P*H*d])). Its 3-D form is the i-th
  `H*d`-wide slice of X's last axis.

K arrives transposed (`[B, H, d, L]`); it is a head view when the Transpose that made it, composed with the
swap of its last two axes, is the head split's [0,2,1,3], or the identity over a head view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dync.graph import constant, producer, shape_of

SPLIT_HEADS = [0, 2, 1, 3]
SPLIT_PACKED_HEADS = [2, 0, 3, 1, 4]


@dataclass(frozen=True)
class HeadView:
    """A `[B, H, N, d]` tensor that is channels `[start, start + width)` of `source` `[B, N, W]`, head-split."""

    source: gs.Tensor
    start: int
    width: int


def head_view(tensor: gs.Tensor) -> HeadView | None:
    """`tensor`'s 3-D source when it is a head view (either way torch.onnx writes one), else None."""
    transpose = producer(tensor, "Transpose")
    if transpose is not None and list(transpose.attrs["perm"]) == SPLIT_HEADS:
        return _split_view(transpose.inputs[0])
    return _packed_view(tensor)


def keys_head_view(kt: gs.Tensor) -> HeadView | None:
    """The head view K is, given KT = K with its last two axes swapped."""
    transpose = producer(kt, "Transpose")
    if transpose is None:
        return None
    perm = [transpose.attrs["perm"][i] for i in (0, 1, 3, 2)]
    if perm == SPLIT_HEADS:
        return _split_view(transpose.inputs[0])
    return head_view(transpose.inputs[0]) if perm == [0, 1, 2, 3] else None


def merged_input(graph: gs.Graph, view: HeadView, name: str) -> gs.Tensor:
    """The view as a 3-D tensor: its source, or a Slice of the source's last axis."""
    if view.start == 0 and view.width == shape_of(view.source)[2]:
        return view.source
    batch, tokens, _ = shape_of(view.source)
    out = gs.Variable(f"{name}_merged", dtype=view.source.dtype, shape=[batch, tokens, view.width])
    bounds = [gs.Constant(f"{name}_{key}", np.array([value], dtype=np.int64))
              for key, value in (("start", view.start), ("end", view.start + view.width), ("axis", 2))]
    graph.nodes.append(gs.Node(op="Slice", name=f"{name}_slice", inputs=[view.source, *bounds], outputs=[out]))
    return out


def merged_output(graph: gs.Graph, output: gs.Tensor, shape: list, name: str) -> gs.Tensor:
    """Where the 3-D Attention writes, given the chain's 4-D `output` of `shape` [B, H, N, dv].

    When the only reader of `output` is the head merge (Transpose[0,2,1,3], then a Reshape to
    [B, N, H*dv]), that Reshape's tensor, the merge bypassed. Otherwise a new tensor, split back into heads
    to `output` for its readers.
    """
    merge = _head_merge(output)
    if merge is not None and not any(t is output or t is merge[0].outputs[0] for t in graph.outputs):
        transpose, reshape = merge
        written = reshape.outputs[0]
        transpose.outputs.clear()
        reshape.outputs.clear()
        return written
    batch, heads, tokens, width = shape  # shapes kept, so a later attention sees a head view here
    written = gs.Variable(f"{name}_merged_out", dtype=output.dtype, shape=[batch, tokens, heads * width])
    split = gs.Variable(f"{name}_split_out", dtype=output.dtype, shape=[batch, tokens, heads, width])
    dims = gs.Constant(f"{name}_heads_shape", np.array([0, 0, heads, -1], dtype=np.int64))
    graph.nodes.append(gs.Node(op="Reshape", name=f"{name}_split_heads", inputs=[written, dims], outputs=[split]))
    graph.nodes.append(gs.Node(op="Transpose", name=f"{name}_transpose_heads", attrs={"perm": SPLIT_HEADS},
                               inputs=[split], outputs=[output]))
    return written


def _split_view(reshaped: gs.Tensor) -> HeadView | None:
    """HeadView of X when `reshaped` = Reshape(X [B, N, H*d]) -> [B, N, H, d] keeps B and N."""
    reshape = producer(reshaped, "Reshape")
    if reshape is None:
        return None
    source = reshape.inputs[0]
    merged = shape_of(source)
    if not _splits_last_axis(merged, shape_of(reshaped), parts=2):
        return None
    return HeadView(source=source, start=0, width=merged[2])


def _packed_view(tensor: gs.Tensor) -> HeadView | None:
    """HeadView of X's i-th part when `tensor` is part i of Transpose[2,0,3,1,4](Reshape(X -> [B, N, P, H, d]))."""
    index, stacked = _axis0_part(tensor)
    transpose = None if stacked is None else producer(stacked, "Transpose")
    if transpose is None or list(transpose.attrs["perm"]) != SPLIT_PACKED_HEADS:
        return None
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    source, split = reshape.inputs[0], shape_of(reshape.outputs[0])
    if not _splits_last_axis(shape_of(source), split, parts=3):
        return None
    width = split[3] * split[4]
    return HeadView(source=source, start=index * width, width=width)


def _axis0_part(tensor: gs.Tensor) -> tuple[int, gs.Tensor | None]:
    """(i, S) when `tensor` is S[i] taken on axis 0: Gather by a scalar, or Squeeze of a one-wide Slice."""
    gather = producer(tensor, "Gather")
    if gather is not None and gather.attrs.get("axis", 0) == 0:
        index = constant(gather.inputs[1])
        if index is not None and index.ndim == 0:
            return int(index), gather.inputs[0]
    squeeze = producer(tensor, "Squeeze")
    if squeeze is None or len(squeeze.inputs) < 2 or not _is_axis0(squeeze.inputs[1]):
        return 0, None
    part = producer(squeeze.inputs[0], "Slice")
    if part is None or len(part.inputs) < 4 or not _is_axis0(part.inputs[3]):
        return 0, None
    starts, ends = constant(part.inputs[1]), constant(part.inputs[2])
    steps = constant(part.inputs[4]) if len(part.inputs) > 4 else np.ones(1)
    if starts is None or ends is None or steps is None or int(ends[0]) != int(starts[0]) + 1 or int(steps[0]) != 1:
        return 0, None
    return int(starts[0]), part.inputs[0]


def _is_axis0(axes: gs.Tensor) -> bool:
    values = constant(axes)
    return values is not None and values.size == 1 and int(values.reshape(-1)[0]) == 0


def _head_merge(output: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """(Transpose, Reshape) when they are `output`'s only readers and merge its heads to [B, N, H*dv]."""
    if len(output.outputs) != 1 or output.outputs[0].op != "Transpose":
        return None
    transpose = output.outputs[0]
    if list(transpose.attrs["perm"]) != SPLIT_HEADS or len(transpose.outputs[0].outputs) != 1:
        return None
    reshape = transpose.outputs[0].outputs[0]
    if reshape.op != "Reshape" or not _splits_last_axis(shape_of(reshape.outputs[0]), shape_of(transpose.outputs[0]),
                                                        parts=2):
        return None
    return transpose, reshape


def _splits_last_axis(merged: list | None, split: list | None, parts: int) -> bool:
    """Whether `split` is `merged` [B, N, W] with W split into `parts` static axes, B and N kept."""
    if merged is None or split is None or len(merged) != 3 or len(split) != 2 + parts or merged[:2] != split[:2]:
        return False
    static = (*split[1:], merged[2])
    return all(isinstance(d, int) for d in static) and merged[2] == int(np.prod(split[2:]))
