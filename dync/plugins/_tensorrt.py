"""What the TensorRT plugin modules share; imported only by them, so tensorrt loads only when asked for."""

from __future__ import annotations

import tensorrt as trt

from dync.errors import PluginError
from dync.plugins.registry import DTYPES, OpRecord


def triton_dtype(dtype: trt.DataType, op: OpRecord) -> str:
    """Triton's pointer type name for a TensorRT data type that `op` declares (the registry's one type table)."""
    for name in op.dtypes:
        if getattr(trt, DTYPES[name].tensorrt) == dtype:
            return DTYPES[name].triton
    raise PluginError(f"{op.name}'s TensorRT plugin takes {', '.join(op.dtypes)}, not {dtype}; cast the input to "
                      "one of those before the node.")
