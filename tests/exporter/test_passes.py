"""The pass contract: one ordered list of passes, each with its switch, its forms and its record type; the
plugins form passes dync's TensorRT lint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dync
from dync.errors import InputError
from dync.exporter.passes import FORMS, PASSES
from dync.lint import lint_package
from dync.records import PASS_RECORDS
from tests.conftest import CliExport, invoke
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.arc import ARC_ZOO
from zoo.spatial import SPATIAL_ZOO, force_masks
from zoo.tokens import TOKENS_ZOO, set_kept_fraction


def test_every_pass_has_a_record_type_and_known_forms() -> None:
    assert [p.name for p in PASSES] == list(PASS_RECORDS) == ["spatial", "tokens", "sparse_attention", "attention"]
    assert all(p.forms and set(p.forms) <= set(FORMS) for p in PASSES)
    assert [p.name for p in PASSES if "plugins" in p.forms] == ["spatial", "sparse_attention"], \
        "only TensorRT-parsable output"


def _dyt() -> tuple[torch.nn.Module, tuple[int, ...]]:
    factory, shape = TOKENS_ZOO["dyt_tiny"]
    torch.manual_seed(0)
    model = factory()
    set_kept_fraction(model, 0.4, torch.from_numpy(random_input(shape[1:], 3, seed=3)))
    return model.eval(), shape


def test_no_pass_switches_off_that_pass_only(tmp_path: Path) -> None:
    model, shape = _dyt()
    lowered = dync.load(dync.export(model, tmp_path / "lowered.dync", input_shape=shape)).manifest
    skipped = dync.load(dync.export(model, tmp_path / "skipped.dync", input_shape=shape,
                                    skip_passes=["tokens"])).manifest
    assert lowered.records("tokens") and all(r.lowered for r in lowered.records("tokens"))
    assert skipped.records("tokens") == [] and "tokens" not in skipped.passes
    assert [r.node for r in skipped.records("attention")] == [r.node for r in lowered.records("attention")], \
        "the other passes still run"
    x = random_input(shape[1:], 3, seed=1)
    assert_close(dync.load(tmp_path / "skipped.dync").run(x).logits, eager_outputs(model, x)[-1])


def test_no_lower_spatial_is_no_pass_spatial(tmp_path: Path) -> None:
    model, shape = _dyt()
    manifest = dync.load(dync.export(model, tmp_path / "dyt.dync", input_shape=shape, lower_spatial=False)).manifest
    assert manifest.records("tokens"), "--no-lower-spatial leaves the token pass on"


def test_unknown_pass_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--no-pass tiles names no pass; the passes are spatial, tokens, "
                                         r"sparse_attention, attention"):
        dync.export(torch.nn.Linear(4, 2), tmp_path / "x.dync", input_shape=(2, 4), skip_passes=["tiles"])
    assert not (tmp_path / "x.dync").exists()


def test_cli_unknown_pass_is_one_line(cli_export: CliExport, tmp_path: Path) -> None:
    result = invoke(["export", cli_export.model_path, "-o", tmp_path / "x.dync", "--input-shape", "2x3x16x16",
                     "--no-pass", "tiles"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("error: --no-pass tiles")


def _lasnet() -> tuple[torch.nn.Module, tuple[int, ...]]:
    factory, shape = SPATIAL_ZOO["lasnet_cifar"]
    torch.manual_seed(0)
    model = factory()
    force_masks(model, 0.4, per_sample=True)
    return model, shape


def _arc() -> tuple[torch.nn.Module, tuple[int, ...]]:
    factory, shape = ARC_ZOO["arc_conv"]
    torch.manual_seed(0)
    return factory(), shape


@pytest.mark.parametrize(("make", "plugin_notes"), [(_lasnet, 4), (_arc, 1), (_dyt, 0)], ids=["lasnet", "arc", "dyt"])
def test_plugins_form_passes_the_tensorrt_lint(make, plugin_notes: int, tmp_path: Path) -> None:
    """dync:: ops with a TensorRT plugin are notes, the others are linted as their decomposition, and no pass
    whose output TensorRT's parser refuses (the token dispatch's ScatterND add, ONNX Attention) runs."""
    model, shape = make()
    package = dync.export(model, tmp_path / "plugins.dync", input_shape=shape, ops="plugins")
    report = lint_package(package)
    assert report.ok, [f.message for f in report.findings if f.severity == "error"]
    assert sum(f.code == "dync-plugin" for f in report.findings) == plugin_notes
    x = random_input(shape[1:], 2, seed=4)
    np.testing.assert_allclose(dync.load(package).run(x).logits, eager_outputs(model, x)[-1], rtol=1e-4, atol=1e-4)
