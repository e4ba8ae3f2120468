"""Thresholds that make given shares of a batch leave at each exit.

This is the core step of the budgeted-batch procedure of the multi-exit literature (MSDNet, RANet): walk the
exits in order and set exit k's threshold from the sorted confidences of the samples still running, so that
the wanted share of the whole set leaves there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def thresholds_for_shares(confidences: Sequence[np.ndarray], shares: Sequence[float]) -> np.ndarray:
    """K-1 thresholds from per-exit confidences (each [N]) and wanted exit shares (K values summing to 1).

    Ties in confidence can make a share slightly larger than asked; a share of 0 gives a threshold above 1
    (the exit never fires).
    """
    num_exits = len(confidences)
    assert len(shares) == num_exits and num_exits >= 1
    assert abs(sum(shares) - 1.0) < 1e-6, "exit shares must sum to 1"
    total = len(confidences[0])
    running = np.ones(total, dtype=bool)
    thresholds = np.full(num_exits - 1, np.inf)
    for k in range(num_exits - 1):
        count = min(round(shares[k] * total), int(running.sum()))
        if count == 0:
            continue
        ranked = np.sort(confidences[k][running])[::-1]
        thresholds[k] = ranked[count - 1]
        running &= confidences[k] < thresholds[k]
    return thresholds


def even_split_thresholds(confidences: Sequence[np.ndarray]) -> np.ndarray:
    """Thresholds sending an equal share of a batch to each exit, given every exit's confidences on that batch
    (`Engine.criteria.confidences`)."""
    return thresholds_for_shares(confidences, [1.0 / len(confidences)] * len(confidences))
