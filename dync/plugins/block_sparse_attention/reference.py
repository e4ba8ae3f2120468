"""The PyTorch faces of BlockSparseAttention and its mask producers: eager semantics (see the package
docstring) and the `torch.library` custom ops that capture keeps as one node each.

The references are written for clarity, not speed: the attention builds the dense token mask its block
lists imply, which is what every other face is checked against.
"""

from __future__ import annotations

from typing import Any

import torch

from dync.errors import PluginError

FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
SIMILARITY_EPS = 1e-6


def check_fp8(fp8: str) -> None:
    if fp8 != "off" and fp8 not in FP8_FORMATS:
        raise PluginError(f"BlockSparseAttention's fp8 is {fp8!r}; use off, {', '.join(FP8_FORMATS)}.")


def blocks_of(tokens: int, block: int) -> int:
    return -(-tokens // block)


def _padded_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, N, D] zero-padded to whole blocks, as [B, H, NB, block, D]."""
    n = x.shape[2]
    nb = blocks_of(n, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
    return padded.reshape(x.shape[0], x.shape[1], nb, block, x.shape[3])


def tile_scales(x: torch.Tensor, block: int, fp8: str) -> torch.Tensor:
    """Per-tile scales [B, H, NB]: amax over each block of tokens and all channels / the format's max (1 where
    the tile is all zeros)."""
    amax = _padded_blocks(x, block).abs().amax(dim=(3, 4))
    return torch.where(amax > 0, amax / FP8_FORMATS[fp8][1], torch.ones_like(amax))


def channel_scales(v: torch.Tensor, fp8: str) -> torch.Tensor:
    """Per-channel scales [B, H, Dv]: amax over all tokens / the format's max (1 where a channel is zero)."""
    amax = v.abs().amax(dim=2)
    return torch.where(amax > 0, amax / FP8_FORMATS[fp8][1], torch.ones_like(amax))


def round_fp8(x: torch.Tensor, fp8: str) -> torch.Tensor:
    """x rounded to the format (nearest, ties to even) with saturation at its max, back in x's dtype."""
    dtype, fmax = FP8_FORMATS[fp8]
    return x.clamp(-fmax, fmax).to(dtype).to(x.dtype)


def quantize_tiles(x: torch.Tensor, scale: torch.Tensor, block: int, fp8: str) -> torch.Tensor:
    """x quantized and dequantized with one scale [B, H, NB] per block of tokens."""
    n = x.shape[2]
    per_token = scale.repeat_interleave(block, dim=2)[:, :, :n, None]
    return round_fp8(x / per_token, fp8) * per_token


def quantize_channels(v: torch.Tensor, scale: torch.Tensor, fp8: str) -> torch.Tensor:
    """v quantized and dequantized with one scale [B, H, Dv] per channel."""
    return round_fp8(v / scale[:, :, None, :], fp8) * scale[:, :, None, :]


