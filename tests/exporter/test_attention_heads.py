"""The 3-D form of fused attention on tiny graphs: head splits and merges as torch.onnx writes them are
absorbed, and the fused graph equals the unfused one in onnxruntime at several batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from dync.exporter.passes.attention import AttentionShape, fuse_attention
from dync.exporter.passes.attention.measure import attention_model
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from tests.helpers import assert_close

HEADS, TOKENS, DIM = 2, 6, 4
WIDTH = HEADS * DIM


def _const(name: str, values: list[int]) -> onnx.TensorProto:
    return oh.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, int], outputs: dict[str, list]) -> onnx.ModelProto:
    """Inputs [B, TOKENS, width] by name; reshape targets keep the batch with 0, as dynamic exports do."""
    inits = [_const("split", [0, TOKENS, HEADS, DIM]), _const("packed", [0, TOKENS, 3, HEADS, DIM]),
             _const("merge", [0, TOKENS, WIDTH]), _const("zero", [0]), _const("one", [1]), _const("two", [2]),
             _const("three", [3]), oh.make_tensor("first", TensorProto.INT64, [], [0]),
             oh.make_tensor("scale", TensorProto.FLOAT, [], [DIM**-0.5])]
    graph = oh.make_graph(
        nodes, "heads", [oh.make_tensor_value_info(n, TensorProto.FLOAT, ["B", TOKENS, w]) for n, w in inputs.items()],
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])


def _split(source: str, out: str) -> list[onnx.NodeProto]:
    """`x.reshape(B, N, H, d).permute(0, 2, 1, 3)`."""
    return [oh.make_node("Reshape", [source, "split"], [f"{out}_r"]),
            oh.make_node("Transpose", [f"{out}_r"], [out], perm=[0, 2, 1, 3])]


def _attention(q: str, k: str, v: str, out: str) -> list[onnx.NodeProto]:
    """softmax(q k^T * scale) v on [B, H, N, d] tensors, written to `out`."""
    return [oh.make_node("Transpose", [k], [f"{out}_kt"], perm=[0, 1, 3, 2]),
            oh.make_node("MatMul", [q, f"{out}_kt"], [f"{out}_s"]),
            oh.make_node("Mul", [f"{out}_s", "scale"], [f"{out}_ss"]),
            oh.make_node("Softmax", [f"{out}_ss"], [f"{out}_p"], axis=-1),
            oh.make_node("MatMul", [f"{out}_p", v], [out])]


MERGE = [oh.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]), oh.make_node("Reshape", ["o_t", "merge"], ["y"])]
PACKED = [oh.make_node("Reshape", ["x", "packed"], ["x5"]),
          oh.make_node("Transpose", ["x5"], ["x5t"], perm=[2, 0, 3, 1, 4]),
          oh.make_node("Gather", ["x5t", "first"], ["q"], axis=0),
          oh.make_node("Slice", ["x5t", "one", "two", "zero"], ["k1"]),
          oh.make_node("Squeeze", ["k1", "zero"], ["k"]),
          oh.make_node("Slice", ["x5t", "two", "three", "zero"], ["v1"]),
          oh.make_node("Squeeze", ["v1", "zero"], ["v"])]
MERGED = {"y": ["B", TOKENS, WIDTH]}
SPLIT = {"o": ["B", HEADS, TOKENS, DIM]}

CASES = {  # name: (model, expected 3-D attentions, Transposes left)
    "separate projections, merged after": (_model(
        _split("xq", "q") + _split("xk", "k") + _split("xv", "v") + _attention("q", "k", "v", "o") + MERGE,
        {"xq": WIDTH, "xk": WIDTH, "xv": WIDTH}, MERGED), 1, 0),
    "packed qkv (Gather, Slice+Squeeze)": (
        _model(PACKED + _attention("q", "k", "v", "o") + MERGE, {"x": 3 * WIDTH}, MERGED), 1, 0),
    "no merge after: heads split back": (_model(
        _split("xq", "q") + _split("xk", "k") + _split("xv", "v") + _attention("q", "k", "v", "o"),
        {"xq": WIDTH, "xk": WIDTH, "xv": WIDTH}, SPLIT), 1, 1),
    "chained: the first output is the second's values": (_model(
        _split("xq", "q") + _split("xk", "k") + _split("xv", "v") + _attention("q", "k", "v", "a")
        + _attention("q", "k", "a", "o") + MERGE, {"xq": WIDTH, "xk": WIDTH, "xv": WIDTH}, MERGED), 2, 0),
}


def _run(model: onnx.ModelProto, batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(batch)
    feeds = {i.name: rng.standard_normal((batch, TOKENS, i.type.tensor_type.shape.dim[2].dim_value), dtype=np.float32)
             for i in model.graph.input}
    return session_from_onnx(model, OrtSettings()).run(None, feeds)


@pytest.mark.parametrize("name", list(CASES))
def test_head_views_fuse_to_the_3d_form(name: str) -> None:
    model, attentions, transposes = CASES[name]
    fused, reports = fuse_attention(model)
    onnx.checker.check_model(fused, full_check=True)
    ops = Counter(n.op_type for n in fused.graph.node)
    three_d = [n for n in fused.graph.node if n.op_type == "Attention"
               and {a.name: a.i for a in n.attribute}.get("q_num_heads") == HEADS]
    assert len(three_d) == attentions == ops["Attention"] and all(r.shape.merged_heads for r in reports), ops
    assert ops["Transpose"] == transposes and not ops.keys() & {"Softmax", "MatMul"}, ops
    for batch in (1, 3):
        assert_close(_run(fused, batch)[0], _run(model, batch)[0], what=f"{name}, batch {batch}")


def test_output_also_read_elsewhere_keeps_its_4d_form() -> None:
    model = _model(_split("xq", "q") + _split("xk", "k") + _split("xv", "v") + _attention("q", "k", "v", "o") + MERGE,
                   {"xq": WIDTH, "xk": WIDTH, "xv": WIDTH}, {**MERGED, **SPLIT})
    fused, reports = fuse_attention(model)
    assert [r.shape.merged_heads for r in reports] == [True]
    for batch in (1, 3):
        for got, want in zip(_run(fused, batch), _run(model, batch), strict=True):
            assert_close(got, want, what=f"batch {batch}")


@pytest.mark.parametrize("bias", [None, (1, HEADS, TOKENS, TOKENS)])
def test_timed_3d_forms_compute_the_same_attention(bias: tuple[int, ...] | None) -> None:
    shape = AttentionShape(HEADS, TOKENS, TOKENS, DIM, DIM, bias, merged_heads=True)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((2, TOKENS, WIDTH), dtype=np.float32) for name in "qkv"}
    fused, unfused = (session_from_onnx(attention_model(shape, 2, f), OrtSettings()).run(None, feeds)[0]
                      for f in (True, False))
    assert fused.shape == (2, TOKENS, WIDTH)
    assert_close(fused, unfused, what=f"bias {bias}")
