"""The spatial lowering pass: exact against eager, one `If` per lowered block, ineligible blocks left dense.

Numerics only, never timings. Captures are the slow part (about a second each on two cores), so each block
geometry is captured once with one copy of the block per mask density side by side (`SideBySide`), and the
exports of `lasnet_cifar` are shared by the tests of this module.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor, nn

import dync
import dync.exporter
from dync.errors import SpatialLoweringWarning
from dync.exporter.capture import Captured, capture
from dync.exporter.example import Example
from dync.exporter.passes.spatial import SpatialLoweringError, lower_masked_bottlenecks
from dync.package import Manifest
from dync.plugins.splice import decompose_custom_nodes
from dync.verify import verify
from tests.conftest import invoke
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.multi_exit import init_like_trained
from zoo.spatial import SPATIAL_ZOO, LASNetLike, MaskedBottleneck, force_masks, mask_densities

DENSITIES = (0.0, 0.25, 1.0)
CROSSOVERS = (1.0, 0.5, 0.0)  # 1.0: row form inline, no If; 0.5: If, row form at 25%; 0.0: If, dense
"""1.0: the row form runs at every density; 0.0: the dense branch runs as soon as one pixel is active."""

BATCHES = (1, 3)
PLUGIN_OPS = {"dync::GatherPatches", "dync::ScatterAddPatches"}
CIFAR_FACTORY, CIFAR_SHAPE = SPATIAL_ZOO["lasnet_cifar"]
CIFAR_SAMPLE = CIFAR_SHAPE[1:]
CIFAR_STRIDE2 = (2, 4)
"""The blocks of lasnet_cifar that open stages 2 and 3: stride 2, projection shortcut."""


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def _block(seed: int, cin: int, mid: int, cout: int, **kwargs: object) -> MaskedBottleneck:
    torch.manual_seed(seed)
    block = MaskedBottleneck(cin, mid, cout, **kwargs)
    init_like_trained(block)
    return block.eval()


def _halo_sensitive(seed: int) -> MaskedBottleneck:
    """bn1's shift raised so relu(bias1) > 0: conv2 reading conv1 of a padding pixel instead of zero shows."""
    block = _block(seed, 16, 8, 16, patch=2)
    with torch.no_grad():
        block.bn1.bias += 1.0
    return block


class SideBySide(nn.Module):
    """Copies of one block geometry (own weights), copy k forced to DENSITIES[k] with per-sample masks.

    All read the same input and each is one output: one capture covers every density, and the lowered graph
    must hold one `If` per copy.
    """

    def __init__(self, make: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(make(seed) for seed in range(len(DENSITIES)))
        for copy, density in zip(self.copies, DENSITIES, strict=True):
            force_masks(copy, density, per_sample=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [copy(x) for copy in self.copies]


ELIGIBLE: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "patch2_8x8": (lambda s: _block(s, 16, 8, 16, patch=2), (16, 8, 8)),
    "patch3_odd_9x9": (lambda s: _block(s, 16, 8, 16, patch=3), (16, 9, 9)),
    "patch2_rect_8x12": (lambda s: _block(s, 16, 8, 16, patch=2), (16, 8, 12)),
    "patch1": (lambda s: _block(s, 16, 8, 16, patch=1), (16, 6, 6)),
    "projection_shortcut": (lambda s: _block(s, 16, 8, 32, patch=2), (16, 8, 8)),
    "halo_sensitive": (_halo_sensitive, (16, 8, 8)),
    "stride2_odd_15x15": (lambda s: _block(s, 16, 8, 32, stride=2, patch=1), (16, 15, 15)),
    "grid3_not_dividing_10x10": (lambda s: _block(s, 16, 8, 16, mask_size=3), (16, 10, 10)),
    "layer_skipping": (lambda s: _block(s, 16, 8, 16, mask_size=1), (16, 8, 8)),
    "dynconv_stride2": (lambda s: _block(s, 16, 8, 32, stride=2, masker="dynconv"), (16, 16, 16)),
}
"""name -> (block factory taking a seed, sample shape)."""

PLUGIN_DENSE = {
    "stride2_odd_15x15": "the plugin form needs a 3x3 stride-1 conv2",
    "dynconv_stride2": "the plugin form needs a 3x3 stride-1 conv2",
    "grid3_not_dividing_10x10": "does not tile",
}
"""The ELIGIBLE blocks the plugin form leaves dense, and why."""


class SoftMaskedBottleneck(nn.Module):
    """A bottleneck gated by a sigmoid map, not a hard mask: skipping pixels would change its output."""

    def __init__(self, channels: int = 16, mid: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.gate = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) * torch.sigmoid(self.gate(x)) + x)


