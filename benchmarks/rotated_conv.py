"""Adaptive rotated convolution (ARC): dync's package against the plain `torch.onnx.export` of the same model.

Run from the repository root:  python -m benchmarks.rotated_conv [--repeats 20] [--batches 1,8,32]

The ARC-ResNet look-alike of `zoo/arc.py` (per-sample rotated and mixed 3x3 kernels, written as a
grouped conv with the batch folded into the channels) at 3x64x64. dync exports it once with a dynamic batch
(the per-sample conv becomes a `dync::PerSampleConv2d` node); the plain export can only bake the batch into
Conv's `group`, so it is exported again at every batch size measured. Columns: dync as it runs (onnxruntime
specializes the plugin node per batch size: the fast CPU path), and the same package through the portable
decomposition alone (one-hot-Conv unfold and a batched MatMul, any batch in one graph). All run in
onnxruntime under the same session options. Medians of interleaved rounds after warm-up; ratios only.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import dync
from dync.exporter.capture import quiet_torch_onnx
from dync.plugins.splice import decompose_custom_nodes
from dync.runtime.backends.ort import OrtSettings
from dync.timing import median_times, onnx_session
from zoo.arc import ArcResNetLike, _ready

SAMPLE = (3, 64, 64)


def plain_session(model: torch.nn.Module, batch: int, path: Path) -> ort.InferenceSession:
    """The model exported by torch.onnx at a fixed batch (the only batch its graph can take)."""
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(batch, *SAMPLE),), str(path), dynamo=True, input_names=["x"])
    return onnx_session(path)


def rows(batches: list[int], repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    model = _ready(ArcResNetLike(widths=(32, 64, 128)))
    engine = dync.load(dync.export(model, work / "arc.dync", input_shape=(2, *SAMPLE)))
    stage = onnx.load(work / "arc.dync" / engine.manifest.stages[0].onnx)
    decomposed = onnx_session(decompose_custom_nodes(stage))
    out = []
    for batch in batches:
        plain = plain_session(model, batch, work / f"plain{batch}.onnx")
        x = engine.example_input(batch, seed=batch)
        times = median_times({"plain": functools.partial(plain.run, None, {"x": x}),
                              "dync": functools.partial(engine.run, x),
                              "decomposed": functools.partial(decomposed.run, None, {"input": x})}, repeats=repeats)
        error = float(np.abs(engine.run(x).logits - plain.run(None, {"x": x})[0]).max())
        out.append(f"| {batch} | {times['plain'] / times['dync']:.2f}x | {times['plain'] / times['decomposed']:.2f}x "
                   f"| {error:.1e} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    sample = "x".join(map(str, SAMPLE))
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}, ARC-ResNet-like at {sample}\n")
    with tempfile.TemporaryDirectory() as scratch:
        print("| batch | dync vs plain export at that batch | decomposition only vs plain | max abs diff |\n"
              "| --- | --- | --- | --- |")
        print("\n".join(rows([int(b) for b in args.batches.split(",")], args.repeats, Path(scratch))))


if __name__ == "__main__":
    main()
