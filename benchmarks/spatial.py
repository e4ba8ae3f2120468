"""Spatially dynamic convolution: dync's gather-scatter lowering against dense execution.

Run from the repository root:  python -m benchmarks.spatial [--repeats 20] [--batch 1]

(a) One masked ResNet-50 bottleneck at each stage size (56x56 64->256 with 4x4 patches, 28x28 128->512
    with 4x4, 14x14 256->1024 with 2x2), masks forced to 10/25/50/75/100% density (different per sample),
    all in onnxruntime under the same session options:
    - "dync" is the default export (row form below the block's measured crossover density, dense above);
    - "row form" forces the gather-scatter form at every density (crossover 1.0: inline, no If);
    - "MAC ideal" is dense MACs over the row form's MACs on the same masks (conv1 runs on every pixel
      conv2 reads, so it exceeds 1 / density), and "of ideal" is the row form's speedup over it.
(b) A LASNet-like ResNet-50 (3/4/6/3 bottlenecks, patches 4-4-2-1) at about 35% of positions kept:
    dync's default export, and with `--spatial-crossover 1` (row form inline in every block, no dense
    fallback), against the plain `torch.onnx.export` of the same model; outputs compared.
Medians of interleaved rounds after warm-up; only ratios are printed.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import dync
from dync.exporter.capture import quiet_torch_onnx
from dync.runtime.backends.ort import OrtSettings
from dync.runtime.engine import Engine
from dync.timing import median_times, onnx_session
from zoo.spatial import MaskedBottleneck, conv1_positions, force_masks, lasnet_resnet50_like

STAGES = {  # name: (cin, mid, cout, size, patch)
    "56x56 64-256": (256, 64, 256, 56, 4),
    "28x28 128-512": (512, 128, 512, 28, 4),
    "14x14 256-1024": (1024, 256, 1024, 14, 2),
}
DENSITIES = (0.1, 0.25, 0.5, 0.75, 1.0)


def block_engines(model: torch.nn.Module, shape: tuple[int, ...], work: Path) -> dict[str, Engine]:
    """The same block exported dense, with dync's defaults, and with the row form forced."""
    def export(name: str, **options: object) -> Engine:
        return dync.load(dync.export(model, work / f"{name}.dync", input_shape=shape, **options))

    return {"dense": export("dense", lower_spatial=False), "dync": export("dync"),
            "rows": export("rows", spatial_crossover=1.0)}


def mac_ideal(model: MaskedBottleneck, x: np.ndarray) -> float:
    """Dense MACs over the row form's: conv1 on the needed input pixels, conv2 and conv3 on the kept ones."""
    with torch.no_grad():
        mask = model.compute_mask(torch.from_numpy(x))
    needed = conv1_positions(mask, model.stride, x.shape[2:]).sum().item()
    kept = mask.amax(1).sum().item()
    per_pixel = [c.weight[0].numel() * c.out_channels for c in (model.conv1, model.conv2, model.conv3)]
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    sparse = needed * per_pixel[0] + kept * (per_pixel[1] + per_pixel[2])
    return pixels * sum(per_pixel) / max(sparse, 1)


def block_rows(batch: int, repeats: int, work: Path) -> list[str]:
    rows = []
    for stage, (cin, mid, cout, size, patch) in STAGES.items():
        for density in DENSITIES:
            torch.manual_seed(0)
            model = MaskedBottleneck(cin, mid, cout, mask_size=size // patch, patch=patch).eval()
            force_masks(model, density, per_sample=True)
            engines = block_engines(model, (max(batch, 2), cin, size, size), work / f"{cin}_{density}")
            x = engines["dense"].example_input(batch, seed=1)
            times = median_times({k: functools.partial(e.run, x) for k, e in engines.items()}, repeats=repeats)
            error = max(float(np.abs(e.run(x).logits - engines["dense"].run(x).logits).max()) for e in engines.values())
            ideal = mac_ideal(model, x)
            rows_speedup = times["dense"] / times["rows"]
            rows.append(f"| {stage} | {density:.0%} | {times['dense'] / times['dync']:.2f}x | {rows_speedup:.2f}x | "
                        f"{ideal:.2f}x | {rows_speedup / ideal:.2f} | {1 / density:.2f}x | {error:.1e} |")
    return rows


def resnet_rows(batch: int, repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    model = lasnet_resnet50_like(0.35).eval()
    shape = (max(batch, 2), 3, 224, 224)
    engines = {"measured crossovers (default)": dync.load(dync.export(model, work / "r50.dync", input_shape=shape)),
               "--spatial-crossover 1": dync.load(dync.export(model, work / "r50_rows.dync", input_shape=shape,
                                                              spatial_crossover=1.0))}
    plain_path = work / "plain.onnx"
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(batch, 3, 224, 224),), str(plain_path), dynamo=True,
                          input_names=["x"])
    plain = onnx_session(plain_path)
    x = engines["--spatial-crossover 1"].example_input(batch, seed=2)
    variants = {"plain": lambda: plain.run(None, {"x": x}),
                **{label: functools.partial(engine.run, x) for label, engine in engines.items()}}
    times = median_times(variants, repeats=repeats)
    reference = plain.run(None, {"x": x})[0]
    return [f"| LASNet-like ResNet-50, ~35% kept | {label} | {times['plain'] / times[label]:.2f}x | "
            f"{np.abs(reference - engine.run(x).logits).max():.1e} |" for label, engine in engines.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}, batch {args.batch}\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        print("| block | density | dync vs dense | row form vs dense | MAC ideal | of ideal | 1 / density "
              "| max abs diff |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(block_rows(args.batch, args.repeats, work)))
        print("\n| model | dync export | speedup vs plain export | max abs diff |\n| --- | --- | --- | --- |")
        print("\n".join(resnet_rows(args.batch, args.repeats, work)))


if __name__ == "__main__":
    main()
