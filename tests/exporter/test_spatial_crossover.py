"""The crossover machinery of the spatial pass: the pure `crossing` rule, cutting one block, measuring.

Only behaviour: `measure_crossovers` runs with `repeats=1` and its values are checked for range, not size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dync.exporter.capture import capture
from dync.exporter.passes.spatial import LoweringReport, lower_masked_bottlenecks
from dync.exporter.passes.spatial.crossover import (
    CROSSOVER_INPUT,
    block_model,
    crossing,
    measure_crossovers,
)
from tests.helpers import assert_close
from zoo import random_input
from zoo.multi_exit import init_like_trained
from zoo.spatial import MaskedBottleneck, force_masks

SAMPLE_SHAPE = (16, 8, 8)


@pytest.mark.parametrize(("densities", "sparse", "dense", "expected"), [
    pytest.param((0.25, 0.5, 0.75, 1.0), (1.0, 2.0, 4.0, 6.0), 3.0, 0.625, id="crosses_between_points"),
    pytest.param((0.25, 0.5, 1.0), (1.0, 2.0, 3.0), 2.0, 0.5, id="reaches_exactly_at_a_point"),
    pytest.param((0.1, 0.5, 1.0), (1.0, 2.0, 3.0), 9.0, 1.0, id="never_crosses"),
    pytest.param((0.1, 0.5, 1.0), (5.0, 6.0, 7.0), 4.0, 0.0, id="crosses_at_the_first_point"),
    pytest.param((0.1, 0.5, 1.0), (1.0, 5.0, 2.0), 3.0, 0.3, id="first_crossing_counts"),
])
def test_crossing(densities: Sequence[float], sparse: Sequence[float], dense: float, expected: float) -> None:
    """First density where the sparse time reaches the dense one, linear from the previous point."""
    assert crossing(densities, sparse, dense) == pytest.approx(expected)


class TwoBlocks(nn.Sequential):
    """Two identity-shortcut masked blocks in a row: the second reads the first's output (a Relu)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(MaskedBottleneck(16, 8, 16, patch=2), MaskedBottleneck(16, 8, 16, patch=1))
        init_like_trained(self)
        force_masks(self.eval(), 0.25, per_sample=True)


@pytest.fixture(scope="module")
def captured() -> onnx.ModelProto:
    return capture(TwoBlocks(), torch.from_numpy(random_input(SAMPLE_SHAPE, 2, seed=1))).model


@pytest.fixture(scope="module")
def lowered(captured: onnx.ModelProto) -> tuple[onnx.ModelProto, list[LoweringReport]]:
    """TwoBlocks lowered in the portable form, each block in its If (crossover below 1)."""
    result, reports = lower_masked_bottlenecks(captured, crossover=0.5)
    assert len(reports) == 2 and all(r.lowered for r in reports), reports
    return result, reports


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: dict[str, int]) -> onnx.ModelProto:
    """`model` with intermediate tensors `{name: elem_type}` added as graph outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(n, t, None) for n, t in names.items())
    return copy


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("threshold", [-1.0, 2.0])
def test_block_model_runs_either_branch_alone(lowered: tuple[onnx.ModelProto, list[LoweringReport]], index: int,
                                              threshold: float) -> None:
    """The cut block reads (x, decision, crossover) and gives the full model's block output, dense or sparse."""
    model, reports = lowered
    block = reports[index]
    x_name, shortcut_name, decision_name = block.inputs
    assert shortcut_name == x_name  # identity shortcut: one input for both
    cut = block_model(model, block.node, block.inputs, block.output)
    onnx.checker.check_model(cut)
    ops = Counter(node.op_type for node in cut.graph.node)
    assert ops["If"] == 1 and ops["TopK"] == 0, f"the block alone, not its masker: {ops}"
    session = _session(cut)
    assert [i.name for i in session.get_inputs()] == [x_name, decision_name, CROSSOVER_INPUT]
    assert [o.name for o in session.get_outputs()] == [block.output]

    full = _with_outputs(model, {x_name: onnx.TensorProto.FLOAT, decision_name: onnx.TensorProto.BOOL,
                                 block.output: onnx.TensorProto.FLOAT})
    x = random_input(SAMPLE_SHAPE, 3, seed=3)
    *_, block_x, decision, expected = _session(full).run(None, {"input": x})
    assert decision.dtype == np.bool_ and decision.any() and not decision.all(), "a mask with some pixels, 25%"
    (got,) = session.run(None, {x_name: block_x, decision_name: decision,
                                CROSSOVER_INPUT: np.array(threshold, np.float32)})
    assert_close(got, expected, what=f"block {index} cut out, crossover {threshold}")


def test_measure_crossovers(captured: onnx.ModelProto, lowered: tuple[onnx.ModelProto, list[LoweringReport]]) -> None:
    """One density in [0, 1] per block of the unlowered model, each reported through `progress` by name."""
    _, reports = lowered
    messages: list[str] = []
    values = measure_crossovers(captured, repeats=1, progress=messages.append)
    assert list(values) == [r.node for r in reports]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values.values()), values
    assert f"crossover of {len(reports)} masked bottleneck(s)" in messages[0]
    assert len(messages) == 1 + len(reports) and all(r.node in m for r, m in zip(reports, messages[1:], strict=True))
