"""Fuse softmax attention into the standard ONNX `Attention` op (opset 23): one kernel where the export has
four to six nodes (see docs/attention.md for the measurements):

    MatMul(Softmax(Add(Mul(MatMul(Mul(Q, a), KT), b), bias), axis=-1), V)  ->  Attention(Q, K, V, bias, scale=a*b)

* Q, KT and V are rank 4 (`[batch, heads, tokens, head_dim]`; KT is `[batch, heads, head_dim, keys]`), so the
  op's 4-D form applies and no head count is needed; K is KT with its last two axes swapped (a Transpose that
  produced KT is composed with the swap, so onnxruntime sees at most one Transpose where there was one);
  where Q, K and V are all head views of `[batch, tokens, heads * dim]` tensors, the op's 3-D form reads
  those instead and the head splits and merge go (`heads.py`);
* both Muls (by a scalar constant) and the Add are optional; the Add's output must have the scores' shape (the
  bias broadcasts up to the scores, as `Attention`'s mask does, never the other way);
* every intermediate feeds only the next node of the chain (a tensor read elsewhere is not fused away).

Bias tables built per call and repeated over the batch (Agent attention's `table.repeat(b, 1, 1, 1)`) are
taken before the repeat: inside the bias's tree of Adds, a `Tile` of a tensor whose first axis is 1 by
repeats `[n, 1, ..., 1]` is bypassed, since the mask broadcasts over the batch anyway. The tree then depends
on constants only and onnxruntime folds it to one table at session creation.

Which matches are fused is the caller's `choose(AttentionShape)`: the exporter fuses where onnxruntime runs
the fused form faster on this machine (`measure.py`). A match left unfused still loses its bias's batch
Tiles (the Add broadcasts the table as the mask would).

Guarantees: graph inputs and outputs are unchanged, the batch axis stays dynamic, and outputs equal the
unfused graph's to float rounding (onnxruntime's kernel computes the same products, scale and softmax).
The model is converted to opset 23 with `onnx.version_converter` when something matches; when nothing
matches the model is returned unchanged, and when the converter cannot convert the model it is returned
unchanged with every match recorded as unfused, the converter's complaint as the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from dync.exporter.passes.attention.heads import HeadView, head_view, keys_head_view, merged_input, merged_output
from dync.graph import (
    all_ones,
    default_opset,
    export_graph,
    import_graph,
    only_consumer,
    producer,
    rank,
    scalar,
    shape_of,
)
from dync.records import AttentionRecord, AttentionShape

ATTENTION_OPSET = 23
SOFTMAX_LAST_AXIS_OPSET = 13
"""From opset 13 Softmax normalizes over one axis (-1 by default), not over all axes from `axis` on."""


Choice = Callable[[AttentionShape], bool]


def fuse_all(shape: AttentionShape) -> bool:
    """The choice that fuses every match: the pass's default, independent of the machine."""
    return True


@dataclass
class Match:
    """One fusable chain: the nodes it replaces and what the Attention node reads."""

    nodes: list[gs.Node]
    q: gs.Tensor
    kt: gs.Tensor
    v: gs.Tensor
    bias: gs.Tensor | None
    scale: float
    output: gs.Tensor


def fuse_attention(model: onnx.ModelProto, choose: Choice = fuse_all,
                   skip: Collection[str] = ()) -> tuple[onnx.ModelProto, list[AttentionRecord]]:
    """The model with the matching softmax attentions that `choose` picks fused, and a record per match.

    `choose` sees each match's static shape; a match whose shape is not static is fused without asking.
    Matches whose Softmax is named in `skip` are left as they are, without a record.
    """
    matches = [m for m in find_matches(import_graph(model, infer_shapes=True)) if softmax_name(m) not in skip] \
        if default_opset(model) >= SOFTMAX_LAST_AXIS_OPSET else []
    if not matches:
        return model, []
    try:
        converted = version_converter.convert_version(model, ATTENTION_OPSET)
    except (RuntimeError, onnx.checker.ValidationError) as exc:  # no adapter for some op of the model
        reason = f"onnx's version converter cannot take the model to opset {ATTENTION_OPSET} ({exc})"
        return model, [AttentionRecord(softmax_name(m), False, _attention_shape(m, False), reason=reason)
                       for m in matches]
    graph = import_graph(converted, infer_shapes=True)
    reports = []
    for index, match in enumerate(find_matches(graph)):  # in graph order: an earlier 3-D output is a head view
        if softmax_name(match) in skip:
            continue
        views = _head_views(match)
        name, shape = softmax_name(match), _attention_shape(match, views is not None)
        fused = shape is None or choose(shape)
        if fused:
            _rewrite(graph, match, f"fused_attention_{index}", views)
        elif match.bias is not None:
            _drop_batch_tiles(match)
        reports.append(AttentionRecord(node=name, fused=fused, shape=shape))
    graph.cleanup().toposort()
    return export_graph(graph, like=converted), reports


