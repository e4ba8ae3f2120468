"""The Triton kernels of BlockSparseAttention (float and FP8 attention, per-tile FP8 quantization), their PyTorch
launchers, and the attention kernels' ahead-of-time build for TensorRT. Imports torch and triton; the registry
loads it only when a kernel is asked for.

Design of the attention kernels (flash attention over a look-up table of key blocks):

* One program per (query tile, batch*head), query tiles on grid axis 0 so that programs running side by side
  share one head's keys in L2. It loads its query tile once, then loops over the key blocks its query block
  lists (`kv_index[..., i, j]` for `j < kv_count[..., i]`) with an online softmax in base 2 and an fp32
  accumulator. Keys past S get no weight (the last key block is masked), queries past L are computed on zeros
  and not stored, and a query block with no listed block stores zeros (its weight sum is 0: divided by 1).
* Block mapping: `tl.dot` needs tiles whose sides are powers of two >= 16, so an op block of `block_q`
  queries is covered by `block_q / BLOCK_M` query tiles and a key block by `block_k / BLOCK_N` key tiles,
  each tile the largest power of two up to a cap that divides the block (block 48 -> tiles of 16, 96 -> 32,
  128 -> 128 or 64). A tile never straddles two blocks, so one list row and one FP8 scale serve it whole.
  Blocks that are not multiples of 16 are refused with a PluginError (pad the sequence to other blocks, or run
  the op's reference or ONNX decomposition).
* FP8 (`tl.float8e4nv`, or `tl.float8e5` for e5m2): Q and K arrive quantized per tile, V per channel, with
  their fp32 scales. QK^T runs on the fp8 operands (fp32 accumulation, exact products of 4-bit significands),
  then is multiplied by q_scale * k_scale * softmax scale. P meets V in fp16: V's fp8 values are upcast to
  fp16 (exact: both fp8 formats are subsets of fp16) and P, in [0, 1], is rounded to fp16; the fp16 PV product
  accumulates in fp32 and V's per-channel scale multiplies the accumulator once at the end. The only error
  beyond the reference's own quantization is P's fp16 rounding, relative 2^-11 per weight (so at most
  2^-11 * sum(p |v|) / sum(p) per output). The alternative, P cast to e4m3 with a fixed scale of 448 for an
  all-fp8 PV, would double that product's tensor-core rate but add up to 2^-4 relative error per weight, which
  the reference does not model (and the interpreter could not check, see below). By an instruction count, not
  a measurement, the softmax's exponentials and conversions rather than the PV product bound this loop on
  Hopper, so fp16 PV should cost little; the benchmark (benchmarks/gpu_sparse_attention.py) says how little.
* Floats (fp32, fp16, bf16): both products on the operands' type with fp32 accumulation; fp32 operands
  multiply in TF32 on GPUs (Triton's default), relative error about 2^-11 per product.
* Calling convention for TensorRT AOT plugins: (input pointers, int32 scalars, output pointer, constexprs);
  the softmax scale is a constexpr because AOT plugins pass integer scalars only.

The quantize kernel rounds Q or K per tile on the GPU; V's per-channel scales need an amax over every key, so
torch does V (one reduction and one cast). On GPUs its fp32 -> fp8 cast is one `cvt.rn.satfinite` (nearest even,
saturating: the reference's rounding), but the Triton interpreter rounds in-kernel fp8 casts wrongly
(https://github.com/triton-lang/triton/issues/8322), which is why the attention kernel takes already quantized
operands and casts nothing to fp8 itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from dync.errors import PluginError
from dync.plugins._triton import compile_ahead_of_time
from dync.plugins.block_sparse_attention.reference import FP8_FORMATS, blocks_of, channel_scales, check_fp8, check_lists

LOG2E = tl.constexpr(1.4426950408889634)
"""Softmax in base 2: exp(x) = exp2(x * log2(e)), one multiply folded into the scale."""
MIN_TILE = 16
"""The smallest side `tl.dot` takes."""
MIN_FP8_CONTRACTION = 32
"""The smallest contraction of an fp8 `tl.dot` on Hopper (wgmma k32): QK^T's head-dimension tile in FP8."""
QUANTIZE_ROWS = 64
"""Token rows per step of the quantize kernel (at most; a power of two dividing the block)."""
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_Y = 65535
"""CUDA's limit on grid axis 1, which holds batch * heads."""


