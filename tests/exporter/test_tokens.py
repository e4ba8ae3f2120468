"""Token-dynamic transformers: DynamicViT-style pruning exports as it is, DyT-style dispatch is lowered.

Numerics only, never timings. Captures are the slow part, so each model is exported (or captured) once per
module: the DyT-like model with one block keeping no token, one keeping all and one keeping a different
share per sample; and one capture holding every generic and ineligible gated block side by side.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dync
import dync.exporter
from dync.errors import SpatialLoweringWarning
from dync.exporter.capture import capture
from dync.exporter.passes.tokens import lower_token_dispatch, report_dispatches
from dync.runtime.engine import Engine
from dync.verify import verify
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.tokens import TOKENS_ZOO, DyTLike, mlp_kept_fractions, set_kept_fraction

BATCHES = (1, 3)
IMAGE = (3, 32, 32)
TOKENS = (8, 16)
"""Sample shape of the side-by-side gated blocks: 8 tokens of width 16."""


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def _dyt() -> DyTLike:
    """Block 0 keeps no token, block 1 every token, block 2 about 40% (a different count per sample)."""
    torch.manual_seed(0)
    model = DyTLike()
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
        set_kept_fraction(model, 0.4, torch.from_numpy(random_input(IMAGE, 3, seed=3)))
        model.blocks[0].gate.bias.fill_(-math.inf)
        model.blocks[1].gate.bias.fill_(math.inf)
    return model.eval()


class Gated(nn.Module):
    """`x + f(x) * gate(x)` on `[B, N, C]` tokens, with the MLP `f`, the gate and the operand order chosen."""

    def __init__(self, mlp: Callable[[Tensor], Tensor], gate: str = "hard", swap: bool = False) -> None:
        super().__init__()
        self.mlp = mlp
        self.gate = nn.Linear(TOKENS[1], 1)
        self.kind = gate
        self.swap = swap

    def forward(self, x: Tensor) -> Tensor:
        mask = self._mask(self.gate(x))
        return mask * self.mlp(x) + x if self.swap else x + self.mlp(x) * mask

    def _mask(self, logit: Tensor) -> Tensor:
        """hard: a bool cast; soft: a sigmoid; masked_fill[_half]: DyT's router, zeros filled with 1.0 (0.5)
        where the sigmoid exceeds 0.5, the first token's row forced to ones."""
        if self.kind == "soft":
            return torch.sigmoid(logit)
        if self.kind.startswith("masked_fill"):
            fill = 0.5 if self.kind.endswith("half") else 1.0
            routed = torch.zeros_like(logit[:, 1:]).masked_fill(logit[:, 1:].sigmoid() > 0.5, fill)
            return torch.cat([routed.new_ones(logit.shape[0], 1, 1), routed], dim=1)
        return (logit >= 0).float()


class SwiGLU(nn.Module):
    """`fc2(fc_a(x) * silu(fc_b(x)))`: two branches of one input, joined by a Mul, no LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.a(x) * F.silu(self.b(x)))


class TokenMixing(nn.Module):
    """An MLP that mixes tokens (adds or subtracts their mean), inside (before fc2) or at its output."""

    def __init__(self, dim: int, at_output: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.at_output = at_output

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x))
        if self.at_output:
            y = self.fc2(h)
            return y - y.mean(dim=1, keepdim=True)
        return self.fc2(h + h.mean(dim=1, keepdim=True))


def _relu_mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.ReLU(), nn.Linear(3 * dim, dim))


GATED: dict[str, tuple[Callable[[], nn.Module], str | None]] = {
    "swiglu": (lambda: Gated(SwiGLU(TOKENS[1])), None),
    "swapped_operands": (lambda: Gated(_relu_mlp(TOKENS[1]), swap=True), None),
    "soft_gate": (lambda: Gated(_relu_mlp(TOKENS[1]), gate="soft"), "not provably binary"),
    "masked_fill_router": (lambda: Gated(_relu_mlp(TOKENS[1]), gate="masked_fill"), None),
    "masked_fill_half": (lambda: Gated(_relu_mlp(TOKENS[1]), gate="masked_fill_half"), "not provably binary"),
    "mixing_before_fc2": (lambda: Gated(TokenMixing(TOKENS[1], at_output=False)), None),
    "mixing_at_output": (lambda: Gated(TokenMixing(TOKENS[1], at_output=True)), "not row-wise"),
}
"""name -> (factory, None if lowered else words the reason must contain). Mixing before fc2 is lowered from the
mixed tensor on: only fc2 runs on the kept rows."""


class SideBySide(nn.Module):
    """Every GATED block on the same input, one output each: one capture covers them all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(make() for make, _ in GATED.values())

    def forward(self, x: Tensor) -> list[Tensor]:
        return [block(x) for block in self.blocks]


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@dataclass
class DytExport:
    model: DyTLike
    captured: onnx.ModelProto
    engine: Engine
    progress: list[str]
    warnings: list[warnings.WarningMessage]


