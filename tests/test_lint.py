"""The TensorRT lint: op support, types, opset, restriction rules, dync plugin ops, and a real package end to end."""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.shape_inference import InferenceError

import dync
from dync.errors import DyncError, InputError, LintError, PackageError
from dync.lint import (
    CHECK_BY_HAND,
    CUSTOM_OP,
    DYNC_PLUGIN,
    ERROR,
    FP32_LAYERS,
    NOTE,
    OPSET,
    PLUGINS_DECOMPOSED,
    RESTRICTION,
    RULES,
    TENSORRT_VERSION,
    TYPE,
    UNKNOWN_OP,
    UNSUPPORTED_OP,
    Finding,
    LintReport,
    format_lint,
    lint_model,
    lint_package,
    load_operator_facts,
)
from dync.package import load_manifest
from dync.plugins.op_registry import Face, OpRecord, OpRegistry
from dync.plugins.op_registry import registry as REAL_REGISTRY
from tests.conftest import invoke
from tests.helpers import rehash
from zoo.multi_exit import SingleExitNet

F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


@pytest.fixture(scope="module")
def facts():
    return load_operator_facts()


# --------------------------------------------------------------------------- #
# A private plugin-op registry, so that no test depends on dync's real op families
# --------------------------------------------------------------------------- #


def _relu(builder: Any, inputs: list[Any], outputs: list[Any], **attrs: Any) -> None:
    builder.op("Relu", "relu", [inputs[0]], out=outputs[0])


def _scatter_add(builder: Any, inputs: list[Any], outputs: list[Any], **attrs: Any) -> None:
    """Adds updates (input 1) into element 0 of the data (input 0): ScatterND with a reduction TensorRT lacks."""
    indices = builder.const("indices", [[0]])
    builder.op("ScatterND", "scatter", [inputs[0], indices, inputs[1]], out=outputs[0], reduction="add")


def _no_macs(*shapes: Any, **attrs: Any) -> int:
    return 0


PRIVATE_OPS = OpRegistry([
    OpRecord(name="TrtRelu", decompose=_relu, macs=_no_macs, tensorrt=Face("tests.no_such_module", "register")),
    OpRecord(name="PortableRelu", decompose=_relu, macs=_no_macs),
    OpRecord(name="PortableScatterAdd", decompose=_scatter_add, macs=_no_macs),
])


@pytest.fixture(autouse=True)
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """`registry()` gives PRIVATE_OPS wherever the lint and the splicing look it up."""
    for module in ("dync.plugins.op_registry", "dync.plugins.splice", "dync.lint.custom_ops", "dync.lint.forms",
                   "dync.build.forms"):
        monkeypatch.setattr(importlib.import_module(module), "registry", lambda: PRIVATE_OPS)


# --------------------------------------------------------------------------- #
# Building tiny graphs
# --------------------------------------------------------------------------- #


@dataclass
class Graph:
    """One or more nodes over typed graph inputs; outputs are typed by shape inference inside the lint."""

    nodes: list[onnx.NodeProto]
    inputs: dict[str, tuple[int, Sequence[int | str]]]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 20
    output_types: dict[str, int] = field(default_factory=dict)
    """Element types declared for graph outputs (splicing in a decomposition needs them)."""

    def model(self) -> onnx.ModelProto:
        produced = {o for n in self.nodes for o in n.output if o}
        consumed = {i for n in self.nodes for i in n.input}
        outputs = sorted(produced - consumed)
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(name, t, list(shape)) for name, (t, shape) in self.inputs.items()],
            [helper.make_tensor_value_info(name, self.output_types[name], None) if name in self.output_types
             else helper.make_empty_tensor_value_info(name) for name in outputs],
            initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in self.initializers.items()],
        )
        domains = {n.domain for n in self.nodes} - {""}
        opsets = [helper.make_opsetid("", self.opset), *(helper.make_opsetid(d, 1) for d in sorted(domains))]
        return helper.make_model(graph, opset_imports=opsets)


def node(op: str, inputs: Sequence[str], outputs: Sequence[str] = ("y",), **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=f"n_{op}", **attrs)


def image(t: int = F32) -> dict[str, tuple[int, Sequence[int | str]]]:
    return {"x": (t, ["batch", 3, 8, 8])}


def codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return sorted((f.severity, f.code) for f in findings)


# --------------------------------------------------------------------------- #
# Facts
# --------------------------------------------------------------------------- #


def test_shipped_facts_load_and_fix_upstream_typos(facts) -> None:
    assert facts.tensorrt_version == "10.0" and (facts.opset_min, facts.opset_max) == (9, 20)
    assert facts.operators["Conv"].types == {"FP32", "FP16", "BF16"}
    assert "INT64" in facts.operators["ConstantOfShape"].types  # "INF64" upstream
    assert "" not in facts.operators["Selu"].types
    assert "<br />" not in facts.operators["Resize"].restrictions


@pytest.mark.parametrize("content", [None, "{not json", '{"operators": {}}'])
def test_bad_facts_file_is_a_lint_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "facts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LintError, match=str(path)):
        load_operator_facts(path)