def _soft_masked() -> nn.Module:
    torch.manual_seed(0)
    model = SoftMaskedBottleneck()
    init_like_trained(model)
    return model.eval()


INELIGIBLE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "two_mask_groups": (lambda: _block(0, 16, 8, 16, patch=2, mask_groups=2), (16, 8, 8), "mask groups"),
    "soft_mask": (_soft_masked, (16, 8, 8), "not provably binary"),
}
"""name -> (factory, sample shape, words the reason must contain)."""


EXPORT_VARIANTS: dict[str, dict[str, object]] = {
    "dense": {"lower_spatial": False},
    "portable": {"spatial_crossover": 1.0},
    "plugins": {"ops": "plugins"},
    "measured": {},
}
"""The `dync.export` flags of each lasnet_cifar package the export-path tests check."""


def _cifar_model() -> nn.Module:
    torch.manual_seed(0)
    model = CIFAR_FACTORY()
    force_masks(model, 0.25, per_sample=True)
    return model


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _capture(model: nn.Module, sample_shape: Sequence[int]) -> onnx.ModelProto:
    """The graph `dync.export` lowers: the exporter's own capture (input `input`, outputs `exit{k}`)."""
    return capture(model, torch.from_numpy(random_input(sample_shape, 2, seed=1))).model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


def _assert_exact(model: nn.Module, graph: onnx.ModelProto, sample_shape: Sequence[int], what: str,
                  labels: Sequence[str] = ("",)) -> None:
    """Every output at batch 1 and batch 3 (per-sample masks differ), against eager."""
    for batch in BATCHES:
        x = random_input(sample_shape, batch, seed=batch)
        got, ref = _run(graph, x), eager_outputs(model, x)
        assert len(got) == len(ref) == len(labels)
        for label, g, r in zip(labels, got, ref, strict=True):
            assert_close(g, r, what=f"{what}{label}, batch {batch}")


def _ops(model: onnx.ModelProto | onnx.GraphProto) -> Counter[str]:
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    return Counter(node.op_type if not node.domain else f"{node.domain}::{node.op_type}" for node in graph.node)


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(oh.get_attribute_value(a) for a in node.attribute if a.name == name)


def _initializer(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))


# --------------------------------------------------------------------------- #
# Eligible and ineligible blocks
# --------------------------------------------------------------------------- #


@dataclass
class Case:
    """One block geometry at every density, captured once for the module."""

    name: str
    model: nn.Module
    sample_shape: tuple[int, ...]
    exported: onnx.ModelProto


@pytest.fixture(scope="module", params=list(ELIGIBLE))
def eligible(request: pytest.FixtureRequest) -> Case:
    make, shape = ELIGIBLE[request.param]
    model = SideBySide(make)
    return Case(request.param, model, shape, _capture(model, shape))


@pytest.mark.parametrize("crossover", CROSSOVERS)
def test_eligible_block_is_lowered_and_exact(eligible: Case, crossover: float) -> None:
    exported = eligible.exported
    lowered, reports = lower_masked_bottlenecks(exported, crossover=crossover)
    onnx.checker.check_model(lowered)
    assert [(r.lowered, r.reason, r.crossover) for r in reports] == [(True, "lowered (portable)", crossover)] * 3
    assert [r.output for r in reports] == [o.name for o in exported.graph.output]

    ifs = [node for node in lowered.graph.node if node.op_type == "If"]
    if crossover == 1.0:  # never dense: the row form inline, no If and no threshold
        assert not ifs and _ops(lowered)["ScatterND"] == len(reports)
        assert _ops(lowered)["Gemm"] - _ops(exported)["Gemm"] == 3 * len(reports)
        assert not [t for t in lowered.graph.initializer if t.name.endswith("/spatial/crossover")]
    else:
        assert sorted(node.output[0] for node in ifs) == sorted(r.output for r in reports), "one If per block"
        for node in ifs:
            assert _ops(_branch(node, "then_branch"))["Conv"] == 3, "then: the dense block"
            rows = _ops(_branch(node, "else_branch"))
            assert rows["Gemm"] == 3 and rows["ScatterND"] == 1 and rows["Conv"] == 0, rows
        for report in reports:
            assert _initializer(lowered.graph, f"{report.node}/spatial/crossover") == np.float32(crossover)
    assert _ops(lowered)["Conv"] == _ops(exported)["Conv"] - 3 * len(reports), "the block convs are gone or in If"

    assert list(lowered.graph.input) == list(exported.graph.input)
    assert list(lowered.graph.output) == list(exported.graph.output)  # names, shapes, dynamic batch, metadata
    _assert_exact(eligible.model, lowered, eligible.sample_shape, f"{eligible.name}, crossover {crossover}",
                  [f" at density {d}" for d in DENSITIES])