def softmax_name(match: Match) -> str:
    softmax = match.nodes[0]
    return softmax.name or softmax.outputs[0].name


def find_matches(graph: gs.Graph) -> list[Match]:
    """Chains whose intermediates no graph output exposes."""
    outputs = {t.name for t in graph.outputs}
    matches = [_match(node) for node in graph.nodes if node.op == "Softmax"]
    return [m for m in matches if m is not None
            and not any(n.outputs[0].name in outputs for n in m.nodes if n.outputs[0] is not m.output)]


def _match(softmax: gs.Node) -> Match | None:
    """The chain around `softmax`, or None when any part of the pattern is missing."""
    if softmax.attrs.get("axis", -1) not in (-1, 3) or rank(softmax.outputs[0]) != 4:
        return None
    pv = only_consumer(softmax, "MatMul")
    if pv is None or pv.inputs[0] is not softmax.outputs[0] or rank(pv.inputs[1]) != 4:
        return None
    nodes, scale = [softmax, pv], 1.0
    scores, bias = softmax.inputs[0], None
    add = producer(scores, "Add", single_use=True)
    if add is not None:
        scores, bias = _split_bias(add)
        if scores is None:
            return None
        nodes.append(add)
    post = producer(scores, "Mul", single_use=True)
    if post is not None and scalar(post.inputs[1]) is not None:
        scale *= scalar(post.inputs[1])
        scores = post.inputs[0]
        nodes.append(post)
    qk = producer(scores, "MatMul", single_use=True)
    if qk is None or rank(qk.inputs[0]) != 4 or rank(qk.inputs[1]) != 4:
        return None
    nodes.append(qk)
    q = qk.inputs[0]
    pre = producer(q, "Mul", single_use=True)
    if pre is not None and scalar(pre.inputs[1]) is not None and rank(pre.inputs[0]) == 4:
        scale *= scalar(pre.inputs[1])
        q = pre.inputs[0]
        nodes.append(pre)
    if not _same_batch_and_heads(q, qk.inputs[1], pv.inputs[1]):
        return None
    return Match(nodes=nodes, q=q, kt=qk.inputs[1], v=pv.inputs[1], bias=bias, scale=scale, output=pv.outputs[0])


def _same_batch_and_heads(*tensors: gs.Tensor) -> bool:
    """MatMul broadcasts a batch or head axis of 1, `Attention` does not: the first two axes must agree."""
    shapes = [shape_of(t) for t in tensors]
    return None not in shapes and all(s[:2] == shapes[0][:2] and None not in s[:2] for s in shapes)


def _split_bias(add: gs.Node) -> tuple[gs.Tensor | None, gs.Tensor | None]:
    """(scores, bias) of the Add, scores being the MatMul/Mul side; None unless the bias, once its batch Tiles
    are bypassed, has a static shape that broadcasts to the scores' (1 on the batch axis)."""
    first, second = add.inputs
    scores, bias = (first, second) if producer(first, "MatMul") or producer(first, "Mul") else (second, first)
    shape, target = _shape_after_bypass(bias), shape_of(scores)
    if shape is None or target is None or len(shape) > len(target):
        return None, None
    aligned = target[len(target) - len(shape):]
    if not all(d == 1 or d == t for d, t in zip(shape, aligned, strict=True)):
        return None, None
    return scores, bias


def _head_views(match: Match) -> tuple[HeadView, HeadView, HeadView] | None:
    """Q, K and V as head views of 3-D tensors, when all three are."""
    views = (head_view(match.q), keys_head_view(match.kt), head_view(match.v))
    return None if None in views else views


