"""Block-sparse attention on a GPU: dync's Triton kernel against torch's SDPA, bf16 and FP8, dense and sparse.

Run from the repository root:  python -m benchmarks.gpu_sparse_attention [--repeats 20] [--length 32760]

One attention layer of a video diffusion transformer on an H100/H200 (a few minutes): B=1, H=12,
L=S=32760 tokens, D=128, blocks of 128 tokens (256 per axis, the last one partial: padded and masked as the
op does). The baseline is `torch.nn.functional.scaled_dot_product_attention` in bf16, dense, with torch's
own choice of backend. The Triton rows run `dync.plugins.block_sparse_attention.kernels` on every key block
(dense) or on random lists of distinct key blocks with a fixed count per query block and head (75% sparse:
64 of 256 blocks, 90%: 26), in bf16, or in FP8 (e4m3) on operands quantized beforehand (Q and K per tile, V
per channel; the quantization's own time is its row). Each Triton row is timed for every tile configuration
of TILES and reports the fastest (what TensorRT's autotune does with its tactics).

Columns: median ms over `--repeats` calls after warm-up (CUDA events), speedup over SDPA bf16 dense, and the
cosine similarity of the output against bf16 SDPA with the same mask (dense SDPA for the dense rows; for the
sparse ones SDPA with the lists' token mask, run head by head). Goals from the issue: FP8 dense >= 1.3x,
75% sparse >= 3.5x, 90% sparse >= 6x, cosine >= 0.99.

Expected (not run: no GPU here):

| config | tiles | ms | vs SDPA bf16 dense | cosine | goal |
| --- | --- | --- | --- | --- | --- |
| SDPA bf16 dense | - | not run: no GPU here | 1.00x | - | - |
| Triton bf16 dense | not run | not run | not run | not run | - |
| Triton FP8 dense | not run | not run | not run | not run | >= 1.3x, cosine >= 0.99 |
| FP8 quantization (Q, K Triton; V torch) | - | not run | - | - | - |
| Triton bf16 75% sparse | not run | not run | not run | not run | >= 3.5x, cosine >= 0.99 |
| Triton FP8 75% sparse | not run | not run | not run | not run | >= 3.5x, cosine >= 0.99 |
| Triton bf16 90% sparse | not run | not run | not run | not run | >= 6x, cosine >= 0.99 |
| Triton FP8 90% sparse | not run | not run | not run | not run | >= 6x, cosine >= 0.99 |
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from dync.plugins.block_sparse_attention import kernels
from dync.plugins.block_sparse_attention.kernels import Tiles
from dync.plugins.block_sparse_attention.reference import allowed_blocks

HEADS = 12
HEAD_DIM = 128
BLOCK = 128
FP8 = "e4m3"
SPARSITIES = (0.0, 0.75, 0.9)
GOALS = {("FP8", 0.0): 1.3, ("bf16", 0.75): 3.5, ("FP8", 0.75): 3.5, ("bf16", 0.9): 6.0, ("FP8", 0.9): 6.0}
"""Speedups over SDPA bf16 dense that the issue asks for, by (precision, block sparsity)."""
COSINE_GOAL = 0.99
TILES = (Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 2), Tiles(64, 64, 4, 3), Tiles(128, 64, 4, 3))
WARMUP = 3


def require_cuda() -> None:
    """Exit with one clear line where the benchmark cannot run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks.gpu_sparse_attention times GPU kernels; unset TRITON_INTERPRET and run it again.")
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_sparse_attention needs a CUDA GPU (an H100 or H200) and torch sees none; run it "
                 "on a machine with one.")


