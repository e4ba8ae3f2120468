"""Repairs of known translation defects of `torch.onnx.export(dynamo=True)`, applied to the captured graph.

Each rule fixes one idiom that eager PyTorch accepts and the translation gets wrong, so that models run as
their authors wrote them; each keeps the graph's inputs, outputs and values as torch.export traced them. Each
repair is reported with the model line torch.onnx recorded for the node, and nodes keep that metadata.

* Squeeze axes (`_squeeze_as_traced`). torch.export traces a squeeze on the shapes it sees: a dim of static
  size 1 goes, a dim of another static size stays (PyTorch ignores it), and a symbolic dim (the batch, which
  torch.export assumes is not 1) stays. The translation emits an ONNX Squeeze of the listed axes, or of every
  size-1 dim at run time when none are listed, which disagrees in two idioms:
  - `torch.mean(x, dim=1).squeeze(1)` on a (B, N, C) tensor: `Squeeze(axes=[1])` of a dim C != 1, which
    onnxruntime refuses at load (`Dimension of input 1 must be 1 instead of C`);
  - `F.adaptive_avg_pool2d(x, 1).squeeze()` on (B, C, 1, 1): `Squeeze()` without axes, which also drops the
    batch axis when it is 1, i.e. on a batch of one sample and on every stage that runs on one sample after
    the runtime compacted the batch.
  The rule lists the axes torch.export squeezed (the dims of static size 1), checked against the rank torch.onnx
  declared for the output where it declared one, and turns a Squeeze left with no axes into an Identity. A
  tensor with a dim of unknown size is left alone.
* Scatter mean (`_scatter_mean`). `x.scatter_reduce(dim, index, src, reduce="mean")` (ToMe's token merging)
  is translated as `ScatterElements(reduction="none")`: each target gets one of its sources instead of their
  mean. The node is recognized by the FX node torch.onnx recorded for it (`aten.scatter_reduce.two` with
  `mean`, writing this very value) and rewritten as the mean it is: sources summed in by `ScatterElements(
  reduction="add")`, divided by how many values each target received (itself too, unless `include_self=False`,
  for which the translation has already zeroed the targets), at least 1. Floating-point data only.
* Antialiased resize by a factor (`_antialias_scales`). `F.interpolate(x, scale_factor=s, mode="bilinear" or
  "bicubic", antialias=True)` is translated as a Resize to the output size, but PyTorch maps coordinates and
  sizes its filter by `s` itself, not by output size / input size (0.6 on 6 pixels gives 3, and a filter for
  0.6, not 0.5). The Resize, recognized by its FX node (`_upsample_*2d_aa` with scales, writing this value),
  gets the scales instead of the sizes, once `floor(input size * s)` is checked to give the same output size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.graph import Builder, constant, export_graph, import_graph, shape_of, source_line

FX_NODE_KEY = "pkg.torch.onnx.fx_node"

Rule = Callable[[gs.Graph, gs.Node, dict[str, str]], str | None]
"""Rewrites one node (given its graph and the metadata torch.onnx recorded for it) in place if it shows the
rule's defect; says what it did, or None."""


