"""The PyTorch faces of BlockSparseAttention and its mask producers: eager semantics (see the package
docstring) and the `torch.library` custom ops that capture keeps as one node each.

The references are written for clarity, not speed: the attention builds the dense token mask its block
lists imply, which is what every other face is checked against.
"""

from __future__ import annotations

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


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, NB, D]: the mean of each block's tokens (a partial last block over its own tokens)."""
    n = x.shape[2]
    sizes = torch.clamp(n - torch.arange(blocks_of(n, block)) * block, max=block).to(x.dtype)
    return _padded_blocks(x, block).sum(3) / sizes[:, None]


def block_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, NB]: each block's mean pairwise cosine similarity (self pairs included), ||sum of unit rows||^2 / n^2."""
    unit = x / torch.clamp((x * x).sum(-1, keepdim=True).sqrt(), min=SIMILARITY_EPS)
    n = x.shape[2]
    sizes = torch.clamp(n - torch.arange(blocks_of(n, block)) * block, max=block).to(x.dtype)
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
