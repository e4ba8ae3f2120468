"""The idiom corpus: small modules written the way research code writes one thing (`zoo/idioms.py`), each
exported as it is and equal to eager PyTorch at batches 1, 3 and 7 on every exit path, or refused with an
error naming the model line that fixed the batch. Rows whose translation torch.onnx gets wrong say which
capture-time repair (`dync/exporter/repairs.py`) they need; every other row must need none. A forward that
returns `(logits, mask)` exports its logits exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import dync
import zoo.idioms as idioms
from dync.errors import CaptureError
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds
from tests.helpers import assert_close, eager_outputs
from zoo import random_input

BATCHES = (1, 3, 7)
EXAMPLE_BATCH = 4
REPAIRED = "repaired a translation defect at "


@dataclass(frozen=True)
class Idiom:
    id: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    repair: str | None = None
    """A phrase of the repair this row needs (every repair reported must contain it), or None for no repair."""
    fixes_batch: str | None = None
    """The model line that makes torch.export fix the batch: such a row is exact, or refused naming the line."""


IDIOMS = [
    Idiom("int_div_batch", idioms.SwinWindowBlock, (3, 16, 16),
          fixes_batch="B = int(windows.shape[0] / (H * W / window_size / window_size))"),
    Idiom("pow_half_side", idioms.SimMIMSquareSide, (3, 16, 16)),
    Idiom("math_sqrt_side", idioms.MathSqrtTokenGrid, (3, 16, 16)),
    Idiom("np_sqrt_side", idioms.NumpySqrtMerge, (16, 8)),
    Idiom("unpacked_shape_view", idioms.UnpackedShapeView, (3, 8, 8)),
    Idiom("unpatchify_einsum", idioms.DiTUnpatchify, (3, 8, 8)),
    Idiom("size_to_submodule", idioms.SizeToSubmodule, (16, 8)),
    Idiom("shape_tolist", idioms.ShapeToList, (6, 8)),
    Idiom("shape_item", idioms.ShapeItem, (6, 8)),
    Idiom("noop_squeeze_mean", idioms.MeanThenNoOpSqueeze, (5, 12), repair="Squeeze of axes [1]"),
    Idiom("noop_squeeze_conv", idioms.ConvThenNoOpSqueeze, (3, 8, 8), repair="Squeeze of axes [1]"),
    Idiom("squeeze_all_keep_batch", idioms.SqueezeKeepingBatch, (3, 8, 8), repair="Squeeze without axes"),
    Idiom("einops_rearrange", idioms.EinopsPerceiver, (3, 8, 8)),
    Idiom("interpolate_nearest", idioms.NearestScaleFactor, (3, 16, 16)),
    Idiom("interpolate_bilinear", idioms.BilinearScaleFactor, (3, 8, 8)),
    Idiom("batch_index_select", idioms.TopKBatchIndexSelect, (16, 8)),
    Idiom("gather_index_select", idioms.GatherAndIndexSelect, (16, 8)),
    Idiom("masked_fill_inplace", idioms.CausalMaskedFillInPlace, (6, 8)),
    Idiom("window_mask_buffer", idioms.ShiftedWindowMask, (16, 8)),
    Idiom("tensor_lists", idioms.ScaleListParallel, (3, 8, 8)),
    Idiom("modulelist_exits", idioms.ModuleListExits, (3, 8, 8)),
    Idiom("cat_exit_features", idioms.ConcatExitFeatures, (3, 8, 8)),
    Idiom("no_grad_block", idioms.NoGradPolicy, (16, 8)),
    Idiom("token_merge_mean", idioms.TokenMergeMean, (9, 8), repair="scatter_reduce(reduce='mean')"),
    Idiom("numpy_constants", idioms.NumpyPosEmbedAndScale, (3, 8, 8)),
]


def _idioms_line(code: str) -> int:
    """The line of zoo/idioms.py that holds `code`."""
    lines = Path(idioms.__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, start=1) if code in line)


@pytest.mark.parametrize("idiom", IDIOMS, ids=[i.id for i in IDIOMS])
def test_idiom_is_exact_at_every_batch_or_refused_naming_its_line(idiom: Idiom, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = idiom.build().eval()
    messages: list[str] = []
    try:
        package = dync.export(model, tmp_path / f"{idiom.id}.dync", input_shape=(EXAMPLE_BATCH, *idiom.sample_shape),
                              progress=messages.append)
    except CaptureError as exc:
        if idiom.fixes_batch is None:
            raise
        assert f"zoo/idioms.py:{_idioms_line(idiom.fixes_batch)}" in str(exc) and idiom.fixes_batch in str(exc)
        return
    repairs = [m for m in messages if m.startswith(REPAIRED)]
    if idiom.repair is None:
        assert repairs == []
    else:
        assert repairs and all(idiom.repair in m and "zoo/idioms.py" in m for m in repairs), repairs
    _assert_exact(dync.load(package), model, idiom.sample_shape, idiom.id)


def test_logits_returned_with_a_mask_export_the_logits_exactly(tmp_path: Path) -> None:
    """DynamicViT's `(logits, mask)`: the first element is the exit, the mask an auxiliary output."""
    torch.manual_seed(0)
    model = idioms.LogitsAndKeepMask().eval()
    package = dync.export(model, tmp_path / "logits_and_mask.dync", input_shape=(EXAMPLE_BATCH, 16, 8))
    _assert_exact(dync.load(package), model, (16, 8), "logits_and_mask", exits=slice(0, 1))


def _assert_exact(engine: Engine, model: nn.Module, sample_shape: tuple[int, ...], what: str,
                  exits: slice = slice(None)) -> None:
    """Every exit path of the package against eager (the `exits` of what forward returns) at each of BATCHES."""
    for batch in BATCHES:
        x = random_input(sample_shape, batch, seed=batch)
        reference = eager_outputs(model, x)[exits]
        assert len(reference) == engine.num_exits
        for k, expected in enumerate(reference):
            result = engine.run(x, thresholds=forcing_thresholds(k, engine.num_exits))
            assert_close(result.logits, expected, what=f"{what}, batch {batch}, exit {k}")
