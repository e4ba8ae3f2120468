"""`dync quantize`: per-stage post-training quantization, each stage calibrated on the samples that reach it.

An early-exit package's later stages see only the samples its earlier exits did not take, and those are the
hard ones, whose activations range differently. So stages are quantized in program order: stage k's ranges
come from the validation samples that reach it under the package's thresholds, as the already-quantized
stages before it compute them (quantizing stage k-1 moves its confidences, and with them who reaches stage
k). Where fewer than `min_samples` reach a stage, all samples calibrate it, and the record says so.

The ranges (onnxruntime's calibrators, `ranges.py`) are stored in the package, and every form of the stage
is written from them by onnxruntime's quantizer (`forms.py`): the CPU form for onnxruntime's fast kernels,
with op types whose int8 form cost accuracy or measured slower left in float (`selection.py`), and the
TensorRT form. Plugin nodes, the exit heads (each exit's classifier layer) and the layers whose outputs are
decided on (a spatial masker, a token scorer) stay in float. Quantizing moves confidences, so the thresholds
are then chosen again for the package's budget (`dync.calib.calibrate`) and stored for this precision, and
what that changed is recorded (`RecalibrationRecord`).
"""

from __future__ import annotations

import datetime
import functools
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx

from dync.calib.budget import flops_cost, simulate_exits
from dync.calib.calibrate import BudgetRequest, calibrate_package, check_labels, exit_outputs
from dync.calib.quantize.forms import (
    CPU_OP_TYPES,
    cpu_int8,
    fp8_casts,
    fp8_qdq,
    quantized_node_count,
    trt_int8,
)
from dync.calib.quantize.ranges import METHODS, StageRanges, calibrate_ranges
from dync.calib.quantize.selection import (
    MEASURE_BATCH,
    CpuChoice,
    choose_cpu_form,
    onnxruntime_error,
    onnxruntime_timer,
)
from dync.errors import InputError, ProfileError, QuantizationError
from dync.inputs import Inputs, batch_of
from dync.layers import decision_layers, exit_head
from dync.package import Manifest, StageSpec, file_record, load_manifest, write_manifest
from dync.records import QuantizationRecord, QuantizedStageRecord, RecalibrationRecord
from dync.runtime.backends.ort import OrtSettings, StageSession
from dync.runtime.branches import prefix_made_names
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import resolve_thresholds

FORMATS = ("int8", "fp8")
QUANT_DIR = "quant"
MIN_SAMPLES = 64
"""Fewer samples than this give ranges that the next batch of real data exceeds."""
RUN_BATCH = 256
TRT_MIN_OPSET = 19
FP8_DTYPE = "float8_e4m3fn"

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class QuantizeRequest:
    """What `dync quantize` was asked: the format, onnxruntime's calibration method, the fewest reaching
    samples a stage is calibrated on alone, whether exit heads are quantized too, and whether op types are
    timed (off: every op type that keeps the stage's accuracy runs in int8; `selection.py`)."""

    format: str = "int8"
    method: str = "minmax"
    min_samples: int = MIN_SAMPLES
    heads: bool = False
    measure: bool = True

    def check(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"quantization format '{self.format}' is unknown; choose one of {', '.join(FORMATS)}.")
        if self.method not in METHODS:
            raise InputError(f"calibration method '{self.method}' is unknown; choose one of {', '.join(METHODS)}.")
        if self.min_samples < 1:
            raise InputError(f"--min-samples {self.min_samples} must be at least 1.")


def quantize_package(package: str | Path, data: Inputs, labels: np.ndarray | None = None,
                     request: QuantizeRequest | None = None, progress: Progress | None = None) -> QuantizationRecord:
    """Quantize every stage, store both forms and their ranges in the package, choose the thresholds again
    for this precision, and return the record written to the manifest."""
    request = request or QuantizeRequest()
    request.check()
    report = progress or (lambda message: None)
    engine = Engine.load(package, precision="fp32")
    feeds = engine.input_feeds(data)
    engine.check_feeds(feeds)
    samples = batch_of(feeds)
    if samples < request.min_samples:
        raise InputError(f"quantizing package '{engine.manifest.name}' needs at least {request.min_samples} "
                         f"calibration samples, got {samples}; give more validation data (or a lower "
                         f"--min-samples, at the cost of ranges that real data exceeds).")
    if labels is not None:
        check_labels(labels, samples, engine.manifest.exits[0].shape[-1] if engine.manifest.exits[0].shape
                     else int(labels.max()) + 1)
    _check_fp8_faces(engine.manifest, request.format)
    _check_opset(engine)
    directory = f"{QUANT_DIR}/{request.format}-{secrets.token_hex(4)}"
    (engine.package_dir / directory).mkdir(parents=True)
    try:
        stages = _quantize_stages(engine, feeds, request, directory, report)
        record = QuantizationRecord(format=request.format, method=request.method, min_samples=request.min_samples,
                                    heads=request.heads, stages=stages, created=_now(),
                                    thresholds=engine.manifest.thresholds)
        _commit(engine.package_dir, record, directory)
    except BaseException:
        shutil.rmtree(engine.package_dir / directory, ignore_errors=True)
        raise
    report("choosing the thresholds again for the quantized package")
    return _recalibrate(engine.package_dir, feeds, labels, request.format, report)


