"""The Triton direct-conv kernel of PerSampleConv2d, its PyTorch launcher, and its ahead-of-time build for
TensorRT. Imports torch and triton; the registry loads it only when a kernel is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dync.plugins._triton import compile_ahead_of_time
from dync.plugins.per_sample_conv.reference import _per_sample_conv2d_fake, check_inputs

BLOCK_CO = 16  # output channels per program
BLOCK_P = 64  # output pixels per program


def _kernel() -> Any:
    """The Triton direct-conv kernel, defined on first use so triton is imported only where it is wanted.

    One program computes BLOCK_CO output channels x BLOCK_P output pixels of one (sample, group), summing
    over the group's input channels and the kernel taps. Argument order is (input pointers, int32 scalars,
    output pointer, constexprs), the calling convention of TensorRT AOT plugins.
    """
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def per_sample_conv2d_kernel(x_ptr, w_ptr, CIN_G, H, W, COUT_G, HO, WO, G, out_ptr,
                                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                     BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
            sample_group = tl.program_id(0)
            b = sample_group // G
            first_channel = (sample_group % G) * COUT_G
            co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)[:, None]
            p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
            row0 = (p // WO) * SH - PH
            col0 = (p % WO) * SW - PW
            keep_co = co < COUT_G
            keep_p = p < HO * WO
            acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
            w_rows = w_ptr + ((b * G * COUT_G + first_channel + co) * CIN_G) * KH * KW
            x_planes = x_ptr + sample_group * CIN_G * H * W
            for ci in range(CIN_G):
                for ki in tl.static_range(KH):
                    for kj in tl.static_range(KW):
                        row = row0 + ki * DH
                        col = col0 + kj * DW
                        inside = keep_p & (row >= 0) & (row < H) & (col >= 0) & (col < W)
                        xv = tl.load(x_planes + (ci * H + row) * W + col, mask=inside, other=0.0)
                        wv = tl.load(w_rows + (ci * KH + ki) * KW + kj, mask=keep_co, other=0.0)
                        acc += wv.to(tl.float32) * xv.to(tl.float32)
            target = out_ptr + (b * G * COUT_G + first_channel + co) * HO * WO + p
            tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=keep_co & keep_p)

        _KERNEL = per_sample_conv2d_kernel
    return _KERNEL


_KERNEL: Any = None


def _constexprs(kernel_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> dict[str, int]:
    """The kernel's compile-time arguments: kernel size, stride, padding, dilation and the tile sizes."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_shape, stride, padding, dilation
    return {"KH": kh, "KW": kw, "SH": sh, "SW": sw, "PH": ph, "PW": pw, "DH": dh, "DW": dw,
            "BLOCK_CO": BLOCK_CO, "BLOCK_P": BLOCK_P}


def per_sample_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], groups: int) -> torch.Tensor:
    """PerSampleConv2d on the Triton kernel: a (B*groups, Cout/groups blocks, pixel blocks) grid."""
    check_inputs(x, weight, groups)
    x, weight = x.contiguous(), weight.contiguous()
    out = _per_sample_conv2d_fake(x, weight, stride, padding, dilation, groups)
    if out.numel():
        batch, cout, cin_g, kh, kw = weight.shape
        ho, wo = out.shape[2:]
        grid = (batch * groups, -(-(cout // groups) // BLOCK_CO), -(-(ho * wo) // BLOCK_P))
        _kernel()[grid](x, weight, cin_g, x.shape[2], x.shape[3], cout // groups, ho, wo, groups, out,
                        **_constexprs((kh, kw), stride, padding, dilation))
    return out


def compile_kernel(dtype: str, kernel_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], target: Any = None) -> Any:
    """The kernel compiled ahead of time (PTX in `.asm["ptx"]`), as TensorRT's AOT plugin embeds it.

    `dtype` is Triton's name ("fp32", "fp16"); `target` a `triton.backends.compiler.GPUTarget`, or None for
    the current GPU. Arguments: x and weight pointers, int32 CIN_G, H, W, COUT_G, HO, WO, G, then the output.
    """
    scalars = dict.fromkeys(("CIN_G", "H", "W", "COUT_G", "HO", "WO", "G"), "i32")
    constexprs = _constexprs(kernel_shape, stride, padding, dilation)
    signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", **scalars, "out_ptr": f"*{dtype}",
                 **dict.fromkeys(constexprs, "constexpr")}
    return compile_ahead_of_time(_kernel(), signature, constexprs, target)
