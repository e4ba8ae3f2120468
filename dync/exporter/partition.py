"""Split a multi-exit graph into one static stage per exit.

Invariants this pass keeps (and tests check):
- every node of the graph runs in exactly one stage, the stage of the first exit that needs it, so a sample
  that leaves at exit k never pays for a node only later exits need;
- the only exception are batch-independent nodes (shape arithmetic, parameter-only computations), which are
  recomputed in each stage that needs them instead of being carried, because compaction can only index
  tensors that have a batch axis;
- tensors crossing a stage boundary are batched; they become the carried state the runtime compacts;
- stage outputs equal the full graph's tensors of the same name (nothing is rewritten, only cut).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from dync.errors import ExitOrderWarning, PartitionError
from dync.exporter.macs import node_macs
from dync.exporter.probe import Probe
from dync.graph import import_graph, producer
from dync.package import BATCH_DIM


@dataclass
class Stage:
    """One exit's stage: the ONNX subgraph, the state it reads and writes, and its per-sample MACs."""

    name: str
    model: onnx.ModelProto
    reads: list[str]
    writes: list[str]
    exit_output: str
    owned: list[str]
    replicated: list[str]
    macs: int


def partition(
    model: onnx.ModelProto, exit_names: list[str], probe: Probe, labels: Sequence[int] | None = None
) -> list[Stage]:
    """One stage per exit; `labels` are the exits' indices among the forward's outputs, for messages."""
    graph = import_graph(model)
    _name_nodes(graph)
    _check_compute_order(graph, exit_names, list(labels) if labels is not None else list(range(len(exit_names))))
    owner = _assign_owners(graph, exit_names)
    _warn_if_costlier_first(graph, exit_names, probe, labels if labels is not None else range(len(exit_names)))
    members = [_stage_members(graph, owner, k, probe) for k in range(len(exit_names))]
    reads = [stage_reads for _, stage_reads in members]
    stages = []
    for k, exit_name in enumerate(exit_names):
        nodes, stage_reads = members[k]
        owned = [n for n in nodes if owner[n.name] == k]
        assert owned, f"exit {k} owns no node although exits are in compute order"
        later_reads = {name for later in reads[k + 1 :] for name in later}
        produced = {t.name for n in owned for t in n.outputs}
        writes = sorted(produced & later_reads)
        stages.append(
            Stage(
                name=f"stage{k}",
                model=_extract(graph, stage_reads, [exit_name, *[w for w in writes if w != exit_name]], probe),
                reads=stage_reads,
                writes=writes,
                exit_output=exit_name,
                owned=[n.name for n in owned],
                replicated=[n.name for n in nodes if owner[n.name] != k],
                macs=sum(node_macs(n, probe) for n in nodes),
            )
        )
        _check_extracted(stages[-1], nodes)
    return stages


def _check_compute_order(graph: gs.Graph, exit_names: list[str], labels: list[int]) -> None:
    """Captured node order is the forward's execution order; exits taken out of it would make an early exit
    pay for the trunk of a later one."""
    position = {node.name: i for i, node in enumerate(graph.nodes)}
    tensors = graph.tensors()
    produced_at = [position[producer(tensors[name]).name] for name in exit_names]
    order = sorted(range(len(exit_names)), key=produced_at.__getitem__)
    if order != list(range(len(exit_names))):
        suggested = ",".join(str(labels[k]) for k in order)
        raise PartitionError(
            f"exits {labels} are not in compute order: the forward computes them in the order {suggested}; "
            f"list exits in compute order with --exits {suggested}."
        )


