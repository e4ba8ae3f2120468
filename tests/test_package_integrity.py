"""A package runs only what was exported and verified: every program file's size and SHA-256 are in the
manifest and checked at load; paths must stay inside the package; a damaged stage is one line, not a
traceback; the verification record names the files it verified."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import dync
from dync.errors import PackageError
from dync.package import MANIFEST_FILE, load_manifest
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package


def _edit_manifest(package: Path, edit: object) -> None:
    raw = json.loads((package / MANIFEST_FILE).read_text())
    edit(raw)
    (package / MANIFEST_FILE).write_text(json.dumps(raw))


def test_the_manifest_records_every_program_file(cli_export: CliExport) -> None:
    manifest = load_manifest(cli_export.package)
    assert sorted(manifest.files) == [s.onnx for s in manifest.stages]
    assert all(len(f.sha256) == 64 and f.bytes > 0 for f in manifest.files.values())
    assert manifest.verification.files == {path: f.sha256 for path, f in manifest.files.items()}


def _changed_weights(path: Path) -> None:
    model = onnx.load(path)
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save_model(model, path)


@pytest.mark.parametrize("damage", [
    _changed_weights,
    lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    lambda path: path.write_bytes(os.urandom(len(path.read_bytes()))),
    lambda path: path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1])),
], ids=["weights_changed", "truncated", "random_bytes", "one_bit_flipped"])
def test_a_changed_stage_is_refused_at_load(cli_export: CliExport, tmp_path: Path, damage: object) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    damage(package / "stages" / "stage1.onnx")
    with pytest.raises(PackageError, match=r"stage1.onnx changed after it was written"):
        dync.load(package)
    result = invoke(["inspect", package])
    assert result.exit_code == 1 and "changed after it was written" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "stages/../../outside.onnx"])
def test_stage_paths_must_stay_inside_the_package(cli_export: CliExport, tmp_path: Path, path: str) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    (tmp_path / "outside.onnx").write_bytes((package / "stages" / "stage0.onnx").read_bytes())
    _edit_manifest(package, lambda raw: raw["stages"][0].update(onnx=path))
    with pytest.raises(PackageError, match="outside the package"):
        dync.load(package)


def test_a_stage_linked_out_of_the_package_is_refused(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    outside = tmp_path / "outside.onnx"
    (package / "stages" / "stage0.onnx").rename(outside)
    (package / "stages" / "stage0.onnx").symlink_to(outside)
    with pytest.raises(PackageError, match="outside the package"):
        dync.load(package)


def test_external_data_is_never_read(tmp_path: Path, cli_export: CliExport) -> None:
    """A stage that points its weights at a file outside (here in a package whose file list was rewritten to
    match, as a hostile package would) fails to load with one line instead of reading that file."""
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    stage = package / "stages" / "stage0.onnx"
    model = onnx.load(stage)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../secret.bin")
    onnx.save_model(model, stage)
    _edit_manifest(package, lambda raw: raw.pop("files"))
    with pytest.raises(PackageError, match=r"onnxruntime cannot load .*stage0\.onnx"):
        dync.load(package).run(np.zeros((1, 3, 16, 16), np.float32))
