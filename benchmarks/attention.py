"""FLatten and Agent attention look-alikes: dync's package against the plain `torch.onnx.export` of the same model.

Run from the repository root:  python -m benchmarks.attention [--repeats 20]

Deployment-sized look-alikes built from the blocks of `zoo/attention.py` at 224x224: PVT-Tiny-like
(56/28/14/7 token grids, widths 64/128/320/512, two blocks per stage; FLatten attention with spatial
reduction 8/4/2, or Agent attention with 7x7 agents, in the first three stages, softmax attention in the
last) and Swin-T-like (7x7 windows, widths 96/192/384/768, per stage a FLatten or Agent block (3x3 agents,
which 7 does not divide) then a plain window block). At batch 1 and 8, all in onnxruntime under the same
session options:
- "plain" is `torch.onnx.export(model, dynamo=True)` with a dynamic batch (what takes any batch, as dync's
  package does), loaded with `dync.timing.onnx_session`; "plain fixed" is the same export made at the measured
  batch (it takes only that batch);
- "dync" is `dync.export`'s package (softmax attention fused into ONNX `Attention` where that measured
  faster at export, batch-repeated bias tables taken before the repeat: `dync/exporter/passes/attention/`),
  run by its engine, which gives the first stage a fixed-shape session per batch size;
- "dync without the fusion" is the `--ops plugins` package of the same model, which skips that pass (these
  models have no other plugin op), run by the same engine.
Ratios are the plain export's time (dynamic, or fixed at the batch in its column) over the variant's (above
1: faster than plain); medians of interleaved rounds after warm-up. The max abs difference is against the
plain export's output.
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
from dync.timing import median_times, onnx_session
from zoo import random_input
from zoo.attention import (
    Classifier,
    WindowAttention,
    agent_attention,
    classifier,
    flatten_attention,
    softmax_attention,
    stage,
    window_stage,
)

BATCHES = (1, 8)
SHAPE = (2, 3, 224, 224)
GRIDS = (56, 28, 14, 7)


def pvt_tiny_like(attention: str) -> Classifier:
    """PVT-Tiny-like: FLatten (spatial reduction 8/4/2) or Agent (7x7 agents) attention in stages 1-3."""
    dims, heads, reductions = (64, 128, 320, 512), (1, 2, 5, 8), (8, 4, 2)
    stages, cin = [], 3
    for i, (grid, dim) in enumerate(zip(GRIDS, dims, strict=True)):
        kind = (softmax_attention() if i == 3 else
                flatten_attention(reductions[i]) if attention == "flatten" else agent_attention(49))
        stages.append(stage(cin, dim, 4 if i == 0 else 2, (grid, grid), 2, heads[i], kind))
        cin = dim
    return classifier(stages, dims[-1])


def swin_tiny_like(attention: str) -> Classifier:
    """Swin-T-like: per stage a FLatten or Agent (3x3 agents) window block, then a plain window block."""
    def window(dim: int, grid: tuple[int, int], heads: int) -> WindowAttention:
        return WindowAttention(dim, grid[0], heads)

    kind = flatten_attention() if attention == "flatten" else agent_attention(9)
    dims, heads = (96, 192, 384, 768), (3, 6, 12, 24)
    stages, cin = [], 3
    for i, (grid, dim) in enumerate(zip(GRIDS, dims, strict=True)):
        stages.append(window_stage(cin, dim, 4 if i == 0 else 2, grid, 7, heads[i], [kind, window]))
        cin = dim
    return classifier(stages, dims[-1])


MODELS = {"FLatten-PVT-Tiny-like": functools.partial(pvt_tiny_like, "flatten"),
          "Agent-PVT-Tiny-like": functools.partial(pvt_tiny_like, "agent"),
          "FLatten-Swin-T-like": functools.partial(swin_tiny_like, "flatten"),
          "Agent-Swin-T-like": functools.partial(swin_tiny_like, "agent")}


def plain_session(model: torch.nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool) -> ort.InferenceSession:
    """The plain export at `shape`, with a dynamic batch or fixed at shape[0]."""
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=True, input_names=["input"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
    return onnx_session(path)


def model_rows(name: str, repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    model, shape = MODELS[name](), SHAPE
    engines = {"dync": dync.load(dync.export(model, work / f"{name}.dync", input_shape=shape)),
               "unfused": dync.load(dync.export(model, work / f"{name}_unfused.dync", input_shape=shape,
                                                ops="plugins"))}
    records = engines["dync"].manifest.records("attention")
    fused = f"{sum(r.fused for r in records)} of {len(records)}"
    plain = plain_session(model, shape, work / "plain.onnx", dynamic=True)
    rows = []
    for batch in BATCHES:
        x = random_input(shape[1:], batch, seed=batch)
        fixed = plain_session(model, (batch, *shape[1:]), work / f"plain{batch}.onnx", dynamic=False)
        variants = {"plain": functools.partial(plain.run, None, {"input": x}),
                    "plain fixed": functools.partial(fixed.run, None, {"input": x}),
                    **{label: functools.partial(engine.run, x) for label, engine in engines.items()}}
        times = median_times(variants, repeats=repeats)
        reference = plain.run(None, {"input": x})[0]
        error = max(np.abs(engine.run(x).logits - reference).max() for engine in engines.values())
        rows.append(f"| {name} | {batch} | {fused} | {times['plain'] / times['dync']:.2f}x | "
                    f"{times['plain fixed'] / times['dync']:.2f}x | {times['plain'] / times['unfused']:.2f}x | "
                    f"{error:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}\n")
    print("| model | batch | softmax attentions fused | dync vs plain | dync vs plain fixed "
          "| dync without the fusion vs plain | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for k, name in enumerate(MODELS):
            work = Path(scratch) / str(k)
            work.mkdir()
            print("\n".join(model_rows(name, args.repeats, work)), flush=True)


if __name__ == "__main__":
    main()