def quantized_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int, fp8: str,
                       q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V as the fp8 op sees them: per-tile Q and K, per-channel V, scales given or from the amax."""
    q_scale = tile_scales(q, block_q, fp8) if q_scale is None else q_scale
    k_scale = tile_scales(k, block_k, fp8) if k_scale is None else k_scale
    v_scale = channel_scales(v, fp8) if v_scale is None else v_scale
    return (quantize_tiles(q, q_scale, block_q, fp8), quantize_tiles(k, k_scale, block_k, fp8),
            quantize_channels(v, v_scale, fp8))


def allowed_blocks(kv_count: torch.Tensor, kv_index: torch.Tensor, key_blocks: int) -> torch.Tensor:
    """The block mask [B', H', QB, KB] (bool) the lists say: block kv_index[..., j] for j < kv_count."""
    slots = torch.arange(kv_index.shape[-1], device=kv_index.device)
    listed = slots < kv_count[..., None]
    mask = torch.zeros((*kv_index.shape[:-1], key_blocks + 1), dtype=torch.bool, device=kv_index.device)
    target = torch.where(listed, kv_index, torch.full_like(kv_index, key_blocks))  # unlisted slots: a spare column
    return mask.scatter(-1, target, listed)[..., :key_blocks]


def check_lists(q: torch.Tensor, k: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor, block_q: int,
                block_k: int) -> None:
    """Reject lists the kernels would index out of range, before any of them runs."""
    qb, kb = blocks_of(q.shape[2], block_q), blocks_of(k.shape[2], block_k)
    if kv_count.shape[-1] != qb or kv_index.shape[-2] != qb:
        raise PluginError(f"BlockSparseAttention over {q.shape[2]} queries in blocks of {block_q} needs lists for "
                          f"{qb} query blocks, got kv_count {tuple(kv_count.shape)} and kv_index "
                          f"{tuple(kv_index.shape)}.")
    if kv_count.dim() != 3 or kv_index.dim() != 4 or kv_count.shape != kv_index.shape[:3]:
        raise PluginError(f"BlockSparseAttention needs kv_count [B', H', QB] and kv_index [B', H', QB, M] with the "
                          f"same B' and H', got {tuple(kv_count.shape)} and {tuple(kv_index.shape)}.")
    listed = torch.arange(kv_index.shape[-1]) < kv_count[..., None]
    if bool(((kv_index < 0) | (kv_index >= kb))[listed].any()) or bool((kv_count > kv_index.shape[-1]).any()):
        raise PluginError(f"BlockSparseAttention's kv_index lists a key block outside [0, {kb}) or kv_count exceeds "
                          f"the {kv_index.shape[-1]} slots.")


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor,
                                     kv_index: torch.Tensor, block_q: int, block_k: int, scale: float,
                                     fp8: str = "off", q_scale: torch.Tensor | None = None,
                                     k_scale: torch.Tensor | None = None,
                                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over the listed key blocks of each query block; a row with no block outputs zeros."""
    check_fp8(fp8)
    check_lists(q, k, kv_count, kv_index, block_q, block_k)
    if fp8 != "off":
        q, k, v = quantized_operands(q, k, v, block_q, block_k, fp8, q_scale, k_scale, v_scale)
    n, s = q.shape[2], k.shape[2]
    blocks = allowed_blocks(kv_count, kv_index, blocks_of(s, block_k))
    tokens = blocks.repeat_interleave(block_q, dim=2)[:, :, :n].repeat_interleave(block_k, dim=3)[..., :s]
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    weights = torch.softmax(scores.masked_fill(~tokens, float("-inf")), dim=-1)
    return torch.matmul(torch.nan_to_num(weights, nan=0.0), v)


def kept_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_count [..., QB], kv_index [..., QB, KB]) of a block mask: the kept blocks first, in ascending order."""
    kb = keep.shape[-1]
    order = keep.long() * (2 * kb) - torch.arange(kb, device=keep.device)
    return keep.sum(-1), order.argsort(dim=-1, descending=True, stable=True)


def _block_sizes(x: torch.Tensor, block: int) -> torch.Tensor:
    """[NB] in x's dtype: the real tokens of each block of x's axis 2 (the last may be partial)."""
    n = x.shape[2]
    return torch.clamp(n - torch.arange(blocks_of(n, block)) * block, max=block).to(x.dtype)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, NB, D]: the mean of each block's tokens (a partial last block over its own tokens)."""
    return _padded_blocks(x, block).sum(3) / _block_sizes(x, block)[:, None]


def block_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, NB]: each block's mean pairwise cosine similarity (self pairs included), ||sum of unit rows||^2 / n^2."""
    unit = x / torch.clamp((x * x).sum(-1, keepdim=True).sqrt(), min=SIMILARITY_EPS)
    sizes = _block_sizes(x, block)
    summed = _padded_blocks(unit, block).sum(3)
    return (summed * summed).sum(-1) / (sizes * sizes)