def test_facts_from_an_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"operators": {"Relu": {"supported": True, "types": ["FP16"], "restrictions": ""}},
                                "opset_min": 13, "opset_max": 17, "tensorrt_version": "9.9"}))
    facts = load_operator_facts(path)
    assert facts.tensorrt_version == "9.9"
    found = lint_model(Graph([node("Relu", ["x"])], image()).model(), facts)
    assert codes(found) == [(ERROR, OPSET), (ERROR, TYPE)]  # opset 20 > 17; FP32 not in [FP16]


# --------------------------------------------------------------------------- #
# Support, types, opset
# --------------------------------------------------------------------------- #

CASES = {
    "supported op": (Graph([node("Relu", ["x"])], image()), []),
    "supported op without restrictions": (
        Graph([node("Conv", ["x", "w"], kernel_shape=[3, 3])], image(), {"w": np.zeros((4, 3, 3, 3), np.float32)}),
        [],
    ),
    "unsupported op": (
        Graph([node("Compress", ["x", "c"], axis=0)], {"x": (F32, [4, 3]), "c": (BOOL, [4])}),
        [(ERROR, UNSUPPORTED_OP)],
    ),
    "unknown op": (Graph([node("FancyOp", ["x"])], image()), [(ERROR, UNKNOWN_OP)]),
    "custom-domain op": (
        Graph([helper.make_node("GatherConv", ["x"], ["y"], name="gc", domain="dync",
                                plugin_version="1", plugin_namespace="dync")], image()),
        [(ERROR, CUSTOM_OP)],
    ),
    "type not in the op's types": (
        Graph([node("MatMul", ["a", "b"])], {"a": (TensorProto.INT32, [2, 3]), "b": (TensorProto.INT32, [3, 2])}),
        [(ERROR, TYPE)],
    ),
    "FP64 data": (Graph([node("Relu", ["x"])], image(TensorProto.DOUBLE)), [(ERROR, TYPE)]),
    "index inputs are not type-checked": (
        Graph([node("Gather", ["x", "i"], axis=1)], {"x": (F32, [2, 5]), "i": (I64, [3])}),
        [],
    ),
    "Where checks X, not the BOOL condition": (
        Graph([node("Where", ["c", "a", "b"])], {"c": (BOOL, [4]), "a": (F32, [4]), "b": (F32, [4])}),
        [],
    ),
    "ConstantOfShape checks its value, not its shape input": (
        Graph([node("ConstantOfShape", ["s"], value=numpy_helper.from_array(np.array([1], np.int64)))],
              {"s": (I64, [2])}),
        [],
    ),
    "Cast checks its output type": (
        Graph([node("Cast", ["x"], to=TensorProto.DOUBLE)], image()),
        [(ERROR, TYPE)],
    ),
    "NonZero takes FP32/FP16 only": (Graph([node("NonZero", ["m"])], {"m": (BOOL, [4, 4])}), [(ERROR, TYPE)]),
    "opset above the range": (Graph([node("Relu", ["x"])], image(), opset=21), [(ERROR, OPSET)]),
    "opset below the range": (Graph([node("Relu", ["x"])], image(), opset=8), [(ERROR, OPSET)]),
    "opset at the low end": (Graph([node("Relu", ["x"])], image(), opset=9), []),
}


@pytest.mark.parametrize("graph, expected", CASES.values(), ids=CASES.keys())
def test_support_types_and_opset(facts, graph: Graph, expected: list[tuple[str, str]]) -> None:
    found = lint_model(graph.model(), facts, stage="s0")
    assert codes(found) == sorted(expected), [f.message for f in found]
    for finding in found:
        assert finding.stage == "s0"
        assert finding.message.endswith(".") and finding.message.count(";") == 1


def test_custom_op_names_its_domain_and_plugin(facts) -> None:
    graph = CASES["custom-domain op"][0]
    (finding,) = lint_model(graph.model(), facts)
    assert finding.op == "dync::GatherConv" and finding.node == "gc"
    assert "plugin registered as 'GatherConv'" in finding.message and "namespace 'dync'" in finding.message


def test_type_error_names_the_tensor_and_allowed_types(facts) -> None:
    (finding,) = lint_model(CASES["type not in the op's types"][0].model(), facts)
    assert "input 'a' of type INT32" in finding.message and "BF16/FP16/FP32" in finding.message


def test_nodes_inside_subgraphs_are_linted(facts) -> None:
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["u"], name="inner")], "b", [],
                               [helper.make_tensor_value_info("u", F32, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["v"], name="id")], "e", [],
                              [helper.make_tensor_value_info("v", F32, None)])
    graph = Graph([node("If", ["c"], then_branch=branch, else_branch=other)], {"c": (BOOL, []), "x": (F32, [4])})
    found = [f for f in lint_model(graph.model(), facts) if f.code == UNSUPPORTED_OP]
    assert [(f.node, f.op) for f in found] == [("n_If/then_branch/inner", "Unique")]


