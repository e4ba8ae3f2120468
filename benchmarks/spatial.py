"""Spatially dynamic convolution: gather-scatter (`export --lower-spatial`) against the dense bottleneck.

Run from the repository root:  python -m benchmarks.spatial [--repeats 20] [--batch 1]

(a) One masked ResNet-50 bottleneck at each stage size (56x56 64->256 with 4x4 patches, 28x28 128->512
    with 4x4, 14x14 256->1024 with 2x2), masks forced to 10/25/50/75/100% density (different per sample):
    the same package exported dense and lowered, run in onnxruntime under the same session options.
    Ideal speedup = 1 / density for the masked branch (the shortcut is an identity, nearly free).
(b) A LASNet-like ResNet-50 (3/4/6/3 bottlenecks, patches 4-4-2-1) at about 35% of positions kept:
    lowered against the plain `torch.onnx.export` of the same model; outputs compared.
Medians of interleaved rounds after warm-up; only ratios are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import dync
from dync.exporter.capture import quiet_torch_onnx
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from dync.runtime.engine import Engine
from dync.timing import median_times
from tests.zoo_spatial import MaskedBottleneck, force_masks, lasnet_resnet50_like

STAGES = {  # name: (cin, mid, cout, size, patch)
    "56x56 64-256": (256, 64, 256, 56, 4),
    "28x28 128-512": (512, 128, 512, 28, 4),
    "14x14 256-1024": (1024, 256, 1024, 14, 2),
}
DENSITIES = (0.1, 0.25, 0.5, 0.75, 1.0)


def dense_and_lowered(model: torch.nn.Module, shape: tuple[int, ...], work: Path, name: str) -> tuple[Engine, Engine]:
    """Engines for the same model exported without and with the spatial lowering."""
    dense = dync.load(dync.export(model, work / f"{name}_dense.dync", input_shape=shape))
    lowered = dync.load(dync.export(model, work / f"{name}_lowered.dync", input_shape=shape, lower_spatial=True))
    return dense, lowered


def compare(dense: Engine, lowered: Engine, x: np.ndarray, repeats: int) -> tuple[float, float]:
    """Dense time over lowered time (medians, interleaved), and the largest output difference."""
    times = median_times({"dense": lambda: dense.run(x), "lowered": lambda: lowered.run(x)}, repeats=repeats)
    return times["dense"] / times["lowered"], float(np.abs(dense.run(x).logits - lowered.run(x).logits).max())


def block_rows(batch: int, repeats: int, work: Path) -> list[str]:
    rows = []
    for stage, (cin, mid, cout, size, patch) in STAGES.items():
        for density in DENSITIES:
            torch.manual_seed(0)
            model = MaskedBottleneck(cin, mid, cout, mask_size=size // patch, patch=patch).eval()
            force_masks(model, density, per_sample=True)
            shape = (max(batch, 2), cin, size, size)
            dense, lowered = dense_and_lowered(model, shape, work, f"b{cin}_{density}")
            speedup, error = compare(dense, lowered, dense.example_input(batch, seed=1), repeats)
            rows.append(f"| {stage} | {density:.0%} | {speedup:.2f}x | {1 / density:.2f}x | "
                        f"{speedup * density:.2f} | {error:.1e} |")
    return rows


def resnet_row(batch: int, repeats: int, work: Path) -> str:
    torch.manual_seed(0)
    model = lasnet_resnet50_like(0.35).eval()
    shape = (max(batch, 2), 3, 224, 224)
    lowered = dync.load(dync.export(model, work / "lasnet50.dync", input_shape=shape, lower_spatial=True))
    plain_path = work / "plain.onnx"
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(batch, 3, 224, 224),), str(plain_path), dynamo=True,
                          input_names=["x"])
    plain = session_from_onnx(plain_path, lowered.backend.settings)
    x = lowered.example_input(batch, seed=2)
    times = median_times({"plain": lambda: plain.run(None, {"x": x}), "dync": lambda: lowered.run(x)},
                         repeats=repeats)
    error = np.abs(plain.run(None, {"x": x})[0] - lowered.run(x).logits).max()
    return f"| LASNet-like ResNet-50, ~35% kept | {times['plain'] / times['dync']:.2f}x | {error:.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}, batch {args.batch}\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        print("| block | density | lowered speedup vs dense | ideal | fraction of ideal | max abs diff |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(block_rows(args.batch, args.repeats, work)))
        print("\n| model | dync (--lower-spatial) speedup vs plain export | max abs diff |\n| --- | --- | --- |")
        print(resnet_row(args.batch, args.repeats, work))


if __name__ == "__main__":
    main()
