"""Jetson bundles (`dync.build.jetson.write_bundle`): what the host writes for JetPack's trtexec, checked without
TensorRT: the package copy, the TensorRT forms, build.sh against trtexec's documented options, the Polygraphy
reference data against onnxruntime, the version gates and bundle.json."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest

import dync
from dync.build import tensorrt_manifest
from dync.build.bundle_record import BUNDLE_FILE, BundleRecord, read_bundle
from dync.build.jetson import REFERENCE_RUNNER, TOLERANCES, write_bundle
from dync.build.profiles import BatchRange, stage_profiles
from dync.calib.quantize import QuantizeRequest, quantize_package
from dync.errors import DyncError, ExportError, InputError, InstallError
from dync.exporter.verification import run_decomposed
from dync.package import MANIFEST_FILE, file_record, load_manifest
from dync.plugins.op_registry import DOMAIN
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package

BATCH = BatchRange.parse("1:8:32")
SHAPE_FLAGS = ("--minShapes", "--optShapes", "--maxShapes")


# ------------------------------------------------------------------------------------------------------- fixtures


def bundle(package: Path, output: Path, jetpack: str = "6.2", precision: str = "fp16",
           device: str = "orin") -> tuple[Path, BundleRecord]:
    messages: list[str] = []
    record = write_bundle(package, output, jetpack=jetpack, device=device, precision=precision, batch=BATCH,
                          progress=messages.append)
    assert messages, "write_bundle said nothing of what it did"
    return output, record


@pytest.fixture(scope="module")
def tiny(cli_export: CliExport) -> Path:
    """The CLI's 3-exit tiny package (shared: tests that change a package copy it)."""
    assert cli_export.result.exit_code == 0, cli_export.result.output
    return cli_export.package


@pytest.fixture(scope="module")
def tiny_bundle(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BundleRecord]:
    """JetPack 6.2, fp16, written with tensorrt refused: no part of a bundle needs it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", None)
        return bundle(tiny, tmp_path_factory.mktemp("jetson") / "tiny.bundle")


@pytest.fixture(scope="module")
def int8_package(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    package = copy_package(tiny, tmp_path_factory.mktemp("jetson_int8") / "tiny_int8.dync")
    data = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    quantize_package(package, data, request=QuantizeRequest(min_samples=1, measure=False))
    return package


# -------------------------------------------------------------------------------------------------------- helpers


def trtexec_commands(script: str) -> dict[str, list[str]]:
    """build.sh's `trtexec_build STAGE FLAGS...` lines, continuations joined: stage -> flags."""
    joined = script.replace("\\\n", " ")
    commands = {}
    for line in joined.splitlines():
        words = shlex.split(line)
        if words and words[0] == "trtexec_build":
            commands[words[1]] = words[2:]
    return commands


def flag_values(flags: list[str]) -> dict[str, str | None]:
    return {flag.split("=", 1)[0]: (flag.split("=", 1)[1] if "=" in flag else None) for flag in flags}


def trtexec_options() -> dict:
    return json.loads(resources.files("dync").joinpath("data/trtexec_options.json").read_text())


def dync_nodes(graph: onnx.GraphProto) -> list[str]:
    """The `dync::` op types in a graph and every subgraph."""
    found = [node.op_type for node in graph.node if node.domain == DOMAIN]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found += dync_nodes(attribute.g)
            found += [op for g in attribute.graphs for op in dync_nodes(g)]
    return found


def assert_one_line(error: pytest.ExceptionInfo[DyncError]) -> None:
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message


# ---------------------------------------------------------------------------------------------------------- tests


def test_the_bundle_is_a_loadable_copy_of_the_package(tiny: Path, tiny_bundle: tuple[Path, BundleRecord]) -> None:
    out, _ = tiny_bundle
    stored = load_manifest(tiny)
    assert (out / MANIFEST_FILE).read_bytes() == (tiny / MANIFEST_FILE).read_bytes()
    for path in stored.files:
        assert (out / path).read_bytes() == (tiny / path).read_bytes(), path
    for name in ("build.sh", "README.md", BUNDLE_FILE):
        assert (out / name).is_file(), name
    for stage in stored.stages:
        assert (out / "tensorrt" / f"{stage.name}.onnx").is_file()
        assert (out / "verify" / f"{stage.name}.inputs.json").is_file()
        assert (out / "verify" / f"{stage.name}.outputs.json").is_file()
    assert list((out / "engines").iterdir()) == [], "engines/ is for build.sh to fill"
    assert load_manifest(out) == stored
    x = np.random.default_rng(3).standard_normal((6, 3, 16, 16)).astype(np.float32)
    got, expected = dync.load(out).run(x), dync.load(tiny).run(x)
    np.testing.assert_array_equal(got.exit, expected.exit)
    np.testing.assert_array_equal(got.logits, expected.logits)


