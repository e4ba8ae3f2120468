"""`bundle.json`: what a Jetson bundle's `build.sh` builds, so that the TensorRT backend on the device can take
the engines trtexec wrote into the package's engine cache.

A bundle is a dync package (its manifest and stages, copied) plus, per stage, the graph in the form the
target's TensorRT parses (`tensorrt/<stage>.onnx`), the engine trtexec writes from it, and the stage file it
was made from (`source_sha256`). The backend adopts an engine only when that source is the stage it would build
and the precision, plugin mode and profile are the ones it was asked for; TensorRT itself refuses a plan
built by another TensorRT version or for another GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dync.errors import PackageError
from dync.records import RecordError, from_json

BUNDLE_FILE = "bundle.json"


@dataclass(frozen=True)
class BundleStage:
    """One stage of a bundle: `onnx` (the TensorRT form, relative to the bundle) is built by build.sh into
    `engine`; `source_sha256` is the SHA-256 of the package stage file it was made from; `profile` is
    `StageProfile.to_json()`."""

    stage: str
    onnx: str
    onnx_sha256: str
    engine: str
    source_sha256: str
    profile: dict


@dataclass(frozen=True)
class BundleRecord:
    """A Jetson bundle: the JetPack and module it targets, the TensorRT version that JetPack ships, the
    precision and plugin mode of every stage, and the stages."""

    jetpack: str
    device: str
    tensorrt: str
    precision: str
    plugins: str
    stages: list[BundleStage]
    created: str


def read_bundle(package_dir: Path) -> BundleRecord | None:
    """The bundle record of `package_dir`, None for a package that is not a bundle."""
    path = Path(package_dir) / BUNDLE_FILE
    if not path.exists():
        return None
    try:
        return from_json(BundleRecord, json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, RecordError, OSError) as exc:
        raise PackageError(f"{path} is not a readable bundle record ({exc}); write the bundle again with "
                           "dync build PKG --target jetson.") from exc
