"""Findings that depend on the TensorRT version a build targets: dync's oldest TensorRT, and the ONNX opsets each
version's parser reads.

The operator matrix stays TensorRT 10.0's (`dync/data/tensorrt_onnx_operators.json`); only what the documentation
states per version is checked here, each table with the page it was read from.
"""

from __future__ import annotations

import onnx

from dync.build.targets import TensorRTVersion
from dync.errors import InputError
from dync.graph import DEFAULT_DOMAINS
from dync.lint.report import ERROR, NOTE, OPSET, TENSORRT_VERSION, Finding, subject
from dync.lint.target import LintTarget

OPSET_MIN = 9
"""The oldest opset the parser reads: "Where possible, the parser is backward compatible to opset 9" (TensorRT
documentation, ONNX Opset Guide), and "opset 9 to opset N" in every 10.x operators.md."""

# Sources: (10, 0) onnx-tensorrt docs/operators.md, release 10.0 GA and 10.1 GA: "TensorRT 10.0 supports operators
# in the inclusive range of opset 9 to opset 20"; (10, 15) the same file for 10.15 GA: "... opset 9 to opset 24";
# (11, 5) TensorRT 11.5 release notes (github.com/NVIDIA/TensorRT/releases/tag/v11.5, Parsers): "Added support for
# ONNX opset 25".
DOCUMENTED_OPSET_MAX: dict[tuple[int, int], int] = {(10, 0): 20, (10, 15): 24, (11, 5): 25}
"""The newest opset the parser reads, for the releases whose documentation states it. A release between two of
them reads at least the earlier one's opsets and, since opset support only grows, no more than the later one's:
an opset in between is a note to confirm, one above the later one an error."""


def unsupported_version(target: LintTarget) -> list[Finding]:
    """One error when dync does not build for the TensorRT named (older than `MIN_TENSORRT`), with the build's
    own message: the stages are not linted then, since no engine would be built from them."""
    if target.supported or target.tensorrt is None:
        return []
    try:
        target.tensorrt.check_supported()
    except InputError as exc:
        return [Finding("", "", "", ERROR, str(exc), TENSORRT_VERSION)]
    return []


def opset_bounds(version: TensorRTVersion) -> tuple[tuple[int, int], int, tuple[int, int] | None, int | None]:
    """(the latest documented release up to `version`, its max opset, the next documented release after it or
    None, that one's max opset or None)."""
    at = max((v for v in DOCUMENTED_OPSET_MAX if v <= version.major_minor), default=min(DOCUMENTED_OPSET_MAX))
    after = min((v for v in DOCUMENTED_OPSET_MAX if v > version.major_minor), default=None)
    return at, DOCUMENTED_OPSET_MAX[at], after, None if after is None else DOCUMENTED_OPSET_MAX[after]


def check_opset_for(model: onnx.ModelProto, version: TensorRTVersion, stage: str) -> list[Finding]:
    """The model's default-domain opset against what `version`'s parser is documented to read."""
    at, known, after, bound = opset_bounds(version)
    documented = f"TensorRT {_text(at)} documents opsets up to {known}" + (
        f" and {_text(after)} up to {bound}" if after is not None else "")
    found = []
    for v in (o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS):
        if v < OPSET_MIN:
            found.append(Finding(stage, "", "", ERROR,
                                 f"{subject(stage)} uses ONNX opset {v}, older than the {OPSET_MIN} TensorRT's "
                                 f"parser reads; re-export with an opset from {OPSET_MIN} to {known}.", OPSET))
        elif bound is not None and v > bound:
            found.append(Finding(stage, "", "", ERROR,
                                 f"{subject(stage)} uses ONNX opset {v}, newer than TensorRT {version}'s parser "
                                 f"reads ({documented}); re-export with an opset of at most {known}.", OPSET))
        elif v > known:
            found.append(Finding(stage, "", "", NOTE,
                                 f"{subject(stage)} uses ONNX opset {v}, which TensorRT {version}'s parser may not "
                                 f"read ({documented}); re-export with an opset of at most {known}, or confirm it "
                                 "on the target.", OPSET))
    return found


def opset_range(version: TensorRTVersion) -> tuple[int, int]:
    """The opsets `version`'s parser is documented to read, for the report's header."""
    return OPSET_MIN, opset_bounds(version)[1]


def _text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))
