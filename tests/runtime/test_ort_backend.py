"""The onnxruntime backend's stage sessions: fixed-shape sessions per batch size, where and as many as asked."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

import dync
from dync.errors import InputError
from dync.runtime.backends.ort import OrtSettings, StageSession
from tests.conftest import Exported
from tests.helpers import assert_close, eager_outputs
from zoo import random_input


def test_single_stage_gets_a_fixed_session_per_batch_size(single_exit: Exported) -> None:
    engine = dync.load(single_exit.package)
    stage = engine.manifest.stages[0].name
    for batch in (2, 3, 2):
        x = random_input(single_exit.sample_shape, batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(single_exit.model, x)[0], what=f"batch {batch}")
    assert engine.backend.fixed_batch_sizes() == {stage: [2, 3]}


def test_fixed_sessions_stop_at_the_limit_and_the_rest_share_the_dynamic_one(single_exit: Exported) -> None:
    engine = dync.load(single_exit.package, fixed_batches=1)
    for batch in (4, 1, 5):
        x = random_input(single_exit.sample_shape, batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(single_exit.model, x)[0], what=f"batch {batch}")
    assert list(engine.backend.fixed_batch_sizes().values()) == [[4]]


def test_no_fixed_sessions_when_turned_off(single_exit: Exported) -> None:
    engine = dync.load(single_exit.package, fixed_batches=0)
    engine.run(random_input(single_exit.sample_shape, 2, seed=0))
    assert list(engine.backend.fixed_batch_sizes().values()) == [[]]


def test_only_the_first_stage_of_an_early_exit_package_is_fixed(msdnet: Exported) -> None:
    engine = dync.load(msdnet.package)
    x = random_input(msdnet.sample_shape, 6, seed=0)
    engine.run(x, thresholds=[2.0] * (engine.num_exits - 1))  # no exit fires: every stage runs the whole batch
    sizes = list(engine.backend.fixed_batch_sizes().values())
    assert sizes[0] == [6] and all(not later for later in sizes[1:])


def test_fixed_session_takes_the_batch_as_a_static_dim(single_exit: Exported) -> None:
    session = StageSession(single_exit.package / dync.load(single_exit.package).manifest.stages[0].onnx,
                           OrtSettings(), sees_request_batch=True)
    x = random_input(single_exit.sample_shape, 3, seed=0)
    name = session._dynamic.get_inputs()[0].name
    session.run(None, {name: x})
    assert session._session(3).get_inputs()[0].shape[0] == 3
    assert not isinstance(session._dynamic.get_inputs()[0].shape[0], int)
    with pytest.raises(InvalidArgument, match="Got: 6 Expected: 3"):
        session._session(3).run(None, {name: np.concatenate([x, x])})


def test_negative_fixed_batches_is_refused() -> None:
    with pytest.raises(InputError, match="fixed_batches -1 must be >= 0"):
        OrtSettings(fixed_batches=-1)
