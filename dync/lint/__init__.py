"""TensorRT compatibility lint: which nodes of a package TensorRT's ONNX parser will refuse, before a GPU is near.

Building a TensorRT engine needs the GPU and the TensorRT libraries; finding out there that a stage uses an op
the parser lacks is slow and late. This package checks every stage of a package against the parser's operator
support matrix (`dync/data/tensorrt_onnx_operators.json`, transcribed from onnx-tensorrt's
`docs/operators.md`) on any machine:

- the op is one the parser knows and supports. Custom-domain ops need a plugin; for dync's own plugin ops
  (`dync::GatherPatches`, `dync::ScatterAddPatches`, `dync::PerSampleConv2d`, ...) the plugin-op registry says
  whether dync ships a TensorRT plugin: if so the node gets a note naming it, if not its portable
  decomposition, which TensorRT would run instead, is linted in its place;
- the op's data tensor has an element type the parser supports for that op;
- the model's default-domain opset is within the parser's range;
- the op's restrictions, where they can be read off attributes and constant inputs (small rule functions in
  `RULES`, each quoting the restriction it checks); any other restriction text is surfaced once per op as a
  note to check by hand.

Each stage is checked in the form `dync build` hands TensorRT (`dync.build.forms`): at the build's precision
(fp16 converted from the float32 stages, with heavy layers that stay float32 noted; int8/fp8 the Q/DQ form
`dync quantize` wrote) and, when a TensorRT version is named, with its plugin mode (before 10.9 every
`dync::` node decomposed, one note per stage), its documented opsets, and an error for a version dync does not
build for. The operator matrix stays TensorRT 10.0's; the report says which version, precision and plugin mode
were linted.

Modules: `facts` (the support matrix), `report` (findings, codes, severities, the report and its table),
`rules` (what a rule sees, and the rules), `custom_ops` (custom-domain nodes and the plugin registry), `checks`
(one node), `target` (the version, precision and plugin mode linted for), `forms` (the stage as the build
hands it over, and notes on that form), `versions` (findings per TensorRT version), `scan` (models and
packages).
"""

from dync.lint.facts import OperatorFacts, OpFacts, load_operator_facts
from dync.lint.report import (
    CHECK_BY_HAND,
    CUSTOM_OP,
    DYNC_PLUGIN,
    ERROR,
    FP32_LAYERS,
    NOTE,
    OPSET,
    PLUGIN_CODES,
    PLUGINS_DECOMPOSED,
    RESTRICTION,
    SEVERITIES,
    TENSORRT_VERSION,
    TYPE,
    UNKNOWN_OP,
    UNSUPPORTED_OP,
    Finding,
    LintReport,
    format_lint,
)
from dync.lint.rules import RULES, NodeContext
from dync.lint.scan import TARGETS, lint_model, lint_package
from dync.lint.target import LintTarget, lint_target

__all__ = [
    "CHECK_BY_HAND",
    "CUSTOM_OP",
    "DYNC_PLUGIN",
    "ERROR",
    "FP32_LAYERS",
    "NOTE",
    "OPSET",
    "PLUGINS_DECOMPOSED",
    "PLUGIN_CODES",
    "RESTRICTION",
    "RULES",
    "SEVERITIES",
    "TARGETS",
    "TENSORRT_VERSION",
    "TYPE",
    "UNKNOWN_OP",
    "UNSUPPORTED_OP",
    "Finding",
    "LintReport",
    "LintTarget",
    "NodeContext",
    "OpFacts",
    "OperatorFacts",
    "format_lint",
    "lint_model",
    "lint_package",
    "lint_target",
    "load_operator_facts",
]
