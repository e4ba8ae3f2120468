"""Lower a multi-exit PyTorch model into a `.dync` package: load, capture, probe, partition, write."""

from __future__ import annotations

import datetime
import hashlib
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from dync.errors import ExportError, InputError
from dync.exporter.capture import capture
from dync.exporter.loading import eval_mode, load_model
from dync.exporter.partition import Stage, partition
from dync.exporter.passes import FORMS, PASSES, PassContext
from dync.exporter.passes.spatial import check_crossover
from dync.exporter.probe import Probe, probe_graph
from dync.graph import default_opset
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
from dync.plugins.splice import custom_ops_used, decompose_custom_nodes
from dync.records import PassRecord, Provenance
from dync.version import __version__

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
    skip_passes: Collection[str] = (),
) -> Path:
    """Export `model` (a module or a model file) to the package directory `output` and return its path.

    After capture, probing and partitioning, each stage goes through the passes of `dync.exporter.passes`
    that serve the form `ops` and are not named in `skip_passes` (`lower_spatial=False` skips "spatial"):
    LASNet-style masked bottlenecks to gather-scatter execution, DyT-style gated MLPs to MLPs on the kept
    tokens, softmax attention to ONNX Attention where that measures faster here; each is exact against
    eager (per-sample convs are recognized during capture regardless). `ops` picks the form: "portable"
    (standard ONNX, for onnxruntime: each masked block runs dense when the batch's mask density is above its
    crossover, measured here unless `spatial_crossover` fixes one for all blocks) or "plugins" (`dync::`
    nodes for TensorRT's plugins; onnxruntime runs their decomposition).
    """
    report = progress or (lambda message: None)
    input_shape = _checked_shape(input_shape)
    skipped = _checked_passes(skip_passes, lower_spatial)
    if ops not in FORMS:
        raise InputError(f"--ops {ops!r} is unknown; use one of {', '.join(FORMS)}.")
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
    context = PassContext(form=ops, whole_model=captured.model, progress=report, spatial_crossover=spatial_crossover)
    records = _run_passes(stages, context, skipped)
    output = Path(output)
    package_name = name or output.name.removesuffix(".dync")
    manifest = _manifest(package_name, captured.input_name, input_shape, stages, probe, source, exits)
    manifest.passes = records
    manifest.custom_ops = custom_ops_used([s.model for s in stages])
    _write_package(output, manifest, stages)
    report(f"wrote {output}")
    return output


def _checked_passes(skip_passes: Collection[str], lower_spatial: bool) -> set[str]:
    names = [p.name for p in PASSES]
    unknown = sorted(set(skip_passes) - set(names))
    if unknown:
        raise InputError(f"--no-pass {', '.join(unknown)} names no pass; the passes are {', '.join(names)}.")
    return {*skip_passes, *(() if lower_spatial else ("spatial",))}


def _run_passes(stages: list[Stage], context: PassContext, skipped: Collection[str]) -> dict[str, list[PassRecord]]:
    """Run each stage through the passes that serve the context's form, in place; every pass's records, by name.

    Passes run after probing and partitioning, so that both see only static shapes and each stage's MACs are
    those of the dense model (what a mask saves depends on the input).
    """
    records: dict[str, list[PassRecord]] = {}
    for stage in stages:
        for each in PASSES:
            if context.form in each.forms and each.name not in skipped:
                stage.model, found = each.run(stage.model, context)
                records.setdefault(each.name, []).extend(found)
    return {name: found for name, found in records.items() if found}


def _checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise InputError(
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


def _provenance(source: Path | None, input_shape: tuple[int, ...], model: onnx.ModelProto) -> Provenance:
    return Provenance(
        source=str(source) if source else None,
        source_sha256=hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
        example_input_shape=list(input_shape),
        dync=__version__,
        torch=torch.__version__,
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        opset=default_opset(model),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _write_package(output: Path, manifest: Manifest, stages: list[Stage]) -> None:
    """Replace `output` only if it is absent, empty or an earlier package, never an unrelated directory."""
    if output.exists():
        if not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST_FILE).exists()):
            raise ExportError(f"{output} exists and is not a dync package; choose another -o path or remove it.")
        shutil.rmtree(output)
    (output / STAGES_DIR).mkdir(parents=True)
    for spec, stage in zip(manifest.stages, stages, strict=True):
        onnx.save_model(stage.model, output / spec.onnx)
    write_manifest(output, manifest)
