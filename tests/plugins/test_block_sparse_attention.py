"""BlockSparseAttention and its mask producers: the ONNX faces against the PyTorch reference, over tables of cases.

What is checked, and why:

* the attention's decomposition (a chunked Loop over query-block rows) runs in onnxruntime after
  `decompose_custom_nodes` and matches `block_sparse_attention_reference` to 1e-5 (float32 summation order
  only) on shapes that stress its bookkeeping: partial blocks, L != S, Dv != D, broadcast lists, fewer slots
  than key blocks, unsorted lists with out-of-range values in their unlisted slots (which must be ignored),
  empty rows (exact zeros), every block (plain softmax attention), one block per row, and a Loop forced into
  several chunks with a partial last one;
* fp8: the decomposition is a saturating Cast pair so that onnxruntime's fusions cannot break it, so it runs
  at every graph optimization level, with scales from the amax (an all-zero tile and channel included) and
  given (small enough to saturate); `round_fp8` is checked against a nearest-even search over every finite
  fp8 value, and onnxruntime's Cast pair against `round_fp8`;
* MeanSimMask, BlockMaskIndex and TileWindowMask: their lists exactly, on inputs whose masks are neither
  dense nor trivial (asserted), the cdf rule also as a property of an independent numpy pooled softmax, the
  tile window and tile order against naive loops;
* `dense_equivalent` (the named node dense and in float, the others untouched), the MACs and shape faces, and
  the reference's input checks.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

import dync.plugins.block_sparse_attention as bsa
from dync.errors import PluginError
from dync.graph import Builder
from dync.plugins import registry
from dync.plugins.block_sparse_attention import reference as ref
from dync.plugins.splice import decompose_custom_nodes
from tests.helpers import plugin_model

TOLERANCE = 1e-5
"""Max abs error of the decomposition against the reference: float32 summation order only."""

LEVELS = {name: getattr(ort.GraphOptimizationLevel, name)
          for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")}
FLOAT_OPSET = 18


# ------------------------------------------------------------------------------------------------ shared helpers


def _rng(key: str) -> np.random.Generator:
    """A generator seeded by `key`, so each case draws its own data, the same on every run."""
    return np.random.default_rng(zlib.crc32(key.encode()))


def _blocks_of(tokens: int, block: int) -> int:
    return -(-tokens // block)


def _one_node_model(op: str, inputs: dict[str, np.ndarray], outputs: Sequence[tuple[str, Any, int]],
                    opset: int = FLOAT_OPSET, **attrs: Any) -> onnx.ModelProto:
    """A model of one `dync::op` node with several (or integer) outputs, given as (name, dtype, rank)."""
    graph_inputs = [gs.Variable(name, dtype=value.dtype, shape=[None] * value.ndim) for name, value in inputs.items()]
    graph_outputs = [gs.Variable(name, dtype=dtype, shape=[None] * rank) for name, dtype, rank in outputs]
    nodes: list[gs.Node] = []
    registry().get(op).emit_many(Builder(nodes, ""), graph_inputs, graph_outputs, name=op, **attrs)
    return gs.export_onnx(gs.Graph(nodes=nodes, inputs=graph_inputs, outputs=graph_outputs, opset=opset))


def _run_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
             level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> list[np.ndarray]:
    """Check `model` fully and run it in onnxruntime at one graph optimization level; every output."""
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _max_abs_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape, f"shape {got.shape} != expected {expected.shape}"
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))


def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Plain dense softmax attention, in torch."""
    q_, k_, v_ = (torch.from_numpy(x) for x in (q, k, v))
    return (torch.softmax(q_ @ k_.transpose(-2, -1) * scale, dim=-1) @ v_).numpy()


# ------------------------------------------------------------------------------------------------ attention cases


@dataclass(frozen=True)
class AttentionCase:
    """One table row: shapes, op blocks, which key blocks the lists hold, their broadcast and slots, fp8."""

    id: str
    b: int
    h: int
    l: int  # noqa: E741 (the op's L)
    s: int
    d: int
    dv: int
    block_q: int
    block_k: int
    lists: str = "random"  # "random" (0..M blocks, shuffled), "every" (all, shuffled), "one", "none"
    empty_rows: bool = False  # force every fourth row to kv_count 0
    list_bh: tuple[bool, bool] = (True, True)  # lists per batch / per head, else one broadcast
    slots: int | None = None  # M; KB + 1 when None (the extra slot is never listed)
    fp8: str = "off"
    given_scales: bool = False  # q_scale/k_scale/v_scale inputs (below the amax scales: some values saturate)