def _check_fp8_faces(manifest: Manifest, format: str) -> None:
    """fp8 needs every plugin op of the package to take fp8 (its kernels)."""
    if format != "fp8":
        return
    from dync.plugins.op_registry import registry

    for custom in manifest.custom_ops:
        op = registry().get(custom.op.split("::")[-1])
        if FP8_DTYPE not in op.dtypes:
            raise QuantizationError(
                f"package '{manifest.name}' uses the plugin op {custom.op}, which has no fp8 face (its kernels "
                f"take {', '.join(op.dtypes)}); quantize it with --format int8, or export it without the pass "
                "that made that op (dync export --no-pass NAME).")


def _check_opset(engine: Engine) -> None:
    opset = engine.manifest.provenance.opset
    if opset < TRT_MIN_OPSET:
        raise QuantizationError(f"package '{engine.manifest.name}' has ONNX opset {opset}, below the {TRT_MIN_OPSET} "
                                "that per-channel and fp8 Q/DQ need for TensorRT; re-export it with this dync.")


def _quantize_stages(engine: Engine, feeds: dict[str, np.ndarray], request: QuantizeRequest, directory: str,
                     report: Progress) -> list[QuantizedStageRecord]:
    """Stage by stage in program order; each quantized stage runs on every sample, so that the next stage's
    inputs (and who reaches it) are what the quantized package computes."""
    state = dict(feeds)
    reach = np.ones(batch_of(feeds), dtype=bool)
    thresholds = resolve_thresholds(engine.manifest.thresholds, engine.num_exits)
    records = []
    for k, stage in enumerate(engine.manifest.stages):
        model = onnx.load(engine.package_dir / stage.onnx)
        reaching = int(reach.sum())
        everyone = reaching < request.min_samples
        stage_feeds = {name: state[name] if everyone else state[name][reach] for name in stage.reads}
        who = (f"all {len(reach)} samples (only {reaching} reach it, fewer than {request.min_samples})" if everyone
               else f"the {reaching} samples that reach it")
        report(f"stage {stage.name}: calibrating {request.method} ranges on {who}")
        ranges = _quantizing(stage, functools.partial(calibrate_ranges, model, stage_feeds, request.method,
                                                      CPU_OP_TYPES, engine.package_dir / directory, stage.name))
        heads = [] if request.heads else exit_head(model, stage.exit.output)
        decisions = [name for name in decision_layers(model) if name not in heads]
        choice, trt = _forms(model, stage, ranges, request, [*heads, *decisions], stage_feeds, report)
        cpu_path = None if choice.model is None else f"{directory}/{stage.name}.cpu.onnx"
        trt_path = f"{directory}/{stage.name}.trt.onnx"
        if choice.model is not None:
            onnx.save(choice.model, engine.package_dir / cpu_path)
        onnx.save(trt, engine.package_dir / trt_path)
        records.append(QuantizedStageRecord(
            stage=stage.name, cpu=cpu_path, trt=trt_path, ranges=_relative(ranges.graph, engine.package_dir),
            branch_ranges={key: _relative(path, engine.package_dir) for key, path in ranges.branches.items()},
            calibration_samples=batch_of(stage_feeds),
            reaching_samples=reaching, all_samples=everyone,
            quantized_nodes=quantized_node_count(trt if request.format == "fp8" else choice.model or trt, model),
            float_heads=heads, float_decisions=decisions,
            reverted_ops=choice.reverted, inaccurate_ops=choice.inaccurate, speedup=choice.speedup,
            measured_batch=MEASURE_BATCH if choice.speedup is not None else None))
        outputs = _run_everyone(choice.model or model, stage, state)
        state.update((name, outputs[name]) for name in stage.writes)
        if k < engine.num_exits - 1:
            reach &= ~(engine.criteria.confidence(k, outputs[stage.exit.output]) >= thresholds[k])
    return records


