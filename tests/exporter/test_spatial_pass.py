"""The spatial lowering pass: exact against eager on masked bottlenecks, ineligible blocks left dense."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
from torch import nn

import dync
from dync.exporter.passes import LoweringReport, SpatialLoweringError, lower_masked_bottlenecks
from dync.verify import verify
from tests.helpers import assert_close, eager_outputs, random_input
from tests.zoo import init_like_trained
from tests.zoo_spatial import SPATIAL_ZOO, MaskedBottleneck, force_masks

DENSITIES = (0.0, 0.25, 1.0)


def _block(cin: int, mid: int, cout: int, seed: int = 0, **kwargs: object) -> MaskedBottleneck:
    torch.manual_seed(seed)
    block = MaskedBottleneck(cin, mid, cout, **kwargs)
    init_like_trained(block)
    return block.eval()


def _halo_sensitive() -> MaskedBottleneck:
    """bn1's shift raised so relu(bias1) > 0: conv2 reading it instead of zero padding would be visible."""
    block = _block(16, 8, 16, patch=2)
    with torch.no_grad():
        block.bn1.bias += 1.0
    return block


ELIGIBLE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "patch2_8x8": (lambda: _block(32, 8, 32, patch=2), (32, 8, 8)),
    "patch3_odd_9x9": (lambda: _block(16, 8, 16, patch=3), (16, 9, 9)),
    "patch2_rect_8x12": (lambda: _block(16, 8, 16, patch=2), (16, 8, 12)),
    "patch1_no_resize": (lambda: _block(16, 8, 16, patch=1), (16, 6, 6)),
    "projection_shortcut": (lambda: _block(16, 8, 32, patch=2), (16, 8, 8)),
    "halo_sensitive": (_halo_sensitive, (16, 8, 8)),
}

INELIGIBLE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "stride2": (SPATIAL_ZOO["lasnet_block_s2_odd"][0], (32, 15, 15), "strides"),
    "grid_not_dividing": (lambda: _block(16, 8, 16, mask_size=3), (16, 10, 10), "does not divide"),
    "two_mask_groups": (lambda: _block(16, 8, 16, patch=2, mask_groups=2), (16, 8, 8), "mask"),
}


def _export(model: nn.Module, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    x = torch.from_numpy(random_input(sample_shape, 2, seed=1))
    program = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["input"],
        verbose=False,
    )
    return program.model_proto


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _assert_exact(model: nn.Module, lowered: onnx.ModelProto, sample_shape: tuple[int, ...], what: str) -> None:
    """Batch 1 and batch 3 (masks differ per sample), against eager."""
    for batch in (1, 3):
        x = random_input(sample_shape, batch, seed=batch)
        assert_close(_run(lowered, x), eager_outputs(model, x)[0], what=f"{what}, batch {batch}")


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _padded_3x3_convs(model: onnx.ModelProto) -> int:
    """Dense 3x3 convs with padding 1: the ones the lowering replaces by unpadded convs on patches."""
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "Conv" and list(oh.get_node_attr_value(node, "pads") or []) == [1, 1, 1, 1]
    )


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("name", list(ELIGIBLE))
def test_eligible_block_is_lowered_and_exact(name: str, density: float) -> None:
    factory, shape = ELIGIBLE[name]
    model = factory()
    force_masks(model, density, per_sample=True)
    exported = _export(model, shape)
    lowered, reports = lower_masked_bottlenecks(exported)
    onnx.checker.check_model(lowered)
    assert [r.lowered for r in reports] == [True], reports
    ops = _ops(lowered)
    assert ops["GatherND"] >= 1 and ops["ScatterND"] == 1 and ops["NonZero"] == 1
    assert _padded_3x3_convs(exported) == 1 and _padded_3x3_convs(lowered) == 0
    assert [i.name for i in lowered.graph.input] == [i.name for i in exported.graph.input]
    assert lowered.graph.output[0] == exported.graph.output[0]  # name, shape and dynamic batch dim
    _assert_exact(model, lowered, shape, f"{name} at density {density}")


@pytest.mark.parametrize("name", list(INELIGIBLE))
def test_ineligible_block_is_reported_and_left_dense(name: str) -> None:
    factory, shape, reason = INELIGIBLE[name]
    model = factory()
    force_masks(model, 0.25, per_sample=True)
    exported = _export(model, shape)
    lowered, reports = lower_masked_bottlenecks(exported)
    assert len(reports) == 1 and not reports[0].lowered, reports
    assert reason in reports[0].reason and reports[0].node in {n.name for n in exported.graph.node}
    assert _ops(lowered) == _ops(exported)
    _assert_exact(model, lowered, shape, name)


@pytest.fixture(scope="module", params=DENSITIES)
def cifar(request: pytest.FixtureRequest) -> tuple[nn.Module, tuple[int, ...], onnx.ModelProto, list[LoweringReport]]:
    factory, shape = SPATIAL_ZOO["lasnet_cifar"]
    torch.manual_seed(0)
    model = factory()
    force_masks(model, request.param, per_sample=True)
    exported = _export(model, shape[1:])
    return model, shape[1:], *lower_masked_bottlenecks(exported)


def test_lasnet_cifar_lowers_the_stride1_blocks(cifar: tuple) -> None:
    """Stages of 2 blocks with patches 2-2-1, stages 2 and 3 opening with a stride-2 block (left dense)."""
    _, _, lowered, reports = cifar
    assert [r.lowered for r in reports] == [True, True, False, True, False, True]
    assert [r.patch for r in reports if r.lowered] == [2, 2, 2, 1]
    assert all("strides" in r.reason for r in reports if not r.lowered)
    assert _ops(lowered)["ScatterND"] == 4


def test_lasnet_cifar_is_exact(cifar: tuple) -> None:
    model, shape, lowered, _ = cifar
    _assert_exact(model, lowered, shape, "lasnet_cifar")


def test_model_without_candidates_is_returned_unchanged() -> None:
    model = _export(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval(), (3, 8, 8))
    lowered, reports = lower_masked_bottlenecks(model)
    assert reports == [] and _ops(lowered) == _ops(model)


def test_old_opset_is_a_user_error() -> None:
    x = oh.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1])
    graph = oh.make_graph([oh.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    with pytest.raises(SpatialLoweringError, match="opset"):
        lower_masked_bottlenecks(model)


def test_export_with_lower_spatial_verifies_against_eager(tmp_path: Path) -> None:
    """The opt-in export path: the package runs gather-scatter and `verify` finds it equal to eager."""
    factory, shape = SPATIAL_ZOO["lasnet_cifar"]
    torch.manual_seed(0)
    model = factory().eval()
    force_masks(model, 0.25, per_sample=True)
    messages: list[str] = []
    package = dync.export(model, tmp_path / "lasnet.dync", input_shape=shape, lower_spatial=True,
                          progress=messages.append)
    engine = dync.load(package)
    assert engine.manifest.stages[0].ops.get("GatherND", 0) > 0
    assert sum("lowered to gather-scatter" in m for m in messages) == 4
    record = verify(engine, model, x=random_input(shape[1:], 3, seed=5))
    assert record.passed
