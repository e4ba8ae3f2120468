"""`dync build`: TensorRT engines per stage, cached in the package, and Jetson bundles built on the device.

A build is planned on any machine (`plan_engines`: each stage in the form TensorRT parses, its optimization
profile and its cache key) and carried out where TensorRT and the GPU are (`build_engines`, or the TensorRT
backend on first load). Modules: `targets` (what a TensorRT version or JetPack can build), `profiles`
(batch ranges per stage), `forms` (plugins kept or decomposed, fp16), `keys` (cache keys), `cache` (the
`engines/` directory), `tensorrt` (Polygraphy's loaders and runners), `jetson` (the bundle for trtexec).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import onnx

from dync.build.bundle_record import read_bundle
from dync.build.cache import BuildRecord, EngineCache
from dync.build.forms import plugins_kept, stage_for_tensorrt
from dync.build.keys import EngineKey, Gpu, engine_key
from dync.build.profiles import DEFAULT_BATCH, BatchRange, StageProfile, stage_profiles
from dync.build.targets import TensorRTVersion, check_precision_on_gpu, plugin_mode
from dync.build.tensorrt import POLYGRAPHY_TENSORRT, Toolchain
from dync.package import Manifest, at_precision, file_sha256, load_manifest, write_atomically
from dync.records import CalibrationRecord

BUILD_DEFAULTS = "defaults.json"
"""`engines/defaults.json`: the batch range and plugin mode of the last build per precision."""
LAST_BUILT = "last"
STATIC = "static"
"""The name the static full model's engine (the baseline `bench` runs) is cached under."""


@dataclass(frozen=True)
class EngineOptions:
    """What an engine build is asked for; shared by `dync build` and the TensorRT backend."""

    batch: BatchRange = field(default_factory=lambda: BatchRange.parse(DEFAULT_BATCH))
    precision: str = "fp32"
    plugins: str | None = None
    """aot or decomposed; None: aot where the TensorRT version has AOT plugins."""
    timing_cache: Path | None = None
    """None: the package's `engines/timing.cache`."""


@dataclass(frozen=True)
class StagePlan:
    """One engine to build or load: the stage, its profile, the plugins it keeps and its cache key; `model`, the
    stage as TensorRT parses it, is made only when asked for (a build), not for an engine in the cache."""

    stage: str
    source: onnx.ModelProto
    profile: StageProfile
    plugins: set[str]
    key: EngineKey

    @cached_property
    def model(self) -> onnx.ModelProto:
        return stage_for_tensorrt(self.source, plugins=self.key.plugins, precision=self.key.precision)


def tensorrt_manifest(package_dir: Path, precision: str) -> tuple[Manifest, CalibrationRecord | None]:
    """The manifest with the stages TensorRT builds at `precision` (int8/fp8: `dync quantize`'s TensorRT form),
    and the calibration whose exit counts scale the later stages' opt batch."""
    stored = load_manifest(package_dir)
    manifest = at_precision(stored, precision, form="trt")
    quantized = stored.quantization if precision in ("int8", "fp8") else None
    calibration = quantized.calibration if quantized is not None and quantized.calibration else stored.calibration
    return manifest, calibration


def plan_engines(package_dir: Path, options: EngineOptions, tensorrt: TensorRTVersion, gpu: Gpu
                 ) -> tuple[Manifest, list[StagePlan]]:
    """Every stage's engine for this TensorRT and GPU, checked against what they can build."""
    tensorrt.check_supported()
    check_precision_on_gpu(options.precision, gpu.compute_capability, gpu.name)
    mode = plugin_mode(tensorrt, options.plugins)
    manifest, calibration = tensorrt_manifest(package_dir, options.precision)
    plans = []
    for stage, profile in zip(manifest.stages, stage_profiles(manifest, options.batch, calibration), strict=True):
        plans.append(_plan(stage.name, onnx.load(Path(package_dir) / stage.onnx),
                           file_sha256(package_dir, manifest, stage.onnx), profile, mode, options, tensorrt, gpu))
    return manifest, plans


def plan_static(package_dir: Path, manifest: Manifest, options: EngineOptions, tensorrt: TensorRTVersion,
                gpu: Gpu) -> StagePlan:
    """The static full model's engine (every stage merged back), for baselines, tuned at the request's batch."""
    from dync.runtime.static import merged_static_model

    model = merged_static_model(package_dir, manifest)
    profile = stage_profiles(_as_one_stage(manifest), options.batch)[0]
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    return _plan(STATIC, model, digest, profile, plugin_mode(tensorrt, options.plugins), options, tensorrt, gpu)


def _as_one_stage(manifest: Manifest) -> Manifest:
    """A manifest whose one stage reads the package inputs, for the static model's profile."""
    first = replace(manifest.stages[0], name=STATIC, reads=[t.name for t in manifest.inputs])
    return replace(manifest, stages=[first])


def _plan(name: str, model: onnx.ModelProto, sha256: str, profile: StageProfile, mode: str, options: EngineOptions,
          tensorrt: TensorRTVersion, gpu: Gpu) -> StagePlan:
    kept = plugins_kept(model, mode)
    key = engine_key(sha256, profile, tensorrt=tensorrt, gpu=gpu, precision=options.precision, plugins=mode,
                     kept_plugins=kept)
    return StagePlan(name, model, profile, kept, key)


