"""The executor as one graph: the same exits and outputs as the stage-by-stage executor and as eager PyTorch, at
every batch (one sample included, which has its own form), for every built-in criterion; and the packages it
leaves to the stage-by-stage executor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import dync
from dync.bench import spreading_thresholds
from dync.package import load_manifest, write_manifest
from dync.runtime.exit_rule import forcing_thresholds
from dync.runtime.one_graph import one_graph_applies, thresholds_feed
from tests.conftest import ExportCache, Exported
from tests.helpers import assert_close, eager_outputs
from zoo import random_input

MULTI_EXIT = ("msdnet", "ranet", "dynamic_perceiver")


def _thresholds(exported: Exported) -> list[np.ndarray]:
    """Thresholds spreading another batch evenly over the exits (so no sample here sits on one), every sample
    forced to each exit, and no early exit."""
    engine = exported.engine
    spread = spreading_thresholds(engine, random_input(exported.sample_shape, 32, seed=99))
    forced = [forcing_thresholds(k, engine.num_exits) for k in range(engine.num_exits)]
    return [spread, *forced, np.full(engine.num_exits - 1, 2.0)]


def _assert_same_run(one: dync.Engine, stages: dync.Engine, x: np.ndarray, thresholds: np.ndarray) -> None:
    got, want = one.run(x, thresholds=thresholds), stages.run(x, thresholds=thresholds)
    np.testing.assert_array_equal(got.exit, want.exit)
    assert_close(got.logits, want.logits, what=f"one graph at batch {len(x)}, thresholds {thresholds}")


@pytest.mark.parametrize("name", MULTI_EXIT)
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_one_graph_runs_as_the_stage_by_stage_executor(exports: ExportCache, name: str, batch: int) -> None:
    exported = exports.get(name)
    one = dync.load(exported.package)
    stages = dync.load(exported.package, one_graph=False)
    x = random_input(exported.sample_shape, batch, seed=batch)
    for thresholds in _thresholds(exported):
        _assert_same_run(one, stages, x, thresholds)
    assert one.backend._executor_session(batch == 1) is not None


def test_one_graph_outputs_are_each_samples_eager_exit(msdnet: Exported) -> None:
    engine = dync.load(msdnet.package)
    x = random_input(msdnet.sample_shape, 9, seed=3)
    result = engine.run(x, thresholds=_thresholds(msdnet)[0])
    assert len(set(result.exit.tolist())) > 1, "the thresholds should spread this batch over several exits"
    eager = eager_outputs(msdnet.model, x)
    for i, k in enumerate(result.exit):
        assert_close(result.logits[i], eager[k][i], what=f"sample {i} at exit {k}")


@pytest.mark.parametrize("criterion", ["entropy", "margin"])
def test_one_graph_computes_each_builtin_criterion(msdnet: Exported, tmp_path: Path, criterion: str) -> None:
    package = tmp_path / "criterion.dync"
    shutil.copytree(msdnet.package, package)
    manifest = load_manifest(package)
    for stage in manifest.stages:
        stage.exit.criterion = criterion
    write_manifest(package, manifest)
    one, stages = dync.load(package), dync.load(package, one_graph=False)
    x = random_input(msdnet.sample_shape, 16, seed=5)
    spread = spreading_thresholds(stages, random_input(msdnet.sample_shape, 32, seed=98))
    for batch in (1, 16):
        _assert_same_run(one, stages, x[:batch], spread)
    assert len(set(one.run(x, thresholds=spread).exit.tolist())) > 1


def test_thresholds_above_one_never_fire_in_the_graph() -> None:
    """Rounded to float32, 1 + 1e-9 would be 1.0, which a saturated sample reaches: it must stay above."""
    feed = thresholds_feed(np.array([1 + 1e-9, 1.0, 0.0, np.inf]))
    assert feed.dtype == np.float32
    np.testing.assert_array_equal(feed, [np.inf, 1.0, 0.0, np.inf])


def test_saturated_samples_take_a_threshold_of_one(msdnet: Exported) -> None:
    engine = dync.load(msdnet.package)
    x = random_input(msdnet.sample_shape, 4, seed=0) * 1e4  # saturates the softmax of every exit
    stages = dync.load(msdnet.package, one_graph=False)
    for thresholds in ([1.0] * (engine.num_exits - 1), [1 + 1e-9] * (engine.num_exits - 1)):
        _assert_same_run(engine, stages, x, np.asarray(thresholds))


def test_single_exit_and_user_criteria_run_stage_by_stage(single_exit: Exported, msdnet: Exported,
                                                           tmp_path: Path) -> None:
    assert not one_graph_applies(single_exit.engine.manifest)
    package = tmp_path / "user_criterion.dync"
    shutil.copytree(msdnet.package, package)
    manifest = load_manifest(package)
    manifest.stages[1].exit.criterion_onnx = "criteria/user.onnx"
    assert not one_graph_applies(manifest)
    assert one_graph_applies(msdnet.engine.manifest)
    stages = dync.load(msdnet.package, one_graph=False)
    feeds = stages.input_feeds(random_input(msdnet.sample_shape, 2, seed=0))
    assert stages.backend.run_executor(feeds, np.zeros(msdnet.num_exits - 1)) is None