def _attention_shape(match: Match, merged_heads: bool) -> AttentionShape | None:
    """The match's per-sample shape, when every dim but the batch is static."""
    q, kt, v = (shape_of(t) for t in (match.q, match.kt, match.v))
    dims = [*q[1:], kt[3], v[3]]
    if not all(isinstance(d, int) for d in dims):
        return None
    bias = None if match.bias is None else tuple(_shape_after_bypass(match.bias))
    return AttentionShape(heads=q[1], queries=q[2], keys=kt[3], head_dim=q[3], value_dim=v[3], bias=bias,
                          merged_heads=merged_heads)


def _drop_batch_tiles(match: Match) -> None:
    """Feed the unfused chain's Add the bias without its batch Tiles, which the Add's broadcasting makes moot."""
    add = next(node for node in match.nodes if node.op == "Add")
    add.inputs[add.inputs.index(match.bias)] = _bypassed(match.bias)


def _rewrite(graph: gs.Graph, match: Match, name: str, views: tuple[HeadView, ...] | None) -> None:
    """Replace the chain by one Attention node writing the chain's output tensor: in the 3-D form when Q, K
    and V are head `views` (the output then replaces the head merge that follows, if one does)."""
    for node in match.nodes:
        node.outputs.clear()
    attrs: dict = {"scale": float(match.scale)}
    if views is None:
        inputs, output = [match.q, untransposed(graph, match.kt, name), match.v], match.output
    else:
        batch, heads, tokens, _ = shape_of(match.q)
        attrs.update(q_num_heads=heads, kv_num_heads=heads)
        inputs = [merged_input(graph, view, f"{name}_{role}") for role, view in zip("qkv", views, strict=True)]
        output = merged_output(graph, match.output, [batch, heads, tokens, shape_of(match.v)[3]], name)
    if match.bias is not None:
        inputs.append(_bypassed(match.bias))
    graph.nodes.append(gs.Node(op="Attention", name=name, attrs=attrs, inputs=inputs, outputs=[output]))


def untransposed(graph: gs.Graph, kt: gs.Tensor, name: str) -> gs.Tensor:
    """K = KT with the last two axes swapped, composing with the Transpose that made KT if there is one."""
    source, perm = kt, [0, 1, 3, 2]
    transpose = producer(kt, "Transpose")
    if transpose is not None:
        source, perm = transpose.inputs[0], [transpose.attrs["perm"][i] for i in perm]
    if perm == [0, 1, 2, 3]:
        return source
    k = gs.Variable(f"{name}_k", dtype=kt.dtype)
    graph.nodes.append(gs.Node(op="Transpose", name=f"{name}_transpose_k", attrs={"perm": perm}, inputs=[source],
                               outputs=[k]))
    return k


def _batch_tile(tensor: gs.Tensor) -> gs.Node | None:
    """The Tile writing `tensor` if it only repeats a leading-1 tensor over the batch and nothing else reads it."""
    tile = producer(tensor, "Tile", single_use=True)
    return tile if tile is not None and _repeats_batch_only(tile) else None


def _bypassed(bias: gs.Tensor) -> gs.Tensor:
    """`bias` with each batch Tile in its tree of single-use Adds replaced by the Tile's input (rewired in place)."""
    tile = _batch_tile(bias)
    if tile is not None:
        return tile.inputs[0]
    add = producer(bias, "Add", single_use=True)
    if add is not None:
        for i, operand in enumerate(list(add.inputs)):
            add.inputs[i] = _bypassed(operand)
    return bias


def _shape_after_bypass(bias: gs.Tensor) -> list[int] | None:
    """The static shape `_bypassed(bias)` will have; None when a dim is symbolic or unknown."""
    tile = _batch_tile(bias)
    add = producer(bias, "Add", single_use=True)
    if tile is not None:
        shape = shape_of(tile.inputs[0])
    elif add is not None:
        shapes = [_shape_after_bypass(t) for t in add.inputs]
        shape = None if None in shapes else list(np.broadcast_shapes(*map(tuple, shapes)))
    else:
        shape = shape_of(bias)
    return shape if shape is not None and all(isinstance(d, int) for d in shape) else None


def _repeats_batch_only(tile: gs.Node) -> bool:
    """Tile(x, [n, 1, ..., 1]) with x's first axis 1: every batch entry is x, which broadcasting gives too."""
    shape = shape_of(tile.inputs[0])
    if shape is None or shape[0] != 1:
        return False
    repeats = tile.inputs[1]
    if isinstance(repeats, gs.Constant):
        return bool(np.all(repeats.values[1:] == 1))
    concat = producer(repeats, "Concat")
    return concat is not None and all(all_ones(t) for t in concat.inputs[1:])
