"""The TensorRT backend's orchestration, run here with a toolchain that builds nothing and runs each stage graph
on onnxruntime through Polygraphy's `OnnxrtRunner`: what is checked is the backend (engine cache, plans, slicing,
the executor behind the interface), never TensorRT, which is not installed on these machines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import dync
from dync.bench import bench
from dync.build import EngineOptions, StagePlan, build_engines, format_builds, plan_engines
from dync.build.cache import ENGINE_FILE, RECORD_FILE, EngineCache
from dync.build.keys import Gpu
from dync.build.profiles import BatchRange
from dync.build.targets import TensorRTVersion
from dync.build.tensorrt import Toolchain
from dync.errors import InputError
from dync.plugins.splice import decompose_custom_nodes
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package
from tests.models import TINY_SHAPE

STAND_IN_GPU = Gpu("stand-in GPU (onnxruntime on the CPU)", (9, 0))
STAND_IN_PLAN = b"stand-in plan, not a TensorRT engine: "


class OnnxruntimeStandIn:
    """A toolchain that records what it was asked to build and runs the stage graphs on onnxruntime."""

    def __init__(self, tensorrt: str = "10.9.0.34") -> None:
        self.version = TensorRTVersion.parse(tensorrt)
        self.builds: list[str] = []

    def identify(self) -> tuple[TensorRTVersion, Gpu]:
        return self.version, STAND_IN_GPU

    def build(self, model: onnx.ModelProto, profile, plugins: set[str], timing_cache: Path) -> bytes:
        self.builds.append(profile.stage)
        return STAND_IN_PLAN + hashlib.sha256(model.SerializeToString()).hexdigest().encode()

    def runner(self, plan_bytes: bytes, plan: StagePlan):
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        assert plan_bytes.startswith(STAND_IN_PLAN), "the backend ran a plan its toolchain did not build"
        return OnnxrtRunner(SessionFromOnnx(decompose_custom_nodes(plan.model).SerializeToString()))

    @property
    def toolchain(self) -> Toolchain:
        return Toolchain("onnxruntime stand-in (not TensorRT)", self.identify, self.build, self.runner)


@pytest.fixture
def tiny(cli_export: CliExport, tmp_path: Path) -> Path:
    assert cli_export.result.exit_code == 0, cli_export.result.output
    return copy_package(cli_export.package, tmp_path / "tiny.dync")


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY_SHAPE[1:])).astype(np.float32)


def test_the_trt_backend_runs_the_executor_like_onnxruntime(tiny: Path) -> None:
    stand_in = OnnxruntimeStandIn()
    trt = dync.load(tiny, backend="trt", toolchain=stand_in.toolchain)
    cpu = dync.load(tiny)
    x = _batch(32)
    for thresholds in ([0.0, 0.0], [0.5, 0.6], [2.0, 2.0]):
        got, want = trt.run(x, thresholds=thresholds), cpu.run(x, thresholds=thresholds)
        np.testing.assert_array_equal(got.exit, want.exit)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    assert stand_in.builds == [s.name for s in trt.manifest.stages]


def test_a_batch_over_the_profile_max_runs_in_slices(tiny: Path) -> None:
    trt = dync.load(tiny, backend="trt", toolchain=OnnxruntimeStandIn().toolchain, batch="1:2:4")
    x = _batch(11, seed=1)
    got, want = trt.run(x, thresholds=[0.5, 0.5]), dync.load(tiny).run(x, thresholds=[0.5, 0.5])
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_engines_are_cached_with_their_build_records(tiny: Path) -> None:
    first = OnnxruntimeStandIn()
    done = build_engines(tiny, EngineOptions(), progress=lambda _m: None, toolchain=first.toolchain)
    assert [source for _, source in done] == ["built"] * len(done)
    table = format_builds(done).splitlines()
    assert len(table) == 2 + len(done) and all(f"| {r.key.stage} | {r.digest} | fp32 |" in row
                                                 for (r, _), row in zip(done, table[2:], strict=True))
    for record, _ in done:
        directory = tiny / "engines" / record.digest
        plan = (directory / ENGINE_FILE).read_bytes()
        assert hashlib.sha256(plan).hexdigest() == record.engine_sha256
        stored = json.loads((directory / RECORD_FILE).read_text())
        assert stored["key"]["tensorrt"] == "10.9.0.34" and stored["builder"] == first.toolchain.name
    again = OnnxruntimeStandIn()
    dync.load(tiny, backend="trt", toolchain=again.toolchain).run(_batch(4))
    assert again.builds == [], "a cached engine was built again"
    shown = invoke(["inspect", tiny])
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("engine: stage ") == len(done) and "TensorRT 10.9.0.34" in shown.output
    listed = json.loads(invoke(["inspect", tiny, "--json"]).output)["engines"]
    assert sorted(e["digest"] for e in listed) == sorted(r.digest for r, _ in done)


def test_a_damaged_plan_is_rebuilt_not_run(tiny: Path) -> None:
    build_engines(tiny, EngineOptions(), progress=lambda _m: None, toolchain=OnnxruntimeStandIn().toolchain)
    _, plans = plan_engines(tiny, EngineOptions(), TensorRTVersion.parse("10.9.0.34"), STAND_IN_GPU)
    (EngineCache(tiny).directory(plans[0].key) / ENGINE_FILE).write_bytes(b"truncated")
    again = OnnxruntimeStandIn()
    dync.load(tiny, backend="trt", toolchain=again.toolchain)
    assert again.builds == [plans[0].stage]


def test_loading_uses_the_batch_range_of_the_last_build(tiny: Path) -> None:
    build_engines(tiny, EngineOptions(batch=BatchRange.parse("1:4:16")), progress=lambda _m: None,
                  toolchain=OnnxruntimeStandIn().toolchain)
    again = OnnxruntimeStandIn()
    engine = dync.load(tiny, backend="trt", toolchain=again.toolchain)
    assert again.builds == [] and engine.backend.describe()["batch"] == "1:4:16"


def test_bench_measures_the_trt_backend_against_its_static_engine(tiny: Path) -> None:
    stand_in = OnnxruntimeStandIn()
    engine = dync.load(tiny, backend="trt", toolchain=stand_in.toolchain)
    report = bench(engine, _batch(16), thresholds=[0.5, 0.5], repeats=2)
    assert report.to_json()["settings"]["backend"] == "trt"
    assert "static" in stand_in.builds


def test_bench_profile_on_trt_says_where_per_op_times_come_from(tiny: Path) -> None:
    engine = dync.load(tiny, backend="trt", toolchain=OnnxruntimeStandIn().toolchain)
    with pytest.raises(InputError, match="onnxruntime's profiler"):
        engine.backend.kernel_times()


def test_fp16_engines_are_built_from_fp16_stages_with_float32_io(tiny: Path) -> None:
    stand_in = OnnxruntimeStandIn()
    engine = dync.load(tiny, backend="trt", precision="fp16", toolchain=stand_in.toolchain)
    x = _batch(16, seed=2)
    got, want = engine.run(x, thresholds=[2.0, 2.0]), dync.load(tiny).run(x, thresholds=[2.0, 2.0])
    assert got.logits.dtype == np.float32
    np.testing.assert_allclose(got.logits, want.logits, rtol=2e-2, atol=2e-2 * np.abs(want.logits).max())
    _, plans = plan_engines(tiny, EngineOptions(precision="fp16"), stand_in.version, STAND_IN_GPU)
    types = {i.data_type for p in plans for i in p.model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types


def test_fp8_on_a_gpu_without_fp8_is_refused_before_building(tiny: Path) -> None:
    with pytest.raises(InputError, match="no FP8 tensor cores"):
        plan_engines(tiny, EngineOptions(precision="fp8"), TensorRTVersion.parse("10.9"), Gpu("NVIDIA A100", (8, 0)))


def test_plugin_nodes_stay_plugins_from_tensorrt_10_9_and_are_decomposed_below(plugins_package: Path,
                                                                             tmp_path: Path) -> None:
    package = copy_package(plugins_package, tmp_path / "p.dync")
    _, new = plan_engines(package, EngineOptions(), TensorRTVersion.parse("10.9.0"), STAND_IN_GPU)
    _, old = plan_engines(package, EngineOptions(), TensorRTVersion.parse("10.3.0"), STAND_IN_GPU)
    assert any(plan.plugins for plan in new)
    assert all(not plan.plugins for plan in old)
    assert all(n.domain != "dync" for plan in old for n in plan.model.graph.node)
    with pytest.raises(InputError, match="--plugins decomposed"):
        plan_engines(package, EngineOptions(plugins="aot"), TensorRTVersion.parse("10.3.0"), STAND_IN_GPU)
    stand_in = OnnxruntimeStandIn("10.9.0.34")
    x = np.random.default_rng(3).standard_normal((6, *dync.load(package).manifest.inputs[0].shape[1:]))
    got = dync.load(package, backend="trt", toolchain=stand_in.toolchain).run(x.astype(np.float32))
    want = dync.load(package).run(x.astype(np.float32))
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-4, atol=1e-5)


def _bundle_as_built_by_build_sh(package: Path, bundle: Path, precision: str, batch: str) -> list[str]:
    """A Jetson bundle whose build.sh ran: each stage's engine file written where bundle.json says (here the
    stand-in's plan of the tensorrt/ graph, not a TensorRT engine)."""
    from dync.build.bundle_record import read_bundle
    from dync.build.jetson import write_bundle

    write_bundle(package, bundle, jetpack="6.2", device="orin", precision=precision, batch=BatchRange.parse(batch),
                 progress=lambda _m: None)
    record = read_bundle(bundle)
    for entry in record.stages:
        model = onnx.load(bundle / entry.onnx)
        (bundle / entry.engine).write_bytes(STAND_IN_PLAN + hashlib.sha256(model.SerializeToString()).hexdigest()
                                            .encode())
    return [entry.stage for entry in record.stages]


