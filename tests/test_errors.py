"""User errors: each raises the right DyncError with a message that names the problem, and the CLI prints it
as one line without a traceback and exits non-zero."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result

import dync
from dync.errors import (
    CaptureError,
    DyncError,
    InputError,
    ModelLoadError,
    PackageError,
    PartitionError,
    VerificationError,
)
from dync.package import MANIFEST_FILE
from dync.verify import verify
from tests.conftest import CliExport, Exported, invoke
from tests.helpers import copy_package
from tests.models import TINY_SHAPE, TinyMultiExit
from zoo import random_input
from zoo.multi_exit import DataDependentNet

TINY_SHAPE_ARG = "x".join(map(str, TINY_SHAPE))


def _assert_cli_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"


def test_every_error_is_a_dync_error() -> None:
    for cls in (CaptureError, InputError, ModelLoadError, PackageError, PartitionError, VerificationError):
        assert issubclass(cls, DyncError)


# --------------------------------------------------------------------------- #
# Run-time input
# --------------------------------------------------------------------------- #

BAD_INPUTS: list[tuple[str, Callable[[np.ndarray], Any], list[str]]] = [
    ("spatial_size", lambda x: np.zeros((4, 3, 16, 16), np.float32), ["shape [4, 3, 16, 16]", "[batch, 3, 32, 32]"]),
    ("channels", lambda x: np.zeros((4, 1, 32, 32), np.float32), ["shape [4, 1, 32, 32]", "[batch, 3, 32, 32]"]),
    ("no_batch_axis", lambda x: x[0], ["shape [3, 32, 32]", "[batch, 3, 32, 32]"]),
    ("empty_batch", lambda x: x[:0], ["batch >= 1"]),
    ("float64", lambda x: x.astype(np.float64), ["dtype float64", "float32", "astype"]),
    ("float16", lambda x: x.astype(np.float16), ["dtype float16", "float32"]),
    ("int", lambda x: x.astype(np.int64), ["dtype int64"]),
    ("tensor", lambda x: torch.from_numpy(x), ["numpy array", "Tensor"]),
    ("nan", lambda x: _poison(x, np.nan, [3]), ["NaN/inf", "1 sample", "sample 3"]),
    ("inf", lambda x: _poison(x, np.inf, [2, 5]), ["2 NaN/inf values in 2 sample(s)", "sample 2"]),
    ("-inf", lambda x: _poison(x, -np.inf, [0]), ["NaN/inf", "sample 0"]),
]


def _poison(x: np.ndarray, value: float, samples: list[int]) -> np.ndarray:
    x = x.copy()
    for i in samples:
        x[i, 1, 2, 3] = value
    return x


@pytest.mark.parametrize(("kind", "make", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused(msdnet: Exported, kind: str, make: Callable[[np.ndarray], Any], words: list[str]) -> None:
    x = make(random_input(msdnet.sample_shape, 6, seed=0))
    with pytest.raises(InputError) as info:
        msdnet.engine.run(x)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("thresholds", "words"),
    [
        ([0.5], ["got 1 thresholds", "4 exits", "give 3"]),
        ([0.5] * 5, ["got 5 thresholds"]),
        ([], ["got 0 thresholds"]),
        ([0.5, float("nan"), 0.5], ["NaN"]),
    ],
)
def test_bad_thresholds_are_refused(msdnet: Exported, thresholds: list[float], words: list[str]) -> None:
    with pytest.raises(InputError) as info:
        msdnet.engine.run(random_input(msdnet.sample_shape, 2), thresholds=thresholds)
    for word in words:
        assert word in str(info.value)


def test_unknown_backend_and_options(msdnet: Exported) -> None:
    with pytest.raises(InputError, match="backend 'tensorrt' is not available"):
        dync.load(msdnet.package, backend="tensorrt")
    with pytest.raises(InputError, match="optimization level 'max'"):
        dync.load(msdnet.package, optimization="max")
    with pytest.raises(InputError, match="thread count -1"):
        dync.load(msdnet.package, threads=-1)


def test_unknown_exit_criterion(msdnet: Exported, tmp_path: Path) -> None:
    package = copy_package(msdnet.package, tmp_path / "criterion.dync")
    raw = json.loads((package / MANIFEST_FILE).read_text())
    raw["stages"][0]["exit"]["criterion"] = "softmax_temperature"
    (package / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(PackageError, match="criterion 'softmax_temperature' is unknown"):
        dync.load(package)


def test_cli_run_errors(cli_export: CliExport, tmp_path: Path) -> None:
    x = random_input(TINY_SHAPE[1:], 3)
    np.save(tmp_path / "f64.npy", x.astype(np.float64))
    np.save(tmp_path / "ok.npy", x)
    (tmp_path / "text.npy").write_text("not numpy")
    np.save(tmp_path / "nan.npy", _poison(x, np.nan, [1]))
    out = tmp_path / "out.npz"
    run = ["run", cli_export.package, "-o", out, "--input"]
    _assert_cli_error(invoke([*run, tmp_path / "f64.npy"]), "dtype float64", "float32")
    _assert_cli_error(invoke([*run, tmp_path / "text.npy"]), "text.npy", "neither a .npy array nor a .npz")
    _assert_cli_error(invoke([*run, tmp_path / "nan.npy"]), "NaN/inf", "sample 1")
    _assert_cli_error(invoke([*run, tmp_path / "ok.npy", "--thresholds", "0.5"]), "got 1 thresholds", "3 exits")
    _assert_cli_error(invoke([*run, tmp_path / "ok.npy", "--thresholds", "nan,0.5"]), "NaN")
    _assert_cli_error(invoke([*run, tmp_path / "ok.npy", "--fixed-batches", "-1"]), "fixed_batches -1 must be >= 0")
    bad_number = invoke([*run, tmp_path / "ok.npy", "--thresholds", "high,low"])
    assert bad_number.exit_code == 1 and "not a comma-separated list of numbers" in bad_number.stderr
    assert "Traceback" not in bad_number.output
    assert not out.exists()


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("0.1 0.2 0.3\n")
    with pytest.raises(ModelLoadError) as info:
        dync.export(path, tmp_path / "out.dync")
    assert str(path) in str(info.value) and "torch.save(model, path)" in str(info.value)
    _assert_cli_error(invoke(["export", path, "-o", tmp_path / "out.dync"]), str(path), "not a PyTorch model file")
    _assert_cli_error(invoke(["export", tmp_path / "missing.pt", "-o", tmp_path / "out.dync"]), "does not exist")
    assert not (tmp_path / "out.dync").exists()


def test_data_dependent_forward_says_to_return_all_exits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_path = tmp_path / "data_dependent.pt"
    torch.save(DataDependentNet().eval(), model_path)
    with pytest.raises(CaptureError) as info:
        dync.export(model_path, tmp_path / "dd.dync", input_shape=(4, 3, 16, 16))
    message = str(info.value)
    for word in ("branches on a tensor's value", "return every exit's output", "multi_exit.py"):
        assert word in message
    assert not (tmp_path / "dd.dync").exists()


def test_data_dependent_forward_from_the_cli(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_path = tmp_path / "data_dependent.pt"
    torch.save(DataDependentNet().eval(), model_path)
    result = invoke(["export", model_path, "-o", tmp_path / "dd.dync", "--input-shape", "4x3x16x16"])
    _assert_cli_error(result, "return every exit's output")
    assert len(result.stderr.strip().splitlines()) <= 3, "progress and the error only, no graph dump"


class _ReturnsDict(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x.mean(dim=(2, 3))}


class _DropsBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.mean(dim=(2, 3)), x.mean()]


class _Median(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.median(dim=1).values


class _Attention5D(torch.nn.Module):
    """Hiera- and Twins-style attention over [B, windows, heads, N, d], which torch.onnx translates for 4-D only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(x, x, x).flatten(1)


