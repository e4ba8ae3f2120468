"""Engine plans without TensorRT: cache keys, profiles, and Polygraphy's loaders constructed lazily."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dync.build import EngineOptions, plan_engines
from dync.build.keys import Gpu
from dync.build.profiles import BatchRange, reach_fractions, stage_profiles
from dync.build.targets import TensorRTVersion
from dync.errors import InputError, InstallError
from dync.package import file_record, load_manifest, write_manifest
from dync.records import CalibrationRecord
from tests.conftest import CliExport
from tests.helpers import copy_package

H200 = Gpu("NVIDIA H200", (9, 0))
TRT = TensorRTVersion.parse("10.9.0.34")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def tiny(cli_export: CliExport, tmp_path: Path) -> Path:
    assert cli_export.result.exit_code == 0, cli_export.result.output
    return copy_package(cli_export.package, tmp_path / "tiny.dync")


def _digests(package: Path, options: EngineOptions | None = None, tensorrt: TensorRTVersion = TRT,
             gpu: Gpu = H200) -> list[str]:
    return [plan.key.digest for plan in plan_engines(package, options or EngineOptions(), tensorrt, gpu)[1]]


def _nudge_one_weight(package: Path, stage: int) -> None:
    """Change one weight of one stage by one ulp, as retraining would, and record the file's new hash."""
    manifest = load_manifest(package)
    path = package / manifest.stages[stage].onnx
    model = onnx.load(path)
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1)
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nextafter(values.flat[0], np.float32(np.inf))
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, path)
    write_manifest(package, dataclasses.replace(manifest, files={**manifest.files,
                                                                 manifest.stages[stage].onnx: file_record(path)}))


def test_changing_one_weight_changes_that_stage_s_key_only(tiny: Path) -> None:
    before = _digests(tiny)
    _nudge_one_weight(tiny, 1)
    after = _digests(tiny)
    assert after[1] != before[1]
    assert after[0] == before[0] and after[2] == before[2]


@pytest.mark.parametrize("change", [
    {"tensorrt": TensorRTVersion.parse("10.9.0.35")},
    {"gpu": Gpu("NVIDIA H100 80GB HBM3", (9, 0))},
    {"gpu": Gpu("NVIDIA H200", (10, 0))},
    {"options": EngineOptions(precision="fp16")},
    {"options": EngineOptions(batch=BatchRange.parse("1:32:256"))},
    {"options": EngineOptions(plugins="decomposed")},
])
def test_every_input_of_a_build_is_in_its_key(tiny: Path, change: dict) -> None:
    assert set(_digests(tiny, **change)).isdisjoint(_digests(tiny))


def test_keys_are_stable_across_plans(tiny: Path) -> None:
    assert _digests(tiny) == _digests(tiny)


def test_later_stages_are_tuned_at_the_share_of_samples_that_reach_them(tiny: Path) -> None:
    manifest = load_manifest(tiny)
    calibration = CalibrationRecord(metric="flops", budget=0.5, budget_ms=None, batch_size=64, q=None,
                                    expected_cost=0.5, expected_accuracy=None, exit_counts=[50, 30, 20],
                                    samples=100, min_cost=0.3, created="now")
    assert reach_fractions(manifest, calibration) == [1.0, 0.5, 0.2]
    profiles = stage_profiles(manifest, BatchRange.parse("1:64:256"), calibration)
    assert [str(p.batch) for p in profiles] == ["1:64:256", "1:32:256", "1:13:256"]
    first = profiles[0]
    name = manifest.inputs[0].name
    assert first.shapes[name] == tuple((b, *manifest.inputs[0].shape[1:]) for b in (1, 64, 256))
    assert first.trtexec_shapes(2) == f"{name}:256x" + "x".join(map(str, manifest.inputs[0].shape[1:]))
    assert [str(p.batch) for p in stage_profiles(manifest, BatchRange.parse("1:64:256"))] == ["1:64:256"] * 3


@pytest.mark.parametrize("text", ["64", "1:64", "8:4:16", "0:1:2", "a:b:c"])
def test_batch_ranges_are_parsed_or_refused_in_one_line(text: str) -> None:
    if text == "64":
        assert BatchRange.parse(text) == BatchRange(64, 64, 64)
        return
    with pytest.raises(InputError, match="MIN:OPT:MAX"):
        BatchRange.parse(text)


def test_tensorrt_older_than_10_3_is_refused(tiny: Path) -> None:
    with pytest.raises(InputError, match="older than dync supports"):
        plan_engines(tiny, EngineOptions(), TensorRTVersion.parse("8.6.1"), H200)


def test_polygraphy_loaders_construct_without_tensorrt(tiny: Path) -> None:
    from polygraphy.backend.trt import EngineBytesFromNetwork

    from dync.build.tensorrt import engine_bytes_loader

    _, plans = plan_engines(tiny, EngineOptions(), TRT, H200)
    loader = engine_bytes_loader(plans[0].model, plans[0].profile, tiny / "engines" / "timing.cache")
    assert isinstance(loader, EngineBytesFromNetwork)
    assert not (tiny / "engines" / "timing.cache").exists(), "constructing the loader built something"


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message for a machine without TensorRT")
def test_building_without_tensorrt_says_how_to_install_it() -> None:
    from dync.build.tensorrt import identify_target

    with pytest.raises(InstallError, match=r'pip install "dync\[trt\]"'):
        identify_target()


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed on this machine (its libraries are not in "
                                             "the package registry); the stand-in toolchain tests the orchestration")
def test_engines_built_by_tensorrt_match_onnxruntime(tiny: Path) -> None:
    import dync
    from dync.build import build_engines

    build_engines(tiny, EngineOptions(batch=BatchRange.parse("1:8:16")), progress=print)
    x = np.random.default_rng(0).standard_normal((8, *load_manifest(tiny).inputs[0].shape[1:])).astype(np.float32)
    got, want = dync.load(tiny, backend="trt").run(x), dync.load(tiny).run(x)
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-3, atol=1e-3)


def test_trtexec_shapes_quote_names_with_separators() -> None:
    from dync.build.profiles import StageProfile

    batch = BatchRange(1, 2, 4)
    profile = StageProfile("stage0", batch, {"x": ((1, 3), (2, 3), (4, 3)), "t:0": ((1,), (2,), (4,))}, 1.0)
    assert profile.trtexec_shapes(2) == "'t:0':4,x:4x3"
