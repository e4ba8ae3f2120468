"""Per-stage latency profiles of a package on one backend, and latency prediction that accounts for compaction.

Early exit saves FLOPs, but what a deployment budgets is time: a stage has a fixed cost per call that does
not shrink with the batch, and compaction copies the carried state. So calibration needs the time of every
stage at every batch size the executor can hand it, measured once on the target machine and stored in the
package (`calib/profile_<backend>.json`). From it, the time of one `engine.execute` call follows from the
exits its samples take: stage k runs on the samples whose exit is >= k, and after each exit the state live
for later stages is indexed down to the samples still running.

The profile holds, per batch size b:
- `seconds[k][i]`: one `backend.run` of stage k on b = batch_sizes[i] samples;
- `compaction[k][i]`: indexing the state live after stage k down to b samples (k < K-1);
- `overhead[i]`: the executor's own time for a batch of b running every stage (confidences, bookkeeping,
  caches colder or warmer than in isolation), measured as `execute` forced to the last exit minus the stage
  times, charged as an equal share per stage that runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dync.errors import InputError, PackageError, ProfileError
from dync.inputs import Inputs
from dync.package import file_record, load_manifest, write_manifest, write_package_file
from dync.runtime.engine import Engine
from dync.runtime.exit_rule import forcing_thresholds

PROFILE_FORMAT = "dync-latency-profile"
PROFILE_VERSION = 1
CALIB_DIR = "calib"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Progress = Callable[[str], None]


@dataclass(eq=False)
class LatencyProfile:
    """Measured seconds per stage call, per compaction and of executor overhead, at each batch size."""

    backend: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    batch_sizes: list[int]
    seconds: np.ndarray
    """[K, len(batch_sizes)]: one stage call on that many samples."""
    overhead: np.ndarray
    """[len(batch_sizes)]: executor time beyond the stage calls when every sample runs every stage."""
    compaction: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """[K-1, len(batch_sizes)]: indexing the state live after stage k down to that many samples."""
    created: str = ""

    def __post_init__(self) -> None:
        """Check every table against the batch sizes; ProfileError names the field that is wrong."""
        self.batch_sizes = [int(b) for b in self.batch_sizes]
        sizes = np.asarray(self.batch_sizes)
        if sizes.ndim != 1 or sizes.size == 0 or sizes[0] < 1 or (np.diff(sizes) <= 0).any():
            raise ProfileError(f"batch_sizes {self.batch_sizes} are not positive and strictly increasing")
        width = sizes.size
        self.seconds = _table(self.seconds, (-1, width), "seconds")
        if self.seconds.shape[0] < 1:
            raise ProfileError("seconds lists no stages, expected one row per stage")
        self.overhead = _table(self.overhead, (width,), "overhead")
        if np.size(self.compaction) == 0:
            self.compaction = np.zeros((self.num_stages - 1, width))
        self.compaction = _table(self.compaction, (self.num_stages - 1, width), "compaction")
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    @property
    def num_stages(self) -> int:
        return int(self.seconds.shape[0])

    def stage_seconds(self, k: int, n: int) -> float:
        """Predicted time of stage k on n samples (0 for n == 0)."""
        return float(_interp(np.asarray(n), self.batch_sizes, self.seconds[k]))

    def predict_batch_seconds(self, exits: np.ndarray) -> float:
        """Predicted time of one `engine.execute` call on a batch whose samples take exits `exits`."""
        exits = np.asarray(exits)
        if exits.size == 0:
            return 0.0
        if exits.ndim != 1 or not np.issubdtype(exits.dtype, np.integer):
            raise InputError(f"exits must be a 1-d integer array, got dtype {exits.dtype} and shape {exits.shape}.")
        if exits.min() < 0 or exits.max() >= self.num_stages:
            raise InputError(f"exits must lie in 0..{self.num_stages - 1} for a {self.num_stages}-stage profile.")
        return self.predict_batches_seconds(np.bincount(exits, minlength=self.num_stages)[None])

    def predict_batches_seconds(self, counts: np.ndarray) -> float:
        """The summed predicted time of calls on batches whose exit counts are the rows of `counts` [batches,
        stages]: `predict_batch_seconds` of many batches at once (threshold searches ask thousands of times)."""
        running = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # running[b, k]: samples of batch b that run stage k
        return float(self._stage_costs(running).sum() + self._compaction_costs(running).sum())

    def predict_full_seconds(self, batch: int) -> float:
        """Predicted time of `engine.execute` on `batch` samples that all run to the last exit."""
        return self.predict_batch_seconds(np.full(batch, self.num_stages - 1, dtype=np.int64))

    def _stage_costs(self, running: np.ndarray) -> np.ndarray:
        """Each stage's call plus its share of the executor overhead, on running[..., k] samples (0 when none)."""
        share = _interp(running, self.batch_sizes, self.overhead) / self.num_stages
        seconds = np.broadcast_to(self.seconds, (*running.shape[:-1], *self.seconds.shape))
        return _interp(running, self.batch_sizes, seconds) + share

    def _compaction_costs(self, running: np.ndarray) -> np.ndarray:
        """After stage k the live state is indexed down only when some samples left and some go on."""
        kept = running[..., 1:]
        compacts = (kept > 0) & (kept < running[..., :-1])
        compaction = np.broadcast_to(self.compaction, (*kept.shape[:-1], *self.compaction.shape))
        return np.where(compacts, _interp(kept, self.batch_sizes, compaction), 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "format_version": PROFILE_VERSION,
            "backend": self.backend,
            "settings": self.settings,
            "machine": self.machine,
            "created": self.created,
            "batch_sizes": self.batch_sizes,
            "seconds": self.seconds.tolist(),
            "overhead": self.overhead.tolist(),
            "compaction": self.compaction.tolist(),
        }

    @classmethod
    def from_json(cls, raw: Any) -> LatencyProfile:
        """Parse `to_json`'s output; raises ProfileError naming the field that is wrong."""
        if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"it has no 'format': '{PROFILE_FORMAT}'")
        if raw.get("format_version") != PROFILE_VERSION:
            raise ProfileError(f"format_version {raw.get('format_version')!r} is not {PROFILE_VERSION}, the one this "
                               "dync reads")
        return cls(
            backend=_field(raw, "backend", str),
            settings=_field(raw, "settings", dict),
            machine=_field(raw, "machine", dict),
            batch_sizes=_field(raw, "batch_sizes", _integers),
            seconds=_field(raw, "seconds", _floats),
            overhead=_field(raw, "overhead", _floats),
            compaction=_field(raw, "compaction", _floats, default=[]),
            created=_field(raw, "created", str, default=""),
        )


