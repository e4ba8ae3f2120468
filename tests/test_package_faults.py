"""Faults and fuzz: every manifest field mutated, and `run` on arbitrary inputs and thresholds, each ending in
a clear one-line error or a correct result, never another exception and never a changed package."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dync
from dync.errors import DyncError
from dync.package import MANIFEST_FILE
from dync.runtime.engine import Engine
from tests.conftest import CliExport
from tests.helpers import copy_package
from tests.models import TINY_SHAPE

WRONG_VALUES: list[Any] = [None, "x", -1, 1e308, [], {}, True]


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path of every scalar in a JSON value (dict keys and list indices)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path


def _set(raw: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        raw = raw[key]
    raw[path[-1]] = value


def test_every_manifest_field_mutated_loads_or_fails_in_one_line(cli_export: CliExport, tmp_path: Path) -> None:
    """Each scalar of the manifest set to each wrong value: loading and a small run either work or raise a
    DyncError (one line at the CLI); nothing else, and the stage files are never touched."""
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    original = json.loads((package / MANIFEST_FILE).read_text())
    stages = {p.name: p.read_bytes() for p in (package / "stages").iterdir()}
    x = np.zeros((2, *TINY_SHAPE[1:]), np.float32)
    outcomes = {"loaded": 0, "refused": 0}
    for path in _leaves(original):
        for value in WRONG_VALUES:
            raw = json.loads(json.dumps(original))
            _set(raw, path, value)
            (package / MANIFEST_FILE).write_text(json.dumps(raw))
            try:
                engine = dync.load(package)
                result = engine.run(x)
                assert result.exit.shape == (2,) and ((result.exit >= 0) & (result.exit < engine.num_exits)).all()
                outcomes["loaded"] += 1
            except DyncError as error:
                assert "\n" not in str(error), f"{path} = {value!r}: {error}"
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0
    assert {p.name: p.read_bytes() for p in (package / "stages").iterdir()} == stages


_shapes = st.lists(st.integers(0, 20), min_size=0, max_size=5).map(tuple)
_dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.bool_])
_values = st.sampled_from([0.0, 1.0, -3.5, 1e30, 3e38, np.nan, np.inf])
_thresholds = st.one_of(st.none(), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4))


@pytest.fixture(scope="module")
def tiny_engine(cli_export: CliExport) -> Engine:
    return dync.load(cli_export.package)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.one_of(_shapes, st.integers(1, 9).map(lambda b: (b, *TINY_SHAPE[1:]))), dtype=_dtypes,
       value=_values, thresholds=_thresholds)
def test_run_on_any_input_is_correct_or_one_line(tiny_engine: Engine, shape: tuple, dtype: type, value: float,
                                                 thresholds: list[float] | None) -> None:
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.full(shape, value).astype(dtype)
    try:
        result = tiny_engine.run(x, thresholds=thresholds)
    except DyncError as error:
        assert "\n" not in str(error) and str(error).endswith((".", ")")), str(error)
        return
    assert x.dtype == np.float32 and x.shape[1:] == TINY_SHAPE[1:] and len(x) >= 1
    assert result.exit.shape == (len(x),) and np.isfinite(result.logits).all()