@pytest.fixture(scope="module")
def dyt(tmp_path_factory: pytest.TempPathFactory) -> DytExport:
    """`dync.export` of the DyT-like model, observing the graph it captured."""
    model, seen, progress = _dyt(), {}, []

    def observed(*args: object, **kwargs: object) -> object:
        seen["captured"] = capture(*args, **kwargs)
        return seen["captured"]

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(dync.exporter, "capture", observed)
        package = dync.export(model, tmp_path_factory.mktemp("tokens") / "dyt.dync", input_shape=(2, *IMAGE),
                              progress=progress.append)
    return DytExport(model, seen["captured"].model, dync.load(package), progress, list(caught))


@pytest.fixture(scope="module")
def side_by_side() -> tuple[nn.Module, onnx.ModelProto]:
    model = SideBySide().eval()
    return model, capture(model, torch.from_numpy(random_input(TOKENS, 2, seed=1))).model


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


def _on_rows(model: onnx.ModelProto, rows: set[str]) -> set[str]:
    """Names of the nodes that compute on `rows`, directly or not, before a ScatterND writes them back (graph
    nodes are in topological order)."""
    reached, found = set(rows), set()
    for node in model.graph.node:
        if reached.intersection(node.input) and node.op_type != "ScatterND":
            found.add(node.name)
            reached.update(node.output)
    return found


# --------------------------------------------------------------------------- #
# Token dispatch (DyT)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("batch", BATCHES)
def test_dispatch_exact_with_dynamic_batch(dyt: DytExport, batch: int) -> None:
    x = random_input(IMAGE, batch, seed=batch)
    kept = [f.numpy() for f in mlp_kept_fractions(dyt.model, torch.from_numpy(x))]
    assert kept[0].max() == 0.0 and kept[1].min() == 1.0 and 0.0 < kept[2].min() <= kept[2].max() < 1.0
    if batch > 1:
        assert len(set(kept[2].tolist())) > 1, "the masks should keep a different count per sample"
    assert_close(dyt.engine.run(x).logits, eager_outputs(dyt.model, x)[0], what=f"DyT-like, batch {batch}")


def test_dispatch_mlps_run_on_packed_rows(dyt: DytExport) -> None:
    """Each block's two MLP MatMuls read the gathered rows; no MLP runs on every token; nothing was left."""
    stage = onnx.load(dyt.engine.package_dir / dyt.engine.manifest.stages[0].onnx)
    ops = _ops(stage)
    assert ops["NonZero"] == ops["ScatterND"] == 3
    assert ops["MatMul"] == _ops(dyt.captured)["MatMul"] - 2 * ops["Attention"]  # fused attention: 2 MatMuls each
    packed = {o for n in stage.graph.node if n.op_type == "Gather" and n.name.endswith("/tokens/packed")
              for o in n.output}
    assert len(packed) == 3
    on_rows = {n.name for n in stage.graph.node if n.op_type == "MatMul"} & _on_rows(stage, packed)
    assert len(on_rows) == 6 and all("/tokens/mlp/" in name for name in on_rows)
    assert sum("token dispatch" in line and "lowered" in line for line in dyt.progress) == 3
    assert not [w for w in dyt.warnings if issubclass(w.category, SpatialLoweringWarning)]


def test_dispatch_package_verifies(dyt: DytExport) -> None:
    assert verify(dyt.engine, dyt.model, batch=3, record=False).passed


