"""dync against the plain export, on models nobody here wrote and on the zoo's dynamic models.

Run from the repository root:  python -m benchmarks.corpus [--repeats 20] [--only NAME] [--batches 1 8]

Each model, with random weights (no downloads), is exported once by `dync.export` with its default settings
(batch 2, verification on; the package takes any batch) and, per batch size, by the plain
`torch.onnx.export(model, (x,), dynamo=True)` at that fixed batch, run in an `onnxruntime.InferenceSession`
with onnxruntime's defaults: what a user gets without dync. `dync.load(package).run(x)` is timed against
`session.run`, side by side in alternating blocks of calls each opened by an untimed call (see
`dync/timing.py` and benchmarks/README.md), medians; the table prints plain time / dync time per model and
batch, their geometric means, and the largest difference between the two outputs (each sample against the
plain export's output at the exit it took). "same ops" says whether, once onnxruntime has optimized both on
this machine, the package's session at that batch runs the same op types, as many of each, as the plain
session ("-" for dynamic packages): a timing argument on a noisy machine, settled by structure.

The zoo's dynamic models run as a deployed package would: the early-exit model with thresholds that split a
batch of other random inputs evenly over its exits (what `dync calibrate` would store), the others as exported.
"""

from __future__ import annotations

import argparse
import collections
import functools
import math
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import dync
from dync.bench import spreading_thresholds
from dync.exporter.capture import quiet_torch_onnx
from dync.package import load_manifest, write_manifest
from dync.runtime.backends.ort import OrtSettings, optimized_for_this_machine, with_batch
from dync.timing import median_times
from zoo.library import build


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], torch.nn.Module]
    sample: tuple[int, ...]
    spread_thresholds: bool = False


def _zoo(factory: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def built() -> torch.nn.Module:
        torch.manual_seed(0)
        return factory().eval()
    return built


def _lasnet() -> torch.nn.Module:
    from zoo.spatial import lasnet_resnet50_like

    return lasnet_resnet50_like(0.35)


def _msdnet() -> torch.nn.Module:
    from zoo.multi_exit import msdnet_cifar7

    return msdnet_cifar7()


def _dynamic_vit() -> torch.nn.Module:
    from benchmarks.tokens import PRUNING, VIT_S
    from zoo.tokens import DynamicViTLike

    return DynamicViTLike(depth=12, **VIT_S, **PRUNING)


def _diff_pruning() -> torch.nn.Module:
    from benchmarks.tokens import diff_pruning

    return diff_pruning(depth=12)


def _dyt(published: bool) -> Callable[[], torch.nn.Module]:
    def built() -> torch.nn.Module:
        from benchmarks.tokens import VIT_S
        from zoo.tokens import DynamicTuningViT, DyTLike, set_kept_fraction

        model = (DynamicTuningViT if published else DyTLike)(depth=12, **VIT_S).eval()
        set_kept_fraction(model, 0.5, torch.randn(4, 3, VIT_S["image"], VIT_S["image"]))
        return model
    return built


def _agent_pvt() -> torch.nn.Module:
    from benchmarks.attention import MODELS

    return MODELS["Agent-PVT-Tiny-like"]()


def _arc() -> torch.nn.Module:
    from zoo.arc import ArcResNetLike, _ready

    return _ready(ArcResNetLike(widths=(32, 64, 128)))


IMAGE = (3, 224, 224)
CASES = [
    Case("torchvision resnet18", functools.partial(build, "torchvision", "resnet18"), IMAGE),
    Case("torchvision resnet50", functools.partial(build, "torchvision", "resnet50"), IMAGE),
    Case("torchvision mobilenet_v3_large", functools.partial(build, "torchvision", "mobilenet_v3_large"), IMAGE),
    Case("torchvision efficientnet_b0", functools.partial(build, "torchvision", "efficientnet_b0"), IMAGE),
    Case("torchvision regnet_y_400mf", functools.partial(build, "torchvision", "regnet_y_400mf"), IMAGE),
    Case("torchvision shufflenet_v2_x1_0", functools.partial(build, "torchvision", "shufflenet_v2_x1_0"), IMAGE),
    Case("torchvision densenet121", functools.partial(build, "torchvision", "densenet121"), IMAGE),
    Case("torchvision convnext_tiny", functools.partial(build, "torchvision", "convnext_tiny"), IMAGE),
    Case("torchvision swin_t", functools.partial(build, "torchvision", "swin_t"), IMAGE),
    Case("timm deit_tiny_patch16_224", functools.partial(build, "timm", "deit_tiny_patch16_224"), IMAGE),
    Case("timm vit_small_patch16_224", functools.partial(build, "timm", "vit_small_patch16_224"), IMAGE),
    Case("timm convnext_atto", functools.partial(build, "timm", "convnext_atto"), IMAGE),
    Case("timm poolformer_s12", functools.partial(build, "timm", "poolformer_s12"), IMAGE),
    Case("timm levit_128s", functools.partial(build, "timm", "levit_128s"), IMAGE),
    Case("timm mobilevit_xs", functools.partial(build, "timm", "mobilevit_xs"), (3, 256, 256)),
    Case("timm efficientformer_l1", functools.partial(build, "timm", "efficientformer_l1"), IMAGE),
    Case("timm pvt_v2_b0", functools.partial(build, "timm", "pvt_v2_b0"), IMAGE),
    Case("zoo LASNet-ResNet-50, 35% kept", _zoo(_lasnet), IMAGE),
    Case("zoo MSDNet-CIFAR, 7 exits", _zoo(_msdnet), (3, 32, 32), spread_thresholds=True),
    Case("zoo DynamicViT-S, top-k pruning", _zoo(_dynamic_vit), IMAGE),
    Case("zoo DynamicViT-S as published (argsort)", _zoo(_diff_pruning), IMAGE),
    Case("zoo DyT-S, 50% dispatch", _zoo(_dyt(published=False)), IMAGE),
    Case("zoo DyT-S as published, 50% dispatch", _zoo(_dyt(published=True)), IMAGE),
    Case("zoo Agent-PVT-Tiny", _zoo(_agent_pvt), IMAGE),
    Case("zoo ARC-ResNet, rotated convs", _zoo(_arc), (3, 64, 64)),
]


def plain_session(model: torch.nn.Module, batch: int, sample: tuple[int, ...], path: Path) -> ort.InferenceSession:
    """The plain export at a fixed batch, in a session with onnxruntime's defaults."""
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(batch, *sample),), str(path), dynamo=True, input_names=["x"])
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def package_for(case: Case, model: torch.nn.Module, work: Path) -> Path:
    package = dync.export(model, work / "model.dync", input_shape=(2, *case.sample))
    if case.spread_thresholds:
        engine = dync.load(package)
        manifest = load_manifest(package)
        thresholds = spreading_thresholds(engine, engine.example_input(64, seed=123))
        for stage, threshold in zip(manifest.stages, [*thresholds, None], strict=True):
            stage.exit.threshold = None if threshold is None else float(threshold)
        write_manifest(package, manifest)
    return package


