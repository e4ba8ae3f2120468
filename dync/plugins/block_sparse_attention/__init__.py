"""BlockSparseAttention and its mask producers: softmax attention that skips whole blocks of keys, optionally on
FP8-rounded operands, for diffusion transformers over tens of thousands of tokens.

**BlockSparseAttention**`(q [B,H,L,D], k [B,H,S,D], v [B,H,S,Dv], kv_count [B',H',QB], kv_index [B',H',QB,M]
[, q_scale [B,H,QB], k_scale [B,H,KB], v_scale [B,H,Dv]]) -> [B,H,L,Dv]`, attributes `block_q`, `block_k`,
`scale`, `fp8` (`off`, `e4m3`, `e5m2`):

* query block i holds queries `[i*block_q, (i+1)*block_q)`, key block j keys `[j*block_k, (j+1)*block_k)`;
  `QB = ceil(L / block_q)`, `KB = ceil(S / block_k)`: a last partial block is padded and its padding masked,
  exactly (padded keys get no weight, padded queries are dropped);
* the queries of block i attend the keys of the blocks `kv_index[b, h, i, j]` for `j < kv_count[b, h, i]`
  (distinct, in `[0, KB)`, any order; later slots are ignored); B' and H' are B and H or 1 (broadcast);
* `out = softmax(scale * q k^T over those keys) v`; a query block with `kv_count = 0` outputs **zeros** (no
  key, no weight: what a block-sparse kernel's empty loop gives, rather than a division by zero);
* with `fp8`, Q and K are rounded per tile (one scale per block of tokens of one head) and V per channel
  (one scale per value channel of one head over all keys): `x8 = round(x / s)` to the format, nearest with
  ties to even, saturating at its max (448 for e4m3, 57344 for e5m2); the attention then runs on `x8 * s`
  in float. Scales are the optional inputs when given (calibrated), else `amax / max` of the tile or channel
  (1 for an all-zero one). In ONNX this is `Cast(to=float8, saturate=1)` and back (opset 19), not
  Quantize/DequantizeLinear: a Cast pair offers onnxruntime's QDQ fusions nothing to take (its CPU
  optimizer has fused an fp8 DequantizeLinear before a MatMul into MatMulIntegerToFloat, which rejects
  fp8; 1.32 no longer does), and it rounds bit-identically to torch's cast at every optimization level.

The mask producers write `(kv_count, kv_index)` with the kept blocks first, in ascending order:

* **TileWindowMask** (no inputs): a static 3-D sliding tile window. Tokens form a `T x H x W` grid in tile
  order (tiles of `tile` tokens in raster order, tokens in a tile in raster order; `tile_order` is the
  permutation from raster order); each query tile attends the `window` tiles around it, the window shifted
  inward at the grid's edges (clamped), so every row lists the same number of tiles;
* **MeanSimMask**`(q, k)`: per input, from mean-pooled blocks. `p = softmax(scale * mean(q_i) mean(k_j)^T)`
  over key blocks; with `cdf` in (0, 1], the blocks of each row sorted by p (descending, ties by index) are
  kept while the mass before them is below `cdf` (so at least one); with `topk` in (0, 1] instead, the
  `ceil(topk * KB)` largest (in float32). With `sim` in (0, 1], a query block whose tokens are not
  self-similar (mean pairwise cosine, self pairs included, below `sim`) keeps its whole row, and such a key
  block is kept in every row;
* **BlockMaskIndex**`(mask [B',H',QB,KB] bool)`: a given block mask as lists.

This module holds the ONNX faces (decompositions, shapes, MACs) and `dense_equivalent`; `reference.py` the
PyTorch custom ops, `kernels.py` the Triton kernels, `trt.py` the TensorRT plugin of BlockSparseAttention.
The mask producers have no plugins: TensorRT runs their decompositions.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.errors import PluginError
from dync.graph import Builder, export_graph, import_graph
from dync.plugins.op_registry import Face, OpRecord

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_ONNX = {"e4m3": onnx.TensorProto.FLOAT8E4M3FN, "e5m2": onnx.TensorProto.FLOAT8E5M2}
FP8_OPSET = 19
"""Cast to and from float8 types, with `saturate`."""
GATHER_BUDGET = 1 << 22
"""Elements of gathered keys (and of values) per loop iteration of the decomposition: 16 MiB in float32,
whatever the sequence length, so a 32k-token layer never materializes its keys once per query block."""
SIMILARITY_EPS = 1e-6


# --------------------------------------------------------------------------------------------- shape helpers


def _dim(b: Builder, name: str, x: gs.Tensor, axis: int) -> gs.Tensor:
    """x.shape[axis] as a 1-D int64 tensor of one element."""
    return b.op("Shape", name, [x], start=axis, end=axis + 1)


def _ceil_div(b: Builder, name: str, n: gs.Tensor, d: gs.Tensor | int) -> gs.Tensor:
    """ceil(n / d) for a 1-D int64 tensor n of one element and a divisor given as such a tensor or an int."""
    divisor = b.const(f"{name}_d", [d]) if isinstance(d, int) else d
    up = b.op("Sub", f"{name}_up", [b.op("Add", f"{name}_sum", [n, divisor]), b.const(f"{name}_1", [1])])
    return b.op("Div", name, [up, divisor])


def _pad_axis2(b: Builder, name: str, x: gs.Tensor, missing: gs.Tensor) -> gs.Tensor:
    """Rank-4 x with `missing` zero rows appended on axis 2."""
    pads = b.op("Concat", f"{name}_pads", [b.const(f"{name}_head", [0, 0, 0, 0, 0, 0]), missing,
                                           b.const(f"{name}_tail", [0])], axis=0)
    return b.op("Pad", f"{name}_pad", [x, pads])


def _blocks(b: Builder, name: str, x: gs.Tensor, count: gs.Tensor, block: int) -> gs.Tensor:
    """[B, H, N, D] zero-padded to `count` whole blocks, as [B, H, count, block, D]."""
    full = b.op("Mul", f"{name}_full", [count, b.const(f"{name}_bs", [block])])
    padded = _pad_axis2(b, name, x, b.op("Sub", f"{name}_missing", [full, _dim(b, f"{name}_n", x, 2)]))
    shape = b.op("Concat", f"{name}_shape", [b.const(f"{name}_bh", [0, 0]), count,
                                             b.const(f"{name}_rest", [block, -1])], axis=0)
    return b.op("Reshape", f"{name}_blocks", [padded, shape])


def _unblocked(b: Builder, name: str, blocks: gs.Tensor, like: gs.Tensor) -> gs.Tensor:
    """[B, H, NB, block, D] back to [B, H, N, D] with `like`'s N (the padding cut off)."""
    shape = b.op("Concat", f"{name}_shape", [b.const(f"{name}_lead", [0, 0, -1]),
                                             b.op("Shape", f"{name}_d", [blocks], start=-1)], axis=0)
    merged = b.op("Reshape", f"{name}_merged", [blocks, shape])
    return b.op("Slice", f"{name}_cut", [merged, b.const(f"{name}_start", [0]), _dim(b, f"{name}_n", like, 2),
                                         b.const(f"{name}_axis", [2])])


