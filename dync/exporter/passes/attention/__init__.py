"""Softmax attention into ONNX `Attention` nodes, where onnxruntime runs them faster.

`fuse.py` matches softmax attention chains and fuses the ones a choice picks (docs/attention.md), in the
op's 3-D form where `heads.py` finds Q, K and V to be head views; `measure.py` makes the choice by timing
both forms of each distinct attention shape on this machine. `AttentionPass` is the exporter's pass; it
serves only the portable form, since TensorRT's ONNX parser has no `Attention` op.
"""

from __future__ import annotations

import dataclasses

import onnx

from dync.exporter.passes.attention.fuse import ATTENTION_OPSET, fuse_all, fuse_attention
from dync.exporter.passes.attention.measure import FasterForm
from dync.exporter.passes.context import PassContext
from dync.records import AttentionRecord, AttentionShape

__all__ = ["ATTENTION_OPSET", "AttentionPass", "AttentionShape", "FasterForm", "fuse_all", "fuse_attention"]


class AttentionPass:
    """Softmax attentions fused into ONNX `Attention` where that measures faster on this machine (portable form).

    Keeps: stage inputs and outputs, the dynamic batch, outputs equal to the unfused graph's to float rounding.
    Each distinct attention shape is timed once per export, whichever stage it is in.
    """

    name = "attention"
    forms = ("portable",)

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto, list[AttentionRecord]]:
        faster = context.once("attention forms", lambda: FasterForm(progress=context.progress))
        fused, records = fuse_attention(model, faster, skip=context.skipped(self.name))
        return fused, [dataclasses.replace(r, fused_over_unfused=faster.ratios.get(r.shape)) for r in records]
