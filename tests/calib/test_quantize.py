"""`dync quantize`: per-stage calibration on the samples that reach each stage, the CPU, TensorRT and fp8 forms,
the accuracy of every exit path, plugin nodes kept, bad input refused, the op-type revert logic, the CLI, and
the TensorRT Q/DQ lint rule.

Packages are exported once per module and copied (`copy_package`) by every test that changes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import load_tensors_data
from torch import Tensor, nn

import dync
from dync.calib.calibrate import BudgetRequest, calibrate_package
from dync.calib.quantize import QuantizeRequest, format_quantization, quantize_package
from dync.calib.quantize.forms import fp8_casts
from dync.calib.quantize.selection import MEASURE_BATCH, CpuChoice, choose_cpu_form
from dync.errors import InputError, QuantizationError
from dync.layers import exit_head
from dync.lint import ERROR, RESTRICTION, lint_model, lint_package, load_operator_facts
from dync.package import MANIFEST_FILE, load_manifest, write_manifest
from dync.plugins.op_registry import DOMAIN, registry
from dync.records import QuantizationRecord
from dync.runtime.exit_rule import forcing_thresholds
from tests.conftest import invoke
from tests.helpers import copy_package, softmax_confidence
from zoo import random_input
from zoo.spatial import lasnet_cifar

QDQ = ("QuantizeLinear", "DequantizeLinear")
EXIT_TOLERANCE = {"int8": 0.1, "fp8": 0.25}
"""Max abs error of every exit path against float32, relative to the largest |float32 logit|."""
ACCURACY_DROP = 0.015
"""The most held-out top-1 accuracy an exit may lose to quantization (1.5 points)."""
FP8_E4M3_MAX = 448.0
"""The largest finite float8 e4m3fn value: fp8 scales are amax / 448."""


# --------------------------------------------------------------------------- #
# Models, packages and graph helpers
# --------------------------------------------------------------------------- #


class TwoStage(nn.Module):
    """Two exits over 1x8x8 inputs. Stage 0: conv, relu, pooled linear exit whose logit 0 is the sum of the
    pooled features (so a large input is confidently class 0, a small one is not). Stage 1 works on stage 0's
    features: conv, relu, a linear layer over each channel's pixels (a MatMul with a weight), pooled exit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.head0 = nn.Linear(8, 4)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Linear(64, 16)
        self.head1 = nn.Linear(8, 4)
        with torch.no_grad():
            self.head0.weight.zero_()
            self.head0.weight[0] = 1.0
            self.head0.bias.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.relu(self.conv0(x))
        first = self.head0(features.mean((2, 3)))
        mixed = torch.relu(self.mix(torch.relu(self.conv1(features)).flatten(2)))
        return first, self.head1(mixed.mean(2))


TWO_STAGE_THRESHOLD = 0.9
HARD_EVERY = 3
EASY_SCALE = 20.0