ATTENTION_CASES = [
    AttentionCase("partial_blocks_b1", 1, 2, 37, 45, 8, 8, 16, 16),
    AttentionCase("l_ne_s_dv_ne_d_b2", 2, 3, 29, 50, 8, 5, 8, 16),
    AttentionCase("single_partial_block", 2, 1, 5, 3, 4, 6, 8, 8),
    AttentionCase("broadcast_over_batch_and_heads", 2, 3, 33, 40, 8, 8, 16, 8, list_bh=(False, False)),
    AttentionCase("broadcast_over_heads", 2, 2, 24, 26, 4, 6, 8, 8, list_bh=(True, False)),
    AttentionCase("fewer_slots_than_blocks", 2, 2, 30, 64, 8, 8, 8, 8, slots=3),
    AttentionCase("empty_rows", 2, 2, 40, 42, 8, 8, 8, 8, empty_rows=True),
    AttentionCase("every_row_empty", 1, 2, 20, 20, 8, 8, 8, 8, lists="none"),
    AttentionCase("every_block_partial_keys", 2, 2, 21, 27, 8, 4, 8, 8, lists="every"),
    AttentionCase("every_block_whole_keys", 1, 3, 32, 48, 8, 8, 16, 16, lists="every"),
    AttentionCase("one_block_per_row", 2, 2, 35, 41, 8, 8, 8, 8, lists="one"),
]
FP8_CASES = [
    AttentionCase("e4m3_amax", 2, 2, 37, 45, 8, 8, 16, 16, fp8="e4m3"),
    AttentionCase("e5m2_amax_broadcast", 1, 2, 30, 50, 8, 4, 8, 16, list_bh=(False, False), fp8="e5m2"),
    AttentionCase("e4m3_given_scales", 2, 2, 37, 45, 8, 8, 16, 16, fp8="e4m3", given_scales=True),
    AttentionCase("e5m2_given_scales", 2, 1, 26, 33, 8, 6, 8, 8, empty_rows=True, fp8="e5m2", given_scales=True),
]

attention_cases = pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c.id for c in ATTENTION_CASES])
fp8_cases = pytest.mark.parametrize("case", FP8_CASES, ids=[c.id for c in FP8_CASES])
levels = pytest.mark.parametrize("level", LEVELS.values(), ids=list(LEVELS))


def _scale(case: AttentionCase) -> float:
    """1 / sqrt(D), exactly representable in float32 (the ONNX attribute's type)."""
    return float(np.float32(case.d ** -0.5))


def _attrs(case: AttentionCase) -> dict[str, Any]:
    return {"block_q": case.block_q, "block_k": case.block_k, "scale": _scale(case), "fp8": case.fp8}


def _lists(case: AttentionCase, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kv_count, kv_index): distinct key blocks per row in shuffled order; unlisted slots hold an
    out-of-range block, which every face must ignore."""
    qb, kb = _blocks_of(case.l, case.block_q), _blocks_of(case.s, case.block_k)
    slots = case.slots if case.slots is not None else kb + 1
    lead = (case.b if case.list_bh[0] else 1, case.h if case.list_bh[1] else 1, qb)
    count = np.zeros(lead, np.int64)
    index = np.full((*lead, slots), kb + 7, np.int64)
    for row in np.ndindex(*lead):
        n = {"every": kb, "one": 1, "none": 0}.get(case.lists, -1)
        n = int(rng.integers(0, min(slots, kb) + 1)) if n < 0 else n
        count[row] = n
        index[row][:n] = rng.permutation(kb)[:n]
    if case.empty_rows:
        count.reshape(-1)[::4] = 0
    return count, index


def _attention_feeds(case: AttentionCase) -> dict[str, np.ndarray]:
    """q, k, v, the lists and, for fp8, an all-zero query tile and value channel (scale 1) or given scales."""
    rng = _rng(case.id)
    q, k = (rng.standard_normal((case.b, case.h, n, case.d), dtype=np.float32) for n in (case.l, case.s))
    v = rng.standard_normal((case.b, case.h, case.s, case.dv), dtype=np.float32)
    count, index = _lists(case, rng)
    feeds = {"q": q, "k": k, "v": v, "kv_count": count, "kv_index": index}
    if case.fp8 != "off" and not case.given_scales:
        q[0, 0, :case.block_q] = 0.0
        v[0, -1, :, 0] = 0.0
    if case.given_scales:
        amax_scales = (ref.tile_scales(torch.from_numpy(q), case.block_q, case.fp8),
                       ref.tile_scales(torch.from_numpy(k), case.block_k, case.fp8),
                       ref.channel_scales(torch.from_numpy(v), case.fp8))
        for name, scale in zip(("q_scale", "k_scale", "v_scale"), amax_scales, strict=True):
            feeds[name] = (scale.numpy() * rng.uniform(0.3, 1.0, scale.shape)).astype(np.float32)
    return feeds


def _reference(case: AttentionCase, feeds: dict[str, np.ndarray], fp8: str | None = None,
               with_scales: bool = True) -> np.ndarray:
    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
    scales = [tensors.get(name) if with_scales else None for name in ("q_scale", "k_scale", "v_scale")]
    return ref.block_sparse_attention_reference(
        *(tensors[n] for n in ("q", "k", "v", "kv_count", "kv_index")), case.block_q, case.block_k, _scale(case),
        case.fp8 if fp8 is None else fp8, *scales).numpy()


def _attention_model(case: AttentionCase, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The one-node model with the op decomposed (opset 19 for fp8's float8 Cast)."""
    opset = bsa.FP8_OPSET if case.fp8 != "off" else FLOAT_OPSET
    return decompose_custom_nodes(plugin_model("BlockSparseAttention", feeds, 4, opset=opset, **_attrs(case)))


