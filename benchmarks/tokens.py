"""Token-dynamic vision transformers: what dync's packages realize of the FLOPs they save.

Run from the repository root:  python -m benchmarks.tokens [--repeats 10] [--depth 12]

ViT-S-like models (224x224 images, 16x16 patches: 196 tokens + class token, width 384, 6 heads), at
batch 1 and 8, all in onnxruntime under the same session options:

(a) Token pruning (DynamicViT-like, keep ratios 0.7 / 0.49 / 0.343 before blocks 3, 6, 9 of 12): the pruned
    package against the same model with pruning disabled (ratios 1.0, no predictor), next to the MACs ratio
    of the two packages (counted by dync from the ONNX graphs); "of ideal" is realized / MACs ratio.
(b) Token dispatch (DyT-like, every block's MLP gated per token), gate biases shifted so that about 10 ..
    100% of the tokens run each MLP (different per sample): dync's default export (MLP on packed kept
    tokens) against the same model exported without the token and attention passes
    (`skip_passes=UNLOWERED`: MLP on every token, masked, and no attention fusion either) and against
    dync's package at 100% kept (which isolates what dispatch saves), next to the MACs ratio.
Medians of interleaved rounds after warm-up; only ratios are printed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import dync
from dync.runtime.backends.ort import OrtSettings
from dync.runtime.engine import Engine
from dync.timing import median_times
from zoo.tokens import DynamicViTLike, DyTLike, mlp_kept_fractions, set_kept_fraction

VIT_S = {"image": 224, "patch": 16, "dim": 384, "heads": 6}
PRUNING = {"prune_at": (3, 6, 9), "ratios": (0.7, 0.49, 0.343)}
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
BATCHES = (1, 8)
UNLOWERED = ("tokens", "attention")
"""The passes the unlowered baseline skips: its MLPs run on every token and its attention is unfused."""


def _export(model: torch.nn.Module, path: Path, **options: object) -> Path:
    return dync.export(model, path, input_shape=(2, 3, VIT_S["image"], VIT_S["image"]), **options)


def _macs(package: Path) -> int:
    return dync.load(package).manifest.full_macs


def pruning_rows(depth: int, repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    pruned = DynamicViTLike(depth=depth, **VIT_S, **PRUNING).eval()
    full = copy.deepcopy(pruned)
    full.ratios = (1.0,) * len(full.ratios)
    packages = {"pruned": _export(pruned, work / "pruned.dync"), "full": _export(full, work / "full.dync")}
    engines = {name: dync.load(p) for name, p in packages.items()}
    ideal = _macs(packages["full"]) / _macs(packages["pruned"])
    rows = []
    for batch in BATCHES:
        x = engines["full"].example_input(batch, seed=1)
        times = median_times({k: functools.partial(e.run, x) for k, e in engines.items()}, repeats=repeats)
        error = _error(engines["pruned"], pruned, x)
        realized = times["full"] / times["pruned"]
        rows.append(f"| DynamicViT-like, {depth} blocks | {batch} | {realized:.2f}x | {ideal:.2f}x | "
                    f"{realized / ideal:.2f} | {error:.1e} |")
    return rows


def dispatch_rows(depth: int, repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    base = DyTLike(depth=depth, **VIT_S).eval()
    packages = {"dync": _export(base, work / "dyt.dync"), "unlowered": _export(base, work / "dyt_dense.dync",
                                                                               skip_passes=UNLOWERED)}
    dense_macs = _macs(packages["unlowered"])
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, 3, VIT_S["image"], VIT_S["image"]), np.float32)
        engines = {}
        kept = {}
        for fraction in FRACTIONS:
            model = copy.deepcopy(base)
            set_kept_fraction(model, fraction, torch.from_numpy(x))
            kept[fraction] = [float(f.mean()) for f in mlp_kept_fractions(model, torch.from_numpy(x))]
            for name, package in packages.items():
                engines[(name, fraction)] = _with_gate_biases(package, model, work / f"{name}_{batch}_{fraction}")
        times = median_times({k: functools.partial(e.run, x) for k, e in engines.items()}, repeats=repeats)
        for fraction in FRACTIONS:
            saved = sum(1.0 - f for f in kept[fraction]) * _mlp_macs(base)
            ideal = dense_macs / (dense_macs - saved)
            vs_unlowered = times[("unlowered", fraction)] / times[("dync", fraction)]
            vs_all = times[("dync", 1.0)] / times[("dync", fraction)]
            rows.append(f"| DyT-like, {depth} blocks | {batch} | {np.mean(kept[fraction]):.0%} | {vs_unlowered:.2f}x "
                        f"| {vs_all:.2f}x | {ideal:.2f}x | {vs_unlowered / ideal:.2f} | {vs_all / ideal:.2f} |")
    return rows


def _mlp_macs(model: DyTLike) -> int:
    """MACs of one block's MLP for one sample (the two matrix products on every token)."""
    mlp = model.blocks[0].mlp
    return (mlp[0].weight.numel() + mlp[2].weight.numel()) * (model.trunk.patches + 1)


def _with_gate_biases(package: Path, model: DyTLike, copy_to: Path) -> Engine:
    """A copy of `package` whose gate biases are the model's current ones (set for a kept fraction)."""
    shutil.copytree(package, copy_to)
    for stage in (copy_to / "stages").glob("*.onnx"):
        graph = onnx.load(stage)
        for i, block in enumerate(model.blocks):
            found = [t for t in graph.graph.initializer if t.name.endswith(f"blocks.{i}.gate.bias")]
            assert len(found) == 1, f"block {i}'s gate bias is not one initializer in {stage}"
            found[0].CopyFrom(onnx.numpy_helper.from_array(block.gate.bias.detach().numpy(), found[0].name))
        onnx.save(graph, stage)
    return dync.load(copy_to)


def _error(engine: Engine, model: torch.nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        return float(np.abs(engine.run(x).logits - model(torch.from_numpy(x)).numpy()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--depth", type=int, default=12)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        print("| model | batch | pruned vs ratio 1.0 | MACs ratio | of ideal | max abs diff vs eager |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(pruning_rows(args.depth, args.repeats, work)), flush=True)
        print("\n| model | batch | MLP kept | dync vs unlowered | dync vs dync at 100% | MACs ratio | of ideal "
              "(vs unlowered) | of ideal (vs 100%) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(dispatch_rows(args.depth, args.repeats, work)))


if __name__ == "__main__":
    main()