# --------------------------------------------------------------------------------------------- fp8 rounding


def _rounded(b: Builder, name: str, x: gs.Tensor, scale: gs.Tensor, fp8: str) -> gs.Tensor:
    """x / scale rounded to the fp8 format (nearest even, saturating), times scale, in x's dtype."""
    fmax = FP8_MAX[fp8]
    bounds = [b.const(f"{name}_lo", -fmax, np.float32), b.const(f"{name}_hi", fmax, np.float32)]
    scaled = b.op("Clip", f"{name}_clip", [b.op("Div", f"{name}_div", [x, scale]), *bounds])
    low = b.op("Cast", f"{name}_fp8", [scaled], to=FP8_ONNX[fp8], saturate=1)
    return b.op("Mul", f"{name}_dequant", [b.op("CastLike", f"{name}_back", [low, x]), scale])


def _amax_scale(b: Builder, name: str, x: gs.Tensor, axes: Sequence[int], fp8: str) -> gs.Tensor:
    """amax over `axes` (kept) / the format's max; 1 where the amax is 0."""
    amax = b.op("ReduceMax", f"{name}_amax", [b.op("Abs", f"{name}_abs", [x]), b.const(f"{name}_axes", list(axes))],
                keepdims=1)
    ratio = b.op("Div", f"{name}_ratio", [amax, b.const(f"{name}_max", FP8_MAX[fp8], np.float32)])
    positive = b.op("Greater", f"{name}_positive", [amax, b.const(f"{name}_zero", 0.0, np.float32)])
    return b.op("Where", f"{name}_scale", [positive, ratio, b.const(f"{name}_one", 1.0, np.float32)])


def _present(inputs: Sequence[gs.Tensor], i: int) -> gs.Tensor | None:
    """Optional input i, None when omitted (absent or named "")."""
    return inputs[i] if len(inputs) > i and inputs[i].name else None


def _rounded_tiles(b: Builder, name: str, x: gs.Tensor, count: gs.Tensor, block: int, scale: gs.Tensor | None,
                   fp8: str) -> gs.Tensor:
    """x rounded per tile of `block` tokens of one head (scales [B, H, NB] given, or from the amax)."""
    tiles = _blocks(b, name, x, count, block)
    per_tile = _amax_scale(b, name, tiles, [3, 4], fp8) if scale is None else \
        b.op("Unsqueeze", f"{name}_scale5", [scale, b.const(f"{name}_axes34", [3, 4])])
    return _unblocked(b, f"{name}_tokens", _rounded(b, name, tiles, per_tile, fp8), x)


def _rounded_channels(b: Builder, name: str, v: gs.Tensor, scale: gs.Tensor | None, fp8: str) -> gs.Tensor:
    """v rounded per channel of one head (scales [B, H, Dv] given, or from the amax over the keys)."""
    per_channel = _amax_scale(b, name, v, [2], fp8) if scale is None else \
        b.op("Unsqueeze", f"{name}_scale4", [scale, b.const(f"{name}_axis2", [2])])
    return _rounded(b, name, v, per_channel, fp8)


# --------------------------------------------------------------------------------------------- the attention


