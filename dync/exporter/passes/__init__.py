"""Graph passes over exported ONNX models, one rule family per module.

* `spatial`: lower LASNet-style masked bottlenecks to gather-scatter execution
  (`lower_masked_bottlenecks`).
* `tokens`: lower DyT-style token dispatch to an MLP on the packed kept tokens (`lower_token_dispatch`).
"""

from __future__ import annotations

from dync.exporter.passes.spatial import LoweringReport, SpatialLoweringError, lower_masked_bottlenecks
from dync.exporter.passes.tokens import DispatchReport, lower_token_dispatch, report_dispatches

__all__ = ["DispatchReport", "LoweringReport", "SpatialLoweringError", "lower_masked_bottlenecks",
           "lower_token_dispatch", "report_dispatches"]
