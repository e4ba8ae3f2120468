"""`dync.verify.verify` from Python: every zoo package passes against its eager model, exit selection included."""

from __future__ import annotations

from pathlib import Path

import dync
from dync.verify import verify
from tests.conftest import Exported
from tests.helpers import copy_package
from zoo import random_input


def test_every_zoo_package_verifies(zoo_export: Exported) -> None:
    exported = dync.load(zoo_export.package).manifest.verification
    record = verify(zoo_export.engine, zoo_export.model, batch=8, record=False)
    assert record.passed
    assert len(record.max_abs_error) == zoo_export.num_exits
    assert max(record.max_rel_error) < 1e-4
    assert sum(record.mixed_exit_counts) == 8 and len(record.mixed_exit_counts) == zoo_export.num_exits
    assert dync.load(zoo_export.package).manifest.verification == exported, "record=False must not touch the manifest"


def test_exit_selection_is_verified_against_the_selected_outputs(msdnet_02: Exported) -> None:
    x = random_input(msdnet_02.sample_shape, 10, seed=1)
    record = verify(msdnet_02.engine, msdnet_02.model_path, x=x, record=False)
    assert record.passed and record.batch == 10 and len(record.max_abs_error) == 2


def test_verification_is_recorded_in_the_manifest(msdnet: Exported, tmp_path: Path) -> None:
    package = copy_package(msdnet.package, tmp_path / "recorded.dync")
    record = verify(dync.load(package), msdnet.model, batch=6)
    stored = dync.load(package).manifest.verification
    assert stored is not None and stored.passed is True
    assert stored.max_abs_error == record.max_abs_error
    assert stored.rtol == 1e-4 and stored.atol == 1e-5
    assert sum(stored.mixed_exit_counts) == 6