def largest_difference(result: dync.runtime.engine.RunResult, plain: list[np.ndarray]) -> float:
    """Each sample's output against the plain export's output at the exit the sample took."""
    reference = np.stack([plain[k][i] for i, k in enumerate(result.exit)])
    return float(np.abs(result.logits - reference).max())


def same_optimized_graph(engine: dync.runtime.engine.Engine, plain: Path, batch: int) -> str:
    """Whether the package's session at `batch` runs the ops the plain session runs, once onnxruntime has
    optimized both here: "yes", "no", or "-" for packages of several stages or with plugin ops (dynamic by
    design). Where it is "yes", a time ratio away from 1.0 is the machine's noise or the executor's own cost
    per call, not the graph."""
    manifest = engine.manifest
    if len(manifest.stages) != 1 or manifest.custom_ops:
        return "-"
    settings = OrtSettings()
    stage = with_batch(onnx.load(engine.package_dir / manifest.stages[0].onnx), batch)
    ops = [collections.Counter(n.op_type for n in optimized_for_this_machine(m, settings).graph.node)
           for m in (stage, onnx.load(plain))]
    return "yes" if ops[0] == ops[1] else "no"


def case_rows(case: Case, batches: list[int], repeats: int, work: Path) -> tuple[list[str], list[float]]:
    model = case.model()
    engine = dync.load(package_for(case, model, work))
    cells, ratios = [], []
    for batch in batches:
        plain_path = work / f"plain{batch}.onnx"
        plain = plain_session(model, batch, case.sample, plain_path)
        x = engine.example_input(batch, seed=batch)
        times = median_times({"plain": functools.partial(plain.run, None, {"x": x}),
                              "dync": functools.partial(engine.run, x)}, repeats=repeats)
        ratio = times["plain"] / times["dync"]
        ratios.append(ratio)
        cells.append(f"{ratio:.2f}x | {same_optimized_graph(engine, plain_path, batch)} | "
                     f"{largest_difference(engine.run(x), plain.run(None, {'x': x})):.1e}")
    return [f"| {case.name} | {' | '.join(cells)} |"], ratios


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each side per batch")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or args.only in c.name]
    print(f"onnxruntime {ort.__version__}, dync sessions {OrtSettings().describe()}; plain: onnxruntime defaults\n")
    print("| model | " + " | ".join(f"batch {b}: dync vs plain | same ops | max abs diff" for b in args.batches)
          + " |")
    print("| --- | " + " | ".join("--- | --- | ---" for _ in args.batches) + " |")
    ratios: dict[str, list[list[float]]] = {"library": [], "zoo": []}
    for case in cases:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                rows, case_ratios = case_rows(case, args.batches, args.repeats, Path(scratch))
            except Exception as error:  # a benchmark reports a failed model and goes on with the rest
                last = traceback.format_exception_only(error)[-1].strip()
                print(f"| {case.name} | failed: {last[:200]} |", flush=True)
                continue
        print("\n".join(rows), flush=True)
        ratios["zoo" if case.name.startswith("zoo") else "library"].append(case_ratios)
    for group, values in ratios.items():
        if values:
            means = [geometric_mean([v[i] for v in values]) for i in range(len(args.batches))]
            print(f"| **geometric mean, {group} ({len(values)} models)** | "
                  + " | ".join(f"**{m:.2f}x** | | " for m in means) + "|")


if __name__ == "__main__":
    main()
