"""Lower LASNet-style masked bottlenecks to gather-scatter execution with portable ONNX ops.

Rule (stride 1, one mask group; `S = Ho // m` the patch, `grid` a binary `[B, 1, m, m']` map)::

    Relu(Add(Mul(Conv1x1(Relu(Conv3x3(Relu(Conv1x1(x))))), Resize_nearest(grid)), shortcut))
    ->
    idx = Transpose(NonZero(Squeeze(grid, 1)))                          [M, 3] rows (n, by, bx)
    p   = GatherPatches(x, idx, S, halo=1)                              [M, Cin, S+2, S+2]
    h   = Relu(Conv1x1(p)) * InImage[idx[:, 1:]]                        zeros where the halo leaves the image
    r   = Conv1x1(Relu(Conv3x3_pad0(h)))                                [M, Cout, S, S]
    Relu(ScatterAddPatches(shortcut, r, idx, S))

Either operand order of Mul and Add matches; the Resize may be absent (S = 1). GatherPatches and
ScatterAddPatches are emitted as their portable decompositions (`dync/plugins/gather_scatter.py`), so the
result runs on onnxruntime. Semantics are those of `docs/spatial_semantics.md`; the design is
`docs/spatial_lowering.md`. Every `Relu(Add(Mul(.), .))` that fails a check stays dense and gets a
`LoweringReport` naming the node and the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs

from dync.errors import SpatialLoweringError

MIN_OPSET = 16  # ScatterND reduction="add" (the scatter decomposition) needs opset 16


@dataclass(frozen=True)
class LoweringReport:
    """What the pass did with one `Relu(Add(Mul(.), .))` candidate, named by its final Relu node."""

    node: str
    lowered: bool
    reason: str
    patch: int | None = None


class _Ineligible(Exception):
    """A candidate block fails a check; the message is the reason reported to the user."""


@dataclass(frozen=True)
class _Block:
    """A matched bottleneck: the nodes to bypass and the tensors the lowered form reads."""

    relu: gs.Node
    convs: tuple[gs.Node, gs.Node, gs.Node]
    x: gs.Tensor
    shortcut: gs.Tensor
    grid: gs.Tensor
    grid_hw: tuple[int, int]
    patch: int


# --------------------------------------------------------------------------------------------- pass


def lower_masked_bottlenecks(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[LoweringReport]]:
    """Lower every eligible masked bottleneck of `model` to gather-scatter execution (portable ops).

    Precondition: `model` is an ONNX model (default-domain opset >= 16) as `torch.onnx.export(dynamo=True)`
    writes it, BatchNorms folded into conv biases. Guarantee: graph inputs and outputs (names, shapes, the
    dynamic batch dim) are unchanged and every output equals the input model's up to float summation
    order; blocks that fail a check stay dense. `model` itself is not modified. Returns the new model and
    one report per candidate `Relu(Add(Mul(.), .))`, in graph order.
    """
    _check_opset(model)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    reports = [_lower_candidate(graph, relu) for relu in list(_candidates(graph))]
    graph.cleanup().toposort()
    lowered = gs.export_onnx(graph)
    _restore_metadata(lowered, model)
    return lowered, reports


def _restore_metadata(lowered: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Carry over what graphsurgeon drops: IR version, model metadata, metadata of graph inputs/outputs."""
    lowered.ir_version = model.ir_version
    lowered.metadata_props.extend(model.metadata_props)
    for new, old in ((lowered.graph.input, model.graph.input), (lowered.graph.output, model.graph.output)):
        props = {v.name: v.metadata_props for v in old}
        for value in new:
            value.metadata_props.extend(props.get(value.name, []))


