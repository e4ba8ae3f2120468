"""Softmax attention into ONNX `Attention` nodes, where onnxruntime runs them faster.

`fuse.py` matches softmax attention chains and fuses the ones a choice picks (docs/attention.md), in the
op's 3-D form where `heads.py` finds Q, K and V to be head views; `measure.py` makes the choice by timing
both forms of each distinct attention shape on this machine. `graph.py` holds the small graph queries.
"""

from dync.exporter.passes.attention.fuse import ATTENTION_OPSET, AttentionShape, FusionReport, fuse_all, fuse_attention
from dync.exporter.passes.attention.measure import FasterForm

__all__ = ["ATTENTION_OPSET", "AttentionShape", "FasterForm", "FusionReport", "fuse_all", "fuse_attention"]
