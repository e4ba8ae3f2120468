"""Calibrating a real package: thresholds stored and used, bad input refused, plots written, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dync
from dync.calib.calibrate import BudgetRequest, calibrate_package
from dync.calib.plot import plot_calibration
from dync.errors import InputError, PackageError
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package, eager_outputs
from tests.models import TINY_SHAPE
from zoo import random_input


@pytest.fixture
def package(cli_export: CliExport, tmp_path: Path) -> Path:
    return copy_package(cli_export.package, tmp_path / "tiny.dync")


@pytest.fixture
def data() -> np.ndarray:
    return random_input(TINY_SHAPE[1:], 200, seed=11)


def test_thresholds_are_stored_and_used_by_run(package: Path, data: np.ndarray) -> None:
    engine = dync.load(package)
    result = calibrate_package(engine, data, BudgetRequest(budget=0.5))
    reloaded = dync.load(package)
    assert reloaded.manifest.thresholds == pytest.approx([min(t, 2.0) for t in result.chosen.thresholds])
    assert reloaded.manifest.calibration.expected_cost == pytest.approx(result.chosen.cost)
    exits = reloaded.run(data).exit
    np.testing.assert_array_equal(np.bincount(exits, minlength=3), result.chosen.exit_counts)


def test_labels_give_accuracy(cli_export: CliExport, package: Path, data: np.ndarray) -> None:
    labels = eager_outputs(cli_export.model, data)[-1].argmax(axis=1)
    result = calibrate_package(dync.load(package), data, BudgetRequest(budget=0.6), labels=labels)
    assert result.chosen.accuracy is not None and 0 <= result.chosen.accuracy <= 1
    assert result.anytime[-1][1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (BudgetRequest(budget=None), "exactly one of --budget"),
        (BudgetRequest(budget=0.5, budget_ms=3.0, metric="latency"), "exactly one of --budget"),
        (BudgetRequest(budget_ms=3.0), "add --metric latency"),
        (BudgetRequest(budget=-0.1), "must be a positive fraction"),
        (BudgetRequest(budget=0.5, metric="energy"), "metric 'energy' is unknown"),
    ],
)
def test_bad_requests(package: Path, data: np.ndarray, request_: BudgetRequest, message: str) -> None:
    with pytest.raises(InputError, match=message):
        calibrate_package(dync.load(package), data, request_)


def test_data_of_the_wrong_shape(package: Path) -> None:
    with pytest.raises(InputError, match="expects"):
        calibrate_package(dync.load(package), np.zeros((5, 3, 8, 8), np.float32), BudgetRequest(budget=0.5))


def test_labels_of_the_wrong_length(package: Path, data: np.ndarray) -> None:
    with pytest.raises(InputError, match="200 samples"):
        calibrate_package(dync.load(package), data, BudgetRequest(budget=0.5), labels=np.zeros(7, np.int64))


def test_latency_metric_needs_a_profile(package: Path, data: np.ndarray) -> None:
    with pytest.raises(PackageError, match=r"no latency profile.*dync profile"):
        calibrate_package(dync.load(package), data, BudgetRequest(budget=0.5, metric="latency"))


@pytest.mark.parametrize("with_labels", [True, False])
def test_plot_is_written(cli_export: CliExport, package: Path, data: np.ndarray, tmp_path: Path,
                         with_labels: bool) -> None:
    labels = eager_outputs(cli_export.model, data)[-1].argmax(axis=1) if with_labels else None
    result = calibrate_package(dync.load(package), data, BudgetRequest(budget=0.5), labels=labels)
    path = plot_calibration(result, tmp_path / "calib.png", "flops")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_calibrate_round_trip(cli_export: CliExport, package: Path, data: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "val.npy", data)
    np.save(tmp_path / "labels.npy", eager_outputs(cli_export.model, data)[-1].argmax(axis=1))
    result = invoke(["calibrate", package, "--data", tmp_path / "val.npy", "--labels", tmp_path / "labels.npy",
                     "--budget", "0.5", "--plot", tmp_path / "c.png"])
    assert result.exit_code == 0, result.output
    assert "anytime" in result.output and (tmp_path / "c.png").is_file()
    assert invoke(["inspect", package, "--json"]).output.count('"threshold": null') == 1  # only the last exit


def test_cli_budget_below_minimum_is_one_line(package: Path, data: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "val.npy", data)
    result = invoke(["calibrate", package, "--data", tmp_path / "val.npy", "--budget", "0.0001"])
    assert result.exit_code == 1
    assert "cheapest achievable cost" in result.output and "Traceback" not in result.output


def test_cli_profile_then_latency_calibration_and_bench_prediction(package: Path, data: np.ndarray,
                                                                   tmp_path: Path) -> None:
    profiled = invoke(["profile", package, "--batch-sizes", "1,8", "--repeats", "2"])
    assert profiled.exit_code == 0, profiled.output
    np.save(tmp_path / "val.npy", data)
    calibrated = invoke(["calibrate", package, "--data", tmp_path / "val.npy", "--metric", "latency",
                         "--budget", "0.6", "--batch-size", "8"])
    assert calibrated.exit_code == 0, calibrated.output
    report = json.loads(invoke(["bench", package, "--batch", "8", "--repeats", "2", "--json"]).stdout)
    assert report["threshold_source"] == "package" and report["predicted_over_measured"] > 0
