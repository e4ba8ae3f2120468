"""What `dync inspect` shows: the program's stages, its exits with their costs, the thresholds, and what the
exporter's passes did; as JSON (`describe`) or as text (`format_description`), both read off the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dync.build.cache import BuildRecord
from dync.package import Manifest
from dync.records import PASS_RECORDS, QuantizationRecord, to_json


def describe(manifest: Manifest, engines: Sequence[BuildRecord] = ()) -> dict[str, Any]:
    """A JSON-ready summary; `cumulative_flops` is multiply-accumulates per sample, the papers' convention;
    `engines`: the TensorRT engines built into the package (`dync.build.cache`)."""
    return {
        "name": manifest.name,
        "format_version": manifest.format_version,
        "inputs": to_json(manifest.inputs),
        "stages": [
            {
                "name": s.name,
                "onnx": s.onnx,
                "reads": s.reads,
                "writes": s.writes,
                "nodes": s.nodes,
                "ops": s.ops,
                "macs": s.exit.macs,
            }
            for s in manifest.stages
        ],
        "exits": [
            {
                "index": k,
                "stage": s.name,
                "output": s.exit.output,
                "criterion": s.exit.criterion,
                "criterion_onnx": s.exit.criterion_onnx,
                "macs": s.exit.macs,
                "cumulative_flops": s.exit.cumulative_macs,
                "fraction_of_full": _fraction_of_full(manifest, k),
                "threshold": s.exit.threshold,
            }
            for k, s in enumerate(manifest.stages)
        ],
        "thresholds": manifest.thresholds,
        "custom_ops": to_json(manifest.custom_ops),
        **{name: to_json(manifest.records(name)) for name in PASS_RECORDS},
        "output_selection": manifest.output_selection,
        "batch_fix": to_json(manifest.batch_fix),
        "verification": to_json(manifest.verification),
        "quantization": to_json(manifest.quantization),
        "provenance": to_json(manifest.provenance),
        "engines": to_json(list(engines)),
    }


def _fraction_of_full(manifest: Manifest, k: int) -> float:
    full = manifest.full_macs
    return manifest.exits[k].cumulative_macs / full if full else 1.0


def format_description(manifest: Manifest, engines: Sequence[BuildRecord] = ()) -> str:
    inputs = ", ".join(f"{t.name} {t.dtype}{t.shape}" for t in manifest.inputs)
    lines = [f"package {manifest.name} (format {manifest.format_version}), input {inputs}", ""]
    lines += ["| exit | stage | nodes | MMACs | cumulative MMACs | of full | criterion | threshold | reads | writes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, stage in enumerate(manifest.stages):
        threshold = "-" if stage.exit.threshold is None else f"{stage.exit.threshold:.4g}"
        lines.append(
            f"| {k} | {stage.name} | {stage.nodes} | {stage.exit.macs / 1e6:.3f} | "
            f"{stage.exit.cumulative_macs / 1e6:.3f} | {_fraction_of_full(manifest, k):.1%} | "
            f"{stage.exit.criterion} | {threshold} | {len(stage.reads)} | {len(stage.writes)} |"
        )
    thresholds = manifest.thresholds
    stored = thresholds if thresholds is not None else "none stored (every sample runs to the last exit)"
    lines += ["", f"thresholds: {stored}"]
    for name, kind in PASS_RECORDS.items():
        lines += kind.summary(manifest.records(name))
    if manifest.custom_ops:
        ops = ", ".join(f"{o.op} (without its plugin: {o.fallback})" for o in manifest.custom_ops)
        lines.append(f"custom ops: {ops}")
    if manifest.output_selection and manifest.output_selection != [""]:
        lines.append(f"exits taken from the forward's outputs: {', '.join(manifest.output_selection)}")
    if manifest.batch_fix is not None:
        lines.append(f"batch: {manifest.batch_fix.summary()}")
    verification = manifest.verification
    if verification:
        status = "passed" if verification.passed else "FAILED"
        if any(manifest.files.get(path) is None or manifest.files[path].sha256 != sha256
               for path, sha256 in verification.files.items()):
            status += " on other files than the package holds now (run dync verify again)"
        dense = "; block-sparse attention checked with every block listed, in float" \
            if verification.dense_attention else ""
        lines.append(f"verification: {status} on {verification.checked} at batches {verification.batches} "
                     f"(max abs error per exit {[f'{e:.2g}' for e in verification.max_abs_error]}){dense}")
    else:
        lines.append("verification: not run (dync verify PKG --model MODEL)")
    if manifest.quantization is not None:
        lines.append(_quantization_line(manifest.quantization))
    lines += [_engine_line(record) for record in engines]
    return "\n".join(lines)


def _engine_line(record: BuildRecord) -> str:
    key = record.key
    return (f"engine: stage {key.stage}, {key.precision}, batch {key.profile['batch']}, TensorRT {key.tensorrt} on "
            f"{key.gpu} ({key.compute_capability}), plugins {key.plugins}, by {record.builder} "
            f"(engines/{record.digest})")


def _quantization_line(record: QuantizationRecord) -> str:
    """One line on what `dync quantize` stored: the default precision from now on."""
    in_float = [s.stage for s in record.stages if s.cpu is None]
    cpu = f"; on the CPU {', '.join(in_float)} run float32 (int8 measured slower)" if in_float else ""
    thresholds = "none" if record.thresholds is None else [round(t, 4) for t in record.thresholds]
    return (f"quantization: {record.format} ({record.method} ranges, calibrated per stage on the samples that reach "
            f"it), CPU and TensorRT forms, {record.format} thresholds {thresholds}; the default precision "
            f"(--precision fp32 for float){cpu}")
