"""Plugin ops: the dynamic ops with no standard ONNX operator, one subpackage per op family, every face of an
op defined there (see `op_registry.py` for the faces and `docs/architecture.md` for adding an op).

`registry()` is the one lookup for every caller; `splice` finds `dync::` nodes in models and replaces them by
their decompositions or fast CPU paths. Importing this package imports no op module, onnx or torch.
"""

from __future__ import annotations

from dync.plugins.op_registry import FACES, Face, OpRecord, OpRegistry, registry

__all__ = ["FACES", "Face", "OpRecord", "OpRegistry", "registry"]
