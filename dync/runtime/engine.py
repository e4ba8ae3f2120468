"""The engine `dync.load` returns: a package, a backend, and the early-exit executor between them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dync.errors import InputError
from dync.package import Manifest, load_manifest
from dync.runtime.backends import Backend, make_backend
from dync.runtime.exit_rule import confidence, resolve_thresholds


@dataclass
class RunResult:
    """`logits[i]` is the output of the exit sample i took; `exit[i]` is that exit's index."""

    logits: np.ndarray
    exit: np.ndarray


class Engine:
    def __init__(self, package_dir: Path, manifest: Manifest, backend: Backend) -> None:
        self.package_dir = package_dir
        self.manifest = manifest
        self.backend = backend
        self._live_after = _live_state(manifest)

    @classmethod
    def load(cls, package: str | Path, backend: str = "ort", **backend_options: Any) -> Engine:
        package_dir = Path(package)
        manifest = load_manifest(package_dir)
        return cls(package_dir, manifest, make_backend(backend, package_dir, manifest, **backend_options))

    @property
    def num_exits(self) -> int:
        return len(self.manifest.stages)

    def run(self, x: np.ndarray, thresholds: Sequence[float] | None = None) -> RunResult:
        """Run a batch; without thresholds the package's are used, and without those every sample runs to
        the last exit."""
        self.check_input(x)
        if thresholds is None:
            thresholds = self.manifest.thresholds
        return self.execute(x, resolve_thresholds(thresholds, self.num_exits))

    def execute(
        self, x: np.ndarray, thresholds: np.ndarray, observe: Callable[[int, dict[str, np.ndarray]], None] | None = None
    ) -> RunResult:
        """The executor, on checked input: stage by stage, exits leave, the rest of the batch is compacted.

        `observe(k, state)`, if given, sees the state held when stage k starts (profiling replays it).
        """
        batch = x.shape[0]
        state = self.input_feeds(x)
        if self.num_exits == 1 and observe is None:  # nothing to decide: one call, no bookkeeping
            stage = self.manifest.stages[0]
            logits = self.backend.run(stage, {name: state[name] for name in stage.reads})[stage.exit.output]
            return RunResult(logits=logits, exit=np.zeros(batch, dtype=np.int64))
        running = np.arange(batch)
        logits: np.ndarray | None = None
        exits = np.full(batch, -1, dtype=np.int64)
        last = self.num_exits - 1
        for k, stage in enumerate(self.manifest.stages):
            if observe is not None:
                observe(k, state)
            outputs = self.backend.run(stage, {name: state[name] for name in stage.reads})
            state.update((name, outputs[name]) for name in stage.writes)
            exit_logits = outputs[stage.exit.output]
            if logits is None:
                logits = np.empty((batch, *exit_logits.shape[1:]), dtype=exit_logits.dtype)
            leave = (
                np.ones(len(running), dtype=bool)
                if k == last
                else confidence(stage.exit.criterion, exit_logits) >= thresholds[k]
            )
            logits[running[leave]] = exit_logits[leave]
            exits[running[leave]] = k
            if leave.all():
                break
            state = {name: value for name, value in state.items() if name in self._live_after[k]}
            if leave.any():
                keep = ~leave
                running = running[keep]
                state = {name: value[keep] for name, value in state.items()}
        assert logits is not None and (exits >= 0).all()
        return RunResult(logits=logits, exit=exits)

    def input_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """`x` under the package input's name, as the first stage and `backend.run_static` take it."""
        return {self.manifest.inputs[0].name: x}

    def example_input(self, batch: int, seed: int = 0) -> np.ndarray:
        """Standard-normal data of the package's input shape, for verification and benchmarks."""
        spec = self.manifest.inputs[0]
        rng = np.random.default_rng(seed)
        return rng.standard_normal((batch, *spec.shape[1:])).astype(spec.dtype)

    def check_input(self, x: np.ndarray) -> None:
        spec = self.manifest.inputs[0]
        expected = tuple(spec.shape[1:])
        if not isinstance(x, np.ndarray):
            raise InputError(f"input must be a numpy array, got {type(x).__name__}.")
        if x.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"input has dtype {x.dtype} but package '{self.manifest.name}' expects {spec.dtype}; "
                f"convert it with x.astype(np.{spec.dtype})."
            )
        if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
            raise InputError(
                f"input has shape {list(x.shape)} but package '{self.manifest.name}' expects "
                f"[batch, {', '.join(map(str, expected))}] with batch >= 1; reshape the data to match."
            )
        if np.isfinite(x.sum()):  # NaN/inf propagate into the sum; an overflow only means the full check below
            return
        bad = ~np.isfinite(x)
        if bad.any():
            samples = np.unique(np.nonzero(bad.reshape(x.shape[0], -1))[0])
            raise InputError(
                f"input has {int(bad.sum())} NaN/inf values in {len(samples)} sample(s) (first: sample "
                f"{int(samples[0])}); clean or drop those samples before running."
            )


def _live_state(manifest: Manifest) -> list[set[str]]:
    """After stage k, only tensors a later stage reads are kept (and compacted)."""
    live = []
    for k in range(len(manifest.stages)):
        live.append({name for stage in manifest.stages[k + 1 :] for name in stage.reads})
    return live
