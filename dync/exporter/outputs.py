"""Which parts of a forward's returned structure are the exits.

Research forwards return a tensor, a list of exit logits (MSDNet, RANet), a tuple of (output, auxiliary
masks or scores) (DynamicViT, DyT), or a dict. An exit is named by a path into that structure: dot-separated
dict keys and sequence indices, e.g. "logits", "0" or "exits.2"; the empty path is the returned tensor itself.
A path that ends at a list or tuple of tensors stands for each of them, so `--outputs exits` picks every exit
of a dict's list. Without `--outputs`, `default_paths` picks the exits and says what it picked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dync.errors import CaptureError


def exit_paths(outputs: Any, requested: Sequence[str] | None) -> tuple[list[str], str | None]:
    """The path of every exit in `outputs`, and a sentence saying what was picked when that was a guess."""
    if requested is None:
        return default_paths(outputs)
    paths = [p for path in requested for p in _expanded(outputs, path)]
    if len(set(paths)) != len(paths):
        raise CaptureError(f"--outputs {','.join(requested)} names the same output twice; name each exit once.")
    return paths, None


def pick(outputs: Any, paths: Sequence[str]) -> list[torch.Tensor]:
    """The exits at `paths` in the structure the forward returned."""
    return [_at(outputs, path) for path in paths]


def default_paths(outputs: Any) -> tuple[list[str], str | None]:
    """A tensor is the one exit; a list or tuple of tensors of one per-sample shape is the exits (a multi-exit
    model's logits); otherwise the first element of a tuple or list is, its other elements being auxiliary."""
    if isinstance(outputs, torch.Tensor):
        return [""], None
    if isinstance(outputs, Mapping):
        raise CaptureError(
            f"the model's forward returned a dict with keys {_keys(outputs)}; name the exits with --outputs "
            "KEY[,KEY...] (Python: outputs=[...]), earliest exit first."
        )
    if isinstance(outputs, (list, tuple)) and outputs:
        if _tensors_of_one_shape(outputs):
            return [str(i) for i in range(len(outputs))], None
        first = outputs[0]
        if isinstance(first, torch.Tensor) or (isinstance(first, (list, tuple)) and _all_tensors(first)):
            paths = _expanded(outputs, "0")
            what = "the exit" if len(paths) == 1 else f"the {len(paths)} exits"
            return paths, (f"the forward returned a {type(outputs).__name__} of {len(outputs)}; element 0 is "
                           f"taken as {what} and the rest as auxiliary outputs, which the package drops (pick "
                           "others with --outputs)")
    raise CaptureError(
        f"the model's forward returned {_describe(outputs)}, in which no exit tensor can be told apart; name the "
        "exits with --outputs PATH[,PATH...] (dict keys and indices joined by dots, e.g. 0 or logits)."
    )


def _expanded(outputs: Any, path: str) -> list[str]:
    value = _at(outputs, path, expand=True)
    if isinstance(value, torch.Tensor):
        return [path]
    if isinstance(value, (list, tuple)) and value and _all_tensors(value):
        return [f"{path}.{i}" if path else str(i) for i in range(len(value))]
    raise CaptureError(f"--outputs {path or '(the whole output)'} is {_describe(value)}, not a tensor or a list "
                       "of tensors; name a tensor, or a list of exit tensors.")


def _at(outputs: Any, path: str, expand: bool = False) -> Any:
    value = outputs
    for key in path.split(".") if path else []:
        value = _child(value, key, path)
    if not expand and not isinstance(value, torch.Tensor):
        raise CaptureError(f"output {path!r} is {_describe(value)} where the package expects a tensor; export the "
                           "package again from this model.")
    return value


def _child(value: Any, key: str, path: str) -> Any:
    if isinstance(value, Mapping):
        if key not in value:
            raise CaptureError(f"--outputs {path}: the dict has no key {key!r}; its keys are {_keys(value)}.")
        return value[key]
    if isinstance(value, (list, tuple)):
        if not key.lstrip("-").isdigit() or not -len(value) <= int(key) < len(value):
            raise CaptureError(f"--outputs {path}: {key!r} is not an index into a {type(value).__name__} of "
                               f"{len(value)}; use 0..{len(value) - 1}.")
        return value[int(key)]
    if hasattr(value, key):  # dataclass- and namedtuple-like model outputs
        return getattr(value, key)
    raise CaptureError(f"--outputs {path}: {_describe(value)} has no part {key!r}.")


def _all_tensors(values: Sequence[Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in values)


def _tensors_of_one_shape(values: Sequence[Any]) -> bool:
    return _all_tensors(values) and len({tuple(v.shape[1:]) for v in values}) == 1


def _keys(mapping: Mapping) -> list[str]:
    return [str(k) for k in mapping]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"
