"""Latency profiles: interpolation and batch prediction on hand-made numbers, storage in a package, and
profiling a real (tiny) package, where only shapes and positivity are checked, never timings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dync
from dync.calib.profile import LatencyProfile, load_profile, profile_path, profile_stages, save_profile
from dync.errors import InputError, ProfileError
from dync.runtime.engine import Engine
from tests.models import TINY_SHAPE, tiny_model
from zoo.multi_exit import SingleExitNet

# Three stages measured at 1, 4 and 16 samples (seconds; round numbers so the expectations below are exact).
SIZES = [1, 4, 16]
SECONDS = [
    [1.0, 2.0, 5.0],  # stage 0: slope 1/3 per sample up to 4, then 3/12 = 1/4
    [2.0, 2.0, 2.0],  # stage 1: fixed cost only
    [3.0, 6.0, 18.0],  # stage 2: slope 1 per sample from 1 to 16
]
OVERHEAD = [0.3, 0.3, 0.6]  # charged as a third per stage that runs
COMPACTION = [
    [0.1, 0.4, 1.6],  # after stage 0: 0.1 per sample kept
    [0.2, 0.8, 3.2],  # after stage 1: 0.2 per sample kept
]


def hand_made(**changes: object) -> LatencyProfile:
    fields = {
        "backend": "ort",
        "settings": {"backend": "ort", "threads": 0},
        "machine": {"machine": "x86_64", "cpu_count": 2},
        "batch_sizes": SIZES,
        "seconds": SECONDS,
        "overhead": OVERHEAD,
        "compaction": COMPACTION,
    }
    return LatencyProfile(**{**fields, **changes})


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 0, 0.0),  # no samples: the stage does not run
        (0, 1, 1.0),  # measured points are returned as measured
        (0, 4, 2.0),
        (0, 16, 5.0),
        (0, 2, 1.0 + 1 / 3),  # between 1 and 4
        (0, 10, 2.0 + 6 / 4),  # between 4 and 16
        (0, 32, 5.0 + 16 / 4),  # beyond 16: the last segment's per-sample slope
        (1, 3, 2.0),
        (1, 100, 2.0),
        (2, 20, 22.0),
    ],
)
def test_stage_seconds_interpolates(k: int, n: int, expected: float) -> None:
    assert hand_made().stage_seconds(k, n) == pytest.approx(expected)


def test_extrapolation_never_gets_cheaper_and_small_batches_pay_the_first_point() -> None:
    profile = hand_made(batch_sizes=[2, 4], seconds=[[1.0, 4.0], [3.0, 2.0]], overhead=[0, 0], compaction=[[0, 0]])
    assert profile.stage_seconds(0, 1) == pytest.approx(1.0)  # below the smallest measured size
    assert profile.stage_seconds(0, 8) == pytest.approx(4.0 + 4 * 1.5)
    assert profile.stage_seconds(1, 8) == pytest.approx(2.0)  # a negative last slope (noise) is not extrapolated


def test_single_batch_size_scales_per_sample_beyond_it() -> None:
    profile = hand_made(batch_sizes=[4], seconds=[[2.0]], overhead=[0.0], compaction=[])
    assert [profile.stage_seconds(0, n) for n in (0, 1, 4, 8)] == pytest.approx([0.0, 2.0, 2.0, 4.0])


@pytest.mark.parametrize(
    ("exits", "expected"),
    [
        # all at exit 0: stage 0 on 4, a third of overhead(4) = 0.1; nothing is compacted (nobody goes on).
        ([0, 0, 0, 0], 2.0 + 0.1),
        # none early: every stage on 4, overhead(4) in full; nothing leaves, so nothing is compacted.
        ([2, 2, 2, 2], 2.0 + 2.0 + 6.0 + 0.3),
        # two leave at exit 0: stage 0 on 4, compaction down to 2 (0.2), stages 1 and 2 on 2 (2.0, 4.0),
        # nobody leaves at exit 1, so no second compaction; overhead(4)/3 + 2 * overhead(2)/3 = 0.3.
        ([0, 2, 0, 2], 2.0 + 0.2 + 2.0 + 4.0 + 0.3),
        # the later stage is empty: exits 0 and 1 take everybody, stage 2 never runs, and after stage 1
        # nobody goes on (no compaction there).
        ([0, 1, 1, 0], 2.0 + 0.2 + 2.0 + 0.2),
        # five samples, 3 leave at exit 0, one at each later exit: stage 0 on 5 (2.25) with overhead(5)/3
        # (0.325/3), compaction to 2 (0.2), stage 1 on 2 (2.0 + 0.1), compaction to 1 (0.2), stage 2 on 1 (3.0 + 0.1).
        ([0, 0, 1, 2, 0], 2.25 + 0.325 / 3 + 0.2 + 2.1 + 0.2 + 3.1),
    ],
)
def test_predict_batch_seconds(exits: list[int], expected: float) -> None:
    assert hand_made().predict_batch_seconds(np.array(exits)) == pytest.approx(expected)


def test_prediction_ignores_sample_order_and_matches_the_full_model() -> None:
    profile = hand_made()
    exits = np.array([2, 0, 1, 0, 2, 2, 1, 0])
    assert profile.predict_batch_seconds(exits) == pytest.approx(profile.predict_batch_seconds(np.sort(exits)))
    assert profile.predict_full_seconds(6) == pytest.approx(profile.predict_batch_seconds(np.full(6, 2)))
    assert profile.predict_batch_seconds(np.array([], dtype=np.int64)) == 0.0


@pytest.mark.parametrize("exits", [[0, 3], [-1, 0], [0.5, 1.0]])
def test_prediction_rejects_bad_exits(exits: list[float]) -> None:
    with pytest.raises(InputError):
        hand_made().predict_batch_seconds(np.array(exits))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"batch_sizes": [4, 1, 16]}, "batch_sizes"),
        ({"batch_sizes": [0, 4, 16]}, "batch_sizes"),
        ({"seconds": [[1.0, 2.0], [2.0, 2.0], [3.0, 6.0]]}, "seconds"),
        ({"seconds": [[1.0, 2.0, -5.0], *SECONDS[1:]]}, "seconds"),
        ({"overhead": [0.3, float("nan"), 0.6]}, "overhead"),
        ({"compaction": COMPACTION[:1]}, "compaction"),
    ],
)
def test_inconsistent_profiles_are_rejected(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ProfileError, match=field):
        hand_made(**changes)


def test_json_round_trip() -> None:
    profile = hand_made()
    again = LatencyProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again.to_json() == profile.to_json()
    assert again.created == profile.created != ""
    single = hand_made(seconds=[[1.0, 2.0, 5.0]], compaction=[])
    assert LatencyProfile.from_json(single.to_json()).compaction.shape == (0, 3)


# --- a real package -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-exit tiny model, exported once for this module."""
    return Path(dync.export(tiny_model(), tmp_path_factory.mktemp("profile") / "tiny.dync", input_shape=TINY_SHAPE))


