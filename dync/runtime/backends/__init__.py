"""Backends run one stage at a time behind one small interface, looked up by name.

A backend is constructed from a package (directory and manifest) and must offer
`run(stage, feeds) -> {name: array}` and `describe() -> dict` (its settings, printed by `bench`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dync.errors import InputError
from dync.package import Manifest, StageSpec


class Backend(Protocol):
    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


def _ort(package_dir: Path, manifest: Manifest, **options: Any) -> Backend:
    from dync.runtime.backends.ort import OrtBackend

    return OrtBackend(package_dir, manifest, **options)


BACKENDS: dict[str, Callable[..., Backend]] = {"ort": _ort}


def make_backend(name: str, package_dir: Path, manifest: Manifest, **options: Any) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"backend '{name}' is not available; choose one of {sorted(BACKENDS)}.")
    return BACKENDS[name](package_dir, manifest, **options)
