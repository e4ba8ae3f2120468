"""`If` branches as models of their own, and back in their place.

onnxruntime's graph optimizer (its NCHWc layout and the fusions after it) and its static quantizer work on a
graph's top level only, but a spatial block's convolutions all live in the branches of its `If` (the dense
form and the gather-scatter form). So what is done to a branch is done to it as a standalone model: the
outer tensors it reads become inputs (typed by shape inference), the outer weights it reads initializers;
the result goes back into the `If` with every name the transform made renamed under the branch's prefix,
since one graph's scope must not define a name twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import onnx

from dync.runtime.one_graph import rename_graph, subgraphs


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes, outermost first."""
    graphs = [graph]
    for node in graph.node:
        for branch in subgraphs(node):
            graphs += all_graphs(branch)
    return graphs


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of `graph` and of the graphs nested in it."""
    return [node for g in all_graphs(graph) for node in g.node]


def has_branches(graph: onnx.GraphProto) -> bool:
    return any(node.op_type == "If" for node in graph.node)


def prefix_made_names(made: onnx.GraphProto, original: onnx.GraphProto, prefix: str) -> None:
    """Every node and tensor name in `made` (a transform of `original`: optimized, quantized) that `original`
    does not have, renamed under `prefix`, in place: a transform names what it creates alike in every graph
    it is given, and graphs that end up in one model must not define a name twice."""
    graphs = all_graphs(original)
    kept = {v.name for g in graphs for v in [*g.input, *g.output]} | {t.name for g in graphs for t in g.initializer}
    kept |= {name for node in all_nodes(original) for name in [*node.input, *node.output]}
    node_names = {node.name for node in all_nodes(original)}
    rename_graph(made, lambda name: name if not name or name in kept else prefix + name)
    for node in all_nodes(made):
        if node.name not in node_names:
            node.name = prefix + node.name


@dataclass(frozen=True)
class Branch:
    """One branch of a top-level `If`: where it is (`key`: node and attribute), the attribute holding it,
    and the outer values it reads."""

    key: str
    attribute: onnx.AttributeProto
    outer_values: list[str]


def _outer_names(branch: onnx.GraphProto) -> list[str]:
    inner = {name for node in all_nodes(branch) for name in node.output} | {t.name for t in branch.initializer}
    return sorted({name for node in all_nodes(branch) for name in node.input if name and name not in inner})


class Branches:
    """The branches of a model's `If` nodes, each with what it takes to stand alone."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graphs = all_graphs(onnx.shape_inference.infer_shapes(model).graph)
        self._types = {v.name: v for graph in graphs for v in [*graph.value_info, *graph.input, *graph.output]}
        self._weights = {t.name: t for graph in all_graphs(model.graph) for t in graph.initializer}

    def top_level(self) -> Iterator[Branch]:
        """The branches of the top-level `If` nodes whose outer values all have inferred types."""
        for node in self.model.graph.node:
            if node.op_type != "If":
                continue
            for attribute in node.attribute:
                branch = self._branch(node, attribute)
                if branch is not None:
                    yield branch

    def _branch(self, node: onnx.NodeProto, attribute: onnx.AttributeProto) -> Branch | None:
        values = [name for name in _outer_names(attribute.g) if name not in self._weights]
        if any(name not in self._types or not self._types[name].type.HasField("tensor_type") for name in values):
            return None
        return Branch(f"{node.name or node.output[0]}/{attribute.name}", attribute, values)

    def standalone(self, branch: Branch) -> onnx.ModelProto:
        """The branch as a model: its outer values as inputs, the outer weights it reads as initializers."""
        graph = branch.attribute.g
        read_weights = [self._weights[name] for name in _outer_names(graph) if name in self._weights]
        return onnx.helper.make_model(
            onnx.helper.make_graph(list(graph.node), graph.name or "branch",
                                   [self._types[name] for name in branch.outer_values], list(graph.output),
                                   [*graph.initializer, *read_weights]),
            opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)

    def put_back(self, branch: Branch, standalone: onnx.ModelProto, transformed: onnx.ModelProto) -> None:
        """`transformed` (made from `standalone`) in the branch's place: the names it made renamed under the
        branch's key, its inputs dropped (they are the outer values again), its opsets declared."""
        result = onnx.GraphProto()
        result.CopyFrom(transformed.graph)
        prefix_made_names(result, standalone.graph, f"{branch.key}/")
        del result.input[:]
        del result.value_info[:]
        declared = {o.domain for o in self.model.opset_import}
        self.model.opset_import.extend(o for o in transformed.opset_import if o.domain not in declared)
        branch.attribute.g.CopyFrom(result)

    def drop_unused_weights(self) -> None:
        """Top-level weights no node reads any more (a branch now holds its own copy, transformed)."""
        used = {name for node in all_nodes(self.model.graph) for name in node.input}
        kept = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)


def transform_branches(model: onnx.ModelProto, transform: Callable[[onnx.ModelProto, str], onnx.ModelProto]
                       ) -> onnx.ModelProto:
    """`model` with each top-level `If` branch replaced by `transform(branch as a model, its key)`, in place."""
    branches = Branches(model)
    for branch in list(branches.top_level()):
        standalone = branches.standalone(branch)
        branches.put_back(branch, standalone, transform(standalone, branch.key))
    branches.drop_unused_weights()
    return model
