"""Exit criteria through export and run: a package exits where a PyTorch evaluation of the same criterion and
thresholds says; a user criterion (`module:function`) travels as a checked ONNX graph; bad criteria are refused
with one sentence naming them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import dync
from dync.bench import bench
from dync.calib.calibrate import BudgetRequest, calibrate_package
from dync.errors import InputError
from dync.exporter.criterion import parse_criterion
from tests.conftest import CliExport, invoke
from tests.criteria_fixture import TORCH_CRITERIA, top1_minus_mean
from tests.helpers import eager_outputs, expected_exits, spread_thresholds
from tests.models import TINY_SHAPE, tiny_model
from zoo import random_input

CUSTOM = "tests.criteria_fixture:top1_minus_mean"
CLASSES = 10


@pytest.fixture(scope="module")
def custom_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(dync.export(tiny_model(), tmp_path_factory.mktemp("criterion") / "custom.dync",
                            input_shape=TINY_SHAPE, criterion=CUSTOM))


def _exits_as_pytorch_evaluates(package: Path, criterion: object) -> None:
    """Thresholds spreading 60 samples over the exits by the PyTorch criterion on eager logits (kept 1e-4 from
    every confidence) send each sample where the package sends it."""
    model, engine = tiny_model(), dync.load(package)
    x = random_input(TINY_SHAPE[1:], 60, seed=3)
    outputs = eager_outputs(model, x)
    confidences = [criterion(torch.from_numpy(o)).numpy() for o in outputs]  # type: ignore[operator]
    plan = spread_thresholds(confidences)
    assert all(count > 0 for count in plan.counts), plan
    np.testing.assert_array_equal(engine.run(x, thresholds=plan.thresholds).exit,
                                  expected_exits(confidences, plan.thresholds))
    for got, expected in zip(engine.criteria.confidences(outputs), confidences, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_custom_criterion_is_a_graph_in_the_package(custom_package: Path) -> None:
    manifest = dync.load(custom_package).manifest
    path = f"criteria/top1_minus_mean_c{CLASSES}.onnx"
    assert [(e.criterion, e.criterion_onnx) for e in manifest.exits] == [(CUSTOM, path)] * 3
    assert manifest.verification is not None and manifest.verification.passed
    graph = onnx.load(custom_package / path).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)]
    assert dims == [["batch", CLASSES], ["batch"]]


def test_custom_criterion_exits_as_pytorch_evaluates(custom_package: Path) -> None:
    _exits_as_pytorch_evaluates(custom_package, top1_minus_mean)


def test_custom_criterion_package_is_relocatable_and_inspected(custom_package: Path, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(custom_package, tmp_path / "moved.dync"))
    x = random_input(TINY_SHAPE[1:], 7, seed=1)
    np.testing.assert_array_equal(dync.load(moved).run(x, thresholds=[0.2, 0.2]).exit,
                                  dync.load(custom_package).run(x, thresholds=[0.2, 0.2]).exit)
    text = invoke(["inspect", moved]).stdout
    assert "| criterion |" in text and f"| {CUSTOM} |" in text
    described = json.loads(invoke(["inspect", moved, "--json"]).stdout)["exits"][0]
    assert described["criterion"] == CUSTOM and described["criterion_onnx"].startswith("criteria/")


def test_calibrate_and_bench_use_the_custom_criterion(custom_package: Path, tmp_path: Path) -> None:
    package = Path(shutil.copytree(custom_package, tmp_path / "calibrated.dync"))
    data = random_input(TINY_SHAPE[1:], 200, seed=11)
    result = calibrate_package(dync.load(package), data, BudgetRequest(budget=0.5))
    engine = dync.load(package)
    np.testing.assert_array_equal(np.bincount(engine.run(data).exit, minlength=3), result.chosen.exit_counts)
    report = bench(engine, data[:40], thresholds=None, repeats=1, warmup=0)
    assert report.threshold_source == "package" and sum(report.exit_counts) == 40
    spread = bench(dync.load(custom_package), data[:40], repeats=1, warmup=0)
    assert spread.threshold_source == "even split of this data" and min(spread.exit_counts) > 0


@pytest.mark.parametrize("name", ["entropy", "margin"])
def test_builtin_criterion_exits_as_pytorch_evaluates(name: str, tmp_path: Path) -> None:
    package = Path(dync.export(tiny_model(), tmp_path / f"{name}.dync", input_shape=TINY_SHAPE, criterion=name))
    assert [(e.criterion, e.criterion_onnx) for e in dync.load(package).manifest.exits] == [(name, None)] * 3
    assert not (package / "criteria").exists()
    _exits_as_pytorch_evaluates(package, TORCH_CRITERIA[name])


def test_cli_exports_with_a_criterion(cli_export: CliExport, tmp_path: Path) -> None:
    package = tmp_path / "margin.dync"
    result = invoke(["export", cli_export.model_path, "-o", package, "--input-shape", "x".join(map(str, TINY_SHAPE)),
                     "--criterion", "margin", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "| margin |" in invoke(["inspect", package]).stdout


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("entropyy", ["'entropyy' is neither a built-in", "max_softmax, entropy, margin", "module:function"]),
        ("a:b:c", ["neither a built-in"]),
        ("tests.criteria_fixture:", ["neither a built-in"]),
        ("no_such_module_here:score", ["module 'no_such_module_here' cannot be imported", "PYTHONPATH"]),
        ("tests.criteria_fixture:nothing", ["defines nothing named 'nothing'", "criteria_fixture.py"]),
        ("tests.criteria_fixture:NOT_A_FUNCTION", ["defines a float named 'NOT_A_FUNCTION'"]),
    ],
)
def test_unusable_names_are_refused(spec: str, words: list[str]) -> None:
    with pytest.raises(InputError) as info:
        parse_criterion(spec)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ("per_class", ["returned shape [1, 10] for logits [1, 10]", "shape [1]"]),
        ("raw_margin", ["outside [0, 1]", "map it into [0, 1]"]),
        ("integer_votes", ["returned torch.int64, not a float tensor"]),
        ("broken", ["failed on float32 logits", "ValueError: this criterion is broken"]),
        ("branchy", ["cannot be exported to ONNX", "GuardOnDataDependentSymNode", "Python branches"]),
        ("drifting", ["exported to ONNX disagrees with the PyTorch function", "(by up to"]),
    ],
)
def test_unusable_functions_are_refused(function: str, words: list[str]) -> None:
    spec = f"tests.criteria_fixture:{function}"
    with pytest.raises(InputError) as info:
        parse_criterion(spec).graph(CLASSES)
    message = str(info.value)
    assert message.startswith(f"exit criterion '{spec}'") and "\n" not in message
    for word in words:
        assert word in message


def test_cli_refuses_a_bad_criterion_and_writes_nothing(cli_export: CliExport, tmp_path: Path) -> None:
    for spec in ("nope", "tests.criteria_fixture:per_class"):
        package = tmp_path / "bad.dync"
        result = invoke(["export", cli_export.model_path, "-o", package, "--input-shape",
                         "x".join(map(str, TINY_SHAPE)), "--criterion", spec])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert f"error: exit criterion '{spec}'" in result.stderr and "Traceback" not in result.output
        assert not package.exists()
