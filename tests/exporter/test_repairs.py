"""Capture-time repairs of translation defects (`dync/exporter/repairs.py`), each on what torch.onnx really
emits for its idiom: the plain translation is wrong (onnxruntime refuses it or it computes other values), the
repaired graph equals eager PyTorch at batches 1 and 3 and names the model line; near misses are left alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dync.exporter.capture import quiet_torch_onnx
from dync.exporter.repairs import repair_translation_defects
from dync.graph import source_line
from dync.package import BATCH_DIM
from zoo import random_input


class _Forward(torch.nn.Module):
    """One function of the input as a module, for torch.onnx."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _targets(x: Tensor) -> Tensor:
    """Per-sample target rows 0..2 for the 4 even rows of x [B, 8, 3], with repeats, as in token merging."""
    return (x[:, ::2, :1].abs() * 10).long().clamp(max=2).expand(-1, -1, 3)


@dataclass(frozen=True)
class Case:
    id: str
    fn: Callable[[Tensor], Tensor]
    sample_shape: tuple[int, ...]
    repair: str | None
    """A phrase of the one repair expected, or None when the translation is right and must be left alone."""


CASES = [
    Case("squeeze_of_a_dim_not_1", lambda x: torch.mean(x, dim=1).squeeze(1), (5, 12),
         "Squeeze of axes [1] also removed [1], which torch.export kept (not of static size 1); it became an Identity"),
    Case("squeeze_of_the_batch", lambda x: x.squeeze(0), (4, 6),
         "Squeeze of axes [0] also removed [0], which torch.export kept (not of static size 1); it became an Identity"),
    Case("squeeze_without_axes", lambda x: F.adaptive_avg_pool2d(x, 1).squeeze(), (5, 3, 3),
         "Squeeze without axes of a [batch, 5, 1, 1] tensor would also remove axes [0] whenever they are 1"),
    Case("squeeze_of_a_dim_of_1", lambda x: x.mean(-1, keepdim=True).squeeze(-1), (4, 6), None),
    Case("scatter_mean", lambda x: x[:, 1::2].scatter_reduce(1, _targets(x), x[:, ::2], reduce="mean"), (8, 3),
         "stood for scatter_reduce(reduce='mean') and kept one source per target; it is now the sum of the "
         "sources and the target over their count"),
    Case("scatter_mean_without_self",
         lambda x: x[:, 1::2].scatter_reduce(1, _targets(x), x[:, ::2], reduce="mean", include_self=False), (8, 3),
         "it is now the sum of the sources over their count"),
    Case("scatter_sum", lambda x: x[:, 1::2].scatter_reduce(1, _targets(x), x[:, ::2], reduce="sum"), (8, 3), None),
    Case("scatter", lambda x: x[:, 1::2].scatter(1, _targets(x)[:, :3], x[:, 1:4]), (8, 3), None),
    Case("antialiased_resize_by_a_factor",
         lambda x: F.interpolate(x, scale_factor=0.6, mode="bilinear", antialias=True), (2, 6, 6),
         "antialiased Resize to the size [3, 3] now resizes by the model's factors [0.6, 0.6]"),
    Case("antialiased_resize_to_a_size", lambda x: F.interpolate(x, size=(3, 3), mode="bicubic", antialias=True),
         (2, 6, 6), None),
]


def _translation(case: Case) -> onnx.ModelProto:
    """What torch.onnx emits for the case with a symbolic batch, before any repair; the output is named as
    capture names exits."""
    example = torch.from_numpy(random_input(case.sample_shape, 4))
    with quiet_torch_onnx():
        program = torch.onnx.export(_Forward(case.fn), (example,), dynamo=True, input_names=["x"],
                                    output_names=["exit0"], dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                                    verbose=False)
    return program.model_proto


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _differs(model: onnx.ModelProto, x: np.ndarray, expected: np.ndarray) -> bool:
    try:
        got = _run(model, x)
    except Exception:  # onnxruntime refusing the graph is the defect too
        return True
    return got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_defect_is_repaired_to_eager_and_a_right_translation_left_alone(case: Case) -> None:
    plain = _translation(case)
    repaired, repairs = repair_translation_defects(plain)
    x = random_input(case.sample_shape, 3, seed=1)
    with torch.no_grad():
        eager = _Forward(case.fn)(torch.from_numpy(x)).numpy()  # at batch 3, where eager keeps the batch
    if case.repair is None:
        assert repairs == [] and repaired is plain
        return
    assert len(repairs) == 1 and case.repair in repairs[0] and "test_repairs.py" in repairs[0], repairs
    assert any(_differs(plain, x[:n], eager[:n]) for n in (1, 3)), "the plain translation is right: drop the rule"
    for n in (1, 3):
        np.testing.assert_allclose(_run(repaired, x[:n]), eager[:n], rtol=1e-5, atol=1e-6, err_msg=f"batch {n}")


def test_repaired_nodes_keep_the_model_line() -> None:
    """Verification names the line of a batch-dependent tensor from node metadata, which must survive."""
    plain = _translation(CASES[0])
    repaired, _ = repair_translation_defects(plain)
    lines = {n.name: source_line(n) for n in plain.graph.node}
    assert any(lines.values())
    assert all(source_line(n) == lines[n.name] for n in repaired.graph.node if n.name in lines)
