"""What each optional extra of `pip install dync` holds, and one check for the commands that need one.

`pip install dync` is the light runtime install: a package loads, runs, benches, calibrates, quantizes and
profiles with numpy, onnx, onnxruntime, onnx-graphsurgeon, click and ml_dtypes alone. Exporting and verifying
need `dync[export]` (torch, onnxscript, polygraphy), the calibration picture `dync[plot]` (matplotlib), and
TensorRT engines `dync[build]` or `dync[trt]`. Entry points call `require` before the first heavy import, so a
light install fails with one line naming the package and the pip command instead of a ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util

from dync.errors import InstallError

EXPORT_MODULES = ("torch", "onnxscript", "polygraphy")
"""What `dync[export]` adds: capture and the eager reference, the exporter's graph translation, the batch probe."""

PINS = {"torch": "torch==2.13.0 for the CPU build"}
"""Packages whose unpinned install goes wrong (torch pulls a multi-GB CUDA build), and what to pin."""


def is_installed(module: str) -> bool:
    """Whether `module` can be found, without importing it (a refused import counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ImportError: a parent is missing or refused; ValueError: no __spec__
        return False


def require(module: str, extra: str, command: str) -> None:
    """Raise InstallError, one line naming `module` and `pip install "dync[extra]"`, unless `module` is
    installed; `command` is what the user ran (e.g. "dync export", "dync.export(...)")."""
    if is_installed(module):
        return
    pin = f" (and pin {PINS[module]})" if module in PINS else ""
    raise InstallError(f'{command} needs {module}, which the light install leaves out; install it with '
                       f'pip install "dync[{extra}]"{pin}.')


def require_export(command: str) -> None:
    """Everything `dync[export]` holds, for the commands that capture or run the eager model."""
    for module in EXPORT_MODULES:
        require(module, "export", command)