@pytest.mark.parametrize("crossover", CROSSOVERS)
def test_crossover_picks_the_branch(eligible: Case, crossover: float) -> None:
    """With conv3 of every row form broken, an output stays exact exactly where the dense branch (or no row) runs.

    An empty mask has no row to compute, so it is exact either way; crossover 0.0 runs any other mask dense,
    0.5 the masks above half density, and 1.0 none.
    """
    lowered, _ = lower_masked_bottlenecks(eligible.exported, crossover=crossover)
    graphs = [lowered.graph, *(a.g for n in lowered.graph.node if n.op_type == "If" for a in n.attribute
                               if a.name == "else_branch")]
    weights = [t for g in graphs for t in g.initializer if t.name.endswith("/rows/conv3_weight")]
    assert len(weights) == 3
    for weight in weights:
        weight.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(weight), weight.name))
    x = random_input(eligible.sample_shape, 3, seed=3)
    got, ref = _run(lowered, x), eager_outputs(eligible.model, x)
    for copy, g, r in zip(eligible.model.copies, got, ref, strict=True):
        (density,) = mask_densities(copy, torch.from_numpy(x))
        if density > crossover or density == 0.0:
            assert_close(g, r, what=f"mask density {density}, crossover {crossover}")
        else:
            assert not np.allclose(g, r, atol=1e-3), f"mask density {density}: the row form did not run"


def test_plugin_form_lowers_tiling_stride1_blocks(eligible: Case) -> None:
    """`ops="plugins"`: stride-1 3x3 blocks whose mask tiles the output; decomposed, exact in onnxruntime."""
    lowered, reports = lower_masked_bottlenecks(eligible.exported, ops="plugins")
    reason = PLUGIN_DENSE.get(eligible.name)
    if reason is None:
        assert [(r.lowered, r.reason) for r in reports] == [(True, "lowered (plugins)")] * 3
        assert _ops(lowered)["dync::GatherPatches"] == _ops(lowered)["dync::ScatterAddPatches"] == 3
    else:
        assert all(not r.lowered and reason in r.reason for r in reports), reports
        assert _ops(lowered) == _ops(eligible.exported)
    _assert_exact(eligible.model, decompose_custom_nodes(lowered), eligible.sample_shape,
                  f"{eligible.name}, plugins decomposed", [f" at density {d}" for d in DENSITIES])


@pytest.mark.parametrize("name", list(INELIGIBLE))
def test_ineligible_block_is_reported_and_left_dense(name: str) -> None:
    make, shape, reason = INELIGIBLE[name]
    model = make()
    force_masks(model, 0.25, per_sample=True)
    exported = _capture(model, shape)
    lowered, reports = lower_masked_bottlenecks(exported)
    assert len(reports) == 1 and not reports[0].lowered, reports
    assert reason in reports[0].reason, reports[0].reason
    assert reports[0].node in {n.name for n in exported.graph.node} and reports[0].crossover is None
    assert _ops(lowered) == _ops(exported)
    _assert_exact(model, lowered, shape, name)


# --------------------------------------------------------------------------- #
# lasnet_cifar: both forms of the pass, and the export path
# --------------------------------------------------------------------------- #


