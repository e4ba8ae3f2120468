"""Export time, verification included, against the plain `torch.onnx.export` of the same model.

Run from the repository root:  python -m benchmarks.export_time [--runs 1]

Models: a ResNet-50-sized LASNet look-alike at 224x224 (16 masked bottlenecks, crossovers measured), the
Swin-style `zoo/swin.py:TinySwin` whose `window_reverse` fixes the batch (so capture traces it a second time),
and the three-input `zoo/dit.py:TinyDiT`. Each is exported by dync with and without verification, and by plain
`torch.onnx.export(dynamo=True)` with a dynamic batch (what dync's capture step starts from; for TinySwin the
plain export silently keeps the example's batch in a reshape, which is the defect dync works around). Seconds
are wall-clock on this machine and only meaningful next to each other: the ratio column is dync over plain.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dync
from dync.exporter.capture import quiet_torch_onnx
from zoo.dit import TinyDiT, dit_example
from zoo.spatial import lasnet_resnet50_like
from zoo.swin import TinySwin


def _models() -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    """Each model and the keyword arguments of its `dync.export` call."""
    torch.manual_seed(0)
    return {
        "LASNet-ResNet-50-like, 224x224": (lasnet_resnet50_like(0.35).eval(), {"input_shape": (2, 3, 224, 224)}),
        "TinySwin (forward fixes the batch)": (TinySwin().eval(), {"input_shape": (4, 3, 32, 32)}),
        "TinyDiT (x, t, y)": (TinyDiT().eval(), {"example": dit_example(4)}),
    }


def _plain_export(model: torch.nn.Module, options: dict[str, Any], path: Path) -> None:
    if "example" in options:
        arrays = options["example"]
        args: tuple = ()
        kwargs = {name: torch.from_numpy(a) for name, a in arrays.items()}
        shapes: Any = {name: {0: torch.export.Dim("batch")} for name in arrays}
    else:
        args, kwargs = (torch.randn(*options["input_shape"]),), {}
        shapes = ({0: torch.export.Dim("batch")},)
    with quiet_torch_onnx():
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=shapes)


def _seconds(run: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(label: str, model: torch.nn.Module, options: dict[str, Any], root: Path, runs: int) -> str:
    verified = _seconds(lambda: dync.export(model, root / "verified.dync", **options), runs)
    unverified = _seconds(lambda: dync.export(model, root / "unverified.dync", verify=False, **options), runs)
    plain = _seconds(lambda: _plain_export(model, options, root / "plain.onnx"), runs)
    return f"| {label} | {verified:.1f} | {unverified:.1f} | {plain:.1f} | {verified / plain:.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="Exports per variant; the median is printed.")
    args = parser.parse_args()
    print("| model | dync export, verified (s) | dync --no-verify (s) | plain torch.onnx.export (s) "
          "| verified / plain |")
    print("| --- | --- | --- | --- | --- |")
    for label, (model, options) in _models().items():
        with tempfile.TemporaryDirectory() as tmp:
            print(_row(label, model, options, Path(tmp), args.runs), flush=True)


if __name__ == "__main__":
    main()
