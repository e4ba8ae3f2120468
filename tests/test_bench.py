"""`dync.bench` from Python: what it reports besides times (which tests never assert); and from the CLI, how it
refuses bad options."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

import dync
from dync.bench import bench, spreading_thresholds, time_shares
from dync.calib.thresholds import even_split_thresholds
from dync.errors import InputError
from dync.runtime.backends.kernels import EXIT_RULE
from dync.runtime.exit_rule import forcing_thresholds, max_softmax
from dync.timing import median_times
from tests.conftest import CliExport, Exported, invoke
from tests.helpers import assert_close, eager_outputs
from zoo import random_input


def test_static_full_model_computes_every_exit(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 6, seed=1)
    outputs = msdnet.engine.backend.run_static(msdnet.engine.input_feeds(x))
    reference = eager_outputs(msdnet.model, x)
    assert len(outputs) == 4
    for k, (got, ref) in enumerate(zip(outputs, reference, strict=True)):
        assert_close(got, ref, what=f"static exit {k}")
        forced = msdnet.engine.execute(x, forcing_thresholds(k, 4)).logits
        assert_close(forced, got, rel=1e-5, what=f"forced exit {k} vs static")


def test_spreading_thresholds_split_the_batch_evenly(msdnet: Exported) -> None:
    x = random_input(msdnet.sample_shape, 40, seed=2)
    thresholds = spreading_thresholds(msdnet.engine, x)
    outputs = msdnet.engine.backend.run_static(msdnet.engine.input_feeds(x))
    np.testing.assert_array_equal(thresholds, even_split_thresholds([max_softmax(o) for o in outputs]))
    counts = np.bincount(msdnet.engine.run(x, thresholds=thresholds).exit, minlength=4)
    # Each threshold equals one sample's confidence as the merged graph computes it; the stages may compute
    # that sample's confidence a few ulps lower, so it may go on to the next exit.
    assert counts.sum() == 40 and all(9 <= c <= 11 for c in counts), counts.tolist()


@pytest.mark.parametrize(
    ("thresholds", "source"),
    [(None, "even split of this data"), ([2.0, 2.0, 2.0], "given"), ([0.0, 0.0, 0.0], "given")],
)
def test_bench_report(msdnet: Exported, thresholds: list[float] | None, source: str) -> None:
    x = random_input(msdnet.sample_shape, 16, seed=3)
    report = bench(msdnet.engine, x, thresholds=thresholds, repeats=1, warmup=0)
    assert report.batch == 16 and report.threshold_source == source
    counts = np.bincount(msdnet.engine.run(x, thresholds=report.thresholds).exit, minlength=4)
    assert report.exit_counts == counts.tolist()
    cumulative = np.array([e.cumulative_macs for e in msdnet.engine.manifest.exits], dtype=np.float64)
    assert report.theoretical_speedup == pytest.approx(cumulative[-1] / (counts / 16 @ cumulative), rel=1e-12)
    assert len(report.forced_exit_speedup) == 4
    assert set(report.to_json()) >= {"realized_speedup", "efficiency", "settings"}


@pytest.mark.parametrize(("repeats", "warmup", "message"), [(0, 2, "repeats 0 must be at least 1"),
                                                             (1, -1, "warmup -1 must be at least 0")])
def test_timing_refuses_no_rounds(repeats: int, warmup: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        median_times({"nothing": lambda: None}, repeats=repeats, warmup=warmup)


def test_cli_bench_with_no_rounds_is_one_error_line(cli_export: CliExport) -> None:
    result = invoke(["bench", cli_export.package, "--batch", "4", "--repeats", "0"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Invalid value for '--repeats': 0" in errors[0], result.stderr
    assert "Traceback" not in result.output and not result.stdout


def test_median_times_alternates_blocks_each_opened_by_an_untimed_call() -> None:
    order: list[str] = []
    median_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=7, warmup=1,
                 opening_seconds=0.0)  # one untimed call per block, whatever the clock
    # warm-up a, b; then blocks of 1 untimed + 5 timed calls, the last block 1 + 2
    assert "".join(order) == "ab" + "a" * 6 + "b" * 6 + "a" * 3 + "b" * 3


@pytest.mark.parametrize("one_graph", [True, False])
def test_time_shares_cover_every_stage_and_op_type(msdnet: Exported, one_graph: bool) -> None:
    x = random_input(msdnet.sample_shape, 8, seed=4)
    thresholds = spreading_thresholds(msdnet.engine, x)
    shares = time_shares(msdnet.package, x, thresholds, runs=3, one_graph=one_graph)
    stages = [s.name for s in msdnet.engine.manifest.stages]
    assert [s for s in shares.by_stage if s != EXIT_RULE] == stages
    assert (EXIT_RULE in shares.by_stage) == one_graph
    assert {"Conv", "Gemm"} <= set(shares.by_op_type) and "If" not in shares.by_op_type
    by_op = sum(seconds for seconds, _ in shares.by_op_type.values())
    assert shares.kernel_seconds == pytest.approx(by_op) and shares.kernel_seconds > 0
    assert sum(count for _, count in shares.by_op_type.values()) >= len(stages)
    assert not list(Path(tempfile.gettempdir()).glob("dync-profile-*")), "profiles are removed"


def test_cli_bench_profile_prints_both_tables(cli_export: CliExport) -> None:
    result = invoke(["bench", cli_export.package, "--batch", "4", "--repeats", "1", "--profile"])
    assert result.exit_code == 0, result.output
    assert "where the time goes: 20 runs at batch 4" in result.stdout
    assert "| stage | share of kernel time |" in result.stdout and "| op type | share of kernel time |" in result.stdout
    for stage in dync.load(cli_export.package).manifest.stages:
        assert f"| {stage.name} | " in result.stdout
