"""The checks of one node: does the parser know and support its op, is its data type supported, do its rules hold.

Custom-domain nodes go to `dync.lint.custom_ops`; default-domain nodes are checked against the support matrix,
then against their op's rule in `RULES`.
"""

from __future__ import annotations

from onnx import TensorProto

from dync.graph import DEFAULT_DOMAINS
from dync.lint.custom_ops import custom_op_finding
from dync.lint.facts import OperatorFacts, OpFacts
from dync.lint.report import ERROR, TYPE, UNKNOWN_OP, UNSUPPORTED_OP, Finding
from dync.lint.rules import RULES, NodeContext

_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "FP64",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
    TensorProto.UINT4: "UINT4",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT16: "INT16",
    TensorProto.UINT16: "UINT16",
    TensorProto.INT32: "INT32",
    TensorProto.UINT32: "UINT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "STRING",
}


_DATA_TENSORS: dict[str, tuple[tuple[str, int], ...]] = {
    "Where": (("input", 1),),
    "Cast": (("input", 0), ("output", 0)),
    "CastLike": (("input", 0), ("output", 0)),
    "ConstantOfShape": (("output", 0),),
}
"""Which tensors carry an op's element type, where that is not simply the first input (see `_check_types`)."""


def _check_types(ctx: NodeContext, op: OpFacts) -> list[Finding]:
    """The op's data tensor must have one of the op's listed types.

    The matrix gives one type list per op, and for nearly every op it describes the first input, the data input
    (later inputs are often shape or index tensors: Reshape's shape, Gather's indices, Slice's starts). So the
    first input is checked, or the first output for ops without inputs (Constant, RandomNormal); Where checks
    its X (input 1, the condition being BOOL), ConstantOfShape its output (its input is the shape), and
    Cast/CastLike both sides. A tensor whose type is not known after shape inference is skipped.
    """
    default = (("input", 0),) if ctx.node.input else (("output", 0),)
    found = []
    for side, index in _DATA_TENSORS.get(ctx.op, default):
        names = ctx.node.input if side == "input" else ctx.node.output
        name = names[index] if index < len(names) else ""
        type_name = _type_name(ctx.scope.types.get(name)) if name else None
        if type_name is None or type_name in op.types:
            continue
        allowed = "/".join(sorted(op.types)) or "no type"
        fix = "cast it to a supported type before the node" if side == "input" else "make it emit a supported type"
        found.append(ctx.finding(
            ERROR, TYPE,
            f"node '{ctx.label}' ({ctx.op}) has {side} '{name}' of type {type_name}, but TensorRT supports "
            f"{ctx.op} only for {allowed}; {fix}.",
        ))
    return found


def _type_name(elem_type: int | None) -> str | None:
    if not elem_type:
        return None
    return _TYPE_NAMES.get(elem_type, TensorProto.DataType.Name(elem_type))


def check_node(ctx: NodeContext, facts: OperatorFacts) -> list[Finding]:
    """Is the op importable at all; if so, its types and mechanically checkable restrictions."""
    node, version = ctx.node, facts.tensorrt_version
    if node.domain not in DEFAULT_DOMAINS:
        return [custom_op_finding(ctx)]
    op = facts.operators.get(node.op_type)
    if op is None:
        return [ctx.finding(ERROR, UNKNOWN_OP,
                            f"node '{ctx.label}' uses {node.op_type}, which TensorRT {version}'s ONNX parser does "
                            "not know; decompose it into supported ops or provide a TensorRT plugin of that name.")]
    if not op.supported:
        return [ctx.finding(ERROR, UNSUPPORTED_OP,
                            f"node '{ctx.label}' uses {node.op_type}, which TensorRT {version}'s ONNX parser does "
                            "not support; decompose it into supported ops or provide a TensorRT plugin of that name.")]
    rule = RULES.get(node.op_type)
    return _check_types(ctx, op) + (rule(ctx) if rule else [])

