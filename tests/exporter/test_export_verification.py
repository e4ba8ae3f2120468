"""Export verifies the package before writing it: the record, a pass whose rewrite is wrong taken back, a
package that disagrees with eager never written, and a batch fixed by the model's code named by its line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

import dync
import dync.exporter
from dync.errors import PassUndoneWarning, VerificationError
from dync.exporter.passes import FORMS, PassContext
from dync.graph import export_graph, import_graph
from dync.records import SpatialRecord
from tests.conftest import invoke
from tests.helpers import assert_close, eager_outputs
from tests.models import TINY_SHAPE, tiny_model
from zoo import random_input
from zoo.idioms import MeanThenNoOpSqueeze


def test_export_records_a_verification_at_three_batch_sizes(tmp_path: Path) -> None:
    package = dync.export(tiny_model(), tmp_path / "tiny.dync", input_shape=TINY_SHAPE)
    record = dync.load(package).manifest.verification
    assert record is not None and record.passed
    assert record.batches == [TINY_SHAPE[0], 1, 3] and len(record.max_abs_error) == 3
    assert "verification: passed" in invoke(["inspect", package]).stdout


def test_no_verify_writes_no_record(tmp_path: Path) -> None:
    package = dync.export(tiny_model(), tmp_path / "tiny.dync", input_shape=TINY_SHAPE, verify=False)
    assert dync.load(package).manifest.verification is None


class _OffByOnePercent:
    """A pass that claims to lower the exit's producer and scales the stage's first output by 1.01."""

    name = "spatial"
    forms = FORMS

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto, list[SpatialRecord]]:
        graph = import_graph(model)
        output = graph.outputs[0]
        scaled = gs.Variable("scaled", dtype=output.dtype, shape=output.shape)
        producer = output.inputs[0]
        producer.outputs[0] = scaled
        graph.nodes.append(gs.Node("Mul", "broken", inputs=[scaled, gs.Constant("s", np.array(1.01, np.float32))],
                                   outputs=[output]))
        graph.toposort()
        return export_graph(graph, like=model), [SpatialRecord(producer.name, True, "lowered (portable)")]


class _OneGoodOneBad:
    """A pass with two candidates per stage: its first Relu, rewritten exactly as Max(x, 0), and the producer of
    its first output, scaled by 1.01; it leaves the candidates the context skips."""

    name = "spatial"
    forms = FORMS

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto, list[SpatialRecord]]:
        graph = import_graph(model)
        relu = next(n for n in graph.nodes if n.op == "Relu")
        producer = graph.outputs[0].inputs[0]
        records = []
        if relu.name not in context.skipped(self.name):
            relu.op, relu.inputs = "Max", [relu.inputs[0], gs.Constant("zero", np.array(0.0, np.float32))]
            records.append(SpatialRecord(relu.name, True, "lowered (portable)"))
            context.progress(f"rewrote {relu.name}")
        if producer.name not in context.skipped(self.name):
            scaled = gs.Variable("scaled", dtype=graph.outputs[0].dtype, shape=graph.outputs[0].shape)
            output, producer.outputs[0] = producer.outputs[0], scaled
            graph.nodes.append(gs.Node("Mul", "broken", inputs=[scaled, gs.Constant("s", np.array(1.01, np.float32))],
                                       outputs=[output]))
            records.append(SpatialRecord(producer.name, True, "lowered (portable)"))
        if not records:
            return model, []
        graph.toposort()
        return export_graph(graph, like=model), records


def test_only_the_rewrite_that_changes_the_outputs_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dync.exporter, "PASSES", (_OneGoodOneBad(),))
    model = tiny_model()
    messages: list[str] = []
    with pytest.warns(PassUndoneWarning, match=r"pass spatial changed the outputs of stage0 at \S+ \(output 'exit0'"):
        package = dync.export(model, tmp_path / "tiny.dync", input_shape=TINY_SHAPE, progress=messages.append)
    rewrites = [m for m in messages if m.startswith("rewrote ")]
    assert len(rewrites) == len(set(rewrites)) == 3, "each stage's kept rewrite is reported once"
    manifest = dync.load(package).manifest
    assert [r.lowered for r in manifest.records("spatial")] == [True, False] * 3
    assert all(r.reason.startswith("undone: ") for r in manifest.records("spatial") if not r.lowered)
    for spec in manifest.stages:
        ops = {n.op_type for n in onnx.load(package / spec.onnx).graph.node}
        assert "Max" in ops and "broken" not in {n.name for n in onnx.load(package / spec.onnx).graph.node}
    x = random_input(TINY_SHAPE[1:], 5, seed=3)
    assert_close(dync.load(package).run(x, thresholds=[2.0, 2.0]).logits, eager_outputs(model, x)[2])


def test_a_pass_that_changes_the_outputs_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dync.exporter, "PASSES", (_OffByOnePercent(),))
    model = tiny_model()
    with pytest.warns(PassUndoneWarning, match=r"pass spatial changed the outputs of stage0 \(output 'exit0' is off"):
        package = dync.export(model, tmp_path / "tiny.dync", input_shape=TINY_SHAPE)
    manifest = dync.load(package).manifest
    assert [r.lowered for r in manifest.records("spatial")] == [False] * 3
    assert all(r.reason.startswith("undone: the rewritten stage output") for r in manifest.records("spatial"))
    assert all("broken" not in {n.name for n in onnx.load(package / s.onnx).graph.node} for s in manifest.stages)
    x = random_input(TINY_SHAPE[1:], 5, seed=3)
    assert_close(dync.load(package).run(x, thresholds=[2.0, 2.0]).logits, eager_outputs(model, x)[2])


class _Noisy(torch.nn.Module):
    """Eager and the exported graph draw different noise: the package cannot equal eager."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + torch.randn_like(x))


