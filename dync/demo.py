"""`dync demo`: the main job end to end on the bundled multi-exit digits CNN.

Export the trained model, verify every exit path against eager PyTorch, then run the held-out digits at
several thresholds and print accuracy, the exit histogram, and the speedup over the static full model
measured side by side in the same run.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from dync.errors import InstallError

if TYPE_CHECKING:
    from dync.runtime.engine import Engine

EXAMPLE_FILE = Path(__file__).resolve().parents[1] / "examples" / "digits_multiexit.py"
DEMO_THRESHOLDS = (None, 0.99, 0.9, 0.7, 0.5)
DEMO_BUDGET = 0.3


def load_example() -> ModuleType:
    """The example lives in the repository's examples/ folder, which an editable install keeps beside dync."""
    if not EXAMPLE_FILE.is_file():
        raise InstallError(
            f"{EXAMPLE_FILE} is missing; the demo needs the repository's examples/ folder, so install dync "
            "from a clone with `pip install -e .`."
        )
    spec = importlib.util.spec_from_file_location("digits_multiexit", EXAMPLE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_demo(
    output: Path | None, plot: Path, echo: Callable[[str], None], progress: Callable[[str], None]
) -> None:
    if output is not None:
        _demo(output, plot, echo, progress)
        return
    with tempfile.TemporaryDirectory() as scratch:
        _demo(Path(scratch) / "digits.dync", plot, echo, progress)


def _demo(package: Path, plot: Path, echo: Callable[[str], None], progress: Callable[[str], None]) -> None:
    import dync
    from dync.timing import median_times
    from dync.verify import verify

    example = load_example()
    model = example.load_pretrained()
    x, y = example.load_test_split()
    dync.export(model, package, input_shape=(16, *x.shape[1:]), progress=progress)
    engine = dync.load(package)
    verify(engine, model, x=x[:64], progress=progress)
    echo(f"exported and verified {package}: {engine.num_exits} exits, every path equal to eager PyTorch\n")

    cumulative = np.array([e.cumulative_macs for e in engine.manifest.exits], dtype=np.float64)
    settings = {_label(t): (None if t is None else [t] * (engine.num_exits - 1)) for t in DEMO_THRESHOLDS}
    feeds = engine.input_feeds(x)
    variants = {"static": lambda: engine.backend.run_static(feeds)}
    variants.update({label: (lambda t=t: engine.run(x, thresholds=t)) for label, t in settings.items()})
    progress(f"timing {len(variants)} variants side by side on {len(x)} held-out digits")
    times = median_times(variants, repeats=15, warmup=2)

    echo("| thresholds | accuracy | exits taken | MACs / full | theoretical speedup | measured speedup |")
    echo("| --- | --- | --- | --- | --- | --- |")
    for label, thresholds in settings.items():
        result = engine.run(x, thresholds=thresholds)
        counts = np.bincount(result.exit, minlength=engine.num_exits)
        fraction = float(counts @ cumulative / len(x) / cumulative[-1])
        accuracy = _accuracy(result.logits, y)
        echo(f"| {label} | {accuracy:.1%} | {counts.tolist()} | {fraction:.2f} | {1 / fraction:.2f}x | "
             f"{times['static'] / times[label]:.2f}x |")
    echo("\nmeasured speedup: the static full model's median time over dync's, same onnxruntime settings "
         f"({engine.backend.describe()['intra_op_threads']} threads), interleaved rounds.")
    _calibration(engine, x, y, plot, echo)


def _calibration(engine: Engine, x: np.ndarray, y: np.ndarray, plot: Path, echo: Callable[[str], None]) -> None:
    """Calibrate on one half of the held-out digits for a compute budget, check on the other half."""
    from dync.calib.budget import flops_cost
    from dync.calib.calibrate import BudgetRequest, calibrate_package
    from dync.calib.plot import plot_calibration

    half = len(x) // 2
    result = calibrate_package(engine, x[:half], BudgetRequest(budget=DEMO_BUDGET), labels=y[:half])
    calibrated = engine.run(x[half:])
    full = engine.run(x[half:], thresholds=[2.0] * (engine.num_exits - 1))
    cost = flops_cost([e.cumulative_macs for e in engine.manifest.exits])(calibrated.exit)
    thresholds = [round(float(t), 4) for t in result.chosen.thresholds]
    echo(f"\ncalibrated for {DEMO_BUDGET} x the full model's MACs on {half} digits (thresholds {thresholds}); "
         f"on the other {len(x) - half}: cost {cost:.3f} x full, accuracy {_accuracy(calibrated.logits, y[half:]):.1%} "
         f"(full model {_accuracy(full.logits, y[half:]):.1%})")
    echo(f"accuracy/cost curve and exit histogram: {plot_calibration(result, plot, 'flops')}")


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def _label(threshold: float | None) -> str:
    return "none (full model)" if threshold is None else f"{threshold} at every exit"
