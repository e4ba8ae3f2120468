"""Post-training quantization (`dync quantize`): speed per stage and end to end, accuracy and exits.

Run from the repository root:  python -m benchmarks.quantization [--repeats 10] [--samples 64]

* **Per stage**: each stage's CPU int8 form (what `dync quantize` stores; op types measured slower left in
  float) against the float32 stage, at batch 1 and 8, on the zoo's 7-exit MSDNet-like model (CIFAR size), a
  LASNet-like ResNet-50 (224x224, 16 masked bottlenecks), timm's ViT-S/16 and torchvision's ResNet-50
  (224x224), random weights.
  Both sides run with the stage's runtime settings: batch fixed, plugin nodes on their CPU path.
  Goal: >= 1.8x for conv and MatMul stages on a CPU with VNNI.
* **End to end**: the int8 package against the float32 package (`dync.load(PKG, precision=...)`), every
  sample to the last exit, at batch 1 and 8.
* **Accuracy**: on the bundled digits model (trained), the thresholds chosen for 0.5 x the full model's MACs
  on one half of its held-out split and quantized on that half, scored on the other half: top-1 accuracy
  and cost of float32, int8 and fp8 (emulated on the CPU), and the samples whose exit changed. On the
  random-weight models (no labels): top-1 agreement with the float32 package and the max error relative to
  the largest logit, on held-out random images. The LASNet-like model is also measured with its masks
  fixed (`force_masks`, one random pattern for every input), which separates the rounding error from the
  mask decisions it flips. Goals: top-1 change <= 1 point (CNNs), <= 1.5 (ViTs); exits changed <= 2%.

Calibration data for the random-weight models is `--samples` standard-normal images; the held-out set is 32
others. Times are medians of alternating blocks after warm-up (`dync.timing.median_times`), side by side.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

import dync
from dync.calib.calibrate import BudgetRequest, calibrate_package
from dync.calib.quantize import QuantizeRequest, quantize_package
from dync.demo import load_example
from dync.layers import WEIGHTED_OPS
from dync.plugins.splice import specialize_custom_nodes
from dync.runtime.backends.ort import OrtSettings, session_from_onnx, with_batch
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds
from dync.timing import median_times
from zoo.library import build
from zoo.multi_exit import msdnet_cifar7
from zoo.spatial import force_masks, lasnet_resnet50_like

BATCHES = (1, 8)
SPEED_GOAL = 1.8
HELD_OUT = 32


def _models() -> dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]]:
    def msdnet() -> torch.nn.Module:
        torch.manual_seed(0)
        return msdnet_cifar7().eval()

    def lasnet(fixed: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = lasnet_resnet50_like(0.35).eval()
        if fixed:
            force_masks(model, 0.35, per_sample=False, seed=0)
        return model

    image = (2, 3, 224, 224)
    return {"msdnet_cifar7": (msdnet, (16, 3, 32, 32)),
            "LASNet-ResNet-50-like": (lambda: lasnet(False), image),
            "LASNet-ResNet-50-like, masks fixed": (lambda: lasnet(True), image),
            "timm vit_small_patch16_224": (lambda: build("timm", "vit_small_patch16_224"), image),
            "torchvision resnet50": (lambda: build("torchvision", "resnet50"), image)}


def _stage_session(model: onnx.ModelProto, batch: int):
    fixed = with_batch(specialize_custom_nodes(model, batch), batch)
    return session_from_onnx(fixed, OrtSettings(), spinning=False)


def stage_rows(name: str, package: Path, x: np.ndarray, repeats: int) -> list[str]:
    """Each stage's CPU int8 form against its float32 graph, on the inputs the stage sees."""
    fp32 = Engine.load(package, precision="fp32")
    quantized = dync.load(package)
    record = fp32.manifest.quantization
    rows = []
    state = fp32.input_feeds(x[: max(BATCHES)])
    for stage, quantized_stage, stage_record in zip(fp32.manifest.stages, quantized.manifest.stages,
                                                    record.stages, strict=True):
        feeds = {n: state[n] for n in stage.reads}
        graphs = {"fp32": onnx.load(package / stage.onnx), "int8": onnx.load(package / quantized_stage.onnx)}
        weighted = sum(n.op_type in WEIGHTED_OPS for n in graphs["fp32"].graph.node)
        for batch in BATCHES:
            sessions = {k: _stage_session(g, batch) for k, g in graphs.items()}
            rows_in = {n: v[:batch] for n, v in feeds.items()}
            times = median_times({k: (lambda s=s, r=rows_in: s.run(None, r)) for k, s in sessions.items()},
                                 repeats=repeats)
            speedup = times["fp32"] / times["int8"]
            kept = ", ".join(stage_record.reverted_ops) or "-"
            goal = "yes" if speedup >= SPEED_GOAL else "NO"
            rows.append(f"| {name} | {stage.name} | {weighted} | {batch} | {speedup:.2f}x | {kept} | {goal} |")
        outputs = fp32.backend.run(stage, feeds)
        state.update((n, outputs[n]) for n in stage.writes)
    return rows


