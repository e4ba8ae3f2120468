"""Backends run a package behind one small interface, looked up by name.

The executor, `bench`, `profile` and `calibrate` run models only through `Backend`: one stage at a time for
early exit, or the static full model (every stage merged back into one graph) for baselines and for the
one pass over validation data that calibration needs. So a new backend is one class and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dync.errors import InputError
from dync.package import Manifest, StageSpec
from dync.runtime.backends.kernels import KernelTime


class Backend(Protocol):
    """What runs a package's graphs; constructed from the package directory, its manifest and options."""

    name: str
    """The backend's registry name; latency profiles are stored per backend under it."""

    def describe(self) -> dict[str, Any]:
        """The settings it runs with, printed by `bench` and stored with latency profiles."""
        ...

    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One stage on `feeds` (the tensors it reads): its exit output and every tensor it writes, by name."""
        ...

    def run_static(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The static full model on the package inputs: every exit's output, in exit order, under the same
        settings as the stages, so that it is a like-for-like baseline."""
        ...

    def run_executor(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole early-exit run in one call, as `Engine.execute` defines it: (every sample's exit output,
        its exit index); None when this backend runs this package stage by stage only."""
        ...

    def kernel_times(self) -> list[KernelTime]:
        """Every node run since load, for `bench --profile`, where the backend was loaded to profile
        (onnxruntime: `profile_dir`)."""
        ...


def _ort(package_dir: Path, manifest: Manifest, precision: str, **options: Any) -> Backend:
    from dync.runtime.backends.ort import OrtBackend

    return OrtBackend(package_dir, manifest, **options)


def _trt(package_dir: Path, manifest: Manifest, precision: str, **options: Any) -> Backend:
    from dync.runtime.backends.trt import TrtBackend

    return TrtBackend(package_dir, manifest, precision, **options)


BACKENDS: dict[str, Callable[..., Backend]] = {"ort": _ort, "trt": _trt}
"""Each makes a backend from the package directory, its manifest at one precision (in the backend's form,
`BACKEND_FORMS`), that precision's name, and the backend's own options."""
BACKEND_FORMS = {"ort": "cpu", "trt": "trt"}
"""Which graphs of a quantized stage a backend runs (`dync.package.at_precision`)."""


def backend_form(name: str, options: dict[str, Any]) -> str:
    """The quantized form a backend runs with these options: onnxruntime's TensorRT provider takes TensorRT's
    symmetric Q/DQ form, as TensorRT itself does."""
    if name not in BACKEND_FORMS:
        raise InputError(f"backend '{name}' is not available; choose one of {sorted(BACKENDS)}.")
    providers = tuple(options.get("providers") or ())
    return "trt" if providers[:1] == ("TensorrtExecutionProvider",) else BACKEND_FORMS[name]


def make_backend(name: str, package_dir: Path, manifest: Manifest, precision: str = "fp32", **options: Any
                 ) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"backend '{name}' is not available; choose one of {sorted(BACKENDS)}.")
    return BACKENDS[name](package_dir, manifest, precision, **options)
