"""The example inputs export captures and verifies with, and how the model is called with them.

With `--input-shape` the model takes one float input, named `input` in the package and passed positionally.
With `--example EXAMPLE.npz` (Python: a dict of arrays) each array is one forward argument, keyed by the
argument's name and batch first; arguments left out keep their defaults (`complete_model=False`), and the
model is called with keywords, so the order of the arrays does not matter.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dync.errors import InputError
from dync.inputs import load_inputs, value_range
from dync.package import BATCH_DIM, TensorSpec

INPUT_NAME = "input"
"""The package input's name for a model exported from `--input-shape`."""

SUPPORTED_KINDS = "fiub"
"""float, signed and unsigned integer, bool."""


@dataclass(frozen=True)
class Example:
    """The inputs by name, in the forward's order."""

    arrays: dict[str, np.ndarray]

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    @property
    def batch(self) -> int:
        return len(next(iter(self.arrays.values())))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a) for a in self.arrays.values())

    def specs(self) -> list[TensorSpec]:
        """The package's input specs: symbolic batch, the example's per-sample shape and dtype."""
        return [TensorSpec(name, str(a.dtype), [BATCH_DIM, *a.shape[1:]], value_range(a))
                for name, a in self.arrays.items()]


def random_example(input_shape: Sequence[int]) -> Example:
    """One standard-normal float input; at least two samples, so that a batch of one is not the capture's."""
    shape = (max(input_shape[0], 2), *input_shape[1:])
    return Example({INPUT_NAME: torch.randn(*shape).numpy()})


def read_example(source: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file or a mapping (numpy arrays or tensors), checked for one shared batch."""
    where = str(source) if isinstance(source, (str, Path)) else "the example"
    raw = load_inputs(Path(source)) if isinstance(source, (str, Path)) else dict(source)
    if isinstance(raw, np.ndarray) or not raw:
        raise InputError(f"{where} must hold one named array per forward argument (numpy.savez(path, x=..., "
                         "t=...)); for one float input, --input-shape is enough.")
    arrays = {str(name): _as_array(name, value, where) for name, value in raw.items()}
    batches = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(batches.values())) != 1 or min(batches.values()) < 1:
        raise InputError(f"{where}: every input must share the batch as its first axis, but the batches are "
                         f"{batches}; give every argument the same number of samples.")
    return arrays


def bind_example(model: torch.nn.Module, arrays: dict[str, np.ndarray], where: str = "the example") -> Example:
    """`arrays` as keyword arguments of `model.forward`, in its order; every name must be one of its
    parameters and every parameter without a default must be given."""
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return Example(arrays)
    named = {n: p for n, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = [name for name in arrays if name not in named]
    if unknown:
        raise InputError(f"{where} has arrays {unknown} that are not arguments of {type(model).__name__}.forward "
                         f"({', '.join(named)}); key each array by the argument's name.")
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in arrays]
    if missing:
        raise InputError(f"{where} lacks {missing}, which {type(model).__name__}.forward requires; add an array "
                         "for each.")
    return Example({name: arrays[name] for name in named if name in arrays})


def by_keyword(names: Sequence[str]) -> bool:
    """Inputs from an example are forward arguments by name; the one `--input-shape` input is positional."""
    return list(names) != [INPUT_NAME]


def call_model(model: torch.nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> Any:
    """The forward on `tensors`, the inputs `names` in that order (see `by_keyword`)."""
    return model(**dict(zip(names, tensors, strict=True))) if by_keyword(names) else model(*tensors)


def _as_array(name: str, value: Any, where: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in SUPPORTED_KINDS or array.ndim == 0:
        raise InputError(f"{where}: input {name!r} is a {array.dtype} array of shape {list(array.shape)}; inputs "
                         "must be float, integer or bool arrays with the batch as their first axis.")
    if array.dtype == np.float64:
        raise InputError(f"{where}: input {name!r} is float64; models run in float32, so save it with "
                         f"{name}.astype(numpy.float32).")
    return np.ascontiguousarray(array)
