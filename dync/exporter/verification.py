"""Checking a package against the eager model it came from, and finding where a captured graph went wrong.

`check_package` runs every exit path (every sample forced to each exit in turn) and one mixed run (the
batch split evenly over the exits, which exercises compaction) on each of several batches, and compares
with eager PyTorch, tolerances relative to the output scale. Export runs it before a package is written;
`dync verify` runs it on demand.

When the package disagrees, `first_batch_dependence` and `first_eager_difference` say where. A graph whose
samples do not interact computes, for the first n samples of a batch, exactly what it computes on those n
samples alone; the first tensor (in graph order) that breaks this, by its shape or its values, is where the
capture fixed the batch
or mixed samples, and torch.onnx keeps the source line that made it in the node's metadata. The second
compares every tensor of the captured graph with eager PyTorch's value of the program node it is named after,
which finds a mistranslated op even at the example batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dync.calib.thresholds import even_split_thresholds
from dync.errors import CaptureError, VerificationError
from dync.exporter.capture import eager_exits
from dync.exporter.probe import ORT_ERRORS, every_tensor_session
from dync.graph import innermost_frame, source_line
from dync.inputs import Inputs, batch_of
from dync.package import Manifest, at_precision, file_record, load_manifest, write_manifest
from dync.plugins.block_sparse_attention import dense_equivalent
from dync.plugins.splice import decompose_custom_nodes
from dync.records import VerificationRecord, approximated_nodes
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
LOW_PRECISION_RTOL = {"fp16": 0.02, "int8": 0.1, "fp8": 0.25}
"""What exit paths at a lower precision may differ from eager float32, relative to the largest output: int8 and
fp8 (3 mantissa bits) round every activation, fp16 (10) less, and the errors of the stages before an exit add
up."""


def default_rtol(precision: str) -> float:
    return DEFAULT_RTOL if precision == "fp32" else LOW_PRECISION_RTOL[precision]


Progress = Callable[[str], None]


@dataclass(frozen=True)
class BatchErrors:
    """Worst absolute errors on one batch: per forced exit, and of the mixed run."""

    batch: int
    forced: list[float]
    relative: list[float]
    mixed: float
    mixed_exit_counts: list[int]
    scale: float


def eager_reference(model: torch.nn.Module, feeds: dict[str, np.ndarray], manifest: Manifest) -> list[np.ndarray]:
    """Every exit's eager output on `feeds`, as numpy, picked from the forward's outputs as the package was."""
    tensors = [torch.from_numpy(feeds[t.name]) for t in manifest.inputs]
    try:
        found = eager_exits(model, [t.name for t in manifest.inputs], tensors, manifest.output_selection,
                            manifest.exit_selection)
    except CaptureError as exc:
        raise VerificationError(f"the model does not give the exits of package '{manifest.name}' ({exc}); verify "
                                "against the model the package was exported from.") from exc
    return [o.numpy() for o in found]


def batch_errors(engine: Engine, reference: list[np.ndarray], feeds: dict[str, np.ndarray]) -> BatchErrors:
    """The package on `feeds` against eager's `reference`: each exit forced, then the batch split over the exits."""
    num_exits = engine.num_exits
    if len(reference) != num_exits:
        raise VerificationError(
            f"the model has {len(reference)} exits but package '{engine.manifest.name}' has {num_exits}; "
            "verify against the model the package was exported from."
        )
    batch = batch_of(feeds)
    for k, r in enumerate(reference):
        if r.ndim == 0 or r.shape[0] != batch:
            raise VerificationError(
                f"at batch {batch} the model's exit {k} has shape {list(r.shape)}, without the batch first (a "
                "squeeze() that drops a batch of 1?); keep the batch axis, e.g. with flatten(1) or squeeze(-1)."
            )
    forced = [_max_abs(engine.execute(feeds, forcing_thresholds(k, num_exits)).output(k), reference[k])
              for k in range(num_exits)]
    relative = [error / max(float(np.abs(r).max()), 1e-12) for error, r in zip(forced, reference, strict=True)]
    mixed = engine.execute(feeds, even_split_thresholds(engine.criteria.confidences(reference)))
    mixed_error = max(_max_abs(mixed.output(k), r[mixed.exit == k]) for k, r in enumerate(reference))
    return BatchErrors(batch_of(feeds), forced, relative, mixed_error,
                       np.bincount(mixed.exit, minlength=num_exits).tolist(),
                       max(float(np.abs(r).max()) for r in reference))