def engine_for(plan: StagePlan, package_dir: Path, toolchain: Toolchain, timing_cache: Path,
               progress: Callable[[str], None]) -> tuple[bytes, str]:
    """The plan's engine and where it came from: the package's cache ("cache"), the engine a bundle's build.sh
    wrote from this very stage ("bundle", then cached), or built now ("built", then cached)."""
    cache = EngineCache(package_dir)
    plan_bytes = cache.load(plan.key)
    if plan_bytes is not None:
        return plan_bytes, "cache"
    adopted = bundle_engine(package_dir, plan)
    if adopted is not None:
        progress(f"taking stage '{plan.stage}''s engine from the bundle's build.sh into the engine cache")
        cache.store(plan.key, adopted, "trtexec (build.sh)", 0.0)
        return adopted, "bundle"
    progress(f"building the TensorRT engine of stage '{plan.stage}' ({plan.key.precision}, batch "
             f"{plan.profile.batch}, plugins {plan.key.plugins}); once per GPU, TensorRT version and stage")
    start = time.perf_counter()
    plan_bytes = toolchain.build(plan.model, plan.profile, plan.plugins, timing_cache)
    cache.store(plan.key, plan_bytes, toolchain.name, time.perf_counter() - start)
    return plan_bytes, "built"


def bundle_engine(package_dir: Path, plan: StagePlan) -> bytes | None:
    """The engine build.sh wrote for this stage, when the bundle made it from the same stage file at the same
    precision, plugin mode and profile (TensorRT refuses it later if another TensorRT or GPU built it)."""
    bundle = read_bundle(package_dir)
    if bundle is None or (bundle.precision, bundle.plugins) != (plan.key.precision, plan.key.plugins):
        return None
    for entry in bundle.stages:
        if entry.stage == plan.stage and entry.source_sha256 == plan.key.stage_sha256 \
                and entry.profile == plan.profile.to_json():
            path = Path(package_dir) / entry.engine
            return path.read_bytes() if path.is_file() else None
    return None


def write_build_defaults(package_dir: Path, options: EngineOptions) -> None:
    """Remember the batch range and plugin mode of the last build per precision, so that loading the package
    on the TensorRT backend without them finds the engines built."""
    path = EngineCache(package_dir).root / BUILD_DEFAULTS
    defaults = _read_defaults(path)
    defaults[options.precision] = {"batch": str(options.batch), "plugins": options.plugins}
    defaults[LAST_BUILT] = options.precision
    write_atomically(path, json.dumps(defaults, indent=2) + "\n")


def build_defaults(package_dir: Path, precision: str) -> EngineOptions:
    """The options of the last `dync build` at `precision`, else those of the Jetson bundle the package is, else
    the defaults."""
    saved = _read_defaults(EngineCache(package_dir).root / BUILD_DEFAULTS).get(precision)
    if isinstance(saved, dict):
        return EngineOptions(batch=BatchRange.parse(str(saved.get("batch", DEFAULT_BATCH))), precision=precision,
                             plugins=saved.get("plugins"))
    bundle = read_bundle(package_dir)
    if bundle is not None and bundle.precision == precision and bundle.stages:
        return EngineOptions(batch=BatchRange.parse(str(bundle.stages[0].profile["batch"])), precision=precision,
                             plugins=bundle.plugins)
    return EngineOptions(precision=precision)


def last_built_precision(package_dir: Path) -> str | None:
    """The precision of the last `dync build` of the package, or of the bundle it is; None when neither."""
    last = _read_defaults(EngineCache(package_dir).root / BUILD_DEFAULTS).get(LAST_BUILT)
    if isinstance(last, str):
        return last
    bundle = read_bundle(package_dir)
    return bundle.precision if bundle is not None else None


def _read_defaults(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def build_engines(package_dir: Path, options: EngineOptions, progress: Callable[[str], None],
                  toolchain: Toolchain = POLYGRAPHY_TENSORRT) -> list[tuple[BuildRecord, str]]:
    """Every stage's engine in the package's cache, built where missing: (its record, where it came from)."""
    tensorrt, gpu = toolchain.identify()
    progress(f"TensorRT {tensorrt} on {gpu.name} (compute capability {gpu.capability_text})")
    _, plans = plan_engines(package_dir, options, tensorrt, gpu)
    cache = EngineCache(package_dir)
    timing_cache = options.timing_cache or cache.timing_cache
    done = []
    for plan in plans:
        _, source = engine_for(plan, package_dir, toolchain, timing_cache, progress)
        record = cache.record(plan.key)
        assert record is not None, f"engine of {plan.stage} was stored without its record"
        done.append((record, source))
    write_build_defaults(package_dir, options)
    return done


def format_builds(done: list[tuple[BuildRecord, str]]) -> str:
    """The table `dync build` prints: per stage its engine key, where it came from, build time and size."""
    lines = ["| stage | engine (engines/KEY) | precision | batch | from | build s | MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for record, source in done:
        key = record.key
        lines.append(f"| {key.stage} | {record.digest} | {key.precision} | {key.profile['batch']} | {source} | "
                     f"{record.seconds:.1f} | {record.engine_bytes / 2**20:.1f} |")
    return "\n".join(lines)

