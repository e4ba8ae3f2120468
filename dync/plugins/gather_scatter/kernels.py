"""The Triton kernels of GatherPatches / ScatterAddPatches, their PyTorch launchers, and the gather kernel's
ahead-of-time build for TensorRT. Imports torch and triton; the registry loads it only when a kernel is asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from dync.plugins._triton import compile_ahead_of_time
from dync.plugins.gather_scatter.reference import check_inputs

BLOCK_C = 4  # channels per program; the patch is one power-of-two tile of BLOCK_P >= side * side elements


def _block_p(side: int) -> int:
    """The smallest power of two holding a side x side patch (Triton tiles have power-of-two sizes)."""
    return 1 << max(0, (side * side - 1).bit_length())


def _kernels() -> tuple[Any, Any]:
    """The two Triton kernels, defined on first use so triton is imported only where a kernel is wanted.

    Argument order is (input pointers, int32 scalars, output pointer, constexprs): the calling convention of
    TensorRT AOT plugins, so the same kernel serves the PyTorch launcher and `@trtp.aot_impl`.
    """
    global _KERNELS
    if _KERNELS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def gather_patches_kernel(x_ptr, idx_ptr, C, H, W, S, HALO, out_ptr,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
            m = tl.program_id(0)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
            q = tl.arange(0, BLOCK_P)[None, :]
            side = S + 2 * HALO
            n = tl.load(idx_ptr + 3 * m)
            row = tl.load(idx_ptr + 3 * m + 1) * S - HALO + q // side
            col = tl.load(idx_ptr + 3 * m + 2) * S - HALO + q % side
            keep = (c < C) & (q < side * side)
            inside = keep & (row >= 0) & (row < H) & (col >= 0) & (col < W)
            values = tl.load(x_ptr + ((n * C + c) * H + row) * W + col, mask=inside, other=0.0)
            tl.store(out_ptr + (m * C + c) * side * side + q, values, mask=keep)

        @triton.jit
        def scatter_add_patches_kernel(patches_ptr, idx_ptr, C, H, W, S, out_ptr,
                                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
            m = tl.program_id(0)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
            q = tl.arange(0, BLOCK_P)[None, :]
            n = tl.load(idx_ptr + 3 * m)
            row = tl.load(idx_ptr + 3 * m + 1) * S + q // S
            col = tl.load(idx_ptr + 3 * m + 2) * S + q % S
            keep = (c < C) & (q < S * S)
            inside = keep & (row < H) & (col < W)
            target = out_ptr + ((n * C + c) * H + row) * W + col
            values = tl.load(patches_ptr + (m * C + c) * S * S + q, mask=keep, other=0.0)
            tl.store(target, tl.load(target, mask=inside, other=0.0) + values, mask=inside)

        _KERNELS = (gather_patches_kernel, scatter_add_patches_kernel)
    return _KERNELS


_KERNELS: tuple[Any, Any] | None = None


def gather_patches_triton(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    """GatherPatches on the Triton kernel: one program per (patch, channel block), masked loads for the halo."""
    check_inputs(x, index, patch, halo)
    x, index = x.contiguous(), index.contiguous()
    side = patch + 2 * halo
    out = x.new_empty((index.shape[0], x.shape[1], side, side))
    if out.numel():
        _, channels, height, width = x.shape
        grid = (index.shape[0], -(-channels // BLOCK_C))
        _kernels()[0][grid](x, index, channels, height, width, patch, halo, out,
                            BLOCK_C=BLOCK_C, BLOCK_P=_block_p(side))
    return out


def scatter_add_patches_triton(
    base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int
) -> torch.Tensor:
    """ScatterAddPatches on the Triton kernel: copy base, then each program adds one (patch, channel block)."""
    check_inputs(base, index, patch, 0)
    out, patches, index = base.contiguous().clone(), patches.contiguous(), index.contiguous()
    if patches.numel():
        _, channels, height, width = base.shape
        grid = (index.shape[0], -(-channels // BLOCK_C))
        _kernels()[1][grid](patches, index, channels, height, width, patch, out,
                            BLOCK_C=BLOCK_C, BLOCK_P=_block_p(patch))
    return out


def compile_gather_kernel(dtype: str, patch: int, halo: int, target: Any = None) -> Any:
    """The gather kernel compiled ahead of time (PTX in `.asm["ptx"]`), as TensorRT's AOT plugin embeds it.

    `dtype` is Triton's name ("fp32", "fp16"); `target` a `triton.backends.compiler.GPUTarget`, or None for
    the current GPU. Arguments: x and index pointers, int32 C, H, W, S, halo, then the output pointer.
    """
    scalars = dict.fromkeys(("C", "H", "W", "S", "HALO"), "i32")
    signature = {"x_ptr": f"*{dtype}", "idx_ptr": "*i64", **scalars, "out_ptr": f"*{dtype}",
                 "BLOCK_C": "constexpr", "BLOCK_P": "constexpr"}
    constexprs = {"BLOCK_C": BLOCK_C, "BLOCK_P": _block_p(patch + 2 * halo)}
    return compile_ahead_of_time(_kernels()[0], signature, constexprs, target)
