"""Lint findings and the report of one package: severities, finding codes, JSON and a readable table.

Severities: "error" means the parser (or engine build) will fail as the graph stands; "note" means a human has
to confirm something the lint cannot decide, or should know how a node will run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ERROR, NOTE = "error", "note"
SEVERITIES = (ERROR, NOTE)

# Finding codes: what kind of problem a finding reports (stable, for JSON consumers and tests).
UNSUPPORTED_OP = "unsupported-op"  # listed in the matrix with supported: false
UNKNOWN_OP = "unknown-op"  # a default-domain op the matrix does not list
CUSTOM_OP = "custom-op"  # an op outside the default domain that dync ships no TensorRT plugin for
PLUGIN_CODES = (UNSUPPORTED_OP, UNKNOWN_OP, CUSTOM_OP)
DYNC_PLUGIN = "dync-plugin"  # a dync:: op that runs through dync's own TensorRT plugin (a note)
TYPE = "type"
OPSET = "opset"
RESTRICTION = "restriction"  # a restriction checked by a rule (error or note)
CHECK_BY_HAND = "check-by-hand"  # restriction text no rule checks
TENSORRT_VERSION = "tensorrt-version"  # a TensorRT older than dync builds for (an error)
PLUGINS_DECOMPOSED = "plugins-decomposed"  # a stage's dync plugin ops run as their decompositions (a note)
FP32_LAYERS = "fp32-layers"  # heavy layers an fp16 build still runs in fp32 (a note)


@dataclass(frozen=True)
class Finding:
    """One problem: where (stage, node, op), how bad (severity), what (code) and what to do (message)."""

    stage: str
    node: str
    op: str
    severity: str
    message: str
    code: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class LintReport:
    """All findings of one package against one target: the TensorRT version linted for (the facts' own when
    none was named), the build precision (None: the stages as held) and plugin mode, and the version whose
    operator matrix the ops were checked against."""

    package: str
    target: str
    tensorrt_version: str
    opset_range: tuple[int, int]
    findings: list[Finding] = field(default_factory=list)
    precision: str | None = None
    plugins: str = "aot"
    facts_version: str = ""

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    @property
    def plugin_ops(self) -> list[str]:
        """Ops the parser cannot import and dync ships no TensorRT plugin for, so they need one (or a
        decomposition into supported ops)."""
        return sorted({f.op for f in self.findings if f.code in PLUGIN_CODES})

    @property
    def ok(self) -> bool:
        return self.counts[ERROR] == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "target": self.target,
            "tensorrt_version": self.tensorrt_version,
            "precision": self.precision,
            "plugins": self.plugins,
            "facts_version": self.facts_version or self.tensorrt_version,
            "opset_range": list(self.opset_range),
            "ok": self.ok,
            "counts": self.counts,
            "plugin_ops": self.plugin_ops,
            "findings": [f.to_json() for f in _ordered(self.findings)],
        }


def _ordered(findings: list[Finding]) -> list[Finding]:
    """Plugin needs first (they decide whether TensorRT is possible at all), then other errors, then notes."""

    def rank(f: Finding) -> int:
        return 0 if f.code in PLUGIN_CODES else 1 if f.severity == ERROR else 2

    return sorted(findings, key=rank)


def subject(stage: str) -> str:
    """How a message names the model it is about: its stage, or "the model" when a lone model is linted."""
    return f"stage '{stage}'" if stage else "the model"


def _linted(report: LintReport) -> str:
    """What the header says was linted: precision, plugin mode, opsets, and the matrix when it is another
    version's."""
    lo, hi = report.opset_range
    parts = [report.precision or "stages as held", f"plugins {report.plugins}", f"opsets {lo}-{hi}"]
    if report.facts_version and report.facts_version != report.tensorrt_version:
        parts.append(f"operator matrix of TensorRT {report.facts_version}")
    return ", ".join(parts)


def format_lint(report: LintReport) -> str:
    """A readable summary line, the plugin list, and a Markdown table of findings."""
    counts = report.counts
    lines = [
        f"TensorRT {report.tensorrt_version} ONNX parser lint of {report.package} ({_linted(report)}): "
        f"{counts[ERROR]} error(s), {counts[NOTE]} note(s)",
        f"ops needing a plugin: {', '.join(report.plugin_ops) or 'none'}",
    ]
    if not report.findings:
        return "\n".join([*lines, "", "no findings: every node is supported as exported"])
    lines += ["", "| severity | stage | node | op | message |", "| --- | --- | --- | --- | --- |"]
    for f in _ordered(report.findings):
        cells = [f.severity, f.stage or "-", f.node or "-", f.op or "-", f.message]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
