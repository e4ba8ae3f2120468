"""Measure, per lowered block, the mask density above which dense execution beats the row form.

The model is lowered with every block in its `If` form; each block is cut out (inputs: block input,
shortcut, the masker's bool decision; the crossover constant turned into an input so one session can run
either branch) and timed at batch 1 in
onnxruntime under the package's session options: dense once, the row form at a grid of densities, all
interleaved. The crossover is where the row form's time, interpolated linearly, reaches the dense time.
Measured on the exporting machine; thread count and CPU move it, so it is a property of the package build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.exporter.passes.spatial.lower import lower_masked_bottlenecks
from dync.exporter.passes.spatial.rows import CROSSOVER_SUFFIX
from dync.graph import export_graph, import_graph
from dync.timing import median_times, onnx_session

if TYPE_CHECKING:
    from dync.runtime.backends.ort import OrtSettings

DENSITIES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
DENSE, SPARSE = -1.0, 2.0  # crossover inputs that force the dense branch / the row form
MEASURING = 0.5  # any crossover below 1 gives every block its If and crossover constant
CROSSOVER_INPUT = "crossover"


def measure_crossovers(
    model: onnx.ModelProto,
    settings: OrtSettings | None = None,
    repeats: int = 7,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """`{block: crossover density}` for every block of the (not yet lowered) `model` the pass can lower."""
    lowered, reports = lower_masked_bottlenecks(model, "portable", MEASURING)
    blocks = [r for r in reports if r.lowered]
    if blocks:
        progress(f"measuring the dense/sparse crossover of {len(blocks)} masked bottleneck(s) with onnxruntime")
    crossovers = {}
    for report in blocks:
        session = onnx_session(block_model(lowered, report.node, report.inputs, report.output), settings)
        times = _block_times(session, report.inputs[-1], repeats)
        crossovers[report.node] = crossing(DENSITIES, [times[d] for d in DENSITIES], times["dense"])
        when = ("always runs the row form" if crossovers[report.node] >= 1.0
                else f"runs dense above {crossovers[report.node]:.0%} mask density")
        progress(f"masked bottleneck {report.node}: {when} (row form at 25%: {times['dense'] / times[0.25]:.2f}x "
                 "dense)")
    return crossovers


def _block_times(session: object, decision: str, repeats: int) -> dict[object, float]:
    """Median seconds of the cut-out block: dense, and the row form at each of DENSITIES."""
    rng = np.random.default_rng(0)
    feeds = {i.name: _random_input(i, rng) for i in session.get_inputs() if i.name != CROSSOVER_INPUT}
    variants = {"dense": _runner(session, feeds, DENSE)}
    for density in DENSITIES:
        masked = {**feeds, decision: _decision(feeds[decision].shape, density, rng)}
        variants[density] = _runner(session, masked, SPARSE)
    return median_times(variants, repeats=repeats, opening_seconds=0.0)  # one opening call: it runs in every export


def crossing(densities: Sequence[float], sparse: Sequence[float], dense: float) -> float:
    """The density where `sparse` (times at increasing `densities`) first reaches `dense`, interpolated."""
    previous_density, previous_time = 0.0, None
    for density, time in zip(densities, sparse, strict=True):
        if time >= dense:
            if previous_time is None:
                return 0.0
            return previous_density + (density - previous_density) * (dense - previous_time) / (time - previous_time)
        previous_density, previous_time = density, time
    return 1.0


def block_model(model: onnx.ModelProto, name: str, inputs: Sequence[str], output: str) -> onnx.ModelProto:
    """The lowered block `name` alone, with its crossover constant as a scalar input."""
    graph = import_graph(model)
    tensors = graph.tensors()
    threshold = gs.Variable(CROSSOVER_INPUT, np.float32, [])
    for node in graph.nodes:
        node.inputs = [threshold if t.name == f"{name}/{CROSSOVER_SUFFIX}" else t for t in node.inputs]
    graph.inputs = [tensors[i] for i in dict.fromkeys(inputs)] + [threshold]
    graph.outputs = [tensors[output]]
    graph.cleanup().toposort()
    return export_graph(graph, like=model)


def _random_input(value: object, rng: np.random.Generator) -> np.ndarray:
    """Batch-1 data for a block input: nonnegative floats (block inputs follow a Relu), or a bool decision."""
    shape = [1, *value.shape[1:]]
    if value.type == "tensor(bool)":
        return np.ones(shape, bool)
    return np.abs(rng.standard_normal(shape)).astype(np.float32)


def _decision(shape: Sequence[int], density: float, rng: np.random.Generator) -> np.ndarray:
    """A bool map with exactly `round(density * cells)` true cells, at random places."""
    cells = int(np.prod(shape))
    flat = np.zeros(cells, bool)
    flat[rng.permutation(cells)[: round(density * cells)]] = True
    return flat.reshape(shape)


def _runner(session: object, feeds: dict[str, np.ndarray], threshold: float) -> Callable[[], object]:
    feeds = {**feeds, CROSSOVER_INPUT: np.array(threshold, np.float32)}
    return lambda: session.run(None, feeds)
