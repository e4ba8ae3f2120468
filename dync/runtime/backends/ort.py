"""onnxruntime CPU backend: per stage, a dynamic-batch InferenceSession built at load, plus fixed-shape sessions
built on first use for the batch sizes that repeat (`StageSession`), all with explicit options; and the
static full model (the stages merged back into one graph) as one more `StageSession`, built on first use.

Session options are explicit (threads, graph optimization level, thread pool, fixed-batch sessions) so that
`bench` compares dync and the static full model under identical settings and can print them.

Spinning: an onnxruntime pool spin-waits between ops (and for a while after a run) instead of sleeping, which
saves waking its threads for every op. A session that runs alone in a call (a one-stage package, the whole
executor as one graph, the static full model) spins, as onnxruntime's default sessions do. Stage sessions
called one after another do not: each owns a pool, and a pool still spinning after its stage takes the cores
the next stage's pool needs (on 2 cores this dominated batch-1 latency through 7 stages). onnxruntime's
process-wide pool would let every stage spin on one pool, but once it exists onnxruntime refuses every
session in the process that keeps its own threads (its default), so a library cannot turn it on.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from dync.errors import InputError, PackageError
from dync.inputs import batch_of
from dync.package import Manifest, StageSpec
from dync.runtime.backends.kernels import EXIT_RULE, KernelTime
from dync.runtime.branches import has_branches, transform_branches
from dync.runtime.one_graph import (
    EXIT,
    OUTPUT,
    THRESHOLDS,
    OneGraph,
    one_graph_applies,
    thresholds_feed,
)

ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.RuntimeException,
              ort.capi.onnxruntime_pybind11_state.InvalidProtobuf)
"""What onnxruntime raises when a graph cannot be loaded or run on the inputs it is given."""

CPU = "CPUExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
ENGINE_CACHE = "engines/ort-tensorrt"
"""Where, inside a package, onnxruntime's TensorRT provider caches engines."""

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OrtSettings:
    """Session settings shared by every stage and by any baseline measured against them."""

    threads: int = 0
    optimization: str = "all"
    fixed_batches: int = 8
    one_graph: bool = True
    profile_dir: str | None = None
    providers: tuple[str, ...] = (CPU,)
    """onnxruntime execution providers in order of preference (`CUDAExecutionProvider`,
    `TensorrtExecutionProvider` need onnxruntime-gpu)."""
    engine_cache: str | None = None
    """Where the TensorRT provider caches its engines, one directory per graph (the package's engines/)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", tuple(self.providers))
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise InputError(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} (it has "
                             f"{', '.join(ort.get_available_providers())}); the CUDA and TensorRT providers come with "
                             "pip install onnxruntime-gpu in place of onnxruntime.")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise InputError(
                f"onnxruntime optimization level '{self.optimization}' is unknown; "
                f"choose one of {sorted(OPTIMIZATION_LEVELS)}."
            )
        if self.fixed_batches < 0:
            raise InputError(f"fixed_batches {self.fixed_batches} must be >= 0 (0 keeps every stage on one "
                             f"dynamic-batch session).")
        if self.threads < 0:
            raise InputError(f"thread count {self.threads} must be >= 0 (0 means one per CPU core).")

    @property
    def intra_op_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def session_options(self, spinning: bool, label: str = "session") -> ort.SessionOptions:
        """Options for one session; with `profile_dir`, onnxruntime profiles it into a file named after `label`
        and a number unique in this process (its own names hold only the second the session started)."""
        options = ort.SessionOptions()
        if self.profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(self.profile_dir) / f"{label}-{next(_session_numbers)}")
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        return options

    @property
    def on_cpu_only(self) -> bool:
        """Whether every provider is the CPU's: dync's CPU-specific graph rewrites (NCHWc branches, the one-graph
        executor's optimized stages) apply only then."""
        return self.providers == (CPU,)

    def provider_list(self, source: bytes) -> list[str | tuple[str, dict[str, str]]]:
        """The providers for one graph; the TensorRT provider caches its engines in a directory named by the
        graph's SHA-256, weights included (its own cache key leaves weights out, so a retrained model of the
        same architecture would reuse a stale engine)."""
        if TENSORRT_PROVIDER not in self.providers:
            return list(self.providers)
        assert self.engine_cache is not None, "the TensorRT provider needs an engine cache directory"
        directory = Path(self.engine_cache) / hashlib.sha256(source).hexdigest()[:40]
        options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(directory),
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(self.engine_cache)}
        return [(p, options) if p == TENSORRT_PROVIDER else p for p in self.providers]

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "intra_op_threads": self.intra_op_threads, "provider": ",".join(self.providers)}