def decompose_block_sparse_attention(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *,
                                     block_q: int, block_k: int, scale: float, fp8: str = "off") -> None:
    """BlockSparseAttention from standard ops, doing only the listed blocks' work.

    Rows are (batch, head, query block); a Loop takes them in chunks of at most one head's rows, sized so
    that the keys and values it gathers stay within GATHER_BUDGET elements. Per chunk: the listed key blocks
    are gathered (as many slots as the chunk's longest list), then MatMul, Softmax, MatMul, with unlisted
    slots and keys past S masked (`_chunk_body` has the chunk's three forms).
    """
    q, k, v, count, index = inputs[:5]
    qb = _ceil_div(b, "qb", _dim(b, "l", q, 2), block_q)
    kb = _ceil_div(b, "kb", _dim(b, "s", k, 2), block_k)
    if fp8 != "off":
        q = _rounded_tiles(b, "q8", q, qb, block_q, _present(inputs, 5), fp8)
        k = _rounded_tiles(b, "k8", k, kb, block_k, _present(inputs, 6), fp8)
        v = _rounded_channels(b, "v8", v, _present(inputs, 7), fp8)
    rows = _Rows.of(b, q, k, v, count, index, qb, kb, block_q, block_k)
    trips = b.op("Squeeze", "trips", [rows.iterations])
    chunks = b.op("Loop", "loop", [trips, gs.Constant(b.prefix + "cond", np.array(True))],
                  body=_chunk_body(b, rows, scale))
    dv = _dim(b, "dv_out", v, 3)
    per_row = b.op("Reshape", "per_row", [chunks, b.op("Concat", "row_shape", [b.const("row_dims", [-1, block_q]), dv],
                                                       axis=0)])
    kept = b.op("Slice", "kept_rows", [per_row, b.const("zero", [0]), rows.count_rows, b.const("axis0", [0])])
    bh = b.op("Shape", "bh", [q], start=0, end=2)
    full = b.op("Reshape", "tokens_out", [kept, b.op("Concat", "out_shape", [bh, b.const("tokens", [-1]), dv], axis=0)])
    b.op("Slice", "out", [full, b.const("start", [0]), _dim(b, "l_out", q, 2), b.const("axis2", [2])],
         out=outputs[0])


class _Rows:
    """The decomposition's flat view: one row per (batch, head, query block), every tensor the loop reads,
    padded with empty rows to whole chunks (an empty row outputs zeros and is cut off after the loop)."""

    def __init__(self, **tensors: gs.Tensor) -> None:
        self.__dict__.update(tensors)

    @classmethod
    def of(cls, b: Builder, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, count: gs.Tensor, index: gs.Tensor,
           qb: gs.Tensor, kb: gs.Tensor, block_q: int, block_k: int) -> _Rows:
        bh = b.op("Shape", "bh_dims", [q], start=0, end=2)
        heads = b.op("ReduceProd", "bh_count", [bh], keepdims=1)
        count_rows = b.op("Mul", "rows", [heads, qb])
        slots = _dim(b, "m", index, 3)
        counts = _flat(b, "counts", count, [bh, qb], [b.const("flat", [-1])])
        flat_index = _flat(b, "index", index, [bh, qb, slots], [b.const("rows_any", [-1]), slots])
        width = b.op("Max", "width", [_dim(b, "d", q, 3), _dim(b, "dv", v, 3)])
        chunk = _chunk_rows(b, counts, width, block_k, qb)
        iterations = b.op("Max", "iterations", [_ceil_div(b, "chunks", count_rows, chunk), b.const("once", [1])])
        padded_rows = b.op("Mul", "padded_rows", [iterations, chunk])
        extra = b.op("Sub", "extra_rows", [padded_rows, count_rows])
        q_rows = _pad_rows(b, "q_rows", _as_rows(b, "q_rows", _blocks(b, "qblk", q, qb, block_q), block_q), extra, 3)
        counts = _pad_rows(b, "counts", counts, extra, 1)
        listed = b.op("Less", "listed", [_range(b, "slot", slots),
                                         b.op("Unsqueeze", "counts_col", [counts, b.const("ax1", [1])])])
        flat_index = _pad_rows(b, "index", flat_index, extra, 2)
        safe_index = b.op("Where", "safe_index", [listed, flat_index, b.const("i0", 0)])
        last_bh = b.op("Sub", "last_bh", [heads, b.const("one_bh", [1])])
        row_bh = b.op("Min", "row_bh", [b.op("Div", "row_bh_all", [_range(b, "row", padded_rows), qb]), last_bh])
        first_block = b.op("Unsqueeze", "row_base", [b.op("Mul", "row_first_block", [row_bh, kb]),
                                                     b.const("ax1b", [1])])
        return cls(iterations=iterations, chunk=chunk, count_rows=count_rows, q_rows=q_rows, counts=counts,
                   row_bh=row_bh, key_blocks=kb, k_heads=_heads(b, "k_heads", k), v_heads=_heads(b, "v_heads", v),
                   global_index=b.op("Add", "global_index", [safe_index, first_block]), local_index=safe_index,
                   slot_bias=_bias(b, "slot_bias", listed), key_bias=_key_bias(b, k, kb, block_k),
                   whole_keys=_whole_keys(b, k, block_k),
                   k_rows=_as_rows(b, "k_rows", _blocks(b, "kblk", k, kb, block_k), block_k),
                   v_rows=_as_rows(b, "v_rows", _blocks(b, "vblk", v, kb, block_k), block_k))