def test_build_sh_is_bash_and_passes_trtexec_only_documented_strongly_typed_flags(
        tiny_bundle: tuple[Path, BundleRecord]) -> None:
    out, record = tiny_bundle
    subprocess.run(["bash", "-n", str(out / "build.sh")], check=True)
    script = (out / "build.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert "/usr/src/tensorrt/bin/trtexec" in script and "command -v trtexec" in script
    options = trtexec_options()
    documented = {entry["flag"] for entry in options["options"]}
    refused = {entry["flag"] for entry in options["refused"]}
    assert {"--fp16", "--int8", "--best", "--bf16", "--fp8"} <= refused
    commands = trtexec_commands(script)
    assert sorted(commands) == sorted(s.stage for s in record.stages)
    for stage, flags in commands.items():
        used = set(flag_values(flags))
        assert used <= documented, f"stage {stage}: undocumented trtexec flags {used - documented}"
        assert not used & refused, f"stage {stage}: weak-typing flags {used & refused}"
        assert {"--stronglyTyped", "--skipInference", "--timingCacheFile"} <= used
    assert not any(word in refused for word in shlex.split(script.replace("\\\n", " "), comments=True))
    for entry in options["options"] + options["refused"]:
        assert entry["source"].startswith("https://"), entry


def test_build_sh_shapes_and_paths_are_the_bundle_records(tiny: Path, tiny_bundle: tuple[Path, BundleRecord]
                                                          ) -> None:
    out, record = tiny_bundle
    manifest, calibration = tensorrt_manifest(tiny, "fp16")
    profiles = {p.stage: p for p in stage_profiles(manifest, BATCH, calibration)}
    commands = trtexec_commands((out / "build.sh").read_text())
    for entry in record.stages:
        values = flag_values(commands[entry.stage])
        for which, flag in enumerate(SHAPE_FLAGS):
            assert values[flag] == profiles[entry.stage].trtexec_shapes(which), (entry.stage, flag)
        assert values["--onnx"] == entry.onnx and values["--saveEngine"] == entry.engine
        assert values["--timingCacheFile"] == "engines/timing.cache"
        assert entry.profile == profiles[entry.stage].to_json()
        assert entry.source_sha256 == file_record(tiny / manifest.stages[[s.name for s in manifest.stages]
                                                                          .index(entry.stage)].onnx).sha256
        assert entry.onnx_sha256 == file_record(out / entry.onnx).sha256


def test_bundle_json_round_trips(tiny_bundle: tuple[Path, BundleRecord]) -> None:
    out, record = tiny_bundle
    assert read_bundle(out) == record
    assert (record.jetpack, record.device, record.tensorrt, record.precision, record.plugins) == \
        ("6.2", "orin", "10.3", "fp16", "decomposed")


def test_the_verify_data_loads_with_polygraphy_and_is_onnxruntime_on_the_tensorrt_forms(
        tiny: Path, tiny_bundle: tuple[Path, BundleRecord]) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    out, record = tiny_bundle
    manifest = load_manifest(tiny)
    computed: dict[str, np.ndarray] = {}
    for entry, stage in zip(record.stages, manifest.stages, strict=True):
        inputs = load_json(str(out / "verify" / f"{entry.stage}.inputs.json"))
        assert len(inputs) == 1 and sorted(inputs[0]) == sorted(stage.reads)
        feeds = {name: np.asarray(value) for name, value in inputs[0].items()}
        assert all(len(value) == 2 for value in feeds.values())
        for name in stage.reads:  # carried state is what the float32 stages before computed
            if name in computed:
                np.testing.assert_allclose(feeds[name], computed[name], rtol=1e-5, atol=1e-6)
        results = RunResults.load(str(out / "verify" / f"{entry.stage}.outputs.json"))
        (runner, iterations), = results.items()
        assert runner == REFERENCE_RUNNER and len(iterations) == 1
        saved = dict(iterations[0].items())
        expected = run_decomposed(onnx.load(out / entry.onnx), feeds)
        assert sorted(saved) == sorted(expected)
        for name in expected:
            np.testing.assert_allclose(np.asarray(saved[name]), expected[name], rtol=1e-5, atol=1e-5)
        computed.update(run_decomposed(onnx.load(tiny / stage.onnx), feeds))


def test_the_readme_gives_the_device_steps(tiny_bundle: tuple[Path, BundleRecord]) -> None:
    readme = (tiny_bundle[0] / "README.md").read_text()
    for line in ("python3 -m venv --system-site-packages .venv", 'pip install "dync[build]"', "bash build.sh",
                 "dync run . --backend trt --input x.npy -o out.npz", "dync bench . --backend trt",
                 "JetPack 6.2", "Jetson Orin"):
        assert line in readme, line


def test_jetpack_6_forms_decompose_every_plugin_node(plugins_package: Path, tmp_path: Path) -> None:
    out, record = bundle(plugins_package, tmp_path / "lasnet_6.bundle", jetpack="6.2", precision="fp32")
    assert dync_nodes(onnx.load(plugins_package / load_manifest(plugins_package).stages[0].onnx).graph)
    for entry in record.stages:
        model = onnx.load(out / entry.onnx)
        assert dync_nodes(model.graph) == [] and DOMAIN not in {o.domain for o in model.opset_import}
    script = (out / "build.sh").read_text()
    assert sorted(trtexec_commands(script)) == [s.stage for s in record.stages]
    assert "dync build" not in script and record.plugins == "decomposed"


def test_jetpack_7_2_keeps_plugin_nodes_and_builds_them_with_dync_build(plugins_package: Path, tmp_path: Path
                                                                         ) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    out, record = bundle(plugins_package, tmp_path / "lasnet_7.bundle", jetpack="7.2", precision="fp32")
    assert record.plugins == "aot" and record.tensorrt == "11.4"
    entry = record.stages[0]
    model = onnx.load(out / entry.onnx)
    assert set(dync_nodes(model.graph)) == {"GatherPatches"}, "ScatterAddPatches has no TensorRT plugin"
    script = (out / "build.sh").read_text()
    subprocess.run(["bash", "-n", str(out / "build.sh")], check=True)
    assert entry.stage not in trtexec_commands(script)
    assert "dync build . --target trt --precision fp32 --batch 1:8:32" in script.splitlines()
    assert 'pip install "dync[trt,gpu]"' in script
    feeds = load_json(str(out / "verify" / f"{entry.stage}.inputs.json"))[0]
    (_, iterations), = RunResults.load(str(out / "verify" / f"{entry.stage}.outputs.json")).items()
    for name, value in run_decomposed(model, feeds).items():
        np.testing.assert_allclose(np.asarray(iterations[0][name]), value, rtol=1e-5, atol=1e-5)


def test_an_int8_bundle_builds_the_tensorrt_qdq_stages(int8_package: Path, tmp_path: Path) -> None:
    out, record = bundle(int8_package, tmp_path / "int8.bundle", precision="int8")
    quantized = load_manifest(int8_package).quantization
    by_stage = {q.stage: q for q in quantized.stages}
    for entry in record.stages:
        assert entry.source_sha256 == file_record(int8_package / by_stage[entry.stage].trt).sha256
        assert "QuantizeLinear" in {node.op_type for node in onnx.load(out / entry.onnx).graph.node}
    assert load_manifest(out).quantization == quantized
    atol, rtol = TOLERANCES["int8"]
    assert f"--atol {atol:g} --rtol {rtol:g}" in (out / "build.sh").read_text()


def test_host_latency_profiles_stay_behind(tiny: Path, tmp_path: Path) -> None:
    package = copy_package(tiny, tmp_path / "profiled.dync")
    result = invoke(["profile", package, "--batch-sizes", "1,2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert any(path.startswith("calib/") for path in load_manifest(package).files)
    out, _ = bundle(package, tmp_path / "profiled.bundle")
    assert not (out / "calib").exists()
    assert not any(path.startswith("calib/") for path in load_manifest(out).files)


@pytest.mark.parametrize(("jetpack", "device", "precision", "says"), [
    ("5.1", "orin", "fp16", "JetPack 5"),
    ("6.0", "orin", "fp16", "JetPack 6.0"),
    ("6.2", "orin", "fp8", "FP8"),
    ("6.3", "orin", "fp16", "JetPack 6.3"),
    ("6.2", "thor", "fp16", "thor"),
])
def test_the_gates_refuse_in_one_line_before_writing(tiny: Path, tmp_path: Path, jetpack: str, device: str,
                                                      precision: str, says: str) -> None:
    with pytest.raises(InputError, match=says) as error:
        bundle(tiny, tmp_path / "refused.bundle", jetpack=jetpack, device=device, precision=precision)
    assert_one_line(error)
    assert list(tmp_path.iterdir()) == []


def test_a_package_without_int8_stages_is_refused(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dync quantize") as error:
        bundle(tiny, tmp_path / "int8.bundle", precision="int8")
    assert_one_line(error)
    assert list(tmp_path.iterdir()) == []


def test_an_occupied_output_is_refused_and_a_previous_bundle_replaced(tiny: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a dync bundle") as error:
        bundle(tiny, occupied)
    assert_one_line(error)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    with pytest.raises(ExportError, match="package itself") as error:
        bundle(tiny, tiny)
    assert_one_line(error)
    out, _ = bundle(tiny, tmp_path / "again.bundle", jetpack="6.1")
    (out / "engines" / "stale.plan").write_bytes(b"old")
    _, record = bundle(tiny, out)
    assert read_bundle(out) == record and record.jetpack == "6.2"
    assert not (out / "engines" / "stale.plan").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.bundle", "occupied"], "staging left behind"


def test_without_polygraphy_the_bundle_says_how_to_install_it(tiny: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    with pytest.raises(InstallError, match=r'pip install "dync\[build\]"') as error:
        bundle(tiny, tmp_path / "no_polygraphy.bundle")
    assert_one_line(error)
    assert list(tmp_path.iterdir()) == []
