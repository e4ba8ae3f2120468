"""Small helpers shared by the tests: eager references, the exit rule in plain numpy, thresholds with known
outcomes, graph ancestry, package copies and a backend that records the batch each stage receives."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from dync.package import StageSpec
from dync.runtime.engine import Engine

REL_TOL = 1e-4
"""Allowed max abs error relative to the largest |reference| value."""

MARGIN = 1e-4
"""Chosen thresholds stay this far from every eager confidence, so onnxruntime's last-bit differences from
PyTorch cannot move a sample across a threshold."""


# --------------------------------------------------------------------------- #
# Data and eager references
# --------------------------------------------------------------------------- #


def eager_outputs(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Every exit's output for `x`, as numpy, earliest first (a single tensor output is one exit)."""
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.numpy() for o in outs]


def max_abs_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error divided by max |ref|."""
    assert got.shape == ref.shape, f"shape {got.shape} != reference shape {ref.shape}"
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    return err / max(float(np.abs(ref).max()), 1e-12)


def assert_close(got: np.ndarray, ref: np.ndarray, rel: float = REL_TOL, what: str = "") -> None:
    error = max_abs_rel_error(got, ref)
    assert error < rel, f"{what}: max abs error is {error:.3g} of max |reference| (allowed {rel:g})"


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability per sample, the textbook way (float64, over the flattened sample)."""
    flat = logits.reshape(len(logits), -1).astype(np.float64)
    flat = flat - flat.max(axis=1, keepdims=True)
    probs = np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)
    return probs.max(axis=1)


# --------------------------------------------------------------------------- #
# The exit rule, restated, and thresholds with known outcomes
# --------------------------------------------------------------------------- #