def _heads(b: Builder, name: str, x: gs.Tensor) -> gs.Tensor:
    """[B, H, S, D] as [B * H, S, D]."""
    shape = b.op("Concat", f"{name}_shape", [b.const(f"{name}_lead", [-1]),
                                             b.op("Shape", f"{name}_sd", [x], start=2)], axis=0)
    return b.op("Reshape", name, [x, shape])


def _flat(b: Builder, name: str, lists: gs.Tensor, full: list[gs.Tensor], flat: list[gs.Tensor]) -> gs.Tensor:
    """A list tensor broadcast to its full [B, H, QB, ...] shape, reshaped to rows."""
    expanded = b.op("Expand", f"{name}_all", [lists, b.op("Concat", f"{name}_full", full, axis=0)])
    return b.op("Reshape", f"{name}_rows", [expanded, b.op("Concat", f"{name}_flat", flat, axis=0)])


def _chunk_rows(b: Builder, counts: gs.Tensor, width: gs.Tensor, block_k: int, qb: gs.Tensor) -> gs.Tensor:
    """Rows per loop iteration: as many as keep the gathered keys of the longest list within GATHER_BUDGET, and
    at most one head's query blocks, so that a head listing every block is one chunk of its own (the dense
    form) at any sequence length."""
    longest = b.op("Max", "longest", [b.op("ReduceMax", "most", [counts], keepdims=1), b.const("one", [1])])
    per_row = b.op("Mul", "row_elems", [b.op("Mul", "row_keys", [longest, b.const("bk", [block_k])]), width])
    fit = b.op("Min", "fit", [b.op("Div", "fit_budget", [b.const("budget", [GATHER_BUDGET]), per_row]), qb])
    return b.op("Max", "chunk", [fit, b.const("one_row", [1])])


def _pad_rows(b: Builder, name: str, x: gs.Tensor, extra: gs.Tensor, rank: int) -> gs.Tensor:
    """x with `extra` zero rows appended on axis 0."""
    pads = [b.const(f"{name}_before", [0] * rank), extra, *([b.const(f"{name}_after", [0] * (rank - 1))] if rank > 1
                                                            else [])]
    return b.op("Pad", f"{name}_padded", [x, b.op("Concat", f"{name}_pads", pads, axis=0)])


def _range(b: Builder, name: str, end: gs.Tensor) -> gs.Tensor:
    """0, 1, ..., end - 1 for a 1-D int64 `end` of one element."""
    return b.op("Range", name, [b.const(f"{name}_0", 0), b.op("Squeeze", f"{name}_end", [end]),
                                b.const(f"{name}_1", 1)])


def _bias(b: Builder, name: str, allowed: gs.Tensor) -> gs.Tensor:
    """0 where allowed, -inf elsewhere (float32)."""
    return b.op("Where", name, [allowed, b.const(f"{name}_0", 0.0, np.float32), b.const(f"{name}_inf", -np.inf,
                                                                                          np.float32)])


def _whole_keys(b: Builder, k: gs.Tensor, block_k: int) -> gs.Tensor:
    """[1] bool: the keys fill their blocks (no padding to mask)."""
    tail = b.op("Mod", "key_tail_len", [_dim(b, "s3", k, 2), b.const("bk3", [block_k])])
    return b.op("Equal", "whole_keys", [tail, b.const("no_tail", [0])])


def _key_bias(b: Builder, k: gs.Tensor, kb: gs.Tensor, block_k: int) -> gs.Tensor:
    """[KB, block_k]: -inf on the padding past the last key."""
    slots = b.op("Mul", "key_slots", [kb, b.const("bk2", [block_k])])
    valid = b.op("Less", "key_valid", [_range(b, "key", slots), b.op("Squeeze", "s_scalar", [_dim(b, "s2", k, 2)])])
    return b.op("Reshape", "key_bias", [_bias(b, "key_bias_flat", valid), b.const("key_bias_shape", [-1, block_k])])


def _as_rows(b: Builder, name: str, blocks: gs.Tensor, block: int) -> gs.Tensor:
    """[B, H, NB, block, D] as [B * H * NB, block, D]."""
    shape = b.op("Concat", f"{name}_shape", [b.const(f"{name}_lead", [-1, block]),
                                             b.op("Shape", f"{name}_d", [blocks], start=-1)], axis=0)
    return b.op("Reshape", name, [blocks, shape])


def _gathered(c: Builder, name: str, rows: gs.Tensor, index: gs.Tensor) -> gs.Tensor:
    """The listed blocks of `rows` [R, block, D] for each of the chunk's rows: [chunk, slots * block, D]."""
    shape = c.op("Concat", f"{name}_shape", [c.const(f"{name}_lead", [0, -1]),
                                             c.op("Shape", f"{name}_d", [rows], start=-1)], axis=0)
    return c.op("Reshape", name, [c.op("Gather", f"{name}_blocks", [rows, index], axis=0), shape])


