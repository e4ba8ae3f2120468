"""The static full model: a package's stages merged back into one graph that computes every exit.

Stages are cuts of one exported graph, so their union (recomputed batch-independent nodes taken once) is
that graph again. Backends run it (`Backend.run_static`) under the same session options as the stages, so
that `bench` compares like with like and `calibrate` gets every exit's output in one pass.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from dync.package import Manifest


def merged_static_model(package_dir: str | Path, manifest: Manifest) -> onnx.ModelProto:
    """The merged graph: the package inputs in, every exit's output out, in exit order."""
    stages = [onnx.load(Path(package_dir) / s.onnx) for s in manifest.stages]
    nodes: dict[str, onnx.NodeProto] = {}
    initializers: dict[str, onnx.TensorProto] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: dict[str, onnx.ValueInfoProto] = {}
    for model in stages:
        nodes.update((n.name, n) for n in model.graph.node if n.name not in nodes)
        initializers.update((t.name, t) for t in model.graph.initializer)
        inputs.update((v.name, v) for v in model.graph.input)
        outputs.update((v.name, v) for v in model.graph.output)
    graph = helper.make_graph(
        list(nodes.values()),
        f"{manifest.name}_static",
        [inputs[t.name] for t in manifest.inputs],
        [outputs[e.output] for e in manifest.exits],
        list(initializers.values()),
    )
    first = stages[0]
    merged = helper.make_model(graph, opset_imports=list(first.opset_import), ir_version=first.ir_version)
    return gs.export_onnx(gs.import_onnx(merged).toposort())