@pytest.mark.parametrize(
    ("model", "shape", "outputs", "words"),
    [
        (_ReturnsDict(), TINY_SHAPE, None, ["returned a dict with keys ['logits']", "--outputs"]),
        (_DropsBatch(), TINY_SHAPE, ["0", "1"], ["exit 1 has shape []", "batch"]),
        (_DropsBatch(), TINY_SHAPE, ["2"], ["--outputs 2", "0..1"]),
        (_ReturnsDict(), TINY_SHAPE, ["probs"], ["no key 'probs'", "['logits']"]),
        (TinyMultiExit(), (4, 5, 16, 16), None, ["rejected an input of shape [4, 5, 16, 16]", "--input-shape"]),
        (_Median(), (4, 5), None, ["no translation for aten.median.dim at ", "test_errors.py:", "x.sort(dim)"]),
        (_Attention5D(), (2, 2, 4, 8, 16), None, ["could not translate the captured forward of "
                                                  "aten.scaled_dot_product_attention", "test_errors.py:",
                                                  "only 4D query, key, and value are supported"]),
    ],
    ids=["dict_output", "scalar_exit", "bad_index", "bad_key", "wrong_example_shape", "untranslated_op",
         "translation_fails"],
)
def test_forward_that_cannot_be_exported(
    tmp_path: Path, model: torch.nn.Module, shape: tuple[int, ...], outputs: list[str] | None, words: list[str]
) -> None:
    with pytest.raises(CaptureError) as info:
        dync.export(model, tmp_path / "out.dync", input_shape=shape, outputs=outputs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("exits", "words"),
    [([0, 3], ["--exits [0, 3]", "0..2"]), ([1, 1], ["distinct"]), ([-4], ["--exits [-4]"])],
)
def test_bad_exit_indices(tmp_path: Path, exits: list[int], words: list[str]) -> None:
    with pytest.raises(CaptureError) as info:
        dync.export(TinyMultiExit(), tmp_path / "out.dync", input_shape=TINY_SHAPE, exits=exits)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("shape", [(3,), (0, 3, 16, 16), (4, -1, 16, 16)])