def _check_opset(model: onnx.ModelProto) -> None:
    """Reject models whose default-domain opset is too old for the decomposition's ops."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        raise SpatialLoweringError(
            f"Spatial lowering needs default-domain opset >= {MIN_OPSET}, the model has {version}; "
            f"re-export it with opset_version={MIN_OPSET} or later."
        )


def _lower_candidate(graph: gs.Graph, relu: gs.Node) -> LoweringReport:
    """Match one candidate and lower it, or say why it stays dense."""
    try:
        block = _match(relu)
    except _Ineligible as why:
        return LoweringReport(relu.name, False, str(why))
    _emit(graph, block)
    return LoweringReport(relu.name, True, "lowered", block.patch)


# --------------------------------------------------------------------------------------------- match


def _candidates(graph: gs.Graph) -> Iterator[gs.Node]:
    """Relu nodes whose input is an Add with a Mul operand: the join of a masked residual block."""
    for node in graph.nodes:
        add = _producer(node.inputs[0], "Add") if node.op == "Relu" else None
        if add is not None and any(_producer(t, "Mul") is not None for t in add.inputs):
            yield node


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type `op` that produces `tensor`, if any."""
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _match(relu: gs.Node) -> _Block:
    """Match `Relu(Add(Mul(chain, mask), shortcut))` in any operand order; raise `_Ineligible` otherwise."""
    add = relu.inputs[0].inputs[0]
    reasons = []
    for mul_side, shortcut in (add.inputs, add.inputs[::-1]):
        mul = _producer(mul_side, "Mul")
        if mul is None:
            continue
        for main, mask in (mul.inputs, mul.inputs[::-1]):
            try:
                return _match_operands(relu, main, mask, shortcut)
            except _Ineligible as why:
                reasons.append(str(why))
    raise _Ineligible(reasons[0] if len(reasons) == 1 else "; ".join(dict.fromkeys(reasons)))


def _match_operands(relu: gs.Node, main: gs.Tensor, mask: gs.Tensor, shortcut: gs.Tensor) -> _Block:
    """Check one assignment of the Mul and Add operands to (main, mask) and shortcut."""
    convs = _match_chain(main)
    x = convs[0].inputs[0]
    in_hw = _static_hw(x, "block input")
    if main.shape is None or shortcut.shape is None or list(main.shape) != list(shortcut.shape):
        raise _Ineligible(f"shortcut {shortcut.name} shape {shortcut.shape} differs from main {main.shape}")
    if _static_hw(main, "conv3 output") != in_hw:
        raise _Ineligible(f"conv chain changes the spatial size {in_hw}")
    if x.dtype != np.float32:
        raise _Ineligible(f"block input {x.name} is {x.dtype}, only float32 is supported")
    grid, patch = _match_mask(mask, main)
    return _Block(relu, convs, x, shortcut, grid, _static_hw(grid, "mask grid"), patch)


def _match_chain(main: gs.Tensor) -> tuple[gs.Node, gs.Node, gs.Node]:
    """`main = Conv1x1(Relu(Conv3x3(Relu(Conv1x1(x)))))`, stride 1, pad 1 on the 3x3, no groups/dilation."""
    conv3 = _producer(main, "Conv")
    if conv3 is None:
        raise _Ineligible(f"{main.name} is not produced by a Conv")
    conv2 = _conv_after_relu(conv3, "conv3")
    conv1 = _conv_after_relu(conv2, "conv2")
    _check_conv(conv1, 1, [0, 0, 0, 0])
    _check_conv(conv2, 3, [1, 1, 1, 1])
    _check_conv(conv3, 1, [0, 0, 0, 0])
    return conv1, conv2, conv3


def _conv_after_relu(conv: gs.Node, what: str) -> gs.Node:
    """The Conv feeding `conv` through a Relu."""
    relu = _producer(conv.inputs[0], "Relu")
    inner = None if relu is None else _producer(relu.inputs[0], "Conv")
    if inner is None:
        raise _Ineligible(f"input of {what} {conv.name} is not Relu(Conv(.))")
    return inner


def _check_conv(conv: gs.Node, kernel: int, pads: list[int]) -> None:
    """A dense 2-D conv with a square `kernel`, the given pads, stride 1, no dilation, no groups."""
    weight = conv.inputs[1]
    if weight.shape is None or len(weight.shape) != 4 or list(weight.shape[2:]) != [kernel, kernel]:
        raise _Ineligible(f"{conv.name} is not a {kernel}x{kernel} 2-D conv (weight {weight.shape})")
    attrs = conv.attrs
    checks = {
        "strides": (list(attrs.get("strides", [1, 1])), [1, 1]),
        "pads": (list(attrs.get("pads", [0, 0, 0, 0])), pads),
        "dilations": (list(attrs.get("dilations", [1, 1])), [1, 1]),
        "group": (attrs.get("group", 1), 1),
        "auto_pad": (attrs.get("auto_pad", "NOTSET"), "NOTSET"),
    }
    for name, (have, want) in checks.items():
        if have != want:
            hint = " (stride 2 is not supported yet)" if name == "strides" else ""
            raise _Ineligible(f"{conv.name} has {name}={have}, needs {want}{hint}")