def _chunk_body(b: Builder, rows: _Rows, scale: float) -> gs.Graph:
    """The Loop body: attention for rows [i * chunk, (i + 1) * chunk), out as [chunk, block_q, Dv].

    Three forms, chosen per chunk by Ifs: where the chunk's rows are of one head, list every block and no key
    is padding, it is that head's dense attention, one GEMM pair with no gathering; where every row lists
    as many blocks and no key is padding, gathered blocks need no mask; otherwise the mask (unlisted slots,
    padded keys) is added and empty rows are zeroed.
    """
    nodes: list[gs.Node] = []
    c = Builder(nodes, f"{b.prefix}chunk/")
    step = gs.Variable(f"{b.prefix}chunk/i", dtype=np.int64, shape=[])
    cond = gs.Variable(f"{b.prefix}chunk/cond_in", dtype=np.bool_, shape=[])
    first = c.op("Mul", "first", [c.op("Unsqueeze", "i1", [step, c.const("ax0", [0])]), rows.chunk])
    end = c.op("Add", "end", [first, rows.chunk])
    axis0 = c.const("axis0", [0])
    counts = c.op("Slice", "counts", [rows.counts, first, end, axis0])
    queries = c.op("Slice", "queries", [rows.q_rows, first, end, axis0])
    heads = c.op("Slice", "heads", [rows.row_bh, first, end, axis0])
    fewest = c.op("ReduceMin", "fewest", [counts], keepdims=1)
    longest = c.op("Max", "longest", [c.op("ReduceMax", "most", [counts], keepdims=1), c.const("one", [1])])
    one_head = c.op("Equal", "one_head", [c.op("ReduceMin", "first_head", [heads], keepdims=1),
                                          c.op("ReduceMax", "last_head", [heads], keepdims=1)])
    every_block = c.op("And", "every_block", [c.op("Equal", "all_listed", [fewest, rows.key_blocks]), one_head])
    dense = c.op("Squeeze", "dense", [c.op("And", "dense_whole", [every_block, rows.whole_keys])])
    gathered = _gathered_chunk(c, rows, scale, queries, counts, fewest, longest, first, end)
    result = c.op("If", "attend", [dense], then_branch=_dense_chunk(c, rows, scale, queries, heads),
                  else_branch=gathered)
    cond_out = c.op("Identity", "cond_out", [cond])
    cond_out.dtype, cond_out.shape = np.bool_, []
    result.dtype, result.shape = np.float32, [None, None, None]
    return gs.Graph(nodes=nodes, inputs=[step, cond], outputs=[cond_out, result], name=f"{b.prefix}chunk")


def _branch(c: Builder, name: str) -> tuple[Builder, list[gs.Node]]:
    nodes: list[gs.Node] = []
    return Builder(nodes, f"{c.prefix}{name}/"), nodes


def _attend(e: Builder, queries: gs.Tensor, keys: gs.Tensor, values: gs.Tensor, scale: float,
            bias: gs.Tensor | None = None) -> gs.Tensor:
    """softmax(scale * q k^T (+ bias)) v over the last two axes."""
    keys_t = e.op("Transpose", "keys_t", [keys], perm=[0, 2, 1])
    scores = e.op("Mul", "scaled", [e.op("MatMul", "scores", [queries, keys_t]), e.const("scale", scale, np.float32)])
    if bias is not None:
        scores = e.op("Add", "biased", [scores, bias])
    return e.op("MatMul", "weighted", [e.op("Softmax", "weights", [scores], axis=-1), values])


def _dense_chunk(c: Builder, rows: _Rows, scale: float, queries: gs.Tensor, heads: gs.Tensor) -> gs.Graph:
    """Rows of one head listing every block: [1, chunk * block_q, D] queries against the head's keys."""
    e, nodes = _branch(c, "dense")
    head = e.op("Slice", "head", [heads, e.const("h0", [0]), e.const("h1", [1]), e.const("hax", [0])])
    keys = e.op("Gather", "keys", [rows.k_heads, head], axis=0)
    values = e.op("Gather", "values", [rows.v_heads, head], axis=0)
    lead = e.op("Reshape", "queries", [queries, e.op("Concat", "q_shape", [e.const("q_lead", [1, -1]),
                                                                          e.op("Shape", "d", [queries], start=-1)],
                                                     axis=0)])
    out = _attend(e, lead, keys, values, scale)
    shape = e.op("Concat", "out_shape", [e.op("Shape", "rows_bq", [queries], start=0, end=2),
                                         e.op("Shape", "dv", [values], start=-1)], axis=0)
    result = e.op("Reshape", "result", [out, shape])
    result.dtype, result.shape = np.float32, [None, None, None]
    return gs.Graph(nodes=nodes, outputs=[result], name=f"{c.prefix}dense")


