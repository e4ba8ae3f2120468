"""The engine `dync.load` returns: a package, a backend, and the early-exit executor between them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dync.errors import InputError
from dync.inputs import Inputs, batch_of, random_inputs
from dync.package import Manifest, TensorSpec, at_precision, default_precision, live_state, load_manifest
from dync.runtime.backends import Backend, backend_form, make_backend
from dync.runtime.exit_rule import ExitCriteria, resolve_thresholds


@dataclass
class RunResult:
    """`exit[i]` is the index of the exit sample i took. When the exits share a per-sample shape, `logits[i]` is
    that exit's output for sample i; otherwise `per_exit[k]` holds exit k's output in the rows of the samples
    that took it (zeros elsewhere), and `output(k)` reads those rows whatever the shapes."""

    exit: np.ndarray
    merged: np.ndarray | None = None
    per_exit: list[np.ndarray] | None = None

    @property
    def logits(self) -> np.ndarray:
        if self.merged is None:
            raise InputError("this package's exits have different per-sample shapes, so there is no single logits "
                             "array; read result.output(k) or result.per_exit[k] where result.exit == k.")
        return self.merged

    def output(self, k: int) -> np.ndarray:
        """Exit k's outputs for the samples that took it, in input order."""
        source = self.merged if self.merged is not None else self.per_exit[k]
        return source[self.exit == k]

    def arrays(self) -> dict[str, np.ndarray]:
        """What `dync run` saves: `logits` and `exit`; or, with per-sample shapes that differ, `exit` and per exit
        k `exit{k}` with its mask `exit{k}_taken`."""
        if self.merged is not None:
            return {"logits": self.merged, "exit": self.exit}
        per_exit = {f"exit{k}": out for k, out in enumerate(self.per_exit)}
        taken = {f"exit{k}_taken": self.exit == k for k in range(len(self.per_exit))}
        return {"exit": self.exit, **per_exit, **taken}