def two_stage_data(n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative images; every third one small ("hard", stays below the exit-0 threshold), the others
    x20 (confident at exit 0)."""
    rng = np.random.default_rng(0)
    hard = np.arange(n) % HARD_EVERY == 0
    scale = np.where(hard, 1.0, EASY_SCALE).astype(np.float32)
    return rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32) * scale[:, None, None, None], hard


@dataclass
class Digits:
    """The bundled trained digits model, its held-out split, and its float32 package, calibrated at budget 0.5."""

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    package: Path


@dataclass
class TwoStagePackage:
    model: nn.Module
    x: np.ndarray
    hard: np.ndarray
    package: Path


def nodes_of(model: onnx.ModelProto, *op_types: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in op_types]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def dequantized(model: onnx.ModelProto) -> set[str]:
    return {out for node in nodes_of(model, "DequantizeLinear") for out in node.output}


def axis_of(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def stage_graphs(package: Path) -> tuple[QuantizationRecord, list[tuple[onnx.ModelProto, onnx.ModelProto | None,
                                                                        onnx.ModelProto]]]:
    """The quantization record and, per stage, (float32 stage, CPU form or None, TensorRT form)."""
    manifest = load_manifest(package)
    record = manifest.quantization
    assert record is not None
    graphs = []
    for spec, stage in zip(manifest.stages, record.stages, strict=True):
        assert stage.stage == spec.name
        graphs.append((onnx.load(package / spec.onnx), None if stage.cpu is None else onnx.load(package / stage.cpu),
                       onnx.load(package / stage.trt)))
    return record, graphs


def amax_of(ranges: object, tensor: str) -> float:
    """max(|lowest|, |highest|) of a tensor in onnxruntime's calibration cache."""
    low, high = ranges[tensor].range_value  # type: ignore[index]
    return max(abs(float(np.ravel(low)[0])), abs(float(np.ravel(high)[0])))


def weight_user(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto:
    """The op reading the weight that a Q (of a Q/DQ pair) or DQ node quantizes."""
    consumers = {name: n for n in model.graph.node for name in n.input}
    dq = consumers[node.output[0]] if node.op_type == "QuantizeLinear" else node
    return consumers[dq.output[0]]


def source_of(model: onnx.ModelProto, tensor: str) -> str:
    """The tensor a chain of Q/DQ nodes ending in `tensor` quantizes (`tensor` itself outside such a chain)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    while tensor in producers and producers[tensor].op_type in QDQ:
        tensor = producers[tensor].input[0]
    return tensor


WEIGHT_AXIS = {"Conv": 0, "MatMul": 1}
"""The output-channel axis of each weighted op's weight, which per-channel scales run along."""


def max_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------- #
# Module fixtures: each export happens once
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    from dync.demo import load_example

    example = load_example()
    model = example.load_pretrained()
    x, y = example.load_test_split()
    package = Path(dync.export(model, tmp_path_factory.mktemp("digits") / "digits.dync", input_shape=(16, 1, 8, 8)))
    calibrate_package(dync.load(package), x, BudgetRequest(budget=0.5), labels=y)
    return Digits(model=model, x=x, y=y, package=package)


def _quantized_copy(digits: Digits, root: Path, format: str) -> Path:
    package = copy_package(digits.package, root / f"digits-{format}.dync")
    quantize_package(package, digits.x, digits.y, QuantizeRequest(format=format, measure=False))
    return package


@pytest.fixture(scope="module")
def digits_int8(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only: tests that change a quantized package copy it."""
    return _quantized_copy(digits, tmp_path_factory.mktemp("digits-int8"), "int8")


@pytest.fixture(scope="module")
def digits_fp8(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantized_copy(digits, tmp_path_factory.mktemp("digits-fp8"), "fp8")


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory) -> TwoStagePackage:
    """The two-stage model's float32 package with exit 0's threshold stored by hand."""
    torch.manual_seed(0)
    model = TwoStage().eval()
    x, hard = two_stage_data()
    package = Path(dync.export(model, tmp_path_factory.mktemp("two") / "two.dync", input_shape=(4, 1, 8, 8)))
    manifest = load_manifest(package)
    manifest.exits[0].threshold = TWO_STAGE_THRESHOLD
    write_manifest(package, manifest)
    return TwoStagePackage(model=model, x=x, hard=hard, package=package)


@pytest.fixture(scope="module")
def two_stage_quantized(two_stage: TwoStagePackage, tmp_path_factory: pytest.TempPathFactory
                        ) -> dict[str, tuple[Path, QuantizationRecord]]:
    """int8 with stage 1 calibrated on the 80 samples that reach it ("reach", min_samples 16) and on all 240
    ("all", min_samples 200 > 80)."""
    root = tmp_path_factory.mktemp("two-quantized")
    out = {}
    for name, min_samples in (("reach", 16), ("all", 200)):
        package = copy_package(two_stage.package, root / f"{name}.dync")
        record = quantize_package(package, two_stage.x, None, QuantizeRequest(min_samples=min_samples, measure=False))
        out[name] = (package, record)
    return out


@pytest.fixture(scope="module")
def spatial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LASNet-like CIFAR model exported with `dync::` plugin nodes (GatherPatches, ScatterAddPatches)."""
    torch.manual_seed(0)
    return Path(dync.export(lasnet_cifar().eval(), tmp_path_factory.mktemp("spatial") / "spatial.dync",
                            input_shape=(2, 3, 32, 32), ops="plugins"))


# --------------------------------------------------------------------------- #
# 1. Each stage is calibrated on the samples that reach it
# --------------------------------------------------------------------------- #


def test_reach_set_calibration_beats_all_sample_calibration(
        two_stage: TwoStagePackage, two_stage_quantized: dict[str, tuple[Path, QuantizationRecord]]) -> None:
    """Stage 1 sees only the small ("hard") samples that exit 0 does not take; calibrating it on those (the
    reach set) gives ranges about 20x tighter than calibrating on every sample, and a clearly smaller int8 error
    at exit 1, both for stage 1 alone on the same float inputs and end to end. The records say which samples
    calibrated each stage, and the stored ranges are those of the calibrating samples."""
    x, hard = two_stage.x, two_stage.hard
    fp32 = dync.load(two_stage.package, precision="fp32")
    first, second = fp32.manifest.stages
    confidence = softmax_confidence(fp32.backend.run(first, {"input": x})[first.exit.output])
    assert confidence[hard].max() < TWO_STAGE_THRESHOLD < confidence[~hard].min(), "the data no longer splits"
    reaching = int(hard.sum())
    assert reaching == 80

    (reach_pkg, reach), (all_pkg, everyone) = two_stage_quantized["reach"], two_stage_quantized["all"]
    for record in (reach, everyone):
        first_stage = record.stages[0]
        assert (first_stage.reaching_samples, first_stage.calibration_samples, first_stage.all_samples) \
            == (len(x), len(x), False)
    assert (reach.stages[1].reaching_samples, reach.stages[1].calibration_samples, reach.stages[1].all_samples) \
        == (reaching, reaching, False)
    assert (everyone.stages[1].reaching_samples, everyone.stages[1].calibration_samples,
            everyone.stages[1].all_samples) == (reaching, len(x), True)
    assert f"| {second.name} | {reaching} reaching |" in format_quantization(reach)
    assert f"| {second.name} | {len(x)} (all: {reaching} reach it) |" in format_quantization(everyone)

    # The stored ranges of stage 1's input are those of the calibrating samples (as the int8 stage 0 wrote them).
    (boundary,) = second.reads
    features = fp32.backend.run(first, {"input": x})[boundary]
    reach_amax = amax_of(load_tensors_data(reach_pkg / reach.stages[1].ranges), boundary)
    all_amax = amax_of(load_tensors_data(all_pkg / everyone.stages[1].ranges), boundary)
    assert reach_amax == pytest.approx(float(features[hard].max()), rel=0.1)
    assert all_amax == pytest.approx(float(features.max()), rel=0.02)
    assert all_amax > 10 * reach_amax

    # Stage 1 alone, on the float32 features of the samples that reach it.
    reference = fp32.backend.run(second, {boundary: features[hard]})[second.exit.output]
    alone = {}
    for name, (package, record) in two_stage_quantized.items():
        session = ort.InferenceSession(str(package / record.stages[1].cpu), providers=["CPUExecutionProvider"])
        alone[name] = max_rel_error(session.run([second.exit.output], {boundary: features[hard]})[0], reference)
    assert alone["reach"] < alone["all"] / 10, alone

    # End to end, every hard sample forced to exit 1 through the int8 stage 0.
    forced = forcing_thresholds(1, 2)
    reference = fp32.run(x[hard], thresholds=forced).logits
    end_to_end = {name: max_rel_error(dync.load(package).run(x[hard], thresholds=forced).logits, reference)
                  for name, (package, _) in two_stage_quantized.items()}
    assert end_to_end["reach"] < end_to_end["all"] / 3, end_to_end


# --------------------------------------------------------------------------- #
# 2. What each form holds
# --------------------------------------------------------------------------- #


def _check_cpu_int8(original: onnx.ModelProto, cpu: onnx.ModelProto) -> None:
    """uint8 activations, int8 per-channel weights on the output channels."""
    values, types = initializers(cpu), initializer_types(cpu)
    quantize = nodes_of(cpu, "QuantizeLinear")
    assert quantize and all(types[n.input[2]] == TensorProto.UINT8 for n in quantize)
    assert all(values[n.input[1]].size == 1 for n in quantize)
    weights = [n for n in nodes_of(cpu, "DequantizeLinear") if types.get(n.input[0]) == TensorProto.INT8]
    original_weights = initializers(original)
    assert len(weights) == len([n for n in nodes_of(original, *WEIGHT_AXIS) if n.input[1] in original_weights])
    for node in weights:
        weight, scale = values[node.input[0]], values[node.input[1]]
        axis = WEIGHT_AXIS[weight_user(cpu, node).op_type]
        assert axis_of(node) == axis and scale.shape == (weight.shape[axis],), node.name
        assert not values[node.input[2]].any() and types[node.input[2]] == TensorProto.INT8


def _check_trt(original: onnx.ModelProto, trt: onnx.ModelProto, zero_type: int, heads: list[str]) -> None:
    """Signed symmetric Q/DQ: zero-points 0 of `zero_type`, activations per tensor, weights per channel on
    their output axis, float biases; every weighted op outside the head reads a dequantized activation and
    weight, and the head reads none."""
    assert max(o.version for o in trt.opset_import if o.domain in ("", "ai.onnx")) >= 19
    values, types = initializers(trt), initializer_types(trt)
    original_weights = initializers(original)
    for node in nodes_of(trt, *QDQ):
        assert types[node.input[2]] == zero_type, node.name
        assert not values[node.input[2]].astype(np.float32).any(), node.name
        assert types.get(node.input[0]) != TensorProto.INT32, f"{node.name}: biases stay float"
        source = source_of(trt, node.input[0])
        if source in original_weights:
            weight, scale = original_weights[source], values[node.input[1]]
            axis = WEIGHT_AXIS[weight_user(trt, node).op_type]
            assert axis_of(node) == axis and scale.shape == (weight.shape[axis],), node.name
        else:
            assert values[node.input[1]].shape == (), f"{node.name}: activations are per tensor"
    inside = dequantized(trt)
    weighted = [n for n in nodes_of(trt, "Conv", "MatMul", "Gemm") if n.input[1] in inside or n.input[1] in values]
    assert weighted
    for node in weighted:
        if node.name in heads:
            assert not set(node.input) & inside, f"head node {node.name} reads a dequantized tensor"
        else:
            assert node.input[0] in inside and node.input[1] in inside, node.name
            assert len(node.input) < 3 or types.get(node.input[2]) == TensorProto.FLOAT, node.name


def test_forms_hold_the_quantization_each_target_takes(
        digits_int8: Path, digits_fp8: Path, two_stage_quantized: dict[str, tuple[Path, QuantizationRecord]]) -> None:
    """CPU int8: uint8 activations, int8 per-channel weights. TensorRT int8: every zero-point int8 0, scalar
    activation scales, weights per channel on axis 0 (Conv) or 1 (MatMul), float biases, opset >= 19. The
    exit heads (the record's `float_heads`, `exit_head` of each stage) read no dequantized tensor. fp8:
    float8e4m3fn zero-points, activation scales amax/448 of the stored ranges and weight scales per-channel
    max|w|/448."""
    packages = [digits_int8, two_stage_quantized["reach"][0]]
    for package in packages:
        manifest = load_manifest(package)
        record, graphs = stage_graphs(package)
        assert record.format == "int8"
        for spec, stage, (original, cpu, trt) in zip(manifest.stages, record.stages, graphs, strict=True):
            assert stage.float_heads == exit_head(original, spec.exit.output) != []
            assert "Gemm" in {n.op_type for n in original.graph.node if n.name in stage.float_heads}
            assert cpu is not None
            _check_cpu_int8(original, cpu)
            _check_trt(original, trt, TensorProto.INT8, stage.float_heads)
            assert not {name for n in cpu.graph.node if n.name in stage.float_heads for name in n.input} \
                & dequantized(cpu)
    assert any(nodes_of(trt, "MatMul") for *_, trt in stage_graphs(two_stage_quantized["reach"][0])[1])

    record, graphs = stage_graphs(digits_fp8)
    assert record.format == "fp8"
    for stage, (original, _, trt) in zip(record.stages, graphs, strict=True):
        _check_trt(original, trt, TensorProto.FLOAT8E4M3FN, stage.float_heads)
        ranges = load_tensors_data(digits_fp8 / stage.ranges)
        values, weights = initializers(trt), initializers(original)
        for node in nodes_of(trt, "QuantizeLinear"):
            scale = values[node.input[1]]
            if node.input[0] in weights:
                weight = weights[node.input[0]]
                expected = np.abs(weight.reshape(len(weight), -1)).max(axis=1) / FP8_E4M3_MAX
            else:
                expected = np.float32(amax_of(ranges, node.input[0]) / FP8_E4M3_MAX)
            np.testing.assert_allclose(scale, expected, rtol=1e-6, err_msg=node.name)


def test_quantized_heads_read_dequantized_tensors(two_stage: TwoStagePackage, tmp_path: Path) -> None:
    """`heads=True` (--quantize-heads): no node is kept in float, and each exit's Gemm reads a dequantized
    activation and weight in the TensorRT form (the contrast to the float heads above)."""
    package = copy_package(two_stage.package, tmp_path / "heads.dync")
    record = quantize_package(package, two_stage.x, None, QuantizeRequest(min_samples=16, heads=True, measure=False))
    assert record.heads and all(stage.float_heads == [] for stage in record.stages)
    for _, _, trt in stage_graphs(package)[1]:
        (gemm,) = nodes_of(trt, "Gemm")
        assert {gemm.input[0], gemm.input[1]} <= dequantized(trt)


# --------------------------------------------------------------------------- #
# 3. The fp8 CPU emulation
# --------------------------------------------------------------------------- #


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_fp8_emulation_equals_the_fp8_qdq_form(digits: Digits, digits_fp8: Path) -> None:
    """The CPU fp8 form (saturating Cast pairs, weights rounded to e4m3fn) computes what the fp8 Q/DQ form
    means: onnxruntime running the Q/DQ form without graph optimizations, stage by stage on the stages'
    real inputs (to 1e-6; with onnxruntime's optimizations, as the runtime runs it, to 1e-3: fused float
    sums differ in the last bits, which can move a value across an fp8 rounding boundary); the stored CPU
    form is `fp8_casts` of the stored TensorRT form, and holds no Q/DQ at all.
    (onnxruntime's extended-level QDQ fusions compute the fp8 Q/DQ form around Conv wrongly, 2.8x the
    output's magnitude on this model, which is why the CPU form is not the Q/DQ form; not asserted here.)"""
    manifest = load_manifest(digits_fp8)
    _, graphs = stage_graphs(digits_fp8)
    state = {"input": digits.x}
    for spec, (_, cpu, trt) in zip(manifest.stages, graphs, strict=True):
        assert cpu is not None and not nodes_of(cpu, *QDQ)
        assert nodes_of(cpu, "Cast") and nodes_of(trt, *QDQ)
        assert fp8_casts(trt).graph.SerializeToString() == cpu.graph.SerializeToString()
        feeds = {name: state[name] for name in spec.reads}
        names = [spec.exit.output, *spec.writes]
        exact = _session(trt, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(names, feeds)
        unoptimized = _session(cpu, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(names, feeds)
        optimized = _session(cpu, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(names, feeds)
        for name, want, a, b in zip(names, exact, unoptimized, optimized, strict=True):
            assert max_rel_error(a, want) <= 1e-6, f"{spec.name} {name}"
            assert max_rel_error(b, want) <= 1e-3, f"{spec.name} {name} (optimized)"
        state.update(zip(names, exact, strict=True))


# --------------------------------------------------------------------------- #
# 4. Every exit path against float32
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_every_exit_path_is_close_to_float32(digits: Digits, precision: str, request: pytest.FixtureRequest) -> None:
    """Forced to each exit, the quantized package's logits on the held-out digits are within 0.1 (int8) or
    0.25 (fp8) of the largest float32 logit, and no exit loses more than 1.5 points of top-1 accuracy (the
    fp8 exit 0 happens to gain 1.7 points on these 360 samples). The package runs at its precision by
    default, and its thresholds are the quantization record's."""
    package = request.getfixturevalue(f"digits_{precision}")
    quantized, fp32 = dync.load(package), dync.load(package, precision="fp32")
    assert quantized.precision == precision and fp32.precision == "fp32"
    record = load_manifest(package).quantization
    assert record.format == precision and record.recalibration is not None
    assert quantized.manifest.thresholds == pytest.approx(record.thresholds)
    assert record.stages[0].cpu is not None and quantized.manifest.stages[0].onnx == record.stages[0].cpu
    for k in range(quantized.num_exits):
        forced = forcing_thresholds(k, quantized.num_exits)
        got, want = quantized.run(digits.x, thresholds=forced), fp32.run(digits.x, thresholds=forced)
        assert (got.exit == k).all() and (want.exit == k).all()
        error = max_rel_error(got.logits, want.logits)
        assert 0 < error <= EXIT_TOLERANCE[precision], f"exit {k}: {error:.3g}"
        accuracy = float((got.logits.argmax(axis=1) == digits.y).mean())
        reference = float((want.logits.argmax(axis=1) == digits.y).mean())
        assert accuracy >= reference - ACCURACY_DROP, f"exit {k}: {accuracy:.2%} against {reference:.2%}"


# --------------------------------------------------------------------------- #
# 5. Static full model and the one-graph executor at int8
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_static_model_and_one_graph_match_the_stage_by_stage_run(digits: Digits, precision: str,
                                                                  request: pytest.FixtureRequest) -> None:
    """The quantized stages merged into the static full model (their quantizer-made names prefixed per stage,
    so merging does not collide) give exactly each exit of the stage-by-stage run forced to that exit; and
    the one-graph executor gives exactly the stage-by-stage executor's exits and logits on a mixed batch."""
    package = request.getfixturevalue(f"digits_{precision}")
    one_graph, stage_by_stage = dync.load(package), dync.load(package, one_graph=False)
    assert one_graph.precision == stage_by_stage.precision == precision
    for stage in load_manifest(package).quantization.stages:
        made = [n.name for n in onnx.load(package / stage.trt).graph.node if n.op_type in QDQ]
        assert made and all(name.startswith(f"{stage.stage}/") for name in made)
    static = one_graph.backend.run_static(one_graph.input_feeds(digits.x))
    assert len(static) == one_graph.num_exits
    for k, logits in enumerate(static):
        forced = stage_by_stage.run(digits.x, thresholds=forcing_thresholds(k, one_graph.num_exits)).logits
        np.testing.assert_array_equal(logits, forced, err_msg=f"exit {k}")
    mixed, reference = one_graph.run(digits.x), stage_by_stage.run(digits.x)
    assert len(np.unique(mixed.exit)) >= 3, np.bincount(mixed.exit)
    np.testing.assert_array_equal(mixed.exit, reference.exit)
    np.testing.assert_array_equal(mixed.logits, reference.logits)


# --------------------------------------------------------------------------- #
# 6. Plugin nodes stay as they are
# --------------------------------------------------------------------------- #


def _custom(model: onnx.ModelProto) -> dict[str, tuple[str, str, int, list[bytes]]]:
    return {n.name: (n.op_type, n.domain, len(n.input), sorted(a.SerializeToString() for a in n.attribute))
            for n in model.graph.node if n.domain == DOMAIN}


def test_plugin_nodes_survive_quantization(spatial: Path, tmp_path: Path) -> None:
    """A package with `dync::` nodes quantizes: both forms keep every plugin node of the stage (op type,
    domain, inputs, attributes), none reads a quantized (integer) tensor, the Convs reading a plugin node's
    output are quantized too (the quantizer gets their input's type from the decomposition), the TensorRT
    form passes the lint, and the package runs at int8 close to float32."""
    manifest = load_manifest(spatial)
    assert {c.op for c in manifest.custom_ops} >= {"dync::GatherPatches", "dync::ScatterAddPatches"}
    package = copy_package(spatial, tmp_path / "spatial.dync")
    x = random_input((3, 32, 32), 16, seed=1)
    quantize_package(package, x, None, QuantizeRequest(min_samples=8, measure=False))
    record, graphs = stage_graphs(package)
    for stage, (original, cpu, trt) in zip(record.stages, graphs, strict=True):
        expected = _custom(original)
        assert expected
        for form in (cpu, trt):
            assert form is not None and _custom(form) == expected
            quantized = {out for n in nodes_of(form, "QuantizeLinear") for out in n.output}
            assert not {name for n in form.graph.node if n.domain == DOMAIN for name in n.input} & quantized
            gathered = {out for n in form.graph.node if n.op_type == "GatherPatches" for out in n.output}
            readers = [n for n in nodes_of(form, "Conv") if source_of(form, n.input[0]) in gathered]
            assert readers and all(n.input[0] in dequantized(form) for n in readers), stage.stage
    assert lint_package(package, precision="int8").ok
    int8, fp32 = dync.load(package), dync.load(package, precision="fp32")
    assert int8.precision == "int8"
    got, want = int8.run(x).logits, fp32.run(x).logits
    assert np.isfinite(got).all() and 0 < max_rel_error(got, want) <= 0.25


# --------------------------------------------------------------------------- #
# 7. Bad input: one error, the package unchanged
# --------------------------------------------------------------------------- #


@dataclass
class BadCase:
    error: type[Exception]
    words: tuple[str, ...]
    call: Callable[[Path, Path], None]
    """Through the API, given (package, scratch directory)."""
    args: Callable[[Path, Path], list]
    """The same through the CLI."""
    package: str
    """Which package: digits (float32), digits_int8 (quantized) or spatial (plugin nodes)."""


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _digits_x() -> np.ndarray:
    from dync.demo import load_example

    return load_example().load_test_split()[0]


def _bad_cases() -> dict[str, BadCase]:
    def few(scratch: Path) -> Path:
        return _save(scratch / "few.npy", _digits_x()[:10])

    def wrong(scratch: Path) -> Path:
        return _save(scratch / "wrong.npy", np.zeros((80, 1, 4, 4), np.float32))

    def images(scratch: Path) -> Path:
        return _save(scratch / "images.npy", random_input((3, 32, 32), 8, seed=2))

    def digits_x(scratch: Path) -> Path:
        return _save(scratch / "x.npy", _digits_x()[:32])

    def model_file(scratch: Path) -> Path:
        from dync.demo import load_example

        path = scratch / "digits.pt"
        if not path.exists():
            torch.save(load_example().load_pretrained(), path)
        return path

    def verify_api(package: Path, scratch: Path) -> None:
        from dync.verify import verify

        verify(dync.load(package, precision="int8"), model_file(scratch))

    return {
        "too few samples": BadCase(
            InputError, ("at least 64 calibration samples, got 10",),
            lambda p, s: quantize_package(p, np.load(few(s)), None, QuantizeRequest(measure=False)),
            lambda p, s: ["quantize", p, "--data", few(s), "--no-measure"], "digits"),
        "wrong shape": BadCase(
            InputError, ("[80, 1, 4, 4]", "[batch, 1, 8, 8]"),
            lambda p, s: quantize_package(p, np.load(wrong(s)), None, QuantizeRequest(measure=False)),
            lambda p, s: ["quantize", p, "--data", wrong(s), "--no-measure"], "digits"),
        "fp8 without an fp8 face": BadCase(
            QuantizationError, ("dync::GatherPatches", "no fp8 face", "--format int8"),
            lambda p, s: quantize_package(p, np.load(images(s)), None,
                                          QuantizeRequest(format="fp8", min_samples=1, measure=False)),
            lambda p, s: ["quantize", p, "--data", images(s), "--format", "fp8", "--min-samples", 1], "spatial"),
        "never quantized": BadCase(
            InputError, ("float32 only", "dync quantize"),
            lambda p, s: dync.load(p, precision="int8"),
            lambda p, s: ["run", p, "--input", digits_x(s), "-o", s / "out.npz", "--precision", "int8"], "digits"),
        "verify int8 without input": BadCase(
            InputError, ("--input",), verify_api,
            lambda p, s: ["verify", p, "--model", model_file(s), "--precision", "int8"], "digits_int8"),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_error_and_leaves_the_package(case: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    """Too few samples (the message says how many are needed), data of the wrong shape (naming the expected
    one), fp8 on a package whose plugin op has no fp8 kernels (naming the op), int8 on a package never
    quantized (saying to run dync quantize), verify at int8 without --input: each raises its DyncError from
    the API, and through the CLI exits 1 with one `error:` line and no traceback; the manifest's bytes are
    unchanged and no quantized files are left behind."""
    bad = BAD_CASES[case]
    source = request.getfixturevalue(bad.package)
    package = copy_package(source.package if isinstance(source, Digits) else source, tmp_path / "package.dync")
    if bad.package == "spatial":
        assert all("float8_e4m3fn" not in registry().get(c.op.split("::")[-1]).dtypes
                   for c in load_manifest(package).custom_ops)
    before = (package / MANIFEST_FILE).read_bytes()
    quantized_before = sorted(p.name for p in (package / "quant").glob("*")) if (package / "quant").exists() else []
    with pytest.raises(bad.error) as raised:
        bad.call(package, tmp_path)
    for word in bad.words:
        assert word in str(raised.value), f"{word!r} not in {raised.value}"
    result = invoke(bad.args(package, tmp_path))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    (line,) = error_lines(result.stderr)
    assert all(word in line for word in bad.words), line
    assert (package / MANIFEST_FILE).read_bytes() == before
    after = sorted(p.name for p in (package / "quant").glob("*")) if (package / "quant").exists() else []
    assert after == quantized_before
    dync.load(package)


# --------------------------------------------------------------------------- #
# 8. Which op types run in int8 on the CPU
# --------------------------------------------------------------------------- #


def _stage_for_timing() -> onnx.ModelProto:
    """Conv, Relu, Add, Relu, then a Gemm head kept in float."""
    weights = {"w": np.ones((2, 1, 1, 1), np.float32), "hw": np.ones((4, 2), np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "c"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "hw"], ["y"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "stage", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph)


OP_TYPES = ("Conv", "Gemm", "Add", "Relu", "Flatten")


class FakeQuantizer:
    """`quantize(op_types)`: a stand-in model that says which op types it quantizes, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, op_types: object) -> onnx.ModelProto:
        self.calls.append(tuple(op_types))  # type: ignore[arg-type]
        model = onnx.ModelProto()
        model.doc_string = json.dumps(list(op_types))  # type: ignore[arg-type]
        return model


def fake_timer(seconds: Callable[[set[str]], float], stage: onnx.ModelProto) -> Callable[[dict], dict]:
    """Seconds per call: 1.0 for the float32 stage, `seconds(quantized op types)` for a quantized one."""

    def timer(models: dict[str, onnx.ModelProto]) -> dict[str, float]:
        return {name: 1.0 if model is stage else seconds(set(json.loads(model.doc_string)))
                for name, model in models.items()}

    return timer


def test_an_op_type_measured_slower_in_int8_is_reverted() -> None:
    """Quantized Adds cost 0.3 s, a Conv left in float 0.2 s, Relus nothing: the greedy search (the most
    frequent op type first, never the float head's) reverts exactly Add, keeps that model, and reports
    float32's time over it."""
    stage = _stage_for_timing()
    quantize = FakeQuantizer()
    timer = fake_timer(lambda types: 0.5 + 0.3 * ("Add" in types) + 0.2 * ("Conv" not in types), stage)
    choice = choose_cpu_form(stage, quantize, OP_TYPES, lambda model: 1.0, timer, floats=["head"])
    assert choice.reverted == ["Add"] and choice.inaccurate == []
    assert choice.model is not None and set(json.loads(choice.model.doc_string)) == set(OP_TYPES) - {"Add"}
    assert choice.speedup == pytest.approx(2.0)
    trials = [set(OP_TYPES) - set(call) for call in quantize.calls]
    assert trials == [set(), {"Relu"}, {"Add"}, {"Flatten"}, {"Conv"}, {"Add", "Flatten"}], \
        "each form built once: the accuracy pass's (non-weighted types), then the speed pass's on what was kept"


def test_int8_slower_than_float32_keeps_the_float_stage() -> None:
    """Where every int8 form is slower than float32, no CPU form is kept: `CpuChoice(model=None)`, every
    present op type (outside the head) listed as left in float, speedup 1."""
    stage = _stage_for_timing()
    choice = choose_cpu_form(stage, FakeQuantizer(), OP_TYPES, lambda model: 1.0, fake_timer(lambda types: 1.5, stage),
                             ["head"])
    assert choice == CpuChoice(model=None, reverted=["Add", "Conv", "Flatten", "Relu"], speedup=1.0, inaccurate=[])


def test_an_op_type_that_costs_accuracy_is_reverted_untimed() -> None:
    """Quantized Adds carry most of the error (0.4 against 0.1 without them): the accuracy pass leaves Add in
    float even without timing, never tries the weighted ops, and keeps the rest in int8."""
    stage = _stage_for_timing()
    quantize = FakeQuantizer()

    def error(model: onnx.ModelProto) -> float:
        types = set(json.loads(model.doc_string))
        return 0.1 + 0.3 * ("Add" in types) + 0.01 * ("Relu" in types)

    choice = choose_cpu_form(stage, quantize, OP_TYPES, error, None, ["head"])
    assert choice.inaccurate == ["Add"] and choice.reverted == [] and choice.speedup is None
    assert set(json.loads(choice.model.doc_string)) == set(OP_TYPES) - {"Add"}
    assert all("Conv" in call and "Gemm" in call for call in quantize.calls)


def test_measured_quantization_records_its_choice(two_stage: TwoStagePackage, tmp_path: Path) -> None:
    """With `measure=True` each stage is timed (at `MEASURE_BATCH`): the record holds a speedup, only op types
    the stage has are reverted, a stage whose int8 form measured slower runs its float32 graph at int8, and
    the package runs at int8 whatever was chosen. (No timing is asserted.)"""
    package = copy_package(two_stage.package, tmp_path / "measured.dync")
    record = quantize_package(package, two_stage.x, None, QuantizeRequest(min_samples=16, measure=True))
    manifest = load_manifest(package)
    engine = dync.load(package)
    for spec, stage, running in zip(manifest.stages, record.stages, engine.manifest.stages, strict=True):
        assert stage.measured_batch == MEASURE_BATCH and stage.speedup is not None and stage.speedup > 0
        present = {n.op_type for n in onnx.load(package / spec.onnx).graph.node}
        assert set(stage.reverted_ops) <= present
        assert running.onnx == (spec.onnx if stage.cpu is None else stage.cpu)
        if stage.cpu is None:
            assert stage.speedup == 1.0
    assert np.isfinite(engine.run(two_stage.x).logits).all()


# --------------------------------------------------------------------------- #
# 9. The CLI end to end
# --------------------------------------------------------------------------- #


def test_cli_quantize_inspect_run_and_requantize(digits: Digits, tmp_path: Path) -> None:
    """`dync quantize` prints the stage table and the recalibration table and stores int8 thresholds;
    inspect then reports the quantization, the TensorRT lint of the int8 form passes, run uses int8 unless
    given --precision fp32 (and both match the API), and quantizing again (here as fp8) replaces the old
    quantized files: one quant/ directory, the package loads at fp8 and no longer at int8."""
    package = copy_package(digits.package, tmp_path / "digits.dync")
    x_path, y_path = _save(tmp_path / "x.npy", digits.x), _save(tmp_path / "y.npy", digits.y)
    result = invoke(["quantize", package, "--data", x_path, "--labels", y_path, "--no-measure"])
    assert result.exit_code == 0, result.output
    assert "| stage | calibrated on | nodes quantized | kept in float | CPU form | float32 / CPU form |" \
        in result.stdout
    assert "| run | cost | accuracy | exits changed vs float32 |" in result.stdout
    assert "| int8, thresholds chosen again |" in result.stdout and "int8 thresholds [" in result.stdout
    for stage in load_manifest(package).stages:
        assert f"| {stage.name} | " in result.stdout
    record = load_manifest(package).quantization
    assert record.format == "int8" and record.calibration is not None and record.thresholds is not None
    assert record.recalibration.labels and record.recalibration.cost_recalibrated is not None
    assert load_manifest(package).calibration.budget == pytest.approx(record.calibration.budget)

    inspected = invoke(["inspect", package])
    assert inspected.exit_code == 0 and "quantization: int8" in inspected.output, inspected.output
    linted = invoke(["inspect", package, "--target", "trt"])
    assert linted.exit_code == 0, linted.output
    assert invoke(["inspect", package, "--target", "trt", "--precision", "int8"]).exit_code == 0

    outputs = {}
    for precision in (None, "fp32"):
        out = tmp_path / f"{precision}.npz"
        ran = invoke(["run", package, "--input", x_path, "-o", out, *(["--precision", precision] if precision else [])])
        assert ran.exit_code == 0, ran.output
        with np.load(out) as saved:
            outputs[precision] = saved["logits"], saved["exit"]
    for precision, api in ((None, "int8"), ("fp32", "fp32")):
        expected = dync.load(package, precision=api).run(digits.x)
        np.testing.assert_array_equal(outputs[precision][0], expected.logits)
        np.testing.assert_array_equal(outputs[precision][1], expected.exit)
    assert np.abs(outputs[None][0] - outputs["fp32"][0]).max() > 1e-3

    first = [p.name for p in (package / "quant").iterdir()]
    again = invoke(["quantize", package, "--data", x_path, "--labels", y_path, "--format", "fp8", "--no-measure"])
    assert again.exit_code == 0, again.output
    second = [p.name for p in (package / "quant").iterdir()]
    assert len(first) == 1 and len(second) == 1 and first != second and second[0].startswith("fp8-")
    assert all(path.startswith(f"quant/{second[0]}/") for path in load_manifest(package).files
               if path.startswith("quant/"))
    assert dync.load(package).precision == "fp8"
    with pytest.raises(InputError, match="not int8"):
        dync.load(package, precision="int8")


# --------------------------------------------------------------------------- #
# 10. The TensorRT Q/DQ lint rule
# --------------------------------------------------------------------------- #


def _qdq_model(zero_point: np.ndarray | None, scale: np.ndarray) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear over a 1x3x4x4 activation."""
    inits = [numpy_helper.from_array(scale, "scale")]
    q_inputs, dq_inputs = ["x", "scale"], ["q", "scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zero"))
        q_inputs.append("zero")
        dq_inputs.append("zero")
    axis = {"axis": 1} if scale.size > 1 else {}
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="q", **axis),
             helper.make_node("DequantizeLinear", dq_inputs, ["y"], name="dq", **axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _restriction_errors(model: onnx.ModelProto) -> list[str]:
    return [f.message for f in lint_model(model, load_operator_facts()) if f.severity == ERROR and
            f.code == RESTRICTION]


@pytest.mark.parametrize(("zero_point", "scale", "words"), [
    (np.uint8(0), np.float32(0.1), "uint8"),
    (None, np.float32(0.1), "no zero-point"),
    (np.int8(3), np.float32(0.1), "non-zero zero-point"),
    (np.zeros(3, np.int8), np.full(3, 0.1, np.float32), "per channel"),
], ids=["uint8", "no zero-point", "non-zero", "per-channel activation"])
def test_lint_refuses_qdq_tensorrt_does_not_take(zero_point: np.ndarray | None, scale: np.ndarray,
                                                 words: str) -> None:
    """The `symmetric_signed_qdq` rule: a uint8 (or implicit uint8) Q/DQ, a non-zero zero-point and a
    per-channel activation scale are each an error on the QuantizeLinear node, while the signed symmetric
    per-tensor pair TensorRT takes (int8 or fp8) is none; the CPU int8 form dync writes would fail it."""
    errors = _restriction_errors(_qdq_model(zero_point, scale))
    assert any(words in message and "'q'" in message for message in errors), errors
    assert _restriction_errors(_qdq_model(np.int8(0), np.float32(0.1))) == []
    fp8 = _qdq_model(np.int8(0), np.float32(0.1))
    zero = helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0.0])
    fp8.graph.initializer[1].CopyFrom(zero)
    assert _restriction_errors(fp8) == []


def test_lint_flags_the_cpu_form_and_passes_the_tensorrt_form(digits_int8: Path) -> None:
    """The TensorRT lint of a quantized package checks its TensorRT form, which passes, while the CPU form
    of the same stage (uint8 activations) fails the Q/DQ rule."""
    assert lint_package(digits_int8, precision="int8").ok
    record = load_manifest(digits_int8).quantization
    errors = _restriction_errors(onnx.load(digits_int8 / record.stages[0].cpu))
    assert any("uint8" in message for message in errors), errors