def test_a_package_that_disagrees_with_eager_is_not_written(tmp_path: Path) -> None:
    out = tmp_path / "noisy.dync"
    with pytest.raises(VerificationError, match=r"disagrees with eager PyTorch .* batches \[4, 1, 3\]"):
        dync.export(_Noisy().eval(), out, input_shape=(4, 6), force=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_verification_keeps_the_earlier_package(tmp_path: Path) -> None:
    out = dync.export(tiny_model(), tmp_path / "pkg.dync", input_shape=TINY_SHAPE)
    before = (out / "manifest.json").read_text()
    with pytest.raises(VerificationError):
        dync.export(_Noisy().eval(), out, input_shape=(4, 6), force=True)
    assert (out / "manifest.json").read_text() == before


def test_cli_no_verify_writes_no_record(tmp_path: Path) -> None:
    tiny_path = tmp_path / "tiny.pt"
    torch.save(tiny_model(), tiny_path)
    result = invoke(["export", tiny_path, "-o", tmp_path / "tiny.dync", "--input-shape", "4x3x16x16", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert dync.load(tmp_path / "tiny.dync").manifest.verification is None


def test_a_no_op_squeeze_is_repaired_and_exact(tmp_path: Path) -> None:
    """`torch.mean(x, dim=1).squeeze(1)` on [B, N, C]: onnxruntime refuses the plain translation at load."""
    torch.manual_seed(0)
    model = MeanThenNoOpSqueeze().eval()
    messages: list[str] = []
    package = dync.export(model, tmp_path / "squeeze.dync", input_shape=(4, 5, 12), progress=messages.append)
    assert any(m.startswith("repaired a translation defect at ") and "became an Identity" in m for m in messages)
    for batch in (1, 3, 7):
        x = random_input((5, 12), batch, seed=batch)
        assert_close(dync.load(package).run(x).logits, eager_outputs(model, x)[0], what=f"batch {batch}")


def test_a_mistranslated_tensor_is_named_with_its_model_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A captured graph wrong at the example batch itself (here: its first Relu made a LeakyRelu, as a
    translation defect would) is refused naming that tensor and the model line it came from."""
    import importlib

    capture_module = importlib.import_module("dync.exporter.capture")
    real = capture_module.repair_translation_defects

    def mistranslate(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
        graph = import_graph(model)
        relu = next(n for n in graph.nodes if n.op == "Relu")
        relu.op, relu.attrs = "LeakyRelu", {"alpha": 0.5}
        return real(export_graph(graph, like=model))

    monkeypatch.setattr(capture_module, "repair_translation_defects", mistranslate)
    with pytest.raises(VerificationError) as info:
        dync.export(tiny_model(), tmp_path / "wrong.dync", input_shape=TINY_SHAPE)
    message = str(info.value)
    assert "The captured graph differs from eager first at tensor 'relu' of LeakyRelu node" in message, message
    assert "tests/models.py" in message and "translation defect of torch.onnx" in message
    assert not (tmp_path / "wrong.dync").exists()