@dataclass(frozen=True)
class Tiles:
    """One kernel configuration: query rows (m) and keys (n) per tile, warps and software-pipeline stages."""

    m: int
    n: int
    num_warps: int = 4
    num_stages: int = 3


TACTIC_CAPS = ((128, 64), (64, 64), (128, 128), (64, 128))
"""Largest tile sides (m, n) of TensorRT's tactics 1, 2, ...; each is shrunk to what divides the op's blocks."""


def kernel_tile(block: int, cap: int, name: str) -> int:
    """The tile side covering an op block: the largest power of two up to `cap` that divides it."""
    if block < MIN_TILE or block % MIN_TILE:
        raise PluginError(f"BlockSparseAttention's Triton kernel covers blocks with tiles of powers of two >= "
                          f"{MIN_TILE} that divide them, and {name}={block} is not a multiple of {MIN_TILE}; use a "
                          "block that is (64 and 128 are usual) or run the op's reference or ONNX decomposition.")
    return min(cap, block & -block)


def capped_tiles(block_q: int, block_k: int, cap_m: int, cap_n: int) -> Tiles:
    """Tiles no larger than the caps, 8 warps for 128-row tiles (two warp groups on Hopper), else 4."""
    m = kernel_tile(block_q, cap_m, "block_q")
    return Tiles(m, kernel_tile(block_k, cap_n, "block_k"), num_warps=8 if m >= 128 else 4)


def default_tiles(block_q: int, block_k: int) -> Tiles:
    """The launcher's configuration when none is given: TensorRT's first tactic."""
    return capped_tiles(block_q, block_k, *TACTIC_CAPS[0])


def tactic_tiles(tactic: int, block_q: int, block_k: int) -> Tiles:
    """The tiles of a TensorRT tactic (1-based; 0, TensorRT's default tactic, is the first)."""
    return capped_tiles(block_q, block_k, *TACTIC_CAPS[max(tactic, 1) - 1])


def distinct_tactics(block_q: int, block_k: int) -> list[int]:
    """The tactics worth timing for these blocks: one per distinct tile shape."""
    seen: dict[tuple[int, int], int] = {}
    for tactic in range(1, len(TACTIC_CAPS) + 1):
        tiles = tactic_tiles(tactic, block_q, block_k)
        seen.setdefault((tiles.m, tiles.n), tactic)
    return list(seen.values())


def _check_tiles(tiles: Tiles, block_q: int, block_k: int) -> None:
    for side, block, name in ((tiles.m, block_q, "block_q"), (tiles.n, block_k, "block_k")):
        if side < MIN_TILE or side & (side - 1) or block % side:
            raise PluginError(f"BlockSparseAttention's tile side {side} must be a power of two >= {MIN_TILE} that "
                              f"divides {name}={block}; pick another Tiles or leave tiles=None.")


def _head_tile(width: int, least: int = MIN_TILE) -> int:
    """The power-of-two tile holding a head dimension, at least `least` (masked past the width)."""
    return max(least, 1 << (width - 1).bit_length())


