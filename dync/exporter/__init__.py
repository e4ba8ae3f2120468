"""Lower a multi-exit PyTorch model into a `.dync` package: load, capture, probe, partition, write."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from dync.errors import DyncError, SpatialLoweringWarning
from dync.exporter.capture import capture
from dync.exporter.loading import eval_mode, load_model
from dync.exporter.partition import Stage, partition
from dync.exporter.passes import (
    DispatchReport,
    LoweringReport,
    lower_masked_bottlenecks,
    lower_token_dispatch,
    report_dispatches,
)
from dync.exporter.passes.attention import FasterForm, FusionReport, fuse_attention
from dync.exporter.passes.spatial import ALWAYS_SPARSE, check_crossover
from dync.exporter.passes.spatial import OPS as SPATIAL_OPS
from dync.exporter.passes.spatial.crossover import measure_crossovers
from dync.exporter.probe import Probe, probe_graph
from dync.package import (
    BATCH_DIM,
    MANIFEST_FILE,
    STAGES_DIR,
    ExitSpec,
    Manifest,
    StageSpec,
    TensorSpec,
    write_manifest,
)
from dync.plugins import custom_ops_used, decompose_custom_nodes

DEFAULT_INPUT_SHAPE = (16, 3, 32, 32)
EXIT_CRITERION = "max_softmax"

Progress = Callable[[str], None]


def export(
    model: torch.nn.Module | str | Path,
    output: str | Path,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    exits: Sequence[int] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    lower_spatial: bool = True,
    ops: str = "portable",
    spatial_crossover: float | None = None,
) -> Path:
    """Export `model` (a module or a model file) to the package directory `output` and return its path.

    `lower_spatial` turns LASNet-style masked bottlenecks into gather-scatter execution and DyT-style gated
    MLPs into MLPs on the kept tokens, both exact against eager (per-sample convs are recognized during
    capture regardless). `ops` picks the form: "portable" (standard ONNX, for onnxruntime: each masked
    block runs dense when the batch's mask density is above its crossover, measured here unless
    `spatial_crossover` fixes one for all blocks; softmax attention fused into ONNX Attention where that
    measures faster here) or "plugins" (`dync::` nodes for TensorRT's plugins; onnxruntime runs their
    decomposition).
    """
    report = progress or (lambda message: None)
    input_shape = _checked_shape(input_shape)
    if ops not in SPATIAL_OPS:
        raise DyncError(f"--ops {ops!r} is unknown; use one of {', '.join(SPATIAL_OPS)}.")
    if spatial_crossover is not None:
        check_crossover(spatial_crossover)
    example = torch.randn(max(input_shape[0], 2), *input_shape[1:])
    source = Path(model) if isinstance(model, (str, Path)) else None
    if source is not None:
        report(f"loading {source}")
        model = load_model(source, example)
    eval_mode(model)
    report("capturing the forward with torch.export")
    captured = capture(model, example, exits)
    report(f"probing {len(captured.model.graph.node)} nodes for batched tensors")
    probe = probe_graph(decompose_custom_nodes(captured.model), captured.input_name, tuple(input_shape[1:]))
    report(f"partitioning into {len(captured.exit_names)} stage(s)")
    stages = partition(captured.model, captured.exit_names, probe, labels=exits)
    spatial, tokens, attention = _lower_dynamic_ops(captured.model, stages, ops, spatial_crossover, report) \
        if lower_spatial else ([], [], [])
    output = Path(output)
    package_name = name or output.name.removesuffix(".dync")
    manifest = _manifest(package_name, captured.input_name, input_shape, stages, probe, source, exits)
    manifest.spatial = [_spatial_record(r) for r in spatial]
    manifest.tokens = [dataclasses.asdict(r) for r in tokens]
    manifest.attention = attention
    manifest.custom_ops = custom_ops_used([s.model for s in stages])
    _write_package(output, manifest, stages)
    report(f"wrote {output}")
    return output


def _lower_dynamic_ops(
    model: onnx.ModelProto, stages: list[Stage], ops: str, crossover: float | None, report: Progress
) -> tuple[list[LoweringReport], list[DispatchReport], list[dict]]:
    """Lower the masked bottlenecks and the token dispatches of each stage in place, and (portable form) fuse
    softmax attention into ONNX Attention nodes where that measures faster; returns one report per masked
    block and per token dispatch, and the manifest's record per softmax attention.

    Lowering comes after probing and partitioning, so that both see only static shapes and each stage's
    MACs are those of the dense model (what a mask saves depends on the input). The portable form's
    crossovers are measured on the whole model unless `crossover` fixes one.
    """
    if ops == "portable" and crossover is None:
        crossover = measure_crossovers(model, progress=report)
    faster = FasterForm(progress=report)
    blocks, dispatches, attention = [], [], []
    for stage in stages:
        stage.model, stage_blocks = lower_masked_bottlenecks(stage.model, ops, ALWAYS_SPARSE if crossover is None
                                                             else crossover)
        stage.model, stage_dispatches = lower_token_dispatch(stage.model)
        if ops == "portable":  # TensorRT's parser has no ONNX Attention: the plugin form keeps the unfused ops
            stage.model, fusions = fuse_attention(stage.model, faster)
            attention += [_attention_record(f, faster.ratios.get(f.shape)) for f in fusions]
        blocks += stage_blocks
        dispatches += stage_dispatches
    _report_blocks(blocks, report)
    report_dispatches(dispatches, report)
    return blocks, dispatches, attention


def _attention_record(fusion: FusionReport, fused_over_unfused: float | None) -> dict:
    """A softmax attention in the manifest: its Softmax node, whether it was fused, its shape, and the measured
    time of the fused form over the unfused one (None where the shape was not static, so nothing was timed)."""
    return {**dataclasses.asdict(fusion), "fused_over_unfused": fused_over_unfused}


def _report_blocks(blocks: list[LoweringReport], report: Progress) -> None:
    """Progress for each block; a warning for each left dense, since the user expected it to run sparse."""
    for block in blocks:
        if block.lowered:
            report(f"masked bottleneck {block.node}: lowered")
        else:
            warnings.warn(f"masked bottleneck {block.node} is left dense: {block.reason}.", SpatialLoweringWarning,
                          stacklevel=3)


def _spatial_record(block: LoweringReport) -> dict:
    return {"node": block.node, "lowered": block.lowered, "reason": block.reason, "crossover": block.crossover}


def _checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise DyncError(
            f"input shape {'x'.join(map(str, shape))} must be a batch followed by the per-sample dims, "
            "all positive, e.g. 16x3x32x32."
        )
    return shape


def _manifest(
    name: str,
    input_name: str,
    input_shape: tuple[int, ...],
    stages: list[Stage],
    probe: Probe,
    source: Path | None,
    exits: Sequence[int] | None,
) -> Manifest:
    cumulative = np.cumsum([s.macs for s in stages]).tolist()
    written = [w for s in stages for w in s.writes]
    return Manifest(
        name=name,
        inputs=[TensorSpec(input_name, "float32", [BATCH_DIM, *input_shape[1:]])],
        state=[TensorSpec(w, str(probe.dtypes[w]), [BATCH_DIM, *probe.per_sample_shape(w)]) for w in written],
        stages=[
            StageSpec(
                name=s.name,
                onnx=f"{STAGES_DIR}/{s.name}.onnx",
                reads=s.reads,
                writes=s.writes,
                exit=ExitSpec(output=s.exit_output, criterion=EXIT_CRITERION, macs=s.macs, cumulative_macs=c),
                nodes=len(s.model.graph.node),
                ops=_op_counts(s.model),
            )
            for s, c in zip(stages, cumulative, strict=True)
        ],
        provenance=_provenance(source, input_shape, stages[0].model),
        exit_selection=None if exits is None else list(exits),
    )


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _provenance(source: Path | None, input_shape: tuple[int, ...], model: onnx.ModelProto) -> dict:
    from dync import __version__

    return {
        "source": str(source) if source else None,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
        "example_input_shape": list(input_shape),
        "dync": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_package(output: Path, manifest: Manifest, stages: list[Stage]) -> None:
    """Replace `output` only if it is absent, empty or an earlier package, never an unrelated directory."""
    if output.exists():
        if not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST_FILE).exists()):
            raise DyncError(f"{output} exists and is not a dync package; choose another -o path or remove it.")
        shutil.rmtree(output)
    (output / STAGES_DIR).mkdir(parents=True)
    for spec, stage in zip(manifest.stages, stages, strict=True):
        onnx.save_model(stage.model, output / spec.onnx)
    write_manifest(output, manifest)