def _warn_if_costlier_first(graph: gs.Graph, exit_names: list[str], probe: Probe, labels: Sequence[int]) -> None:
    """An exit that alone costs more than a later one is most likely listed out of order (a forward returning
    the final logits first): the early exit would then pay for nearly the whole model. A warning, since a
    model may mean it."""
    tensors = graph.tensors()
    alone = []
    for name in exit_names:
        seen: dict[str, gs.Node] = {}
        stack = [producer(tensors[name])]
        while stack:
            node = stack.pop()
            if node is not None and node.name not in seen:
                seen[node.name] = node
                stack.extend(producer(t) for t in _node_inputs(node))
        alone.append(sum(node_macs(n, probe) for n in seen.values()))
    order = sorted(range(len(alone)), key=alone.__getitem__)
    if any(a > b for a, b in itertools.pairwise(alone)):
        costs = ", ".join(f"exit {label}: {macs / 1e6:.3g}" for label, macs in zip(labels, alone, strict=True))
        cheapest_first = ",".join(str(labels[k]) for k in order)
        warnings.warn(f"exits are listed with a costlier one before a cheaper one (MMACs alone: {costs}), so an "
                      "early exit would pay for most of the model; if the forward returns the final output first, "
                      f"list the exits cheapest first with --exits {cheapest_first}.", ExitOrderWarning, stacklevel=3)


def _name_nodes(graph: gs.Graph) -> None:
    """Stages are matched back to the full graph by node name, so every node needs a unique one."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{index}"
        seen.add(node.name)


def _node_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Inputs including tensors that control-flow subgraphs read from the enclosing scope."""
    inputs = list(node.inputs)
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            inner = {t.name for n in attr.nodes for t in n.outputs} | {t.name for t in attr.inputs}
            inputs += [t for n in attr.nodes for t in _node_inputs(n) if t.name not in inner]
    return inputs


def _assign_owners(graph: gs.Graph, exit_names: list[str]) -> dict[str, int]:
    """Each node belongs to the first exit that needs it; later exits stop at nodes already owned."""
    tensors = graph.tensors()
    owner: dict[str, int] = {}
    for k, exit_name in enumerate(exit_names):
        stack = [producer(tensors[exit_name])]
        while stack:
            node = stack.pop()
            if node is None or node.name in owner:
                continue
            owner[node.name] = k
            stack.extend(producer(t) for t in _node_inputs(node))
    return owner


def _stage_members(
    graph: gs.Graph, owner: dict[str, int], k: int, probe: Probe
) -> tuple[list[gs.Node], list[str]]:
    """The nodes stage k runs (its own plus recomputed batch-independent ones) and the state it reads."""
    members = {n.name: n for n in graph.nodes if owner.get(n.name) == k}
    reads: list[str] = []
    pending = [t for n in members.values() for t in _node_inputs(n)]
    while pending:
        tensor = pending.pop()
        made_by = producer(tensor)
        omitted_optional = not tensor.name
        if omitted_optional or isinstance(tensor, gs.Constant) or (made_by is not None and made_by.name in members):
            continue
        if made_by is None or tensor.name in probe.batched:
            if tensor.name not in reads:
                reads.append(tensor.name)
            continue
        members[made_by.name] = made_by
        pending.extend(_node_inputs(made_by))
    graph_order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(members.values(), key=lambda n: graph_order[n.name]), sorted(reads)


def _extract(graph: gs.Graph, reads: list[str], outputs: list[str], probe: Probe) -> onnx.ModelProto:
    """Cut the subgraph between `reads` and `outputs`, typed with a symbolic batch axis."""
    sub = graph.copy()
    tensors = sub.tensors()
    for name in reads:
        tensors[name].inputs.clear()
    sub.inputs = [_typed(tensors[name], probe) for name in reads]
    sub.outputs = [_typed(tensors[name], probe) for name in outputs]
    sub.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(sub)


def _typed(tensor: gs.Tensor, probe: Probe) -> gs.Tensor:
    if tensor.name not in probe.batched:
        raise PartitionError(
            f"tensor '{tensor.name}' crosses a stage boundary but has no batch axis; "
            "dync can only carry per-sample tensors between exits."
        )
    tensor.dtype = probe.dtypes[tensor.name]
    tensor.shape = [BATCH_DIM, *probe.per_sample_shape(tensor.name)]
    return tensor


def _check_extracted(stage: Stage, nodes: list[gs.Node]) -> None:
    extracted = sorted(n.name for n in stage.model.graph.node)
    assert extracted == sorted(n.name for n in nodes), f"{stage.name}: extraction kept other nodes than planned"
