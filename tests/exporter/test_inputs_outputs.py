"""Models with several inputs (float and integer, by argument name) and structured outputs: a DiT-style
forward(x, t, y) exact at batches 1, 2, 5 and 16 through the CLI, every input compacted with the batch, exits
picked out of dicts and (output, masks) tuples, exits of different per-sample shapes, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import dync
from dync.errors import CaptureError, InputError
from dync.runtime.exit_rule import forcing_thresholds
from tests.conftest import invoke
from tests.helpers import assert_close
from zoo.dit import TinyDiT, dit_example


def _eager(model: nn.Module, arrays: dict[str, np.ndarray]) -> object:
    with torch.no_grad():
        return model(**{name: torch.from_numpy(a) for name, a in arrays.items()})


def test_a_diffusion_transformer_with_three_inputs_through_the_cli(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyDiT().eval()
    torch.save(model, tmp_path / "dit.pt")
    np.savez(tmp_path / "example.npz", **dit_example(4))
    result = invoke(["export", tmp_path / "dit.pt", "-o", tmp_path / "dit.dync", "--example", tmp_path / "example.npz"])
    assert result.exit_code == 0, result.output
    inputs = dync.load(tmp_path / "dit.dync").manifest.inputs
    assert [(t.name, t.dtype) for t in inputs] == [("x", "float32"), ("t", "int64"), ("y", "int64")]
    for batch in (1, 2, 5, 16):
        arrays = dit_example(batch, seed=batch)
        np.savez(tmp_path / "in.npz", **arrays)
        ran = invoke(["run", tmp_path / "dit.dync", "--input", tmp_path / "in.npz", "-o", tmp_path / "out.npz"])
        assert ran.exit_code == 0, ran.output
        assert_close(np.load(tmp_path / "out.npz")["logits"], _eager(model, arrays).numpy(), what=f"batch {batch}")


def test_run_takes_inputs_in_order_or_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyDiT().eval()
    engine = dync.load(dync.export(model, tmp_path / "dit.dync", example=dit_example(3)))
    arrays = dit_example(2, seed=7)
    by_name = engine.run(arrays).logits
    np.testing.assert_array_equal(engine.run(arrays["x"], arrays["t"], arrays["y"]).logits, by_name)
    assert_close(by_name, _eager(model, arrays).numpy())
    with pytest.raises(InputError, match=r"takes 3 input\(s\) \(x, t, y\) but run got 2"):
        engine.run(arrays["x"], arrays["t"])
    with pytest.raises(InputError, match="must share the batch"):
        engine.run({**arrays, "y": arrays["y"][:1]})


class _LabelledExits(nn.Module):
    """Two exits; the second reads a per-sample class embedding, so `y` is carried into stage 1 and must be
    compacted with the samples that go on."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head0, self.head1 = nn.Linear(8, 5), nn.Linear(8, 5)
        self.deep = nn.Linear(8, 8)
        self.embed = nn.Embedding(4, 8)

    def forward(self, x: Tensor, y: Tensor) -> list[Tensor]:
        h = self.body(x).relu()
        return [self.head0(h), self.head1(self.deep(h).relu() + self.embed(y))]


def test_every_input_is_compacted_with_the_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _LabelledExits().eval()
    rng = np.random.default_rng(0)
    example = {"x": rng.standard_normal((4, 6)).astype(np.float32), "y": rng.integers(0, 4, 4)}
    engine = dync.load(dync.export(model, tmp_path / "labelled.dync", example=example))
    assert "y" in engine.manifest.stages[1].reads
    arrays = {"x": rng.standard_normal((9, 6)).astype(np.float32), "y": rng.integers(0, 4, 9)}
    reference = [o.numpy() for o in _eager(model, arrays)]
    confidences = torch.softmax(torch.from_numpy(reference[0]), dim=-1).max(-1).values.numpy()
    threshold = float(np.median(confidences))
    result = engine.run(arrays, thresholds=[threshold])
    assert 0 < (result.exit == 0).sum() < 9, "the threshold splits the batch"
    expected = np.where((result.exit == 0)[:, None], reference[0], reference[1])
    assert_close(result.logits, expected)


class _DictOfExits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> dict[str, object]:
        early = self.a(x)
        return {"exits": [early, self.b(early.relu())], "mask": x > 0}