def _decomposed(case: AttentionCase, feeds: dict[str, np.ndarray],
                level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    return _run_all(_attention_model(case, feeds), feeds, level)[0]


def _empty_query_tokens(case: AttentionCase, count: np.ndarray) -> np.ndarray:
    """[B, H, L] bool: the queries whose block lists no key block."""
    empty = np.broadcast_to(count == 0, (case.b, case.h, count.shape[-1]))
    return np.repeat(empty, case.block_q, axis=2)[:, :, :case.l]


def _loop_trip_count(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """How many iterations the decomposition's Loop runs for `feeds` (its trip count, exposed as an output)."""
    graph = gs.import_onnx(model)
    (loop,) = [node for node in graph.nodes if node.op == "Loop"]
    trips = loop.inputs[0]
    trips.dtype, trips.shape = np.int64, []
    graph.outputs.append(trips)
    return int(_run_all(gs.export_onnx(graph), feeds)[-1])


# ------------------------------------------------------------------------------------------------ attention


@attention_cases
def test_attention_decomposition_matches_reference(case: AttentionCase):
    feeds = _attention_feeds(case)
    got = _decomposed(case, feeds)
    expected = _reference(case, feeds)
    shape = registry().get("BlockSparseAttention").shape(*(feeds[n].shape for n in feeds), **_attrs(case))
    assert got.shape == expected.shape == shape == (case.b, case.h, case.l, case.dv)
    assert _max_abs_error(got, expected) <= TOLERANCE
    empty = _empty_query_tokens(case, feeds["kv_count"])
    assert (got[empty] == 0).all(), "a query block with kv_count 0 must output exact zeros"
    assert (got[~empty] != 0).any(axis=-1).all(), "a query block with keys must not output zeros"
    if case.empty_rows or case.lists == "none":
        assert empty.any()


@pytest.mark.parametrize("case", [c for c in ATTENTION_CASES if c.lists == "every"],
                         ids=[c.id for c in ATTENTION_CASES if c.lists == "every"])
def test_every_block_listed_is_plain_softmax_attention(case: AttentionCase):
    feeds = _attention_feeds(case)
    dense = _softmax_attention(feeds["q"], feeds["k"], feeds["v"], _scale(case))
    assert _max_abs_error(_decomposed(case, feeds), dense) <= TOLERANCE
    assert _max_abs_error(_reference(case, feeds), dense) <= TOLERANCE


def test_chunks_of_one_head_listing_every_block_run_as_that_heads_dense_attention(monkeypatch: pytest.MonkeyPatch):
    """With chunks of QB rows, each chunk is one head listing every block: the loop's dense form (one GEMM pair
    on the head's keys, nothing gathered) must give plain softmax attention too."""
    case = next(c for c in ATTENTION_CASES if c.id == "every_block_whole_keys")
    feeds = _attention_feeds(case)
    qb, kb = _blocks_of(case.l, case.block_q), _blocks_of(case.s, case.block_k)
    monkeypatch.setattr(bsa, "GATHER_BUDGET", qb * kb * case.block_k * max(case.d, case.dv))
    chunked = _attention_model(case, feeds)
    assert _loop_trip_count(chunked, feeds) == case.b * case.h
    dense = _softmax_attention(feeds["q"], feeds["k"], feeds["v"], _scale(case))
    assert _max_abs_error(_run_all(chunked, feeds)[0], dense) <= TOLERANCE


def test_sparse_lists_are_not_dense_attention():
    """The random lists really drop blocks: without that, the cases above could not tell a mask apart."""
    case = ATTENTION_CASES[0]
    feeds = _attention_feeds(case)
    dense = _softmax_attention(feeds["q"], feeds["k"], feeds["v"], _scale(case))
    assert _max_abs_error(_decomposed(case, feeds), dense) > 0.05


def test_chunked_loop_with_a_partial_last_chunk_gives_the_same_result(monkeypatch: pytest.MonkeyPatch):
    """54 rows (B * H * QB) in chunks of 5: 11 iterations, the last holding 4 rows (with the default budget,
    one chunk per head: 6)."""
    case = AttentionCase("many_rows", 2, 3, 70, 45, 8, 6, 8, 8)
    feeds = _attention_feeds(case)
    whole = _attention_model(case, feeds)
    assert _loop_trip_count(whole, feeds) == case.b * case.h
    longest = int(feeds["kv_count"].max())
    monkeypatch.setattr(bsa, "GATHER_BUDGET", 5 * longest * case.block_k * max(case.d, case.dv))
    chunked = _attention_model(case, feeds)
    assert _loop_trip_count(chunked, feeds) == 11
    got = _run_all(chunked, feeds)[0]
    assert _max_abs_error(got, _reference(case, feeds)) <= TOLERANCE
    assert _max_abs_error(got, _run_all(whole, feeds)[0]) <= 1e-6


# ------------------------------------------------------------------------------------------------ fp8


@levels
@fp8_cases
def test_fp8_decomposition_matches_reference_at_every_optimization_level(case: AttentionCase,
                                                                         level: ort.GraphOptimizationLevel):
    feeds = _attention_feeds(case)
    got = _decomposed(case, feeds, level)
    assert np.isfinite(got).all()
    assert _max_abs_error(got, _reference(case, feeds)) <= TOLERANCE
    assert (got[_empty_query_tokens(case, feeds["kv_count"])] == 0).all()


@fp8_cases
def test_fp8_cases_round_visibly(case: AttentionCase):
    """fp8 changes the result (and given scales change it again), so the fp8 cases check the rounding."""
    feeds = _attention_feeds(case)
    quantized = _reference(case, feeds)
    assert _max_abs_error(quantized, _reference(case, feeds, fp8="off")) > 1e-3
    if case.given_scales:
        assert _max_abs_error(quantized, _reference(case, feeds, with_scales=False)) > 1e-3


def _finite_fp8_values(fp8: str) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of the format (float64) and its code's lowest bit (0: even mantissa)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(ref.FP8_FORMATS[fp8][0]).double()
    finite = torch.isfinite(values)
    return values[finite].numpy(), (codes[finite].numpy() & 1)


def _nearest_even(x: np.ndarray, fp8: str) -> np.ndarray:
    """Round to the nearest finite fp8 value, ties to the even code, by searching them all."""
    values, odd = _finite_fp8_values(fp8)
    distance = np.abs(x.astype(np.float64)[:, None] - values[None, :])
    nearest = distance == distance.min(axis=1, keepdims=True)
    preferred = np.where(nearest & (odd == 0), 0, np.where(nearest, 1, 2))
    return values[preferred.argmin(axis=1)].astype(np.float32)


def _rounding_probe(fp8: str) -> np.ndarray:
    """Values within range: exact midpoints between neighbours (ties), subnormals, random magnitudes."""
    values = np.unique(_finite_fp8_values(fp8)[0])
    positive = values[values > 0]
    midpoints = (positive[:-1] + positive[1:]) / 2
    rng = _rng(fp8)
    log_span = np.log2([positive[0] / 4, positive[-1]])
    spread = 2.0 ** rng.uniform(*log_span, 500)
    probe = np.concatenate([midpoints, positive, spread, [0.0, positive[0] / 2]]).astype(np.float32)
    return np.concatenate([probe, -probe])


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_round_fp8_is_nearest_even(fp8: str):
    x = torch.from_numpy(_rounding_probe(fp8))
    dtype, fmax = ref.FP8_FORMATS[fp8]
    got = ref.round_fp8(x, fp8)
    assert torch.equal(got, x.clamp(-fmax, fmax).to(dtype).to(torch.float32))
    np.testing.assert_array_equal(got.numpy(), _nearest_even(x.numpy(), fp8))


@pytest.mark.parametrize(("fp8", "fmax", "above"), [("e4m3", 448.0, [449.0, 464.0, 480.0, 1e4, 1e30, np.inf]),
                                                    ("e5m2", 57344.0, [57345.0, 61440.0, 65536.0, 1e6, np.inf])])
def test_round_fp8_saturates_at_the_format_max(fp8: str, fmax: float, above: list[float]):
    assert ref.FP8_FORMATS[fp8][1] == bsa.FP8_MAX[fp8] == fmax
    x = torch.tensor(above + [-a for a in above], dtype=torch.float32)
    expected = torch.tensor([fmax] * len(above) + [-fmax] * len(above))
    assert torch.equal(ref.round_fp8(x, fp8), expected)


def _cast_pair_model(fp8: str) -> onnx.ModelProto:
    """x -> Cast(float8, saturate=1) -> Cast(float): the decomposition's rounding."""
    nodes = [onnx.helper.make_node("Cast", ["x"], ["low"], to=bsa.FP8_ONNX[fp8], saturate=1),
             onnx.helper.make_node("Cast", ["low"], ["y"], to=onnx.TensorProto.FLOAT)]
    values = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None]) for name in ("x", "y")]
    graph = onnx.helper.make_graph(nodes, "cast_pair", values[:1], values[1:])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", bsa.FP8_OPSET)], ir_version=9)