def repair_translation_defects(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with every known defect repaired, and one line per repair naming the node and its model line."""
    graph = import_graph(model, infer_shapes=True)
    originals = {node.name: node for node in model.graph.node if node.name}
    repaired = []
    for node in list(graph.nodes):
        original = originals.get(node.name)
        metadata = {p.key: p.value for p in original.metadata_props} if original is not None else {}
        what = next((what for rule in RULES if (what := rule(graph, node, metadata)) is not None), None)
        if what is not None:
            where = source_line(original) if original is not None else ""
            repaired.append(f"{node.name}{f' ({where})' if where else ''}: {what}")
    if not repaired:
        return model, []
    graph.cleanup().toposort()
    fixed = export_graph(graph, like=model)
    for node in fixed.graph.node:  # graphsurgeon drops node metadata; verification reads the source lines in it
        if node.name in originals:
            node.metadata_props.extend(originals[node.name].metadata_props)
    return fixed, repaired


def _squeeze_as_traced(graph: gs.Graph, node: gs.Node, metadata: dict[str, str]) -> str | None:
    """Make a Squeeze remove exactly the axes torch.export squeezed: those of static size 1."""
    if node.op != "Squeeze":
        return None
    shape = shape_of(node.inputs[0])
    if shape is None or any(d is None for d in shape):
        return None
    rank = len(shape)
    listed = len(node.inputs) > 1 and bool(node.inputs[1].name)
    axes = constant(node.inputs[1]) if listed else np.arange(rank)
    if axes is None:
        return None
    asked = sorted({int(a) % rank for a in axes.reshape(-1)})
    traced = [a for a in asked if shape[a] == 1]
    if traced == asked and (listed or all(isinstance(d, int) for d in shape)):
        return None
    declared = shape_of(node.outputs[0])
    if declared is not None and len(declared) != rank - len(traced):
        return None
    if traced:
        axes_input = gs.Constant(f"{node.name}/axes", np.asarray(traced, dtype=np.int64))
        if listed:
            node.inputs[1] = axes_input
        else:
            node.inputs.append(axes_input)
    else:
        node.op = "Identity"
        if listed:
            node.inputs.pop()
    kept = sorted(set(asked) - set(traced))
    now = f"now squeezes axes {traced}" if traced else "became an Identity"
    if listed:
        return f"Squeeze of axes {asked} also removed {kept}, which torch.export kept (not of static size 1); it {now}"
    symbolic = [a for a in kept if not isinstance(shape[a], int)]
    return (f"Squeeze without axes of a [{', '.join(map(str, shape))}] tensor would also remove axes {symbolic} "
            f"whenever they are 1 at run time (a batch of one); it {now}")


_SCATTER_MEAN = re.compile(r"^%(\S+) : .*target=torch\.ops\.aten\.scatter_reduce\.two\]"
                           r"\(args = \(.*, mean\), kwargs = \{(.*)\}\)$", re.DOTALL)


def _scatter_mean(graph: gs.Graph, node: gs.Node, metadata: dict[str, str]) -> str | None:
    """Rewrite the translation of a `scatter_reduce(..., reduce="mean")` as sum / count."""
    if node.op != "ScatterElements" or node.attrs.get("reduction", "none") != "none":
        return None
    match = _SCATTER_MEAN.match(metadata.get(FX_NODE_KEY, ""))
    base, index, src = node.inputs
    out = node.outputs[0]
    floating = base.dtype is not None and np.issubdtype(base.dtype, np.floating)
    if match is None or not _writes(node, match.group(1)) or not floating:
        return None
    include_self = "include_self: False" not in match.group(2)
    axis = node.attrs.get("axis", 0)
    node.outputs.clear()
    b = Builder(graph.nodes, f"{node.name}/mean/")
    sums = b.op("ScatterElements", "sums", [base, index, src], axis=axis, reduction="add")
    ones = b.op("Expand", "ones", [b.const("one", 1, base.dtype), b.op("Shape", "src_shape", [src])])
    start = b.op("Expand", "start", [b.const("self_count", int(include_self), base.dtype),
                                     b.op("Shape", "base_shape", [base])])
    counts = b.op("ScatterElements", "counts", [start, index, ones], axis=axis, reduction="add")
    b.op("Div", "mean", [sums, b.op("Max", "at_least_one", [counts, b.const("floor", 1, base.dtype)])], out=out)
    return ("ScatterElements without a reduction stood for scatter_reduce(reduce='mean') and kept one source per "
            f"target; it is now the sum of the sources{' and the target' if include_self else ''} over their count")


_ANTIALIAS = re.compile(r"^%(\S+) : .*target=torch\.ops\.aten\._upsample_(?:bilinear|bicubic)2d_aa\.default\]"
                        r"\(args = \(%\S+, \[(\d+), (\d+)\], False, ([^,\s]+), ([^,\s]+)\), kwargs = \{\}\)$",
                        re.DOTALL)


def _antialias_scales(graph: gs.Graph, node: gs.Node, metadata: dict[str, str]) -> str | None:
    """Resize an antialiased interpolation by the factors the model gave, as PyTorch does, not to the size."""
    if node.op != "Resize" or not node.attrs.get("antialias") or len(node.inputs) != 4 or node.inputs[2].name:
        return None
    match = _ANTIALIAS.match(metadata.get(FX_NODE_KEY, ""))
    shape = shape_of(node.inputs[0])
    if match is None or not _writes(node, match.group(1)) or shape is None or len(shape) != 4:
        return None
    size, factors = [int(match.group(2)), int(match.group(3))], [match.group(4), match.group(5)]
    try:
        scales = [float(f) for f in factors]
    except ValueError:  # None: PyTorch itself resizes to the size then
        return None
    if [math.floor(d * s) if isinstance(d, int) else None for d, s in zip(shape[2:], scales, strict=True)] != size:
        return None
    node.inputs[2] = gs.Constant(f"{node.name}/scales", np.asarray([1.0, 1.0, *scales], dtype=np.float32))
    node.inputs.pop()
    return (f"antialiased Resize to the size {size} now resizes by the model's factors {scales}, which set "
            "PyTorch's filter and coordinates")


def _writes(node: gs.Node, fx_name: str) -> bool:
    """Whether `node` writes the value of FX node `fx_name` (torch.onnx names that value, unless it is a graph
    output, and its node after it), not a helper node of the same translation."""
    return node.outputs[0].name == fx_name or node.name == f"node_{fx_name}"


RULES: tuple[Rule, ...] = (_squeeze_as_traced, _scatter_mean, _antialias_scales)