def _static_hw(tensor: gs.Tensor, what: str) -> tuple[int, int]:
    """The static spatial size of a 4-D tensor."""
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise _Ineligible(f"{what} {tensor.name} has no static 4-D shape ({shape})")
    return shape[2], shape[3]


def _match_mask(mask: gs.Tensor, main: gs.Tensor) -> tuple[gs.Tensor, int]:
    """The binary grid `[B, 1, m, m']` behind `mask` and the patch size `S = Ho // m`."""
    out_hw = _static_hw(main, "conv3 output")
    if mask.shape is None or list(mask.shape) != [main.shape[0], 1, *out_hw]:
        raise _Ineligible(f"mask {mask.name} shape {mask.shape} is not [B, 1, Ho, Wo] = {[main.shape[0], 1, *out_hw]}")
    resize = _producer(mask, "Resize")
    grid = mask if resize is None else resize.inputs[0]
    grid_hw = _static_hw(grid, "mask grid")
    if grid.shape[:2] != mask.shape[:2]:
        raise _Ineligible(f"mask grid {grid.name} shape {grid.shape} does not match the mask's [B, 1]")
    patch = _patch(grid_hw, out_hw, mask.name)
    if resize is not None:
        _check_resize(resize, patch)
    _check_binary(grid)
    return grid, patch


def _patch(grid_hw: tuple[int, int], out_hw: tuple[int, int], name: str) -> int:
    """The side S of the square patches that tile the output exactly, one per grid cell."""
    if out_hw[0] % grid_hw[0] or out_hw[1] % grid_hw[1]:
        raise _Ineligible(f"mask {name}: grid {grid_hw} does not divide the output size {out_hw}")
    if out_hw[0] // grid_hw[0] != out_hw[1] // grid_hw[1]:
        raise _Ineligible(f"mask {name}: patches of grid {grid_hw} over {out_hw} are not square")
    return out_hw[0] // grid_hw[0]


def _check_resize(resize: gs.Node, patch: int) -> None:
    """A nearest / asymmetric / floor Resize on H and W only, by the integer factor `patch`."""
    attrs = resize.attrs
    wanted = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor",
              "keep_aspect_ratio_policy": "stretch"}
    for name, want in wanted.items():
        if attrs.get(name, "stretch" if name == "keep_aspect_ratio_policy" else None) != want:
            raise _Ineligible(f"{resize.name} has {name}={attrs.get(name)!r}, needs {want!r}")
    if attrs.get("axes") is not None:
        raise _Ineligible(f"{resize.name} has an axes attribute")
    scales = resize.inputs[2] if len(resize.inputs) > 2 else None
    if scales is not None and scales.name:
        values = getattr(scales, "values", None)
        if values is None or values.tolist() != [1.0, 1.0, float(patch), float(patch)]:
            raise _Ineligible(f"{resize.name} scales are not the constant [1, 1, {patch}, {patch}]")


def _check_binary(grid: gs.Tensor) -> None:
    """The grid is provably 0/1: a Cast to float32 of a bool tensor (the masker's hard decision)."""
    cast = _producer(grid, "Cast")
    if cast is None or cast.attrs.get("to") != onnx.TensorProto.FLOAT or cast.inputs[0].dtype != np.bool_:
        raise _Ineligible(f"mask grid {grid.name} is not provably binary (not a Cast of a bool tensor to float)")


# --------------------------------------------------------------------------------------------- lower


def _emit(graph: gs.Graph, block: _Block) -> None:
    """Add the gather-scatter form of `block` and make its final Relu read it; cleanup drops the dense nodes."""
    from dync.plugins.gather_scatter import decompose_gather_patches, decompose_scatter_add_patches

    p = f"{block.relu.name}/spatial/"
    index = _block_index(graph, block.grid, p)
    patches = _import_protos(graph, decompose_gather_patches(
        [block.x.name, index.name], [f"{p}patches"], patch=block.patch, halo=1, prefix=f"{p}gather/"))
    result = _patch_convs(graph, block, patches, index, p)
    out = _import_protos(graph, decompose_scatter_add_patches(
        [block.shortcut.name, result.name, index.name], [f"{p}joined"], patch=block.patch, prefix=f"{p}scatter/"))
    out.dtype, out.shape = block.shortcut.dtype, block.shortcut.shape
    block.relu.inputs[0] = out