def test_generic_patterns_lowered_others_left_with_reasons(side_by_side: tuple[nn.Module, onnx.ModelProto]
                                                           ) -> None:
    model, captured = side_by_side
    lowered, reports = lower_token_dispatch(captured)
    assert len(reports) == len(GATED)
    by_output = {_add_output(captured, r.node): r for r in reports}
    for k, (name, (_, words)) in enumerate(GATED.items()):
        report = by_output[f"exit{k}"]
        assert report.lowered == (words is None), f"{name}: {report}"
        if words is not None:
            assert words in report.reason, f"{name}: {report.reason}"
            assert report.node in {n.name for n in lowered.graph.node}, f"{name} was not left as it was"
    assert _ops(lowered)["ScatterND"] == sum(words is None for _, words in GATED.values())
    for batch in BATCHES:
        x = random_input(TOKENS, batch, seed=batch)
        for name, got, ref in zip(GATED, _run(lowered, x), eager_outputs(model, x), strict=True):
            assert_close(got, ref, what=f"{name}, batch {batch}")


def _add_output(model: onnx.ModelProto, node: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == node)


def test_left_dense_warns_naming_node_and_reason(side_by_side: tuple[nn.Module, onnx.ModelProto]) -> None:
    _, reports = lower_token_dispatch(side_by_side[1])
    with pytest.warns(SpatialLoweringWarning, match=r"token dispatch \S+ is left dense: mask .* not provably binary"):
        report_dispatches(reports, lambda message: None)


def test_model_without_dispatch_is_returned_unchanged(side_by_side: tuple[nn.Module, onnx.ModelProto]) -> None:
    """Only ineligible candidates: the very same model comes back."""
    graph = gs.import_onnx(side_by_side[1])
    graph.outputs = [t for t, (_, words) in zip(graph.outputs, GATED.values(), strict=True) if words is not None]
    model = gs.export_onnx(graph.cleanup())
    lowered, reports = lower_token_dispatch(model)
    assert lowered is model and reports and not any(r.lowered for r in reports)


# --------------------------------------------------------------------------- #
# Token pruning (DynamicViT)
# --------------------------------------------------------------------------- #


def test_pruning_exports_exact_with_dynamic_batch(tmp_path: Path) -> None:
    """Three pruning stages selecting tokens by flat offsets over the batch (DynamicViT's batch_index_select)."""
    factory, shape = TOKENS_ZOO["dynamic_vit_flat_tiny"]
    torch.manual_seed(0)
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpatialLoweringWarning)
        engine = dync.load(dync.export(model, tmp_path / "dvit.dync", input_shape=shape))
    stage = onnx.load(engine.package_dir / engine.manifest.stages[0].onnx)
    assert _ops(stage)["TopK"] == 3
    for batch in BATCHES:
        x = random_input(shape[1:], batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(model, x)[0], what=f"DynamicViT-like, batch {batch}")
    assert verify(engine, model, batch=3, record=False).passed


# --------------------------------------------------------------------------- #
# As their authors wrote them
# --------------------------------------------------------------------------- #


def test_published_dyt_dispatch_lowered_exact(tmp_path: Path) -> None:
    """DyT's router (`masked_fill` of zeros, the class token's row forced to ones, a parallel adapter, blocks
    returning `(x, dict)`): every dispatch lowered, the logits exact at every batch."""
    factory, shape = TOKENS_ZOO["dynamic_tuning_tiny"]
    torch.manual_seed(0)
    model = factory()
    set_kept_fraction(model, 0.4, torch.from_numpy(random_input(shape[1:], 3, seed=3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpatialLoweringWarning)
        engine = dync.load(dync.export(model, tmp_path / "dyt.dync", input_shape=shape))
    assert _ops(onnx.load(engine.package_dir / engine.manifest.stages[0].onnx))["ScatterND"] == len(model.blocks)
    for batch in BATCHES:
        x = random_input(shape[1:], batch, seed=batch)
        kept = mlp_kept_fractions(model, torch.from_numpy(x))
        assert all(float(f.min()) > 0.0 and float(f.max()) < 1.0 for f in kept)
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(x))
        assert_close(engine.run(x).logits, logits.numpy(), what=f"DyT as published, batch {batch}")


def test_published_dynamic_vit_pruning_exact(tmp_path: Path) -> None:
    """DynamicViT's eval path: `int(init_n * ratio)` tokens by argsort, flat-offset selects, the previous
    decision weighting the next predictor."""
    factory, shape = TOKENS_ZOO["diff_pruning_tiny"]
    torch.manual_seed(0)
    model = factory()
    engine = dync.load(dync.export(model, tmp_path / "dvit.dync", input_shape=shape))
    for batch in BATCHES:
        x = random_input(shape[1:], batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(model, x)[0], what=f"DynamicViT as published, batch {batch}")
