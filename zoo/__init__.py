"""Look-alike models of published dynamic networks, shared by the tests and the benchmarks.

One module per family: `multi_exit` (MSDNet, RANet, Dynamic Perceiver), `spatial` (LASNet, LAUDNet, DynConv),
`tokens` (DynamicViT, DyT), `attention` (FLatten, Agent attention), `arc` (adaptive rotated convolution).
Each mimics its papers' structure and idioms without their code. Classes live in importable modules so that
`torch.save(model)` pickles load back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_input(sample_shape: Sequence[int], batch: int, seed: int = 0) -> np.ndarray:
    """Standard-normal float32 data `[batch, *sample_shape]`, reproducible by seed."""
    return np.random.default_rng(seed).standard_normal((batch, *sample_shape)).astype(np.float32)
