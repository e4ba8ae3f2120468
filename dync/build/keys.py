"""Engine cache keys: everything an engine depends on, hashed, so that a stale engine is never reused.

onnxruntime's TensorRT provider keys its engine cache on the graph without its weights, so a retrained model
with the same architecture silently reuses the old engine. dync's key holds the stage file's SHA-256 (weights
included: stages hold them inline), the full TensorRT version, the GPU's name and compute capability, the
optimization profile, the precision, the plugin mode with a hash of each kept plugin's implementation (its
TensorRT registration and Triton kernel sources, and Triton's version), and dync's version (which fixes how
the stage is decomposed or converted before parsing).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dync.build.profiles import StageProfile
from dync.build.targets import TensorRTVersion
from dync.plugins.op_registry import registry
from dync.version import __version__

KEY_LENGTH = 40
"""Hex digits of the SHA-256 kept: the engine directory's name."""


@dataclass(frozen=True)
class Gpu:
    """The device an engine is built for: its name and compute capability, as CUDA reports them."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def capability_text(self) -> str:
        return ".".join(map(str, self.compute_capability))


@dataclass(frozen=True)
class EngineKey:
    """The inputs of one engine build, in the form a build record stores them."""

    stage: str
    stage_sha256: str
    tensorrt: str
    gpu: str
    compute_capability: str
    profile: dict
    precision: str
    plugins: str
    plugin_hashes: dict[str, str]
    dync: str
    onnxruntime: str | None
    """onnxruntime's version where its float16 converter wrote the stage (fp16), else None."""

    @property
    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


def engine_key(stage_sha256: str, profile: StageProfile, *, tensorrt: TensorRTVersion, gpu: Gpu, precision: str,
               plugins: str, kept_plugins: set[str]) -> EngineKey:
    """The key of one stage's engine; `kept_plugins` are the `dync::` ops it runs as plugins."""
    converter = importlib.metadata.version("onnxruntime") if precision == "fp16" else None
    return EngineKey(stage=profile.stage, stage_sha256=stage_sha256, tensorrt=tensorrt.text, gpu=gpu.name,
                     compute_capability=gpu.capability_text, profile=profile.to_json(), precision=precision,
                     plugins=plugins, plugin_hashes={op: plugin_hash(op) for op in sorted(kept_plugins)},
                     dync=__version__, onnxruntime=converter)


def plugin_hash(op: str) -> str:
    """SHA-256 of what an op's TensorRT plugin is made of: its op package's shape function, registration and
    Triton kernel modules, and Triton's version (which compiles the kernel)."""
    record = registry().get(op)
    assert record.tensorrt is not None, f"{op} has no TensorRT plugin to hash"
    package = Path(registry_module_file(record.tensorrt.module)).parent
    digest = hashlib.sha256()
    for name in ("__init__.py", "trt.py", "kernels.py"):
        path = package / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    digest.update(_triton_version().encode())
    return digest.hexdigest()


def registry_module_file(module: str) -> str:
    """The file of a face's module, found without importing it (importing would load tensorrt)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"face module {module} is not importable"
    return spec.origin


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"
