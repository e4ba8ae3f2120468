"""Model files in the three accepted formats export and match eager; anything else fails with a clear error."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import dync
from dync.errors import ModelLoadError
from dync.exporter.loading import load_model
from dync.runtime.exit_rule import forcing_thresholds
from tests.conftest import Exported, invoke
from tests.helpers import assert_close, eager_outputs
from tests.models import TINY_SHAPE, TinyMultiExit, tiny_model
from zoo import random_input
from zoo.multi_exit import SingleExitNet


def _save_script(model: torch.nn.Module, path: Path) -> None:
    torch.jit.save(torch.jit.script(model), str(path))


def _save_trace(model: torch.nn.Module, path: Path) -> None:
    torch.jit.save(torch.jit.trace(model, torch.randn(*TINY_SHAPE), strict=False), str(path))


def _save_pt2(model: torch.nn.Module, path: Path) -> None:
    program = torch.export.export(
        model, (torch.randn(*TINY_SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(path))


SAVERS: dict[str, tuple[Callable[[torch.nn.Module, Path], None], str]] = {
    "torchscript_script": (_save_script, "model.pt"),
    "torchscript_trace": (_save_trace, "model.pt"),
    "torch_export": (_save_pt2, "model.pt2"),
}


def _check_every_exit(package: Path, model: torch.nn.Module) -> None:
    engine = dync.load(package)
    x = random_input(TINY_SHAPE[1:], 5, seed=0)  # batch 5: not the example's batch
    reference = eager_outputs(model, x)
    assert engine.num_exits == len(reference)
    for k, ref in enumerate(reference):
        assert_close(engine.execute(x, forcing_thresholds(k, engine.num_exits)).logits, ref, what=f"exit {k}")


def test_pickled_module_loads_as_its_class(single_exit: Exported) -> None:
    loaded = load_model(single_exit.model_path)
    assert type(loaded) is SingleExitNet
    assert not loaded.training
    x = torch.from_numpy(random_input(single_exit.sample_shape, 3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), single_exit.model(x), rtol=0, atol=0)


def test_pickled_module_exports_with_provenance(single_exit: Exported) -> None:
    provenance = single_exit.engine.manifest.provenance
    assert provenance.source == str(single_exit.model_path)
    assert provenance.source_sha256 == hashlib.sha256(single_exit.model_path.read_bytes()).hexdigest()
    assert provenance.example_input_shape == list(single_exit.input_shape)
    assert provenance.torch == torch.__version__
    x = random_input(single_exit.sample_shape, 6, seed=2)
    assert_close(single_exit.engine.run(x).logits, eager_outputs(single_exit.model, x)[0])


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_model_file_format_exports_and_matches_eager(tmp_path: Path, fmt: str) -> None:
    save, filename = SAVERS[fmt]
    model = tiny_model()
    save(model, tmp_path / filename)
    package = dync.export(tmp_path / filename, tmp_path / "tiny.dync", input_shape=TINY_SHAPE)
    _check_every_exit(package, model)


# --------------------------------------------------------------------------- #
# Files that are not models
# --------------------------------------------------------------------------- #


def _state_dict(path: Path) -> None:
    torch.save(tiny_model().state_dict(), path)


def _checkpoint(path: Path) -> None:
    torch.save({"model": tiny_model().state_dict(), "epoch": 3}, path)


def _tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def _text(path: Path) -> None:
    path.write_text("not a model\n")


def _numpy(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.zeros(3))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


BAD_FILES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("state_dict", _state_dict, ["dict", "state_dict", "torch.save(model"]),
    ("checkpoint", _checkpoint, ["dict", "not a model"]),
    ("tensor", _tensor, ["Tensor", "not a torch.nn.Module"]),
    ("text", _text, ["not a PyTorch model file"]),
    ("numpy", _numpy, ["not a PyTorch model file"]),
    ("empty", _empty, ["not a PyTorch model file"]),
    ("foreign_zip", _foreign_zip, ["could not be unpickled"]),
]


@pytest.mark.parametrize(("kind", "write", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_file_that_is_not_a_model_is_refused(
    tmp_path: Path, kind: str, write: Callable[[Path], None], words: list[str]
) -> None:
    path = tmp_path / f"{kind}.pt"
    write(path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        dync.export(path, tmp_path / "out.dync")
    assert str(path) in str(info.value)
    assert not (tmp_path / "out.dync").exists()


def test_pickle_of_an_unimportable_class_says_to_fix_pythonpath(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "vanishing_models.py").write_text(
        "import torch\n\nclass Vanishing(torch.nn.Module):\n    def forward(self, x):\n        return x\n"
    )
    sys.path.insert(0, str(source))
    try:
        import vanishing_models  # type: ignore[import-not-found]

        torch.save(vanishing_models.Vanishing(), tmp_path / "vanishing.pt")
    finally:
        sys.path.remove(str(source))
        sys.modules.pop("vanishing_models", None)
    with pytest.raises(ModelLoadError, match="PYTHONPATH") as info:
        load_model(tmp_path / "vanishing.pt")
    assert "vanishing.pt" in str(info.value)


def test_loaded_pickle_is_in_eval_mode(tmp_path: Path) -> None:
    model = TinyMultiExit().train()
    torch.save(model, tmp_path / "training.pt")
    assert not load_model(tmp_path / "training.pt").training


class _WritesAFileWhenUnpickled:
    """What a hostile model file can do: unpickling calls `Path.touch` on a path of its choosing."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.target,))


def test_a_pickle_is_refused_without_the_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNC_TRUST_PICKLE", raising=False)
    marker = tmp_path / "pwned"
    torch.save(_WritesAFileWhenUnpickled(marker), tmp_path / "hostile.pt")
    result = invoke(["export", tmp_path / "hostile.pt", "-o", tmp_path / "h.dync", "--input-shape", "2x3"])
    assert result.exit_code == 1 and "unpickling runs any code the file holds; pass --trust-pickle" in result.stderr
    assert "torch.export.save" in result.stderr and not marker.exists()
    with pytest.raises(ModelLoadError, match="pass --trust-pickle"):
        load_model(tmp_path / "hostile.pt")
    assert not marker.exists(), "nothing from the file ran"


def test_trusted_pickles_and_programs_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNC_TRUST_PICKLE", raising=False)
    model = tiny_model()
    torch.save(model, tmp_path / "tiny.pt")
    assert isinstance(load_model(tmp_path / "tiny.pt", trust_pickle=True), torch.nn.Module)
    monkeypatch.setenv("DYNC_TRUST_PICKLE", "1")
    assert isinstance(load_model(tmp_path / "tiny.pt"), torch.nn.Module)
    monkeypatch.delenv("DYNC_TRUST_PICKLE")
    torch.export.save(torch.export.export(model, (torch.randn(*TINY_SHAPE),)), tmp_path / "tiny.pt2")
    assert isinstance(load_model(tmp_path / "tiny.pt2"), torch.nn.Module), "a .pt2 program needs no opt-in"


def test_a_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory; pass the model file"):
        load_model(tmp_path)