def test_model_that_shape_inference_rejects_is_linted_as_is(facts) -> None:
    model = Graph([helper.make_node("Foo", ["x"], ["y"], name="foo", domain="acme")], image()).model()
    del model.opset_import[1:]  # no opset import for acme
    with pytest.raises(InferenceError):
        onnx.shape_inference.infer_shapes(model)
    assert codes(lint_model(model, facts)) == [(ERROR, CUSTOM_OP)]


# --------------------------------------------------------------------------- #
# dync plugin ops: a TensorRT plugin, or the portable decomposition linted instead
# --------------------------------------------------------------------------- #


def _dync_node(op: str, inputs: Sequence[str], domain: str = "dync") -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), ["y"], name="p", domain=domain, plugin_version="1",
                            plugin_namespace="dync")


def test_dync_op_with_a_tensorrt_plugin_is_a_note(facts) -> None:
    (finding,) = lint_model(Graph([_dync_node("TrtRelu", ["x"])], image()).model(), facts)
    assert (finding.severity, finding.code, finding.node, finding.op) == (NOTE, DYNC_PLUGIN, "p", "dync::TrtRelu")
    assert "plugin 'dync::TrtRelu' (version 1, namespace 'dync')" in finding.message
    assert "TensorRT >= 10.9" in finding.message and "10.3" in finding.message
    assert finding.message.endswith(".") and finding.message.count(";") == 1


@pytest.mark.parametrize(("attrs", "asked"), [
    ({"plugin_version": "2", "plugin_namespace": "dync"}, "'2' in namespace 'dync'"),
    ({}, "'1' in namespace ''"),
])
def test_dync_node_asking_for_another_plugin_version_or_namespace_is_an_error(facts, attrs: dict, asked: str) -> None:
    """TensorRT finds plugins by (op, version, namespace), with version "1" and namespace "" by default."""
    node = helper.make_node("TrtRelu", ["x"], ["y"], name="p", domain="dync", **attrs)
    (finding,) = lint_model(Graph([node], image()).model(), facts)
    assert (finding.severity, finding.code, finding.op) == (ERROR, CUSTOM_OP, "dync::TrtRelu")
    assert f"asks TensorRT for plugin TrtRelu version {asked}" in finding.message
    assert "dync registers version '1' in namespace 'dync'; re-export" in finding.message


def test_dync_op_without_a_tensorrt_plugin_is_linted_through_its_decomposition(facts) -> None:
    graph = Graph([_dync_node("PortableScatterAdd", ["x", "u"])], {"x": (F32, [4]), "u": (F32, [1])},
                  output_types={"y": F32})
    found = lint_model(graph.model(), facts)
    assert [(f.severity, f.code, f.node, f.op) for f in found] == [(ERROR, RESTRICTION, "p/scatter", "ScatterND")]
    assert "reduction='add'" in found[0].message


def test_decomposition_into_supported_ops_is_clean(facts) -> None:
    graph = Graph([_dync_node("PortableRelu", ["x"])], image(), output_types={"y": F32})
    assert lint_model(graph.model(), facts) == []


def test_decomposition_needs_typed_graph_outputs(facts) -> None:
    with pytest.raises(LintError, match=r"stage 's0' cannot have its dync ops PortableRelu replaced .*element type"):
        lint_model(Graph([_dync_node("PortableRelu", ["x"])], image()).model(), facts, stage="s0")


@pytest.mark.parametrize("domain, op", [("dync", "NoSuchOp"), ("acme", "TrtRelu")])
def test_unknown_dync_op_and_other_domains_are_errors(facts, domain: str, op: str) -> None:
    (finding,) = lint_model(Graph([_dync_node(op, ["x"], domain)], image()).model(), facts)
    assert (finding.severity, finding.code, finding.op) == (ERROR, CUSTOM_OP, f"{domain}::{op}")


# --------------------------------------------------------------------------- #
# Restriction rules: each passing and failing
# --------------------------------------------------------------------------- #


def _resize(**attrs: Any) -> Graph:
    scales = np.array([1, 1, 2, 2], np.float32)
    return Graph([node("Resize", ["x", "", "scales"], **attrs)], image(), {"scales": scales})


def _resize_axes(axes: list[int]) -> Graph:
    return Graph([node("Resize", ["x", "", "scales"], axes=axes)], image(),
                 {"scales": np.ones(len(axes), np.float32)})


def _axes_input(op: str, index: int, constant: bool, **attrs: Any) -> Graph:
    """`op` with its axes-like input at `index` given as an initializer or as a graph input (run-time value)."""
    names = ["x", *[f"in{i}" for i in range(1, index)], "axes"]
    inputs: dict[str, tuple[int, Sequence[int | str]]] = {"x": (F32, [2, 1, 4, 4])}
    inits: dict[str, np.ndarray] = {f"in{i}": np.array([0], np.int64) for i in range(1, index)}
    if op == "Pad":
        inits["in1"] = np.array([0, 0, 1, 1], np.int64)
    if constant:
        inits["axes"] = np.array([1] if op != "Pad" else [2, 3], np.int64)
    else:
        inputs["axes"] = (I64, [1 if op != "Pad" else 2])
    return Graph([node(op, names, **attrs)], inputs, inits)


