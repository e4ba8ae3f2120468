"""`dync verify`: check a package against the eager model it came from, exit path by exit path.

Each exit is checked by forcing every sample to it (so every stage up to it runs on the full batch), then a
mixed run with thresholds that spread the batch over all exits checks compaction: each sample's logits must
equal what eager computes at the exit that sample took. A package with block-sparse attention is checked
with every mask listing every block, in float (its masks approximate eager by design; their error is measured
apart). The check itself is `dync.exporter.verification`,
which export also runs before it writes a package; this records its result in the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dync.errors import InputError
from dync.exporter.loading import eval_mode, load_model
from dync.exporter.verification import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    bound_to_files,
    check_package,
    default_rtol,
    dense_attention_copy,
    disagreement,
)
from dync.package import write_manifest
from dync.records import VerificationRecord
from dync.runtime.backends import BACKEND_FORMS
from dync.runtime.engine import Engine

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "verify"]


def verify(
    engine: Engine,
    model: torch.nn.Module | str | Path,
    x: np.ndarray | None = None,
    batch: int = 8,
    rtol: float | None = None,
    atol: float = DEFAULT_ATOL,
    progress: Callable[[str], None] | None = None,
    record: bool = True,
    trust_pickle: bool = False,
) -> VerificationRecord:
    """Compare every exit path with eager; raise VerificationError on mismatch after recording the result (for
    float32 on onnxruntime, the package's own program; other precisions and backends are checked, not
    recorded). `rtol` None: 1e-4 for float32, `LOW_PRECISION_RTOL` for fp16, int8 and fp8."""
    rtol = default_rtol(engine.precision) if rtol is None else rtol
    if x is None and engine.precision in ("int8", "fp8"):
        raise InputError(f"a {engine.precision} package is checked on data like what calibrated it (random data "
                         "falls outside its ranges and clips): pass --input with validation samples.")
    x = engine.example_input(batch) if x is None else x
    engine.check_input(x)
    if isinstance(model, (str, Path)):
        model = load_model(model, tuple(torch.from_numpy(a) for a in engine.input_feeds(x).values()), trust_pickle)
    form = BACKEND_FORMS[engine.backend.name]
    with dense_attention_copy(engine.package_dir, engine.precision, form) as checked:
        if checked != engine.package_dir and engine.backend.name != "ort":
            raise InputError(f"package '{engine.manifest.name}' has block-sparse attention, which is verified with "
                             "every block listed, on onnxruntime: run dync verify without --backend.")
        checking = engine if checked == engine.package_dir else Engine.load(checked, precision=engine.precision)
        result = check_package(checking, eval_mode(model), [x], rtol=rtol, atol=atol, progress=progress)
    result = dataclasses.replace(result, dense_attention=checked != engine.package_dir)
    recorded = record and engine.precision == "fp32" and engine.backend.name == "ort"
    if recorded:  # the record is of the package's float32 program; other precisions and backends are checked only
        engine.manifest.verification = bound_to_files(result, engine.manifest)
        write_manifest(engine.package_dir, engine.manifest)
    if not result.passed:
        if engine.precision == "fp32":
            raise disagreement(engine.manifest.name, result)
        if engine.precision == "fp16":
            raise disagreement(engine.manifest.name, result, "at fp16: build and run it at fp32 (dync build "
                               "--precision fp32), or int8 with dync quantize's calibrated ranges")
        raise disagreement(engine.manifest.name, result, f"at {engine.precision}: quantize it again with more "
                           "representative data or another --method, or run it with --precision fp32")
    return result
