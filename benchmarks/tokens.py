"""Token-dynamic vision transformers: what dync's packages realize of the FLOPs they save.

Run from the repository root:  python -m benchmarks.tokens [--repeats 10] [--depth 12]

ViT-S-like models (224x224 images, 16x16 patches: 196 tokens + class token, width 384, 6 heads), at
batch 1 and 8, all in onnxruntime under the same session options:

(a) Token pruning, keep ratios 0.7 / 0.49 / 0.343 before blocks 3, 6, 9 of 12, in two writings: the
    DynamicViT-like model (TopK, gather) and DynamicViT as its authors wrote it (`DiffPruningViT`: argsort,
    flat-offset selects, `int(init_n * ratio)`). The pruned package against the plain `torch.onnx.export`
    of the same model (dynamic batch, onnxruntime's default session), and against the same model with every
    ratio 1.0 (the look-alike then runs no predictor; the published writing still scores and sorts every
    token), next to the MACs ratio of the two packages (counted by dync from the ONNX graphs); "of ideal" is
    realized / MACs ratio.
(b) Token dispatch, every block's MLP gated per token, in two writings: DyT-like (`x + mlp * (gate >= 0)`)
    and DyT as its authors wrote it (`DynamicTuningViT`: `masked_fill` router with the class token forced
    on, a parallel adapter, blocks returning `(x, dict)`). Gate biases shifted so that about 10 .. 100% of
    the tokens run each MLP (different per sample): dync's default export (MLP on packed kept tokens)
    against the same model exported without the token and attention passes (`skip_passes=UNLOWERED`: MLP on
    every token, masked, and no attention fusion either) and against dync's package at 100% kept (which
    isolates what dispatch saves), next to the MACs ratio.
Medians of interleaved rounds after warm-up; only ratios are printed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import dync
from dync.exporter.capture import quiet_torch_onnx
from dync.package import load_manifest, program_files, write_manifest
from dync.runtime.backends.ort import OrtSettings
from dync.runtime.engine import Engine
from dync.timing import median_times, onnx_session
from zoo.tokens import (
    DiffPruningViT,
    DynamicTuningViT,
    DynamicViTLike,
    DyTLike,
    mlp_kept_fractions,
    set_kept_fraction,
)

VIT_S = {"image": 224, "patch": 16, "dim": 384, "heads": 6}
PRUNING = {"prune_at": (3, 6, 9), "ratios": (0.7, 0.49, 0.343)}
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
BATCHES = (1, 8)
UNLOWERED = ("tokens", "attention")
"""The passes the unlowered baseline skips: its MLPs run on every token and its attention is unfused."""
SHAPE = (2, 3, VIT_S["image"], VIT_S["image"])


def dynamic_vit_like(depth: int, ratios: tuple[float, ...] = PRUNING["ratios"]) -> torch.nn.Module:
    return DynamicViTLike(depth=depth, **VIT_S, prune_at=PRUNING["prune_at"], ratios=ratios)


def diff_pruning(depth: int, ratios: tuple[float, ...] = PRUNING["ratios"]) -> torch.nn.Module:
    return DiffPruningViT(depth=depth, **VIT_S, pruning_loc=PRUNING["prune_at"], token_ratio=ratios)


PRUNED = {"DynamicViT-like": dynamic_vit_like, "DynamicViT as published": diff_pruning}
DISPATCHED = {"DyT-like": DyTLike, "DyT as published": DynamicTuningViT}


def _export(model: torch.nn.Module, path: Path, **options: object) -> Path:
    return dync.export(model, path, input_shape=SHAPE, **options)


def _macs(package: Path) -> int:
    return dync.load(package).manifest.full_macs


def _plain(model: torch.nn.Module, path: Path) -> ort.InferenceSession:
    """The plain `torch.onnx.export` with a dynamic batch, in a session with onnxruntime's defaults."""
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(*SHAPE),), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return onnx_session(path)


