"""FLatten and Agent attention look-alikes export unmodified, exact against eager, with a dynamic batch.

Every model of `zoo/attention.py` is exported once per module. Checks: the package equals eager at the
export batch's neighbours and at batches never seen (1, 3, 5), `verify` passes, the agent bias tables are
folded to the constants eager computes (no interpolation on weights left in the graph), adaptive average
pooling to grids that do not divide the map is exact, and the attention-fusion pass keeps a package exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor, nn

import dync
from dync.describe import format_description
from dync.exporter.passes.attention import fuse_attention
from dync.runtime.engine import Engine
from dync.verify import verify
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.attention import ATTENTION_ZOO, AgentAttention

INTERPOLATION_OPS = {"Resize", "GridSample", "Upsample", "AffineGrid"}
BATCHES = (1, 3, 5)
"""The export runs at batch 2: 1, 3 and 5 are batches the package never saw."""


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Engine]]:
    """Each zoo model (seed 0) and its loaded package, exported once for the module."""
    root = tmp_path_factory.mktemp("attention")
    exported = {}
    for name, (factory, shape) in ATTENTION_ZOO.items():
        torch.manual_seed(0)
        model = factory()
        exported[name] = (model, dync.load(dync.export(model, root / f"{name}.dync", input_shape=shape)))
    return exported


def _stage_model(engine: Engine) -> onnx.ModelProto:
    (stage,) = engine.manifest.stages
    return onnx.load(Path(engine.package_dir) / stage.onnx)


@pytest.mark.parametrize("name", sorted(ATTENTION_ZOO))
def test_package_equals_eager_at_unseen_batches(name: str, packages: dict) -> None:
    model, engine = packages[name]
    for batch in BATCHES:
        x = random_input(ATTENTION_ZOO[name][1][1:], batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(model, x)[0], what=f"{name}, batch {batch}")


@pytest.mark.parametrize("name", sorted(ATTENTION_ZOO))
def test_verify_passes(name: str, packages: dict) -> None:
    model, engine = packages[name]
    assert verify(engine, model, batch=3, record=False).passed


@pytest.mark.parametrize("name", sorted(ATTENTION_ZOO))
def test_no_interpolation_on_weights(name: str, packages: dict) -> None:
    """Bias tables and position encodings depend on parameters only: nothing may resample them per call."""
    graph = _stage_model(packages[name][1]).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    on_weights = [n.name for n in graph.node if n.op_type in INTERPOLATION_OPS and n.input[0] in constants]
    assert not on_weights, f"{name}: interpolation of constants left in the graph: {on_weights}"


@pytest.mark.parametrize("name", sorted(n for n in ATTENTION_ZOO if n.startswith("agent")))
def test_agent_bias_tables_fold_to_eager_constants(name: str, packages: dict) -> None:
    """The 7x7 tables bilinearly interpolated to the key grid are stored as initializers equal to eager's.

    The exporter may fold the reshape/permute that follows into the table, so values are compared sorted.
    """
    model, engine = packages[name]
    stored = [np.sort(numpy_helper.to_array(t), axis=None) for t in _stage_model(engine).graph.initializer]
    for attn in (m for m in model.modules() if isinstance(m, AgentAttention)):
        for table in (attn.an_bias, attn.na_bias):
            with torch.no_grad():
                expected = np.sort(F.interpolate(table, size=attn.grid, mode="bilinear").numpy(), axis=None)
            assert any(s.shape == expected.shape and np.allclose(s, expected, rtol=1e-5, atol=1e-6) for s in stored), (
                f"{name}: no initializer holds the interpolated {tuple(table.shape[:2])} x {attn.grid} table")


class AdaptivePools(nn.Module):
    """Adaptive average pools of (map side, grid) pairs, most not dividing (overlapping, uneven cells)."""

    SIZES = ((10, 7), (7, 3), (7, 2), (13, 5), (14, 7), (9, (4, 6)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.adaptive_avg_pool2d(x[..., :m, :m], out).flatten(1) for m, out in self.SIZES], dim=1)


def test_adaptive_pooling_to_non_dividing_grids_is_exact(tmp_path: Path) -> None:
    model = AdaptivePools().eval()
    engine = dync.load(dync.export(model, tmp_path / "pools.dync", input_shape=(2, 4, 14, 14)))
    for batch in (1, 3):
        x = random_input((4, 14, 14), batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(model, x)[0], what=f"batch {batch}")


@pytest.mark.parametrize("name", ["agent_pvt_10", "flatten_pvt"])
def test_export_fuses_attention_where_measured_faster(name: str, packages: dict) -> None:
    """The export runs the attention-fusion pass: one manifest record per softmax attention, as many Attention
    nodes as records say fused, and only the unfused ones left for another pass to find."""
    model, engine = packages[name]
    records = engine.manifest.records("attention")
    assert records and all(r.fused_over_unfused > 0 and r.fused == (r.fused_over_unfused < 1.0)
                           for r in records)
    assert engine.manifest.stages[0].ops.get("Attention", 0) == sum(r.fused for r in records)
    assert len(fuse_attention(_stage_model(engine))[1]) == sum(not r.fused for r in records)
    for batch in (1, 3):
        x = random_input(ATTENTION_ZOO[name][1][1:], batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(model, x)[-1], what=f"{name} fused, batch {batch}")


def test_inspect_lists_each_softmax_attention_and_its_measurement(packages: dict) -> None:
    engine = packages["agent_swin"][1]
    text = format_description(engine.manifest)
    records = engine.manifest.records("attention")
    assert f"softmax attentions: {sum(r.fused for r in records)} of {len(records)} fused" in text
    for record in records:
        assert f"{record.node}: {'fused' if record.fused else 'unfused'}, fused form " in text