class CifarPackages:
    """lasnet_cifar exported once per variant, on first request (the tests of this module share them).

    The capture, a third of an export's time, runs once: it does not depend on the lowering flags or on the
    example's values, so each export gets a fresh copy of the first one (`capture` below).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = _cifar_model()
        self.messages: dict[str, list[str]] = {}
        self.warnings: dict[str, list[str]] = {}
        self._captured: Captured | None = None
        self._done: dict[str, Path] = {}

    def capture(self, model: nn.Module, example: Example, exits: Sequence[int] | None = None,
                outputs: Sequence[str] | None = None) -> Captured:
        """`dync.exporter.capture` of `self.model`, run once; a copy each call, since export replaces its model."""
        assert model is self.model and exits is None and outputs is None
        if self._captured is None:
            self._captured = capture(model, example, exits)
        proto = onnx.ModelProto()
        proto.CopyFrom(self._captured.model)
        return dataclasses.replace(self._captured, model=proto, exit_names=list(self._captured.exit_names))

    def get(self, variant: str) -> Path:
        if variant not in self._done:
            messages = self.messages.setdefault(variant, [])
            with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SpatialLoweringWarning)
                patch.setattr(dync.exporter, "capture", self.capture)
                self._done[variant] = dync.export(self.model, self.root / f"{variant}.dync",
                                                  input_shape=CIFAR_SHAPE, progress=messages.append,
                                                  **EXPORT_VARIANTS[variant])
            self.warnings[variant] = [str(w.message) for w in caught if w.category is SpatialLoweringWarning]
        return self._done[variant]

    def verified(self, variant: str) -> Manifest:
        """Check the package against eager with `dync.verify` (onnxruntime); returns the manifest."""
        engine = dync.load(self.get(variant))
        record = verify(engine, self.model, x=random_input(CIFAR_SAMPLE, 3, seed=5))
        assert record.passed, record
        return engine.manifest


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> CifarPackages:
    return CifarPackages(tmp_path_factory.mktemp("spatial_packages"))


@pytest.fixture(scope="module")
def cifar(packages: CifarPackages) -> tuple[nn.Module, onnx.ModelProto]:
    """lasnet_cifar at 25% density, per-sample masks, captured once (the capture its packages share)."""
    example = torch.from_numpy(random_input(CIFAR_SAMPLE, 2, seed=1))
    return packages.model, packages.capture(packages.model, example).model


def test_lasnet_cifar_portable_lowers_every_block(cifar: tuple[nn.Module, onnx.ModelProto]) -> None:
    """Both stride-2 projection blocks included; a per-block crossover reaches its block only."""
    model, exported = cifar
    first = lower_masked_bottlenecks(exported)[1][0].node
    lowered, reports = lower_masked_bottlenecks(exported, crossover={first: 0.0})
    assert len(reports) == 6 and all(r.lowered for r in reports), reports
    assert _ops(lowered)["If"] == 1 and _ops(lowered)["ScatterND"] == 5, "only the first block keeps the If"
    assert [r.crossover for r in reports] == [0.0] + [1.0] * 5
    assert float(_initializer(lowered.graph, f"{first}/spatial/crossover")) == 0.0
    _assert_exact(model, lowered, CIFAR_SAMPLE, "lasnet_cifar portable")


def test_lasnet_cifar_plugins_lowers_the_stride1_blocks(cifar: tuple[nn.Module, onnx.ModelProto]) -> None:
    """The plugin form takes stride-1 3x3 blocks only; onnxruntime runs its decomposition exactly."""
    model, exported = cifar
    lowered, reports = lower_masked_bottlenecks(exported, ops="plugins")
    assert [r.lowered for r in reports] == [k not in CIFAR_STRIDE2 for k in range(6)], reports
    for k in CIFAR_STRIDE2:
        assert "the plugin form needs a 3x3 stride-1 conv2" in reports[k].reason, reports[k]
    assert all(r.reason == "lowered (plugins)" and r.crossover is None for r in reports if r.lowered)
    ops = _ops(lowered)
    assert ops["dync::GatherPatches"] == ops["dync::ScatterAddPatches"] == 4, ops
    assert ops["If"] == 0
    for node in (n for n in lowered.graph.node if n.domain == "dync"):
        attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_version"] and "plugin_namespace" in attrs, (node.name, attrs)
    assert "dync" in {o.domain for o in lowered.opset_import}

    portable = decompose_custom_nodes(lowered)
    assert not any(n.domain == "dync" for n in portable.graph.node)
    assert "dync" not in {o.domain for o in portable.opset_import}
    _assert_exact(model, portable, CIFAR_SAMPLE, "lasnet_cifar plugins, decomposed")


# --------------------------------------------------------------------------- #
# Whole-model errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("crossover", [1.5, -0.1, float("nan")])
def test_crossover_outside_0_1_is_a_user_error(cifar: tuple[nn.Module, onnx.ModelProto], crossover: float) -> None:
    with pytest.raises(SpatialLoweringError, match=str(crossover)):
        lower_masked_bottlenecks(cifar[1], crossover=crossover)
    with pytest.raises(SpatialLoweringError, match=str(crossover)):
        lower_masked_bottlenecks(cifar[1], crossover={"no such block": 0.5, "node_relu_3": crossover})


def test_export_rejects_a_bad_crossover_before_capturing(tmp_path: Path) -> None:
    model = SPATIAL_ZOO["lasnet_block"][0]()
    with pytest.raises(SpatialLoweringError, match=r"2\.0"):
        dync.export(model, tmp_path / "bad.dync", input_shape=(2, 64, 16, 16), spatial_crossover=2.0,
                    progress=lambda message: pytest.fail(f"export got as far as: {message}"))
    assert not (tmp_path / "bad.dync").exists()


def test_model_without_candidates_is_returned_unchanged() -> None:
    model = _capture(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval(), (3, 8, 8))
    lowered, reports = lower_masked_bottlenecks(model)
    assert reports == [] and _ops(lowered) == _ops(model)
    assert list(lowered.graph.output) == list(model.graph.output)


def _relu_model(opset: int) -> onnx.ModelProto:
    x = oh.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1])
    graph = oh.make_graph([oh.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


@pytest.mark.parametrize(("opset", "ops", "words"), [
    (13, "portable", "opset >= 16"),
    (17, "triton", "Unknown spatial ops form 'triton'"),
])
def test_whole_model_errors(opset: int, ops: str, words: str) -> None:
    with pytest.raises(SpatialLoweringError, match=words):
        lower_masked_bottlenecks(_relu_model(opset), ops=ops)


# --------------------------------------------------------------------------- #
# The export path
# --------------------------------------------------------------------------- #


def test_export_portable_verifies(packages: CifarPackages) -> None:
    manifest = packages.verified("portable")
    assert [(b.lowered, b.crossover) for b in manifest.records("spatial")] == [(True, 1.0)] * 6
    assert manifest.custom_ops == []
    assert sum(s.ops.get("ScatterND", 0) for s in manifest.stages) == 6, "crossover 1.0: row forms inline"
    assert sum(s.ops.get("If", 0) for s in manifest.stages) == 0
    assert manifest.full_macs == dync.load(packages.get("dense")).manifest.full_macs, "MACs of the dense model"
    assert packages.warnings["portable"] == []


def test_export_without_lowering_records_nothing(packages: CifarPackages) -> None:
    manifest = dync.load(packages.get("dense")).manifest
    assert manifest.records("spatial") == [] and manifest.custom_ops == []
    assert sum(s.ops.get("If", 0) for s in manifest.stages) == 0


def test_export_plugins_verifies(packages: CifarPackages) -> None:
    """onnxruntime runs the package through the decomposition of its `dync::` nodes."""
    manifest = packages.verified("plugins")
    assert {o.op for o in manifest.custom_ops} == PLUGIN_OPS
    assert [b.lowered for b in manifest.records("spatial")] == [k not in CIFAR_STRIDE2 for k in range(6)]
    assert all(b.crossover is None for b in manifest.records("spatial"))
    dense = [b.node for b in manifest.records("spatial") if not b.lowered]
    assert [[node in w for node in dense] for w in packages.warnings["plugins"]] == [[True, False], [False, True]], \
        "one SpatialLoweringWarning per block left dense, naming it"
    assert sum(s.ops.get(op, 0) for s in manifest.stages for op in PLUGIN_OPS) == 8
    assert manifest.full_macs == dync.load(packages.get("dense")).manifest.full_macs


def test_default_export_measures_crossovers(packages: CifarPackages) -> None:
    """`spatial_crossover=None`: each block's measured density is recorded and written into its If's threshold."""
    manifest = packages.verified("measured")
    assert len(manifest.records("spatial")) == 6 and all(b.lowered for b in manifest.records("spatial"))
    assert all(0.0 <= b.crossover <= 1.0 for b in manifest.records("spatial")), manifest.records("spatial")
    stage = onnx.load(packages.get("measured") / manifest.stages[0].onnx)
    for block in manifest.records("spatial"):
        assert _initializer(stage.graph, f"{block.node}/spatial/crossover") == np.float32(block.crossover)
    assert any("crossover" in m for m in packages.messages["measured"])


class TwoExits(nn.Module):
    """Exit 0 after one masked block, exit 1 after two more (stride 2, then stride 1): stage 1's blocks read
    stage 0's state from inside their `If` (portable) or through `dync::` nodes (plugins)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.block0 = MaskedBottleneck(16, 8, 16, patch=2)
        self.block1 = MaskedBottleneck(16, 8, 32, stride=2, patch=1)
        self.block2 = MaskedBottleneck(32, 8, 32, patch=2)
        self.head0, self.head1 = nn.Linear(16, 10), nn.Linear(32, 10)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.block0(self.stem(x))
        return [self.head0(h.mean((2, 3))), self.head1(self.block2(self.block1(h)).mean((2, 3)))]


