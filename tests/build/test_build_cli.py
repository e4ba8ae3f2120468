"""`dync build` and `--backend trt` from the command line, on a machine without TensorRT: one clear line each."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CliExport, invoke
from tests.models import TINY_SHAPE

needs_no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                       reason="checks the message given where TensorRT is missing")


def _ok(cli_export: CliExport) -> Path:
    assert cli_export.result.exit_code == 0, cli_export.result.output
    return cli_export.package


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@needs_no_tensorrt
def test_build_for_trt_without_tensorrt_names_the_extra(cli_export: CliExport) -> None:
    line = _one_error_line(invoke(["build", _ok(cli_export), "--target", "trt"]))
    assert 'pip install "dync[trt]"' in line and "JetPack" in line


@needs_no_tensorrt
def test_run_on_the_trt_backend_without_tensorrt_names_the_extra(cli_export: CliExport, tmp_path: Path) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(TINY_SHAPE, dtype=np.float32))
    line = _one_error_line(invoke(["run", _ok(cli_export), "--backend", "trt", "--input", x, "-o", tmp_path / "o.npz"]))
    assert 'pip install "dync[trt]"' in line


@pytest.mark.parametrize(("args", "words"), [
    (["--target", "jetson"], "--jetpack"),
    (["--target", "trt", "--jetpack", "6.2"], "--target jetson"),
    (["--target", "trt", "--batch", "8:4:16"], "MIN:OPT:MAX"),
    (["--target", "jetson", "--jetpack", "5.1.2", "-o", "BUNDLE"], "JetPack 5"),
    (["--target", "jetson", "--jetpack", "6.2", "--plugins", "aot", "-o", "BUNDLE"], "fixes the plugin mode"),
])
def test_build_options_that_do_not_fit_are_one_line(cli_export: CliExport, tmp_path: Path, args: list[str],
                                                    words: str) -> None:
    args = [str(tmp_path / "bundle") if a == "BUNDLE" else a for a in args]
    assert words in _one_error_line(invoke(["build", _ok(cli_export), *args]))


def test_providers_and_engine_batch_belong_to_their_backends(cli_export: CliExport, tmp_path: Path) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(TINY_SHAPE, dtype=np.float32))
    out = tmp_path / "o.npz"
    base = ["run", _ok(cli_export), "--input", x, "-o", out]
    assert "--backend trt" in _one_error_line(invoke([*base, "--engine-batch", "1:8:16"]))
    assert "onnxruntime-gpu" in _one_error_line(invoke([*base, "--providers", "CUDAExecutionProvider"]))
    assert "TensorRT engines only" in _one_error_line(invoke([*base, "--precision", "fp16"]))


def test_build_for_jetson_writes_a_bundle_from_the_command_line(cli_export: CliExport, tmp_path: Path) -> None:
    bundle = tmp_path / "orin"
    result = invoke(["build", _ok(cli_export), "--target", "jetson", "--jetpack", "6.2", "--precision", "fp16",
                     "--batch", "1:4:8", "-o", bundle])
    assert result.exit_code == 0, result.output
    assert "JetPack 6.2 on orin (TensorRT 10.3, fp16, plugins decomposed)" in result.output
    assert (bundle / "build.sh").is_file() and (bundle / "bundle.json").is_file()
    shown = invoke(["inspect", bundle])
    assert shown.exit_code == 0, shown.output
