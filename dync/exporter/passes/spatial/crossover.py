"""Measure, per lowered block, the mask density above which dense execution beats the row form.

Each block is cut out of the lowered model (inputs: block input, shortcut, the masker's bool decision; the
crossover constant turned into an input so one session can run either branch) and timed at batch 1 in
onnxruntime under the package's session options: dense once, the row form at a grid of densities, all
interleaved. The crossover is where the row form's time, interpolated linearly, reaches the dense time.
Measured on the exporting machine; thread count and CPU move it, so it is a property of the package build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dync.exporter.passes.spatial.rows import CROSSOVER_SUFFIX
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from dync.timing import median_times

DENSITIES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
DENSE, SPARSE = -1.0, 2.0  # crossover inputs that force the dense branch / the row form
CROSSOVER_INPUT = "crossover"


def measure_crossovers(
    model: onnx.ModelProto,
    blocks: Sequence[tuple[str, Sequence[str], str]],
    settings: OrtSettings | None = None,
    repeats: int = 7,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """`{block: crossover density}` for `blocks`, each `(name, (x, shortcut, decision) tensor names, output)`."""
    settings = settings or OrtSettings()
    crossovers = {}
    for name, inputs, output in blocks:
        session = session_from_onnx(block_model(model, name, inputs, output), settings)
        rng = np.random.default_rng(0)
        feeds = {i.name: _random_input(i, rng) for i in session.get_inputs() if i.name != CROSSOVER_INPUT}
        decision = next(i for i in session.get_inputs() if i.name == inputs[-1])
        variants = {"dense": _runner(session, feeds, DENSE)}
        for density in DENSITIES:
            masked = {**feeds, decision.name: _decision(feeds[decision.name].shape, density, rng)}
            variants[density] = _runner(session, masked, SPARSE)
        times = median_times(variants, repeats=repeats)
        crossovers[name] = crossing(DENSITIES, [times[d] for d in DENSITIES], times["dense"])
        progress(f"masked bottleneck {name}: runs dense above {crossovers[name]:.0%} mask density "
                 f"(row form at 25%: {times['dense'] / times[0.25]:.2f}x dense)")
    return crossovers


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


def set_crossovers(model: onnx.ModelProto, crossovers: Mapping[str, float]) -> None:
    """Write measured crossovers into the lowered model's per-block constants, in place."""
    initializers = {t.name: t for t in model.graph.initializer}
    for name, value in crossovers.items():
        tensor = initializers[f"{name}/{CROSSOVER_SUFFIX}"]
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(value, np.float32), tensor.name))


def block_model(model: onnx.ModelProto, name: str, inputs: Sequence[str], output: str) -> onnx.ModelProto:
    """The lowered block `name` alone, with its crossover constant as a scalar input."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    threshold = gs.Variable(CROSSOVER_INPUT, np.float32, [])
    for node in graph.nodes:
        node.inputs = [threshold if t.name == f"{name}/{CROSSOVER_SUFFIX}" else t for t in node.inputs]
    graph.inputs = [tensors[i] for i in dict.fromkeys(inputs)] + [threshold]
    graph.outputs = [tensors[output]]
    graph.cleanup().toposort()
    cut = gs.export_onnx(graph)
    cut.ir_version = model.ir_version
    return cut


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
