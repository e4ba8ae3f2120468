"""The typed records a package's manifest holds, and their one JSON serialization.

Every record is a frozen dataclass. `to_json` writes it as plain JSON values; `from_json` reads it back and
checks every field against its annotation, so a corrupt or hand-edited manifest fails on load with the field
that is wrong, not later inside a stage or a command.

Pass records (`PASS_RECORDS`) are what an exporter pass did with each candidate it found; the manifest keeps
them under the pass's name, and `dync inspect` prints them through `summary` and `detail`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

R = TypeVar("R")


class RecordError(ValueError):
    """A JSON value does not match a record's field; the message is the path to the field and what is wrong."""


# --------------------------------------------------------------------------------------------- serialization


def to_json(record: Any) -> Any:
    """A record (or list, dict, tuple of them) as JSON-ready values: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_json(v) for v in record]
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    return record


def from_json(cls: type[R], raw: Any, where: str = "") -> R:
    """Build `cls` from `raw`, checking each field against its annotation; RecordError names the field."""
    return _convert(cls, raw, where or cls.__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(kind: Any, value: Any, where: str) -> Any:
    if kind is Any:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _union(args, value, where)
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, where)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list):
            raise RecordError(f"{where} must be a list, not {_name(value)}")
        items = [_convert(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise RecordError(f"{where} must be an object, not {_name(value)}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return _scalar(kind, value, where)


def _union(args: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    problems = []
    for option in (a for a in args if a is not type(None)):
        try:
            return _convert(option, value, where)
        except RecordError as why:
            problems.append(str(why))
    raise RecordError(" or ".join(problems) if problems else f"{where} must be null")


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object, not {_name(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise RecordError(f"{where} has unknown fields {unknown}")
    missing = [name for name, f in fields.items() if name not in value and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(f"{where} lacks the fields {missing}")
    hints = _hints(cls)
    return cls(**{name: _convert(hints[name], v, f"{where}.{name}") for name, v in value.items()})


def _scalar(kind: type, value: Any, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise RecordError(f"{where} must be an integer, not a boolean")
    if not isinstance(value, kind):
        raise RecordError(f"{where} must be {kind.__name__}, not {_name(value)}")
    return value


def _name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------- package records


@dataclass(frozen=True)
class Provenance:
    """Where a package came from: the model file, the example it was captured with (every input's shape in
    `example_inputs` when they came from `--example`) and the versions that wrote it."""

    source: str | None
    source_sha256: str | None
    example_input_shape: list[int]
    dync: str
    torch: str
    onnx: str
    onnxruntime: str
    opset: int
    created: str
    example_inputs: dict[str, list[int]] | None = None


@dataclass(frozen=True)
class CustomOpRecord:
    """A `dync::` op the stages use: its TensorRT plugin and what runs it where the plugin is missing."""

    op: str
    plugin: str
    plugin_version: str
    fallback: str


@dataclass(frozen=True)
class VerificationRecord:
    """Worst errors against eager PyTorch per exit path and for the mixed (compacted) run, over the batch
    sizes checked (`batches`; `batch` is the last of them); `files` is the SHA-256 of every program file that
    was verified, which binds the record to those files."""

    max_abs_error: list[float]
    max_rel_error: list[float]
    mixed_max_abs_error: float
    mixed_exit_counts: list[int]
    batch: int
    rtol: float
    atol: float
    passed: bool
    checked: str
    batches: list[int] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    dense_attention: bool = False
    """The package has block-sparse attention and was checked with every mask listing every block, in float:
    its plumbing is exact against eager; what the masks change is measured apart (see docs)."""


@dataclass(frozen=True)
class BatchFixRecord:
    """How a forward that fixes the batch size (at `site`, the model line) was made to take any batch.

    `method` "bytecode": traced again by TorchDynamo, which keeps the model's batch arithmetic (`int()` of a
    float) symbolic, so the graph computes it as the model wrote it. "two captures": captured statically at the
    batch sizes `captures`, and the graph constants that hold the batch (`constants`) computed from the input's
    batch at run time (`dync.exporter.symbolic_batch`).
    """

    site: str
    method: str
    captures: list[int]
    constants: list[str]

    def summary(self) -> str:
        """What `inspect` prints: what was done and what it costs."""
        if self.method == "bytecode":
            how = ("traced again with TorchDynamo, which keeps that arithmetic symbolic (cost: one more capture "
                   "at export; at run time the graph computes the batch as the model does, a few scalar ops)")
        else:
            how = (f"captured at batches {' and '.join(map(str, self.captures))}, {len(self.constants)} shape "
                   f"constant(s) computed from the input's batch (cost: two more captures at export, "
                   f"{2 * len(self.constants) + 2} scalar shape ops per run)")
        return f"the forward fixes the batch at {self.site}; {how}"


@dataclass(frozen=True)
class CalibrationRecord:
    """How the stored thresholds were chosen, and what they are expected to cost and score."""

    metric: str
    budget: float
    budget_ms: float | None
    batch_size: int | None
    q: float | None
    expected_cost: float
    expected_accuracy: float | None
    exit_counts: list[int]
    samples: int
    min_cost: float
    created: str
    family: str = "geometric"
    """Which search found the setting: geometric (with its q), uniform or direct (dync.calib.search), or
    "kept": the float32 thresholds, kept for a quantized package."""


@dataclass(frozen=True)
class QuantizedStageRecord:
    """One stage of a quantized package: its graph in each form, the ranges both came from, what calibrated
    them, and what was kept in float.

    `cpu` is None where the measured int8 stage was no faster than float32 (the float32 stage runs). The
    ranges were calibrated on `calibration_samples` samples: those that reach the stage (`reaching_samples`
    under the package's thresholds, through the quantized stages before it), or all of them where fewer than
    the minimum reach it (`all_samples`). `quantized_nodes` counts the stage's nodes that read a dequantized
    tensor in the CPU int8 form (in the Q/DQ form for fp8, which the CPU emulates). `float_heads` are the exit
    head's nodes, kept in float. `reverted_ops` are the op types left in float because their int8 form
    measured slower here; `speedup` is the float32 stage's time over the CPU form's at batch `measured_batch`
    (None where not measured)."""

    stage: str
    cpu: str | None
    trt: str
    ranges: str
    calibration_samples: int
    reaching_samples: int
    all_samples: bool
    quantized_nodes: int
    float_heads: list[str]
    reverted_ops: list[str]
    speedup: float | None = None
    measured_batch: int | None = None
    inaccurate_ops: list[str] = field(default_factory=list)
    """Op types left in float because quantizing them at least doubled the stage's output error
    (`dync.calib.quantize.selection`)."""
    float_decisions: list[str] = field(default_factory=list)
    """The layers a decision is made on (a spatial masker, a token scorer: `dync.layers.DECISION_OPS`),
    kept in float: rounding them flips discrete decisions."""
    branch_ranges: dict[str, str] = field(default_factory=dict)
    """The ranges of each `If` branch (a spatial block's dense and gather-scatter forms), calibrated and
    quantized as models of their own, by `node/attribute`."""


@dataclass(frozen=True)
class RecalibrationRecord:
    """What quantizing did to the exits on the validation data: the float32 package with its thresholds, the
    quantized one with those thresholds, and with the thresholds chosen again for the same budget.
    `changed_*` count samples whose exit differs from float32's; accuracies are agreement with the labels, or
    without labels with the float32 package's last exit."""

    samples: int
    labels: bool
    cost_fp32: float
    accuracy_fp32: float
    cost_same_thresholds: float
    accuracy_same_thresholds: float
    changed_same_thresholds: int
    cost_recalibrated: float | None = None
    accuracy_recalibrated: float | None = None
    changed_recalibrated: int | None = None


@dataclass(frozen=True)
class QuantizationRecord:
    """How `dync quantize` made the package's int8 or fp8 stages (`format`): the onnxruntime calibration
    `method`, the minimum reaching samples per stage, whether exit heads were quantized, one record per stage,
    and the thresholds for this precision (None when the package has none), chosen for the package's
    calibration budget (`calibration`), with what that changed (`recalibration`)."""

    format: str
    method: str
    min_samples: int
    heads: bool
    stages: list[QuantizedStageRecord]
    created: str
    thresholds: list[float] | None = None
    calibration: CalibrationRecord | None = None
    recalibration: RecalibrationRecord | None = None


# --------------------------------------------------------------------------------------------- pass records


class PassRecord:
    """What a pass did with one candidate. Subclasses are frozen dataclasses with a `node` field, a boolean
    field named by `APPLIED` and a `reason`, and say, for `dync inspect`, what the pass does (`SUMMARY`,
    formatted with the applied and total counts) and what is worth a line per record (`detail`)."""

    SUMMARY: ClassVar[str] = "{applied} of {total} applied"
    APPLIED: ClassVar[str]
    """The name of the boolean field that says whether the pass rewrote this candidate."""
    node: str

    @property
    def applied(self) -> bool:
        return bool(getattr(self, self.APPLIED))

    def undone(self, reason: str) -> PassRecord:
        """This record for a rewrite that export's check took back: not applied, and why."""
        return dataclasses.replace(self, **{self.APPLIED: False, "reason": reason})

    def detail(self) -> str | None:
        return None

    @classmethod
    def summary(cls, records: Sequence[PassRecord]) -> list[str]:
        """The lines `dync inspect` prints for this pass's records (nothing when the pass found nothing)."""
        if not records:
            return []
        head = cls.SUMMARY.format(applied=sum(r.applied for r in records), total=len(records))
        return [head, *(f"  {r.node}: {line}" for r in records if (line := r.detail()) is not None)]


@dataclass(frozen=True)
class SpatialRecord(PassRecord):
    """A masked bottleneck, named by its final Relu: lowered or why not, and the mask density above which the
    lowered block runs dense (portable form)."""

    SUMMARY: ClassVar[str] = "masked bottlenecks: {applied} of {total} lowered to gather-scatter"
    APPLIED: ClassVar[str] = "lowered"
    node: str
    lowered: bool
    reason: str
    crossover: float | None = None

    def detail(self) -> str | None:
        if not self.lowered:
            return f"dense, {self.reason}"
        if self.crossover is not None:
            return f"runs dense when the batch's mask density is above {self.crossover:.0%}"
        return None


@dataclass(frozen=True)
class TokenRecord(PassRecord):
    """A gated token MLP (DyT-style dispatch), named by its residual Add: lowered or why not."""

    SUMMARY: ClassVar[str] = "token dispatches: {applied} of {total} run their MLP on the kept tokens only"
    APPLIED: ClassVar[str] = "lowered"
    node: str
    lowered: bool
    reason: str
    mlp_nodes: int = 0

    def detail(self) -> str | None:
        return None if self.lowered else f"dense, {self.reason}"


@dataclass(frozen=True)
class AttentionShape:
    """What an attention's speed depends on, per sample: Q [heads, queries, head_dim], K [heads, keys, head_dim],
    V [heads, keys, value_dim], the bias's shape (None without one), and whether Q, K and V are head views
    of [tokens, heads * dim] tensors, so that the fused node takes them in its 3-D form."""

    heads: int
    queries: int
    keys: int
    head_dim: int
    value_dim: int
    bias: tuple[int, ...] | None
    merged_heads: bool = False


@dataclass(frozen=True)
class AttentionRecord(PassRecord):
    """A softmax attention, named by its Softmax node: whether it runs as one ONNX `Attention` node, its shape,
    the measured time of the fused form over the unfused one (None where nothing was timed), and why a match
    was left unfused when that was not the measurement."""

    SUMMARY: ClassVar[str] = ("softmax attentions: {applied} of {total} fused into ONNX Attention "
                              "(where measured faster)")
    APPLIED: ClassVar[str] = "fused"
    node: str
    fused: bool
    shape: AttentionShape | None
    fused_over_unfused: float | None = None
    reason: str = ""

    def detail(self) -> str | None:
        if self.reason:
            timing = self.reason
        elif self.fused_over_unfused is None:
            timing = "shape not static, fused untimed"
        else:
            timing = f"fused form {self.fused_over_unfused:.2f}x the unfused time"
        return f"{'fused' if self.fused else 'unfused'}, {timing}"


@dataclass(frozen=True)
class SparseAttentionRecord(PassRecord):
    """A softmax attention, named by its Softmax node: whether it runs as BlockSparseAttention, under which
    mask rule, its queries and keys in blocks of `block_q` and `block_k`, the fraction of key blocks its mask
    kept on the export example (`density`, over samples, heads and query blocks), fp8 or not, and why an
    attention was left dense."""

    SUMMARY: ClassVar[str] = "sparse attention: {applied} of {total} softmax attentions block-sparse"
    APPLIED: ClassVar[str] = "sparse"
    node: str
    sparse: bool
    rule: str
    queries: int | None = None
    keys: int | None = None
    block_q: int | None = None
    block_k: int | None = None
    density: float | None = None
    fp8: str = "off"
    reason: str = ""
    attention: str = ""
    """The BlockSparseAttention node that replaced the chain: its mask approximates, so checks list every block."""

    def detail(self) -> str | None:
        if not self.sparse:
            return f"dense, {self.reason}"
        density = "" if self.density is None else f", density {self.density:.2f} on the example"
        return f"{self.rule}; {self.queries} queries x {self.keys} keys in blocks of {self.block_q}{density}"


def approximated_nodes(records: Sequence[PassRecord]) -> set[str]:
    """The BlockSparseAttention nodes whose masks `--sparse-attention` made up, among a pass's records."""
    return {r.attention for r in records if isinstance(r, SparseAttentionRecord) and r.sparse}


PASS_RECORDS: dict[str, type[PassRecord]] = {
    "spatial": SpatialRecord,
    "tokens": TokenRecord,
    "sparse_attention": SparseAttentionRecord,
    "attention": AttentionRecord,
}
"""Each exporter pass's name (its manifest key and `--no-pass` name) and the record type it writes."""