def _op(graph: gs.Graph, op: str, name: str, inputs: Sequence[gs.Tensor], **attrs: Any) -> gs.Variable:
    """Append one node to `graph` and return its single (new) output."""
    out = gs.Variable(name)
    graph.nodes.append(gs.Node(op=op, name=name, attrs=attrs, inputs=list(inputs), outputs=[out]))
    return out


def _block_index(graph: gs.Graph, grid: gs.Tensor, p: str) -> gs.Variable:
    """`[M, 3]` int64 rows (n, by, bx) of the grid's nonzero cells, in row-major order."""
    squeezed = _op(graph, "Squeeze", f"{p}grid", [grid, gs.Constant(f"{p}axis1", np.array([1], np.int64))])
    nonzero = _op(graph, "NonZero", f"{p}nonzero", [squeezed])
    return _op(graph, "Transpose", f"{p}index", [nonzero], perm=[1, 0])


def _patch_convs(graph: gs.Graph, block: _Block, patches: gs.Tensor, index: gs.Tensor, p: str) -> gs.Variable:
    """conv1 + Relu on the halo'd patches, zero outside the image, then conv2 (pad 0) + Relu and conv3."""
    conv1, conv2, conv3 = block.convs
    h1 = _op(graph, "Relu", f"{p}relu1", [_conv_like(graph, conv1, patches, f"{p}conv1")])
    cells = _op(graph, "Slice", f"{p}cells", [index, *_int64_consts(p, "cells", [1], [3], [1])])
    table = gs.Constant(f"{p}in_image_table", _in_image_table(block.grid_hw, block.patch))
    in_image = _op(graph, "GatherND", f"{p}in_image", [table, cells])
    h1 = _op(graph, "Mul", f"{p}halo_zeroed", [h1, in_image])
    h2 = _op(graph, "Relu", f"{p}relu2", [_conv_like(graph, conv2, h1, f"{p}conv2", pads=[0, 0, 0, 0])])
    return _conv_like(graph, conv3, h2, f"{p}conv3")


def _conv_like(graph: gs.Graph, conv: gs.Node, x: gs.Tensor, name: str, **overrides: Any) -> gs.Variable:
    """A copy of `conv` (same weights and bias) applied to `x`, with some attributes overridden."""
    return _op(graph, "Conv", name, [x, *conv.inputs[1:]], **{**conv.attrs, **overrides})


def _int64_consts(p: str, what: str, *values: list[int]) -> list[gs.Constant]:
    """Named int64 constants for Slice-like inputs."""
    return [gs.Constant(f"{p}{what}_{k}", np.array(v, np.int64)) for k, v in enumerate(values)]


def _in_image_table(grid_hw: tuple[int, int], patch: int) -> np.ndarray:
    """`[gh, gw, 1, S+2, S+2]` float32: 1 where cell (by, bx)'s halo'd window lies inside the image."""
    def axis(cells: int) -> np.ndarray:
        pos = np.arange(cells)[:, None] * patch - 1 + np.arange(patch + 2)[None, :]
        return (pos >= 0) & (pos < cells * patch)

    rows, cols = axis(grid_hw[0]), axis(grid_hw[1])
    table = rows[:, None, :, None] & cols[None, :, None, :]
    return table[:, :, None].astype(np.float32)


def _import_protos(graph: gs.Graph, protos: Sequence[onnx.NodeProto]) -> gs.Variable:
    """Append the nodes of a decomposition (a NodeProto list) to `graph`; returns the last node's output.

    Inputs resolve to tensors already in the graph or made by earlier nodes of the list; Constant nodes
    become gs.Constant tensors.
    """
    tensors = graph.tensors()
    for proto in protos:
        if proto.op_type == "Constant":
            value = onnx.numpy_helper.to_array(proto.attribute[0].t)
            tensors[proto.output[0]] = gs.Constant(proto.output[0], value)
            continue
        outputs = [gs.Variable(name) for name in proto.output]
        tensors.update((t.name, t) for t in outputs)
        graph.nodes.append(gs.Node(op=proto.op_type, name=proto.name, attrs=_attrs(proto),
                                   inputs=[tensors[name] for name in proto.input], outputs=outputs))
    return tensors[protos[-1].output[0]]


def _attrs(proto: onnx.NodeProto) -> dict[str, Any]:
    """A NodeProto's attributes as the plain values graphsurgeon expects (str, not bytes)."""
    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode()
        return [plain(v) for v in value] if isinstance(value, list) else value

    return {a.name: plain(onnx.helper.get_attribute_value(a)) for a in proto.attribute}