def _topk(k: int | None, **attrs: Any) -> Graph:
    inputs: dict[str, tuple[int, Sequence[int | str]]] = {"x": (F32, [2, 5000])}
    inits = {} if k is None else {"k": np.array([k], np.int64)}
    if k is None:
        inputs["k"] = (I64, [1])
    return Graph([node("TopK", ["x", "k"], ["v", "i"], **attrs)], inputs, inits)


def _maxpool(outputs: Sequence[str] = ("y",), **attrs: Any) -> Graph:
    return Graph([node("MaxPool", ["x"], outputs, **attrs)], image())


def _if(then_out: tuple[str, list[int]], else_out: tuple[str, list[int]]) -> Graph:
    def branch(name: str, shape: list[int]) -> onnx.GraphProto:
        value = numpy_helper.from_array(np.zeros(shape, np.float32))
        return helper.make_graph([helper.make_node("Constant", [], [name], value=value)], "b", [],
                                 [helper.make_tensor_value_info(name, F32, shape)])

    return Graph([node("If", ["c"], then_branch=branch(*then_out), else_branch=branch(*else_out))],
                 {"c": (BOOL, [])})


def _dropout(training: bool | None) -> Graph:
    inputs: dict[str, tuple[int, Sequence[int | str]]] = {"x": (F32, [4])}
    inits = {"ratio": np.array(0.5, np.float32)}
    if training is None:
        inputs["t"] = (BOOL, [])
    else:
        inits["t"] = np.array(training)
    return Graph([node("Dropout", ["x", "ratio", "t"])], inputs, inits)


def _dequantize(zero_point: int) -> Graph:
    inits = {"s": np.array(0.1, np.float32), "z": np.array(zero_point, np.int8)}
    return Graph([node("DequantizeLinear", ["q", "s", "z"])], {"q": (TensorProto.INT8, [4])}, inits)


def _lstm(**attrs: Any) -> Graph:
    inits = {"w": np.zeros((1, 16, 3), np.float32), "r": np.zeros((1, 16, 4), np.float32)}
    return Graph([node("LSTM", ["x", "w", "r"], ["", "h"], hidden_size=4, **attrs)], {"x": (F32, [5, 2, 3])}, inits)


def _squeeze_constant_node(op: str) -> Graph:
    axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64)))
    return Graph([axes, node(op, ["x", "axes"])], {"x": (F32, [2, 1, 4])})