def pruning_rows(name: str, depth: int, repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    pruned = PRUNED[name](depth).eval()
    torch.manual_seed(0)
    full = PRUNED[name](depth, ratios=(1.0,) * len(PRUNING["ratios"])).eval()
    packages = {"pruned": _export(pruned, work / "pruned.dync"), "full": _export(full, work / "full.dync")}
    engines = {key: dync.load(p) for key, p in packages.items()}
    plain = _plain(pruned, work / "plain.onnx")
    ideal = _macs(packages["full"]) / _macs(packages["pruned"])
    rows = []
    for batch in BATCHES:
        x = engines["full"].example_input(batch, seed=1)
        variants = {"plain": functools.partial(plain.run, None, {"x": x}),
                    **{key: functools.partial(e.run, x) for key, e in engines.items()}}
        times = median_times(variants, repeats=repeats)
        error = _error(engines["pruned"], pruned, x)
        realized = times["full"] / times["pruned"]
        rows.append(f"| {name}, {depth} blocks | {batch} | {times['plain'] / times['pruned']:.2f}x | "
                    f"{realized:.2f}x | {ideal:.2f}x | {realized / ideal:.2f} | {error:.1e} |")
    return rows


def dispatch_rows(name: str, depth: int, repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    base = DISPATCHED[name](depth=depth, **VIT_S).eval()
    packages = {"dync": _export(base, work / "dyt.dync"), "unlowered": _export(base, work / "dyt_dense.dync",
                                                                               skip_passes=UNLOWERED)}
    dense_macs = _macs(packages["unlowered"])
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, *SHAPE[1:]), np.float32)
        engines = {}
        kept = {}
        for fraction in FRACTIONS:
            model = copy.deepcopy(base)
            set_kept_fraction(model, fraction, torch.from_numpy(x))
            kept[fraction] = [float(f.mean()) for f in mlp_kept_fractions(model, torch.from_numpy(x))]
            for key, package in packages.items():
                engines[(key, fraction)] = _with_gate_biases(package, model, work / f"{key}_{batch}_{fraction}")
        times = median_times({k: functools.partial(e.run, x) for k, e in engines.items()}, repeats=repeats)
        for fraction in FRACTIONS:
            saved = sum(1.0 - f for f in kept[fraction]) * _mlp_macs(base)
            ideal = dense_macs / (dense_macs - saved)
            vs_unlowered = times[("unlowered", fraction)] / times[("dync", fraction)]
            vs_all = times[("dync", 1.0)] / times[("dync", fraction)]
            rows.append(f"| {name}, {depth} blocks | {batch} | {np.mean(kept[fraction]):.0%} | {vs_unlowered:.2f}x "
                        f"| {vs_all:.2f}x | {ideal:.2f}x | {vs_unlowered / ideal:.2f} | {vs_all / ideal:.2f} |")
    return rows


def _mlp_macs(model: torch.nn.Module) -> int:
    """MACs of one block's MLP for one sample (the two matrix products on every token)."""
    mlp = model.blocks[0].mlp
    return (mlp[0].weight.numel() + mlp[2].weight.numel()) * (model.trunk.patches + 1)


def _with_gate_biases(package: Path, model: torch.nn.Module, copy_to: Path) -> Engine:
    """A copy of `package` whose gate biases are the model's current ones (set for a kept fraction), its file
    records renewed: one export serves every fraction."""
    shutil.copytree(package, copy_to)
    manifest = load_manifest(copy_to)
    biases = {name: p for name, p in model.named_parameters() if name.endswith(".bias")
              and any(p is block.gate_layer.bias for block in model.blocks)}
    for stage in (copy_to / "stages").glob("*.onnx"):
        graph = onnx.load(stage)
        for name, bias in biases.items():
            found = [t for t in graph.graph.initializer if t.name.endswith(name)]
            assert len(found) == 1, f"gate bias {name} is not one initializer in {stage}"
            found[0].CopyFrom(onnx.numpy_helper.from_array(bias.detach().numpy(), found[0].name))
        onnx.save(graph, stage)
    manifest.files.update(program_files(copy_to, manifest))
    write_manifest(copy_to, manifest)
    return dync.load(copy_to)


def _error(engine: Engine, model: torch.nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        return float(np.abs(engine.run(x).logits - model(torch.from_numpy(x)).numpy()).max())


def _print_rows(rows: Callable[[str, int, int, Path], list[str]], models: Collection[str],
                args: argparse.Namespace, work: Path) -> None:
    """Each model's rows as soon as they are measured, each model in a scratch directory of its own."""
    for k, name in enumerate(models):
        (work / str(k)).mkdir(parents=True)
        print("\n".join(rows(name, args.depth, args.repeats, work / str(k))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--depth", type=int, default=12)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        print("| model | batch | dync vs plain export | pruned vs ratio 1.0 | MACs ratio | of ideal "
              "| max abs diff vs eager |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        _print_rows(pruning_rows, PRUNED, args, work / "pruning")
        print("\n| model | batch | MLP kept | dync vs unlowered | dync vs dync at 100% | MACs ratio | of ideal "
              "(vs unlowered) | of ideal (vs 100%) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        _print_rows(dispatch_rows, DISPATCHED, args, work / "dispatch")


if __name__ == "__main__":
    main()
