"""Graph passes over each stage's ONNX model, one rule family per subpackage, run in the order of `PASSES`.

* `spatial`: LASNet-style masked bottlenecks to gather-scatter execution (both forms);
* `tokens`: DyT-style token dispatch to an MLP on the packed kept tokens (portable form);
* `sparse_attention`: softmax attention to block-sparse attention under `--sparse-attention` (both forms);
* `attention`: softmax attention into ONNX `Attention` where measured faster (portable form).

`context.py` holds the contract every pass keeps (`Pass`, `PassContext`, the forms).
"""

from __future__ import annotations

from dync.exporter.passes.attention import AttentionPass
from dync.exporter.passes.context import FORMS, Pass, PassContext
from dync.exporter.passes.sparse_attention import SparseAttentionPass
from dync.exporter.passes.spatial import SpatialPass
from dync.exporter.passes.tokens import TokenPass

PASSES: tuple[Pass, ...] = (SpatialPass(), TokenPass(), SparseAttentionPass(), AttentionPass())
"""Every pass, in the order each stage goes through them (sparse attention takes softmax chains before the
attention fusion would)."""

__all__ = ["FORMS", "PASSES", "Pass", "PassContext"]
