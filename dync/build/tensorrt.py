"""TensorRT through Polygraphy's loaders: the target's identity, engine builds, and runners.

Everything here imports tensorrt only when called: Polygraphy's loaders are lazy (constructing
`NetworkFromOnnxBytes`, `CreateConfig` or `EngineBytesFromNetwork` imports nothing; calling them builds), so a
machine without TensorRT can plan a build, compute its cache keys and test the orchestration with another
`Toolchain`.

TensorRT APIs used, and the pages they were written from:
- `tensorrt.__version__` (the version cache keys hold);
- Polygraphy `NetworkFromOnnxBytes(..., strongly_typed=True)`, `CreateConfig(profiles=, load_timing_cache=)`,
  `Profile.add(name, min, opt, max)`, `EngineBytesFromNetwork(network, config, save_timing_cache=)`,
  `EngineFromBytes`, `TrtRunner` (Polygraphy's API reference, polygraphy/backend/trt);
- `tensorrt.plugin.register` / `aot_impl` through each op's `tensorrt` face (the `tensorrt.plugin` reference);
- CUDA runtime `cudaGetDevice`, `cudaDeviceGetAttribute` (cudaDevAttrComputeCapabilityMajor = 75, Minor = 76)
  and `cudaGetDeviceProperties_v2` (whose first field is the device name), through Polygraphy's cudart wrapper.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

from dync.build.keys import Gpu
from dync.build.profiles import StageProfile
from dync.build.targets import TensorRTVersion
from dync.errors import InstallError
from dync.extras import require
from dync.plugins.op_registry import registry

if TYPE_CHECKING:
    from dync.build import StagePlan

_COMPUTE_CAPABILITY_MAJOR = 75
_COMPUTE_CAPABILITY_MINOR = 76


class Runner(Protocol):
    """What runs one engine: Polygraphy's runner interface (`TrtRunner`, or any runner of the same shape)."""

    def activate(self) -> None: ...

    def infer(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None: ...


@dataclass(frozen=True)
class Toolchain:
    """How engines are identified, built and run: TensorRT through Polygraphy (`POLYGRAPHY_TENSORRT`) by
    default; tests substitute a stand-in that builds nothing and runs the stage graphs on onnxruntime."""

    name: str
    identify: Callable[[], tuple[TensorRTVersion, Gpu]]
    build: Callable[[onnx.ModelProto, StageProfile, set[str], Path], bytes]
    """(stage as TensorRT parses it, its profile, the plugin ops it keeps, the timing cache) -> serialized engine."""
    runner: Callable[[bytes, StagePlan], Runner]
    """(serialized engine, the plan it was built from) -> a runner, not yet activated."""


def require_tensorrt() -> Any:
    """tensorrt, or one line saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise InstallError("building or running TensorRT engines needs TensorRT's Python package, which is not "
                           "installed: pip install \"dync[trt]\" on a server GPU, or use JetPack's TensorRT on "
                           "Jetson (a venv made with --system-site-packages sees it).") from None
    return tensorrt


def identify_target() -> tuple[TensorRTVersion, Gpu]:
    """This machine's TensorRT version and its current CUDA device."""
    tensorrt = require_tensorrt()
    require("polygraphy", "build", "dync's TensorRT builds and backend")
    from polygraphy import cuda

    cudart = cuda.wrapper().handle
    device = ctypes.c_int()
    cuda.wrapper().check(cudart.cudaGetDevice(ctypes.byref(device)))
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.wrapper().check(cudart.cudaDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, device))
    cuda.wrapper().check(cudart.cudaDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, device))
    properties = ctypes.create_string_buffer(4096)  # cudaDeviceProp is ~1 KiB; its first field is char name[256]
    cuda.wrapper().check(_device_properties_call(cudart)(properties, device))
    name = properties.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
    return TensorRTVersion.parse(tensorrt.__version__), Gpu(name, (major.value, minor.value))


def _device_properties_call(cudart: ctypes.CDLL) -> Callable[..., int]:
    """The symbol CUDA 12 and later headers map cudaGetDeviceProperties to (`_v2`), else the plain one."""
    try:
        return cudart.cudaGetDeviceProperties_v2
    except AttributeError:
        return cudart.cudaGetDeviceProperties


def register_plugins(ops: set[str]) -> None:
    """Load the `tensorrt.plugin` registrations of the plugin ops a stage keeps, before it is parsed."""
    for op in sorted(ops):
        registry().get(op).face("tensorrt")()


def network_loader(model: onnx.ModelProto) -> Any:
    """Polygraphy's ONNX parser loader, strongly typed: the graph's types are the engine's precision."""
    from polygraphy.backend.trt import NetworkFromOnnxBytes

    return NetworkFromOnnxBytes(model.SerializeToString(), strongly_typed=True)


def config_loader(profile: StageProfile, timing_cache: Path) -> Any:
    """One optimization profile (every input's min/opt/max shapes) and the shared timing cache; no precision
    flags, which strongly typed networks refuse."""
    from polygraphy.backend.trt import CreateConfig, Profile

    shapes = Profile()
    for name, (low, opt, high) in profile.shapes.items():
        shapes.add(name, low, opt, high)
    return CreateConfig(profiles=[shapes], load_timing_cache=str(timing_cache) if timing_cache.exists() else None)


def engine_bytes_loader(model: onnx.ModelProto, profile: StageProfile, timing_cache: Path) -> Any:
    """The lazy build: calling the returned loader parses, builds and serializes, and updates the timing cache."""
    from polygraphy.backend.trt import EngineBytesFromNetwork

    return EngineBytesFromNetwork(network_loader(model), config_loader(profile, timing_cache),
                                  save_timing_cache=str(timing_cache))


def build_engine(model: onnx.ModelProto, profile: StageProfile, plugins: set[str], timing_cache: Path) -> bytes:
    require_tensorrt()
    require("polygraphy", "build", "dync's TensorRT builds and backend")
    register_plugins(plugins)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    return bytes(engine_bytes_loader(model, profile, timing_cache)())


def engine_runner(plan_bytes: bytes, _plan: StagePlan) -> Runner:
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(plan_bytes))


POLYGRAPHY_TENSORRT = Toolchain("tensorrt", identify_target, build_engine, engine_runner)