@pytest.fixture
def package(tiny_package: Path, tmp_path: Path) -> Path:
    """A private copy, so that stored profiles do not leak between tests."""
    return Path(shutil.copytree(tiny_package, tmp_path / "tiny.dync"))


def test_save_and_load_in_a_package(package: Path) -> None:
    profile = hand_made()
    path = save_profile(package, profile)
    assert path == package / "calib" / "profile_ort.json" == profile_path(package, "ort")
    assert load_profile(package).to_json() == profile.to_json()
    assert dync.load(package).run(np.zeros(TINY_SHAPE, np.float32)).exit.shape == (TINY_SHAPE[0],)


def test_missing_profile(package: Path) -> None:
    with pytest.raises(ProfileError, match=r"has no latency profile for backend ort; run `dync profile .*` first"):
        load_profile(package)
    save_profile(package, hand_made())
    with pytest.raises(ProfileError, match="no latency profile for backend trt"):
        load_profile(package, backend="trt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a valid latency profile"),
        ('{"format": "something else"}', "not a valid latency profile"),
        (json.dumps({**hand_made().to_json(), "seconds": [[1.0], [2.0], [3.0]]}), "seconds has shape"),
        (json.dumps({k: v for k, v in hand_made().to_json().items() if k != "overhead"}),
         "field 'overhead' is missing"),
        (json.dumps({**hand_made().to_json(), "settings": 5}), "field 'settings' is malformed"),
        (json.dumps({**hand_made().to_json(), "batch_sizes": ["one", 4, 16]}), "field 'batch_sizes' is malformed"),
        (json.dumps({**hand_made().to_json(), "compaction": [[0.1], [0.2, 0.8]]}), "field 'compaction' is malformed"),
        (json.dumps({**hand_made().to_json(), "format_version": 99}), "format_version 99 is not 1"),
        (json.dumps(hand_made(seconds=SECONDS[:2], compaction=COMPACTION[:1]).to_json()), "profiles 2 stages"),
    ],
)
def test_corrupt_profile(package: Path, content: str, message: str) -> None:
    path = profile_path(package, "ort")
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(ProfileError, match=message) as caught:
        load_profile(package)
    assert str(path) in str(caught.value) and "dync profile" in str(caught.value)


def test_profile_stages_on_a_real_package(tiny_package: Path) -> None:
    engine = dync.load(tiny_package)
    messages: list[str] = []
    profile = profile_stages(engine, batch_sizes=(4, 1), repeats=2, progress=messages.append, min_seconds=0)
    assert profile.batch_sizes == [1, 4]
    assert profile.seconds.shape == (3, 2) and np.isfinite(profile.seconds).all() and (profile.seconds > 0).all()
    assert profile.compaction.shape == (2, 2) and np.isfinite(profile.compaction).all()
    assert (profile.compaction >= 0).all()
    assert profile.overhead.shape == (2,) and np.isfinite(profile.overhead).all() and (profile.overhead >= 0).all()
    assert profile.backend == "ort" and profile.settings == engine.backend.describe()
    assert profile.machine["cpu_count"] >= 1
    assert messages and all("batch" in m for m in messages)
    predicted = profile.predict_batch_seconds(np.array([0, 1, 2, 2, 1, 0, 2]))
    assert np.isfinite(predicted) and predicted > 0


def test_profile_stages_single_exit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    package = dync.export(SingleExitNet().eval(), tmp_path / "single.dync", input_shape=TINY_SHAPE)
    profile = profile_stages(Engine.load(package), batch_sizes=(1, 4), repeats=2, min_seconds=0, passes=1)
    assert profile.seconds.shape == (1, 2) and (profile.seconds > 0).all()
    assert profile.compaction.shape == (0, 2)
    save_profile(package, profile)
    assert load_profile(package).predict_full_seconds(3) > 0


def test_profile_stages_rejects_bad_arguments(tiny_package: Path) -> None:
    with pytest.raises(InputError):
        profile_stages(dync.load(tiny_package), batch_sizes=(0, 4))