@levels
@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_onnxruntime_cast_pair_rounds_like_round_fp8(fp8: str, level: ort.GraphOptimizationLevel):
    x = _rounding_probe(fp8)
    (got,) = _run_all(_cast_pair_model(fp8), {"x": x}, level)
    np.testing.assert_array_equal(got, ref.round_fp8(torch.from_numpy(x), fp8).numpy())


# ------------------------------------------------------------------------------------------------ MeanSimMask


@dataclass(frozen=True)
class MaskCase:
    """One MeanSimMask row: shapes, blocks, the selection rule and the similarity filter."""

    id: str
    b: int
    h: int
    l: int  # noqa: E741
    s: int
    d: int
    block_q: int
    block_k: int
    cdf: float = 0.0
    topk: float = 0.0
    sim: float = 0.0


MASK_CASES = [
    MaskCase("cdf_partial_blocks", 1, 2, 45, 50, 16, 8, 8, cdf=0.6),
    MaskCase("cdf_block_q_ne_block_k", 2, 2, 40, 37, 16, 16, 8, cdf=0.9),
    MaskCase("cdf_with_sim", 2, 1, 41, 56, 16, 8, 8, cdf=0.5, sim=0.5),
    MaskCase("topk_partial_blocks", 1, 2, 33, 70, 16, 8, 8, topk=0.3),
    MaskCase("topk_block_q_ne_block_k", 2, 2, 48, 65, 8, 8, 16, topk=0.5),
    MaskCase("topk_with_sim", 1, 3, 39, 60, 16, 16, 8, topk=0.25, sim=0.5),
]
mask_cases = pytest.mark.parametrize("case", MASK_CASES, ids=[c.id for c in MASK_CASES])