def test_bad_input_shape_argument(tmp_path: Path, shape: tuple[int, ...]) -> None:
    with pytest.raises(DyncError, match="must be a batch followed by the per-sample dims"):
        dync.export(TinyMultiExit(), tmp_path / "out.dync", input_shape=shape)


def test_cli_bad_input_shape_and_exits(cli_export: CliExport, tmp_path: Path) -> None:
    out = tmp_path / "out.dync"
    result = invoke(["export", cli_export.model_path, "-o", out, "--input-shape", "4by3"])
    assert result.exit_code == 1 and "is not a shape like 16x3x32x32" in result.stderr
    result = invoke(["export", cli_export.model_path, "-o", out, "--exits", "first"])
    assert result.exit_code == 1 and "comma-separated list of exit indices" in result.stderr
    _assert_cli_error(invoke(["export", cli_export.model_path, "-o", out, "--input-shape", "0x3x16x16"]),
                      "must be a batch followed by")
    _assert_cli_error(invoke(["export", cli_export.model_path, "-o", out, "--exits", "0,7"]), "--exits [0, 7]")


def test_cli_exits_out_of_compute_order(cli_export: CliExport, tmp_path: Path) -> None:
    result = invoke(["export", cli_export.model_path, "-o", tmp_path / "out.dync", "--input-shape", TINY_SHAPE_ARG,
                     "--exits", "2,0"])
    _assert_cli_error(result, "compute order")


def test_export_onto_a_directory_that_is_not_a_package(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(DyncError) as info:
        dync.export(TinyMultiExit(), precious, input_shape=TINY_SHAPE)
    assert str(precious) in str(info.value) and "is not a dync package" in str(info.value)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]


