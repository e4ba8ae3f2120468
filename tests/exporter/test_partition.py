"""Partition invariants on every zoo model, checked on the stages the session's exports actually wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import dync
from dync.errors import ExitOrderWarning, PartitionError
from dync.exporter.partition import partition
from dync.runtime.exit_rule import forcing_thresholds
from dync.runtime.static import merged_static_model
from tests.conftest import ExportCache, Exported
from tests.helpers import ancestors, assert_close, eager_outputs, node_names
from tests.models import TINY_SHAPE, ChainedExits, tiny_model
from zoo import random_input


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_every_node_is_owned_by_exactly_one_stage(zoo_export: Exported) -> None:
    owned = [name for stage in zoo_export.stages for name in stage.owned]
    assert len(owned) == len(set(owned)), "a node is owned by two stages"
    assert set(owned) == set(node_names(zoo_export.captured.model))


def test_one_stage_per_exit_in_order(zoo_export: Exported) -> None:
    assert [s.exit_output for s in zoo_export.stages] == zoo_export.captured.exit_names
    assert [s.name for s in zoo_export.stages] == [f"stage{k}" for k in range(len(zoo_export.stages))]


def test_owned_nodes_are_exactly_what_the_exit_newly_needs(zoo_export: Exported) -> None:
    """Minimality: stage k owns the ancestors of exit k that no earlier exit needs, and nothing else."""
    full = zoo_export.captured.model
    needed_before: set[str] = set()
    for k, stage in enumerate(zoo_export.stages):
        needed = ancestors(full, stage.exit_output)
        owned = set(stage.owned)
        assert owned <= needed, f"stage {k} owns nodes exit {k} does not need: {sorted(owned - needed)[:5]}"
        early = sorted(owned & needed_before)[:5]
        assert not early, f"stage {k} owns nodes an earlier exit needs: {early}"
        assert owned == needed - needed_before
        needed_before |= needed


def test_replicated_nodes_are_batch_independent_and_owned_earlier(zoo_export: Exported) -> None:
    owner = {name: k for k, stage in enumerate(zoo_export.stages) for name in stage.owned}
    outputs = {name: list(node.output) for name, node in zip(
        node_names(zoo_export.captured.model), zoo_export.captured.model.graph.node, strict=True)}
    for k, stage in enumerate(zoo_export.stages):
        assert not set(stage.replicated) & set(stage.owned)
        for name in stage.replicated:
            assert owner[name] < k, f"stage {k} recomputes {name}, which a later stage owns"
            batched = [t for t in outputs[name] if t in zoo_export.probe.batched]
            assert not batched, f"stage {k} recomputes {name}, whose outputs {batched} are batched"


def test_carried_state_is_batched_and_written_before_it_is_read(zoo_export: Exported) -> None:
    input_name = zoo_export.captured.input_names[0]
    written: set[str] = set()
    for k, stage in enumerate(zoo_export.stages):
        carried = [r for r in stage.reads if r != input_name]
        assert all(r in zoo_export.probe.batched for r in carried), f"stage {k} carries an unbatched tensor"
        assert set(carried) <= written, f"stage {k} reads {sorted(set(carried) - written)} no earlier stage writes"
        assert all(w in zoo_export.probe.batched for w in stage.writes)
        later_reads = {r for later in zoo_export.stages[k + 1 :] for r in later.reads}
        assert set(stage.writes) <= later_reads, f"stage {k} writes state no later stage reads"
        written |= set(stage.writes)
    assert zoo_export.stages[0].reads == [input_name]
    assert zoo_export.stages[-1].writes == []


def test_stage_files_hold_the_planned_nodes_and_io(zoo_export: Exported) -> None:
    manifest = zoo_export.engine.manifest
    for stage, spec in zip(zoo_export.stages, manifest.stages, strict=True):
        model = onnx.load(zoo_export.package / spec.onnx)
        onnx.checker.check_model(model)
        assert sorted(n.name for n in model.graph.node) == sorted(stage.owned + stage.replicated)
        assert [i.name for i in model.graph.input] == spec.reads == stage.reads
        outputs = [spec.exit.output, *[w for w in spec.writes if w != spec.exit.output]]
        assert [o.name for o in model.graph.output] == outputs
        assert spec.writes == stage.writes
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", f"{value.name} has no symbolic batch"


def test_stage_macs_add_up(zoo_export: Exported) -> None:
    exits = zoo_export.engine.manifest.exits
    assert [e.macs for e in exits] == [s.macs for s in zoo_export.stages]
    assert [e.cumulative_macs for e in exits] == np.cumsum([s.macs for s in zoo_export.stages]).tolist()
    assert all(s.macs > 0 for s in zoo_export.stages)


def test_merged_static_model_equals_the_captured_graph(zoo_export: Exported) -> None:
    merged = merged_static_model(zoo_export.package, zoo_export.engine.manifest)
    full = zoo_export.captured.model
    assert sorted(n.name for n in merged.graph.node) == sorted(node_names(full))
    x = random_input(zoo_export.sample_shape, 5, seed=1)
    feed = {zoo_export.captured.input_names[0]: x}
    got = _session(merged).run(zoo_export.captured.exit_names, feed)
    ref = _session(full).run(zoo_export.captured.exit_names, feed)
    for k, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert_close(g, r, rel=1e-6, what=f"merged exit {k}")


# --------------------------------------------------------------------------- #
# --exits: selection and order
# --------------------------------------------------------------------------- #


def test_exit_selection_keeps_the_chosen_exits(msdnet: Exported, msdnet_02: Exported) -> None:
    engine = msdnet_02.engine
    assert engine.num_exits == 2
    assert engine.manifest.exit_selection == [0, 2]
    x = random_input(msdnet_02.sample_shape, 6, seed=2)
    ref = eager_outputs(msdnet_02.model, x)
    for k, chosen in enumerate([0, 2]):
        got = engine.execute(x, forcing_thresholds(k, 2)).logits
        assert_close(got, ref[chosen], what=f"exits=[0, 2]: exit {k} (model exit {chosen})")
    full_cumulative = [e.cumulative_macs for e in msdnet.engine.manifest.exits]
    selected = [e.cumulative_macs for e in engine.manifest.exits]
    assert selected[0] == full_cumulative[0]
    assert full_cumulative[1] < selected[1] < full_cumulative[2], "exit 1's head should be dropped, exit 2 kept"


def test_exit_selection_drops_the_unchosen_head(msdnet: Exported, msdnet_02: Exported) -> None:
    full_nodes = set(node_names(msdnet.captured.model))
    selected_nodes = set(node_names(msdnet_02.captured.model))
    assert len(selected_nodes) < len(full_nodes)
    # Exit 0's stage is the same computation either way (node names differ between captures).
    assert msdnet_02.engine.manifest.stages[0].ops == msdnet.engine.manifest.stages[0].ops
    assert len(msdnet_02.stages[0].owned) == len(msdnet.stages[0].owned)


def test_exits_out_of_compute_order_are_refused_by_partition(msdnet: Exported) -> None:
    """Exit 2 needs everything exit 0's trunk computes: listing it first is not compute order."""
    with pytest.raises(PartitionError, match="compute order"):
        partition(msdnet.captured.model, ["exit2", "exit0"], msdnet.probe)