def expected_exits(confidences: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """First exit k with confidence >= thresholds[k]; the last exit takes the rest."""
    num_exits = len(confidences)
    exits = np.full(len(confidences[0]), num_exits - 1, dtype=np.int64)
    running = np.ones(len(confidences[0]), dtype=bool)
    for k in range(num_exits - 1):
        leave = running & (confidences[k] >= thresholds[k])
        exits[leave] = k
        running &= ~leave
    return exits


def expected_logits(outputs: Sequence[np.ndarray], exits: np.ndarray) -> np.ndarray:
    return np.stack(outputs)[exits, np.arange(len(exits))]


def threshold_for_count(confidences: np.ndarray, count: int) -> tuple[float, int]:
    """A threshold that `count` (or, if ties or near-ties forbid it, the nearest possible number) of
    `confidences` reach, at least MARGIN from each of them; returns (threshold, how many reach it)."""
    n = len(confidences)
    if n == 0:
        return 2.0, 0
    ranked = np.sort(confidences)[::-1]
    candidates = sorted(range(n + 1), key=lambda c: (abs(c - count), c))
    for c in candidates:
        upper = 1.0 + 4 * MARGIN if c == 0 else float(ranked[c - 1])
        lower = 0.0 if c == n else float(ranked[c])
        if upper - lower >= 2 * MARGIN:
            return (upper + lower) / 2, c
    raise AssertionError("unreachable: count 0 always has a threshold")


Mode = str
"""How many of the samples still running leave at an exit: 'all', 'none' or 'some' (about half)."""


@dataclass
class Plan:
    thresholds: list[float]
    counts: list[int] = field(default_factory=list)
    """Samples leaving at each exit (the last exit takes the rest)."""


def plan_thresholds(confidences: Sequence[np.ndarray], modes: Sequence[Mode]) -> Plan:
    """Thresholds for K-1 exits such that, by eager confidences, each exit takes what its mode says."""
    running = np.ones(len(confidences[0]), dtype=bool)
    plan = Plan(thresholds=[])
    for k, mode in enumerate(modes):
        alive = confidences[k][running]
        if len(alive) == 0:
            threshold, count = 2.0, 0
        elif mode == "all":
            threshold, count = 0.0, len(alive)
        elif mode == "none":
            threshold, count = threshold_for_count(alive, 0)
        else:
            threshold, count = threshold_for_count(alive, len(alive) // 2)
            assert 0 < count < len(alive), f"exit {k}: cannot split {len(alive)} samples with a safe margin"
        plan.thresholds.append(threshold)
        plan.counts.append(count)
        running &= ~(confidences[k] >= threshold)
    plan.counts.append(int(running.sum()))
    return plan


def spread_thresholds(confidences: Sequence[np.ndarray]) -> Plan:
    """Thresholds sending about an equal share of the batch to every exit, with safe margins."""
    num_exits = len(confidences)
    running = np.ones(len(confidences[0]), dtype=bool)
    plan = Plan(thresholds=[])
    for k in range(num_exits - 1):
        alive = confidences[k][running]
        threshold, count = threshold_for_count(alive, round(len(alive) / (num_exits - k)))
        plan.thresholds.append(threshold)
        plan.counts.append(count)
        running &= ~(confidences[k] >= threshold)
    plan.counts.append(int(running.sum()))
    return plan


# --------------------------------------------------------------------------- #
# Graphs
# --------------------------------------------------------------------------- #


def node_names(model: onnx.ModelProto) -> list[str]:
    """Top-level node names as the partitioner sees them: a missing or repeated name becomes OP_INDEX."""
    seen: set[str] = set()
    names = []
    for index, node in enumerate(model.graph.node):
        name = node.name if node.name and node.name not in seen else f"{node.op_type}_{index}"
        seen.add(name)
        names.append(name)
    return names


def _reads(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads, including those its subgraphs read from the enclosing scope."""
    reads = [name for name in node.input if name]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            inner |= {t.name for t in graph.initializer}
            reads += [name for n in graph.node for name in _reads(n) if name not in inner]
    return reads


def ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Names of the nodes needed to compute `tensor` in `model`."""
    names = node_names(model)
    producer = {out: (name, node) for name, node in zip(names, model.graph.node, strict=True) for out in node.output}
    found: set[str] = set()
    stack = [tensor]
    while stack:
        entry = producer.get(stack.pop())
        if entry is None or entry[0] in found:
            continue
        found.add(entry[0])
        stack.extend(_reads(entry[1]))
    return found


# --------------------------------------------------------------------------- #
# Packages and engines
# --------------------------------------------------------------------------- #


def copy_package(package: Path, destination: Path) -> Path:
    """A private copy that a test may corrupt or re-verify without touching the shared package."""
    shutil.copytree(package, destination)
    return destination


class RecordingBackend:
    """Wraps a backend and records (stage name, batch size of every fed tensor) per call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, set[int]]] = []

    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((stage.name, {len(v) for v in feeds.values()}))
        return self.inner.run(stage, feeds)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def run_executor(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray) -> None:
        """None: the engine then runs stage by stage, through `run`, which records."""
        return None


@contextmanager
def recording(engine: Engine) -> Iterator[RecordingBackend]:
    recorder = RecordingBackend(engine.backend)
    engine.backend = recorder
    try:
        yield recorder
    finally:
        engine.backend = recorder.inner


# --------------------------------------------------------------------------- #
# Plugin ops
# --------------------------------------------------------------------------- #


def plugin_model(op: str, inputs: dict[str, np.ndarray], rank_out: int, opset: int = 18,
                 **attrs: Any) -> onnx.ModelProto:
    """A model of one `dync::op` node (emitted through the registry) reading `inputs` (dynamic shapes, their
    dtypes) and writing `out`; runtimes run it through `dync.plugins.splice`."""
    import onnx_graphsurgeon as gs

    from dync.graph import Builder
    from dync.plugins import registry

    graph_inputs = [gs.Variable(name, dtype=value.dtype, shape=[None] * value.ndim) for name, value in inputs.items()]
    out = gs.Variable("out", dtype=np.float32, shape=[None] * rank_out)
    nodes: list[gs.Node] = []
    registry().get(op).emit(Builder(nodes, ""), graph_inputs, out, name=op, **attrs)
    graph = gs.Graph(nodes=nodes, inputs=graph_inputs, outputs=[out], opset=opset)
    return gs.export_onnx(graph)


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Check `model` fully, run it in onnxruntime, return its one output."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def rehash(package: Path) -> None:
    """Record the current size and SHA-256 of the files the manifest lists, as a package whose stages were
    edited together with its file list would carry: load then accepts the edited stages, so what comes after
    the integrity check (lint, verification, onnxruntime) is what a test sees."""
    import json

    from dync.package import MANIFEST_FILE, file_record
    from dync.records import to_json

    raw = json.loads((package / MANIFEST_FILE).read_text())
    raw["files"] = {path: to_json(file_record(package / path)) for path in raw.get("files", {})}
    (package / MANIFEST_FILE).write_text(json.dumps(raw))