def _forms(model: onnx.ModelProto, stage: StageSpec, ranges: StageRanges, request: QuantizeRequest, heads: list[str],
           feeds: dict[str, np.ndarray], report: Progress) -> tuple[CpuChoice, onnx.ModelProto]:
    """The CPU form (measured per op type for int8; the exact fp8 emulation for fp8) and the TensorRT form."""
    prefix = f"{stage.name}/"

    def quantize(op_types: Sequence[str]) -> onnx.ModelProto:
        return _own_names(_quantizing(stage, lambda: cpu_int8(model, ranges, request.method, heads, op_types)),
                          model, prefix)

    trt = _own_names(_quantizing(stage, lambda: trt_int8(model, ranges, request.method, heads)), model, prefix)
    if request.format == "fp8":
        trt = fp8_qdq(trt)
        return CpuChoice(fp8_casts(trt), [], None, []), trt
    timer = None
    if request.measure:
        report(f"stage {stage.name}: timing its int8 form per op type against float32 at batch {MEASURE_BATCH}")
        timer = onnxruntime_timer(feeds)
    return choose_cpu_form(model, quantize, CPU_OP_TYPES, onnxruntime_error(model, feeds), timer, heads), trt


def _relative(path: Path, package_dir: Path) -> str:
    return path.relative_to(package_dir).as_posix()


def _quantizing(stage: StageSpec, quantize: Callable[[], T]) -> T:
    """onnxruntime's calibrators and quantizer, their failures one QuantizationError naming the stage."""
    try:
        return quantize()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(
            f"onnxruntime's quantization tools cannot quantize stage '{stage.name}' ({stage.onnx}): {first}; "
            "leave that stage's op in float by exporting without the pass that made it, or report the op.") from exc


