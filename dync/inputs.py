"""A batch of model inputs: one array per forward argument, batch first, every argument sharing the batch.

Torch-free, so the runtime and the exporter agree on one meaning of "a batch": a single array for a package
with one input, a mapping by input name otherwise (a mapping is accepted for one input too), and one rule for
the random batches that export verification, `dync verify`, `bench` and `profile` use when given no data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dync.errors import InputError
from dync.package import TensorSpec

Inputs = np.ndarray | Mapping[str, np.ndarray]
"""What `Engine.run` and `Engine.execute` take: an array for a one-input package, or arrays by input name."""


def batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    """The batch every array of `feeds` shares (checked by `Engine.check_feeds`)."""
    return len(next(iter(feeds.values())))


def random_inputs(specs: Sequence[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Data shaped like `specs` at `batch`: floats standard normal; integers uniform over the range the export
    example held (`TensorSpec.value_range`), so that labels and timesteps stay valid for their embeddings."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = (batch, *spec.shape[1:])
        if np.dtype(spec.dtype).kind in "iub":
            low, high = spec.value_range or (0, 1)
            feeds[spec.name] = rng.integers(int(low), int(high), size=shape, endpoint=True).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def value_range(array: np.ndarray) -> list[float] | None:
    """[min, max] of an integer or boolean input, kept so random data stays in range; None for floats."""
    if array.dtype.kind not in "iub" or array.size == 0:
        return None
    return [float(array.min()), float(array.max())]


def load_inputs(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """A `.npy` array, or a `.npz` of arrays keyed by input name."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        why = "it is empty" if isinstance(exc, EOFError) else (
            "numpy reads it as pickled objects, which dync never loads" if "allow_pickle" in str(exc) else str(exc))
        raise InputError(f"{path} is neither a .npy array nor a .npz of arrays ({why}); save the batch with "
                         "numpy.save, or several inputs with numpy.savez(path, name=array, ...).") from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {name: loaded[name] for name in loaded.files}