def _with_block_offsets(rng: np.random.Generator, b: int, h: int, n: int, d: int, block: int) -> np.ndarray:
    """Noise plus one random offset per block (3 times the noise), a quarter of the blocks without one: block
    means then differ clearly, and offset blocks are self-similar while the bare ones are not."""
    blocks = _blocks_of(n, block)
    offsets = 3.0 * rng.standard_normal((b, h, blocks, d)) * (rng.random((b, h, blocks, 1)) > 0.25)
    tokens = np.repeat(offsets, block, axis=2)[:, :, :n]
    return (rng.standard_normal((b, h, n, d)) + tokens).astype(np.float32)


def _mask_inputs(case: MaskCase) -> dict[str, np.ndarray]:
    rng = _rng(case.id)
    return {"q": _with_block_offsets(rng, case.b, case.h, case.l, case.d, case.block_q),
            "k": _with_block_offsets(rng, case.b, case.h, case.s, case.d, case.block_k)}


def _mask_attrs(case: MaskCase) -> dict[str, Any]:
    return {"block_q": case.block_q, "block_k": case.block_k, "scale": float(np.float32(case.d ** -0.5)),
            "cdf": case.cdf, "topk": case.topk, "sim": case.sim}


LIST_OUTPUTS = (("kv_count", np.int64, 3), ("kv_index", np.int64, 4))


def _decomposed_lists(op: str, feeds: dict[str, np.ndarray], **attrs: Any) -> tuple[np.ndarray, np.ndarray]:
    count, index = _run_all(decompose_custom_nodes(_one_node_model(op, feeds, LIST_OUTPUTS, **attrs)), feeds)
    return count, index


DECISION_MARGIN = 1e-5
"""Every MeanSimMask decision of the cases stays this far from its threshold (relative, for topk's ranks), so
float32 summation order (onnxruntime's against torch's, or another thread count) cannot flip one."""


def _decision_margin(case: MaskCase, q: np.ndarray, k: np.ndarray) -> float:
    """The closest call the case's rule makes: cumulative mass to cdf, the kept/dropped rank gap for topk,
    block self-similarity to sim."""
    pooled = _pooled_softmax(q, k, case.block_q, case.block_k, float(np.float32(case.d ** -0.5)))
    ranked = -np.sort(-pooled, axis=-1)
    margins = []
    if case.cdf:
        margins.append(np.abs(np.cumsum(ranked, axis=-1) - ranked - case.cdf).min())
    if case.topk:
        kept = int(np.ceil(np.float32(ranked.shape[-1]) * np.float32(case.topk)))
        if kept < ranked.shape[-1]:
            margins.append(((ranked[..., kept - 1] - ranked[..., kept]) / ranked[..., kept - 1]).min())
    if case.sim:
        q_, k_ = torch.from_numpy(q), torch.from_numpy(k)
        similarity = torch.cat([ref.block_similarity(q_, case.block_q).flatten(),
                                ref.block_similarity(k_, case.block_k).flatten()])
        margins.append(float((similarity - case.sim).abs().min()))
    return float(min(margins))


def _density(count: np.ndarray, key_blocks: int) -> float:
    return float(count.sum()) / (count.size * key_blocks)


@mask_cases
def test_mean_sim_mask_decomposition_matches_reference_exactly(case: MaskCase):
    feeds = _mask_inputs(case)
    assert _decision_margin(case, feeds["q"], feeds["k"]) > DECISION_MARGIN
    count, index = _decomposed_lists("MeanSimMask", feeds, **_mask_attrs(case))
    q, k = (torch.from_numpy(feeds[n]) for n in ("q", "k"))
    expected_count, expected_index = ref.mean_sim_mask_reference(q, k, **_mask_attrs(case))
    np.testing.assert_array_equal(count, expected_count.numpy())
    np.testing.assert_array_equal(index, expected_index.numpy())
    assert 0 < _density(count, _blocks_of(case.s, case.block_k)) < 1


