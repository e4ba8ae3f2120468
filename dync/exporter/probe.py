"""Learn every intermediate tensor's shape, dtype, and whether it is batched, by running the graph.

Static shape inference cannot always tell whether a tensor's first axis is the batch (a Reshape to
`[-1, C]`, a Shape-derived constant). Running the full graph at two batch sizes answers it exactly: a tensor
is batched when its first axis equals the batch in both runs. Only batched tensors may be carried between
stages, because compaction indexes them by sample.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from polygraphy import constants
from polygraphy.backend.onnx import modify_outputs

from dync.errors import CaptureError
from dync.graph import source_line
from dync.inputs import random_inputs
from dync.package import TensorSpec
from dync.runtime.backends.ort import ORT_ERRORS

PROBE_BATCHES = (2, 3)


@dataclass
class Probe:
    """Per-tensor facts from running the graph; `shapes` are at batch PROBE_BATCHES[0]."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    batched: set[str]

    def per_sample_shape(self, name: str) -> list[int]:
        assert name in self.batched, f"{name} is not batched"
        return list(self.shapes[name][1:])


def probe_graph(model: onnx.ModelProto, inputs: Sequence[TensorSpec]) -> Probe:
    """Run `model` with every tensor marked as an output, at two batch sizes, on random data like `inputs`."""
    session = every_tensor_session(model)
    names = [o.name for o in session.get_outputs()]
    runs, feeds = [], {}
    for seed, batch in enumerate(PROBE_BATCHES):
        feeds = random_inputs(inputs, batch, seed)
        try:
            runs.append({**feeds, **dict(zip(names, session.run(names, feeds), strict=True))})
        except ORT_ERRORS as exc:
            raise _refused(model, batch, exc) from exc
    first, second = runs
    batched = {name for name in first if _follows_batch(np.shape(first[name]), np.shape(second[name]))}
    shapes = {name: tuple(np.shape(value)) for name, value in first.items()}
    dtypes = {name: np.asarray(value).dtype for name, value in first.items()}
    return Probe(shapes=shapes, dtypes=dtypes, batched=batched)


def every_tensor_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session of `model` with every tensor an output and no graph optimization, so that each tensor is the
    captured graph's own."""
    marked = modify_outputs(model, outputs=constants.MARK_ALL, copy=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(marked.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _follows_batch(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> bool:
    b1, b2 = PROBE_BATCHES
    return (
        len(shape_a) >= 1
        and len(shape_a) == len(shape_b)
        and shape_a[0] == b1
        and shape_b[0] == b2
        and shape_a[1:] == shape_b[1:]
    )


def _refused(model: onnx.ModelProto, batch: int, exc: Exception) -> CaptureError:
    """The captured graph does not run at `batch`: name the node onnxruntime blamed and its source line."""
    text = str(exc)
    blamed = re.search(r"Node \(([^)]*)\)", text)
    node = next((n for n in model.graph.node if blamed and n.name == blamed.group(1)), None)
    where = "" if node is None else f" at {node.op_type} node '{node.name}'" + (
        f" ({source_line(node)})" if source_line(node) else "")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return CaptureError(
        f"the captured graph does not run at batch {batch}{where} ({first}); the forward most likely fixes the "
        "batch size there: compute it from x.shape[0] with integer arithmetic or let view/reshape infer it with -1."
    )
