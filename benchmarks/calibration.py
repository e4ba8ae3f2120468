"""Calibration quality: budgets held on held-out data, MAC counts, latency prediction.

Run from the repository root:  python -m benchmarks.calibration [--repeats 15]

1. Budget: the bundled digits model is calibrated on one half of its held-out split for budgets 0.3, 0.5
   and 0.7 of the full model (MACs, and predicted latency at batch 64), and the cost is measured on the other
   half. Goal: held-out cost within [0.85, 1.05] x budget.
2. Thresholds: on the digits model (labels), the zoo's 7-exit MSDNet-like model and the zoo's other
   early-exit models (random weights and inputs; accuracy is agreement with the last exit), thresholds
   searched on one half at budgets 0.2, 0.3, 0.5 and 0.7 (`dync.calib.search`), against the best uniform
   threshold and the best geometric setting found on the same half, all scored on the other half. Goal:
   dync never less accurate than either at equal or lower held-out cost, held-out cost within
   [0.85, 1.05] x budget.
3. MACs: the package's cumulative MACs of the full model against `torch.utils.flop_counter` on the eager
   forward (which counts 2 FLOPs per multiply-accumulate). Goal: within 10%.
4. Latency: the time `dync profile` predicts for a run (with compaction) against the measured median, at
   batch 1 and 64, all samples at the last exit and the batch split evenly over the exits. Goal: within 15%.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import dync
from dync.bench import spreading_thresholds
from dync.calib.budget import flops_cost
from dync.calib.calibrate import BudgetRequest, calibrate_package, exit_outputs, latency_cost
from dync.calib.profile import profile_stages, save_profile
from dync.calib.search import Evaluation, best_within, calibrate
from dync.demo import load_example
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds, resolve_thresholds
from dync.timing import median_times
from zoo.multi_exit import ZOO, msdnet_cifar7

BUDGETS = (0.3, 0.5, 0.7)
SEARCH_BUDGETS = (0.2, 0.3, 0.5, 0.7)
LATENCY_BATCHES = (1, 64)


def budget_rows(engine: Engine, x: np.ndarray, y: np.ndarray) -> list[str]:
    half = len(x) // 2
    rows = []
    for metric in ("flops", "latency"):
        measure = (flops_cost([e.cumulative_macs for e in engine.manifest.exits]) if metric == "flops"
                   else latency_cost(engine, 64))
        for budget in BUDGETS:
            result = calibrate_package(engine, x[:half], BudgetRequest(metric=metric, budget=budget), labels=y[:half])
            held_out = engine.run(x[half:])
            cost = measure(held_out.exit)
            accuracy = float((held_out.logits.argmax(axis=1) == y[half:]).mean())
            ok = "yes" if 0.85 * budget <= cost <= 1.05 * budget else "NO"
            rows.append(f"| {metric} | {budget} | {result.chosen.cost:.3f} | {cost:.3f} | {cost / budget:.2f} | "
                        f"{ok} | {accuracy:.1%} |")
    return rows


def _halves(engine: Engine, x: np.ndarray, y: np.ndarray | None) -> list[Evaluation]:
    """The search half and the held-out half as scored settings see them (labels, or agreement with the last
    exit)."""
    half = len(x) // 2
    cost_of = flops_cost([e.cumulative_macs for e in engine.manifest.exits])
    evaluations = []
    for part, labels in ((x[:half], None if y is None else y[:half]), (x[half:], None if y is None else y[half:])):
        outputs = exit_outputs(engine, engine.input_feeds(part))
        truth = outputs[-1].argmax(axis=-1) if labels is None else labels
        evaluations.append(Evaluation(engine.criteria.confidences(outputs),
                                      np.stack([o.argmax(axis=-1) == truth for o in outputs]), cost_of))
    return evaluations


def threshold_rows(name: str, engine: Engine, x: np.ndarray, y: np.ndarray | None) -> list[str]:
    search_half, held_out = _halves(engine, x, y)
    rows = []
    cheapest = search_half.cost_of(np.zeros(len(search_half.confidences[0]), dtype=np.int64))
    for budget in SEARCH_BUDGETS:
        if budget < cheapest:
            rows.append(f"| {name} | {budget} | below the cheapest cost, {cheapest:.3f} (every sample at exit 0) "
                        "| - | - | - | - | - |")
            continue
        result = calibrate(search_half.confidences, search_half.cost_of, budget, list(search_half.correct))
        picks = {"dync": result.chosen, "uniform": best_within(result.uniform, budget),
                 "geometric": best_within(result.curve, budget)}
        scored = {key: held_out.setting(s.thresholds, s.family) for key, s in picks.items()}
        dync_ = scored["dync"]
        dominated = any(o.accuracy > dync_.accuracy and o.cost <= dync_.cost
                        for key, o in scored.items() if key != "dync")
        within = 0.85 * budget <= dync_.cost <= 1.05 * budget
        cells = " | ".join(f"{scored[key].accuracy:.1%} @ {scored[key].cost:.3f}" for key in picks)
        rows.append(f"| {name} | {budget} | {cells} | {dync_.family} | {'no' if dominated else 'yes'} | "
                    f"{'yes' if within else 'NO'} |")
    return rows


def mac_rows(models: dict[str, tuple[torch.nn.Module, tuple[int, ...]]], work: Path) -> list[str]:
    rows = []
    for name, (model, shape) in models.items():
        package = dync.export(model, work / f"{name}.dync", input_shape=shape)
        macs = dync.load(package).manifest.full_macs
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, *shape[1:]))
        reference = counter.get_total_flops() / 2
        rows.append(f"| {name} | {macs / 1e6:.2f} | {reference / 1e6:.2f} | {macs / reference:.3f} |")
    return rows


def latency_rows(engine: Engine, repeats: int) -> list[str]:
    profile = profile_stages(engine, repeats=repeats)
    save_profile(engine.package_dir, profile)
    rows = []
    for batch in LATENCY_BATCHES:
        x = engine.example_input(batch, seed=batch)
        settings = {
            "all at last exit": forcing_thresholds(engine.num_exits - 1, engine.num_exits),
            "even split over exits": resolve_thresholds(spreading_thresholds(engine, x), engine.num_exits),
        }
        times = median_times({label: (lambda t=t, x=x: engine.execute(x, t)) for label, t in settings.items()},
                             repeats=repeats * (8 if batch == 1 else 1), warmup=3)
        for label, thresholds in settings.items():
            predicted = profile.predict_batch_seconds(engine.execute(x, thresholds).exit)
            ratio = predicted / times[label]
            ok = "yes" if abs(ratio - 1) <= 0.15 else "NO"
            rows.append(f"| {batch} | {label} | {ratio:.3f} | {ok} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    example = load_example()
    digits, (x, y) = example.load_pretrained(), example.load_test_split()
    torch.manual_seed(0)
    msdnet7 = msdnet_cifar7().eval()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        models = {"digits (example)": (digits, (16, *x.shape[1:])), "msdnet_cifar7": (msdnet7, (16, 3, 32, 32))}
        for name, (factory, shape) in ZOO.items():
            torch.manual_seed(0)
            models[f"zoo {name}"] = (factory().eval(), shape)
        print("MACs of the full model: package (ONNX count) against torch.utils.flop_counter / 2\n")
        print("| model | package MMACs | flop_counter MMACs | ratio |\n| --- | --- | --- | --- |")
        print("\n".join(mac_rows(models, work)))

        digits_engine = dync.load(work / "digits (example).dync")
        save_profile(digits_engine.package_dir, profile_stages(digits_engine, repeats=args.repeats))
        half = len(x) // 2
        print(f"\nBudgets on held-out digits (calibrated on {half}, measured on the other {len(x) - half}); "
              "latency cost predicted from the profile at batch 64\n")
        print("| metric | budget | calibrated cost | held-out cost | held-out / budget | in [0.85, 1.05] "
              "| held-out accuracy |\n| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(budget_rows(digits_engine, x, y)))

        print("\nThresholds searched on one half, scored on the other: held-out accuracy @ cost (x full MACs)\n")
        print("| model | budget | dync | best uniform | best geometric | dync's search | dync not dominated "
              "| dync cost in [0.85, 1.05] x budget |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        rows = threshold_rows("digits (example)", digits_engine, x, y)
        msdnet_engine = dync.load(work / "msdnet_cifar7.dync")
        rows += threshold_rows("msdnet_cifar7 (agreement)", msdnet_engine, msdnet_engine.example_input(2000, seed=5),
                               None)
        for name in ZOO:
            engine = dync.load(work / f"zoo {name}.dync")
            if engine.num_exits > 1:
                rows += threshold_rows(f"zoo {name} (agreement)", engine, engine.example_input(2000, seed=5), None)
        print("\n".join(rows))

        print("\nLatency predicted from the profile / measured median, msdnet_cifar7 (7 exits)\n")
        print("| batch | exits | predicted / measured | within 15% |\n| --- | --- | --- | --- |")
        print("\n".join(latency_rows(dync.load(work / "msdnet_cifar7.dync"), args.repeats)))


if __name__ == "__main__":
    main()