@pytest.mark.parametrize("case", [c for c in MASK_CASES if c.sim], ids=[c.id for c in MASK_CASES if c.sim])
def test_sim_filter_adds_blocks_in_the_cases_that_use_it(case: MaskCase):
    q, k = (torch.from_numpy(x) for x in _mask_inputs(case).values())
    attrs = _mask_attrs(case)
    filtered = ref.mean_sim_keep(q, k, **attrs)
    unfiltered = ref.mean_sim_keep(q, k, **{**attrs, "sim": 0.0})
    assert bool((filtered & ~unfiltered).any()) and bool((~filtered).any())
    assert not bool((unfiltered & ~filtered).any())


def _pooled_softmax(q: np.ndarray, k: np.ndarray, block_q: int, block_k: int, scale: float) -> np.ndarray:
    """[B, H, QB, KB]: softmax of scale * (block means of q) (block means of k)^T, float64, by plain loops."""
    def means(x: np.ndarray, block: int) -> np.ndarray:
        starts = range(0, x.shape[2], block)
        return np.stack([x[:, :, i:i + block].astype(np.float64).mean(axis=2) for i in starts], axis=2)

    scores = scale * np.einsum("bhid,bhjd->bhij", means(q, block_q), means(k, block_k))
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("cdf", [0.3, 0.6, 0.95])
@pytest.mark.parametrize("case", [c for c in MASK_CASES if c.cdf and not c.sim],
                         ids=[c.id for c in MASK_CASES if c.cdf and not c.sim])
def test_cdf_mode_keeps_the_fewest_largest_blocks_reaching_the_mass(case: MaskCase, cdf: float):
    feeds = _mask_inputs(case)
    attrs = {**_mask_attrs(case), "cdf": cdf}
    count, index = _decomposed_lists("MeanSimMask", feeds, **attrs)
    pooled = _pooled_softmax(feeds["q"], feeds["k"], case.block_q, case.block_k, attrs["scale"])
    eps = 1e-5
    for row in np.ndindex(*count.shape):
        p, n = pooled[row], int(count[row])
        kept = np.zeros(p.shape, bool)
        kept[index[row][:n]] = True
        assert n >= 1
        assert p[kept].sum() >= cdf - eps, f"row {row}: kept mass {p[kept].sum()} below {cdf}"
        assert p[kept].sum() - p[kept].min() < cdf + eps, f"row {row}: a smaller list reaches {cdf}"
        assert p[kept].min() >= p[~kept].max(initial=0.0) - eps, f"row {row}: a larger block was dropped"
    assert 0 < _density(count, pooled.shape[-1]) < 1


# ------------------------------------------------------------------------------------------------ BlockMaskIndex


def _block_mask(shape: tuple[int, ...], key: str) -> np.ndarray:
    """A random block mask with the first row of every (batch, head) all false and the last all true."""
    mask = _rng(key).random(shape) < 0.4
    mask[..., 0, :] = False
    mask[..., -1, :] = True
    return mask


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 4, 6), (2, 1, 3, 1), (1, 2, 6, 9)], ids=str)
def test_block_mask_index_matches_kept_lists(shape: tuple[int, ...]):
    mask = _block_mask(shape, str(shape))
    count, index = _decomposed_lists("BlockMaskIndex", {"mask": mask})
    expected_count, expected_index = ref.kept_lists(torch.from_numpy(mask))
    np.testing.assert_array_equal(count, expected_count.numpy())
    np.testing.assert_array_equal(index, expected_index.numpy())
    for row in np.ndindex(*shape[:-1]):
        np.testing.assert_array_equal(index[row][:count[row]], np.flatnonzero(mask[row]))
    assert (count[..., 0] == 0).all()


# ------------------------------------------------------------------------------------------------ TileWindowMask


TILE_CASES = [  # grid (T, H, W), tile, window (in tiles)
    ((4, 6, 8), (2, 2, 2), (1, 3, 3)),
    ((4, 4, 4), (1, 2, 2), (3, 1, 2)),
    ((2, 6, 10), (2, 3, 5), (3, 5, 5)),
    ((3, 8, 8), (1, 4, 2), (2, 2, 3)),
]
tile_cases = pytest.mark.parametrize(("grid", "tile", "window"), TILE_CASES, ids=[str(c) for c in TILE_CASES])


