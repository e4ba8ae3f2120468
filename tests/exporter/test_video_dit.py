"""The Wan-style video DiT look-alike runs eagerly as its authors' model does: forward(x, t, context) with a 5-D
latent, float timesteps and a pooled text vector, float64 timestep and RoPE arithmetic, SDPA self-attention.
Its export (unmodified, verified against eager at batches 2, 1 and 3) is tests/exporter/test_sparse_attention.py's
fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import assert_close, max_abs_rel_error
from zoo.video_dit import VIDEO_DIT_ZOO, VideoDiT, token_grid, video_dit_example, video_dit_tiny


def _eager(model: VideoDiT, arrays: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{name: torch.from_numpy(a) for name, a in arrays.items()}).numpy()


@pytest.fixture(scope="module")
def model() -> VideoDiT:
    torch.manual_seed(0)
    return video_dit_tiny()


@pytest.mark.parametrize("batch", [1, 2])
def test_runs_eagerly_per_sample(model: VideoDiT, batch: int) -> None:
    arrays = video_dit_example(batch, seed=batch)
    out = _eager(model, arrays)
    assert out.shape == (batch, 4, 4, 16, 16) and np.isfinite(out).all()
    alone = _eager(model, {name: a[:1] for name, a in arrays.items()})
    assert_close(out[:1], alone, what="sample 0 with and without the rest of the batch")


def test_timestep_and_context_move_the_output(model: VideoDiT) -> None:
    """Otherwise a mistranslated conditioning path could hide inside the 1e-4 tolerance."""
    arrays = video_dit_example(2)
    ref = _eager(model, arrays)
    for name in ("t", "context"):
        swapped = {**arrays, name: np.ascontiguousarray(arrays[name][::-1])}
        assert max_abs_rel_error(_eager(model, swapped), ref) > 0.05, name


def test_token_grid_and_zoo() -> None:
    assert token_grid(video_dit_tiny()) == (4, 8, 8)
    factory, example = VIDEO_DIT_ZOO["video_dit_bench"]
    bench = factory()
    assert token_grid(bench) == (4, 16, 16) and bench.dim // bench.num_heads == 64
    assert example(1)["x"].shape == (1, bench.in_dim, *bench.latent_size)
    with pytest.raises(TypeError):
        video_dit_example(1, no_such_size=3)
