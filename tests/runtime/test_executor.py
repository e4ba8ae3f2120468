"""The executor against eager PyTorch: every exit path, mixed runs, and batch compaction with known outcomes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dync.runtime.exit_rule import forcing_thresholds, max_softmax
from tests.conftest import ExportCache, Exported
from tests.helpers import (
    assert_close,
    eager_outputs,
    expected_exits,
    expected_logits,
    plan_thresholds,
    recording,
    spread_thresholds,
)
from zoo import random_input
from zoo.multi_exit import ZOO


def _count_exits(name: str) -> int:
    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *ZOO[name][1][1:]))
    return 1 if isinstance(out, torch.Tensor) else len(out)


NUM_EXITS = {name: _count_exits(name) for name in ZOO}
EXIT_PATHS = [(name, k) for name, count in NUM_EXITS.items() for k in range(count)]
MULTI_EXIT = [name for name, count in NUM_EXITS.items() if count > 1]
COMPACTION_CASES = [
    (name, k, mode)
    for name in MULTI_EXIT
    for k in range(NUM_EXITS[name] - 1)
    for mode in ("all", "none", "some")
]


def _confidences(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [max_softmax(o) for o in outputs]


def _check_run(exported: Exported, x: np.ndarray, thresholds: list[float], expected_counts: list[int]) -> None:
    """Run with `thresholds` and compare exits and logits with eager, sample by sample, in input order."""
    outputs = eager_outputs(exported.model, x)
    expected = expected_exits(_confidences(outputs), thresholds)
    assert np.bincount(expected, minlength=len(outputs)).tolist() == expected_counts, "test setup: wrong plan"
    result = exported.engine.run(x, thresholds=thresholds)
    assert result.exit.dtype == np.int64 and result.exit.shape == (len(x),)
    np.testing.assert_array_equal(result.exit, expected)
    assert result.logits.shape == outputs[0].shape and result.logits.dtype == np.float32
    assert_close(result.logits, expected_logits(outputs, expected), what="mixed run")


# --------------------------------------------------------------------------- #
# Exactness of every exit path
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("name", "k"), EXIT_PATHS)
def test_forced_exit_path_matches_eager(exports: ExportCache, name: str, k: int) -> None:
    exported = exports.get(name)
    x = random_input(exported.sample_shape, 8, seed=10 + k)
    reference = eager_outputs(exported.model, x)[k]
    result = exported.engine.execute(x, forcing_thresholds(k, exported.num_exits))
    np.testing.assert_array_equal(result.exit, np.full(len(x), k))
    assert_close(result.logits, reference, what=f"{name} exit {k}")


def test_exit_count_matches_the_model(zoo_export: Exported) -> None:
    assert zoo_export.num_exits == NUM_EXITS[zoo_export.name]


def test_batch_differs_from_the_export_example(zoo_export: Exported) -> None:
    """Stages have a dynamic batch: batches smaller and larger than the example export shape run."""
    for batch in (1, 3, 11):
        x = random_input(zoo_export.sample_shape, batch, seed=batch)
        result = zoo_export.engine.run(x)
        np.testing.assert_array_equal(result.exit, np.full(batch, zoo_export.num_exits - 1))
        assert_close(result.logits, eager_outputs(zoo_export.model, x)[-1], what=f"batch {batch}")


def test_single_exit_model_returns_the_model_output(single_exit: Exported) -> None:
    x = random_input(single_exit.sample_shape, 7, seed=3)
    result = single_exit.engine.run(x)
    np.testing.assert_array_equal(result.exit, np.zeros(7, dtype=np.int64))
    assert_close(result.logits, eager_outputs(single_exit.model, x)[0])
    assert single_exit.engine.run(x, thresholds=[]).exit.tolist() == [0] * 7
    assert single_exit.engine.run(x, thresholds=[0.5]).exit.tolist() == [0] * 7


# --------------------------------------------------------------------------- #
# Mixed runs and compaction
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("name", "k", "mode"), COMPACTION_CASES)
def test_compaction_when_all_none_or_some_leave_at_an_exit(exports: ExportCache, name: str, k: int, mode: str) -> None:
    """Exit k takes all / none / about half of the samples still running; the other exits take about half."""
    exported = exports.get(name)
    num_exits = exported.num_exits
    x = random_input(exported.sample_shape, 40, seed=100 + k)
    modes = ["some"] * (num_exits - 1)
    modes[k] = mode
    plan = plan_thresholds(_confidences(eager_outputs(exported.model, x)), modes)
    with recording(exported.engine) as recorder:
        _check_run(exported, x, plan.thresholds, plan.counts)
    # Stage j ran once, on exactly the samples that had not left before it; no stage ran after all had left.
    running = len(x) - np.cumsum([0, *plan.counts[:-1]])
    expected_calls = [(f"stage{j}", {int(running[j])}) for j in range(num_exits) if running[j] > 0]
    assert recorder.calls == expected_calls


def test_mixed_run_spreads_a_large_batch(zoo_export: Exported) -> None:
    x = random_input(zoo_export.sample_shape, 300, seed=7)
    plan = spread_thresholds(_confidences(eager_outputs(zoo_export.model, x)))
    assert all(c > 0 for c in plan.counts)
    _check_run(zoo_export, x, plan.thresholds, plan.counts)


@pytest.mark.parametrize("k", range(4))
def test_batch_of_one(msdnet: Exported, k: int) -> None:
    x = random_input(msdnet.sample_shape, 1, seed=k)
    outputs = eager_outputs(msdnet.model, x)
    forced = msdnet.engine.run(x, thresholds=forcing_thresholds(k, 4).tolist())
    assert forced.exit.tolist() == [k]
    assert_close(forced.logits, outputs[k], what=f"batch 1, exit {k}")
    threshold = float(max_softmax(outputs[k])[0])
    thresholds = [2.0] * 3
    if k < 3:
        thresholds[k] = threshold - 1e-3  # reached at exit k only
    assert msdnet.engine.run(x, thresholds=thresholds).exit.tolist() == [k]


def test_thresholds_above_one_never_fire(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 16, seed=4)
    last = eager_outputs(msdnet.model, x)[-1]
    for thresholds in ([1.0 + 1e-9] * 3, [2.0, 5.0, 1e9], [np.inf] * 3):
        result = msdnet.engine.run(x, thresholds=thresholds)
        np.testing.assert_array_equal(result.exit, np.full(16, 3))
        assert_close(result.logits, last)


def test_threshold_zero_always_fires(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 16, seed=5)
    outputs = eager_outputs(msdnet.model, x)
    for k in range(3):
        thresholds = [2.0] * 3
        thresholds[k] = 0.0
        result = msdnet.engine.run(x, thresholds=thresholds)
        np.testing.assert_array_equal(result.exit, np.full(16, k))
        assert_close(result.logits, outputs[k])


def test_k_and_k_minus_one_thresholds_agree(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 32, seed=6)
    plan = spread_thresholds(_confidences(eager_outputs(msdnet.model, x)))
    short = msdnet.engine.run(x, thresholds=plan.thresholds)
    for last in (0.0, 0.5, 2.0):
        full = msdnet.engine.run(x, thresholds=[*plan.thresholds, last])
        np.testing.assert_array_equal(full.exit, short.exit)
        np.testing.assert_array_equal(full.logits, short.logits)
    as_array = msdnet.engine.run(x, thresholds=np.asarray(plan.thresholds))
    np.testing.assert_array_equal(as_array.exit, short.exit)


def test_no_thresholds_means_every_sample_runs_to_the_last_exit(msdnet: Exported) -> None:
    assert msdnet.engine.manifest.thresholds is None
    x = random_input(msdnet.sample_shape, 9, seed=8)
    with recording(msdnet.engine) as recorder:
        result = msdnet.engine.run(x)
    assert result.exit.tolist() == [3] * 9
    assert recorder.calls == [(f"stage{k}", {9}) for k in range(4)]


def test_run_does_not_modify_its_input(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 12, seed=9)
    before = x.copy()
    msdnet.engine.run(x, thresholds=[0.3, 0.3, 0.3])
    np.testing.assert_array_equal(x, before)


def test_results_do_not_depend_on_batch_neighbours(msdnet: Exported) -> None:
    """A sample's exit and logits are the same alone and inside a mixed batch (no cross-sample mixing)."""
    x = random_input(msdnet.sample_shape, 24, seed=11)
    plan = spread_thresholds(_confidences(eager_outputs(msdnet.model, x)))
    together = msdnet.engine.run(x, thresholds=plan.thresholds)
    for i in (0, 5, 23):
        alone = msdnet.engine.run(x[i : i + 1], thresholds=plan.thresholds)
        assert alone.exit[0] == together.exit[i]
        assert_close(alone.logits[0], together.logits[i], rel=1e-5, what=f"sample {i}")


def test_permuting_the_batch_permutes_the_results(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 30, seed=12)
    plan = spread_thresholds(_confidences(eager_outputs(msdnet.model, x)))
    order = np.random.default_rng(0).permutation(len(x))
    straight = msdnet.engine.run(x, thresholds=plan.thresholds)
    permuted = msdnet.engine.run(np.ascontiguousarray(x[order]), thresholds=plan.thresholds)
    np.testing.assert_array_equal(permuted.exit, straight.exit[order])
    assert_close(permuted.logits, straight.logits[order], rel=1e-5)


def test_example_input_matches_the_package_input(msdnet: Exported) -> None:
    x = msdnet.engine.example_input(5)
    assert x.shape == (5, *msdnet.sample_shape) and x.dtype == np.float32
    np.testing.assert_array_equal(x, msdnet.engine.example_input(5))
    assert not np.array_equal(x, msdnet.engine.example_input(5, seed=1))