def mean_sim_keep(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float, cdf: float,
                  topk: float, sim: float) -> torch.Tensor:
    """The block mask [B, H, QB, KB] of MeanSimMask (semantics in the package docstring)."""
    pooled = torch.softmax(torch.matmul(block_means(q, block_q), block_means(k, block_k).transpose(-2, -1)) * scale,
                           dim=-1)
    kb = pooled.shape[-1]
    values, order = torch.sort(pooled, dim=-1, descending=True, stable=True)
    if cdf > 0:
        before = torch.nn.functional.pad(torch.cumsum(values, dim=-1)[..., :-1], (1, 0))  # exclusive, summed in order
        kept_sorted = before < cdf
    else:  # the count in float32, as the decomposition computes it
        wanted = torch.ceil(torch.tensor(float(kb), dtype=torch.float32) * torch.tensor(topk, dtype=torch.float32))
        kept_sorted = (torch.arange(kb, dtype=torch.float32) < wanted).expand(order.shape)
    keep = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    if sim > 0:
        rows = block_similarity(q, block_q) < sim
        columns = block_similarity(k, block_k) < sim
        keep = keep | rows[..., None] | columns[..., None, :]
    return keep


def mean_sim_mask_reference(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float,
                            cdf: float, topk: float, sim: float) -> tuple[torch.Tensor, torch.Tensor]:
    return kept_lists(mean_sim_keep(q, k, block_q, block_k, scale, cdf, topk, sim))


@torch.library.custom_op("dync::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor,
                           kv_index: torch.Tensor, block_q: int, block_k: int, scale: float,
                           fp8: str = "off") -> torch.Tensor:
    """BlockSparseAttention as one opaque op, so torch.export keeps it as a single node."""
    return block_sparse_attention_reference(q, k, v, kv_count, kv_index, block_q, block_k, scale, fp8)


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor,
                                 kv_index: torch.Tensor, block_q: int, block_k: int, scale: float,
                                 fp8: str = "off") -> torch.Tensor:
    return q.new_empty((*q.shape[:3], v.shape[3]))