def check_package(engine: Engine, model: torch.nn.Module, inputs: Sequence[Inputs], rtol: float = DEFAULT_RTOL,
                  atol: float = DEFAULT_ATOL, progress: Progress | None = None) -> VerificationRecord:
    """The verification record of `engine` against eager `model` over each batch of `inputs`: worst errors
    over all batches, passed when every error is within `atol + rtol * max |reference|` of its batch."""
    report = progress or (lambda message: None)
    results = []
    for x in inputs:
        feeds = engine.input_feeds(x)
        engine.check_feeds(feeds)
        result = batch_errors(engine, eager_reference(model, feeds, engine.manifest), feeds)
        if len(inputs) == 1:
            for k, (error, relative) in enumerate(zip(result.forced, result.relative, strict=True)):
                report(f"exit {k}: max abs error {error:.3g}, relative {relative:.3g}")
            report(f"mixed run (exits {result.mixed_exit_counts}): max abs error {result.mixed:.3g}")
        else:
            report(f"batch {result.batch}: max abs error {max(*result.forced, result.mixed):.3g} over every exit "
                   f"path and a mixed run (allowed {atol + rtol * result.scale:.3g})")
        results.append(result)
    passed = all(max(*r.forced, r.mixed) <= atol + rtol * r.scale for r in results)
    return VerificationRecord(
        max_abs_error=np.max([r.forced for r in results], axis=0).tolist(),
        max_rel_error=np.max([r.relative for r in results], axis=0).tolist(),
        mixed_max_abs_error=max(r.mixed for r in results),
        mixed_exit_counts=results[-1].mixed_exit_counts,
        batch=results[-1].batch,
        rtol=rtol,
        atol=atol,
        passed=passed,
        checked=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        batches=[r.batch for r in results],
    )


def bound_to_files(record: VerificationRecord, manifest: Manifest) -> VerificationRecord:
    """The record with the SHA-256 of every program file it verified, as the manifest lists them."""
    return dataclasses.replace(record, files={path: f.sha256 for path, f in manifest.files.items()})


@contextlib.contextmanager
def dense_attention_copy(package: Path, precision: str = "fp32", form: str = "cpu") -> Iterator[Path]:
    """`package` itself, or, when a stage holds BlockSparseAttention, a temporary copy whose masks list every
    block in float (`dense_equivalent`) in the stage graphs `precision` runs in `form`: what is checked against
    eager, since the masks approximate it."""
    manifest = load_manifest(package)
    approximated = approximated_nodes((manifest.passes or {}).get("sparse_attention", []))
    stages = at_precision(manifest, precision, form).stages
    models = {spec.onnx: onnx.load(package / spec.onnx) for spec in stages} if approximated else {}
    dense = {path: dense_equivalent(model, approximated) for path, model in models.items()}
    if all(dense[path] is models[path] for path in models):
        yield package
        return
    copy = Path(tempfile.mkdtemp(prefix=f".{package.name}.dense.", dir=package.parent))
    try:
        shutil.copytree(package, copy, dirs_exist_ok=True)
        for path, model in dense.items():
            onnx.save_model(model, copy / path)
        manifest.files = {**manifest.files, **{path: file_record(copy / path) for path in dense}}
        write_manifest(copy, manifest)
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


REEXPORT = "re-export it with this dync and torch, and report the model if it persists"


