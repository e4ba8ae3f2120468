"""Custom-domain nodes: dync's own plugin ops, looked up in the plugin-op registry, and everyone else's.

TensorRT's parser imports a custom-domain node only through a plugin registered under the node's op name. For a
`dync::` op the registry says whether dync ships that plugin (the op's TensorRT face). With one, the node is
fine and gets a note naming the plugin. Without one (or when the build decomposes every plugin op, for a
TensorRT older than 10.9), TensorRT runs the op's portable decomposition, so `dync.lint.forms` splices that in
before the scan and the lint checks what TensorRT will actually see.
Any other custom op, including a `dync::` name the registry does not know, is an error: nothing provides its
plugin.
"""

from __future__ import annotations

import onnx

from dync.errors import PluginError
from dync.lint.report import CUSTOM_OP, DYNC_PLUGIN, ERROR, NOTE, Finding
from dync.lint.rules import NodeContext
from dync.plugins.op_registry import DOMAIN, OpRecord, registry


def custom_op_finding(ctx: NodeContext) -> Finding:
    """A note for a `dync::` op that runs through dync's TensorRT plugin; an error for any other custom op and
    for a `dync::` node that asks for another version or namespace of the plugin than dync registers."""
    record = _tensorrt_plugin_op(ctx.node)
    if record is None:
        return _missing_plugin_error(ctx)
    asked = (ctx.attr("plugin_version", "1"), ctx.attr("plugin_namespace", ""))  # the parser's defaults
    if asked != (record.version, record.namespace):
        return _plugin_mismatch_error(ctx, record, asked)
    return _dync_plugin_note(ctx, record)


def _plugin_mismatch_error(ctx: NodeContext, record: OpRecord, asked: tuple[str, str]) -> Finding:
    """TensorRT finds a plugin by (op, version, namespace): a node asking for another one finds none."""
    return Finding(
        ctx.stage, ctx.label, f"{DOMAIN}::{record.name}", ERROR,
        f"node '{ctx.label}' asks TensorRT for plugin {record.name} version {asked[0]!r} in namespace "
        f"{asked[1]!r}, but dync registers version {record.version!r} in namespace {record.namespace!r}; "
        "re-export the package with this dync.",
        CUSTOM_OP,
    )


def _tensorrt_plugin_op(node: onnx.NodeProto) -> OpRecord | None:
    """The registry's record of a `dync::` node's op when dync ships a TensorRT plugin for it, else None."""
    if node.domain != DOMAIN:
        return None
    try:
        record = registry().get(node.op_type)
    except PluginError:  # a dync:: name dync does not know: nothing provides its plugin
        return None
    return record if record.tensorrt is not None else None


def _dync_plugin_note(ctx: NodeContext, record: OpRecord) -> Finding:
    return Finding(
        ctx.stage, ctx.label, f"{DOMAIN}::{record.name}", NOTE,
        f"node '{ctx.label}' is dync::{record.name}, which TensorRT >= 10.9 runs through dync's tensorrt.plugin "
        f"plugin '{record.plugin_id}' (version {record.version}, namespace '{record.namespace}'), while older "
        "TensorRT such as JetPack 6's 10.3 needs the op's portable decomposition; register dync's TensorRT plugins "
        "before building the engine, or export with --ops portable for older TensorRT.",
        DYNC_PLUGIN,
    )


def _missing_plugin_error(ctx: NodeContext) -> Finding:
    """A custom-domain node is imported only through a plugin found by op name, version and namespace."""
    node = ctx.node
    version = ctx.attr("plugin_version", "1")
    namespace = ctx.attr("plugin_namespace", node.domain)
    return Finding(
        ctx.stage, ctx.label, f"{node.domain}::{node.op_type}", ERROR,
        f"node '{ctx.label}' is the custom op {node.domain}::{node.op_type}, which TensorRT imports only through "
        f"a plugin registered as '{node.op_type}' (version {version}, namespace '{namespace}'); load that plugin "
        "when building the engine or export the op's portable decomposition instead.",
        CUSTOM_OP,
    )