@pytest.mark.parametrize(("ops", "lowered"), [("portable", [True, True, True]), ("plugins", [True, False, True])])
def test_multi_exit_export_verifies(tmp_path: Path, ops: str, lowered: list[bool]) -> None:
    """Every exit path and the compacted mixed run match eager when lowered blocks sit in a later stage."""
    torch.manual_seed(0)
    model = TwoExits()
    init_like_trained(model)
    force_masks(model.eval(), 0.25, per_sample=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpatialLoweringWarning)
        package = dync.export(model, tmp_path / "two_exits.dync", input_shape=(2, 3, 16, 16), ops=ops,
                              spatial_crossover=1.0)
    engine = dync.load(package)
    manifest = engine.manifest
    assert [b.lowered for b in manifest.records("spatial")] == lowered
    assert sum(w.category is SpatialLoweringWarning for w in caught) == lowered.count(False)
    assert len(manifest.stages) == 2 and manifest.stages[1].reads != ["input"]
    if ops == "portable":
        assert [s.ops.get("ScatterND", 0) for s in manifest.stages] == [1, 2]
    else:
        assert [s.ops.get("dync::GatherPatches", 0) for s in manifest.stages] == [1, 1]
    record = verify(engine, model, x=random_input((3, 16, 16), 6, seed=2))
    assert record.passed and all(record.mixed_exit_counts), record


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #


