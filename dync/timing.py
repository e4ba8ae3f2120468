"""Side-by-side timing: variants measured in alternating blocks of calls, medians after warm-up; and the
sessions that candidates timed as ONNX models run in.

Each round runs every variant in turn for one block: untimed calls first (`OPENING_SECONDS`), then the
timed calls. The untimed calls absorb what the variant before left behind: onnxruntime thread pools still
spin-waiting after their last run take the cores from whatever runs next, so timing two sessions call by
call in alternation charges each with the other's spinning (it made dync look up to 30% slower than a
plain session). Alternating blocks keep the slow drift of a shared, noisy machine hitting every variant
alike, so the ratios between variants stay meaningful even when absolute times do not. Candidates (an
exporter pass's two forms of a block, a benchmark's plain export) are timed under dync's session settings,
so that what decides or is compared is what a package runs with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from dync.errors import InputError
from dync.runtime.backends.ort import OrtSettings, session_from_onnx

BLOCK = 5
"""Timed calls per block."""
OPENING_SECONDS = 0.02
"""A block opens with untimed calls (at least one) until this long has passed: a spinning onnxruntime pool
keeps spinning for milliseconds after its run, longer than one call of a small model at batch 1."""


def median_times(
    variants: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2,
    opening_seconds: float = OPENING_SECONDS,
) -> dict[str, float]:
    """Median seconds per call of each variant over `repeats` timed calls, in alternating blocks of `BLOCK`
    (the last block shorter), each opened by untimed calls for `opening_seconds` (at least one call), after
    `warmup` untimed calls of each."""
    if repeats < 1:
        raise InputError(f"repeats {repeats} must be at least 1 (the number of timed calls); ask for 1 or more.")
    if warmup < 0:
        raise InputError(f"warmup {warmup} must be at least 0 (the number of untimed calls); ask for 0 or more.")
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for block in range(math.ceil(repeats / BLOCK)):
        for name, fn in variants.items():
            _open_block(fn, opening_seconds)
            for _ in range(min(BLOCK, repeats - block * BLOCK)):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(times)) for name, times in samples.items()}


def _open_block(fn: Callable[[], object], seconds: float) -> None:
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < seconds:
        fn()


def onnx_session(model: onnx.ModelProto | str | Path, settings: OrtSettings | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model to time (or its file, with the external data torch.onnx may
    write beside it), under `settings` or, by default, the settings `dync.load` gives a package."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    return session_from_onnx(proto, settings or OrtSettings())