def test_export_onto_a_file(cli_export: CliExport, tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    result = invoke(["export", cli_export.model_path, "-o", target, "--input-shape", TINY_SHAPE_ARG])
    _assert_cli_error(result, str(target), "is a file, not a package directory")
    assert target.read_text() == "keep me"


# --------------------------------------------------------------------------- #
# Corrupt packages
# --------------------------------------------------------------------------- #


def _edit_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def corrupt(package: Path) -> None:
        raw = json.loads((package / MANIFEST_FILE).read_text())
        edit(raw)
        (package / MANIFEST_FILE).write_text(json.dumps(raw))

    return corrupt


def _drop_first_write(raw: dict[str, Any]) -> None:
    raw["stages"][0]["writes"] = raw["stages"][0]["writes"][1:]


def _read_from_nowhere(raw: dict[str, Any]) -> None:
    raw["stages"][2]["reads"].append("ghost")


def _undeclared_write(raw: dict[str, Any]) -> None:
    raw["stages"][0]["writes"].append("ghost")


def _bad_macs(raw: dict[str, Any]) -> None:
    raw["stages"][1]["exit"]["cumulative_macs"] = 0


def _malformed_pass_record(raw: dict[str, Any]) -> None:
    raw["spatial"] = [{"node": "relu_3", "lowered": "yes", "reason": "lowered (portable)", "crossover": 0.5}]


CORRUPTIONS: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("missing_manifest", lambda p: (p / MANIFEST_FILE).unlink(), ["has no manifest.json"]),
    ("invalid_json", lambda p: (p / MANIFEST_FILE).write_text("{not json"), ["is not valid JSON"]),
    ("binary_manifest", lambda p: (p / MANIFEST_FILE).write_bytes(b"\xff\xfe\x00"), ["is not valid JSON"]),
    ("json_list", lambda p: (p / MANIFEST_FILE).write_text("[]"), ["is not a dync manifest"]),
    ("wrong_format", _edit_manifest(lambda r: r.update(format="other")), ["is not a dync manifest"]),
    ("format_version", _edit_manifest(lambda r: r.update(format_version=99)), ["format_version 99", "reads version 1"]),
    ("missing_field", _edit_manifest(lambda r: r.pop("inputs")), ["missing or has a malformed field", "inputs"]),
    ("no_stages", _edit_manifest(lambda r: r.update(stages=[])), ["lists no stages"]),
    ("missing_stage_file", lambda p: (p / "stages" / "stage1.onnx").unlink(), ["stage1.onnx", "'stage1'", "missing"]),
    ("reads_unwritten_state", _edit_manifest(_drop_first_write), ["stage 'stage1' reads", "no earlier stage writes"]),
    ("reads_unknown_state", _edit_manifest(_read_from_nowhere), ["stage 'stage2' reads ['ghost']"]),
    ("writes_undeclared_state", _edit_manifest(_undeclared_write), ["undeclared state ['ghost']"]),
    ("inconsistent_macs", _edit_manifest(_bad_macs), ["stage 'stage1'", "MAC counts"]),
    ("macs_not_an_int", _edit_manifest(lambda r: r["stages"][0]["exit"].update(macs="many")),
     ["malformed field", "manifest.stages[0].exit.macs must be int, not str"]),
    ("unknown_field", _edit_manifest(lambda r: r["provenance"].update(colour="red")),
     ["malformed field", "manifest.provenance has unknown fields ['colour']"]),
    ("malformed_pass_record", _edit_manifest(_malformed_pass_record),
     ["malformed field", "spatial[0].lowered must be bool, not str"]),
]


@pytest.mark.parametrize(("kind", "corrupt", "words"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_package(
    cli_export: CliExport, tmp_path: Path, kind: str, corrupt: Callable[[Path], None], words: list[str]
) -> None:
    package = copy_package(cli_export.package, tmp_path / f"{kind}.dync")
    corrupt(package)
    with pytest.raises(PackageError) as info:
        dync.load(package)
    message = str(info.value)
    assert str(package) in message
    for word in words:
        assert word in message
    _assert_cli_error(invoke(["inspect", package]), *words)


def test_missing_package(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="is not a dync package directory"):
        dync.load(tmp_path / "nothing.dync")
    _assert_cli_error(invoke(["inspect", tmp_path / "nothing.dync"]), "nothing.dync", "dync export")


# --------------------------------------------------------------------------- #
# Verification
# --------------------------------------------------------------------------- #


def test_verify_against_a_model_with_other_exits(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "other.dync")
    with pytest.raises(VerificationError, match="the model does not give the exits of package 'tiny'"):
        verify(dync.load(package), TinyMultiExit(num_exits=2).eval())


def test_verify_against_a_model_that_disagrees(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "other.dync")
    torch.manual_seed(5)
    with pytest.raises(VerificationError, match="disagrees with eager PyTorch"):
        verify(dync.load(package), TinyMultiExit().eval(), record=False)
    assert dync.load(package).manifest.verification == dync.load(cli_export.package).manifest.verification