def _small_lasnet() -> nn.Module:
    """Two stride-1 masked blocks on 8x8: quick to export from a file."""
    torch.manual_seed(0)
    return LASNetLike(stem_channels=8, stages=((8, 16, 2, 1),), patches=(2,), calib_size=8)


@pytest.fixture(scope="module")
def small_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spatial_cli") / "small_lasnet.pt"
    torch.save(_small_lasnet(), path)
    return path


def test_cli_export_with_a_fixed_crossover(small_model_path: Path) -> None:
    package = small_model_path.with_suffix(".dync")
    result = invoke(["export", small_model_path, "-o", package, "--input-shape", "2x3x8x8",
                     "--spatial-crossover", "0.5"])
    assert result.exit_code == 0, result.output
    assert "masked bottleneck" in result.stderr
    manifest = json.loads(invoke(["inspect", package, "--json"]).stdout)
    assert [(b["lowered"], b["crossover"]) for b in manifest["spatial"]] == [(True, 0.5)] * 2
    text = invoke(["inspect", package]).stdout
    assert "masked bottlenecks: 2 of 2 lowered" in text
    assert "mask density is above 50%" in text
    assert invoke(["verify", package, "--model", small_model_path, "--batch", "3"]).exit_code == 0


@pytest.mark.parametrize("value", ["2", "-0.1", "half"])
def test_cli_rejects_a_bad_crossover(small_model_path: Path, value: str) -> None:
    result = invoke(["export", small_model_path, "-o", small_model_path.parent / "bad.dync",
                     "--spatial-crossover", value])
    assert result.exit_code != 0
    assert f"'{value}'" in result.output and "--spatial-crossover" in result.output, result.output
    assert not (small_model_path.parent / "bad.dync").exists()



class _ScaledResidual(nn.Module):
    """NF-ResNet's join, `relu(conv(x) * gain + x)`: a Mul by a constant scales a residual and masks nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x) * 0.2 + x).mean((2, 3))


def test_a_residual_scaled_by_a_constant_is_no_candidate(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpatialLoweringWarning)
        package = dync.export(_ScaledResidual().eval(), tmp_path / "nf.dync", input_shape=(2, 4, 8, 8))
    assert dync.load(package).manifest.records("spatial") == []