def _own_names(quantized: onnx.ModelProto, original: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """`quantized` with the names the quantizer made under the stage's prefix (`relu_1_scale` and
    `relu_1_QuantizeLinear` would be alike in the stage writing a tensor and the stage reading it, and the
    static full model merges stages by name)."""
    prefix_made_names(quantized.graph, original.graph, prefix)
    return quantized


def _run_everyone(model: onnx.ModelProto, stage: StageSpec, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stage on every sample, in batches."""
    session = StageSession(model, OrtSettings(), sees_request_batch=False, spinning=True)
    names = [stage.exit.output, *[w for w in stage.writes if w != stage.exit.output]]
    total = len(next(iter(state.values())))
    chunks = [session.run(names, {name: state[name][i : i + RUN_BATCH] for name in stage.reads})
              for i in range(0, total, RUN_BATCH)]
    return {name: np.concatenate([chunk[j] for chunk in chunks]) for j, name in enumerate(names)}


def _commit(package_dir: Path, record: QuantizationRecord, directory: str) -> None:
    """The manifest now names the new files (recorded, so that every load checks them); then the files of
    any earlier quantization go."""
    manifest = load_manifest(package_dir)
    files = {path: f for path, f in manifest.files.items() if not path.startswith(f"{QUANT_DIR}/")}
    for stage in record.stages:
        for path in filter(None, (stage.cpu, stage.trt, stage.ranges, *stage.branch_ranges.values())):
            files[path] = file_record(package_dir / path)
    manifest.files = files
    manifest.quantization = record
    write_manifest(package_dir, manifest)
    for old in (package_dir / QUANT_DIR).iterdir():
        if old.name != Path(directory).name:
            shutil.rmtree(old, ignore_errors=True)


def _recalibrate(package_dir: Path, feeds: dict[str, np.ndarray], labels: np.ndarray | None, format: str,
                 report: Progress) -> QuantizationRecord:
    """Thresholds for the quantized package at the budget its float32 thresholds were chosen for (the most
    accurate, and among those the one moving the fewest samples off their float32 exits), and how many
    samples exit elsewhere than in float32."""
    fp32 = Engine.load(package_dir, precision="fp32")
    quantized = Engine.load(package_dir, precision=format)
    reference = exit_outputs(fp32, feeds)
    outputs = exit_outputs(quantized, feeds)
    truth = reference[-1].argmax(axis=-1) if labels is None else labels
    cost_of = flops_cost([e.cumulative_macs for e in fp32.manifest.exits])
    thresholds = resolve_thresholds(fp32.manifest.thresholds, fp32.num_exits)
    fp32_exits = simulate_exits(fp32.criteria.confidences(reference), thresholds)
    confidences = quantized.criteria.confidences(outputs)
    same_exits = simulate_exits(confidences, thresholds)
    summary = RecalibrationRecord(
        samples=len(truth), labels=labels is not None,
        cost_fp32=cost_of(fp32_exits), accuracy_fp32=_accuracy(reference, fp32_exits, truth),
        cost_same_thresholds=cost_of(same_exits), accuracy_same_thresholds=_accuracy(outputs, same_exits, truth),
        changed_same_thresholds=int((same_exits != fp32_exits).sum()))
    calibration = fp32.manifest.calibration
    if calibration is not None:
        request = BudgetRequest(metric=calibration.metric, budget=calibration.budget,
                                batch_size=calibration.batch_size or BudgetRequest.batch_size)
        try:
            calibrate_package(quantized, feeds, request, labels=labels, anchor=thresholds, outputs=outputs)
        except ProfileError:
            report(f"no {format} latency profile (dync profile --precision {format}): the thresholds are chosen "
                   f"for {calibration.budget:.3g} x the full model's MACs instead")
            calibrate_package(quantized, feeds, replace(request, metric="flops"), labels=labels, anchor=thresholds,
                              outputs=outputs)
        new = resolve_thresholds(quantized.manifest.thresholds, quantized.num_exits)
        new_exits = simulate_exits(confidences, new)
        summary = replace(summary, cost_recalibrated=cost_of(new_exits),
                          accuracy_recalibrated=_accuracy(outputs, new_exits, truth),
                          changed_recalibrated=int((new_exits != fp32_exits).sum()))
    manifest = load_manifest(package_dir)
    manifest.quantization = replace(manifest.quantization, recalibration=summary)
    write_manifest(package_dir, manifest)
    return manifest.quantization


def _accuracy(outputs: list[np.ndarray], exits: np.ndarray, truth: np.ndarray) -> float:
    taken = np.stack([o.reshape(len(o), -1) for o in outputs])[exits, np.arange(len(exits))]
    return float((taken.argmax(axis=-1) == truth).mean())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def format_quantization(record: QuantizationRecord) -> str:
    """What `dync quantize` prints: per stage, what calibrated it and what runs in int8; then the exits."""
    lines = [f"{record.format} ({record.method} ranges; exit heads {'quantized' if record.heads else 'in float'})",
             "| stage | calibrated on | nodes quantized | kept in float | CPU form | float32 / CPU form |",
             "| --- | --- | --- | --- | --- | --- |"]
    for stage in record.stages:
        who = f"{stage.calibration_samples} (all: {stage.reaching_samples} reach it)" if stage.all_samples \
            else f"{stage.calibration_samples} reaching"
        decisions = [f"{len(stage.float_decisions)} decision nodes"] if stage.float_decisions else []
        inaccurate = [f"{op} (accuracy)" for op in stage.inaccurate_ops]
        kept = ", ".join([*(["head"] if stage.float_heads else []), *decisions, *inaccurate, *stage.reverted_ops]) \
            or "-"
        form = "float32 (int8 measured slower)" if stage.cpu is None else \
            ("fp8 emulated" if record.format == "fp8" else "int8")
        speed = "-" if stage.speedup is None else f"{stage.speedup:.2f}x at batch {stage.measured_batch}"
        lines.append(f"| {stage.stage} | {who} | {stage.quantized_nodes} | {kept} | {form} | {speed} |")
    summary = record.recalibration
    if summary is not None:
        basis = "accuracy" if summary.labels else "agreement with the float32 last exit"
        lines += ["", f"on {summary.samples} validation samples ({basis}; cost as a fraction of the full model):",
                  "| run | cost | accuracy | exits changed vs float32 |", "| --- | --- | --- | --- |",
                  f"| float32, its thresholds | {summary.cost_fp32:.3f} | {summary.accuracy_fp32:.2%} | - |",
                  f"| {record.format}, the same thresholds | {summary.cost_same_thresholds:.3f} | "
                  f"{summary.accuracy_same_thresholds:.2%} | {summary.changed_same_thresholds} |"]
        if summary.cost_recalibrated is not None:
            lines.append(f"| {record.format}, thresholds chosen again | {summary.cost_recalibrated:.3f} | "
                         f"{summary.accuracy_recalibrated:.2%} | {summary.changed_recalibrated} |")
    if record.thresholds is not None:
        lines.append(f"\n{record.format} thresholds {[round(t, 4) for t in record.thresholds]}")
    return "\n".join(lines)