def test_exits_out_of_compute_order_are_refused_by_export(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match="compute order"):
        dync.export(tiny_model(), tmp_path / "tiny.dync", input_shape=TINY_SHAPE, exits=[2, 0])
    assert not (tmp_path / "tiny.dync").exists()


def test_exit_computed_inside_an_earlier_stage_is_refused(tmp_path: Path) -> None:
    """ChainedExits' exit 1 is computed from exit 0: exits=[1, 0] is refused, with the order to use instead."""
    torch.manual_seed(0)
    with pytest.raises(PartitionError, match=r"compute order.*--exits 0,1"):
        dync.export(ChainedExits().eval(), tmp_path / "chained.dync", input_shape=TINY_SHAPE, exits=[1, 0])


def test_partition_is_deterministic(exports: ExportCache) -> None:
    """Partitioning the same graph again gives the same stages as the export did."""
    msdnet = exports.get("msdnet")
    stages = partition(msdnet.captured.model, ["exit0", "exit1", "exit2", "exit3"], msdnet.probe)
    assert [s.owned for s in stages] == [s.owned for s in msdnet.stages]
    assert [s.reads for s in stages] == [s.reads for s in msdnet.stages]
    assert [s.writes for s in stages] == [s.writes for s in msdnet.stages]


class _FinalFirst(torch.nn.Module):
    """Returns the final logits before the early ones, as some forwards do: [final, early]."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        self.early, self.final = torch.nn.Linear(6, 3), torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.final(self.trunk(x)), self.early(x)]


def test_a_costlier_exit_listed_first_is_warned_about(tmp_path: Path) -> None:
    with pytest.warns(ExitOrderWarning, match=r"list the exits cheapest first with --exits 1,0"):
        dync.export(_FinalFirst().eval(), tmp_path / "final_first.dync", input_shape=(2, 6), verify=False)
