"""Check a package against the eager model it came from, exit path by exit path.

Each exit is checked by forcing every sample to it (so every stage up to it runs on the full batch), then a
mixed run with thresholds that spread the batch over all exits checks compaction: each sample's logits must
equal what eager computes at the exit that sample took.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dync.calib.thresholds import even_split_thresholds
from dync.errors import VerificationError
from dync.exporter.capture import eager_exits
from dync.exporter.loading import eval_mode, load_model
from dync.package import write_manifest
from dync.records import VerificationRecord
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


def verify(
    engine: Engine,
    model: torch.nn.Module | str | Path,
    x: np.ndarray | None = None,
    batch: int = 8,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    progress: Callable[[str], None] | None = None,
    record: bool = True,
) -> VerificationRecord:
    """Compare every exit path with eager; raise VerificationError on mismatch after recording the result."""
    report = progress or (lambda message: None)
    x = engine.example_input(batch) if x is None else x
    engine.check_input(x)
    if isinstance(model, (str, Path)):
        model = load_model(model, torch.from_numpy(x))
    reference = [o.numpy() for o in eager_exits(eval_mode(model), torch.from_numpy(x), engine.manifest.exit_selection)]
    if len(reference) != engine.num_exits:
        raise VerificationError(
            f"the model has {len(reference)} exits but package '{engine.manifest.name}' has {engine.num_exits}; "
            "verify against the model the package was exported from."
        )
    abs_errors, rel_errors = [], []
    for k in range(engine.num_exits):
        got = engine.execute(x, forcing_thresholds(k, engine.num_exits)).logits
        abs_errors.append(_max_abs(got, reference[k]))
        rel_errors.append(abs_errors[-1] / max(float(np.abs(reference[k]).max()), 1e-12))
        report(f"exit {k}: max abs error {abs_errors[-1]:.3g}, relative {rel_errors[-1]:.3g}")
    mixed = engine.execute(x, even_split_thresholds([e.criterion for e in engine.manifest.exits], reference))
    expected = np.stack(reference)[mixed.exit, np.arange(len(x))]
    mixed_error = _max_abs(mixed.logits, expected)
    result = VerificationRecord(
        max_abs_error=abs_errors,
        max_rel_error=rel_errors,
        mixed_max_abs_error=mixed_error,
        mixed_exit_counts=np.bincount(mixed.exit, minlength=engine.num_exits).tolist(),
        batch=len(x),
        rtol=rtol,
        atol=atol,
        passed=_within(max(*abs_errors, mixed_error), reference, rtol, atol),
        checked=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report(f"mixed run (exits {result.mixed_exit_counts}): max abs error {result.mixed_max_abs_error:.3g}")
    if record:
        engine.manifest.verification = result
        write_manifest(engine.package_dir, engine.manifest)
    if not result.passed:
        worst = int(np.argmax(rel_errors))
        raise VerificationError(
            f"package '{engine.manifest.name}' disagrees with eager PyTorch (worst: exit {worst}, max abs error "
            f"{abs_errors[worst]:.3g}, allowed {atol:g} + {rtol:g} x |reference|); re-export it with this "
            "dync and torch, and report the model if it persists."
        )
    return result


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _within(error: float, reference: list[np.ndarray], rtol: float, atol: float) -> bool:
    scale = max(float(np.abs(r).max()) for r in reference)
    return error <= atol + rtol * scale