_session_numbers = itertools.count()


def session_from_onnx(model: onnx.ModelProto | str | Path, settings: OrtSettings, spinning: bool = True,
                      label: str = "session", optimize_branches: bool = True) -> ort.InferenceSession:
    """A CPU session for a model (or its file) under `settings`, explicit options only (never ort's defaults);
    `spinning=False` for a session that runs in turn with others (see the module docstring).

    A file is handed to onnxruntime as bytes, never as a path, so that a stage cannot make it read files
    outside the package through external-data references; a file onnxruntime refuses is a PackageError."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    if optimize_branches and settings.optimization == "all" and settings.on_cpu_only:
        source = _with_optimized_branches(source, settings)
    try:
        return ort.InferenceSession(source, settings.session_options(spinning, label),
                                    providers=settings.provider_list(source))
    except ORT_ERRORS as exc:
        if isinstance(model, onnx.ModelProto):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"onnxruntime cannot load {model} ({first}); the file is damaged or not what dync "
                           "wrote (dync packages hold their weights inside the stage files): re-export the "
                           "package.") from exc


def optimized_for_this_machine(model: onnx.ModelProto, settings: OrtSettings) -> onnx.ModelProto:
    """`model` as onnxruntime optimizes it for this CPU, with its layout transforms (NCHWc convolutions) in;
    specific to this machine, so never stored in a package."""
    with tempfile.TemporaryDirectory(prefix="dync-optimized-") as scratch:
        options = settings.session_options(spinning=False)
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        options.log_severity_level = 3  # its warning: the file holds machine-specific ops, which is the point
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _with_optimized_branches(source: bytes, settings: OrtSettings) -> bytes:
    """The model with every `If` branch replaced by the branch as onnxruntime optimizes it on its own
    (`dync.runtime.branches`), its own branches first.

    onnxruntime applies its layout transforms (NCHWc convolutions) and the fusions that follow them to a
    graph's top level only: inside an `If` branch (a spatial block's dense fallback, a stage of the one-graph
    executor) convolutions ran as plain NCHW, 1.2-1.5x slower. A branch reading an outer tensor whose type
    cannot be inferred stays as it is."""
    if b"If" not in source:
        return source
    model = onnx.load_from_string(source)
    if not has_branches(model.graph):
        return source

    def optimize(branch: onnx.ModelProto, _key: str) -> onnx.ModelProto:
        inner = onnx.load_from_string(_with_optimized_branches(branch.SerializeToString(), settings))
        return optimized_for_this_machine(inner, settings)

    return transform_branches(model, optimize).SerializeToString()


def _branch_stage(model: onnx.ModelProto, batch: int | None, settings: OrtSettings) -> onnx.ModelProto:
    """A later stage as a branch of the one-graph executor holds it: for one batch size, with its inputs' batch
    fixed (so that onnxruntime folds its shape arithmetic) and plugin nodes on their fast CPU path; for any
    batch, with them decomposed; optimized here as a model of its own either way, where its inputs' types
    are as the stage declares them (`_with_optimized_branches` would type them from shape inference on the
    executor graph, which loses the channel counts after `Compress`, and with them the NCHWc layout)."""
    from dync.plugins.splice import decompose_custom_nodes, specialize_custom_nodes

    if batch is None:
        return optimized_for_this_machine(decompose_custom_nodes(model), settings)
    return optimized_for_this_machine(with_batch(specialize_custom_nodes(model, batch), batch), settings)


class StageSession:
    """What runs one stage graph: a session with a dynamic batch, and sessions with the batch fixed where it pays.

    onnxruntime plans memory and folds shape arithmetic only for static shapes, and `dync::` plugin nodes take
    their fast CPU path (PerSampleConv2d as one grouped Conv) only for a known batch. So a stage that sees the
    request's batch (which repeats across calls, unlike the survivors an early exit leaves to later stages)
    or that has a fast CPU path gets a fixed-shape session per batch size, built on the first call with that
    size, for the first `settings.fixed_batches` sizes. Other sizes and stages share the dynamic session,
    where plugin nodes run their portable decomposition.
    """

    def __init__(self, model: onnx.ModelProto | Path, settings: OrtSettings, *, sees_request_batch: bool,
                 spinning: bool, plugins: bool = True, label: str = "stage", optimize_branches: bool = True) -> None:
        """`spinning` for a graph that runs alone in a call; `plugins=False` promises a stage file without
        `dync::` nodes (as its manifest says), which spares parsing it here; `label` names its profiles;
        `optimize_branches=False` for a graph whose `If` branches hold graphs optimized already."""
        from dync.plugins.splice import custom_nodes, decompose_custom_nodes, has_fast_cpu_path

        self._settings = settings
        self._spinning = spinning
        self._label = label
        self._optimize_branches = optimize_branches
        self._model = model
        graph = onnx.load(model, load_external_data=False) if isinstance(model, Path) and plugins else model
        has_plugins = isinstance(graph, onnx.ModelProto) and bool(custom_nodes(graph))
        self._dynamic = session_from_onnx(decompose_custom_nodes(graph) if has_plugins else model, settings, spinning,
                                          label, optimize_branches)
        fast_path = has_plugins and has_fast_cpu_path(graph)
        self._fixed_batch = settings.fixed_batches > 0 and (sees_request_batch or fast_path)
        self._by_batch: dict[int, ort.InferenceSession] = {}

    def check_interface(self, stage: StageSpec) -> None:
        """The stage graph reads and writes what the manifest says it does (a hand-edited manifest may not)."""
        inputs = {i.name for i in self._dynamic.get_inputs()}
        outputs = {o.name for o in self._dynamic.get_outputs()}
        wanted_out = {stage.exit.output, *stage.writes}
        if set(stage.reads) != inputs or not wanted_out <= outputs:
            raise PackageError(
                f"stage '{stage.name}' ({stage.onnx}) reads {sorted(inputs)} and writes {sorted(outputs)}, but the "
                f"manifest says it reads {sorted(stage.reads)} and writes {sorted(wanted_out)}; re-export the "
                "package."
            )

    @property
    def fixed_batch_sizes(self) -> list[int]:
        """The batch sizes this stage has a fixed-shape session for so far."""
        return sorted(self._by_batch)

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session(len(next(iter(feeds.values())))).run(names, feeds)

    def end_profiling(self) -> list[Path]:
        """Stops profiling every session built so far (see `OrtSettings.profile_dir`); their profile files."""
        return [Path(session.end_profiling()) for session in [self._dynamic, *self._by_batch.values()]]

    def _session(self, batch: int) -> ort.InferenceSession:
        if batch in self._by_batch:
            return self._by_batch[batch]
        if not self._fixed_batch or len(self._by_batch) >= self._settings.fixed_batches:
            return self._dynamic
        from dync.plugins.splice import specialize_custom_nodes

        graph = onnx.load(self._model, load_external_data=False) if isinstance(self._model, Path) else self._model
        self._by_batch[batch] = session_from_onnx(with_batch(specialize_custom_nodes(graph, batch), batch),
                                                  self._settings, self._spinning, f"{self._label}-batch{batch}",
                                                  self._optimize_branches)
        return self._by_batch[batch]


_STAGE_OF_NODE = re.compile(r"@(\d+)(?!\d)")
"""A node of the one-graph executor carries its stage's index (`dync.runtime.one_graph`)."""
_EXIT_RULE_NODE = re.compile(r"^dync_")
"""The one-graph executor's own nodes (exit rule, scatter, result) are named `dync_...`."""

