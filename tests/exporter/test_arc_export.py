"""ARC look-alikes through `dync.export`: the batch-folded grouped conv is recognized during capture, the
package takes any batch and equals eager; the rotation matrix matches hand-computed values; a batch-dependent
conv that does not fit the pattern is a CaptureError naming the module."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dync
from dync.errors import CaptureError, SpatialLoweringWarning
from dync.exporter import rewrites
from dync.plugins.splice import decompose_custom_nodes
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.arc import ARC_ZOO, rotation_matrix

W_EDGE_SELF = math.sqrt(2) / 2 * (1 - math.sqrt(2) / 2)  # cos45 (1 - sin45) = 0.2071...
W_EDGE_CORNER = 0.5  # cos45 sin45
W_EDGE_CENTRE = (1 - math.sqrt(2) / 2) ** 2  # 0.0858...


def _export(name: str, tmp_path: Path) -> tuple[torch.nn.Module, dync.runtime.engine.Engine]:
    factory, shape = ARC_ZOO[name]
    torch.manual_seed(0)
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpatialLoweringWarning)  # no pass mistakes the rotation's blends for masks
        package = dync.export(model, tmp_path / f"{name}.dync", input_shape=shape)
    return model, dync.load(package)


@pytest.mark.parametrize("name", sorted(ARC_ZOO))
def test_arc_package_takes_any_batch_and_equals_eager(name: str, tmp_path: Path) -> None:
    model, engine = _export(name, tmp_path)
    _, shape = ARC_ZOO[name]
    assert engine.manifest.stages[0].ops.get("dync::PerSampleConv2d", 0) >= 1
    assert [op.op for op in engine.manifest.custom_ops] == ["dync::PerSampleConv2d"]
    stage = onnx.load(tmp_path / f"{name}.dync" / engine.manifest.stages[0].onnx)
    portable = session_from_onnx(decompose_custom_nodes(stage), OrtSettings())
    for batch in (1, 3, 7):  # 7 was never seen at export (which runs at 2 and probes at 2 and 3)
        x = random_input(shape[1:], batch, seed=batch)
        reference = eager_outputs(model, x)[-1]
        assert_close(engine.run(x).logits, reference, what=f"{name}, batch {batch}, specialized")
        assert_close(portable.run(None, {"input": x})[0], reference, what=f"{name}, batch {batch}, decomposed")


def test_macs_count_the_per_sample_convs(tmp_path: Path) -> None:
    """The plugin node is charged like the conv it replaces (flop_counter: 2 FLOPs per MAC, batch 1)."""
    model, engine = _export("arc_conv", tmp_path)
    _, shape = ARC_ZOO["arc_conv"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.from_numpy(random_input(shape[1:], 1)))
    conv_macs = counter.get_flop_counts()["Global"][torch.ops.aten.convolution] // 2
    per_sample_conv = 12 * 8 * 3 * 3 * 9 * 9  # Cout * Cin * kh * kw * H' * W' of arc_conv
    assert conv_macs >= per_sample_conv and engine.manifest.full_macs >= per_sample_conv


def test_rotation_is_the_identity_at_zero_degrees() -> None:
    torch.testing.assert_close(rotation_matrix(torch.zeros(2, 3)), torch.eye(9).expand(2, 3, 9, 9))


@pytest.mark.parametrize("sign", [1, -1])
def test_rotation_at_45_degrees_moves_corners_and_interpolates_edges(sign: int) -> None:
    """Rows are rotated taps, columns original taps (raster order 0..8, centre 4)."""
    ring = [0, 1, 2, 5, 8, 7, 6, 3]
    expected = torch.zeros(9, 9, dtype=torch.float64)
    expected[4, 4] = 1
    for position, tap in enumerate(ring):
        following, next_edge = ring[(position + sign) % 8], ring[(position + 2 * sign) % 8]
        if position % 2 == 0:
            expected[tap, following] = 1
        else:
            expected[tap, tap] = expected[tap, next_edge] = W_EDGE_SELF
            expected[tap, following] = W_EDGE_CORNER
            expected[tap, 4] = W_EDGE_CENTRE
    got = rotation_matrix(torch.tensor(sign * math.pi / 4, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert expected[1].sum() == pytest.approx(1.0)


class _TwoViews(torch.nn.Module):
    """Per-sample kernels applied to two stacked copies of the folded batch: the input batch axis is 2."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 2 * 4 * 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self.head(x.mean((2, 3))).reshape(b * 2, c, 3, 3)
        folded = x.reshape(1, b * c, h, w)
        out = F.conv2d(torch.cat([folded, folded]), weight, padding=1, groups=b)
        return out.reshape(2 * b, 2, h, w)[:b]


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.views = _TwoViews()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.views(x)


def test_unprovable_per_sample_conv_is_a_capture_error_naming_the_module(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"^module views \(_TwoViews\) calls conv2d with groups depending on "
                                           r"the batch, but its input \[2, .*\] does not hold the batch folded"):
        dync.export(_Outer().eval(), tmp_path / "bad.dync", input_shape=(2, 4, 5, 5))


def test_static_grouped_convs_pass_through_unchanged() -> None:
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2).eval()
    x = torch.randn(2, 4, 5, 5)
    with rewrites.recognize_per_sample_convs(conv):
        program = torch.export.export(conv, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in targets and "dync.per_sample_conv2d.default" not in targets
