"""The attention-fusion pass on tiny graphs: which chains fuse, and the fused graph equals the unfused one in
onnxruntime at several batches (the batch axis stays dynamic)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from dync.exporter.passes.attention import ATTENTION_OPSET, AttentionShape, FasterForm, fuse_attention
from dync.exporter.passes.attention.measure import attention_model
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from tests.helpers import assert_close

HEADS, QUERIES, KEYS, HEAD_DIM = 2, 5, 7, 4
SCORES = ["B", HEADS, QUERIES, KEYS]
OUTPUT_SHAPES = {"y": ["B", HEADS, QUERIES, HEAD_DIM], "p": SCORES, "r": SCORES}


def _graph(nodes: list[onnx.NodeProto], outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    """Inputs q [B, H, S, d], k [B, L, H, d] (keys before their head transpose), v [B, H, L, d]; a bias table
    [1, H, S, L], keys [1, H, d, L] shared by the batch; the opset torch.onnx exports."""
    def info(name: str, shape: list) -> onnx.ValueInfoProto:
        return oh.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    rng = np.random.default_rng(0)
    inits = [oh.make_tensor("scale", TensorProto.FLOAT, [], [HEAD_DIM**-0.5]),
             oh.make_tensor("table", TensorProto.FLOAT, [1, HEADS, QUERIES, KEYS],
                            rng.standard_normal(HEADS * QUERIES * KEYS).tolist()),
             oh.make_tensor("shared_kt", TensorProto.FLOAT, [1, HEADS, HEAD_DIM, KEYS],
                            rng.standard_normal(HEADS * HEAD_DIM * KEYS).tolist()),
             oh.make_tensor("ones", TensorProto.INT64, [3], [1, 1, 1]),
             oh.make_tensor("first", TensorProto.INT64, [1], [0]),
             oh.make_tensor("second", TensorProto.INT64, [1], [1])]
    inputs = [info("q", ["B", HEADS, QUERIES, HEAD_DIM]), info("k", ["B", KEYS, HEADS, HEAD_DIM]),
              info("v", ["B", HEADS, KEYS, HEAD_DIM])]
    graph = oh.make_graph(nodes, "attention", inputs, [info(o, OUTPUT_SHAPES[o]) for o in outputs], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])


def _keys() -> list[onnx.NodeProto]:
    """kt = k as [B, H, d, L], the transpose torch.onnx emits for `k.transpose(-2, -1)` after the head split."""
    return [oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1])]


def _batch_tiled_bias() -> list[onnx.NodeProto]:
    """Agent attention's `table.repeat(b, 1, 1, 1)`, twice, summed: repeats built from the input's shape."""
    return [oh.make_node("Shape", ["q"], ["q_shape"]),
            oh.make_node("Slice", ["q_shape", "first", "second"], ["batch"]),
            oh.make_node("Concat", ["batch", "ones"], ["repeats"], axis=0),
            oh.make_node("Tile", ["table", "repeats"], ["tiled_a"]),
            oh.make_node("Tile", ["table", "repeats"], ["tiled_b"]),
            oh.make_node("Add", ["tiled_a", "tiled_b"], ["bias"])]


def _softmax_av(scores: str, axis: int = -1) -> list[onnx.NodeProto]:
    return [oh.make_node("Softmax", [scores], ["p"], axis=axis), oh.make_node("MatMul", ["p", "v"], ["y"])]


SCALED_Q = [oh.make_node("Mul", ["q", "scale"], ["qs"]), oh.make_node("MatMul", ["qs", "kt"], ["s"])]
SCALED_SCORES = [oh.make_node("MatMul", ["q", "kt"], ["s0"]), oh.make_node("Mul", ["s0", "scale"], ["s"])]

FUSED = {  # name: nodes of a chain the pass must fuse
    "agent: scaled q, transposed keys, batch-tiled bias":
        _keys() + SCALED_Q + _batch_tiled_bias() + [oh.make_node("Add", ["s", "bias"], ["sb"])] + _softmax_av("sb"),
    "pvt: scores scaled after the matmul, no bias": _keys() + SCALED_SCORES + _softmax_av("s"),
    "swin: constant bias first in the Add": _keys() + SCALED_Q + [oh.make_node("Add", ["table", "s"], ["sb"])]
    + _softmax_av("sb"),
    "no scale, no bias": [*_keys(), oh.make_node("MatMul", ["q", "kt"], ["s"]), *_softmax_av("s")],
}

NOT_FUSED = {  # name: (nodes, graph outputs) of a chain the pass must leave alone
    "softmax over the queries": (_keys() + SCALED_Q + _softmax_av("s", axis=2), ("y",)),
    "probabilities also an output": (_keys() + SCALED_Q + _softmax_av("s"), ("y", "p")),
    "keys shared by the batch (MatMul broadcasts, Attention would not)":
        ([oh.make_node("MatMul", ["q", "shared_kt"], ["s"]), *_softmax_av("s")], ("y",)),
    "scores read twice": (_keys() + SCALED_Q + _softmax_av("s") + [oh.make_node("Relu", ["s"], ["r"])], ("y", "r")),
}


def _run(model: onnx.ModelProto, batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(batch)
    feeds = {"q": rng.standard_normal((batch, HEADS, QUERIES, HEAD_DIM), dtype=np.float32),
             "k": rng.standard_normal((batch, KEYS, HEADS, HEAD_DIM), dtype=np.float32),
             "v": rng.standard_normal((batch, HEADS, KEYS, HEAD_DIM), dtype=np.float32)}
    return session_from_onnx(model, OrtSettings()).run(None, feeds)


@pytest.mark.parametrize("name", list(FUSED))
def test_chain_fuses_to_one_attention_with_equal_outputs(name: str) -> None:
    model = _graph(FUSED[name])
    fused, reports = fuse_attention(model)
    onnx.checker.check_model(fused, full_check=True)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert [r.fused for r in reports] == [True] and ops["Attention"] == 1, ops
    assert not ops.keys() & {"Softmax", "MatMul", "Tile"}, ops
    assert ops["Transpose"] <= 1, ops
    assert next(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == ATTENTION_OPSET
    for batch in (1, 3):
        assert_close(_run(fused, batch)[0], _run(model, batch)[0], what=f"{name}, batch {batch}")


@pytest.mark.parametrize("name", list(NOT_FUSED))
def test_chain_left_alone(name: str) -> None:
    nodes, outputs = NOT_FUSED[name]
    model = _graph(nodes, outputs)
    fused, reports = fuse_attention(model)
    assert reports == [] and fused is model


def test_choice_sees_the_static_shape_and_an_unfused_chain_drops_its_batch_tiles() -> None:
    model = _graph(FUSED["agent: scaled q, transposed keys, batch-tiled bias"])
    seen: list[AttentionShape] = []
    kept, reports = fuse_attention(model, lambda shape: seen.append(shape) is not None)
    assert seen == [AttentionShape(heads=HEADS, queries=QUERIES, keys=KEYS, head_dim=HEAD_DIM, value_dim=HEAD_DIM,
                                   bias=(1, HEADS, QUERIES, KEYS))]
    assert [(r.fused, r.shape) for r in reports] == [(False, seen[0])]
    ops = Counter(n.op_type for n in kept.graph.node)
    assert ops["Attention"] == 0 and ops["Softmax"] == 1 and ops["Tile"] == 0, ops
    for batch in (1, 3):
        assert_close(_run(kept, batch)[0], _run(model, batch)[0], what=f"unfused, batch {batch}")


@pytest.mark.parametrize("bias", [None, (1, HEADS, QUERIES, KEYS), (QUERIES, KEYS)])
def test_timed_forms_compute_the_same_attention(bias: tuple[int, ...] | None) -> None:
    shape = AttentionShape(HEADS, QUERIES, KEYS, HEAD_DIM, HEAD_DIM, bias)
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, HEADS, QUERIES, HEAD_DIM), dtype=np.float32),
             "k": rng.standard_normal((2, HEADS, KEYS, HEAD_DIM), dtype=np.float32),
             "v": rng.standard_normal((2, HEADS, KEYS, HEAD_DIM), dtype=np.float32)}
    fused, unfused = (session_from_onnx(attention_model(shape, 2, f), OrtSettings()).run(None, feeds)[0]
                      for f in (True, False))
    assert_close(fused, unfused, what=f"bias {bias}")


def test_faster_form_times_each_shape_once() -> None:
    messages: list[str] = []
    choose = FasterForm(repeats=2, progress=messages.append)
    shape = AttentionShape(HEADS, QUERIES, KEYS, HEAD_DIM, HEAD_DIM, None)
    first = choose(shape)
    assert choose(shape) == first and len(messages) == 1 and set(choose.ratios) == {shape}
    assert choose.ratios[shape] > 0 and (choose.ratios[shape] < 1.0) == first
    assert "2 heads x 5 queries x 7 keys, head dim 4" in messages[0]
