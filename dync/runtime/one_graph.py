"""The whole early-exit executor as one ONNX graph, so that a package runs in one onnxruntime call.

Each stage call costs a fixed price in onnxruntime (feeds bound, a thread pool woken, outputs copied out) and
in Python (the exit rule, compaction). Through 7 stages at batch 1 that made a package 20-40% slower at its
last exit than the plain export computing every exit in one call. Here the executor's loop is unrolled into
the graph: stage k, then its exit rule and the scatter of the leaving samples' outputs into the result, then
an `If` that ends the run when every sample has left and otherwise compacts the live tensors with `Compress`
and runs stage k+1 in its else-branch.

Semantics are the executor's (`Engine.execute`): a sample leaves at the first exit whose confidence reaches
the threshold, every sample still running takes the last exit, and each stage sees only the samples still
running. The confidence is the same float32 softmax computed by onnxruntime's kernel instead of numpy's, so
the two executors agree except where a threshold lies within a few float32 ulps of a sample's confidence
(the exit rule's docstring says the same of torch). Thresholds are an input, rounded to float32 as the exit
rule rounds them, and above 1 they become +inf (never fire).

Packages whose exits differ in per-sample shape (or whose manifest does not record it), or that hold a user
criterion graph, keep the stage-by-stage executor (`one_graph_applies`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dync.package import Manifest, live_state
from dync.plugins.splice import decompose_custom_nodes

THRESHOLDS = "dync_thresholds"
"""The graph input holding the K-1 thresholds (float32)."""
OUTPUT, EXIT = "dync_output", "dync_exit"
"""The graph outputs: every sample's exit output, in input order, and the index of the exit it took."""
MIN_OPSET = 18
"""Reductions take their axes as an input from opset 18 on, as the exit rule's nodes are written."""


def one_graph_applies(manifest: Manifest) -> bool:
    """Whether the package's executor can be one graph: more than one exit, all of one recorded per-sample
    shape, every criterion a built-in one."""
    shapes = {None if e.shape is None else tuple(e.shape[1:]) for e in manifest.exits}
    return len(manifest.stages) > 1 and len(shapes) == 1 and None not in shapes and \
        not any(e.criterion_onnx for e in manifest.exits)


class OneGraph:
    """Builds the executor graph of one package, in two forms: for any batch, and for a single sample, where
    no sample is left behind (the run ends at the first exit that fires) and so nothing is compacted and
    every shape stays static."""

    def __init__(self, package_dir: Path, manifest: Manifest,
                 prepare: Callable[[onnx.ModelProto, int | None], onnx.ModelProto] = lambda model, batch:
                 decompose_custom_nodes(model)) -> None:
        """`prepare(stage, batch)` turns each later stage's graph into the form embedded in a branch, for a
        batch of one (1) or any batch (None): with its `dync::` nodes decomposed, at least. The first stage
        stays at the top level, as it is in the package."""
        assert one_graph_applies(manifest)
        self.manifest = manifest
        self.prepare = prepare
        self.stages = [onnx.load(package_dir / s.onnx) for s in manifest.stages]
        opset = next((o.version for o in self.stages[0].opset_import if o.domain in ("", "ai.onnx")), 0)
        self.usable = opset >= MIN_OPSET
        """Whether the graph's ops can be written in the stages' opset (the exit rule needs 18's reductions)."""

    def model(self, single_sample: bool) -> onnx.ModelProto:
        stages = [self.stages[0], *(self.prepare(m, 1 if single_sample else None) for m in self.stages[1:])]
        builder = _Unrolled(self.manifest, stages, live_state(self.manifest))
        inputs = {t.name: t.name for t in self.manifest.inputs}
        if single_sample:
            nodes, (output, exits) = builder.single_sample_level(0, inputs)
        else:
            nodes, (output, exits) = builder.level(0, inputs, None, None, None)
        first = stages[0]
        graph = helper.make_graph(
            nodes,
            f"{self.manifest.name}_one_graph",
            [*_package_inputs(self.manifest, self.stages),
             helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [len(stages) - 1])],
            [helper.make_tensor_value_info(OUTPUT, builder.output_type, None),
             helper.make_tensor_value_info(EXIT, TensorProto.INT64, None)],
            builder.initializers,
        )
        graph.node.extend([helper.make_node("Identity", [output], [OUTPUT]),
                           helper.make_node("Identity", [exits], [EXIT])])
        _name_nodes(graph)
        opsets = {o.domain: o for m in stages for o in m.opset_import}
        return helper.make_model(graph, opset_imports=list(opsets.values()), ir_version=first.ir_version)