class _OutputAndMasks(nn.Module):
    """DynamicViT-style: the logits, and a list of per-stage keep masks beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.a(x), [x > 0, x > 1]


def test_exits_are_picked_out_of_a_dict_with_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DictOfExits().eval()
    with pytest.raises(CaptureError, match=r"returned a dict with keys \['exits', 'mask'\]; name the exits"):
        dync.export(model, tmp_path / "refused.dync", input_shape=(4, 6))
    engine = dync.load(dync.export(model, tmp_path / "dict.dync", input_shape=(4, 6), outputs=["exits"]))
    assert engine.manifest.output_selection == ["exits.0", "exits.1"]
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    reference = _eager(model, {"x": x})["exits"]
    for k in range(2):
        assert_close(engine.execute(x, forcing_thresholds(k, 2)).logits, reference[k].numpy(), what=f"exit {k}")


def test_the_first_element_of_an_output_and_masks_tuple_is_the_exit(tmp_path: Path) -> None:
    messages: list[str] = []
    model = _OutputAndMasks().eval()
    engine = dync.load(dync.export(model, tmp_path / "masks.dync", input_shape=(4, 6), progress=messages.append))
    assert any("element 0 is taken as the exit and the rest as auxiliary outputs" in m for m in messages)
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    assert_close(engine.run(x).logits, _eager(model, {"x": x})[0].numpy())


class _ClassifyThenDetect(nn.Module):
    """An early classification exit [B, 4] and a later detection-style exit [B, 3, 6]."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.cls = nn.Linear(6, 8), nn.Linear(8, 4)
        self.det = nn.Linear(8, 18)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x).relu()
        return self.cls(h), self.det(h.relu()).view(x.size(0), 3, 6)


def test_exits_of_different_shapes_come_back_per_exit_with_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _ClassifyThenDetect().eval()
    torch.save(model, tmp_path / "det.pt")
    result = invoke(["export", tmp_path / "det.pt", "-o", tmp_path / "det.dync", "--input-shape", "4x6",
                     "--outputs", "0,1"])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(3).standard_normal((6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cls, det = (o.numpy() for o in _eager(model, {"x": x}))
    confidences = torch.softmax(torch.from_numpy(cls), dim=-1).max(-1).values.numpy()
    threshold = float(np.median(confidences))
    ran = invoke(["run", tmp_path / "det.dync", "--input", tmp_path / "x.npy", "-o", tmp_path / "out.npz",
                  "--thresholds", str(threshold)])
    assert ran.exit_code == 0, ran.output
    out = np.load(tmp_path / "out.npz")
    assert "logits" not in out.files and out["exit0"].shape == (6, 4) and out["exit1"].shape == (6, 3, 6)
    taken = out["exit"] == 0
    np.testing.assert_array_equal(out["exit0_taken"], taken)
    assert 0 < taken.sum() < 6, "the threshold splits the batch"
    assert_close(out["exit0"][taken], cls[taken])
    assert_close(out["exit1"][~taken], det[~taken])
    with pytest.raises(InputError, match="different per-sample shapes"):
        _ = dync.load(tmp_path / "det.dync").run(x).logits


class _WithDefaults(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x: Tensor, t: Tensor, complete_model: bool = False) -> Tensor:
        return self.a(x) * (t[:, None].float() + (0.0 if complete_model else 1.0))


def test_example_names_are_checked_against_the_forward(tmp_path: Path) -> None:
    model = _WithDefaults().eval()
    x, t = np.ones((2, 6), np.float32), np.arange(2)
    with pytest.raises(InputError, match=r"arrays \['z'\] that are not arguments of _WithDefaults.forward"):
        dync.export(model, tmp_path / "a.dync", example={"x": x, "t": t, "z": t})
    with pytest.raises(InputError, match=r"lacks \['t'\], which _WithDefaults.forward requires"):
        dync.export(model, tmp_path / "b.dync", example={"x": x})
    with pytest.raises(InputError, match="share the batch"):
        dync.export(model, tmp_path / "c.dync", example={"x": x, "t": np.arange(3)})
    with pytest.raises(InputError, match="give one of them"):
        dync.export(model, tmp_path / "d.dync", input_shape=(2, 6), example={"x": x, "t": t})
    engine = dync.load(dync.export(model, tmp_path / "ok.dync", example={"t": t, "x": x}))
    assert engine.input_names == ["x", "t"], "the forward's order, whatever the example's"
