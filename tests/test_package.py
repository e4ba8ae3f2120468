"""The package on disk: manifest contents, round trips, stored thresholds, relocation, overwriting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

import dync
from dync.package import (
    BATCH_DIM,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    load_manifest,
    write_manifest,
)
from tests.conftest import Exported
from tests.helpers import assert_close, copy_package, eager_outputs
from tests.models import TINY_SHAPE, tiny_model
from zoo import random_input


def test_manifest_describes_the_program(zoo_export: Exported) -> None:
    manifest = load_manifest(zoo_export.package)
    raw = json.loads((zoo_export.package / MANIFEST_FILE).read_text())
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == FORMAT_VERSION
    assert manifest.name == zoo_export.package.name.removesuffix(".dync")
    assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [
        (zoo_export.captured.input_names[0], "float32", [BATCH_DIM, *zoo_export.sample_shape])
    ]
    assert len(manifest.stages) == zoo_export.num_exits
    for k, stage in enumerate(manifest.stages):
        assert stage.onnx == f"stages/stage{k}.onnx"
        assert (zoo_export.package / stage.onnx).is_file()
        assert stage.exit.criterion == "max_softmax"
        assert stage.exit.threshold is None
        assert stage.nodes == len(onnx.load(zoo_export.package / stage.onnx).graph.node)
        assert sum(stage.ops.values()) == stage.nodes
    assert manifest.thresholds == (None if zoo_export.num_exits > 1 else [])  # a single exit needs none
    assert manifest.exit_selection is None
    assert manifest.verification is not None and manifest.verification.passed, "export verified the package"
    assert manifest.full_macs == manifest.exits[-1].cumulative_macs
    assert sorted(p.name for p in (zoo_export.package / "stages").iterdir()) == sorted(
        f"stage{k}.onnx" for k in range(zoo_export.num_exits)
    )


def test_state_specs_match_the_probe(zoo_export: Exported) -> None:
    manifest = zoo_export.engine.manifest
    written = [w for s in manifest.stages for w in s.writes]
    assert [t.name for t in manifest.state] == written
    for spec in manifest.state:
        assert spec.shape == [BATCH_DIM, *zoo_export.probe.per_sample_shape(spec.name)]
        assert spec.dtype == str(zoo_export.probe.dtypes[spec.name])


def test_manifest_round_trips(msdnet: Exported, tmp_path: Path) -> None:
    package = copy_package(msdnet.package, tmp_path / "copy.dync")
    manifest = load_manifest(package)
    write_manifest(package, manifest)
    again = load_manifest(package)
    assert again == manifest
    assert again.to_json() == json.loads((msdnet.package / MANIFEST_FILE).read_text())


def test_stored_thresholds_are_used_when_none_are_given(msdnet: Exported, tmp_path: Path) -> None:
    package = copy_package(msdnet.package, tmp_path / "thresholds.dync")
    manifest = load_manifest(package)
    stored = [0.4, 0.3, 0.2]
    for exit_, value in zip(manifest.exits, [*stored, None], strict=True):
        exit_.threshold = value
    write_manifest(package, manifest)
    engine = dync.load(package)
    assert engine.manifest.thresholds == stored
    x = random_input(msdnet.sample_shape, 24, seed=3)
    default = engine.run(x)
    explicit = msdnet.engine.run(x, thresholds=stored)
    np.testing.assert_array_equal(default.exit, explicit.exit)
    np.testing.assert_array_equal(default.logits, explicit.logits)
    assert len(set(default.exit.tolist())) > 1, "test setup: stored thresholds should spread the batch"
    overridden = engine.run(x, thresholds=[2.0, 2.0, 2.0])
    assert overridden.exit.tolist() == [3] * 24


def test_partial_thresholds_count_as_none(msdnet: Exported, tmp_path: Path) -> None:
    package = copy_package(msdnet.package, tmp_path / "partial.dync")
    manifest = load_manifest(package)
    manifest.exits[0].threshold = 0.0
    write_manifest(package, manifest)
    assert load_manifest(package).thresholds is None


def test_package_is_relocatable(msdnet: Exported, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "moved.dync"
    moved.parent.mkdir()
    shutil.copytree(msdnet.package, moved)
    x = random_input(msdnet.sample_shape, 10, seed=4)
    thresholds = [0.4, 0.3, 0.2]
    result = dync.load(moved).run(x, thresholds=thresholds)
    reference = msdnet.engine.run(x, thresholds=thresholds)
    np.testing.assert_array_equal(result.exit, reference.exit)
    np.testing.assert_array_equal(result.logits, reference.logits)


def test_manifest_is_plain_json(msdnet: Exported) -> None:
    raw = json.loads((msdnet.package / MANIFEST_FILE).read_text())
    assert set(raw) >= {"name", "inputs", "state", "stages", "provenance", "format", "format_version"}
    assert raw["provenance"]["opset"] >= 18


def test_export_names_and_overwrites_a_package(tmp_path: Path) -> None:
    """Exporting onto an earlier package with `force` replaces it, stale stage files included; `name` is stored."""
    output = tmp_path / "tiny.dync"
    output.mkdir()
    (output / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT_NAME, "format_version": 0}))
    (output / "stages").mkdir()
    (output / "stages" / "stage9.onnx").write_text("stale")
    messages: list[str] = []
    model = tiny_model()
    dync.export(model, output, input_shape=TINY_SHAPE, name="renamed", progress=messages.append, force=True)
    assert not (output / "stages" / "stage9.onnx").exists()
    engine = dync.load(output)
    assert engine.manifest.name == "renamed"
    assert engine.manifest.provenance.source is None
    assert any("captur" in m for m in messages) and any(str(output) in m for m in messages)
    x = random_input(TINY_SHAPE[1:], 4, seed=5)
    assert_close(engine.run(x).logits, eager_outputs(model, x)[-1])


def test_batch_one_example_exports_into_an_empty_directory(tmp_path: Path) -> None:
    """The probe needs two batch sizes: a 1-sample example shape must still give a dynamic-batch package."""
    model = tiny_model(seed=2)
    output = tmp_path / "empty"
    output.mkdir()
    assert dync.export(model, output, input_shape=(1, *TINY_SHAPE[1:])) == output
    engine = dync.load(output)
    assert engine.manifest.name == "empty"
    assert engine.manifest.provenance.example_input_shape == [1, *TINY_SHAPE[1:]]
    x = random_input(TINY_SHAPE[1:], 6, seed=6)
    assert_close(engine.run(x).logits, eager_outputs(model, x)[-1])