def _package_inputs(manifest: Manifest, stages: list[onnx.ModelProto]) -> list[onnx.ValueInfoProto]:
    """The package inputs, as the stages that read them declare them (a later stage may read one the first
    does not)."""
    declared = {v.name: v for model in reversed(stages) for v in model.graph.input}
    return [declared[t.name] for t in manifest.inputs]


def thresholds_feed(thresholds: np.ndarray) -> np.ndarray:
    """The exit rule's resolved thresholds (float64, float32-representable up to 1) as the graph's float32
    input, with every value above 1 as +inf so that rounding it to float32 cannot make it fire."""
    return np.where(thresholds > 1, np.inf, thresholds).astype(np.float32)


class _Unrolled:
    """Builds the nested levels: level k holds stage k's nodes, renamed apart from every other level's."""

    def __init__(self, manifest: Manifest, stages: list[onnx.ModelProto], live_after: list[set[str]]) -> None:
        self.manifest, self.stages, self.live_after = manifest, stages, live_after
        self.initializers: list[TensorProto] = []
        exit_value = next(v for v in stages[0].graph.output if v.name == manifest.stages[0].exit.output)
        self.output_type = exit_value.type.tensor_type.elem_type
        self.classes = [int(np.prod(e.shape[1:])) for e in manifest.exits]

    def level(self, k: int, names: dict[str, str], rows: str | None, output: str | None, exits: str | None
              ) -> tuple[list[onnx.NodeProto], tuple[str, str]]:
        """Nodes computing the final (output, exit) tensors from level k on, with `names` mapping each tensor
        stage k reads to its compacted name here, `rows` the input rows still running (None at level 0, with
        `output` and `exits` not yet allocated)."""
        nodes, logits, names = self._stage(k, names)
        n = _Names(k)
        if rows is None:
            nodes += [helper.make_node("Shape", [logits], [n("shape")]),
                      helper.make_node("ConstantOfShape", [n("shape")], [n("output")],
                                       value=numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(
                                           self.output_type)))),
                      helper.make_node("Shape", [logits], [n("batch")], start=0, end=1),
                      helper.make_node("ConstantOfShape", [n("batch")], [n("exits")],
                                       value=numpy_helper.from_array(np.zeros(1, np.int64))),
                      helper.make_node("Squeeze", [n("batch")], [n("count")]),
                      _constant(n("zero"), 0), _constant(n("one"), 1),
                      helper.make_node("Range", [n("zero"), n("count"), n("one")], [n("rows")])]
            rows, output, exits = n("rows"), n("output"), n("exits")
        if k == len(self.stages) - 1:
            return nodes + _scatter(n, rows, logits, output, exits, k), (n("output'"), n("exits'"))
        nodes += self._exit_rule(k, logits, n)
        nodes += [helper.make_node("Compress", [rows, n("leave")], [n("leaving")], axis=0),
                  helper.make_node("Compress", [logits, n("leave")], [n("leaving_out")], axis=0)]
        nodes += _scatter(n, n("leaving"), n("leaving_out"), output, exits, k)
        nodes += [helper.make_node("Not", [n("leave")], [n("keep")]),
                  helper.make_node("Cast", [n("keep")], [n("keep_int")], to=TensorProto.INT64),
                  helper.make_node("ReduceSum", [n("keep_int")], [n("running")], keepdims=0),
                  _constant(n("none"), 0),
                  helper.make_node("Equal", [n("running"), n("none")], [n("done")])]
        done = helper.make_graph(
            [helper.make_node("Identity", [n("output'")], [n("then_output")]),
             helper.make_node("Identity", [n("exits'")], [n("then_exits")])],
            n("all_left"), [], self._outputs(n("then_output"), n("then_exits")))
        carried = {name: f"{name}@{k + 1}" for name in self.live_after[k] if name in names}
        compact = [helper.make_node("Compress", [names[name], n("keep")], [carried[name]], axis=0)
                   for name in sorted(carried)]
        compact.append(helper.make_node("Compress", [rows, n("keep")], [n("rows_on")], axis=0))
        inner, (final_output, final_exits) = self.level(k + 1, carried, n("rows_on"), n("output'"), n("exits'"))
        go_on = helper.make_graph(compact + inner, n("continue"), [], self._outputs(final_output, final_exits))
        nodes.append(helper.make_node("If", [n("done")], [n("result"), n("result_exits")], name=n("if"),
                                      then_branch=done, else_branch=go_on))
        return nodes, (n("result"), n("result_exits"))

    def single_sample_level(self, k: int, names: dict[str, str]) -> tuple[list[onnx.NodeProto], tuple[str, str]]:
        """`level` for a batch of one: stage k, then an `If` on its exit rule whose else-branch is level k+1,
        reading stage k's tensors as they are."""
        nodes, logits, names = self._stage(k, names)
        n = _Names(k)
        nodes.append(_constant(n("exit_index"), [k]))
        if k == len(self.stages) - 1:
            return nodes, (logits, n("exit_index"))
        nodes += self._exit_rule(k, logits, n)
        nodes += [_constant(n("batch_axis"), [0]),
                  helper.make_node("Squeeze", [n("leave"), n("batch_axis")], [n("done")])]
        done = helper.make_graph(
            [helper.make_node("Identity", [logits], [n("then_output")]),
             helper.make_node("Identity", [n("exit_index")], [n("then_exits")])],
            n("left"), [], self._outputs(n("then_output"), n("then_exits")))
        inner, (final_output, final_exits) = self.single_sample_level(k + 1, names)
        go_on = helper.make_graph(inner, n("continue"), [], self._outputs(final_output, final_exits))
        nodes.append(helper.make_node("If", [n("done")], [n("result"), n("result_exits")], name=n("if"),
                                      then_branch=done, else_branch=go_on))
        return nodes, (n("result"), n("result_exits"))

    def _stage(self, k: int, names: dict[str, str]) -> tuple[list[onnx.NodeProto], str, dict[str, str]]:
        """Stage k's nodes at level k (its weights added to the graph's), its exit output's name here, and
        `names` with the tensors it writes added."""
        stage = self.manifest.stages[k]
        rename = self._renamer(k, names)
        self.initializers += [_renamed_tensor(t, rename) for t in self.stages[k].graph.initializer]
        nodes = [_renamed(node, rename, k) for node in self.stages[k].graph.node]
        return nodes, rename(stage.exit.output), {**names, **{w: rename(w) for w in stage.writes}}

    def _exit_rule(self, k: int, logits: str, n: _Names) -> list[onnx.NodeProto]:
        """`leave` [B]: whose confidence at exit k reaches its threshold."""
        return [*_confidence(self.manifest.exits[k].criterion, self.classes[k], logits, n),
                _constant(n("k"), k),
                helper.make_node("Gather", [THRESHOLDS, n("k")], [n("threshold")], axis=0),
                helper.make_node("GreaterOrEqual", [n("confidence"), n("threshold")], [n("leave")])]

    def _outputs(self, output: str, exits: str) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(output, self.output_type, None),
                helper.make_tensor_value_info(exits, TensorProto.INT64, None)]

    def _renamer(self, k: int, names: dict[str, str]) -> Callable[[str], str]:
        """Stage k's tensor names at level k: what it reads as compacted here, every other tensor, weights
        included, with the level's suffix (two stages can hold one name: a batch-independent node recomputed
        in both, or weights a backend's optimizer created in each)."""
        def rename(name: str) -> str:
            if name in names:
                return names[name]
            return name and f"{name}@{k}"
        return rename