RULE_CASES: dict[str, tuple[Graph, list[tuple[str, str]]]] = {
    "Resize nearest/asymmetric passes": (_resize(mode="nearest", coordinate_transformation_mode="asymmetric",
                                                 nearest_mode="floor"), []),
    "Resize defaults pass": (_resize(), []),
    "Resize cubic fails": (_resize(mode="cubic"), [(ERROR, RESTRICTION)]),
    "Resize tf_crop_and_resize fails": (_resize(coordinate_transformation_mode="tf_crop_and_resize"),
                                        [(ERROR, RESTRICTION)]),
    "Resize antialias fails": (_resize(mode="linear", antialias=1), [(ERROR, RESTRICTION)]),
    "Resize aspect policy fails": (_resize(keep_aspect_ratio_policy="not_larger"), [(ERROR, RESTRICTION)]),
    "Resize iota axes pass": (_resize_axes([0, 1, 2, 3]), []),
    "Resize partial axes fail": (_resize_axes([2, 3]), [(ERROR, RESTRICTION)]),
    "ReduceMean constant axes pass": (_axes_input("ReduceMean", 1, True), []),
    "ReduceMean run-time axes fail": (_axes_input("ReduceMean", 1, False), [(ERROR, RESTRICTION)]),
    "ReduceSum run-time axes fail": (_axes_input("ReduceSum", 1, False), [(ERROR, RESTRICTION)]),
    "ReduceMean without axes passes": (Graph([node("ReduceMean", ["x"])], image()), []),
    "Slice constant axes pass": (_axes_input("Slice", 3, True), []),
    "Slice run-time axes fail": (_axes_input("Slice", 3, False), [(ERROR, RESTRICTION)]),
    "Pad constant axes pass": (_axes_input("Pad", 3, True), []),
    "Pad run-time axes fail": (_axes_input("Pad", 3, False), [(ERROR, RESTRICTION)]),
    "Squeeze Constant-node axes pass": (_squeeze_constant_node("Squeeze"), []),
    "Squeeze run-time axes fail": (_axes_input("Squeeze", 1, False), [(ERROR, RESTRICTION)]),
    "Unsqueeze Constant-node axes pass": (_squeeze_constant_node("Unsqueeze"), []),
    "Unsqueeze run-time axes fail": (_axes_input("Unsqueeze", 1, False), [(ERROR, RESTRICTION)]),
    "CumSum constant axis passes": (_axes_input("CumSum", 1, True), []),
    "CumSum run-time axis fails": (_axes_input("CumSum", 1, False), [(ERROR, RESTRICTION)]),
    "TopK small constant K passes": (_topk(5), []),
    "TopK large K fails": (_topk(4000), [(ERROR, RESTRICTION)]),
    "TopK unsorted fails": (_topk(5, sorted=0), [(ERROR, RESTRICTION)]),
    "TopK run-time K is a note": (_topk(None), [(NOTE, RESTRICTION)]),
    "MaxPool 2D passes": (_maxpool(kernel_shape=[2, 2]), []),
    "MaxPool 1D fails": (Graph([node("MaxPool", ["x"], kernel_shape=[2])], {"x": (F32, [1, 3, 8])}),
                         [(ERROR, RESTRICTION)]),
    "MaxPool dilation fails": (_maxpool(kernel_shape=[2, 2], dilations=[2, 2]), [(ERROR, RESTRICTION)]),
    "MaxPool indices fail": (_maxpool(("y", "idx"), kernel_shape=[2, 2]), [(ERROR, RESTRICTION)]),
    "AveragePool 2D passes": (Graph([node("AveragePool", ["x"], kernel_shape=[2, 2])], image()), []),
    "AveragePool dilation fails": (Graph([node("AveragePool", ["x"], kernel_shape=[2, 2], dilations=[1, 2])],
                                         image()), [(ERROR, RESTRICTION)]),
    "ScatterND without reduction passes": (
        Graph([node("ScatterND", ["x", "i", "u"])], {"x": (F32, [4]), "i": (I64, [1, 1]), "u": (F32, [1])}), []),
    "ScatterND reduction fails": (
        Graph([node("ScatterND", ["x", "i", "u"], reduction="add")],
              {"x": (F32, [4]), "i": (I64, [1, 1]), "u": (F32, [1])}),
        [(ERROR, RESTRICTION)],
    ),
    "If distinct names and equal ranks pass": (_if(("a", [2]), ("b", [3])), []),
    "If same output names fail": (_if(("a", [2]), ("a", [2])), [(ERROR, RESTRICTION)]),
    "If different ranks fail": (_if(("a", [2]), ("b", [2, 2])), [(ERROR, RESTRICTION)]),
    "Constant tensor passes": (Graph([node("Constant", [], value=numpy_helper.from_array(np.ones(2, np.float32)))],
                                     {}), []),
    "Constant string fails": (Graph([node("Constant", [], value_string="hi")], {}),
                              [(ERROR, RESTRICTION), (ERROR, TYPE)]),  # the STRING output is not a TensorRT type
    "Dropout inference passes": (_dropout(False), []),
    "Dropout training fails": (_dropout(True), [(ERROR, RESTRICTION)]),
    "Dropout run-time mode fails": (_dropout(None), [(ERROR, RESTRICTION)]),
    "DequantizeLinear zero point 0 passes": (_dequantize(0), []),
    "DequantizeLinear zero point 3 fails": (_dequantize(3), [(ERROR, RESTRICTION)]),
    "LayerNormalization Y only passes": (
        Graph([node("LayerNormalization", ["x", "g"])], {"x": (F32, [2, 4])}, {"g": np.ones(4, np.float32)}), []),
    "LayerNormalization mean output fails": (
        Graph([node("LayerNormalization", ["x", "g"], ["y", "mean"])], {"x": (F32, [2, 4])},
              {"g": np.ones(4, np.float32)}),
        [(ERROR, RESTRICTION)],
    ),
    "GridSample 4D passes": (Graph([node("GridSample", ["x", "grid"])],
                                   {**image(), "grid": (F32, ["batch", 4, 4, 2])}), []),
    "GridSample 5D fails": (Graph([node("GridSample", ["x", "grid"])],
                                  {"x": (F32, [1, 1, 4, 4, 4]), "grid": (F32, [1, 2, 2, 2, 3])}),
                            [(ERROR, RESTRICTION)]),
    "LSTM defaults pass": (_lstm(), []),
    "LSTM layout 1 fails": (_lstm(layout=1), [(ERROR, RESTRICTION)]),
}


@pytest.mark.parametrize("graph, expected", RULE_CASES.values(), ids=RULE_CASES.keys())
def test_restriction_rules(facts, graph: Graph, expected: list[tuple[str, str]]) -> None:
    found = lint_model(graph.model(), facts)
    assert codes(found) == sorted(expected), [f.message for f in found]


def test_every_rule_quotes_its_restriction(facts) -> None:
    for op, rule in RULES.items():
        assert facts.operators[op].restrictions, f"{op} has a rule but no restriction text"
        assert rule.__doc__ and '"' in rule.__doc__, f"the rule for {op} does not quote its restriction"


def test_unchecked_restriction_is_one_note_per_op(facts) -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond_in", BOOL, []),
         helper.make_tensor_value_info("v_in", F32, [4])],
        [helper.make_tensor_value_info("cond_out", BOOL, []), helper.make_tensor_value_info("v_out", F32, [4])],
    )
    loops = [helper.make_node("Loop", ["n", "", src], [dst], name=f"loop{k}", body=body)
             for k, (src, dst) in enumerate([("x", "y0"), ("y0", "y1")])]
    graph = Graph(loops, {"x": (F32, [4])}, {"n": np.array(3, np.int64)})
    (note,) = lint_model(graph.model(), facts)
    assert (note.severity, note.code, note.node, note.op) == (NOTE, CHECK_BY_HAND, "loop0", "Loop")
    assert "1 other Loop node" in note.message and "Scan output length cannot be dynamic" in note.message