def _gathered_chunk(c: Builder, rows: _Rows, scale: float, queries: gs.Tensor, counts: gs.Tensor,
                    fewest: gs.Tensor, longest: gs.Tensor, first: gs.Tensor, end: gs.Tensor) -> gs.Graph:
    """The listed blocks gathered per row (as many slots as the longest list), masked where needed."""
    g, nodes = _branch(c, "gathered")
    slots = [g.op("Concat", "s_begin", [first, g.const("zero", [0])], axis=0),
             g.op("Concat", "s_end", [end, longest], axis=0), g.const("s_axes", [0, 1])]
    global_index = g.op("Slice", "global_index", [rows.global_index, *slots])
    local_index = g.op("Slice", "local_index", [rows.local_index, *slots])
    slot_bias = g.op("Slice", "slot_bias", [rows.slot_bias, *slots])
    keys = _gathered(g, "keys", rows.k_rows, global_index)
    values = _gathered(g, "values", rows.v_rows, global_index)
    unmasked = g.op("Squeeze", "unmasked", [g.op("And", "whole", [g.op("Equal", "every_slot", [fewest, longest]),
                                                                  rows.whole_keys])])
    w, whole_nodes = _branch(g, "whole")
    whole = _attend(w, queries, keys, values, scale)
    m, masked_nodes = _branch(g, "masked")
    bias = m.op("Add", "bias_blocks", [m.op("Gather", "key_tail", [rows.key_bias, local_index], axis=0),
                                       m.op("Unsqueeze", "slot_bias_3", [slot_bias, m.const("ax2", [2])])])
    out = _attend(m, queries, keys, values, scale, m.op("Reshape", "bias", [bias, m.const("bias_shape", [0, 1, -1])]))
    nonempty = m.op("Greater", "nonempty", [m.op("Unsqueeze", "counts_3", [counts, m.const("ax12", [1, 2])]),
                                            m.const("zero_count", 0)])
    masked = m.op("Where", "result", [nonempty, out, m.const("zero_out", 0.0, np.float32)])
    for tensor in (whole, masked):
        tensor.dtype, tensor.shape = np.float32, [None, None, None]
    result = g.op("If", "attend", [unmasked],
                  then_branch=gs.Graph(nodes=whole_nodes, outputs=[whole], name=f"{g.prefix}whole"),
                  else_branch=gs.Graph(nodes=masked_nodes, outputs=[masked], name=f"{g.prefix}masked"))
    result.dtype, result.shape = np.float32, [None, None, None]
    return gs.Graph(nodes=nodes, outputs=[result], name=f"{c.prefix}gathered")


# --------------------------------------------------------------------------------------------- mask producers


def _kept_lists(b: Builder, keep: gs.Tensor, outputs: Sequence[gs.Tensor]) -> None:
    """(kv_count, kv_index) of an int64 0/1 mask [..., KB]: kept blocks first, ascending (TopK of
    keep * 2KB - j, whose values are distinct)."""
    kb = b.op("Shape", "lists_kb", [keep], start=-1)
    position = b.op("Range", "position", [b.const("p0", 0), b.op("Squeeze", "lists_kb_s", [kb]), b.const("p1", 1)])
    key = b.op("Sub", "order_key", [b.op("Mul", "kept_high", [keep, b.op("Mul", "two_kb", [kb, b.const("two", [2])])]),
                                    position])
    _, order = b.ops("TopK", "order", [key, kb], 2, axis=-1, largest=1, sorted=1)
    b.op("ReduceSum", "count", [keep, b.const("last", [-1])], keepdims=0, out=outputs[0])
    b.op("Identity", "index", [order], out=outputs[1])


def decompose_block_mask_index(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor]) -> None:
    """BlockMaskIndex: the bool mask as 0/1, then its lists."""
    _kept_lists(b, b.op("Cast", "keep", [inputs[0]], to=onnx.TensorProto.INT64), outputs)


def _block_sizes(b: Builder, name: str, x: gs.Tensor, count: gs.Tensor, block: int) -> gs.Tensor:
    """[NB, 1] float: the number of real tokens in each block (the last may be partial)."""
    first = b.op("Mul", f"{name}_first", [b.op("Range", f"{name}_range", [b.const(f"{name}_r0", 0),
                                                                         b.op("Squeeze", f"{name}_nb", [count]),
                                                                         b.const(f"{name}_r1", 1)]),
                                          b.const(f"{name}_bs0", block)])
    left = b.op("Sub", f"{name}_left", [b.op("Squeeze", f"{name}_ns", [_dim(b, f"{name}_len", x, 2)]), first])
    sizes = b.op("Cast", f"{name}_float", [b.op("Min", f"{name}_min", [left, b.const(f"{name}_bs1", block)])],
                 to=onnx.TensorProto.FLOAT)
    return b.op("Unsqueeze", f"{name}_col", [sizes, b.const(f"{name}_ax1", [1])])


def _block_means(b: Builder, name: str, x: gs.Tensor, block: int) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
    """(means [B,H,NB,D], real tokens per block [NB,1], blocks [B,H,NB,block,D])."""
    count = _ceil_div(b, f"{name}_nb", _dim(b, f"{name}_tokens", x, 2), block)
    blocks = _blocks(b, name, x, count, block)
    sizes = _block_sizes(b, f"{name}_sizes", x, count, block)
    summed = b.op("ReduceSum", f"{name}_sum", [blocks, b.const(f"{name}_ax3", [3])], keepdims=0)
    return b.op("Div", f"{name}_mean", [summed, sizes]), sizes, blocks


def _not_self_similar(b: Builder, name: str, blocks: gs.Tensor, sizes: gs.Tensor, sim: float) -> gs.Tensor:
    """[B,H,NB] bool: mean pairwise cosine of the block's tokens below `sim` (||sum of unit rows||^2 / n^2)."""
    norm = b.op("Sqrt", f"{name}_norm", [b.op("ReduceSum", f"{name}_sq", [b.op("Mul", f"{name}_xx", [blocks, blocks]),
                                                                           b.const(f"{name}_axd", [-1])], keepdims=1)])
    eps = b.const(f"{name}_eps", SIMILARITY_EPS, np.float32)
    unit = b.op("Div", f"{name}_unit", [blocks, b.op("Max", f"{name}_safe", [norm, eps])])
    summed = b.op("ReduceSum", f"{name}_usum", [unit, b.const(f"{name}_ax3", [3])], keepdims=0)
    square = b.op("ReduceSum", f"{name}_square", [b.op("Mul", f"{name}_ss", [summed, summed]),
                                                  b.const(f"{name}_axl", [-1])], keepdims=1)
    similarity = b.op("Div", f"{name}_sim", [square, b.op("Mul", f"{name}_n2", [sizes, sizes])])
    low = b.op("Less", f"{name}_low", [similarity, b.const(f"{name}_threshold", sim, np.float32)])
    return b.op("Squeeze", f"{name}_low3", [low, b.const(f"{name}_axsq", [-1])])