def _renamed(node: onnx.NodeProto, rename: Callable[[str], str], k: int) -> onnx.NodeProto:
    """A copy of `node` with every tensor name (inside its subgraphs too) renamed, and its name made unique."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    _rename_node(copy, rename)
    if copy.name:
        copy.name = f"{copy.name}@{k}"
    return copy


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds in its attributes (an `If`'s branches, a `Loop`'s body)."""
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))]


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Names the executor's own nodes after their first output (`dync_exit{k}_...`), so that a profile tells
    them from the stages' nodes, which carry `@k`."""
    for node in graph.node:
        if not node.name:
            node.name = node.output[0]
        for branch in subgraphs(node):
            _name_nodes(branch)


def _renamed_tensor(tensor: TensorProto, rename: Callable[[str], str]) -> TensorProto:
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name = rename(tensor.name)
    return copy


def _rename_node(node: onnx.NodeProto, rename: Callable[[str], str]) -> None:
    node.input[:] = [rename(name) for name in node.input]
    node.output[:] = [rename(name) for name in node.output]
    for graph in subgraphs(node):
        rename_graph(graph, rename)


def rename_graph(graph: onnx.GraphProto, rename: Callable[[str], str]) -> None:
    """Every tensor name in `graph` (its values, weights and nodes, nested graphs too) through `rename`."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = rename(value.name)
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for node in graph.node:
        _rename_node(node, rename)


class _Names:
    """Level k's own tensor names."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, what: str) -> str:
        return f"dync_exit{self.k}_{what}"


