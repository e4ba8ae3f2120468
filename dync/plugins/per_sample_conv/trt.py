"""The TensorRT plugin of PerSampleConv2d, written against `tensorrt.plugin` (Quickly Deployable Plugins).

The registry's `tensorrt` face of PerSampleConv2d is `register`; importing this module loads tensorrt and
triton. There is deliberately no `from __future__ import annotations` here: `tensorrt.plugin` reads the
annotations of the decorated functions as classes, so they must not be strings. List attributes arrive as
1-D numpy arrays, the only list form `tensorrt.plugin` accepts.
"""

import numpy as np
import numpy.typing as npt
import tensorrt.plugin as trtp

from dync.plugins._tensorrt import register_once, triton_dtype
from dync.plugins.per_sample_conv import OP, shape
from dync.plugins.per_sample_conv.kernels import BLOCK_CO, BLOCK_P, compile_kernel


def per_sample_conv2d_desc(
    x: trtp.TensorDesc, weight: trtp.TensorDesc, kernel_shape: npt.NDArray[np.int64], strides: npt.NDArray[np.int64],
    pads: npt.NDArray[np.int64], dilations: npt.NDArray[np.int64], group: int,
) -> trtp.TensorDesc:
    """Output [B, Cout, H', W'] in x's dtype, as shape expressions (B, H and W may be dynamic)."""
    dims = shape(x.shape_expr, weight.shape_expr, kernel_shape=kernel_shape.tolist(), strides=strides.tolist(),
                 pads=pads.tolist(), dilations=dilations.tolist(), group=group)
    return trtp.from_shape_expr(dims, dtype=x.dtype)


def per_sample_conv2d_aot(
    x: trtp.TensorDesc, weight: trtp.TensorDesc, kernel_shape: npt.NDArray[np.int64], strides: npt.NDArray[np.int64],
    pads: npt.NDArray[np.int64], dilations: npt.NDArray[np.int64], group: int, outputs: tuple[trtp.TensorDesc],
    tactic: int,
) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    """The Triton kernel compiled to PTX, on a (B*groups, Cout/groups blocks, pixel blocks) grid."""
    kernel = compile_kernel(triton_dtype(x.dtype, OP), kernel_shape.tolist(), strides.tolist(),
                            pads[:2].tolist(), dilations.tolist())
    dims, out = x.shape_expr, outputs[0].shape_expr
    cout_g = out[1] // group
    params = trtp.KernelLaunchParams()
    params.grid_x = dims[0] * group
    params.grid_y = trtp.cdiv(cout_g, BLOCK_CO)
    params.grid_z = trtp.cdiv(out[2] * out[3], BLOCK_P)
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    scalars = [dims[1] // group, dims[2], dims[3], cout_g, out[2], out[3], group]
    return (kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params,
            trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars]))


def register() -> None:
    """Register the shape function and the AOT implementation with `tensorrt.plugin`, once per process."""
    register_once(OP, per_sample_conv2d_desc, per_sample_conv2d_aot)