def end_to_end_rows(name: str, package: Path, x: np.ndarray, repeats: int) -> list[str]:
    """dync's defaults (the one-graph executor where it applies) for both precisions, and int8 stage by stage."""
    engines = {"fp32": Engine.load(package, precision="fp32"), "int8": dync.load(package),
               "int8 stages": dync.load(package, one_graph=False)}
    last = forcing_thresholds(engines["fp32"].num_exits - 1, engines["fp32"].num_exits)
    rows = []
    for batch in BATCHES:
        times = median_times({k: (lambda e=e, b=x[:batch]: e.run(b, thresholds=last)) for k, e in engines.items()},
                             repeats=repeats)
        rows.append(f"| {name} | {batch} | {times['fp32'] / times['int8']:.2f}x | "
                    f"{times['fp32'] / times['int8 stages']:.2f}x |")
    return rows


def agreement_row(name: str, package: Path, held_out: np.ndarray) -> str:
    reference = Engine.load(package, precision="fp32")
    last = forcing_thresholds(reference.num_exits - 1, reference.num_exits)
    fp32 = reference.run(held_out, thresholds=last).logits
    int8 = dync.load(package).run(held_out, thresholds=last).logits
    agreement = float((fp32.argmax(axis=1) == int8.argmax(axis=1)).mean())
    error = float(np.abs(int8 - fp32).max() / np.abs(fp32).max())
    return f"| {name} | {agreement:.1%} | {error:.3f} |"


def digits_rows(work: Path) -> list[str]:
    """fp32, int8 and fp8 of the trained digits model, thresholds chosen for 0.5 x MACs on one half."""
    example = load_example()
    model, (x, y) = example.load_pretrained(), example.load_test_split()
    half = len(x) // 2
    base = dync.export(model, work / "digits.dync", input_shape=(16, *x.shape[1:]))
    calibrate_package(dync.load(base), x[:half], BudgetRequest(budget=0.5), labels=y[:half])
    reference = Engine.load(base, precision="fp32").run(x[half:])
    macs = np.array([e.cumulative_macs for e in dync.load(base).manifest.exits], dtype=np.float64)
    rows = [_digits_row("float32", reference, reference, y[half:], macs)]
    for fmt in ("int8", "fp8"):
        package = work / f"digits_{fmt}.dync"
        shutil.copytree(base, package)
        quantize_package(package, x[:half], y[:half], QuantizeRequest(format=fmt))
        rows.append(_digits_row(fmt, dync.load(package).run(x[half:]), reference, y[half:], macs))
    return rows


def _digits_row(label: str, result, reference, labels: np.ndarray, macs: np.ndarray) -> str:
    accuracy = float((result.logits.argmax(axis=1) == labels).mean())
    base = float((reference.logits.argmax(axis=1) == labels).mean())
    cost = float(macs[result.exit].mean() / macs[-1])
    changed = float((result.exit != reference.exit).mean())
    goal = "reported" if label != "int8" else "yes" if abs(accuracy - base) <= 0.01 and changed <= 0.02 else "NO"
    return f"| {label} | {accuracy:.1%} | {100 * (accuracy - base):+.1f} | {cost:.3f} | {changed:.1%} | {goal} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--only", help="Run only the models whose name contains this (and skip the digits part).")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stages, ends, agreements = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for index, (name, (factory, shape)) in enumerate(_models().items()):
            if args.only is not None and args.only not in name:
                continue
            print(f"exporting and quantizing {name}", flush=True)
            x = rng.standard_normal((args.samples + HELD_OUT, *shape[1:])).astype(np.float32)
            package = dync.export(factory(), work / f"model{index}.dync", input_shape=shape)
            quantize_package(package, x[: args.samples], None, QuantizeRequest(min_samples=min(64, args.samples)))
            if "masks fixed" not in name:
                stages += stage_rows(name, package, x[args.samples:], args.repeats)
                ends += end_to_end_rows(name, package, x[args.samples:], args.repeats)
            agreements.append(agreement_row(name, package, x[args.samples:]))
        digits = digits_rows(work) if args.only is None else []
    print("\nper stage: CPU int8 form over float32 (speedup), same session settings")
    print("| model | stage | conv/MatMul nodes | batch | int8 speedup | kept in float (measured slower) | "
          f">= {SPEED_GOAL}x |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(stages))
    print("\nend to end: int8 package over the float32 package, every sample to the last exit")
    print("| model | batch | int8 (dync's default executor) | int8 stage by stage |\n| --- | --- | --- | --- |")
    print("\n".join(ends))
    print(f"\nrandom-weight models on {HELD_OUT} held-out random images: int8 against float32")
    print("| model | top-1 agreement | max error / max logit |\n| --- | --- | --- |")
    print("\n".join(agreements))
    print("\ndigits (trained; thresholds for 0.5 x MACs, quantized and chosen on one half, scored on the other)")
    print("| precision | top-1 | change (points) | cost | exits changed | within goals |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(digits))


if __name__ == "__main__":
    main()
