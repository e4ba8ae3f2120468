"""Side-by-side timing: variants measured in interleaved rounds, medians after warm-up.

Interleaving makes slow drift of a shared, noisy machine hit every variant alike, so the ratios between
variants stay meaningful even when absolute times do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_times(
    variants: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each variant, measured round-robin."""
    assert repeats >= 1 and warmup >= 0
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(times)) for name, times in samples.items()}