def _naive_tile_window(grid: Sequence[int], tile: Sequence[int],
                       window: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The clamped window by definition: per query tile and axis, `span` tiles starting at pos - span // 2
    clamped to [0, tiles - span] (span = the window, or the axis when it is shorter)."""
    tiles = [g // t for g, t in zip(grid, tile, strict=True)]
    spans = [min(w, n) for w, n in zip(window, tiles, strict=True)]
    rows = []
    for pos in itertools.product(*(range(n) for n in tiles)):
        starts = [min(max(p - s // 2, 0), n - s) for p, s, n in zip(pos, spans, tiles, strict=True)]
        listed = []
        for t in range(starts[0], starts[0] + spans[0]):
            for h in range(starts[1], starts[1] + spans[1]):
                for w in range(starts[2], starts[2] + spans[2]):
                    listed.append((t * tiles[1] + h) * tiles[2] + w)
        rows.append(sorted(listed))
    index = np.array(rows, np.int64)[None, None]
    return np.full((1, 1, len(rows)), index.shape[-1], np.int64), index


def _naive_tile_order(grid: Sequence[int], tile: Sequence[int]) -> np.ndarray:
    """Raster token indices, tile by tile in raster order, each tile's tokens in raster order."""
    tiles = [g // t for g, t in zip(grid, tile, strict=True)]
    order = []
    for tt, th, tw in itertools.product(*(range(n) for n in tiles)):
        for i, j, k in itertools.product(*(range(t) for t in tile)):
            order.append(((tt * tile[0] + i) * grid[1] + th * tile[1] + j) * grid[2] + tw * tile[2] + k)
    return np.array(order)


@tile_cases
def test_tile_window_lists_match_the_naive_window(grid: tuple, tile: tuple, window: tuple):
    count, index = bsa.tile_window_lists(grid, tile, window)
    expected_count, expected_index = _naive_tile_window(grid, tile, window)
    np.testing.assert_array_equal(count, expected_count)
    np.testing.assert_array_equal(index, expected_index)
    assert count.dtype == index.dtype == np.int64


@tile_cases
def test_tile_order_is_a_permutation_making_tiles_contiguous(grid: tuple, tile: tuple, window: tuple):
    order = bsa.tile_order(grid, tile)
    np.testing.assert_array_equal(np.sort(order), np.arange(int(np.prod(grid))))
    np.testing.assert_array_equal(order, _naive_tile_order(grid, tile))
    coords = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    per_tile = (coords[order] // np.array(tile)).reshape(-1, int(np.prod(tile)), 3)
    assert (per_tile == per_tile[:, :1]).all(), "a run of tile-size tokens spans two tiles"
    assert len({tuple(t) for t in per_tile[:, 0]}) == len(per_tile)


@tile_cases
def test_tile_window_mask_decomposition_outputs_the_lists(grid: tuple, tile: tuple, window: tuple):
    count, index = _decomposed_lists("TileWindowMask", {}, grid=list(grid), tile=list(tile), window=list(window))
    expected_count, expected_index = bsa.tile_window_lists(grid, tile, window)
    np.testing.assert_array_equal(count, expected_count)
    np.testing.assert_array_equal(index, expected_index)


def test_tile_that_does_not_divide_the_grid_is_a_plugin_error():
    with pytest.raises(PluginError, match=r"tile 3x2x2 does not divide the token grid 4x6x8"):
        bsa.tile_window_lists((4, 6, 8), (3, 2, 2), (1, 1, 1))
    with pytest.raises(PluginError, match=r"tile 2x4x2 does not divide the token grid 4x6x8"):
        bsa.tile_order((4, 6, 8), (2, 4, 2))
    model = _one_node_model("TileWindowMask", {}, LIST_OUTPUTS, grid=[4, 6, 8], tile=[2, 2, 3], window=[1, 1, 1])
    with pytest.raises(PluginError, match=r"tile 2x2x3 does not divide the token grid 4x6x8"):
        decompose_custom_nodes(model)


# ------------------------------------------------------------------------------------------------ dense equivalent


def _two_attention_model(case: AttentionCase, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Two BlockSparseAttention nodes on the same inputs: "made_dense" writes `dense_out`, "kept_sparse"
    writes `sparse_out`."""
    inputs = [gs.Variable(name, dtype=value.dtype, shape=[None] * value.ndim) for name, value in feeds.items()]
    outputs = [gs.Variable(name, dtype=np.float32, shape=[None] * 4) for name in ("dense_out", "sparse_out")]
    nodes: list[gs.Node] = []
    for name, out in zip(("made_dense", "kept_sparse"), outputs, strict=True):
        registry().get("BlockSparseAttention").emit(Builder(nodes, ""), inputs, out, name=name, **_attrs(case))
    return gs.export_onnx(gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=bsa.FP8_OPSET))


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_dense_equivalent_makes_the_named_sparse_fp8_node_dense_float_attention():
    case = AttentionCase("dense_equivalent", 2, 2, 37, 45, 8, 8, 16, 16, fp8="e4m3", given_scales=True)
    feeds = _attention_feeds(case)
    model = _two_attention_model(case, feeds)
    dense_model = bsa.dense_equivalent(model, {"made_dense"})
    used = {value.name for value in dense_model.graph.input}
    dense_out, sparse_out = _run_all(decompose_custom_nodes(dense_model), {n: x for n, x in feeds.items() if n in used})
    dense = _softmax_attention(feeds["q"], feeds["k"], feeds["v"], _scale(case))
    assert _max_abs_error(dense_out, dense) <= TOLERANCE
    assert _max_abs_error(sparse_out, _reference(case, feeds)) <= TOLERANCE, "an unnamed node must stay as it was"
    assert _max_abs_error(sparse_out, dense) > 0.05, "the sparse node must differ, or the test shows nothing"
    assert [_attributes(node)["fp8"] for node in model.graph.node] == [b"e4m3"] * 2
    assert [len(node.input) for node in model.graph.node] == [8, 8], "the given model must be left as it was"


def test_dense_equivalent_of_a_model_without_the_named_nodes_is_the_model_itself():
    case = ATTENTION_CASES[0]
    feeds = _attention_feeds(case)
    mask = _one_node_model("BlockMaskIndex", {"mask": np.zeros((1, 1, 2, 2), bool)}, LIST_OUTPUTS)
    attention = plugin_model("BlockSparseAttention", feeds, 4, **_attrs(case))
    decomposed = decompose_custom_nodes(attention)
    assert bsa.dense_equivalent(mask, {"BlockSparseAttention"}) is mask
    assert bsa.dense_equivalent(decomposed, {"BlockSparseAttention"}) is decomposed
    assert bsa.dense_equivalent(attention, set()) is attention
    assert bsa.dense_equivalent(attention, {"another_node"}) is attention


# ------------------------------------------------------------------------------------------------ MACs, shapes


def test_attention_macs_are_the_dense_attention():
    b, h, l, s, d, dv = 2, 3, 37, 45, 8, 5  # noqa: E741
    inputs = [(b, h, l, d), (b, h, s, d), (b, h, s, dv), (1, 1, 3), (1, 1, 3, 4)]
    macs = registry().get("BlockSparseAttention").macs(inputs, [(b, h, l, dv)], block_q=16, block_k=16, scale=0.5,
                                                       fp8="off")
    assert macs == b * h * l * s * (d + dv) == 2 * 3 * 37 * 45 * 13


def test_attention_shape_is_b_h_l_dv():
    shape = registry().get("BlockSparseAttention").shape((2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 5), (1, 1, 3),
                                                         (1, 1, 3, 4), block_q=16, block_k=16, scale=0.5, fp8="off")
    assert tuple(shape) == (2, 3, 37, 5)


# ------------------------------------------------------------------------------------------------ input checks


def _list_check_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1,1,20,4] in blocks of 8 (QB = 3), k [1,1,20,4] in blocks of 8 (KB = 3), valid lists of 2 slots."""
    q = k = torch.zeros(1, 1, 20, 4)
    return q, k, torch.tensor([[[2, 1, 0]]]), torch.tensor([[[[2, 0], [1, 5], [-1, 9]]]])


def _set(x: torch.Tensor, position: tuple[int, ...], value: int) -> torch.Tensor:
    """A copy of x with one element changed."""
    x = x.clone()
    x[position] = value
    return x


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c, i: (c, _set(i, (0, 0, 0, 1), 3)), r"outside \[0, 3\)"),  # row 0 lists 2 slots
    (lambda c, i: (c, _set(i, (0, 0, 1, 0), -1)), r"outside \[0, 3\)"),  # row 1 lists 1 slot
    (lambda c, i: (_set(c, (0, 0, 2), 3), i), "exceeds the 2 slots"),
    (lambda c, i: (torch.cat([c, c[..., :1]], -1), i), "needs lists for 3 query blocks"),
    (lambda c, i: (c, i[..., :2, :]), "needs lists for 3 query blocks"),
], ids=["index_past_kb", "negative_index", "count_above_slots", "count_for_4_blocks", "index_for_2_blocks"])
def test_check_lists_rejects_bad_lists(edit: Any, match: str):
    q, k, count, index = _list_check_inputs()
    count, index = edit(count, index)
    with pytest.raises(PluginError, match=match):
        ref.check_lists(q, k, count, index, 8, 8)
    with pytest.raises(PluginError, match=match):
        ref.block_sparse_attention_reference(q, k, q, count, index, 8, 8, 0.5)


def test_check_lists_rejects_lists_broadcast_differently():
    q, k, count, index = _list_check_inputs()
    with pytest.raises(PluginError, match=r"with the same B' and H', got \(2, 1, 3\) and \(1, 1, 3, 2\)"):
        ref.check_lists(q, k, count.expand(2, 1, 3), index, 8, 8)


def test_check_lists_ignores_unlisted_slots():
    """The valid lists above hold -1, 5 and 9 in slots past their count: accepted, the doc says they are ignored."""
    q, k, count, index = _list_check_inputs()
    ref.check_lists(q, k, count, index, 8, 8)


@pytest.mark.parametrize("fp8", ["e4m3fn", "fp16", "E4M3"])
def test_check_fp8_rejects_an_unknown_format(fp8: str):
    with pytest.raises(PluginError, match=f"fp8 is '{fp8}'; use off, e4m3, e5m2"):
        ref.check_fp8(fp8)


@pytest.mark.parametrize("fp8", ["off", "e4m3", "e5m2"])
def test_check_fp8_accepts_the_formats(fp8: str):
    ref.check_fp8(fp8)
