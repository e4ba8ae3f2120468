"""Lower a multi-exit PyTorch model into a `.dync` package: load, capture, probe, partition, write."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from dync.errors import ExportError, InputError, PassUndoneWarning, VerificationError
from dync.exporter.capture import Captured, capture
from dync.exporter.criterion import parse_criterion, write_graphs
from dync.exporter.example import Example, bind_example, random_example, read_example
from dync.exporter.loading import eval_mode, load_model
from dync.exporter.partition import Stage, partition
from dync.exporter.passes import FORMS, PASSES, Pass, PassContext
from dync.exporter.passes.sparse_attention import SparseAttentionSpec, parse_sparse_attention
from dync.exporter.passes.spatial import check_crossover
from dync.exporter.probe import Probe, probe_graph
from dync.exporter.verification import (
    StageCheck,
    bound_to_files,
    check_package,
    dense_attention_copy,
    disagreement,
    first_batch_dependence,
    first_eager_difference,
)
from dync.graph import default_opset
from dync.inputs import random_inputs
from dync.package import (
    BATCH_DIM,
    FORMAT_NAME,
    MANIFEST_FILE,
    STAGES_DIR,
    ExitSpec,
    Manifest,
    StageSpec,
    TensorSpec,
    program_files,
    write_manifest,
)
from dync.plugins.block_sparse_attention import dense_equivalent
from dync.plugins.splice import custom_ops_used, decompose_custom_nodes
from dync.records import PassRecord, Provenance, VerificationRecord, approximated_nodes
from dync.runtime.engine import Engine
from dync.version import __version__

DEFAULT_INPUT_SHAPE = (16, 3, 32, 32)
EXIT_CRITERION = "max_softmax"

Progress = Callable[[str], None]


def export(
    model: torch.nn.Module | str | Path,
    output: str | Path,
    input_shape: Sequence[int] | None = None,
    exits: Sequence[int] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    lower_spatial: bool = True,
    ops: str = "portable",
    spatial_crossover: float | None = None,
    skip_passes: Collection[str] = (),
    verify: bool = True,
    example: str | Path | Mapping[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
    criterion: str = EXIT_CRITERION,
    force: bool = False,
    trust_pickle: bool = False,
    sparse_attention: str | None = None,
    attention_fp8: str = "off",
) -> Path:
    """Export `model` (a module or a model file) to the package directory `output` and return its path.

    The model takes either one float input of `input_shape` (batch first; default 16x3x32x32), or the forward
    arguments in `example` (an `.npz` file or a mapping of arrays keyed by argument name, batch first, float or
    integer; see `dync.exporter.example`). `outputs` names the exits in what the forward returns (see
    `dync.exporter.outputs`; default: the returned tensor, list of tensors, or first element of a tuple).
    `criterion` is every exit's confidence: a built-in (max_softmax, entropy, margin; `dync.runtime.exit_rule`) or
    `module:function`, a PyTorch function of logits [B, C] -> confidence in [0, 1] per sample, which goes into
    the package as a checked ONNX graph (`dync.exporter.criterion`).

    After capture, probing and partitioning, each stage goes through the passes of `dync.exporter.passes`
    that serve the form `ops` and are not named in `skip_passes` (`lower_spatial=False` skips "spatial"):
    LASNet-style masked bottlenecks to gather-scatter execution, DyT-style gated MLPs to MLPs on the kept
    tokens, softmax attention to ONNX Attention where that measures faster here; each is exact against
    eager (per-sample convs are recognized during capture regardless). `ops` picks the form: "portable"
    (standard ONNX, for onnxruntime: each masked block runs dense when the batch's mask density is above its
    crossover, measured here unless `spatial_crossover` fixes one for all blocks) or "plugins" (`dync::`
    nodes for TensorRT's plugins; onnxruntime runs their decomposition).

    With `verify` (the default), the package is checked against eager PyTorch before it is written, at the
    example batch and at batches 1 and 3, every exit path forced and one mixed run; a package that disagrees
    is not written, and the error names the first tensor of the captured graph that depends on the batch
    (with its model source line) when there is one. The record goes into the manifest.

    `output` must be absent, an empty directory, or (with `force`) an earlier package, checked before any work.
    A pickled model file is loaded only with `trust_pickle` (see `dync.exporter.loading`).

    `sparse_attention` (a `--sparse-attention` spec, `dync.exporter.passes.sparse_attention.spec`) makes every
    softmax attention block-sparse, `attention_fp8` ("e4m3", "e5m2") rounds its operands to fp8 (alone: dense
    fp8 attention). Such a package is verified with every mask listing every block and fp8 off, which is
    exact against eager; the records say what each mask keeps on the example.
    """
    report = progress or (lambda message: None)
    output = Path(output)
    _check_output(output, force)
    arrays = _checked_inputs(input_shape, example)
    shape = None if arrays else _checked_shape(input_shape)
    skipped = _checked_passes(skip_passes, lower_spatial)
    exit_criterion = parse_criterion(criterion)
    if ops not in FORMS:
        raise InputError(f"--ops {ops!r} is unknown; use one of {', '.join(FORMS)}.")
    if spatial_crossover is not None:
        check_crossover(spatial_crossover)
    attention_spec = _attention_spec(sparse_attention, attention_fp8)
    if ops == "plugins" and attention_spec is not None and attention_spec.fp8 != "off":
        raise InputError(f"--attention-fp8 {attention_fp8} with --ops plugins: BlockSparseAttention's TensorRT plugin "
                         "takes fp8 off only (V's per-channel scales need a second kernel); export the plugins form "
                         "without --attention-fp8, or the portable form with it.")
    inputs = Example(arrays) if arrays else random_example(shape)
    source = Path(model) if isinstance(model, (str, Path)) else None
    if source is not None:
        report(f"loading {source}")
        model = load_model(source, inputs.tensors(), trust_pickle=trust_pickle)
    eval_mode(model)
    if arrays:
        inputs = bind_example(model, arrays, where=str(example) if isinstance(example, (str, Path)) else "the example")
    report("capturing the forward with torch.export")
    captured = capture(model, inputs, exits, outputs)
    if captured.picked:
        report(captured.picked)
    for repair in captured.repairs:
        report(f"repaired a translation defect at {repair}")
    if captured.batch_fix is not None:
        report(captured.batch_fix.summary())
    specs = inputs.specs()
    report(f"probing {len(captured.model.graph.node)} nodes for batched tensors")
    probe = probe_graph(decompose_custom_nodes(captured.model), specs)
    report(f"partitioning into {len(captured.exit_names)} stage(s)")
    stages = partition(captured.model, captured.exit_names, probe, labels=exits)
    context = PassContext(form=ops, whole_model=captured.model, progress=report, spatial_crossover=spatial_crossover,
                          sparse_attention=attention_spec)
    check = StageCheck.on_inputs(stages, random_inputs(specs, 3, seed=1)) if verify else None
    example_feeds = StageCheck.on_inputs(stages, inputs.arrays).feeds if attention_spec is not None else None
    records = _run_passes(stages, context, skipped, check, example_feeds)
    if attention_spec is not None:
        _check_sparsified(records.get("sparse_attention", []), attention_spec, stages)
    package_name = name or output.name.removesuffix(".dync")
    manifest = _manifest(package_name, specs, stages, probe, _provenance(source, shape, inputs, stages[0].model))
    manifest.output_selection = captured.output_paths
    manifest.batch_fix = captured.batch_fix
    manifest.exit_selection = None if exits is None else list(exits)
    manifest.passes = records
    manifest.custom_ops = custom_ops_used([s.model for s in stages])
    criterion_graphs = exit_criterion.attach(manifest)
    staged = _write_staged(output, manifest, stages)
    try:
        write_graphs(staged, criterion_graphs)
        manifest.files = program_files(staged, manifest)
        write_manifest(staged, manifest)
        if verify:
            report("verifying the package against eager PyTorch")
            with dense_attention_copy(staged) as checked:
                record = _verified(checked, model, captured, inputs, progress=report)
            manifest.verification = bound_to_files(dataclasses.replace(record, dense_attention=checked != staged),
                                                   manifest)
            write_manifest(staged, manifest)
        if _is_package(output):
            report(f"replacing the package at {output} (--force); its calibration, verification record and calib/ "
                   "profiles are not carried over")
        _replace(output, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    report(f"wrote {output}")
    return output


VERIFY_BATCHES = (1, 3)
"""Besides the example's: one sample, and a size the capture did not see."""


def _checked_inputs(input_shape: Sequence[int] | None,
                    example: str | Path | Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The example's arrays, or None when the model takes one random input of `input_shape`."""
    if example is None:
        return None
    if input_shape is not None:
        raise InputError("--input-shape and --example both describe the inputs; give one of them (--example for "
                         "several inputs or integer ones).")
    return read_example(example)


def _verified(package: Path, model: torch.nn.Module, captured: Captured, example: Example,
              progress: Progress) -> VerificationRecord:
    """The package's verification record at the example batch and VERIFY_BATCHES; VerificationError when it
    disagrees, naming where the captured graph depends on the batch if it does."""
    engine = Engine.load(package)
    specs = engine.manifest.inputs
    sizes = [b for b in VERIFY_BATCHES if b != example.batch]
    batches = [example.arrays, *(random_inputs(specs, b, seed=b) for b in sizes)]
    record = check_package(engine, model, batches, progress=progress)
    if record.passed:
        return record
    dependence = first_batch_dependence(captured.model, example.arrays)
    if dependence is None:
        raise _located_disagreement(engine.manifest.name, record, captured, example)
    raise VerificationError(
        f"{disagreement(engine.manifest.name, record)} The captured graph depends on the batch: "
        f"{dependence.describe()}; write that line so that the batch stays symbolic (take it from x.shape[0] "
        "or let view/reshape infer it with -1), or export with --no-verify if you know why."
    )


def _located_disagreement(name: str, record: VerificationRecord, captured: Captured,
                          example: Example) -> VerificationError:
    """The disagreement, with the first captured tensor that differs from eager PyTorch at the example batch
    (a mistranslation, named with its model line), or else the word that capture agrees and a lowering does not."""
    wrong = None if captured.program is None else first_eager_difference(captured.model, captured.program,
                                                                         example.arrays)
    if wrong is None:
        return VerificationError(
            f"{disagreement(name, record)} The captured graph agrees with eager PyTorch at every tensor, so a "
            "lowering step is wrong: export again with --no-pass NAME for each pass to find it, and report it."
        )
    return VerificationError(
        f"{disagreement(name, record)} The captured graph differs from eager first at {wrong.describe()}, a "
        "translation defect of torch.onnx: write that line another way (see README, Limitations), or export with "
        "--no-verify if you know why."
    )


def _checked_passes(skip_passes: Collection[str], lower_spatial: bool) -> set[str]:
    names = [p.name for p in PASSES]
    unknown = sorted(set(skip_passes) - set(names))
    if unknown:
        raise InputError(f"--no-pass {', '.join(unknown)} names no pass; the passes are {', '.join(names)}.")
    return {*skip_passes, *(() if lower_spatial else ("spatial",))}


def _attention_spec(sparse_attention: str | None, attention_fp8: str) -> SparseAttentionSpec | None:
    """The sparse-attention spec asked for; fp8 alone is every block listed, in fp8."""
    if sparse_attention is None and attention_fp8 == "off":
        return None
    return parse_sparse_attention(sparse_attention or "dense", attention_fp8)


def _check_sparsified(records: list[PassRecord], spec: SparseAttentionSpec, stages: list[Stage]) -> None:
    """ExportError when `--sparse-attention` found nothing it could make sparse (it was asked for), naming the
    Softmax nodes it could not take when there are any."""
    if any(r.applied for r in records):
        return
    if not records:
        softmaxes = [n.name for stage in stages for n in stage.model.graph.node if n.op_type == "Softmax"]
        found = (f"its Softmax nodes {', '.join(softmaxes[:5])}{' ...' if len(softmaxes) > 5 else ''} are not"
                 if softmaxes else "the model has no Softmax,")
        raise ExportError(f"--sparse-attention {spec.describe()} found no softmax attention it can take: {found} in "
                          "a matmul-softmax-matmul chain over 4-D [batch, heads, tokens, dim] tensors (what "
                          "scaled_dot_product_attention exports as); write the attention that way or export without "
                          "--sparse-attention.")
    reasons = "; ".join(f"{r.node}: {r.reason}" for r in records)
    raise ExportError(f"--sparse-attention {spec.describe()} left every softmax attention dense ({reasons}).")


def _run_passes(stages: list[Stage], context: PassContext, skipped: Collection[str],
                check: StageCheck | None,
                example_feeds: list[dict[str, np.ndarray]] | None = None) -> dict[str, list[PassRecord]]:
    """Run each stage through the passes that serve the context's form, in place; every pass's records, by name.

    Passes run after probing and partitioning, so that both see only static shapes and each stage's MACs are
    those of the dense model (what a mask saves depends on the input). With `check`, every rewrite is
    checked (`_checked_run`): a pass may fail to apply, never make a package wrong.
    """
    records: dict[str, list[PassRecord]] = {}
    for k, stage in enumerate(stages):
        stage_context = dataclasses.replace(context, feeds=None if example_feeds is None else example_feeds[k])
        for each in PASSES:
            if context.form in each.forms and each.name not in skipped:
                stage.model, found = _checked_run(each, stage, k, stage_context, check)
                records.setdefault(each.name, []).extend(found)
    return {name: found for name, found in records.items() if found}


def _checked_run(each: Pass, stage: Stage, k: int, context: PassContext,
                 check: StageCheck | None) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """`each` on the stage; when its rewrite changes the stage's outputs, the candidates whose rewrite alone does
    so are found, left as they are (a warning names each) and the pass runs again without them, quietly (its
    first run reported the rest). If the outputs still differ (candidates that are wrong only together), the
    whole rewrite of the stage is undone."""
    rewritten, found = each.run(stage.model, context)
    problem = None if check is None or rewritten is stage.model else \
        check.compare(k, dense_equivalent(rewritten, approximated_nodes(found)))
    if problem is None:
        return rewritten, list(found)
    applied = [r.node for r in found if r.applied]
    culprits = {node: why for node in applied
                if (why := _alone_differs(each, stage, k, context, check, set(applied) - {node})) is not None}
    for node, why in culprits.items():
        warnings.warn(f"pass {each.name} changed the outputs of {stage.name} at {node} ({why}); that rewrite is "
                      "undone, the node stays as it was.", PassUndoneWarning, stacklevel=2)
    context.skip.setdefault(each.name, set()).update(culprits)
    rewritten, kept = each.run(stage.model, dataclasses.replace(context, progress=lambda message: None))
    undone = [r.undone(f"undone: the rewritten stage {culprits[r.node]}") for r in found if r.node in culprits]
    if culprits and check.compare(k, dense_equivalent(rewritten, approximated_nodes(kept))) is None:
        return rewritten, [*kept, *undone]
    warnings.warn(f"pass {each.name} changed the outputs of {stage.name} ({problem}); its rewrite of that stage is "
                  "undone.", PassUndoneWarning, stacklevel=2)
    return stage.model, [r.undone(f"undone: the rewritten stage {problem}") if r.applied else r for r in found]


def _alone_differs(each: Pass, stage: Stage, k: int, context: PassContext, check: StageCheck,
                   others: set[str]) -> str | None:
    """What differs when `each` rewrites the stage with every applied candidate in `others` left out (a trial:
    its progress and warnings are not the user's)."""
    trial = dataclasses.replace(context, progress=lambda message: None,
                                skip={**context.skip, each.name: context.skipped(each.name) | others})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten, found = each.run(stage.model, trial)
    if rewritten is stage.model:
        return None
    return check.compare(k, dense_equivalent(rewritten, approximated_nodes(found)))


def _checked_shape(shape: Sequence[int] | None) -> tuple[int, ...]:
    shape = tuple(int(d) for d in (DEFAULT_INPUT_SHAPE if shape is None else shape))
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise InputError(
            f"input shape {'x'.join(map(str, shape))} must be a batch followed by the per-sample dims, "
            "all positive, e.g. 16x3x32x32."
        )
    return shape


def _manifest(name: str, inputs: list[TensorSpec], stages: list[Stage], probe: Probe,
              provenance: Provenance) -> Manifest:
    cumulative = np.cumsum([s.macs for s in stages]).tolist()
    written = [w for s in stages for w in s.writes]
    return Manifest(
        name=name,
        inputs=inputs,
        state=[TensorSpec(w, str(probe.dtypes[w]), [BATCH_DIM, *probe.per_sample_shape(w)]) for w in written],
        stages=[
            StageSpec(
                name=s.name,
                onnx=f"{STAGES_DIR}/{s.name}.onnx",
                reads=s.reads,
                writes=s.writes,
                exit=ExitSpec(output=s.exit_output, criterion=EXIT_CRITERION, macs=s.macs, cumulative_macs=c,
                              shape=[BATCH_DIM, *probe.per_sample_shape(s.exit_output)]),
                nodes=len(s.model.graph.node),
                ops=_op_counts(s.model),
            )
            for s, c in zip(stages, cumulative, strict=True)
        ],
        provenance=provenance,
    )


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _provenance(source: Path | None, input_shape: tuple[int, ...] | None, example: Example,
                model: onnx.ModelProto) -> Provenance:
    """`example_input_shape` is `input_shape` as given, or else the first example input's shape; `example_inputs`
    holds every example input's shape when they came from `--example`."""
    shapes = {name: list(a.shape) for name, a in example.arrays.items()}
    return Provenance(
        source=str(source) if source else None,
        source_sha256=hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
        example_input_shape=list(input_shape) if input_shape else next(iter(shapes.values())),
        example_inputs=None if input_shape else shapes,
        dync=__version__,
        torch=torch.__version__,
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        opset=default_opset(model),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _check_output(output: Path, force: bool) -> None:
    """`output` may be absent or an empty directory, an earlier package only with `force`, and never anything
    else: a directory that is not a dync package is never replaced."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"{output} is a file, not a package directory; choose another -o path.")
    if not any(output.iterdir()):
        return
    if not _is_package(output):
        raise ExportError(f"{output} is a directory that is not a dync package, and export never replaces one; "
                          "choose another -o path.")
    if not force:
        raise ExportError(f"{output} is a dync package already; pass --force to replace it (its calibration, "
                          "verification record and calib/ profiles are not carried over).")


def _is_package(directory: Path) -> bool:
    """Whether `directory` holds a manifest that says it is a dync package (of any format version)."""
    try:
        raw = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT_NAME


def _write_staged(output: Path, manifest: Manifest, stages: list[Stage]) -> Path:
    """The package written beside `output` (same file system), to be verified before it replaces `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    (staged / STAGES_DIR).mkdir()
    for spec, stage in zip(manifest.stages, stages, strict=True):
        onnx.save_model(stage.model, staged / spec.onnx)
    write_manifest(staged, manifest)
    return staged


def _replace(output: Path, staged: Path) -> None:
    """Move the verified package into place; an earlier one is moved aside first and deleted only after, so a
    kill at any point leaves a whole package at `output` (or, between the two renames, the earlier one beside
    it)."""
    if not output.exists() or not any(output.iterdir()):
        staged.replace(output)
        return
    retired = staged.with_name(f"{staged.name}.replaced")
    output.rename(retired)
    staged.rename(output)
    shutil.rmtree(retired, ignore_errors=True)