def median_ms(call: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` calls after WARMUP untimed ones, each timed by CUDA events."""
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_lists(blocks: int, kept: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_count [1,H,QB], kv_index [1,H,QB,kept]): `kept` distinct random key blocks per query block and head."""
    order = torch.rand(1, HEADS, blocks, blocks, generator=gen, device="cuda").argsort(-1)
    return torch.full((1, HEADS, blocks), kept, dtype=torch.int64, device="cuda"), order[..., :kept].contiguous()


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor,
                kv_index: torch.Tensor) -> torch.Tensor:
    """bf16 SDPA restricted to the listed blocks, head by head (a [L, S] token mask per head, not per layer)."""
    length, keys = q.shape[2], k.shape[2]
    blocks = allowed_blocks(kv_count, kv_index, -(-keys // BLOCK))[0]
    heads = []
    for h in range(q.shape[1]):
        tokens = blocks[h].repeat_interleave(BLOCK, 0)[:length].repeat_interleave(BLOCK, 1)[:, :keys]
        heads.append(F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], attn_mask=tokens))
    return torch.cat(heads, dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def fastest(attention: Callable[[Tiles], torch.Tensor], repeats: int) -> tuple[float, Tiles]:
    """(ms, tiles) of the fastest configuration of TILES."""
    return min(((median_ms(lambda t=tiles: attention(t), repeats), tiles) for tiles in TILES), key=lambda m: m[0])


def row(config: str, tiles: str, ms: float, speedup: str, similarity: str, goal: str) -> str:
    return f"| {config} | {tiles} | {ms:.2f} | {speedup} | {similarity} | {goal} |"


def triton_row(precision: str, sparsity: float, attention: Callable[[Tiles], torch.Tensor], expected: torch.Tensor,
               baseline: float, repeats: int) -> str:
    """The fastest tiles of one Triton configuration, its speedup over SDPA and its output's cosine."""
    ms, tiles = fastest(attention, repeats)
    label = "dense" if sparsity == 0 else f"{sparsity:.0%} sparse"
    target = GOALS.get((precision, sparsity))
    goal = "-" if target is None else f">= {target:g}x, cosine >= {COSINE_GOAL}"
    return row(f"Triton {precision} {label}", f"{tiles.m}x{tiles.n} w{tiles.num_warps} s{tiles.num_stages}", ms,
               f"{baseline / ms:.2f}x", f"{cosine(attention(tiles), expected):.4f}", goal)


def rows(length: int, repeats: int) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    scale, blocks = HEAD_DIM ** -0.5, -(-length // BLOCK)

    def quantize() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return (kernels.quantize_tiles_triton(q, BLOCK, FP8), kernels.quantize_tiles_triton(k, BLOCK, FP8),
                kernels.quantize_channels(v, FP8))

    sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    out = [row("SDPA bf16 dense", "-", sdpa_ms, "1.00x", "-", "-")]
    (q8, qs), (k8, ks), (v8, vs) = quantize()
    for sparsity in SPARSITIES:
        count, index = random_lists(blocks, round(blocks * (1 - sparsity)), gen)
        kernels.block_sparse_attention_triton(q, k, v, count, index, BLOCK, BLOCK, scale)  # checks the lists once
        expected = F.scaled_dot_product_attention(q, k, v) if sparsity == 0 else masked_sdpa(q, k, v, count, index)

        def bf16(tiles: Tiles, count: torch.Tensor = count, index: torch.Tensor = index) -> torch.Tensor:
            return kernels.block_sparse_attention_triton(q, k, v, count, index, BLOCK, BLOCK, scale, tiles=tiles,
                                                         validate=False)

        def fp8(tiles: Tiles, count: torch.Tensor = count, index: torch.Tensor = index) -> torch.Tensor:
            return kernels.attention_on_quantized(q8, k8, v8, qs, ks, vs, count, index, BLOCK, BLOCK, scale,
                                                  out_dtype=torch.bfloat16, tiles=tiles, validate=False)

        out += [triton_row("bf16", sparsity, bf16, expected, sdpa_ms, repeats),
                triton_row("FP8", sparsity, fp8, expected, sdpa_ms, repeats)]
        if sparsity == 0:
            out.append(row("FP8 quantization (Q, K Triton; V torch)", "-", median_ms(quantize, repeats), "-", "-",
                           "-"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--length", type=int, default=32760, help="tokens L = S")
    args = parser.parse_args()
    require_cuda()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; B=1, H={HEADS}, "
          f"L=S={args.length}, D={HEAD_DIM}, blocks of {BLOCK}\n")
    print("| config | tiles | ms | vs SDPA bf16 dense | cosine | goal |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows(args.length, args.repeats)))


if __name__ == "__main__":
    main()
