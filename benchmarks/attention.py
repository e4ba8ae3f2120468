"""FLatten and Agent attention look-alikes: dync's package against the plain `torch.onnx.export` of the same model.

Run from the repository root:  python -m benchmarks.attention [--repeats 20]

For each model of `tests/zoo_attention.py`, at batch 1 and 8, all in onnxruntime under the same session options:
- "plain" is `torch.onnx.export(model, dynamo=True)` loaded with `session_from_onnx`;
- "dync" is `dync.export`'s package (softmax attention fused into ONNX `Attention`, batch-repeated bias
  tables taken before the repeat: `dync/exporter/passes/attention.py`);
- "dync without the fusion" is the `--ops plugins` package of the same model, which skips that pass (these
  models have no other plugin op), run by the same engine.
Ratios are plain time over variant time (above 1: faster than plain); medians of interleaved rounds after
warm-up. The max abs difference is against the plain export's output.
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
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from dync.timing import median_times
from tests.helpers import random_input
from tests.zoo_attention import ATTENTION_ZOO

BATCHES = (1, 8)


def plain_session(model: torch.nn.Module, shape: tuple[int, ...], work: Path) -> ort.InferenceSession:
    path = work / "plain.onnx"
    with quiet_torch_onnx():
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=True, input_names=["input"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return session_from_onnx(path, OrtSettings())


def model_rows(name: str, repeats: int, work: Path) -> list[str]:
    factory, shape = ATTENTION_ZOO[name]
    torch.manual_seed(0)
    model = factory()
    engines = {"dync": dync.load(dync.export(model, work / f"{name}.dync", input_shape=shape)),
               "unfused": dync.load(dync.export(model, work / f"{name}_unfused.dync", input_shape=shape,
                                                ops="plugins"))}
    fused = sum(stage.ops.get("Attention", 0) for stage in engines["dync"].manifest.stages)
    plain = plain_session(model, shape, work)
    rows = []
    for batch in BATCHES:
        x = random_input(shape[1:], batch, seed=batch)
        variants = {"plain": functools.partial(plain.run, None, {"input": x}),
                    **{label: functools.partial(engine.run, x) for label, engine in engines.items()}}
        times = median_times(variants, repeats=repeats)
        reference = plain.run(None, {"input": x})[0]
        error = max(np.abs(engine.run(x).logits - reference).max() for engine in engines.values())
        rows.append(f"| {name} | {batch} | {fused} | {times['plain'] / times['dync']:.2f}x | "
                    f"{times['plain'] / times['unfused']:.2f}x | {error:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings().describe()}\n")
    print("| model | batch | attentions fused | dync vs plain | dync without the fusion vs plain | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for name in ATTENTION_ZOO:
            work = Path(scratch) / name
            work.mkdir()
            print("\n".join(model_rows(name, args.repeats, work)), flush=True)


if __name__ == "__main__":
    main()
