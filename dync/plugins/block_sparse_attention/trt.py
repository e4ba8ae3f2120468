"""The TensorRT plugin of BlockSparseAttention, written against `tensorrt.plugin` (Quickly Deployable Plugins).

The registry's `tensorrt` face of BlockSparseAttention is `register`; importing this module loads tensorrt and
triton. There is deliberately no `from __future__ import annotations` here: `tensorrt.plugin` reads the
annotations of the decorated functions as classes, so they must not be strings.

The plugin takes the op's five tensors, q, k, v (fp32, fp16 or bf16, one type) and the int64 lists, and runs the
float Triton kernel, one AOT launch on a (query tiles, B*H) grid. kv_count is read with kv_index's leading
dimensions, so the two must have the same B' and H' (the op's mask producers write them so). `fp8` other than
"off" is refused when the engine is built: its per-channel V scales need an amax over every key before the
attention starts, a second kernel that one AOT launch cannot hold. Autotuning times the tile shapes of
`kernels.TACTIC_CAPS` that differ for the node's blocks; AOT kernels run with Triton's default warps and stages.
"""

import tensorrt.plugin as trtp

from dync.errors import PluginError
from dync.plugins._tensorrt import register_once, triton_dtype
from dync.plugins.block_sparse_attention import ATTENTION, attention_shape
from dync.plugins.block_sparse_attention.kernels import compile_attention_kernel, distinct_tactics, tactic_tiles

FLOATS = "FP32|FP16|BF16"
"""The operand types the plugin offers TensorRT, q, k, v and the output all of one."""


def attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_count: trtp.TensorDesc,
                   kv_index: trtp.TensorDesc, block_q: int, block_k: int, scale: float,
                   fp8: str) -> trtp.TensorDesc:
    """Output [B, H, L, Dv] in q's dtype, as shape expressions (B, L and S may be dynamic)."""
    return trtp.from_shape_expr(attention_shape(q.shape_expr, k.shape_expr, v.shape_expr), dtype=q.dtype)


def attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_count: trtp.TensorDesc,
                       kv_index: trtp.TensorDesc, block_q: int, block_k: int,
                       outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    """Float operands with int64 lists, linear layouts, one tactic per distinct tile shape for these blocks."""
    types = f"{FLOATS}, {FLOATS}, {FLOATS}, INT64, INT64, {FLOATS}"
    return [trtp.AutoTuneCombination(types, "LINEAR", distinct_tactics(block_q, block_k))]


def _constant(dim: trtp.ShapeExpr, name: str) -> int:
    """A dimension the kernel is compiled for; PluginError when the network leaves it dynamic."""
    if not dim.is_constant:
        raise PluginError(f"BlockSparseAttention's TensorRT plugin compiles its kernel for one head size, and {name} "
                          f"is dynamic in this network; give the network a static {name}.")
    return dim.constant_value()


def _float_operands(q: trtp.TensorDesc, fp8: str) -> str:
    """Triton's name of the operands' type; PluginError for what the plugin does not run."""
    if fp8 != "off":
        raise PluginError(f"BlockSparseAttention's TensorRT plugin runs fp8='off' only, and this node has "
                          f"fp8={fp8!r}: its per-channel V scales need an amax over every key, a second kernel one "
                          "AOT plugin launch cannot hold; export the node with fp8='off' or let TensorRT run its "
                          "decomposition.")
    dtype = triton_dtype(q.dtype, ATTENTION)
    if dtype.startswith("fp8"):
        raise PluginError(f"BlockSparseAttention's TensorRT plugin takes float operands, not {q.dtype}; feed it "
                          "fp32, fp16 or bf16 q, k and v.")
    return dtype


def attention_aot(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_count: trtp.TensorDesc, kv_index: trtp.TensorDesc,
    block_q: int, block_k: int, scale: float, fp8: str, outputs: tuple[trtp.TensorDesc], tactic: int,
) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    """The float Triton kernel compiled to PTX for the tactic's tiles, on a (ceil(L / m), B*H) grid."""
    tiles = tactic_tiles(tactic, block_q, block_k)
    dims, index = q.shape_expr, kv_index.shape_expr
    kernel = compile_attention_kernel(_float_operands(q, fp8), _constant(dims[3], "D"),
                                      _constant(v.shape_expr[3], "Dv"), block_q, block_k, scale, tiles)
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(dims[2], tiles.m)
    params.grid_y = dims[0] * dims[1]
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    scalars = (dims[1], dims[2], k.shape_expr[2], index[3], index[0], index[1])
    return (kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params,
            trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars]))


def register() -> None:
    """Register the shape function, the AOT implementation and the tactics with `tensorrt.plugin`, once per
    process (a repeated autotune registration only replaces the function with itself)."""
    register_once(ATTENTION, attention_desc, attention_aot)
    trtp.autotune(ATTENTION.plugin_id)(attention_autotune)
