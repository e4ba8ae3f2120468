"""dync: a deployment compiler for dynamic neural networks.

`dync.export(...)` lowers a multi-exit PyTorch model into a `.dync` package of static ONNX stages;
`dync.load(PKG)` returns an engine that runs it with per-sample early exit and batch compaction.
Heavy imports (torch, onnxruntime) happen on first use, so `import dync` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dync.version import __version__

if TYPE_CHECKING:
    from dync.runtime.engine import Engine


def export(*args: Any, **kwargs: Any):
    """See `dync.exporter.export`; needs `dync[export]`, which the light runtime install leaves out."""
    from dync.extras import require_export

    require_export("dync.export(...)")
    from dync.exporter import export as _export

    return _export(*args, **kwargs)


def load(package: str, backend: str = "ort", precision: str | None = None, **backend_options: Any) -> Engine:
    """Load a package for execution at `precision` (fp32, int8, fp8; None: what the package holds); see
    `dync.runtime.engine.Engine`."""
    from dync.runtime.engine import Engine

    return Engine.load(package, backend=backend, precision=precision, **backend_options)


__all__ = ["__version__", "export", "load"]