def decompose_mean_sim_mask(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *, block_q: int,
                            block_k: int, scale: float, cdf: float = 0.0, topk: float = 0.0, sim: float = 0.0) -> None:
    """MeanSimMask from standard ops: block means, pooled softmax, TopK-sorted cumulative mass (or rank),
    ScatterElements back to block order, the self-similarity filter, then the lists."""
    q, k = inputs
    q_means, q_sizes, q_blocks = _block_means(b, "qm", q, block_q)
    k_means, k_sizes, k_blocks = _block_means(b, "km", k, block_k)
    scores = b.op("MatMul", "pooled_scores", [q_means, b.op("Transpose", "km_t", [k_means], perm=[0, 1, 3, 2])])
    pooled = b.op("Softmax", "pooled", [b.op("Mul", "pooled_scaled", [scores, b.const("scale", scale, np.float32)])],
                  axis=-1)
    kb = b.op("Shape", "kb", [pooled], start=-1)
    values, order = b.ops("TopK", "sorted", [pooled, kb], 2, axis=-1, largest=1, sorted=1)
    if cdf > 0:
        before = b.op("CumSum", "before", [values, b.const("sort_axis", -1)], exclusive=1)
        kept_sorted = b.op("Less", "kept_sorted", [before, b.const("cdf", cdf, np.float32)])
    else:
        rank = b.op("Range", "rank", [b.const("r0", 0), b.op("Squeeze", "kb_s", [kb]), b.const("r1", 1)])
        wanted = b.op("Ceil", "wanted", [b.op("Mul", "wanted_f", [b.op("Cast", "kb_f", [kb], to=onnx.TensorProto.FLOAT),
                                                                   b.const("topk", topk, np.float32)])])
        kept_sorted = b.op("Less", "kept_sorted", [b.op("Cast", "rank_f", [rank], to=onnx.TensorProto.FLOAT), wanted])
    kept_sorted = b.op("Cast", "kept_sorted_i", [kept_sorted], to=onnx.TensorProto.INT64)
    kept_sorted = b.op("Expand", "kept_sorted_all", [kept_sorted, b.op("Shape", "lists_shape", [order])])
    keep = b.op("ScatterElements", "keep", [b.op("Mul", "none_kept", [kept_sorted, b.const("i0", 0)]), order,
                                            kept_sorted], axis=-1)
    if sim > 0:
        rows = b.op("Unsqueeze", "rows_dense", [_not_self_similar(b, "qs", q_blocks, q_sizes, sim),
                                                b.const("ax3", [3])])
        columns = b.op("Unsqueeze", "columns_dense", [_not_self_similar(b, "ks", k_blocks, k_sizes, sim),
                                                      b.const("ax2", [2])])
        dense = b.op("Cast", "dense_i", [b.op("Or", "dense", [rows, columns])], to=onnx.TensorProto.INT64)
        keep = b.op("Max", "keep_filtered", [keep, dense])
    _kept_lists(b, keep, outputs)


