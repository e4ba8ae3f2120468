"""Early exit on an MSDNet-like CIFAR model with 7 exits: dync against the plain `torch.onnx.export`.

Run from the repository root:  python -m benchmarks.early_exit [--batch 256] [--repeats 15]

Everything is measured side by side in one process, in interleaved rounds, medians after warm-up:
- plain: `torch.onnx.export(model, (x,), dynamo=True)` of the same model (static batch, every exit
  computed), in onnxruntime with dync's session settings and with onnxruntime's defaults;
- dync: the package run with thresholds that spread the batch evenly over the 7 exits;
- forced k: the package with every sample sent to exit k, which gives the ideal time of the mixed run
  (each sample charged only for the stages up to its exit: sum over k of share_k x time_k).
Batch-1 latency: one sample at a time, per exit, against the plain export at batch 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import dync
from dync.bench import spreading_thresholds
from dync.exporter.capture import quiet_torch_onnx
from dync.runtime.backends.ort import OrtSettings
from dync.runtime.exit_rule import forcing_thresholds
from dync.timing import median_times, onnx_session
from zoo.multi_exit import msdnet_cifar7


def plain_export(model: torch.nn.Module, batch: int, path: Path) -> Path:
    """What a user gets from torch.onnx.export without dync: one graph computing all exits."""
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(batch, 3, 32, 32),), str(path), dynamo=True, input_names=["x"])
    return path


def default_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def batch_table(engine: dync.runtime.engine.Engine, x: np.ndarray, plain: Path, repeats: int) -> dict:
    settings = engine.backend.settings
    plain_same = onnx_session(plain, settings)
    plain_default = default_session(plain)
    thresholds = spreading_thresholds(engine, x)
    variants = {
        "plain (dync settings)": lambda: plain_same.run(None, {"x": x}),
        "plain (ort defaults)": lambda: plain_default.run(None, {"x": x}),
        "dync": lambda: engine.execute(x, thresholds),
    }
    for k in range(engine.num_exits):
        forced = forcing_thresholds(k, engine.num_exits)
        variants[f"forced {k}"] = lambda forced=forced: engine.execute(x, forced)
    times = median_times(variants, repeats=repeats, warmup=2)
    counts = np.bincount(engine.execute(x, thresholds).exit, minlength=engine.num_exits)
    shares = counts / counts.sum()
    cumulative = np.array([e.cumulative_macs for e in engine.manifest.exits], dtype=np.float64)
    ideal = float(shares @ np.array([times[f"forced {k}"] for k in range(engine.num_exits)]))
    return {
        "batch": len(x),
        "exit_counts": counts.tolist(),
        "flops_speedup": float(cumulative[-1] / (shares @ cumulative)),
        "speedup_vs_plain_same_settings": times["plain (dync settings)"] / times["dync"],
        "speedup_vs_plain_ort_defaults": times["plain (ort defaults)"] / times["dync"],
        "ideal_speedup_vs_plain": times["plain (dync settings)"] / ideal,
        "efficiency_ideal_over_actual": ideal / times["dync"],
        "forced_exit_speedup_vs_plain": [times["plain (dync settings)"] / times[f"forced {k}"]
                                         for k in range(engine.num_exits)],
        "settings": settings.describe(),
    }


def latency_table(engine: dync.runtime.engine.Engine, plain1: Path, repeats: int) -> list[dict]:
    """Batch-1 latency per exit: dync stopping at exit k against the plain export computing all exits."""
    x = engine.example_input(1)
    plain = onnx_session(plain1, engine.backend.settings)
    variants = {"plain": lambda: plain.run(None, {"x": x})}
    for k in range(engine.num_exits):
        forced = forcing_thresholds(k, engine.num_exits)
        variants[f"exit {k}"] = lambda forced=forced: engine.execute(x, forced)
    times = median_times(variants, repeats=repeats * 4, warmup=5)
    full = engine.manifest.full_macs
    return [
        {
            "exit": k,
            "flops_speedup": full / e.cumulative_macs,
            "latency_speedup_vs_plain": times["plain"] / times[f"exit {k}"],
        }
        for k, e in enumerate(engine.manifest.exits)
    ]


def print_tables(batch: dict, latency: list[dict]) -> None:
    print(f"MSDNet-like, 7 exits, CIFAR 3x32x32, batch {batch['batch']}, exit counts {batch['exit_counts']}")
    print(f"onnxruntime settings: {batch['settings']}\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| FLOPs speedup (full MACs / mean MACs per sample) | {batch['flops_speedup']:.2f}x |")
    print(f"| ideal speedup vs plain export (forced-exit times) | {batch['ideal_speedup_vs_plain']:.2f}x |")
    print(f"| **dync speedup vs plain export, same session settings** | "
          f"**{batch['speedup_vs_plain_same_settings']:.2f}x** |")
    print(f"| dync speedup vs plain export, onnxruntime defaults | {batch['speedup_vs_plain_ort_defaults']:.2f}x |")
    print(f"| efficiency: ideal time / dync time | {batch['efficiency_ideal_over_actual']:.2f} |")
    print("\n| exit | FLOPs speedup | batch-" + str(batch["batch"]) + " speedup, all at this exit "
          "| batch-1 latency speedup vs plain |\n| --- | --- | --- | --- |")
    for row, forced in zip(latency, batch["forced_exit_speedup_vs_plain"], strict=True):
        latency_speedup = row["latency_speedup_vs_plain"]
        print(f"| {row['exit']} | {row['flops_speedup']:.2f}x | {forced:.2f}x | {latency_speedup:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = msdnet_cifar7().eval()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        package = dync.export(model, work / "msdnet7.dync", input_shape=(16, 3, 32, 32))
        engine = dync.load(package, **vars(OrtSettings(threads=args.threads)))
        x = engine.example_input(args.batch, seed=1)
        batch = batch_table(engine, x, plain_export(model, args.batch, work / "plain.onnx"), args.repeats)
        latency = latency_table(engine, plain_export(model, 1, work / "plain1.onnx"), args.repeats)
    if args.json:
        print(json.dumps({"batch": batch, "latency": latency}, indent=2))
    else:
        print_tables(batch, latency)


if __name__ == "__main__":
    main()
