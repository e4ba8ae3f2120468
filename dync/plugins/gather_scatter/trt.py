"""The TensorRT plugin of GatherPatches, written against `tensorrt.plugin` (Quickly Deployable Plugins).

The registry's `tensorrt` face of GatherPatches is `register`; importing this module loads tensorrt and
triton. There is deliberately no `from __future__ import annotations` here: `tensorrt.plugin` reads the
annotations of the decorated functions as classes (`issubclass(annotation, TensorDesc)`), so they must not
be strings. ScatterAddPatches has no TensorRT plugin yet: one kernel can only add into an output aliased to
`base`, which is untested with AOT plugins here, so TensorRT runs its portable decomposition instead.
"""

import tensorrt.plugin as trtp

from dync.plugins._tensorrt import register_once, triton_dtype
from dync.plugins.gather_scatter import GATHER, gather_patches_shape
from dync.plugins.gather_scatter.kernels import BLOCK_C, compile_gather_kernel


def gather_patches_desc(x: trtp.TensorDesc, index: trtp.TensorDesc, patch: int, halo: int) -> trtp.TensorDesc:
    """Output [M, C, S+2h, S+2h] in x's dtype, as shape expressions (M and C may be dynamic)."""
    dims = gather_patches_shape(x.shape_expr, index.shape_expr, patch=patch, halo=halo)
    return trtp.from_shape_expr(dims, dtype=x.dtype)


def gather_patches_aot(
    x: trtp.TensorDesc, index: trtp.TensorDesc, patch: int, halo: int, outputs: tuple[trtp.TensorDesc], tactic: int
) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    """The Triton gather kernel compiled to PTX, launched on a (M, ceil(C / BLOCK_C)) grid."""
    kernel = compile_gather_kernel(triton_dtype(x.dtype, GATHER), patch, halo)
    dims = x.shape_expr
    params = trtp.KernelLaunchParams()
    params.grid_x = index.shape_expr[0]
    params.grid_y = trtp.cdiv(dims[1], BLOCK_C)
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (dims[1], dims[2], dims[3], patch, halo)])
    return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, scalars


def register() -> None:
    """Register the shape function and the AOT implementation with `tensorrt.plugin`, once per process."""
    register_once(GATHER, gather_patches_desc, gather_patches_aot)
