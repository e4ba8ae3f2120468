"""What the TensorRT plugin modules share; imported only by them, so tensorrt loads only when asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorrt as trt
import tensorrt.plugin as trtp

from dync.errors import PluginError
from dync.plugins.op_registry import DTYPES, OpRecord


def triton_dtype(dtype: trt.DataType, op: OpRecord) -> str:
    """Triton's pointer type name for a TensorRT data type that `op` declares (the registry's one type table)."""
    for name in op.dtypes:
        if getattr(trt, DTYPES[name].tensorrt) == dtype:
            return DTYPES[name].triton
    raise PluginError(f"{op.name}'s TensorRT plugin takes {', '.join(op.dtypes)}, not {dtype}; cast the input to "
                      "one of those before the node.")


_registered: set[str] = set()


def register_once(op: OpRecord, describe: Callable[..., Any], aot: Callable[..., Any]) -> None:
    """Register `op`'s shape function and AOT implementation with `tensorrt.plugin`, once per process (a
    second registration of the same plugin id is an error there)."""
    if op.plugin_id in _registered:
        return
    trtp.register(op.plugin_id)(describe)
    trtp.aot_impl(op.plugin_id)(aot)
    _registered.add(op.plugin_id)
