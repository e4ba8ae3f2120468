"""What `dync inspect` shows: the program's stages, its exits with their costs, and the thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dync.package import load_manifest


def describe(package: str | Path) -> dict[str, Any]:
    """A JSON-ready summary; `cumulative_flops` is multiply-accumulates per sample, the papers' convention."""
    manifest = load_manifest(package)
    full = manifest.full_macs
    return {
        "name": manifest.name,
        "format_version": manifest.format_version,
        "inputs": [vars(t) for t in manifest.inputs],
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
                "macs": s.exit.macs,
                "cumulative_flops": s.exit.cumulative_macs,
                "fraction_of_full": s.exit.cumulative_macs / full if full else 1.0,
                "threshold": s.exit.threshold,
            }
            for k, s in enumerate(manifest.stages)
        ],
        "thresholds": manifest.thresholds,
        "custom_ops": manifest.custom_ops,
        "spatial": manifest.spatial,
        "tokens": manifest.tokens,
        "attention": manifest.attention,
        "verification": manifest.verification,
        "provenance": manifest.provenance,
    }


def format_description(description: dict[str, Any]) -> str:
    inputs = ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in description["inputs"])
    lines = [f"package {description['name']} (format {description['format_version']}), input {inputs}", ""]
    lines += ["| exit | stage | nodes | MMACs | cumulative MMACs | of full | threshold | reads | writes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for exit_, stage in zip(description["exits"], description["stages"], strict=True):
        threshold = "-" if exit_["threshold"] is None else f"{exit_['threshold']:.4g}"
        lines.append(
            f"| {exit_['index']} | {stage['name']} | {stage['nodes']} | {exit_['macs'] / 1e6:.3f} | "
            f"{exit_['cumulative_flops'] / 1e6:.3f} | {exit_['fraction_of_full']:.1%} | {threshold} | "
            f"{len(stage['reads'])} | {len(stage['writes'])} |"
        )
    thresholds = description["thresholds"]
    stored = thresholds if thresholds is not None else "none stored (every sample runs to the last exit)"
    lines += ["", f"thresholds: {stored}"]
    lines += _spatial_lines(description["spatial"])
    lines += _token_lines(description["tokens"])
    lines += _attention_lines(description["attention"])
    if description["custom_ops"]:
        ops = ", ".join(f"{o['op']} (without its plugin: {o['fallback']})" for o in description["custom_ops"])
        lines.append(f"custom ops: {ops}")
    verification = description["verification"]
    if verification:
        status = "passed" if verification["passed"] else "FAILED"
        lines.append(f"verification: {status} on {verification['checked']} "
                     f"(max abs error per exit {[f'{e:.2g}' for e in verification['max_abs_error']]})")
    else:
        lines.append("verification: not run (dync verify PKG --model MODEL)")
    return "\n".join(lines)


def _spatial_lines(blocks: list[dict[str, Any]]) -> list[str]:
    """One line per masked bottleneck the spatial pass saw: lowered (with its crossover) or why not."""
    if not blocks:
        return []
    lowered = sum(b["lowered"] for b in blocks)
    lines = [f"masked bottlenecks: {lowered} of {len(blocks)} lowered to gather-scatter"]
    for b in blocks:
        if not b["lowered"]:
            lines.append(f"  {b['node']}: dense, {b['reason']}")
        elif b["crossover"] is not None:
            lines.append(f"  {b['node']}: runs dense when the batch's mask density is above {b['crossover']:.0%}")
    return lines


def _token_lines(dispatches: list[dict[str, Any]]) -> list[str]:
    """One line for the gated token MLPs the token pass saw, and the reason for each left dense."""
    if not dispatches:
        return []
    lowered = sum(d["lowered"] for d in dispatches)
    lines = [f"token dispatches: {lowered} of {len(dispatches)} run their MLP on the kept tokens only"]
    lines += [f"  {d['node']}: dense, {d['reason']}" for d in dispatches if not d["lowered"]]
    return lines


def _attention_lines(attentions: list[dict[str, Any]]) -> list[str]:
    """One line for the softmax attentions the fusion pass matched, and the measurement behind each choice."""
    if not attentions:
        return []
    fused = sum(a["fused"] for a in attentions)
    lines = [f"softmax attentions: {fused} of {len(attentions)} fused into ONNX Attention (where measured faster)"]
    for a in attentions:
        ratio = a["fused_over_unfused"]
        timing = "shape not static, fused untimed" if ratio is None else f"fused form {ratio:.2f}x the unfused time"
        lines.append(f"  {a['node']}: {'fused' if a['fused'] else 'unfused'}, {timing}")
    return lines
