"""Training-free block-sparse attention (`--sparse-attention`): every softmax attention the matcher finds runs
as `dync::BlockSparseAttention` under one mask rule, optionally on fp8-rounded operands.

    MatMul(Softmax(Mul(MatMul(Mul(Q, a), KT), b)), V)                  (SDPA exports as this chain too)
      -> BlockSparseAttention(Q, K, V, kv_count, kv_index, scale=a*b)  with the lists from
         TileWindowMask()             (tile rule: Q, K, V and the output permuted to tile order and back)
         MeanSimMask(Q, K)            (meansim rule)
         and, with a schedule, Where(t > (1 - dense_until) * t_max, every block, the rule's lists) per sample

The chain is `attention.fuse`'s match (4-D Q, KT, V with shared batch and heads, intermediates used once).
An attention with an additive bias, or whose tokens do not form the tile grid, or without the timestep input
a schedule needs, is left dense with a record that says why (and a `SparseAttentionWarning`).

Guarantee: with every mask listing every block and fp8 off (`dense_equivalent`), the rewritten stage equals
the original to float rounding, which export checks like any pass's rewrite; what the masks and fp8 change
is the approximation asked for, measured per attention as the density its mask keeps on the example.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Collection, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from dync.errors import SparseAttentionWarning
from dync.exporter.passes.attention.fuse import SOFTMAX_LAST_AXIS_OPSET, Match, find_matches, softmax_name, untransposed
from dync.exporter.passes.context import PassContext
from dync.exporter.passes.sparse_attention.spec import TIMESTEP_NAMES, SparseAttentionSpec, parse_sparse_attention
from dync.exporter.verification import run_decomposed
from dync.graph import Builder, default_opset, export_graph, import_graph, shape_of
from dync.plugins import registry
from dync.plugins.block_sparse_attention import FP8_OPSET, tile_order, tile_window_lists
from dync.records import SparseAttentionRecord

__all__ = ["SparseAttentionPass", "SparseAttentionSpec", "parse_sparse_attention", "sparsify_attention"]


class _Dense(Exception):
    """Why an attention stays dense."""


def sparsify_attention(model: onnx.ModelProto, spec: SparseAttentionSpec, skip: Collection[str] = (),
                       feeds: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto,
                                                                             list[SparseAttentionRecord]]:
    """`model` with every matching softmax attention block-sparse under `spec`, and one record per match
    (densities measured on `feeds`, the model's inputs at the export example, when given). `model` itself is
    not modified; it is returned as it is when nothing is rewritten."""
    if default_opset(model) < SOFTMAX_LAST_AXIS_OPSET:
        return model, []
    found = find_matches(import_graph(model, infer_shapes=True, data_prop=True))
    matches = [m for m in found if softmax_name(m) not in skip]
    if not matches:
        return model, []
    if spec.fp8 != "off" and default_opset(model) < FP8_OPSET:
        model = version_converter.convert_version(model, FP8_OPSET)
    graph = import_graph(model, infer_shapes=True, data_prop=True)
    records, counts = [], {}
    for index, match in enumerate(m for m in find_matches(graph) if softmax_name(m) not in skip):
        name = softmax_name(match)
        try:
            record, count = _rewrite(graph, match, spec, f"sparse_attention_{index}")
            if record.density is None:
                counts[name] = count
        except _Dense as why:
            record = SparseAttentionRecord(node=name, sparse=False, rule=spec.describe(), reason=str(why))
            warnings.warn(f"softmax attention {name} is left dense: {why}.", SparseAttentionWarning, stacklevel=3)
        records.append(record)
    if not any(r.sparse for r in records):
        return model, records
    graph.cleanup().toposort()
    rewritten = export_graph(graph, like=model)
    if feeds is not None and counts:
        densities = _densities(rewritten, counts, feeds)
        records = [dataclasses.replace(r, density=densities.get(r.node, r.density)) for r in records]
    return rewritten, records


def _rewrite(graph: gs.Graph, match: Match, spec: SparseAttentionSpec,
             name: str) -> tuple[SparseAttentionRecord, tuple[gs.Tensor, int]]:
    """Replace the chain by the mask and BlockSparseAttention; the record and (kv_count, key blocks)."""
    if match.bias is not None:
        raise _Dense("it adds a bias to its scores (a position bias or a mask), which BlockSparseAttention does not "
                     "take")
    q_shape, kt_shape = shape_of(match.q), shape_of(match.kt)
    queries, keys = q_shape[2], kt_shape[3]
    if not isinstance(queries, int) or not isinstance(keys, int):
        raise _Dense(f"its token counts {queries} x {keys} are not static")
    if spec.rule == "tile" and not queries == keys == spec.tokens:
        raise _Dense(f"it has {queries} queries and {keys} keys, but the tile grid {'x'.join(map(str, spec.grid))} "
                     f"has {spec.tokens} tokens; give the grid of this attention's tokens")
    timestep = _timestep(graph, spec)
    b = Builder(graph.nodes, f"{name}/")
    q, k, v = match.q, untransposed(graph, match.kt, name), match.v
    block = spec.block if spec.rule == "tile" else min(spec.block, queries)
    key_blocks = -(-keys // block)
    if spec.rule == "dense":
        count = b.const("all_listed", np.full((1, 1, -(-queries // block)), key_blocks))
        index = b.const("every_index", np.broadcast_to(np.arange(key_blocks), (1, 1, -(-queries // block), key_blocks)))
    elif spec.rule == "tile":
        order = tile_order(spec.grid, spec.tile)
        tiled = b.const("tile_order", order)
        q, k, v = (b.op("Gather", f"{role}_tiled", [x, tiled], axis=2)
                   for role, x in zip("qkv", (q, k, v), strict=True))
        count, index = _lists(b, "mask", "TileWindowMask", [], grid=list(spec.grid), tile=list(spec.tile),
                              window=list(spec.window))
    else:
        count, index = _lists(b, "mask", "MeanSimMask", [q, k], block_q=block, block_k=block, scale=match.scale,
                              cdf=spec.cdf, topk=spec.topk, sim=spec.sim)
    if timestep is not None:
        count, index = _dense_while(b, count, index, timestep, key_blocks, spec)
    for node in match.nodes:
        node.outputs.clear()
    output = match.output if spec.rule != "tile" else gs.Variable(f"{name}/tiled_out")
    registry().get("BlockSparseAttention").emit(b, [q, k, v, count, index], output, name="attention", block_q=block,
                                                block_k=block, scale=float(match.scale), fp8=spec.fp8)
    if spec.rule == "tile":
        b.op("Gather", "raster", [output, b.const("raster_order", np.argsort(order))], out=match.output, axis=2)
    density = 1.0 if spec.rule == "dense" else None
    if spec.rule == "tile" and timestep is None:
        counts, _ = tile_window_lists(spec.grid, spec.tile, spec.window)
        density = float(counts.mean() / key_blocks)
    record = SparseAttentionRecord(node=softmax_name(match), sparse=True, rule=spec.describe(), queries=queries,
                                   keys=keys, block_q=block, block_k=block, density=density, fp8=spec.fp8,
                                   attention=f"{b.prefix}attention")
    return record, (count, key_blocks)


def _lists(b: Builder, name: str, op: str, inputs: Sequence[gs.Tensor], **attrs: object) -> tuple[gs.Tensor,
                                                                                                   gs.Tensor]:
    """The (kv_count, kv_index) a mask producer writes."""
    count = gs.Variable(b.prefix + f"{name}_count", dtype=np.int64)
    index = gs.Variable(b.prefix + f"{name}_index", dtype=np.int64)
    registry().get(op).emit_many(b, inputs, [count, index], name=name, **attrs)
    return count, index


def _timestep(graph: gs.Graph, spec: SparseAttentionSpec) -> gs.Tensor | None:
    """The graph input a schedule reads (None without a schedule); _Dense when it is not there."""
    if not spec.dense_until:
        return None
    names = (spec.timestep,) if spec.timestep else TIMESTEP_NAMES
    found = next((t for t in graph.inputs if t.name in names), None)
    if found is None or len(found.shape or ()) != 1:
        raise _Dense(f"the schedule dense-until={spec.dense_until:g} reads the timestep from an input "
                     f"{' or '.join(names)} of shape [batch], and this graph's inputs are "
                     f"{', '.join(t.name for t in graph.inputs)}; name it with timestep=NAME")
    return found


def _dense_while(b: Builder, count: gs.Tensor, index: gs.Tensor, timestep: gs.Tensor, key_blocks: int,
                 spec: SparseAttentionSpec) -> tuple[gs.Tensor, gs.Tensor]:
    """The lists, with every block listed for samples whose timestep is above the schedule's threshold."""
    t = b.op("Cast", "t_float", [timestep], to=onnx.TensorProto.FLOAT)
    threshold = b.const("t_dense", (1.0 - spec.dense_until) * spec.t_max, np.float32)
    dense = b.op("Greater", "dense_step", [t, threshold])
    dense3 = b.op("Unsqueeze", "dense3", [dense, b.const("axes12", [1, 2])])
    count = b.op("Where", "count_scheduled", [dense3, b.const("all_blocks", key_blocks), count])
    width = b.op("Sub", "index_missing", [b.const("key_blocks", [key_blocks]),
                                          b.op("Shape", "index_width", [index], start=-1)])
    pads = b.op("Concat", "index_pads", [b.const("pads_head", [0, 0, 0, 0, 0, 0, 0]), width], axis=0)
    wide = b.op("Pad", "index_wide", [index, pads])
    dense4 = b.op("Unsqueeze", "dense4", [dense, b.const("axes123", [1, 2, 3])])
    every = b.const("every_block", np.arange(key_blocks))
    return count, b.op("Where", "index_scheduled", [dense4, every, wide])


def _densities(model: onnx.ModelProto, counts: dict[str, tuple[gs.Tensor, int]],
               feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Per attention, the mean fraction of key blocks its lists hold on `feeds`."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    names = {node: count.name for node, (count, _) in counts.items()}
    probed.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None)
                               for n in names.values())
    values = run_decomposed(probed, feeds)
    return {node: float(values[name].mean() / counts[node][1]) for node, name in names.items()}


class SparseAttentionPass:
    """Softmax attention as block-sparse attention under `--sparse-attention` (both forms; nothing without it).

    Keeps: stage inputs and outputs, the dynamic batch; with every mask dense and fp8 off, the outputs equal
    the original's to float rounding (the check export runs on `dense_equivalent` of the rewrite).
    """

    name = "sparse_attention"
    forms = ("portable", "plugins")

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto,
                                                                         list[SparseAttentionRecord]]:
        if context.sparse_attention is None:
            return model, []
        rewritten, records = sparsify_attention(model, context.sparse_attention, context.skipped(self.name),
                                                context.feeds)
        for record in records:
            if record.sparse:
                context.progress(f"attention {record.node}: block-sparse, {record.detail()}")
        return rewritten, records