def test_a_jetson_bundle_runs_the_engines_build_sh_wrote(tiny: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    _bundle_as_built_by_build_sh(tiny, bundle, "fp16", "1:4:8")
    stand_in = OnnxruntimeStandIn("10.3.0.30")
    engine = dync.load(bundle, backend="trt", toolchain=stand_in.toolchain)  # precision and batch from the bundle
    assert stand_in.builds == [], "the engines build.sh wrote were built again"
    assert engine.precision == "fp16" and engine.backend.describe()["batch"] == "1:4:8"
    x = _batch(12, seed=4)
    want = dync.load(tiny).run(x, thresholds=[2.0, 2.0])
    got = engine.run(x, thresholds=[2.0, 2.0])
    np.testing.assert_allclose(got.logits, want.logits, rtol=2e-2, atol=2e-2 * np.abs(want.logits).max())
    records = [json.loads(p.read_text()) for p in (bundle / "engines").glob(f"*/{RECORD_FILE}")]
    assert sorted(r["builder"] for r in records) == ["trtexec (build.sh)"] * len(engine.manifest.stages)


def test_a_bundle_engine_made_from_another_stage_file_is_not_taken(tiny: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    stages = _bundle_as_built_by_build_sh(tiny, bundle, "fp32", "1:4:8")
    record = json.loads((bundle / "bundle.json").read_text())
    record["stages"][1]["source_sha256"] = "0" * 64  # as if the package had been retrained since
    (bundle / "bundle.json").write_text(json.dumps(record))
    stand_in = OnnxruntimeStandIn("10.3.0.30")
    dync.load(bundle, backend="trt", toolchain=stand_in.toolchain)
    assert stand_in.builds == [stages[1]]


def test_profile_and_latency_calibration_run_on_the_trt_backend(tiny: Path) -> None:
    """A latency profile measured through the TensorRT backend is stored under its name ("trt" or "trt-fp16")
    and is what `calibrate --metric latency` on that backend reads."""
    from dync.calib.calibrate import BudgetRequest, calibrate_package
    from dync.calib.profile import load_profile, profile_stages, save_profile

    engine = dync.load(tiny, backend="trt", toolchain=OnnxruntimeStandIn().toolchain)
    save_profile(tiny, profile_stages(engine, batch_sizes=[1, 4], repeats=1))
    assert engine.profile_name == "trt" and load_profile(tiny, engine.profile_name) is not None
    result = calibrate_package(engine, _batch(32, seed=5), BudgetRequest(metric="latency", budget=0.6, batch_size=4))
    assert len(result.chosen.thresholds) == engine.num_exits - 1
    assert dync.load(tiny).manifest.thresholds is not None


def test_verify_checks_the_trt_backend_against_eager_without_recording(cli_export: CliExport, tiny: Path) -> None:
    """On TensorRT, `dync verify --backend trt` checks the engines against eager PyTorch; the package's
    verification record stays the one of its onnxruntime float32 program."""
    from dync.verify import verify

    before = (tiny / "manifest.json").read_text()
    for precision in ("fp32", "fp16"):
        engine = dync.load(tiny, backend="trt", precision=precision, toolchain=OnnxruntimeStandIn().toolchain)
        record = verify(engine, cli_export.model)
        assert record.passed and record.rtol == (1e-4 if precision == "fp32" else 0.02)
    assert (tiny / "manifest.json").read_text() == before
