"""Early exit on TensorRT engines: dync's stage engines against the static full-model engine (needs TensorRT and
a GPU; it stops with one line on a machine without them).

Run from the repository root:  python -m benchmarks.tensorrt [--batch 64] [--repeats 20] [--precisions fp32,fp16]

For each of the zoo's early-exit models (random weights, exported here): `dync build --target trt` at each
precision, then `dync.bench` on the TensorRT backend, side by side in alternating blocks after warm-up: the
static full model's engine against dync's stage engines with thresholds that spread the batch evenly over the
exits, the MAC ratio (theoretical), and dync's time against its ideal (each sample charged only for the stages up
to its exit, from runs with every sample forced to one exit).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import dync
from dync.bench import bench
from dync.build import EngineOptions, build_engines
from dync.build.profiles import BatchRange
from dync.build.tensorrt import require_tensorrt
from dync.errors import DyncError
from zoo import random_input
from zoo.multi_exit import ZOO

MODELS = ("msdnet", "ranet", "dynamic_perceiver")


def export(name: str, root: Path) -> Path:
    factory, shape = ZOO[name]
    torch.manual_seed(0)
    return Path(dync.export(factory().eval(), root / f"{name}.dync", input_shape=list(shape)))


def row(name: str, precision: str, package: Path, batch: int, repeats: int) -> str:
    build_engines(package, EngineOptions(batch=BatchRange(1, batch, max(batch, 256)), precision=precision),
                  progress=lambda message: print(f"  {message}"))
    engine = dync.load(package, backend="trt", precision=precision)
    x = random_input(engine.manifest.inputs[0].shape[1:], batch)
    report = bench(engine, x, repeats=repeats)
    return (f"| {name} | {precision} | {batch} | {report.exit_counts} | {report.theoretical_speedup:.2f}x | "
            f"{report.realized_speedup:.2f}x | {report.ideal_speedup:.2f}x | {report.efficiency:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--precisions", default="fp32,fp16")
    args = parser.parse_args()
    try:
        require_tensorrt()
    except DyncError as exc:
        raise SystemExit(f"benchmarks.tensorrt: {exc}") from None
    rows = []
    with tempfile.TemporaryDirectory(prefix="dync-bench-trt-") as scratch:
        for name in MODELS:
            package = export(name, Path(scratch))
            rows += [row(name, precision, package, args.batch, args.repeats)
                     for precision in args.precisions.split(",")]
    print("| model | precision | batch | exits taken | theoretical (MACs) | realized (static / dync) | ideal | "
          "efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
