"""Optimization profiles: the batch range each stage's engine is built for, and the batch it is tuned at.

A TensorRT engine with a dynamic batch is built for one `min:opt:max` range per input and picks its kernels
for `opt`. Stage 0 sees the request's batch; stage k sees only the samples that did not leave at an earlier
exit, so when the package has calibrated thresholds its engine is tuned at the request's opt batch scaled by
the fraction of the calibration samples that reached it. Every stage keeps min 1 and the request's max: any
number of samples may be left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dync.errors import InputError
from dync.package import Manifest, TensorSpec
from dync.records import CalibrationRecord

DEFAULT_BATCH = "1:64:256"


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an engine takes, `min <= opt <= max`, and the one it is tuned for."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """'1:64:256', or one number for a fixed batch."""
        try:
            values = [int(v) for v in text.split(":")]
        except ValueError:
            values = []
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise InputError(f"batch range '{text}' is not MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 1:64:256.")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class StageProfile:
    """One stage's optimization profile: per input it reads, the (min, opt, max) shapes; `reach` is the share of
    samples expected to get this far, which scaled the opt batch."""

    stage: str
    batch: BatchRange
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    reach: float

    def to_json(self) -> dict[str, object]:
        """The form build records and cache keys hold: plain lists, inputs in name order."""
        return {"batch": str(self.batch), "reach": round(self.reach, 6),
                "shapes": {name: [list(s) for s in self.shapes[name]] for name in sorted(self.shapes)}}

    def trtexec_shapes(self, which: int) -> str:
        """`name:1x3x32x32,...` for trtexec's --minShapes (0), --optShapes (1) and --maxShapes (2); a name with
        a `:` or `,` in it is wrapped in single quotes, as trtexec's help says to."""
        return ",".join(f"{_trtexec_name(name)}:{'x'.join(map(str, self.shapes[name][which]))}"
                        for name in sorted(self.shapes))


def reach_fractions(manifest: Manifest, calibration: CalibrationRecord | None) -> list[float]:
    """The share of calibration samples that reached each stage under the stored thresholds; all ones without
    a calibration (every sample may run every stage)."""
    stages = len(manifest.stages)
    if calibration is None or sum(calibration.exit_counts) == 0 or len(calibration.exit_counts) != stages:
        return [1.0] * stages
    total = sum(calibration.exit_counts)
    return [sum(calibration.exit_counts[k:]) / total for k in range(stages)]


def stage_profiles(manifest: Manifest, batch: BatchRange, calibration: CalibrationRecord | None = None
                   ) -> list[StageProfile]:
    """One profile per stage, for the request range `batch`; `calibration` (the thresholds' record at the
    precision built) gives the reach that scales each later stage's opt batch."""
    specs = {spec.name: spec for spec in [*manifest.inputs, *manifest.state]}
    profiles = []
    for stage, reach in zip(manifest.stages, reach_fractions(manifest, calibration), strict=True):
        opt = min(batch.max, max(batch.min, math.ceil(batch.opt * reach)))
        stage_batch = BatchRange(batch.min, opt, batch.max)
        shapes = {name: _shape_range(specs[name], stage_batch) for name in stage.reads}
        profiles.append(StageProfile(stage.name, stage_batch, shapes, reach))
    return profiles


def _shape_range(spec: TensorSpec, batch: BatchRange
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    per_sample = tuple(int(d) for d in spec.shape[1:])
    return (batch.min, *per_sample), (batch.opt, *per_sample), (batch.max, *per_sample)


def _trtexec_name(name: str) -> str:
    return f"'{name}'" if ":" in name or "," in name else name