class Engine:
    """A package loaded to run at one precision: `manifest` is the package's as that precision runs it
    (`dync.package.at_precision`), so its stage graphs and thresholds are that precision's."""

    def __init__(self, package_dir: Path, manifest: Manifest, backend: Backend, precision: str = "fp32") -> None:
        self.package_dir = package_dir
        self.manifest = manifest
        self.backend = backend
        self.precision = precision
        self.criteria = ExitCriteria(package_dir, manifest.exits)
        self._live_after = live_state(manifest)
        shapes = {tuple(e.shape[1:]) for e in manifest.exits if e.shape is not None}
        self._one_exit_shape = len(shapes) <= 1

    @classmethod
    def load(cls, package: str | Path, backend: str = "ort", precision: str | None = None,
             **backend_options: Any) -> Engine:
        """`precision` fp32, int8 or fp8 (and fp16 on TensorRT); None runs what the package holds
        (`dync.package.default_precision`), or on TensorRT what was last built (`dync build`, a Jetson bundle)."""
        package_dir = Path(package)
        stored = load_manifest(package_dir)
        if precision is None and backend == "trt":  # engines exist at the precision they were built in
            from dync.build import last_built_precision

            precision = last_built_precision(package_dir)
        precision = precision or default_precision(stored)
        if precision == "fp16" and backend != "trt":
            raise InputError("fp16 runs on TensorRT engines only (dync build --precision fp16, then --backend trt); "
                             "onnxruntime runs fp32, int8 or fp8.")
        manifest = at_precision(stored, precision, form=backend_form(backend, backend_options))
        return cls(package_dir, manifest, make_backend(backend, package_dir, manifest, precision, **backend_options),
                   precision)

    @property
    def profile_name(self) -> str:
        """The name latency profiles of this backend at this precision are stored under."""
        return self.backend.name if self.precision == "fp32" else f"{self.backend.name}-{self.precision}"

    @property
    def num_exits(self) -> int:
        return len(self.manifest.stages)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.manifest.inputs]

    def run(self, *inputs: Inputs | Sequence[float] | None, thresholds: Sequence[float] | None = None) -> RunResult:
        """Run a batch: `run(x)`, `run(x, t, y)` in the package's input order, or `run({"x": ..., "t": ...})`;
        without thresholds the package's are used, and without those every sample runs to the last exit. One
        positional argument after the inputs is taken as the thresholds."""
        feeds, thresholds = self._feeds_and_thresholds(inputs, thresholds)
        self.check_feeds(feeds)
        if thresholds is None:
            thresholds = self.manifest.thresholds
        result = self.execute(feeds, resolve_thresholds(thresholds, self.num_exits))
        self._check_finite(result)
        return result

    def _check_finite(self, result: RunResult) -> None:
        """Finite inputs can still overflow float32 inside a model; such a run fails instead of returning NaN.
        One pass over the outputs; the exit and sample are looked up only when something is not finite."""
        arrays = [result.merged] if result.merged is not None else result.per_exit
        if all(a.dtype.kind != "f" or np.isfinite(a).all() for a in arrays):
            return
        for k in range(self.num_exits):
            out = result.output(k)
            if out.dtype.kind != "f" or not out.size:
                continue
            bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
            if bad.any():
                sample = int(np.nonzero(result.exit == k)[0][np.argmax(bad)])
                raise InputError(
                    f"package '{self.manifest.name}' computed non-finite values at exit {k} for sample {sample} "
                    "from finite inputs (they overflow float32 inside the model); scale the inputs as the model "
                    "expects them."
                )

    def execute(
        self, x: Inputs, thresholds: np.ndarray, observe: Callable[[int, dict[str, np.ndarray]], None] | None = None
    ) -> RunResult:
        """The executor, on checked input: stage by stage, exits leave, the rest of the batch is compacted (every
        input a later stage reads is compacted with the carried state).

        The backend runs it as one call where it can (`Backend.run_executor`); `observe(k, state)`, if given,
        sees the state held when stage k starts (profiling replays it), so it needs the stage-by-stage loop.
        """
        state = self.input_feeds(x)
        batch = batch_of(state)
        whole = None if observe is not None or self.num_exits == 1 else self.backend.run_executor(state, thresholds)
        if whole is not None:
            merged, exits = whole
            return RunResult(exit=exits, merged=merged)
        if self.num_exits == 1 and observe is None:  # nothing to decide: one call, no bookkeeping
            stage = self.manifest.stages[0]
            logits = self.backend.run(stage, {name: state[name] for name in stage.reads})[stage.exit.output]
            return RunResult(exit=np.zeros(batch, dtype=np.int64), merged=logits)
        running = np.arange(batch)
        collected = _Collected(batch, self.manifest, self._one_exit_shape)
        exits = np.full(batch, -1, dtype=np.int64)
        last = self.num_exits - 1
        for k, stage in enumerate(self.manifest.stages):
            if observe is not None:
                observe(k, state)
            outputs = self.backend.run(stage, {name: state[name] for name in stage.reads})
            state.update((name, outputs[name]) for name in stage.writes)
            exit_logits = outputs[stage.exit.output]
            leave = (
                np.ones(len(running), dtype=bool)
                if k == last
                else self.criteria.confidence(k, exit_logits) >= thresholds[k]
            )
            collected.put(k, running[leave], exit_logits[leave])
            exits[running[leave]] = k
            if leave.all():
                break
            state = {name: value for name, value in state.items() if name in self._live_after[k]}
            if leave.any():
                keep = ~leave
                running = running[keep]
                state = {name: value[keep] for name, value in state.items()}
        assert (exits >= 0).all()
        return collected.result(exits)

    def input_feeds(self, x: Inputs) -> dict[str, np.ndarray]:
        """The batch by input name, as the first stage and `backend.run_static` take it: an array is the one
        input of a one-input package, a mapping is taken as it is."""
        if isinstance(x, Mapping):
            return dict(x)
        if len(self.manifest.inputs) != 1:
            raise InputError(f"package '{self.manifest.name}' takes {len(self.manifest.inputs)} inputs "
                             f"({', '.join(self.input_names)}); pass them in that order or as a dict keyed by name.")
        return {self.manifest.inputs[0].name: x}

    def example_input(self, batch: int, seed: int = 0) -> Inputs:
        """Random data of the package's inputs (see `dync.inputs.random_inputs`), for verification and
        benchmarks: an array for a one-input package, a dict by name otherwise."""
        feeds = random_inputs(self.manifest.inputs, batch, seed)
        return next(iter(feeds.values())) if len(feeds) == 1 else feeds

    def check_input(self, x: Inputs) -> None:
        self.check_feeds(self.input_feeds(x))

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Every package input present, of its dtype and per-sample shape, all sharing a batch, and finite."""
        names = self.input_names
        if sorted(feeds) != sorted(names):
            raise InputError(f"package '{self.manifest.name}' takes the inputs {names}, but got {sorted(feeds)}; "
                             "key the arrays by those names.")
        for spec in self.manifest.inputs:
            _check_array(self.manifest.name, spec, feeds[spec.name], len(names) > 1)
        batches = {name: feeds[name].shape[0] for name in names}
        if len(set(batches.values())) != 1:
            raise InputError(f"the inputs of package '{self.manifest.name}' must share the batch, but their first "
                             f"axes are {batches}; give every input the same number of samples.")

    def _feeds_and_thresholds(self, args: tuple, thresholds: Sequence[float] | None
                              ) -> tuple[dict[str, np.ndarray], Sequence[float] | None]:
        count = len(self.manifest.inputs)
        if len(args) in (1, 2) and isinstance(args[0], Mapping):
            feeds, rest = dict(args[0]), args[1:]
        elif len(args) in (count, count + 1):
            feeds, rest = dict(zip(self.input_names, args[:count], strict=True)), args[count:]
        else:
            raise InputError(f"package '{self.manifest.name}' takes {count} input(s) ({', '.join(self.input_names)}) "
                             f"but run got {len(args)} arguments; pass the inputs in that order or as a dict.")
        if rest and thresholds is not None:
            raise InputError("thresholds were given both positionally and by keyword; give them once.")
        return feeds, (rest[0] if rest else thresholds)


def _check_array(package: str, spec: TensorSpec, x: Any, named: bool) -> None:
    what = f"input '{spec.name}'" if named else "input"
    expected = tuple(spec.shape[1:])
    if not isinstance(x, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(x).__name__}.")
    if x.dtype != np.dtype(spec.dtype):
        raise InputError(
            f"{what} has dtype {x.dtype} but package '{package}' expects {spec.dtype}; "
            f"convert it with x.astype(np.{spec.dtype})."
        )
    if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
        raise InputError(
            f"{what} has shape {list(x.shape)} but package '{package}' expects "
            f"[batch, {', '.join(map(str, expected))}] with batch >= 1; reshape the data to match."
        )
    with np.errstate(over="ignore"):  # NaN/inf propagate into the sum; an overflow only means the full check below
        finite_sum = x.dtype.kind != "f" or np.isfinite(x.sum())
    if finite_sum:
        return
    bad = ~np.isfinite(x)
    if bad.any():
        samples = np.unique(np.nonzero(bad.reshape(x.shape[0], -1))[0])
        raise InputError(
            f"{what} has {int(bad.sum())} NaN/inf values in {len(samples)} sample(s) (first: sample "
            f"{int(samples[0])}); clean or drop those samples before running."
        )


class _Collected:
    """Exit outputs scattered back to input order: one array when the exits share a per-sample shape, else one
    per exit (an exit no sample reached stays zeros, of the shape the manifest gives it)."""

    def __init__(self, batch: int, manifest: Manifest, one_shape: bool) -> None:
        self.batch, self.manifest, self.one_shape = batch, manifest, one_shape
        self.arrays: dict[int, np.ndarray] = {}

    def put(self, k: int, rows: np.ndarray, values: np.ndarray) -> None:
        key = 0 if self.one_shape else k
        if key not in self.arrays:
            self.arrays[key] = np.zeros((self.batch, *values.shape[1:]), dtype=values.dtype)
        self.arrays[key][rows] = values

    def result(self, exits: np.ndarray) -> RunResult:
        if self.one_shape:
            return RunResult(exit=exits, merged=self.arrays[0])
        per_exit = [self.arrays.get(k, np.zeros((self.batch, *e.shape[1:]), dtype=np.float32))
                    for k, e in enumerate(self.manifest.exits)]
        return RunResult(exit=exits, per_exit=per_exit)