# --------------------------------------------------------------------------- #
# Reports and packages
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lint")
    return Path(dync.export(SingleExitNet().eval(), root / "m.dync", input_shape=(2, 3, 16, 16)))


def test_stock_export_is_tensorrt_clean(package: Path) -> None:
    report = lint_package(package)
    assert report.ok and report.counts == {ERROR: 0, NOTE: 0}, format_lint(report)
    assert report.plugin_ops == [] and report.tensorrt_version == "10.0" and report.target == "trt"
    assert json.loads(json.dumps(report.to_json()))["ok"] is True
    assert "ops needing a plugin: none" in format_lint(report)


def _with_nodes(package: Path, tmp_path: Path, nodes: Callable[[str], list[onnx.NodeProto]],
                inputs: Sequence[onnx.ValueInfoProto] = (), outputs: Sequence[onnx.ValueInfoProto] = ()) -> Path:
    """A copy of `package` whose first stage also has `nodes(first input name)`, reading `inputs` and writing
    `outputs` besides its own (a `dync` opset import added)."""
    copy = tmp_path / "m.dync"
    shutil.copytree(package, copy)
    stage = load_manifest(copy).stages[0]
    model = onnx.load(copy / stage.onnx)
    model.graph.node.extend(nodes(model.graph.input[0].name))
    model.graph.input.extend(inputs)
    model.graph.output.extend(outputs)
    model.opset_import.append(helper.make_opsetid("dync", 1))
    onnx.save(model, copy / stage.onnx)
    rehash(copy)
    return copy


def test_package_with_plugin_and_unsupported_ops(package: Path, tmp_path: Path) -> None:
    """Extra nodes appended to a copy's stage: plugin needs come first in the table, counts add up."""
    copy = _with_nodes(package, tmp_path, lambda first: [
        helper.make_node("GatherConv", [first], ["gc_out"], name="gc", domain="dync"),
        helper.make_node("Compress", [first, "cond"], ["c_out"], name="compress"),
        helper.make_node("TopK", [first, "k_dyn"], ["tv", "ti"], name="topk"),
    ], inputs=[helper.make_tensor_value_info("cond", BOOL, [2]), helper.make_tensor_value_info("k_dyn", I64, [1])])
    report = lint_package(copy)
    assert report.counts == {ERROR: 2, NOTE: 1}
    assert report.plugin_ops == ["Compress", "dync::GatherConv"]
    table = format_lint(report)
    assert table.index("| dync::GatherConv |") < table.index("| TopK |")
    assert table.index("| Compress |") < table.index("| TopK |")
    assert [f["code"] for f in report.to_json()["findings"]] == [CUSTOM_OP, UNSUPPORTED_OP, RESTRICTION]