@torch.library.custom_op("dync::mean_sim_mask", mutates_args=())
def mean_sim_mask(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float, cdf: float,
                  topk: float, sim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanSimMask as one opaque op, so torch.export keeps it as a single node."""
    count, index = mean_sim_mask_reference(q, k, block_q, block_k, scale, cdf, topk, sim)
    return count, index


@mean_sim_mask.register_fake
def _mean_sim_mask_fake(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float, cdf: float,
                        topk: float, sim: float) -> tuple[torch.Tensor, torch.Tensor]:
    qb, kb = blocks_of(q.shape[2], block_q), blocks_of(k.shape[2], block_k)
    return (q.new_empty((*q.shape[:2], qb), dtype=torch.int64),
            q.new_empty((*q.shape[:2], qb, kb), dtype=torch.int64))


def register_onnx_schema() -> None:
    """Tell onnx (and so onnxscript, which torch.onnx's translations use) the node's signature, once."""
    import onnx.defs
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("BlockSparseAttention", 1, "dync")
        return
    except onnx.defs.SchemaError:
        pass
    attr = OpSchema.AttrType
    onnx.defs.register_schema(OpSchema(
        "BlockSparseAttention", "dync", 1,
        doc="Softmax attention over listed key blocks (dync.plugins.block_sparse_attention).",
        inputs=[OpSchema.FormalParameter(name, kind) for name, kind in
                (("q", "T"), ("k", "T"), ("v", "T"), ("kv_count", "I"), ("kv_index", "I"))],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "Floating-point tensors."),
                          ("I", ["tensor(int64)"], "Block lists.")],
        attributes=[OpSchema.Attribute("block_q", attr.INT, "Queries per block."),
                    OpSchema.Attribute("block_k", attr.INT, "Keys per block."),
                    OpSchema.Attribute("scale", attr.FLOAT, "Softmax scale."),
                    OpSchema.Attribute("fp8", attr.STRING, "off, e4m3 or e5m2."),
                    OpSchema.Attribute("plugin_version", attr.STRING, "TensorRT plugin version."),
                    OpSchema.Attribute("plugin_namespace", attr.STRING, "TensorRT plugin namespace.")],
    ))


def translate(q: Any, k: Any, v: Any, kv_count: Any, kv_index: Any, block_q: int, block_k: int, scale: float,
              fp8: str = "off") -> Any:
    """torch.onnx translation of `dync::block_sparse_attention`: the `dync::BlockSparseAttention` plugin node."""
    from onnxscript.values import Opset

    from dync.plugins.block_sparse_attention import ATTENTION

    register_onnx_schema()
    return Opset(ATTENTION.domain, 1).BlockSparseAttention(q, k, v, kv_count, kv_index, block_q=block_q,
                                                           block_k=block_k, scale=float(scale), fp8=fp8,
                                                           plugin_version=ATTENTION.version,
                                                           plugin_namespace=ATTENTION.namespace)


TRANSLATION = {torch.ops.dync.block_sparse_attention.default: translate}
"""The op's entry in torch.onnx's `custom_translation_table`."""


def _listed_blocks(block_mask: Any) -> torch.Tensor:
    """[B, H, QB, KB] bool: the blocks the BlockMask lists, partial or full (its own to_dense uses vmap)."""
    width = block_mask.kv_indices.shape[-1]
    listed = allowed_blocks(block_mask.kv_num_blocks.long(), block_mask.kv_indices.long(), width)
    if block_mask.full_kv_num_blocks is not None:
        listed = listed | allowed_blocks(block_mask.full_kv_num_blocks.long(), block_mask.full_kv_indices.long(),
                                         width)
    return listed


def _token_mask(mask_mod: Any, batch: int, heads: int, queries: int, keys: int) -> torch.Tensor:
    """mask_mod at every (b, h, q, kv), by broadcasting its index arguments (flex_attention's create_mask uses
    vmap, which torch.export would record even for constants)."""
    b, h, q, kv = (torch.arange(n).view(*([1] * axis), n, *([1] * (3 - axis)))
                   for axis, n in enumerate((batch, heads, queries, keys)))
    return torch.broadcast_to(torch.as_tensor(mask_mod(b, h, q, kv), dtype=torch.bool), (batch, heads, queries, keys))


def block_mask_lists(block_mask: Any, queries: int, keys: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(kv_count, kv_index, block_q, block_k) of a flex_attention `BlockMask`, when its mask is block-aligned.

    A BlockMask lists full blocks and partial ones, where its mask_mod decides per token. BlockSparseAttention
    is block-granular, so each partial block must be all-true (then it is full) or all-false (then it is
    dropped) at the token level; PluginError otherwise, since the result would differ from eager.
    """
    block_q, block_k = (int(s) for s in block_mask.BLOCK_SIZE)
    try:
        listed = _listed_blocks(block_mask)
        tokens = _token_mask(block_mask.mask_mod, listed.shape[0], listed.shape[1], queries, keys)
    except Exception as exc:  # fake tensors: a BlockMask made inside the traced forward
        raise PluginError("flex_attention's BlockMask could not be read as constants; create it once outside the "
                          f"forward (e.g. in __init__) and keep it as an attribute ({type(exc).__name__}).") from exc
    qb, kb = blocks_of(queries, block_q), blocks_of(keys, block_k)
    padded = torch.nn.functional.pad(tokens, (0, kb * block_k - keys, 0, qb * block_q - queries))
    per_block = padded.reshape(*tokens.shape[:2], qb, block_q, kb, block_k)
    real = torch.nn.functional.pad(torch.ones(queries, keys, dtype=torch.bool),
                                   (0, kb * block_k - keys, 0, qb * block_q - queries))
    real = real.reshape(qb, block_q, kb, block_k)
    allowed = per_block.any(dim=(3, 5)) & listed[..., :qb, :kb]
    partial = allowed & ~(per_block | ~real).all(dim=(3, 5))
    if bool(partial.any()):
        b, h, i, j = (int(x) for x in partial.nonzero()[0])
        raise PluginError(f"flex_attention's mask_mod is not block-aligned: key block {j} of query block {i} (batch "
                          f"{b}, head {h}) is only partly attended at BLOCK_SIZE ({block_q}, {block_k}); dync runs "
                          "block masks only, so make the mask_mod whole-block (or pick a BLOCK_SIZE it aligns to).")
    count, index = kept_lists(allowed)
    return count, index, block_q, block_k
