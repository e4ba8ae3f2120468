"""The pass contract: what every exporter pass is, and what it is given.

A pass is an object with a `name` (its manifest key, see `dync.records.PASS_RECORDS`, and its `--no-pass`
switch), the package `forms` it serves, and `run(model, context) -> (model, records)`: one stage's ONNX
model in, the rewritten model and one frozen record per candidate it found out. Every pass keeps the stage's
inputs and outputs (names, dtypes, the dynamic batch) and its outputs' values up to float summation order;
each pass's docstring says what else it keeps. `model` itself is never modified, and a pass that rewrites
nothing returns it as it is. A pass leaves the candidates `context.skipped(name)` names as they are: export
checks every rewrite and takes back those that change a stage's outputs.

The forms: `portable` packages are standard ONNX for onnxruntime (and any runtime); `plugins` packages use
`dync::` nodes for TensorRT's plugins and must pass dync's TensorRT lint, so a pass whose output TensorRT's
parser refuses serves only `portable`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import onnx

from dync.records import PassRecord

if TYPE_CHECKING:
    from dync.exporter.passes.sparse_attention.spec import SparseAttentionSpec

FORMS = ("portable", "plugins")

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass
class PassContext:
    """What the passes of one export share.

    form: one of FORMS. whole_model: the captured model before partitioning, for measurements that want
    every candidate at once. spatial_crossover: a mask density fixed for every masked block (None: measure).
    sparse_attention: the mask rule `--sparse-attention` asks for (None: attention stays dense). feeds: the
    stage's inputs at the export example, while its passes run (None when export does not compute them).
    skip: per pass name, the candidates (by node name) the pass must leave as they are, because export's
    check found its rewrite of them wrong.
    """

    form: str
    whole_model: onnx.ModelProto
    progress: Progress = lambda message: None
    spatial_crossover: float | None = None
    sparse_attention: SparseAttentionSpec | None = None
    feeds: dict[str, np.ndarray] | None = None
    skip: dict[str, set[str]] = field(default_factory=dict)
    _results: dict[str, Any] = field(default_factory=dict)

    def skipped(self, pass_name: str) -> set[str]:
        return self.skip.get(pass_name, set())

    def once(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()` the first time `key` is asked for in this export, the same value after (passes run per
        stage; what they measure is per export)."""
        if key not in self._results:
            self._results[key] = compute()
        return self._results[key]


class Pass(Protocol):
    name: str
    forms: Sequence[str]

    def run(self, model: onnx.ModelProto, context: PassContext) -> tuple[onnx.ModelProto, Sequence[PassRecord]]:
        ...