def disagreement(name: str, record: VerificationRecord, fix: str = REEXPORT) -> VerificationError:
    """The error for a failed record: the worst exit path, or the mixed run when that is where it fails."""
    worst = int(np.argmax(record.max_rel_error))
    if record.mixed_max_abs_error > max(record.max_abs_error):
        where = (f"the mixed run, with exit counts {record.mixed_exit_counts}: max abs error "
                 f"{record.mixed_max_abs_error:.3g}")
    else:
        where = f"exit {worst}, max abs error {record.max_abs_error[worst]:.3g}"
    return VerificationError(
        f"package '{name}' disagrees with eager PyTorch (worst: {where}, allowed {record.atol:g} + {record.rtol:g} x "
        f"|reference|, batches {record.batches}); {fix}."
    )


@dataclass(frozen=True)
class TensorDifference:
    """Where a graph first goes wrong: the tensor, the node writing it, what is wrong with it, and the model
    source line torch.onnx recorded for the node."""

    tensor: str
    node: str
    op: str
    what: str
    source: str

    def describe(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"tensor '{self.tensor}' of {self.op} node '{self.node}'{where} {self.what}"


def first_batch_dependence(model: onnx.ModelProto, feeds: dict[str, np.ndarray], n: int = 1,
                           rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> TensorDifference | None:
    """Run `model` (every tensor an output) on `feeds` and on their first `n` samples; the first node output,
    in graph order, that has the batch first on `feeds` but not `n` first on the slice, or other values."""
    graph = decompose_custom_nodes(model)
    whole, part = (_all_tensors(graph, {k: v[:size] for k, v in feeds.items()})
                   for size in (len(next(iter(feeds.values()))), n))
    batch = len(next(iter(feeds.values())))
    for node in graph.graph.node:
        for name in node.output:
            full, sliced = whole.get(name), part.get(name)
            if full is None or sliced is None or full.ndim == 0 or full.shape[0] != batch:
                continue
            what = _mismatch(full[:n], sliced, n, rtol, atol)
            if what is not None:
                return TensorDifference(name, node.name, node.op_type, what, source_line(node))
    return None


def first_eager_difference(model: onnx.ModelProto, program: torch.export.ExportedProgram,
                           feeds: dict[str, np.ndarray], rtol: float = DEFAULT_RTOL,
                           atol: float = DEFAULT_ATOL) -> TensorDifference | None:
    """The first tensor, in the eager program's order, whose value in `model` differs from the value eager
    PyTorch computes for the node of the same name (torch.onnx names a graph's tensors after the nodes of the
    ExportedProgram it translates); None when every shared tensor agrees or eager cannot be replayed."""
    eager, traces = _eager_values(program, [torch.from_numpy(feeds[name]) for name in feeds])
    graph = decompose_custom_nodes(model)
    values = _all_tensors(graph, feeds)
    producers = {name: node for node in graph.graph.node for name in node.output}
    for name, expected in eager.items():
        got = values.get(name)
        if got is None or name not in producers:
            continue
        what = _value_mismatch(expected, np.asarray(got), rtol, atol)
        if what is not None:
            node = producers[name]
            return TensorDifference(name, node.name, node.op_type, what, source_line(node) or traces.get(name, ""))
    return None


def _eager_values(program: torch.export.ExportedProgram, inputs: list[torch.Tensor]
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor-valued node of the program, by node name, on `inputs`, in program order; and the model line
    each node came from (kept by the program even where a graph rewrite dropped the ONNX node's)."""
    values: dict[str, np.ndarray] = {}
    traces: dict[str, str] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                values[node.name] = result.detach().numpy()
                traces[node.name] = innermost_frame(node.meta.get("stack_trace") or "")
            return result

    try:
        with torch.no_grad():
            Recorder(program.module()).run(*inputs)
    except Exception:  # a hint on top of a failed verification, which stands without it
        return {}, {}
    return values, traces


def _value_mismatch(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> str | None:
    off = _off(expected, got, rtol, atol)
    if off is None:
        return None
    if off.shape is not None:
        return f"has shape {off.shape} where eager PyTorch's has {list(expected.shape)}"
    if off.error is None:
        return "holds other values than eager's"
    return f"is off by {off.error:.3g} from eager PyTorch's (allowed {off.allowed:.3g})"


def _mismatch(expected: np.ndarray, got: np.ndarray, n: int, rtol: float, atol: float) -> str | None:
    off = _off(expected, got, rtol, atol)
    if off is None:
        return None
    if off.shape is not None:
        return (f"has shape {off.shape} on {n} sample(s) where the batch's first {n} have "
                f"{list(expected.shape)}, so the graph fixed the batch size")
    if off.error is None:
        return "holds other values on fewer samples"
    return f"differs by {off.error:.3g} on {n} sample(s) from the batch's first {n}, so samples interact there"


@dataclass(frozen=True)
class _Off:
    """How a tensor misses its reference: another shape, other values of a non-float tensor (no `error`), or
    a float error above what the tolerances allow."""

    shape: list[int] | None = None
    error: float | None = None
    allowed: float = 0.0


def _off(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> _Off | None:
    """None when `got` matches `expected`: the same shape, and equal values, or float values within
    `atol + rtol * max |expected|` (a NaN error never is)."""
    if got.shape != expected.shape:
        return _Off(shape=list(got.shape))
    if expected.dtype.kind not in "fc":
        return None if np.array_equal(expected, got.astype(expected.dtype)) else _Off()
    error, allowed = _max_abs(got, expected), _allowed(expected, rtol, atol)
    return None if error <= allowed else _Off(error=error, allowed=allowed)


def _allowed(reference: np.ndarray, rtol: float, atol: float) -> float:
    return atol + rtol * (float(np.abs(reference).max()) if reference.size else 0.0)


def _all_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of `model` on `feeds`; an empty dict when onnxruntime refuses the batch (a fixed shape)."""
    session = every_tensor_session(model)
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, feeds), strict=True))
    except ORT_ERRORS:
        return {}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


class StageCheck:
    """Each stage's feeds and outputs before the passes, on one input, to compare a pass's rewrite with.

    The stages run in order on the input (carried state from one feeds the next), as onnxruntime runs them
    with `dync::` nodes decomposed; a rewrite must give the stage's original outputs on the same feeds, within
    the verification tolerances, so that errors of successive passes cannot add up unnoticed.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]],
                 rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> None:
        self.feeds, self.outputs = feeds, outputs
        self.rtol, self.atol = rtol, atol

    @classmethod
    def on_inputs(cls, stages: Sequence[Any], inputs: dict[str, np.ndarray]) -> StageCheck:
        state = dict(inputs)
        feeds, outputs = [], []
        for stage in stages:
            feeds.append({name: state[name] for name in stage.reads})
            outputs.append(run_decomposed(stage.model, feeds[-1]))
            state.update(outputs[-1])
        return cls(feeds, outputs)

    def compare(self, k: int, rewritten: onnx.ModelProto) -> str | None:
        """None when `rewritten` computes stage k's original outputs on its feeds, else what differs."""
        expected, got = self.outputs[k], run_decomposed(rewritten, self.feeds[k])
        for name, value in expected.items():
            off = _off(value, got[name], self.rtol, self.atol)
            if off is not None and off.shape is not None:
                return f"output '{name}' has shape {off.shape}, not {list(value.shape)}"
            if off is not None:
                error = "other values" if off.error is None else f"{off.error:.3g}"
                return f"output '{name}' is off by {error}, allowed {off.allowed:.3g}"
        return None


def run_decomposed(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of `model` on `feeds`, `dync::` nodes through their decompositions."""
    session = ort.InferenceSession(decompose_custom_nodes(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