def tile_grid(grid: Sequence[int], tile: Sequence[int]) -> tuple[int, int, int]:
    """Tiles per axis; PluginError unless every tile size divides its grid size."""
    if len(grid) != 3 or len(tile) != 3 or min(*grid, *tile) < 1:
        raise PluginError(f"TileWindowMask needs a grid and a tile of three positive sizes, got {list(grid)} and "
                          f"{list(tile)}.")
    if any(g % t for g, t in zip(grid, tile, strict=True)):
        raise PluginError(f"TileWindowMask's tile {'x'.join(map(str, tile))} does not divide the token grid "
                          f"{'x'.join(map(str, grid))}; choose tile sizes that divide each axis "
                          f"({_divisors_hint(grid)}).")
    return tuple(g // t for g, t in zip(grid, tile, strict=True))


def _divisors_hint(grid: Sequence[int]) -> str:
    return "; ".join(f"{axis}={g}: {', '.join(str(d) for d in range(1, g + 1) if g % d == 0)}"
                     for axis, g in zip("THW", grid, strict=True))


def tile_order(grid: Sequence[int], tile: Sequence[int]) -> np.ndarray:
    """The permutation taking raster-order tokens (t, h, w) to tile order: `tokens[tile_order]` is tile-major."""
    tiles = tile_grid(grid, tile)
    raster = np.arange(int(np.prod(grid))).reshape(grid)
    split = raster.reshape(tiles[0], tile[0], tiles[1], tile[1], tiles[2], tile[2])
    return split.transpose(0, 2, 4, 1, 3, 5).reshape(-1)


def tile_window_lists(grid: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(kv_count [1,1,QB], kv_index [1,1,QB,M]) of the clamped sliding tile window, tiles in raster order."""
    tiles = tile_grid(grid, tile)
    if len(window) != 3 or min(window) < 1:
        raise PluginError(f"TileWindowMask needs a window of three positive tile counts, got {list(window)}.")
    spans = [min(w, n) for w, n in zip(window, tiles, strict=True)]
    axes = [np.clip(np.arange(n) - s // 2, 0, n - s)[:, None] + np.arange(s) for n, s in zip(tiles, spans, strict=True)]
    starts = np.stack(np.meshgrid(*[np.arange(n) for n in tiles], indexing="ij"), -1).reshape(-1, 3)
    lists = []
    for t, h, w in starts:
        near = np.stack(np.meshgrid(axes[0][t], axes[1][h], axes[2][w], indexing="ij"), -1).reshape(-1, 3)
        lists.append(np.sort(np.ravel_multi_index(near.T, tiles)))
    index = np.stack(lists)[None, None].astype(np.int64)
    return np.full((1, 1, len(lists)), index.shape[-1], np.int64), index


def decompose_tile_window_mask(b: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *,
                               grid: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> None:
    """TileWindowMask: its lists are constants."""
    count, index = tile_window_lists(grid, tile, window)
    b.op("Identity", "count", [b.const("count_lists", count)], out=outputs[0])
    b.op("Identity", "index", [b.const("index_lists", index)], out=outputs[1])


# --------------------------------------------------------------------------------------------- shapes, MACs


def attention_shape(q: Sequence[Any], k: Sequence[Any], v: Sequence[Any], *rest: Any, **attrs: Any) -> tuple:
    """[B, H, L, Dv]."""
    return (q[0], q[1], q[2], v[3])


def attention_macs(input_shapes: Sequence[Sequence[int]], output_shapes: Sequence[Sequence[int]],
                   **attrs: Any) -> int:
    """The dense attention's: a block mask's saving depends on the input (stage MACs stay the dense model's)."""
    (b, h, n, d), (_, _, s, _), (*_, dv) = input_shapes[:3]
    return b * h * n * s * (d + dv)


def mask_macs(input_shapes: Sequence[Sequence[int]], output_shapes: Sequence[Sequence[int]], **attrs: Any) -> int:
    """Pooled scores: one product per block pair and channel (MeanSimMask), none for the others."""
    if len(input_shapes) < 2:
        return 0
    (b, h, n, d), (_, _, s, _) = input_shapes[:2]
    return b * h * -(-n // attrs["block_q"]) * -(-s // attrs["block_k"]) * d


# --------------------------------------------------------------------------------------------- dense equivalent


def dense_equivalent(model: onnx.ModelProto, nodes: Collection[str]) -> onnx.ModelProto:
    """`model` with the BlockSparseAttention `nodes` listing every key block, in float: the dense attention
    they approximate (a mask made up by `--sparse-attention`, not one the model itself applies), so that a
    package's plumbing (layouts, scales, token order) is checked exactly against eager and its masks' error
    is measured on its own. The model itself when it has none of them."""
    if not any(node.name in nodes and node.op_type == ATTENTION.name for node in model.graph.node):
        return model
    graph = import_graph(model)
    for node in [n for n in graph.nodes if n.op == ATTENTION.name and n.name in nodes]:
        b = Builder(graph.nodes, f"{node.name}/dense/")
        q, k = node.inputs[:2]
        qb = _ceil_div(b, "qb", _dim(b, "l", q, 2), node.attrs["block_q"])
        kb = _ceil_div(b, "kb", _dim(b, "s", k, 2), node.attrs["block_k"])
        lists = b.op("Concat", "lists", [b.const("one1", [1, 1]), qb], axis=0)
        count = b.op("Expand", "count", [b.op("Reshape", "kb_scalar", [kb, b.const("scalar", [])]), lists])
        blocks = b.op("Range", "blocks", [b.const("r0", 0), b.op("Squeeze", "kb_s", [kb]), b.const("r1", 1)])
        index = b.op("Expand", "index", [blocks, b.op("Concat", "index_shape", [lists, kb], axis=0)])
        operands = [*node.inputs[:3], count, index]
        node.inputs.clear()
        node.inputs.extend(operands)
        node.attrs["fp8"] = "off"
    graph.cleanup().toposort()
    return export_graph(graph, like=model)


_HERE = __name__

ATTENTION = OpRecord(
    name="BlockSparseAttention",
    decompose=decompose_block_sparse_attention,
    macs=attention_macs,
    shape=attention_shape,
    reference=Face(f"{_HERE}.reference", "block_sparse_attention"),
    translation=Face(f"{_HERE}.reference", "TRANSLATION"),
    triton=Face(f"{_HERE}.kernels", "block_sparse_attention_triton"),
    tensorrt=Face(f"{_HERE}.trt", "register"),
    dtypes=("float32", "float16", "bfloat16", "float8_e4m3fn"),
)
MEAN_SIM = OpRecord(name="MeanSimMask", decompose=decompose_mean_sim_mask, macs=mask_macs,
                    reference=Face(f"{_HERE}.reference", "mean_sim_mask"))
TILE_WINDOW = OpRecord(name="TileWindowMask", decompose=decompose_tile_window_mask, macs=mask_macs)
BLOCK_MASK = OpRecord(name="BlockMaskIndex", decompose=decompose_block_mask_index, macs=mask_macs)

OPS = (ATTENTION, MEAN_SIM, TILE_WINDOW, BLOCK_MASK)