def _scatter(n: _Names, rows: str, values: str, output: str, exits: str, k: int) -> list[onnx.NodeProto]:
    """`output'` and `exits'`: the result with `values` in `rows` and exit k recorded for them."""
    return [_constant(n("last_axis"), [-1]),
            helper.make_node("Unsqueeze", [rows, n("last_axis")], [n("indices")]),
            helper.make_node("ScatterND", [output, n("indices"), values], [n("output'")]),
            helper.make_node("Shape", [rows], [n("leaving_count")]),
            helper.make_node("ConstantOfShape", [n("leaving_count")], [n("exit_index")],
                             value=numpy_helper.from_array(np.array([k], dtype=np.int64))),
            helper.make_node("ScatterND", [exits, n("indices"), n("exit_index")], [n("exits'")])]


def _confidence(criterion: str, classes: int, logits: str, n: _Names) -> list[onnx.NodeProto]:
    """`confidence` [B] from exit logits as `dync.runtime.exit_rule` computes it: the float32 softmax `p` of
    the logits flattened per sample to `classes` values, then the criterion."""
    softmax = [helper.make_node("Flatten", [logits], [n("flat")], axis=1),
               helper.make_node("Cast", [n("flat")], [n("flat32")], to=TensorProto.FLOAT),
               helper.make_node("Softmax", [n("flat32")], [n("p")], axis=1),
               _constant(n("class_axis"), [1])]
    return [*softmax, *_CRITERIA[criterion if classes > 1 else f"{criterion}, one class"](classes, n)]


def _top_probability(classes: int, n: _Names) -> list[onnx.NodeProto]:
    return [helper.make_node("ReduceMax", [n("p"), n("class_axis")], [n("confidence")], keepdims=0)]


def _ones(classes: int, n: _Names) -> list[onnx.NodeProto]:
    return [helper.make_node("ReduceMax", [n("p"), n("class_axis")], [n("max")], keepdims=0),
            helper.make_node("Shape", [n("max")], [n("count")]),
            helper.make_node("ConstantOfShape", [n("count")], [n("confidence")],
                             value=numpy_helper.from_array(np.ones(1, np.float32)))]


def _entropy(classes: int, n: _Names) -> list[onnx.NodeProto]:
    """1 - H(p) / ln C, clipped to [0, 1], with 0 log 0 taken as 0."""
    return [helper.make_node("Log", [n("p")], [n("log_p")]),
            helper.make_node("Mul", [n("p"), n("log_p")], [n("p_log_p")]),
            _float(n("f0"), 0.0), _float(n("f1"), 1.0), _float(n("log_classes"), float(np.float32(np.log(classes)))),
            helper.make_node("Greater", [n("p"), n("f0")], [n("positive")]),
            helper.make_node("Where", [n("positive"), n("p_log_p"), n("f0")], [n("terms")]),
            helper.make_node("ReduceSum", [n("terms"), n("class_axis")], [n("minus_h")], keepdims=0),
            helper.make_node("Neg", [n("minus_h")], [n("h")]),
            helper.make_node("Div", [n("h"), n("log_classes")], [n("h_normalized")]),
            helper.make_node("Sub", [n("f1"), n("h_normalized")], [n("unclipped")]),
            helper.make_node("Clip", [n("unclipped"), n("f0"), n("f1")], [n("confidence")])]


def _margin(classes: int, n: _Names) -> list[onnx.NodeProto]:
    return [_constant(n("two"), [2]),
            helper.make_node("TopK", [n("p"), n("two")], [n("top"), n("top_index")], axis=1),
            helper.make_node("Split", [n("top")], [n("first"), n("second")], axis=1, num_outputs=2),
            helper.make_node("Sub", [n("first"), n("second")], [n("gap")]),
            helper.make_node("Squeeze", [n("gap"), n("class_axis")], [n("confidence")])]


_CRITERIA: dict[str, Callable[[int, _Names], list[onnx.NodeProto]]] = {
    "max_softmax": _top_probability, "max_softmax, one class": _top_probability,
    "entropy": _entropy, "entropy, one class": _ones,
    "margin": _margin, "margin, one class": _top_probability,
}
"""The built-in criteria of `dync.runtime.exit_rule.BUILTIN_CRITERIA`, as graph nodes; with one class, entropy
is 1 and margin the top probability, as there."""


def _constant(name: str, value: int | list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=np.int64)))


def _float(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=np.float32)))