def test_package_with_dync_plugin_ops(package: Path, tmp_path: Path) -> None:
    """A dync op with a TensorRT plugin is a note; one without is linted through its decomposition; neither is
    listed as needing a plugin."""
    copy = _with_nodes(package, tmp_path, lambda first: [
        helper.make_node("TrtRelu", [first], ["trt_out"], name="trt", domain="dync", plugin_version="1",
                         plugin_namespace="dync"),
        helper.make_node("PortableScatterAdd", ["sx", "su"], ["sa_out"], name="sa", domain="dync"),
    ], inputs=[helper.make_tensor_value_info("sx", F32, [4]), helper.make_tensor_value_info("su", F32, [1])],
       outputs=[helper.make_tensor_value_info("trt_out", F32, None), helper.make_tensor_value_info("sa_out", F32, [4])])
    report = lint_package(copy)
    assert report.counts == {ERROR: 1, NOTE: 1} and report.plugin_ops == []
    assert [(f["code"], f["node"]) for f in report.to_json()["findings"]] == [(RESTRICTION, "sa/scatter"),
                                                                            (DYNC_PLUGIN, "trt")]
    assert "ops needing a plugin: none" in format_lint(report)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _short_external_data(path: Path) -> None:
    onnx.save(onnx.load(path), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (path.parent / "weights.bin").write_bytes(bytes(8))


DAMAGE = {
    "truncated": _truncate,
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "empty": lambda path: path.write_bytes(b""),
    "short external data": _short_external_data,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_broken_stage_file_is_a_package_error(package: Path, tmp_path: Path, damage: Any) -> None:
    copy = tmp_path / "m.dync"
    shutil.copytree(package, copy)
    stage = load_manifest(copy).stages[0]
    damage(copy / stage.onnx)
    rehash(copy)  # past the integrity check (tested in tests/test_package_integrity.py): the lint's own reading
    with pytest.raises(PackageError, match=f"stage '{stage.name}'") as info:
        lint_package(copy)
    assert str(copy / stage.onnx) in str(info.value) and str(info.value).endswith("re-export the package.")


def test_missing_package_is_a_package_error(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="not a dync package"):
        lint_package(tmp_path / "nope.dync")


def test_unknown_target_is_a_lint_error(package: Path) -> None:
    with pytest.raises(LintError, match="unknown lint target 'ort'") as info:
        lint_package(package, target="ort")
    assert isinstance(info.value, DyncError)


def test_empty_report_formats() -> None:
    report = LintReport(package="p", target="trt", tensorrt_version="10.0", opset_range=(9, 20))
    assert report.ok and report.counts == {ERROR: 0, NOTE: 0}
    assert "no findings" in format_lint(report)


# --------------------------------------------------------------------------- #
# The build's TensorRT version, precision and plugin mode
# --------------------------------------------------------------------------- #


def _with_trt_plugin(package: Path, tmp_path: Path) -> Path:
    """A copy of `package` whose first stage also runs dync::TrtRelu, an op with a TensorRT plugin."""
    return _with_nodes(package, tmp_path, lambda first: [
        helper.make_node("TrtRelu", [first], ["trt_out"], name="trt", domain="dync", plugin_version="1",
                         plugin_namespace="dync"),
    ], outputs=[helper.make_tensor_value_info("trt_out", F32, None)])


def test_tensorrt_10_9_keeps_plugins_and_10_3_decomposes_them(package: Path, tmp_path: Path) -> None:
    """10.9 has AOT plugins: the node is the usual plugin note. 10.3 has none: the build decomposes the op, so
    its decomposition is linted (clean: a Relu) and the stage gets one note saying why."""
    copy = _with_trt_plugin(package, tmp_path)
    aot = lint_package(copy, tensorrt_version="10.9")
    assert (aot.tensorrt_version, aot.plugins, aot.facts_version) == ("10.9", "aot", "10.0")
    assert [(f.code, f.node) for f in aot.findings] == [(DYNC_PLUGIN, "trt")]

    old = lint_package(copy, tensorrt_version="10.3")
    assert (old.tensorrt_version, old.plugins, old.ok) == ("10.3", "decomposed", True)
    (note,) = old.findings
    assert (note.severity, note.code, note.op) == (NOTE, PLUGINS_DECOMPOSED, "dync::TrtRelu")
    assert "TensorRT 10.3 has no tensorrt.plugin AOT plugins (10.9 or later)" in note.message
    assert note.message.endswith(".") and note.message.count(";") == 1
    header = format_lint(old).splitlines()[0]
    assert header.startswith("TensorRT 10.3 ONNX parser lint of")
    assert "(fp32, plugins decomposed, opsets 9-20, operator matrix of TensorRT 10.0)" in header


def test_plugins_decomposed_on_request_and_aot_refused_before_10_9(package: Path, tmp_path: Path) -> None:
    copy = _with_trt_plugin(package, tmp_path)
    (note,) = lint_package(copy, tensorrt_version="10.9", plugins="decomposed").findings
    assert note.code == PLUGINS_DECOMPOSED and "--plugins decomposed asks for that" in note.message
    with pytest.raises(InputError, match=r"TensorRT 10\.3 has no tensorrt\.plugin AOT implementations"):
        lint_package(copy, tensorrt_version="10.3", plugins="aot")


def test_dync_plugin_package_linted_for_10_3_and_10_9(plugins_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `--ops plugins` export, with dync's own registry: 10.9 keeps the plugin nodes (one note each),
    10.3 lints them as standard ONNX, with one note for the stage."""
    for module in ("dync.plugins.op_registry", "dync.plugins.splice", "dync.lint.custom_ops", "dync.lint.forms",
                   "dync.build.forms"):
        monkeypatch.setattr(importlib.import_module(module), "registry", REAL_REGISTRY)
    aot = lint_package(plugins_package, tensorrt_version="10.9")
    assert aot.ok and aot.plugins == "aot"
    plugin_notes = [f for f in aot.findings if f.code == DYNC_PLUGIN]
    assert plugin_notes and all(f.op.startswith("dync::") for f in plugin_notes)
    old = lint_package(plugins_package, tensorrt_version="10.3")
    assert old.ok and old.plugins == "decomposed"
    assert not [f for f in old.findings if f.code == DYNC_PLUGIN]
    stages = {s.name for s in load_manifest(plugins_package).stages if s.name in {f.stage for f in plugin_notes}}
    assert sorted(f.stage for f in old.findings if f.code == PLUGINS_DECOMPOSED) == sorted(stages)


def test_fp16_lint_of_a_stock_package_reports_its_precision(package: Path) -> None:
    report = lint_package(package, precision="fp16")
    assert report.ok and report.counts == {ERROR: 0, NOTE: 0}, format_lint(report)
    assert report.precision == "fp16" and report.to_json()["precision"] == "fp16"
    assert "(fp16, plugins aot, opsets 9-20)" in format_lint(report)
    assert lint_package(package).precision == "fp32"  # what the package holds


def _decision_graph() -> Graph:
    """A Gemm feeding an ArgMax (a decision: dync's fp16 conversion keeps it float32) beside a MatMul that
    converts."""
    return Graph(
        [helper.make_node("Gemm", ["x", "w"], ["logits"], name="head"),
         helper.make_node("ArgMax", ["logits"], ["choice"], name="pick", axis=1),
         helper.make_node("MatMul", ["x", "w"], ["features"], name="body")],
        {"x": (F32, [2, 4])}, initializers={"w": np.ones((4, 3), np.float32)},
        output_types={"choice": I64, "features": F32},
    )


def test_fp16_heavy_layers_kept_float32_are_one_note(facts) -> None:
    found = lint_model(_decision_graph().model(), facts, stage="s0", precision="fp16")
    assert [(f.severity, f.code, f.node, f.op) for f in found] == [(NOTE, FP32_LAYERS, "head", "Gemm")]
    assert "strongly typed engine runs them in fp32" in found[0].message
    assert found[0].message.endswith(".") and found[0].message.count(";") == 1
    assert lint_model(_decision_graph().model(), facts, stage="s0") == []  # fp32: nothing to say


@pytest.mark.parametrize("version", ["9.3", "8.6.1.6"])
def test_tensorrt_older_than_dync_supports_is_one_error(package: Path, facts, version: str) -> None:
    report = lint_package(package, tensorrt_version=version)
    (finding,) = report.findings
    assert (finding.severity, finding.code, report.ok) == (ERROR, TENSORRT_VERSION, False)
    assert f"TensorRT {version} is older than dync supports (10.3 or later" in finding.message
    assert finding.message.endswith(".") and finding.message.count(";") == 1
    assert report.tensorrt_version == version and report.to_json()["tensorrt_version"] == version
    assert lint_model(Graph([node("Relu", ["x"])], image()).model(), facts, tensorrt_version=version) == [finding]


def test_bad_version_precision_or_plugin_mode_is_an_input_error(package: Path) -> None:
    for kwargs, words in [({"tensorrt_version": "ten"}, "'ten' is not a TensorRT version"),
                          ({"precision": "fp4"}, "precision 'fp4' is unknown"),
                          ({"plugins": "jit"}, "plugin mode 'jit' is unknown")]:
        with pytest.raises(InputError, match=words):
            lint_package(package, **kwargs)


@pytest.mark.parametrize(("version", "opset", "expected"), [
    ("10.3", 20, []),
    ("10.3", 22, [(NOTE, OPSET)]),  # between 10.0's documented 20 and 10.15's 24: confirm by hand
    ("10.3", 25, [(ERROR, OPSET)]),  # above what even 10.15 reads
    ("10.15", 24, []),
    ("11.4", 25, [(NOTE, OPSET)]),
    ("11.5", 25, []),
    ("11.5", 26, [(NOTE, OPSET)]),  # past the newest documented release
    ("10.9", 8, [(ERROR, OPSET)]),
])
def test_opsets_per_tensorrt_version(facts, version: str, opset: int, expected: list[tuple[str, str]]) -> None:
    found = lint_model(Graph([node("Relu", ["x"])], image(), opset=opset).model(), facts, stage="s0",
                       tensorrt_version=version)
    assert codes(found) == expected, [f.message for f in found]
    for finding in found:
        assert finding.message.endswith(".") and finding.message.count(";") == 1


def test_cli_inspect_for_tensorrt_10_3_at_fp16(package: Path) -> None:
    result = invoke(["inspect", package, "--target", "trt", "--tensorrt", "10.3", "--precision", "fp16", "--json"])
    assert result.exit_code == 0, result.output
    lint = json.loads(result.stdout)["lint"]
    assert {k: lint[k] for k in ("target", "tensorrt_version", "precision", "plugins", "facts_version",
                                 "opset_range", "ok")} == {
        "target": "trt", "tensorrt_version": "10.3", "precision": "fp16", "plugins": "decomposed",
        "facts_version": "10.0", "opset_range": [9, 20], "ok": True}
    text = invoke(["inspect", package, "--target", "trt", "--tensorrt", "10.3", "--precision", "fp16"])
    assert "TensorRT 10.3 ONNX parser lint of" in text.output and "(fp16, plugins decomposed" in text.output


@pytest.mark.parametrize(("args", "words"), [
    (["--tensorrt", "10.3"], "add --target trt"),
    (["--target", "trt", "--tensorrt", "10.3", "--plugins", "aot"], "no tensorrt.plugin AOT implementations"),
    (["--target", "trt", "--tensorrt", "9.3"], "older than dync supports"),
])
def test_cli_inspect_tensorrt_errors(package: Path, args: list[str], words: str) -> None:
    result = invoke(["inspect", package, *args])
    assert result.exit_code == 1 and words in result.output, result.output


def test_unknown_dync_op_is_still_an_error_in_the_fp16_form(facts) -> None:
    """The build refuses a dync op the registry does not know; the lint reports it and converts the rest."""
    graph = Graph([node("Relu", ["x"], ["r"]), _dync_node("NoSuchOp", ["r"])], image(), output_types={"y": F32})
    found = lint_model(graph.model(), facts, precision="fp16", tensorrt_version="10.9")
    assert [(f.severity, f.code, f.op) for f in found] == [(ERROR, CUSTOM_OP, "dync::NoSuchOp")]
