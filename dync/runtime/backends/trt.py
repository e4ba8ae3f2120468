"""TensorRT backend: one engine per stage from the package's engine cache (built on first load when missing),
one execution context per stage through Polygraphy's `TrtRunner`, input shapes set on every call.

The executor, its exit rule and batch compaction are the engine's (`dync.runtime.engine`), as for every
backend; carried state goes back to host memory between stages, where the executor compacts it. A batch over
the engines' profile maximum runs in slices of that maximum. The engines, their cache keys and the stage forms
come from `dync.build`; how they are identified, built and run is a `Toolchain`, Polygraphy on TensorRT unless
another is given (the tests give one that runs the stage graphs on onnxruntime).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dync.build import (
    EngineOptions,
    StagePlan,
    build_defaults,
    engine_for,
    plan_engines,
    plan_static,
)
from dync.build.cache import EngineCache
from dync.build.profiles import BatchRange
from dync.build.tensorrt import POLYGRAPHY_TENSORRT, Runner, Toolchain
from dync.errors import InputError
from dync.package import Manifest, StageSpec
from dync.runtime.backends.kernels import KernelTime


class TrtBackend:
    """The `Backend` on TensorRT engines."""

    name = "trt"

    def __init__(self, package_dir: Path, manifest: Manifest, precision: str = "fp32", *,
                 batch: str | BatchRange | None = None, plugins: str | None = None, timing_cache: str | None = None,
                 toolchain: Toolchain = POLYGRAPHY_TENSORRT, progress: Callable[[str], None] | None = None) -> None:
        """`batch` MIN:OPT:MAX and `plugins` default to those of the last `dync build` at this precision."""
        self._package_dir = Path(package_dir)
        self._manifest = manifest
        self._toolchain = toolchain
        self._progress = progress or (lambda _message: None)
        defaults = build_defaults(self._package_dir, precision)
        self.options = EngineOptions(
            batch=BatchRange.parse(batch) if isinstance(batch, str) else (batch or defaults.batch),
            precision=precision, plugins=plugins or defaults.plugins,
            timing_cache=Path(timing_cache) if timing_cache else None)
        self._tensorrt, self._gpu = toolchain.identify()
        _, plans = plan_engines(self._package_dir, self.options, self._tensorrt, self._gpu)
        self._runners = {plan.stage: self._runner(plan) for plan in plans}
        self._plans = {plan.stage: plan for plan in plans}
        self._static: Runner | None = None

    def _runner(self, plan: StagePlan) -> Runner:
        timing_cache = self.options.timing_cache or EngineCache(self._package_dir).timing_cache
        plan_bytes, _ = engine_for(plan, self._package_dir, self._toolchain, timing_cache, self._progress)
        runner = self._toolchain.runner(plan_bytes, plan)
        runner.activate()
        return runner

    def run(self, stage: StageSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._infer(self._runners[stage.name], feeds)

    def run_static(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._static is None:
            self._static = self._runner(plan_static(self._package_dir, self._manifest, self.options,
                                                    self._tensorrt, self._gpu))
        outputs = self._infer(self._static, feeds)
        return [outputs[exit_spec.output] for exit_spec in self._manifest.exits]

    def run_executor(self, feeds: dict[str, np.ndarray], thresholds: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        return None  # stage by stage: the exit decisions and compaction run on the host between engines

    def _infer(self, runner: Runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One runner call per slice of at most the profile's max batch; outputs copied out of the runner's
        buffers, which its next call overwrites."""
        batch = len(next(iter(feeds.values())))
        step = self.options.batch.max
        slices = [runner.infer({name: value[start:start + step] for name, value in feeds.items()})
                  for start in range(0, batch, step)]
        if len(slices) == 1:
            return {name: np.array(value, copy=True) for name, value in slices[0].items()}
        return {name: np.concatenate([part[name] for part in slices]) for name in slices[0]}

    def kernel_times(self) -> list[KernelTime]:
        raise InputError("per-op times (bench --profile) come from onnxruntime's profiler; use --backend ort for "
                         "them, or trtexec --dumpProfile on the engines for TensorRT's layer times.")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "toolchain": self._toolchain.name, "tensorrt": str(self._tensorrt),
                "gpu": self._gpu.name, "compute_capability": self._gpu.capability_text,
                "precision": self.options.precision, "batch": str(self.options.batch),
                "plugins": {plan.stage: sorted(plan.plugins) for plan in self._plans.values()},
                "engines": {plan.stage: plan.key.digest for plan in self._plans.values()}}

    def __del__(self) -> None:
        """Release the execution contexts and their device memory (Polygraphy warns about runners left active)."""
        runners = list(getattr(self, "_runners", {}).values())  # a constructor that failed has set none
        static = getattr(self, "_static", None)
        for runner in [*runners, *([static] if static is not None else [])]:
            runner.deactivate()
