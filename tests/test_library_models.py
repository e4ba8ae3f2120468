"""Real architectures from torchvision and timm (random weights, no downloads) through `dync.export`, equal to
eager at batches 1 and 3: a regression set for capture, probe, the passes and verification on the ops and idioms
of published models (channel shuffle, TF "same" padding, shifted and grid windows, relative position biases, RoPE,
LeViT's attention biases, PVT's spatial-reduction attention, nn.MultiheadAttention). They have one exit, so
one stage. Depths and sizes are cut down where the library takes them, so that the file runs in under two
minutes on two cores; torchvision's mobilenet_v3_small and timm's sequencer2d_s (bidirectional LSTMs) pass too
and are left out for time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dync
from tests.helpers import assert_close, eager_outputs
from zoo import random_input
from zoo.library import build

MIN_INPUT_DEPENDENCE = 0.01
"""Logits that barely change with the input would pass the comparison whatever the network computes."""

CASES: list[tuple[str, str, tuple[int, int, int, int], dict[str, Any]]] = [
    ("torchvision", "resnet18", (2, 3, 32, 32), {}),
    ("torchvision", "squeezenet1_1", (2, 3, 64, 64), {}),
    ("torchvision", "ShuffleNetV2", (2, 3, 32, 32), {"stages_repeats": [2, 1, 1],
                                                     "stages_out_channels": [24, 48, 96, 192, 1024]}),
    ("torchvision", "DenseNet", (2, 3, 32, 32), {"growth_rate": 12, "block_config": (2, 2, 2, 2),
                                                 "num_init_features": 16}),
    ("torchvision", "SwinTransformer", (2, 3, 32, 32), {"patch_size": [4, 4], "embed_dim": 32, "depths": [2, 2],
                                                        "num_heads": [2, 4], "window_size": [4, 4]}),
    ("torchvision", "VisionTransformer", (2, 3, 32, 32), {"image_size": 32, "patch_size": 8, "num_layers": 2,
                                                          "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}),
    ("torchvision", "MaxVit", (2, 3, 64, 64), {"input_size": (64, 64), "stem_channels": 16, "partition_size": 4,
                                               "block_channels": [16, 32], "block_layers": [1, 1], "head_dim": 8,
                                               "stochastic_depth_prob": 0.0}),
    ("timm", "vit_tiny_patch16_224", (2, 3, 32, 32), {"img_size": 32, "patch_size": 8, "depth": 2}),
    ("timm", "deit_tiny_distilled_patch16_224", (2, 3, 32, 32), {"img_size": 32, "patch_size": 8, "depth": 2}),
    ("timm", "eva02_tiny_patch14_224", (2, 3, 28, 28), {"img_size": 28, "depth": 2}),
    ("timm", "convnext_atto", (2, 3, 32, 32), {"depths": (1, 1, 1, 1)}),
    ("timm", "swin_tiny_patch4_window7_224", (2, 3, 32, 32), {"img_size": 32, "window_size": 4, "depths": (2, 2),
                                                             "num_heads": (3, 6)}),
    ("timm", "levit_128s", (2, 3, 64, 64), {"img_size": 64, "depth": (1, 1, 1)}),
    ("timm", "pvt_v2_b0", (2, 3, 64, 64), {"depths": (1, 1, 1, 1)}),
    ("timm", "mambaout_femto", (2, 3, 64, 64), {"depths": (1, 1, 1, 1)}),
    ("timm", "tf_mobilenetv3_small_minimal_100", (2, 3, 32, 32), {}),
]


def input_dependence(logits: np.ndarray) -> float:
    """Largest deviation from the batch mean, relative to the largest |logit|."""
    return float(np.abs(logits - logits.mean(axis=0)).max() / np.abs(logits).max())


@pytest.mark.filterwarnings("error::dync.errors.PassUndoneWarning")
@pytest.mark.parametrize(("library", "name", "input_shape", "kwargs"), CASES,
                         ids=[f"{library}-{name}" for library, name, _, _ in CASES])
def test_library_model_exports_equal_to_eager(library: str, name: str, input_shape: tuple[int, int, int, int],
                                              kwargs: dict[str, Any], tmp_path: Path) -> None:
    model = build(library, name, **kwargs)
    (reference,) = eager_outputs(model, random_input(input_shape[1:], 3, seed=3))
    assert input_dependence(reference) > MIN_INPUT_DEPENDENCE, "the random model's logits ignore its input"

    package = dync.export(model, tmp_path / f"{name}.dync", input_shape=input_shape)
    engine = dync.load(package)
    for batch in (1, 3):
        x = random_input(input_shape[1:], batch, seed=batch)
        result = engine.run(x)
        assert (result.exit == 0).all()
        assert_close(result.logits, eager_outputs(model, x)[0], what=f"{library} {name} at batch {batch}")
