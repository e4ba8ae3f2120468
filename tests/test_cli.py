"""The command line, round trip: export -> inspect -> run -> verify -> bench, on the tiny 3-exit model."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import dync
from dync.runtime.exit_rule import max_softmax
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package, eager_outputs, expected_exits, rehash, spread_thresholds
from tests.models import TINY_SHAPE, tiny_model
from zoo import random_input

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SHAPE = TINY_SHAPE[1:]


def _assert_clean_failure(result: object, *words: str) -> str:
    """A user error: exit status 1, one `error:` line naming the problem, no traceback."""
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 1, output  # type: ignore[attr-defined]
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # type: ignore[attr-defined]
    assert "Traceback" not in output
    assert "error: " in result.stderr  # type: ignore[attr-defined]
    for word in words:
        assert word in output, f"{word!r} not in {output!r}"
    return output


def _save_input(path: Path, batch: int, seed: int) -> np.ndarray:
    x = random_input(SAMPLE_SHAPE, batch, seed=seed)
    np.save(path, x)
    return x


def _thresholds_arg(values: list[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def test_export_writes_a_package_and_a_summary(cli_export: CliExport) -> None:
    result = cli_export.result
    assert result.exit_code == 0, result.output
    assert f"{cli_export.package}: 3 stage(s)" in result.stdout
    assert "MMACs/sample" in result.stdout
    assert "dync: capturing" in result.stderr and f"dync: wrote {cli_export.package}" in result.stderr
    assert dync.load(cli_export.package).num_exits == 3


def test_inspect_json(cli_export: CliExport) -> None:
    result = invoke(["inspect", cli_export.package, "--json"])
    assert result.exit_code == 0, result.output
    description = json.loads(result.stdout)
    manifest = dync.load(cli_export.package).manifest
    exits = description["exits"]
    assert [e["index"] for e in exits] == [0, 1, 2]
    flops = [e["cumulative_flops"] for e in exits]
    assert all(a < b for a, b in itertools.pairwise(flops)), f"cumulative_flops not increasing: {flops}"
    assert flops == [e.cumulative_macs for e in manifest.exits]
    assert [e["threshold"] for e in exits] == [None, None, None]
    assert description["thresholds"] is None
    assert exits[-1]["fraction_of_full"] == 1.0
    assert [s["name"] for s in description["stages"]] == ["stage0", "stage1", "stage2"]
    assert description["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", *SAMPLE_SHAPE],
                                      "value_range": None}]
    assert description["verification"]["passed"] is True, "export verifies the package it writes"
    assert description["verification"]["batches"] == [4, 1, 3]


def test_inspect_text(cli_export: CliExport) -> None:
    result = invoke(["inspect", cli_export.package])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("package tiny (format 1), input input float32['batch', 3, 16, 16]")
    for k in range(3):
        assert f"| {k} | stage{k} |" in text
    assert "100.0%" in text
    assert "thresholds: none stored" in text
    assert "verification: passed" in text


def test_run_writes_what_the_engine_computes(cli_export: CliExport, tmp_path: Path) -> None:
    x = _save_input(tmp_path / "x.npy", 30, seed=1)
    outputs = eager_outputs(cli_export.model, x)
    plan = spread_thresholds([max_softmax(o) for o in outputs])
    out = tmp_path / "out.npz"
    result = invoke(["run", cli_export.package, "--input", tmp_path / "x.npy", "--thresholds",
                     _thresholds_arg(plan.thresholds), "-o", out])
    assert result.exit_code == 0, result.output
    assert f"30 samples, exit counts {plan.counts}" in result.stdout
    with np.load(out) as saved:
        assert sorted(saved.files) == ["exit", "logits"]
        logits, exits = saved["logits"], saved["exit"]
    reference = dync.load(cli_export.package).run(x, thresholds=plan.thresholds)
    np.testing.assert_array_equal(exits, reference.exit)
    np.testing.assert_allclose(logits, reference.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(exits, expected_exits([max_softmax(o) for o in outputs], plan.thresholds))


def test_run_without_thresholds_uses_the_last_exit(cli_export: CliExport, tmp_path: Path) -> None:
    x = _save_input(tmp_path / "x.npy", 5, seed=2)
    out = tmp_path / "out.npz"
    result = invoke(["run", cli_export.package, "--input", tmp_path / "x.npy", "-o", out, "--threads", "1"])
    assert result.exit_code == 0, result.output
    with np.load(out) as saved:
        assert saved["exit"].tolist() == [2] * 5
        np.testing.assert_allclose(saved["logits"], eager_outputs(cli_export.model, x)[2], rtol=1e-4, atol=1e-5)


def test_verify_passes_and_is_recorded(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "verified.dync")
    result = invoke(["verify", package, "--model", cli_export.model_path, "--batch", "12"])
    assert result.exit_code == 0, result.output
    assert f"verified {package}: every exit path matches eager" in result.stdout
    for k in range(3):
        assert f"dync: exit {k}: max abs error" in result.stderr
    record = dync.load(package).manifest.verification
    assert record is not None and record.passed is True and record.batch == 12
    assert sum(record.mixed_exit_counts) == 12
    assert "verification: passed" in invoke(["inspect", package]).stdout


def test_verify_with_an_input_file(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "verified.dync")
    _save_input(tmp_path / "x.npy", 9, seed=3)
    result = invoke(["verify", package, "--model", cli_export.model_path, "--input", tmp_path / "x.npy"])
    assert result.exit_code == 0, result.output
    assert dync.load(package).manifest.verification.batch == 9


def _scale_largest_weight(stage_file: Path, factor: float) -> None:
    model = onnx.load(stage_file)
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(largest) * np.asarray(factor, dtype=np.float32)
    largest.CopyFrom(numpy_helper.from_array(values.astype(numpy_helper.to_array(largest).dtype), largest.name))
    onnx.save(model, stage_file)


def test_verify_fails_on_corrupted_weights(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "corrupt.dync")
    _scale_largest_weight(package / "stages" / "stage1.onnx", 1.5)
    assert "changed after it was written" in invoke(["verify", package, "--model", cli_export.model_path]).stderr
    rehash(package)  # weights edited together with the file list: verification is what catches it then
    result = invoke(["verify", package, "--model", cli_export.model_path])
    _assert_clean_failure(result, "disagrees with eager PyTorch", "exit 1")
    record = dync.load(package).manifest.verification
    assert record is not None and record.passed is False
    assert record.max_abs_error[0] < 1e-4 < record.max_abs_error[1]
    assert "verification: FAILED" in invoke(["inspect", package]).stdout


def test_verify_fails_against_a_different_model(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "other.dync")
    other = tmp_path / "other.pt"
    torch.save(tiny_model(seed=1), other)
    _assert_clean_failure(invoke(["verify", package, "--model", other]), "disagrees", "exit 0")


def test_bench_json(cli_export: CliExport) -> None:
    result = invoke(["bench", cli_export.package, "--repeats", "2", "--batch", "12", "--json", "--threads", "1",
                     "--fixed-batches", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {
        "batch", "thresholds", "threshold_source", "exit_counts", "theoretical_speedup", "realized_speedup",
        "ideal_speedup", "efficiency", "forced_exit_speedup", "static_ms", "dync_ms", "settings",
    }
    assert report["batch"] == 12
    assert len(report["thresholds"]) == 2
    assert report["threshold_source"] == "even split of this data"
    assert sum(report["exit_counts"]) == 12 and len(report["exit_counts"]) == 3
    assert len(report["forced_exit_speedup"]) == 3
    assert report["settings"]["backend"] == "ort" and report["settings"]["intra_op_threads"] == 1
    assert report["settings"]["fixed_batches"] == 0
    cumulative = np.array([e.cumulative_macs for e in dync.load(cli_export.package).manifest.exits], dtype=float)
    shares = np.array(report["exit_counts"]) / 12
    assert report["theoretical_speedup"] == pytest.approx(cumulative[-1] / (shares @ cumulative), rel=1e-12)


def test_bench_text_with_given_thresholds(cli_export: CliExport, tmp_path: Path) -> None:
    _save_input(tmp_path / "x.npy", 8, seed=4)
    result = invoke(["bench", cli_export.package, "--repeats", "1", "--input", tmp_path / "x.npy",
                     "--thresholds", "2,2"])
    assert result.exit_code == 0, result.output
    assert "batch 8, thresholds [2.0, 2.0] (given)" in result.stdout
    assert "exit counts [0, 0, 8]" in result.stdout
    assert "| theoretical speedup (MACs) | 1.00x |" in result.stdout


def test_export_with_exit_selection(cli_export: CliExport, tmp_path: Path) -> None:
    package = tmp_path / "selected.dync"
    shape = "x".join(map(str, TINY_SHAPE))
    result = invoke(["export", cli_export.model_path, "-o", package, "--input-shape", shape, "--exits", "0,2"])
    assert result.exit_code == 0, result.output
    engine = dync.load(package)
    assert engine.num_exits == 2 and engine.manifest.exit_selection == [0, 2]
    result = invoke(["verify", package, "--model", cli_export.model_path, "--batch", "6"])
    assert result.exit_code == 0, result.output
    x = random_input(SAMPLE_SHAPE, 6, seed=5)
    reference = eager_outputs(cli_export.model, x)
    np.testing.assert_allclose(engine.run(x).logits, reference[2], rtol=1e-4, atol=1e-5)


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0 and dync.__version__ in result.output


# --------------------------------------------------------------------------- #
# The installed console script
# --------------------------------------------------------------------------- #


def _console_script() -> Path:
    script = Path(sys.executable).parent / "dync"
    if not script.is_file():
        pytest.skip(f"no dync console script beside {sys.executable}")
    return script


def _run_script(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(_console_script()), *map(str, args)], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_console_script_verifies_a_pickled_model(cli_export: CliExport, tmp_path: Path) -> None:
    """The pickled tiny model's class is importable only with the repository on PYTHONPATH."""
    package = copy_package(cli_export.package, tmp_path / "script.dync")
    done = _run_script("verify", package, "--model", cli_export.model_path, "--batch", "4")
    assert done.returncode == 0, done.stderr
    assert "every exit path matches eager" in done.stdout


def test_console_script_fails_cleanly(tmp_path: Path) -> None:
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello\n")
    done = _run_script("export", not_a_model, "-o", tmp_path / "out.dync")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("dync: loading") or done.stderr.startswith("error:")
    assert f"error: {not_a_model} is not a PyTorch model file" in done.stderr
    assert not (tmp_path / "out.dync").exists()


def test_inspect_target_trt_lints_every_stage(cli_export: CliExport) -> None:
    result = invoke(["inspect", cli_export.package, "--target", "trt"])
    assert result.exit_code == 0, result.output
    assert "ops needing a plugin: none" in result.output
    lint = json.loads(invoke(["inspect", cli_export.package, "--target", "trt", "--json"]).stdout)["lint"]
    assert lint["counts"]["error"] == 0
