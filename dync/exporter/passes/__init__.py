"""Graph passes over exported ONNX models, one rule family per module.

* `spatial`: lower LASNet-style masked bottlenecks to gather-scatter execution
  (`lower_masked_bottlenecks`).
"""

from __future__ import annotations

from dync.exporter.passes.spatial import LoweringReport, SpatialLoweringError, lower_masked_bottlenecks

__all__ = ["LoweringReport", "SpatialLoweringError", "lower_masked_bottlenecks"]
