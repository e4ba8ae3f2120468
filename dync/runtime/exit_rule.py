"""The exit rule: a sample leaves at the first exit whose confidence reaches that exit's threshold.

Thresholds: one per exit but the last (K-1 values); K values are accepted with the last ignored, because the
last exit always takes every sample still running. A threshold above 1 never fires, 0 always fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dync.errors import InputError


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """Largest softmax probability per sample, computed stably over the last axis."""
    flat = logits.reshape(logits.shape[0], -1).astype(np.float64, copy=False)
    shifted = flat - flat.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)


CONFIDENCE: dict[str, Callable[[np.ndarray], np.ndarray]] = {"max_softmax": max_softmax}


def confidence(criterion: str, logits: np.ndarray) -> np.ndarray:
    if criterion not in CONFIDENCE:
        raise InputError(f"exit criterion '{criterion}' is unknown to this dync; known: {sorted(CONFIDENCE)}.")
    return CONFIDENCE[criterion](logits)


def resolve_thresholds(thresholds: Sequence[float] | None, num_exits: int) -> np.ndarray:
    """K-1 thresholds as float64; None means no early exit (every sample takes the last exit)."""
    if thresholds is None:
        return np.full(num_exits - 1, np.inf)
    values = np.asarray(list(thresholds), dtype=np.float64)
    if values.ndim != 1 or len(values) not in (num_exits - 1, num_exits):
        raise InputError(
            f"got {values.size} thresholds for a package with {num_exits} exits; give {num_exits - 1} "
            f"(one per exit but the last) or {num_exits}."
        )
    if np.isnan(values).any():
        raise InputError("thresholds contain NaN; give numbers (above 1 never exits, 0 always exits).")
    return values[: num_exits - 1]


def forcing_thresholds(exit_index: int, num_exits: int) -> np.ndarray:
    """Thresholds that send every sample to `exit_index`, to measure or verify one exit path."""
    assert 0 <= exit_index < num_exits
    values = np.full(num_exits - 1, np.inf)
    values[exit_index:] = 0.0
    return values
