"""Linting whole models and packages: walk every node (subgraphs too), check the opset, gather the notes.

A model is scanned as TensorRT would see it: in the form `dync build` hands TensorRT for the lint's target
(`dync.lint.forms`: `dync::` ops kept as plugins or replaced by their portable decomposition, fp16 converted),
then shape inference types the intermediate tensors the checks look at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx.checker import ValidationError
from onnx.shape_inference import InferenceError

from dync.errors import LintError, PackageError
from dync.graph import DEFAULT_DOMAINS
from dync.lint.checks import check_node
from dync.lint.facts import OperatorFacts, load_operator_facts
from dync.lint.forms import fp32_layers_note, plugins_decomposed_note, tensorrt_form
from dync.lint.report import CHECK_BY_HAND, ERROR, NOTE, OPSET, Finding, LintReport, subject
from dync.lint.rules import RULES, NodeContext, _Scope
from dync.lint.target import LintTarget, lint_target
from dync.lint.versions import check_opset_for, opset_range, unsupported_version
from dync.package import StageSpec, at_precision, default_precision, load_manifest

TARGETS = ("trt",)


def _walk(graph: onnx.GraphProto, scope: _Scope, stage: str, prefix: str = "") -> Iterator[NodeContext]:
    """Every node, including those in If/Loop/Scan bodies (TensorRT parses those too), with its scope."""
    for index, node in enumerate(graph.node):
        label = prefix + (node.name or f"{node.op_type}#{index}")
        yield NodeContext(node, stage, label, scope)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _walk(sub, scope.child(sub), stage, f"{label}/{attr.name}/")


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference for element types of intermediate tensors; a model it cannot handle is linted as is
    (unknown types are skipped, not guessed)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (InferenceError, EncodeError):  # types that conflict, a domain with no opset import; a model over 2 GiB
        return model


def _check_opset(model: onnx.ModelProto, facts: OperatorFacts, target: LintTarget, stage: str) -> list[Finding]:
    """Against the named TensorRT's documented opsets (`dync.lint.versions`), else against the facts' range."""
    if target.tensorrt is not None:
        return check_opset_for(model, target.tensorrt, stage)
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return [
        Finding(stage, "", "", ERROR,
                f"{subject(stage)} uses ONNX opset {v}, outside TensorRT {facts.tensorrt_version}'s supported "
                f"{facts.opset_min}-{facts.opset_max}; re-export with an opset in that range.", OPSET)
        for v in versions
        if not facts.opset_min <= v <= facts.opset_max
    ]


def _scan(model: onnx.ModelProto, facts: OperatorFacts, stage: str, target: LintTarget
          ) -> tuple[list[Finding], list[NodeContext]]:
    """Errors and rule findings of one model in its TensorRT form, plus that form's default-domain nodes (for the
    once-per-op and once-per-stage notes)."""
    form = _infer(tensorrt_form(model, target, stage))
    findings = _check_opset(form, facts, target, stage) + plugins_decomposed_note(model, target, stage)
    scope = _Scope()
    scope.add_graph(form.graph)
    nodes = []
    for ctx in _walk(form.graph, scope, stage):
        findings += check_node(ctx, facts)
        if ctx.node.domain in DEFAULT_DOMAINS:
            nodes.append(ctx)
    return findings, nodes


def _restriction_notes(nodes: list[NodeContext], facts: OperatorFacts) -> list[Finding]:
    """Restriction text no rule checks, once per op, at its first node, with how many nodes it concerns."""
    by_op: dict[str, list[NodeContext]] = {}
    for ctx in nodes:
        op = facts.operators.get(ctx.op)
        if op is not None and op.supported and op.restrictions and ctx.op not in RULES:
            by_op.setdefault(ctx.op, []).append(ctx)
    notes = []
    for name, ctxs in by_op.items():
        first, others = ctxs[0], len(ctxs) - 1
        where = f"node '{first.label}'" + (f" and {others} other {name} node(s)" if others else "")
        notes.append(first.finding(
            NOTE, CHECK_BY_HAND,
            f"{where} ({name}): TensorRT restricts {name} (\"{facts.operators[name].restrictions}\"), which the "
            "lint cannot check; confirm it by hand before building an engine.",
        ))
    return notes


def _notes(nodes: list[NodeContext], facts: OperatorFacts, target: LintTarget) -> list[Finding]:
    """The notes gathered over all nodes: unchecked restrictions once per op, fp32 layers once per stage."""
    return _restriction_notes(nodes, facts) + fp32_layers_note(nodes, target)


def lint_model(model: onnx.ModelProto, facts: OperatorFacts | None = None, stage: str = "", *,
               tensorrt_version: str | None = None, precision: str | None = None,
               plugins: str | None = None) -> list[Finding]:
    """Every finding for one ONNX model (errors, rule findings, and notes), in the form `dync build` hands
    TensorRT `tensorrt_version` at `precision` with `plugins` (see `lint_package`)."""
    facts = facts or load_operator_facts()
    target = lint_target(tensorrt_version, precision, plugins)
    if not target.supported:
        return unsupported_version(target)
    findings, nodes = _scan(model, facts, stage, target)
    return findings + _notes(nodes, facts, target)


def lint_package(package_dir: str | Path, target: str = "trt", facts: OperatorFacts | None = None,
                 precision: str | None = None, tensorrt_version: str | None = None,
                 plugins: str | None = None) -> LintReport:
    """Lint every stage of a package for `target` (only "trt", TensorRT's ONNX parser, for now), in the
    graphs `dync build` would hand TensorRT: at `precision` (None: what the package holds; fp16 is converted
    from the float32 stages, int8 and fp8 are the TensorRT form `dync quantize` writes), for TensorRT
    `tensorrt_version` ("10.3", "10.9.0.34"; None: the facts' version, with dync ops that have a TensorRT
    plugin kept as such) with `plugins` (aot or decomposed; None: what the build picks for that version).
    A TensorRT older than dync builds for is one error, and no stage is linted."""
    if target not in TARGETS:
        raise LintError(f"unknown lint target '{target}'; use one of: {', '.join(TARGETS)}.")
    package_dir = Path(package_dir)
    stored = load_manifest(package_dir)
    build = lint_target(tensorrt_version, precision or default_precision(stored), plugins)
    facts = facts or load_operator_facts()
    findings: list[Finding] = unsupported_version(build)
    nodes: list[NodeContext] = []
    if build.supported:
        for stage in at_precision(stored, build.precision, form="trt").stages:
            stage_findings, stage_nodes = _scan(_load_stage(package_dir, stage), facts, stage.name, build)
            findings += stage_findings
            nodes += stage_nodes
    return _report(package_dir, target, facts, build, findings + _notes(nodes, facts, build))


def _report(package_dir: Path, target: str, facts: OperatorFacts, build: LintTarget,
            findings: list[Finding]) -> LintReport:
    version = build.tensorrt
    named = version is not None and build.supported
    return LintReport(
        package=str(package_dir),
        target=target,
        tensorrt_version=facts.tensorrt_version if version is None else str(version),
        opset_range=opset_range(version) if named else (facts.opset_min, facts.opset_max),
        findings=findings,
        precision=build.precision,
        plugins=build.plugins,
        facts_version=facts.tensorrt_version,
    )


def _load_stage(package_dir: Path, stage: StageSpec) -> onnx.ModelProto:
    """The stage's model; a file onnx cannot read, or one holding no graph, is a PackageError naming it."""
    path = package_dir / stage.onnx
    where = f"{path} (stage '{stage.name}')"
    try:
        model = onnx.load(path)
    except DecodeError as exc:  # truncated or not ONNX at all
        raise PackageError(f"{where} is not a readable ONNX model ({exc}); re-export the package.") from exc
    except OSError as exc:  # unreadable, or a directory
        raise PackageError(f"{where} cannot be read ({exc}); check its permissions or re-export the package.") from exc
    except (ValidationError, ValueError) as exc:  # its external data file is missing, or shorter than declared
        raise PackageError(f"{where} has unreadable external data ({exc}); re-export the package.") from exc
    if not model.HasField("graph"):  # an empty file parses as an empty ModelProto
        raise PackageError(f"{where} holds no ONNX graph; re-export the package.")
    return model
