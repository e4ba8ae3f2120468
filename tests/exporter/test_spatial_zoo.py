"""Every spatial look-alike model, exported with the defaults and with the row form forced, equals eager.

Covers what the pass lowers (LASNet and DynConv masks at stride 1 and 2, layer skipping) and what it leaves
dense by design (channel skipping, whose skipped channels carry relu(beta - gamma*mu/sigma)): either way
the package must compute what eager computes, at batch 1 and with different masks per sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dync
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.spatial import SPATIAL_ZOO, force_masks

DENSE_BY_DESIGN = {"laudnet_channel_block", "laudnet_channel_cifar"}  # no Mul-by-spatial-mask join


CASES = [(name, crossover) for name in sorted(SPATIAL_ZOO) for crossover in (None, 1.0)
         if crossover is None or name not in DENSE_BY_DESIGN]


IDS = [f"{name}-{'measured' if crossover is None else 'rows'}" for name, crossover in CASES]


@pytest.mark.parametrize(("name", "crossover"), CASES, ids=IDS)
def test_spatial_zoo_package_equals_eager(name: str, crossover: float | None, tmp_path: Path) -> None:
    factory, shape = SPATIAL_ZOO[name]
    torch.manual_seed(0)
    model = factory()
    force_masks(model, 0.4, per_sample=True)
    package = dync.export(model, tmp_path / f"{name}.dync", input_shape=shape, spatial_crossover=crossover)
    engine = dync.load(package)
    records = engine.manifest.records("spatial")
    if name in DENSE_BY_DESIGN:
        assert not any(r.lowered for r in records), records
    else:
        assert records and all(r.lowered for r in records), records
        assert all(0.0 <= r.crossover <= 1.0 for r in records)
    for batch in (1, 3):
        x = random_input(shape[1:], batch, seed=batch)
        result = engine.run(x)
        assert_close(result.logits, eager_outputs(model, x)[-1], what=f"{name}, batch {batch}")
        assert np.array_equal(result.exit, np.zeros(batch, dtype=result.exit.dtype))
