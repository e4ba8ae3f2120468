"""Forwards whose code fixes the batch to the example's (Swin's `window_reverse`) still export to a package
exact at every batch: traced again by TorchDynamo, or rebuilt from two static captures; a forward whose graph
changes with the batch in another way is refused naming its line."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import dync
from dync.errors import CaptureError
from dync.exporter.capture import _onnx_program, _SelectExits
from dync.exporter.example import INPUT_NAME, Example
from dync.exporter.symbolic_batch import symbolic_batch
from tests.conftest import invoke
from tests.helpers import assert_close, eager_outputs
from zoo.idioms import SwinWindowBlock
from zoo.swin import TinySwin

capture_module = importlib.import_module("dync.exporter.capture")  # `dync.exporter.capture` is also a function
BATCHES = (1, 2, 5, 16)
SWIN_LINE = "B = int(windows.shape[0] / (H * W / window_size / window_size))"


def _exact_at_every_batch(model: nn.Module, package: Path, sample_shape: tuple[int, ...]) -> None:
    engine = dync.load(package)
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, *sample_shape)).astype(np.float32)
        assert_close(engine.run(x).logits, eager_outputs(model, x)[0], what=f"batch {batch}")


def test_a_swin_model_exports_exactly_through_the_cli(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinySwin().eval()
    torch.save(model, tmp_path / "swin.pt")
    result = invoke(["export", tmp_path / "swin.pt", "-o", tmp_path / "swin.dync", "--input-shape", "4x3x32x32"])
    assert result.exit_code == 0, result.output
    assert "the forward fixes the batch at " in result.stderr and SWIN_LINE in result.stderr
    record = dync.load(tmp_path / "swin.dync").manifest.batch_fix
    assert record is not None and record.method == "bytecode" and "zoo/idioms.py:" in record.site
    assert "batch: the forward fixes the batch at" in invoke(["inspect", tmp_path / "swin.dync"]).stdout
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        ran = invoke(["run", tmp_path / "swin.dync", "--input", tmp_path / "x.npy", "-o", tmp_path / "out.npz"])
        assert ran.exit_code == 0, ran.output
        assert_close(np.load(tmp_path / "out.npz")["logits"], eager_outputs(model, x)[0], what=f"batch {batch}")


def test_two_static_captures_rebuild_the_batch_constants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where TorchDynamo cannot trace the forward, the constants that differ between captures at batches 4 and 5
    are computed from the input's batch."""
    real = capture_module._onnx_program

    def no_bytecode(*args: object) -> object:
        if args[-1] == "bytecode":
            raise CaptureError("TorchDynamo cannot trace this forward")
        return real(*args)

    monkeypatch.setattr(capture_module, "_onnx_program", no_bytecode)
    torch.manual_seed(0)
    model = SwinWindowBlock().eval()
    package = dync.export(model, tmp_path / "swin.dync", input_shape=(4, 3, 16, 16))
    record = dync.load(package).manifest.batch_fix
    assert record is not None and record.method == "two captures" and record.captures == [4, 5]
    assert len(record.constants) == 3, "window partition's and reverse's reshapes hold the batch"
    _exact_at_every_batch(model, package, (3, 16, 16))


class _BatchLengthArange(nn.Module):
    """Scales by the mean of `arange(int(batch / 1.0))`: the float constant changes with the batch, which
    two captures cannot turn into shape arithmetic (and the samples interact through it)."""

    def forward(self, x: Tensor) -> Tensor:
        n = int(x.shape[0] / 1.0)
        return x.flatten(1) * torch.arange(n, dtype=torch.float32).mean()


def test_a_graph_that_changes_otherwise_is_refused_naming_the_line() -> None:
    model = _BatchLengthArange().eval()
    example = Example({INPUT_NAME: np.ones((4, 3), np.float32)})
    wrapped = _SelectExits(model, example.names, [""], None)
    first = _onnx_program(wrapped, example.tensors(), example.names, ["exit0"], "static").model_proto
    second = _onnx_program(wrapped, (torch.ones(5, 3),), example.names, ["exit0"], "static").model_proto
    with pytest.raises(CaptureError, match=r"at tests/x.py:3 .*no single graph serves every batch"):
        symbolic_batch(first, 4, second, 5, " at tests/x.py:3 (`n = int(x.shape[0] / 1.0)`)")


class _TwoExitWindows(nn.Module):
    """An early exit on the embedding and a late one after Swin-style windows whose merge fixes the batch, so
    compaction hands the second stage a batch neither capture saw."""

    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Linear(8, 5)
        self.block = SwinWindowBlock(num_classes=5)
        self.embed = nn.Conv2d(3, 8, 2, stride=2)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.early(self.embed(x).mean(dim=(2, 3))), self.block(x)]


def test_early_exits_compact_a_batch_fixing_forward_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TwoExitWindows().eval()
    engine = dync.load(dync.export(model, tmp_path / "two.dync", input_shape=(4, 3, 16, 16)))
    assert engine.manifest.batch_fix is not None and engine.manifest.verification.passed
    x = np.random.default_rng(5).standard_normal((16, 3, 16, 16)).astype(np.float32)
    early, late = eager_outputs(model, x)
    confidences = torch.softmax(torch.from_numpy(early), dim=-1).max(-1).values.numpy()
    result = engine.run(x, thresholds=[float(np.median(confidences))])
    assert 0 < (result.exit == 0).sum() < 16, "the threshold splits the batch"
    assert_close(result.logits, np.where((result.exit == 0)[:, None], early, late))