def _field(raw: dict[str, Any], name: str, convert: Callable[[Any], Any], default: Any = None) -> Any:
    """`convert(raw[name])`; a field without a default must be present. ProfileError names the field that is
    missing or does not convert."""
    if name not in raw and default is None:
        raise ProfileError(f"field '{name}' is missing")
    try:
        return convert(raw.get(name, default))
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"field '{name}' is malformed ({exc})") from exc


def _integers(values: Any) -> list[int]:
    return [int(v) for v in values]


def _floats(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _table(values: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A finite, non-negative float array of the given shape (-1: any length on that axis); ProfileError
    names the field otherwise."""
    try:
        array = np.asarray(values, dtype=np.float64)
        if array.size == 0 and -1 not in shape:
            array = array.reshape(shape)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{name} is not a numeric table ({exc})") from exc
    if array.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, array.shape, strict=True)):
        raise ProfileError(f"{name} has shape {list(array.shape)}, expected {list(shape)} (-1: any)")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ProfileError(f"{name} holds negative or non-finite seconds, expected finite times >= 0")
    return array


def _interp(n: np.ndarray, sizes: Sequence[int], values: np.ndarray) -> np.ndarray:
    """values[..., i] measured at sizes[i], read at n (one count per row): piecewise-linear between measured
    sizes; 0 at n == 0; below the smallest size its value (a call is mostly fixed cost there); beyond the
    largest, the last two points' per-sample slope (never negative, so noise cannot predict a cheaper call)."""
    xs = np.asarray(sizes, dtype=np.float64)
    ys = np.asarray(values, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    t = np.maximum(n, xs[0])
    if xs.size == 1:
        value = ys[..., 0] * t / xs[0]
    else:
        i = np.clip(np.searchsorted(xs, t, side="right") - 1, 0, xs.size - 2)
        y0 = np.take_along_axis(ys, i[..., None], axis=-1)[..., 0] if ys.ndim > 1 else ys[i]
        y1 = np.take_along_axis(ys, i[..., None] + 1, axis=-1)[..., 0] if ys.ndim > 1 else ys[i + 1]
        slope = (y1 - y0) / (xs[i + 1] - xs[i])
        beyond = y1 + np.maximum(slope, 0.0) * (t - xs[i + 1])
        value = np.where(t > xs[-1], beyond, y0 + slope * (t - xs[i]))
    return np.where(n <= 0, 0.0, value)


def machine_info() -> dict[str, Any]:
    """Enough to tell whether a stored profile was measured on this kind of machine."""
    return {
        "processor": platform.processor(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
    }


def _run_uncompacted(engine: Engine, x: Inputs) -> tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]]:
    """Each stage's feeds for input x, and the state the executor holds after each stage, from one run
    in which every sample runs every stage."""
    held: list[dict[str, np.ndarray]] = []
    last = forcing_thresholds(engine.num_exits - 1, engine.num_exits)
    engine.execute(x, last, observe=lambda k, state: held.append(dict(state)))
    feeds = [{name: held[k][name] for name in stage.reads} for k, stage in enumerate(engine.manifest.stages)]
    return feeds, [list(state.values()) for state in held[1:]]


def _batch_variants(engine: Engine, batch: int) -> dict[str, Callable[[], object]]:
    """The timed calls at one batch size, in the order the executor makes them: stage k, then the compaction
    of the state live after it (indexing every sample, as many as a compaction down to `batch` copies), and
    last a full `execute` in which every sample runs every stage."""
    stages = engine.manifest.stages
    x = engine.example_input(batch)
    feeds, live = _run_uncompacted(engine, x)
    keep = np.ones(batch, dtype=bool)
    last = forcing_thresholds(engine.num_exits - 1, engine.num_exits)
    variants: dict[str, Callable[[], object]] = {}
    for k, stage in enumerate(stages):
        variants[f"stage{k}"] = lambda stage=stage, f=feeds[k]: engine.backend.run(stage, f)
        if k < len(stages) - 1:
            variants[f"compact{k}"] = lambda tensors=live[k]: [t[keep] for t in tensors]
    variants["execute"] = lambda: engine.execute(x, last)
    return variants


def _time_rounds(variants: dict[str, Callable[[], object]], rounds: int, into: dict[str, list[float]]) -> None:
    """Append one sample per variant per round, calling them in the executor's order (the raw samples, so
    passes can be pooled). Call by call is right here, unlike between a package and another session: the
    stages share one thread pool, as they do when the executor runs them."""
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            into.setdefault(name, []).append(time.perf_counter() - start)


def profile_stages(
    engine: Engine,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 10,
    progress: Progress | None = None,
    warmup: int = 2,
    min_seconds: float = 1.0,
    passes: int = 3,
) -> LatencyProfile:
    """Measure every stage, compaction and the executor overhead at each batch size on the engine's backend.

    At one batch size, stage calls, compactions and a full `execute` are timed in interleaved rounds after
    warm-up, in the executor's order. Only one batch size's state is held at a time (it can be large), so the
    batch sizes are visited in `passes` alternating sweeps and the samples pooled: a change of load on a
    shared machine then lands on every batch size instead of skewing the ones measured during it. Each batch
    size gets at least `repeats` rounds and at least `min_seconds` of rounds in all, so a short burst of other
    work cannot fill a small batch's whole window. The overhead is the median over rounds of `execute` minus
    the stage calls of the same round.
    """
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1 or repeats < 1 or passes < 1:
        raise InputError(
            f"profiling needs batch sizes >= 1, repeats >= 1 and passes >= 1; got {list(batch_sizes)}, "
            f"{repeats} and {passes}."
        )
    num_stages = engine.num_exits
    samples: dict[int, dict[str, list[float]]] = {b: {} for b in sizes}
    rounds: dict[int, int] = {}
    for p in range(passes):
        for batch in sizes if p % 2 == 0 else sizes[::-1]:
            if progress is not None:
                progress(f"profiling {num_stages} stages at batch {batch} (pass {p + 1}/{passes})")
            variants = _batch_variants(engine, batch)
            for _ in range(warmup):
                for fn in variants.values():
                    fn()
            start = time.perf_counter()
            _time_rounds(variants, 1, samples[batch])
            one_round = time.perf_counter() - start
            if batch not in rounds:
                total = max(repeats, math.ceil(min_seconds / max(one_round, 1e-9)))
                rounds[batch] = math.ceil(total / passes)
            _time_rounds(variants, rounds[batch], samples[batch])
    table = {b: {name: np.asarray(v) for name, v in samples[b].items()} for b in sizes}
    seconds = np.array([[np.median(table[b][f"stage{k}"]) for b in sizes] for k in range(num_stages)])
    compaction = np.array([[np.median(table[b][f"compact{k}"]) for b in sizes] for k in range(num_stages - 1)])
    overhead = np.array(
        [np.median(table[b]["execute"] - sum(table[b][f"stage{k}"] for k in range(num_stages))) for b in sizes]
    )
    settings = engine.backend.describe()
    return LatencyProfile(
        backend=engine.profile_name,
        settings=settings,
        machine=machine_info(),
        batch_sizes=sizes,
        seconds=seconds,
        overhead=np.maximum(overhead, 0.0),
        compaction=compaction.reshape(num_stages - 1, len(sizes)),
    )


def profile_path(package_dir: str | Path, backend: str) -> Path:
    return Path(package_dir) / CALIB_DIR / f"profile_{backend}.json"


def save_profile(package_dir: str | Path, profile: LatencyProfile) -> Path:
    """Store the profile inside the package, so that it travels with the package it was measured for."""
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise PackageError(f"{package_dir} is not a dync package directory; create one with `dync export`.")
    path = profile_path(package_dir, profile.backend)
    path.parent.mkdir(exist_ok=True)
    write_package_file(package_dir, path.relative_to(package_dir).as_posix(),
                       json.dumps(profile.to_json(), indent=2) + "\n")
    manifest = load_manifest(package_dir)
    manifest.files[path.relative_to(package_dir).as_posix()] = file_record(path)
    write_manifest(package_dir, manifest)
    return path


def load_profile(package_dir: str | Path, backend: str = "ort") -> LatencyProfile:
    """The package's stored profile for `backend`; missing, corrupt or stale profiles fail with a ProfileError
    naming the file and what to do."""
    manifest = load_manifest(package_dir)
    path = profile_path(package_dir, backend)
    rerun = f"run `dync profile {package_dir}`"
    if not path.is_file():
        raise ProfileError(f"package {package_dir} has no latency profile for backend {backend}; {rerun} first.")
    try:
        profile = LatencyProfile.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ProfileError) as exc:
        raise ProfileError(f"{path} is not a valid latency profile ({exc}); {rerun} again.") from exc
    if profile.num_stages != len(manifest.stages):
        raise ProfileError(
            f"{path} profiles {profile.num_stages} stages but package {package_dir} has {len(manifest.stages)}; "
            f"{rerun} again."
        )
    return profile
