"""What the TensorRT plugin modules share; imported only by them, so tensorrt loads only when asked for."""

from __future__ import annotations

import tensorrt as trt

from dync.errors import PluginError

_TRITON_DTYPES = {trt.float32: "fp32", trt.float16: "fp16"}


def triton_dtype(dtype: trt.DataType, op: str) -> str:
    """Triton's pointer type name for a TensorRT data type the Triton kernels support."""
    if dtype not in _TRITON_DTYPES:
        raise PluginError(f"{op}'s TensorRT plugin supports float32 and float16, not {dtype}.")
    return _TRITON_DTYPES[dtype]
