"""Turn a model file into an `nn.Module` the capture step can export.

Three formats arrive: a pickled module (`torch.save(model)`), TorchScript (`torch.jit.save`) and a
`torch.export` program (`.pt2`). All three end as an eager-callable module so capture has one path.
Loading a pickle runs code from the file, so a pickle is loaded only when the user says they trust it
(`trust_pickle`, `--trust-pickle`, or DYNC_TRUST_PICKLE=1).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from pathlib import Path

import torch

from dync.errors import ModelLoadError

TRUST_PICKLE_ENV = "DYNC_TRUST_PICKLE"
"""Set to 1 to load pickled models without `--trust-pickle` (for scripts that only load their own models)."""


def load_model(path: str | Path, example: tuple[torch.Tensor, ...] | None = None,
               trust_pickle: bool = False) -> torch.nn.Module:
    """Load `path` in eval mode; `example` (the forward's inputs) is needed only to convert TorchScript. A
    pickle is unpickled only with `trust_pickle` (or DYNC_TRUST_PICKLE=1): unpickling runs whatever code the
    file holds, while `.pt2` programs and TorchScript load without running Python from the file."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the model file (saved with torch.save, torch.jit.save "
                             "or torch.export.save).")
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; pass the path of a model saved with torch.save(model).")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path} is not a PyTorch model file (not a torch.save / torch.jit.save / torch.export.save archive); "
            "save the whole module with torch.save(model, path)."
        )
    kind = _archive_kind(path)
    if kind == "pickle" and not (trust_pickle or os.environ.get(TRUST_PICKLE_ENV) == "1"):
        raise ModelLoadError(
            f"{path} is a pickled model, and unpickling runs any code the file holds; pass --trust-pickle (or set "
            f"{TRUST_PICKLE_ENV}=1) if you trust where it came from, or save the model as a torch.export program "
            "(torch.export.save(torch.export.export(model, args), 'model.pt2')) or as TorchScript, which load "
            "without running its code."
        )
    loader = {"pt2": _load_exported_program, "torchscript": _load_torchscript, "pickle": _load_pickle}[kind]
    return eval_mode(loader(path, example))


def eval_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Modules from `ExportedProgram.module()` refuse `.eval()`; they were captured in eval mode already."""
    with contextlib.suppress(NotImplementedError):
        model.eval()
    return model


def _archive_kind(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("archive_format") or "/serialized_exported_program" in name for name in names):
        return "pt2"
    if any("/code/" in name for name in names) and any(name.endswith("constants.pkl") for name in names):
        return "torchscript"
    return "pickle"


def _load_pickle(path: Path, example: tuple[torch.Tensor, ...] | None) -> torch.nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ModelLoadError(
            f"{path} pickles a model whose class cannot be imported ({exc}); "
            "put the module that defines it on PYTHONPATH."
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{path} could not be unpickled ({exc}); re-save it with torch.save(model).") from exc
    if isinstance(obj, dict):
        raise ModelLoadError(
            f"{path} holds a dict (a state_dict or checkpoint), not a model; build the module, load the weights "
            "into it and save the module itself with torch.save(model, path)."
        )
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module; save the model itself.")
    return obj


def _load_torchscript(path: Path, example: tuple[torch.Tensor, ...] | None) -> torch.nn.Module:
    """TorchScript is converted to a torch.export program so capture sees the same IR as for eager models."""
    from torch._export.converter import TS2EPConverter

    assert example is not None, "TorchScript conversion needs an example input"
    scripted = torch.jit.load(str(path), map_location="cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about every unused BatchNorm counter
            program = TS2EPConverter(scripted, example).convert()
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is TorchScript that torch.export cannot convert ({type(exc).__name__}: {exc}); "
            "save the eager module with torch.save(model) instead."
        ) from exc
    return program.module()


def _load_exported_program(path: Path, example: tuple[torch.Tensor, ...] | None) -> torch.nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable torch.export program ({exc}); re-save it.") from exc
    return program.module()