@triton.jit
def attention_program(q_ptr, k_ptr, v_ptr, count_ptr, index_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
                      H, L, S, SLOTS, LIST_B, LIST_H, out_ptr, SCALE: tl.constexpr, D: tl.constexpr,
                      DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      FP8: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * L * D + rows[:, None] * D + d[None, :],
                mask=(rows[:, None] < L) & (d[None, :] < D), other=0.0)
    query_block = tile * BLOCK_M // BLOCK_Q
    query_blocks = tl.cdiv(L, BLOCK_Q)
    list_row = (((bh // H) % LIST_B) * LIST_H + (bh % H) % LIST_H) * query_blocks + query_block
    qk_scale = tl.full([], SCALE * LOG2E, tl.float32)
    if FP8:
        qk_scale = qk_scale * tl.load(q_scale_ptr + bh * query_blocks + query_block)
    # a finite floor, not -inf: a key tile wholly past S leaves the max there and exp2(floor - floor) = 1
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    for step in range(tl.load(count_ptr + list_row).to(tl.int32) * SPLIT):
        key_block = tl.load(index_ptr + list_row * SLOTS + step // SPLIT).to(tl.int32)
        cols = key_block * BLOCK_K + (step % SPLIT) * BLOCK_N + tl.arange(0, BLOCK_N)
        keys = cols < S
        k = tl.load(k_ptr + bh * S * D + cols[:, None] * D + d[None, :],
                    mask=keys[:, None] & (d[None, :] < D), other=0.0)
        tile_scale = qk_scale
        if FP8:
            tile_scale = tile_scale * tl.load(k_scale_ptr + bh * tl.cdiv(S, BLOCK_K) + key_block)
        s = tl.where(keys[None, :], tl.dot(q, tl.trans(k)) * tile_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + bh * S * DV + cols[:, None] * DV + dv[None, :],
                    mask=keys[:, None] & (dv[None, :] < DV), other=0.0)
        if FP8:
            v = v.to(tl.float16)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr + bh * DV + dv, mask=dv < DV, other=0.0)[None, :]
    tl.store(out_ptr + bh * L * DV + rows[:, None] * DV + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < L) & (dv[None, :] < DV))


@triton.jit
def block_sparse_attention_kernel(q_ptr, k_ptr, v_ptr, count_ptr, index_ptr, H, L, S, SLOTS, LIST_B,
                                  LIST_H, out_ptr, SCALE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    attention_program(q_ptr, k_ptr, v_ptr, count_ptr, index_ptr, q_ptr, q_ptr, q_ptr, H, L, S, SLOTS,
                      LIST_B, LIST_H, out_ptr, SCALE, D, DV, BLOCK_D, BLOCK_DV, BLOCK_Q, BLOCK_K, BLOCK_M,
                      BLOCK_N, False)


@triton.jit
def block_sparse_attention_fp8_kernel(q_ptr, k_ptr, v_ptr, count_ptr, index_ptr, q_scale_ptr, k_scale_ptr,
                                      v_scale_ptr, H, L, S, SLOTS, LIST_B, LIST_H, out_ptr,
                                      SCALE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                                      BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    attention_program(q_ptr, k_ptr, v_ptr, count_ptr, index_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
                      H, L, S, SLOTS, LIST_B, LIST_H, out_ptr, SCALE, D, DV, BLOCK_D, BLOCK_DV, BLOCK_Q,
                      BLOCK_K, BLOCK_M, BLOCK_N, True)


@triton.jit
def quantize_tiles_kernel(x_ptr, N, out_ptr, scale_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK: tl.constexpr, ROWS: tl.constexpr, FMAX: tl.constexpr,
                          GIVEN_SCALE: tl.constexpr):
    # scale_ptr is read when the scales are given, written when they come from the tile's amax
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    where = bh * tl.cdiv(N, BLOCK) + tile
    if GIVEN_SCALE:
        scale = tl.load(scale_ptr + where)
    else:
        amax = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for start in tl.static_range(0, BLOCK, ROWS):
            rows = tile * BLOCK + start + tl.arange(0, ROWS)
            x = tl.load(x_ptr + bh * N * D + rows[:, None] * D + d[None, :],
                        mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        peak = tl.max(tl.max(amax, 1), 0)
        # divided exactly and rounded to x's type, as the reference computes its scales
        scale = tl.where(peak > 0, tl.math.div_rn(peak, FMAX).to(x_ptr.dtype.element_ty).to(tl.float32), 1.0)
        tl.store(scale_ptr + where, scale)
    for start in tl.static_range(0, BLOCK, ROWS):
        rows = tile * BLOCK + start + tl.arange(0, ROWS)
        offsets = bh * N * D + rows[:, None] * D + d[None, :]
        keep = (rows[:, None] < N) & (d[None, :] < D)
        x = tl.load(x_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
        scaled = tl.clamp(tl.math.div_rn(x, scale), -FMAX, FMAX)
        tl.store(out_ptr + offsets, scaled.to(out_ptr.dtype.element_ty), mask=keep)


# ------------------------------------------------------------------------------------------------ checks


def _check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, types: tuple[torch.dtype, ...]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise PluginError(f"BlockSparseAttention takes q [B,H,L,D], k [B,H,S,D] and v [B,H,S,Dv], got shapes "
                          f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}; reshape them to rank 4.")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise PluginError(f"BlockSparseAttention's q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
                          "disagree; q and k need the same B, H and D, k and v the same B, H and S.")
    if q.dtype not in types or k.dtype != q.dtype or v.dtype != q.dtype:
        names = ", ".join(str(t).removeprefix("torch.") for t in types)
        raise PluginError(f"BlockSparseAttention's Triton kernel takes q, k and v of one type among {names}, got "
                          f"{q.dtype}, {k.dtype} and {v.dtype}; cast them.")


def _check_list_shapes(q: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor) -> None:
    """What the kernel's addressing assumes: int64 lists of rank 3 and 4 whose B' and H' are B or H, or 1."""
    if kv_count.dtype != torch.int64 or kv_index.dtype != torch.int64 or kv_count.dim() != 3 or kv_index.dim() != 4:
        raise PluginError(f"BlockSparseAttention takes int64 kv_count [B',H',QB] and kv_index [B',H',QB,M], got "
                          f"{kv_count.dtype} {tuple(kv_count.shape)} and {kv_index.dtype} {tuple(kv_index.shape)}.")
    for axis, name in ((0, "B"), (1, "H")):
        for lists in (kv_count, kv_index):
            if lists.shape[axis] not in (1, q.shape[axis]):
                raise PluginError(f"BlockSparseAttention's lists have {lists.shape[axis]} rows on axis {axis} where q "
                                  f"has {name}={q.shape[axis]}; give one list per {name} or a single one (broadcast).")


def _flat_lists(kv_count: torch.Tensor, kv_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both lists with the same (broadcast) B' and H', contiguous, as the kernel reads them."""
    lead = torch.broadcast_shapes(kv_count.shape, kv_index.shape[:3])
    return kv_count.expand(lead).contiguous(), kv_index.expand(*lead, kv_index.shape[3]).contiguous()


def _check_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int,
                  q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    expected = {"q_scale": (*q.shape[:2], blocks_of(q.shape[2], block_q)),
                "k_scale": (*k.shape[:2], blocks_of(k.shape[2], block_k)), "v_scale": (*v.shape[:2], v.shape[3])}
    for (name, shape), given in zip(expected.items(), (q_scale, k_scale, v_scale), strict=True):
        if tuple(given.shape) != shape:
            raise PluginError(f"BlockSparseAttention's {name} is {tuple(given.shape)}, the operands need {shape}; "
                              "give one scale per tile of tokens (Q, K) or per value channel (V) of each head.")


# ------------------------------------------------------------------------------------------------ launchers


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor,
                                  kv_index: torch.Tensor, block_q: int, block_k: int, scale: float, fp8: str = "off",
                                  q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                                  v_scale: torch.Tensor | None = None, *, tiles: Tiles | None = None,
                                  validate: bool = True) -> torch.Tensor:
    """BlockSparseAttention on the Triton kernels, the reference's output in q's dtype. With fp8, Q and K are
    quantized per tile on the GPU (the quantize kernel), V per channel by torch, scales from the amax unless
    given. `validate=False` skips the range check of the lists, a host copy and sync, for callers that built
    them (benchmarks)."""
    check_fp8(fp8)
    _check_operands(q, k, v, FLOAT_TYPES)
    if fp8 == "off":
        return _attend(q, k, v, None, kv_count, kv_index, block_q, block_k, scale, q.dtype, tiles, validate)
    q8, q_scale = quantize_tiles_triton(q, block_q, fp8, q_scale)
    k8, k_scale = quantize_tiles_triton(k, block_k, fp8, k_scale)
    v8, v_scale = quantize_channels(v, fp8, v_scale)
    return attention_on_quantized(q8, k8, v8, q_scale, k_scale, v_scale, kv_count, kv_index, block_q, block_k, scale,
                                  out_dtype=q.dtype, tiles=tiles, validate=validate)


def attention_on_quantized(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_scale: torch.Tensor,
                           k_scale: torch.Tensor, v_scale: torch.Tensor, kv_count: torch.Tensor,
                           kv_index: torch.Tensor, block_q: int, block_k: int, scale: float,
                           out_dtype: torch.dtype = torch.float32, *, tiles: Tiles | None = None,
                           validate: bool = True) -> torch.Tensor:
    """BlockSparseAttention on already quantized fp8 operands (one float8 type): q8 [B,H,L,D] with q_scale
    [B,H,QB], k8 [B,H,S,D] with k_scale [B,H,KB], v8 [B,H,S,Dv] with v_scale [B,H,Dv]; the attention of the
    dequantized operands `x8 * scale`, which is the reference's fp8 output."""
    _check_operands(q8, k8, v8, tuple(dtype for dtype, _ in FP8_FORMATS.values()))
    _check_scales(q8, k8, v8, block_q, block_k, q_scale, k_scale, v_scale)
    scales = tuple(s.to(device=q8.device, dtype=torch.float32).contiguous() for s in (q_scale, k_scale, v_scale))
    return _attend(q8, k8, v8, scales, kv_count, kv_index, block_q, block_k, scale, out_dtype, tiles, validate)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: tuple[torch.Tensor, ...] | None,
            kv_count: torch.Tensor, kv_index: torch.Tensor, block_q: int, block_k: int, scale: float,
            out_dtype: torch.dtype, tiles: Tiles | None, validate: bool) -> torch.Tensor:
    """Launch the float kernel (scales None) or the FP8 one on a (query tiles, B*H) grid."""
    tiles = tiles or default_tiles(block_q, block_k)
    _check_tiles(tiles, block_q, block_k)
    _check_list_shapes(q, kv_count, kv_index)
    if validate:
        check_lists(q, k, kv_count.cpu(), kv_index.cpu(), block_q, block_k)
    count, index = _flat_lists(kv_count.to(q.device), kv_index.to(q.device))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, length, head_dim = q.shape
    if batch * heads > MAX_GRID_Y:
        raise PluginError(f"BlockSparseAttention's Triton kernel runs batch * heads = {batch * heads} programs on a "
                          f"grid axis that holds {MAX_GRID_Y}; split the batch into smaller calls.")
    out = torch.empty((batch, heads, length, v.shape[3]), dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    pointers = (q, k, v, count, index) if scales is None else (q, k, v, count, index, *scales)
    scalars = (heads, length, k.shape[2], index.shape[3], index.shape[0], index.shape[1])
    grid = (-(-length // tiles.m), batch * heads)
    kernel = block_sparse_attention_kernel if scales is None else block_sparse_attention_fp8_kernel
    constexprs = _constexprs(head_dim, v.shape[3], block_q, block_k, scale, tiles, fp8=scales is not None)
    kernel[grid](*pointers, *scalars, out, **constexprs, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def _constexprs(head_dim: int, value_dim: int, block_q: int, block_k: int, scale: float, tiles: Tiles,
                fp8: bool) -> dict[str, Any]:
    """The attention kernels' compile-time arguments."""
    least = MIN_FP8_CONTRACTION if fp8 else MIN_TILE
    return {"SCALE": float(scale), "D": head_dim, "DV": value_dim, "BLOCK_D": _head_tile(head_dim, least),
            "BLOCK_DV": _head_tile(value_dim), "BLOCK_Q": block_q, "BLOCK_K": block_k, "BLOCK_M": tiles.m,
            "BLOCK_N": tiles.n}


def quantize_tiles_triton(x: torch.Tensor, block: int, fp8: str,
                          scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,H,N,D] (float) rounded to fp8 per tile of `block` tokens of one head: (x8, scales [B,H,NB] fp32),
    the scales from each tile's amax (reference.tile_scales) unless given. `x8 * scale` is
    reference.quantize_tiles(x) for fp32 x; for fp16 and bf16 the reference first rounds x / scale to x's type
    (a double rounding), the kernel rounds once, so they may differ by one fp8 step next to a tie."""
    check_fp8(fp8)
    if fp8 == "off":
        raise PluginError("BlockSparseAttention's quantize kernel needs an fp8 format; use fp8='e4m3' or 'e5m2'.")
    dtype, fmax = FP8_FORMATS[fp8]
    x = x.contiguous()
    batch, heads, tokens, width = x.shape
    tiles = blocks_of(tokens, block)
    given = scale is not None
    scales = (scale.to(device=x.device, dtype=torch.float32).contiguous() if given else
              torch.empty((batch, heads, tiles), dtype=torch.float32, device=x.device))
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel():
        rows = kernel_tile(block, QUANTIZE_ROWS, "block")
        quantize_tiles_kernel[(tiles, batch * heads)](x, tokens, out, scales, D=width, BLOCK_D=_head_tile(width),
                                                      BLOCK=block, ROWS=rows, FMAX=fmax, GIVEN_SCALE=given)
    return out, scales


def quantize_channels(v: torch.Tensor, fp8: str,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B,H,S,Dv] rounded to fp8 per value channel of one head (reference.channel_scales unless given), by
    torch: (v8, scales [B,H,Dv] fp32)."""
    dtype, fmax = FP8_FORMATS[fp8]
    scale = channel_scales(v, fp8) if scale is None else scale.to(v.device)
    v8 = (v / scale[:, :, None, :]).clamp(-fmax, fmax).to(dtype)
    return v8, scale.to(torch.float32)


# ------------------------------------------------------------------------------------------------ ahead of time


def compile_attention_kernel(dtype: str, head_dim: int, value_dim: int, block_q: int, block_k: int, scale: float,
                             tiles: Tiles | None = None, out_dtype: str | None = None, target: Any = None) -> Any:
    """An attention kernel compiled ahead of time (PTX in `.asm["ptx"]`), as TensorRT's AOT plugin embeds it.

    `dtype` is Triton's name of the operands: "fp32", "fp16", "bf16" (the float kernel) or "fp8e4nv", "fp8e5"
    (the FP8 kernel, which also takes fp32 q, k and v scale pointers); `out_dtype` the output's (the operands'
    for floats, else fp16). `target` a `triton.backends.compiler.GPUTarget`, None for the current GPU.
    Arguments: q, k, v, kv_count, kv_index pointers [, scale pointers], int32 H, L, S, M, B', H', the output.
    compile_ahead_of_time passes no compile options nor argument attributes, so warps and stages are Triton's
    defaults (`tiles` sets the sides only) and the pointers carry no 16-byte alignment hint: the PTX loads
    element by element where the JIT launcher's specialized kernel loads 16 bytes at a time.
    """
    tiles = tiles or default_tiles(block_q, block_k)
    _check_tiles(tiles, block_q, block_k)
    fp8 = dtype.startswith("fp8")
    out_dtype = out_dtype or ("fp16" if fp8 else dtype)
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "count_ptr": "*i64",
                "index_ptr": "*i64"}
    if fp8:
        pointers |= dict.fromkeys(("q_scale_ptr", "k_scale_ptr", "v_scale_ptr"), "*fp32")
    constexprs = _constexprs(head_dim, value_dim, block_q, block_k, scale, tiles, fp8)
    signature = {**pointers, **dict.fromkeys(("H", "L", "S", "SLOTS", "LIST_B", "LIST_H"), "i32"),
                 "out_ptr": f"*{out_dtype}", **dict.fromkeys(constexprs, "constexpr")}
    kernel = block_sparse_attention_fp8_kernel if fp8 else block_sparse_attention_kernel
    return compile_ahead_of_time(kernel, signature, constexprs, target)