_CONTROL_FLOW = {"If", "Loop", "Scan"}
"""Their profiled time is their branches' nodes, which are profiled too."""


def _kernel_times(profile: Path, stage: int | None) -> list[KernelTime]:
    """The node events of one onnxruntime profile after its first run; `stage` None for the one-graph
    executor, whose node names say their stage (nodes onnxruntime added at its top level belong to stage 0)."""
    events = json.loads(profile.read_text())
    profile.unlink()
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    if len(runs) < 2:
        return []
    times = []
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < runs[0] \
                or event["args"]["op_name"] in _CONTROL_FLOW:
            continue
        node = event["name"].removesuffix("_kernel_time")
        if stage is not None:
            where: int | str = stage
        elif _EXIT_RULE_NODE.match(node):
            where = EXIT_RULE
        else:
            found = _STAGE_OF_NODE.search(node)
            where = int(found.group(1)) if found else 0
        times.append(KernelTime(where, event["args"]["op_name"], node, event["dur"] * 1e-6))
    return times


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of `model` with its inputs' batch dim fixed, so onnxruntime folds the shape arithmetic that reads
    it; a copy, because a stage held in memory is specialized again for each batch size."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return fixed


def _for_providers(package_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """GPU providers run the stages stage by stage (the one-graph executor's stages are optimized for the CPU),
    and the TensorRT provider caches its engines in the package."""
    providers = tuple(settings.get("providers", (CPU,)))
    if providers == (CPU,):
        return settings
    return {"engine_cache": str(package_dir / ENGINE_CACHE), **settings, "one_graph": False}


class OrtBackend:
    """The `Backend` on onnxruntime's CPU provider: one `StageSession` per stage, and one for the static full model."""

    name = "ort"

    def __init__(self, package_dir: Path, manifest: Manifest, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(OrtSettings.__dataclass_fields__))
        if unknown:
            raise InputError(
                f"onnxruntime backend options {unknown} are unknown; use {sorted(OrtSettings.__dataclass_fields__)}."
            )
        self.settings = OrtSettings(**_for_providers(Path(package_dir), settings))
        self._package_dir = Path(package_dir)
        self._manifest = manifest
        alone = len(manifest.stages) == 1
        self._sessions = {stage.name: StageSession(self._package_dir / stage.onnx, self.settings,
                                                   sees_request_batch=k == 0, spinning=alone,
                                                   plugins=bool(manifest.custom_ops), label=stage.name)
                          for k, stage in enumerate(manifest.stages)}
        for stage in manifest.stages:
            self._sessions[stage.name].check_interface(stage)
        self._outputs = {s.name: [s.exit.output, *[w for w in s.writes if w != s.exit.output]] for s in manifest.stages}
        self._executors: dict[bool, StageSession | None] = {}

    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[stage.name]
        return dict(zip(names, self._sessions[stage.name].run(names, feeds), strict=True))

    def run_static(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._static_session.run(None, feeds)

    def run_executor(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        session = self._executor_session(batch_of(feeds) == 1)
        if session is None:
            return None
        return tuple(session.run([OUTPUT, EXIT], {**feeds, THRESHOLDS: thresholds_feed(thresholds)}))

    def _executor_session(self, single_sample: bool) -> StageSession | None:
        """The executor as one graph (`dync.runtime.one_graph`) in its form for one sample or for any batch,
        built on first use; None where the package needs the stage-by-stage executor or the settings ask
        for it."""
        if single_sample not in self._executors:
            self._executors[single_sample] = None if self._one_graph is None else StageSession(
                self._one_graph.model(single_sample), self.settings, sees_request_batch=True, spinning=True,
                label="one-graph", optimize_branches=False)
        return self._executors[single_sample]

    @cached_property
    def _one_graph(self) -> OneGraph | None:
        if not (self.settings.one_graph and one_graph_applies(self._manifest)):
            return None
        graph = OneGraph(self._package_dir, self._manifest, functools.partial(_branch_stage, settings=self.settings))
        return graph if graph.usable else None

    @cached_property
    def _static_session(self) -> StageSession:
        """The merged graph, run as the first stage is (it sees the request's batch): same settings, fixed-shape
        sessions per batch size, plugin nodes on their onnxruntime paths. Built once, on first use, because
        only baselines and calibration need it (onnx-graphsurgeon, which merges, is imported only then)."""
        from dync.runtime.static import merged_static_model

        return StageSession(merged_static_model(self._package_dir, self._manifest), self.settings,
                            sees_request_batch=True, spinning=True)

    def kernel_times(self) -> list[KernelTime]:
        """Every node run by the stage and executor sessions since load, from onnxruntime's profiles, each run's
        first call left out (it allocates); needs `profile_dir` in the settings, and ends the profiling."""
        assert self.settings.profile_dir is not None, "kernel times need sessions built with profile_dir"
        times = []
        for k, stage in enumerate(self._manifest.stages):
            times += [t for path in self._sessions[stage.name].end_profiling() for t in _kernel_times(path, k)]
        for session in filter(None, self._executors.values()):
            times += [t for path in session.end_profiling() for t in _kernel_times(path, None)]
        return times

    def fixed_batch_sizes(self) -> dict[str, list[int]]:
        """Per stage, the batch sizes it has a fixed-shape session for (built on first use)."""
        return {name: session.fixed_batch_sizes for name, session in self._sessions.items()}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort.__version__, **self.settings.describe()}
