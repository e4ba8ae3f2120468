"""The stage as `dync build` hands it to TensorRT, for the lint to check, and the notes on what that form changed.

The form is `dync.build.forms.stage_for_tensorrt`'s: `dync::` nodes kept as plugins or replaced by their portable
decomposition (the plugin mode), and at fp16 the stage converted with its decision layers kept float32. One
difference: a `dync::` op the plugin registry does not know has no decomposition, so the build refuses its
stage, while the lint reports it as a custom op without a plugin and checks the rest of the stage in its build
form. Such nodes are set aside under a placeholder domain while the stage is converted, then put back.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnx.shape_inference import InferenceError
from onnx_graphsurgeon.util.exception import OnnxGraphSurgeonException

from dync.build.forms import plugins_kept, stage_for_tensorrt
from dync.errors import LintError
from dync.layers import WEIGHTED_OPS
from dync.lint.report import FP32_LAYERS, NOTE, PLUGINS_DECOMPOSED, Finding, subject
from dync.lint.rules import NodeContext
from dync.lint.target import LintTarget
from dync.plugins.op_registry import DOMAIN, registry
from dync.plugins.splice import custom_nodes

_SET_ASIDE = "dync.lint.unregistered"
"""Where `dync::` nodes of ops the registry does not know wait while the stage is converted."""


def tensorrt_form(model: onnx.ModelProto, target: LintTarget, stage: str) -> onnx.ModelProto:
    """`model` as `dync build` would hand it to TensorRT for `target` (unknown `dync::` nodes left in place)."""
    unknown = [n for n in custom_nodes(model) if n.op_type not in registry().names()]
    if unknown:
        model = _set_aside(model)
    try:
        form = stage_for_tensorrt(model, plugins=target.plugins, precision=target.precision or "fp32")
    except OnnxGraphSurgeonException as exc:  # graphsurgeon re-exports only graphs whose inputs and outputs are typed
        raise LintError(
            f"{subject(stage)} cannot have its dync ops {', '.join(decomposed_ops(model, target.plugins))} replaced "
            f"by their portable decompositions ({exc}); give every graph input and output an element type."
        ) from exc
    except InferenceError as exc:  # the fp16 converter runs shape inference, and the build would fail there too
        raise LintError(f"{subject(stage)} cannot be converted to fp16 as dync build does ({exc}); fix the types "
                        "shape inference rejects, or lint it at --precision fp32.") from exc
    return _put_back(form, model) if unknown else form


def decomposed_ops(model: onnx.ModelProto, mode: str) -> list[str]:
    """The registered `dync::` ops of `model` that `mode` replaces by their portable decomposition."""
    known = {n.op_type for n in custom_nodes(model)} & set(registry().names())
    return sorted(known - plugins_kept(model, mode))


def _set_aside(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose unknown `dync::` nodes are in the placeholder domain."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = set(registry().names())
    for node in custom_nodes(copy):
        if node.op_type not in names:
            node.domain = _SET_ASIDE
    copy.opset_import.append(helper.make_opsetid(_SET_ASIDE, 1))
    return copy


def _put_back(form: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """`form` with the set-aside nodes in the `dync` domain again, and its opset import (splicing drops it when no
    registered `dync::` node is left)."""
    for node in form.graph.node:
        if node.domain == _SET_ASIDE:
            node.domain = DOMAIN
    imports = [o for o in form.opset_import if o.domain not in (_SET_ASIDE, DOMAIN)]
    imports += [o for o in original.opset_import if o.domain == DOMAIN] or [helper.make_opsetid(DOMAIN, 1)]
    del form.opset_import[:]
    form.opset_import.extend(imports)
    return form


def plugins_decomposed_note(model: onnx.ModelProto, target: LintTarget, stage: str) -> list[Finding]:
    """One note per stage whose dync plugin ops the build decomposes: a TensorRT older than 10.9 has no AOT
    plugins (onnx-tensorrt docs/Changelog.md, "TensorRT 10.9 GA Release": "Added support for Python AOT
    plugins"), or --plugins decomposed asked for it."""
    if target.plugins != "decomposed":
        return []
    ops = sorted(plugins_kept(model, "aot"))
    if not ops:
        return []
    names = ", ".join(f"{DOMAIN}::{op}" for op in ops)
    version = target.tensorrt
    if version is not None and not version.has_aot_plugins:
        why, fix = (f"TensorRT {version} has no tensorrt.plugin AOT plugins (10.9 or later)",
                    "build on TensorRT 10.9 or later to run dync's plugins instead")
    else:
        why, fix = "--plugins decomposed asks for that", "drop --plugins decomposed to run dync's plugins instead"
    return [Finding(
        stage, "", names, NOTE,
        f"{subject(stage)}: {names} run as their portable decompositions, linted here as standard ONNX, because "
        f"{why}; nothing to fix, or {fix}.",
        PLUGINS_DECOMPOSED,
    )]


def fp32_layers_note(nodes: list[NodeContext], target: LintTarget) -> list[Finding]:
    """At fp16, the heavy layers that still read float32 after the conversion (decision layers, kept float32 so
    that exits decide as in float32), once per stage at the first of them: a strongly typed network runs each
    layer in the type of its tensors ("every tensor in the network has a data type defined in the network
    following only type inference rules and the inputs/operator annotations. Setting layer precision and layer
    output types is not allowed": TensorRT Python API, Builder, NetworkDefinitionCreationFlag.STRONGLY_TYPED)."""
    if target.precision != "fp16":
        return []
    by_stage: dict[str, list[NodeContext]] = {}
    for ctx in nodes:
        if ctx.op in WEIGHTED_OPS and ctx.node.input and ctx.scope.types.get(ctx.node.input[0]) == TensorProto.FLOAT:
            by_stage.setdefault(ctx.stage, []).append(ctx)
    notes = []
    for ctxs in by_stage.values():
        first, others = ctxs[0], len(ctxs) - 1
        where = f"node '{first.label}' ({first.op})" + (f" and {others} other heavy layer(s)" if others else "")
        notes.append(first.finding(
            NOTE, FP32_LAYERS,
            f"{where} of {subject(first.stage)} still read float32 after the fp16 conversion (decision layers, "
            "kept float32 so that exits decide as in float32), so the strongly typed engine runs them in fp32; "
            "nothing to fix unless they dominate the stage's time.",
        ))
    return notes
