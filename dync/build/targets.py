"""What a TensorRT version or a JetPack release can build: plugins or decompositions, and which precisions.

Engines are built on the machine that runs them, so every decision here is keyed by the TensorRT version the
target has (its `tensorrt.__version__`, or the one a JetPack release ships) and, for fp8, by the GPU's compute
capability. The tables are small and transcribed by hand; a version outside them is refused with the line to
change rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dync.errors import InputError

BUILD_PRECISIONS = ("fp32", "fp16", "int8", "fp8")
"""What an engine can be built in: the package's float32 stages (fp16: converted at build time), or the
TensorRT-form Q/DQ stages `dync quantize` wrote (int8, fp8)."""
PLUGIN_MODES = ("aot", "decomposed")
"""aot: `dync::` nodes with a TensorRT face run as `tensorrt.plugin` plugins (AOT Triton kernels); decomposed:
every `dync::` node is replaced by its portable decomposition."""

MIN_TENSORRT = (10, 3)
"""The oldest TensorRT dync builds for (JetPack 6.1's): strongly typed networks and opset 19 Q/DQ parse there."""
AOT_PLUGINS_SINCE = (10, 9)
"""`tensorrt.plugin`'s ahead-of-time implementations (`@trtp.aot_impl`), which embed the Triton kernel in the
engine so that running it needs no Python, arrived in TensorRT 10.9."""
FP8_SINCE_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and later; Ampere, including Jetson Orin (8.7), has none."""


@dataclass(frozen=True, order=True)
class TensorRTVersion:
    """A TensorRT version as `tensorrt.__version__` spells it ("10.3.0.26"); `text` is kept whole for cache keys."""

    parts: tuple[int, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> TensorRTVersion:
        if not re.fullmatch(r"\d+(\.\d+){1,3}", text.strip()):
            raise InputError(f"'{text}' is not a TensorRT version; give it as tensorrt.__version__ prints it, "
                             "e.g. 10.3.0 or 10.9.0.34.")
        return cls(tuple(int(p) for p in text.strip().split(".")), text.strip())

    @property
    def major_minor(self) -> tuple[int, int]:
        return self.parts[0], self.parts[1]

    @property
    def has_aot_plugins(self) -> bool:
        return self.major_minor >= AOT_PLUGINS_SINCE

    def check_supported(self) -> None:
        if self.major_minor < MIN_TENSORRT:
            raise InputError(f"TensorRT {self.text} is older than dync supports (10.3 or later: strongly typed "
                             "networks and opset-19 Q/DQ); upgrade TensorRT (JetPack 6.1 or later on Jetson).")

    def __str__(self) -> str:
        return self.text


def check_build_precision(precision: str | None) -> None:
    """A precision an engine can be built in (None: the package's own, resolved later)."""
    if precision is not None and precision not in BUILD_PRECISIONS:
        raise InputError(f"precision '{precision}' is unknown; choose one of {', '.join(BUILD_PRECISIONS)}.")


def check_plugin_mode(requested: str | None) -> None:
    """A plugin mode a build knows (None: chosen by the TensorRT version)."""
    if requested is not None and requested not in PLUGIN_MODES:
        raise InputError(f"plugin mode '{requested}' is unknown; choose one of {', '.join(PLUGIN_MODES)}.")


def plugin_mode(version: TensorRTVersion, requested: str | None) -> str:
    """The plugin mode a build for `version` uses: as requested, or aot where the version has AOT plugins.
    Asking for aot on an older TensorRT is refused, since its parser would find no plugin for the nodes."""
    check_plugin_mode(requested)
    if requested == "aot" and not version.has_aot_plugins:
        raise InputError(f"TensorRT {version} has no tensorrt.plugin AOT implementations (10.9 or later); build "
                         "with --plugins decomposed, which runs dync's ops as standard ONNX.")
    return requested or ("aot" if version.has_aot_plugins else "decomposed")


def check_precision_on_gpu(precision: str, compute_capability: tuple[int, int], gpu: str) -> None:
    """fp8 engines need FP8 tensor cores; TensorRT would otherwise fail late, deep inside the build."""
    check_build_precision(precision)
    if precision == "fp8" and compute_capability < FP8_SINCE_CAPABILITY:
        major, minor = compute_capability
        raise InputError(f"{gpu} (compute capability {major}.{minor}) has no FP8 tensor cores (8.9 or later: "
                         "Ada, Hopper, Blackwell); build with --precision int8 or fp16 instead.")


@dataclass(frozen=True)
class JetPack:
    """One JetPack release: the TensorRT and CUDA it ships and the Jetson modules it runs on, with their compute
    capabilities."""

    version: str
    tensorrt: str
    cuda: str
    devices: dict[str, tuple[int, int]]

    @property
    def tensorrt_version(self) -> TensorRTVersion:
        return TensorRTVersion.parse(self.tensorrt)


ORIN = (8, 7)
THOR = (11, 0)
JETPACKS = {
    "6.1": JetPack("6.1", "10.3", "12.6", {"orin": ORIN}),
    "6.2": JetPack("6.2", "10.3", "12.6", {"orin": ORIN}),
    "7.2": JetPack("7.2", "11.4", "13.0", {"orin": ORIN, "thor": THOR}),
}
"""The releases dync writes bundles for, as NVIDIA's JetPack release notes list them."""
REFUSED_JETPACKS = {
    "5": "JetPack 5 ships TensorRT 8.5, older than the 10.3 dync needs; upgrade the device to JetPack 6.1 or later",
    "6.0": "JetPack 6.0 ships TensorRT 8.6, older than the 10.3 dync needs; upgrade the device to JetPack 6.1 or later",
}


def jetpack(version: str, device: str, precision: str) -> JetPack:
    """The release a bundle targets, after the gates: a known release, a module it runs on, a precision that
    module's GPU has."""
    release = JETPACKS.get(version)
    if release is None:
        refusal = REFUSED_JETPACKS.get(version) or REFUSED_JETPACKS.get(version.split(".")[0])
        if refusal is not None:
            raise InputError(f"{refusal}.")
        raise InputError(f"JetPack {version} is not one dync has a TensorRT record of; use one of "
                         f"{', '.join(JETPACKS)}, or build on the device with dync build PKG --target trt.")
    if device not in release.devices:
        raise InputError(f"JetPack {version} runs on {', '.join(release.devices)}, not {device}; pick one of "
                         "those with --device.")
    check_precision_on_gpu(precision, release.devices[device], f"Jetson {device.capitalize()}")
    return release
