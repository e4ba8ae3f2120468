"""Session-wide exports: every model is exported once and shared by all tests that need it.

Each zoo model is seeded, saved with `torch.save(model)` (so every export also goes through the pickle
loader) and exported from that file. The export is observed, not repeated: `capture`, `probe_graph` and
`partition` are wrapped while it runs, so partition tests check exactly the stages that were written.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter; set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's model files are pickles it wrote itself; tests/exporter/test_loading.py unsets this to check that
# a pickle is refused without the opt-in.
os.environ.setdefault("DYNC_TRUST_PICKLE", "1")

from click.testing import CliRunner, Result

import dync
import dync.exporter
from dync.cli import main
from dync.errors import SpatialLoweringWarning
from dync.exporter.capture import Captured
from dync.exporter.partition import Stage
from dync.exporter.probe import Probe
from dync.package import load_manifest
from dync.runtime.engine import Engine
from tests.models import TINY_SHAPE, tiny_model
from zoo.multi_exit import ZOO
from zoo.spatial import SPATIAL_ZOO, force_masks

# Eager PyTorch on these small models is 100x slower with two OpenMP threads than with one when the two cores
# are shared with other work (threads spin waiting for each other); references do not need the speed of two.
torch.set_num_threads(1)


@dataclass
class Exported:
    """One exported model with everything tests compare against."""

    name: str
    model: torch.nn.Module
    model_path: Path
    input_shape: tuple[int, ...]
    exits: tuple[int, ...] | None
    package: Path
    engine: Engine
    captured: Captured
    probe: Probe
    stages: list[Stage]

    def __repr__(self) -> str:
        return f"Exported({self.name!r}, exits={self.exits}, package={str(self.package)!r})"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.input_shape[1:]

    @property
    def num_exits(self) -> int:
        return self.engine.num_exits


def zoo_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]().eval()


class _Observer:
    """Records what the exporter's pipeline steps return during one export."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def observed(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            self.seen[key] = result
            return result

        return observed


class ExportCache:
    """Exports on first request, keyed by (zoo name, exit selection)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, tuple[int, ...] | None], Exported] = {}

    def get(self, name: str, exits: tuple[int, ...] | None = None) -> Exported:
        key = (name, exits)
        if key not in self._done:
            self._done[key] = self._export(name, exits)
        return self._done[key]

    def _export(self, name: str, exits: tuple[int, ...] | None) -> Exported:
        tag = name if exits is None else f"{name}_exits{'_'.join(map(str, exits))}"
        model = zoo_model(name)
        model_path = self.root / f"{tag}.pt"
        torch.save(model, model_path)
        input_shape = ZOO[name][1]
        observer = _Observer()
        with pytest.MonkeyPatch.context() as patch:
            for key in ("capture", "probe_graph", "partition"):
                patch.setattr(dync.exporter, key, observer.wrap(key, getattr(dync.exporter, key)))
            package = dync.export(
                model_path, self.root / f"{tag}.dync", input_shape=input_shape, exits=list(exits) if exits else None
            )
        assert set(observer.seen) == {"capture", "probe_graph", "partition"}, "the exporter's pipeline changed"
        return Exported(
            name=name,
            model=model,
            model_path=model_path,
            input_shape=tuple(input_shape),
            exits=exits,
            package=Path(package),
            engine=dync.load(package),
            captured=observer.seen["capture"],
            probe=observer.seen["probe_graph"],
            stages=observer.seen["partition"],
        )


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    return ExportCache(tmp_path_factory.mktemp("exports"))


@pytest.fixture(params=list(ZOO))
def zoo_export(request: pytest.FixtureRequest, exports: ExportCache) -> Exported:
    """Each zoo model in turn (exported once per session, whatever the test order)."""
    return exports.get(request.param)


@pytest.fixture
def msdnet(exports: ExportCache) -> Exported:
    return exports.get("msdnet")


@pytest.fixture
def msdnet_02(exports: ExportCache) -> Exported:
    """MSDNet with `exits=[0, 2]`."""
    return exports.get("msdnet", (0, 2))


@pytest.fixture
def single_exit(exports: ExportCache) -> Exported:
    return exports.get("single_exit")


@dataclass
class CliExport:
    """The tiny 3-exit model exported with `dync export` (the CLI's round trip starts here)."""

    result: Result
    model: torch.nn.Module
    model_path: Path
    package: Path
    root: Path


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="session")
def cli_export(tmp_path_factory: pytest.TempPathFactory) -> CliExport:
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model()
    model_path = root / "tiny.pt"
    torch.save(model, model_path)
    package = root / "tiny.dync"
    shape = "x".join(map(str, TINY_SHAPE))
    result = invoke(["export", model_path, "-o", package, "--input-shape", shape])
    return CliExport(result=result, model=model, model_path=model_path, package=package, root=root)


@pytest.fixture(scope="session")
def plugins_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LasNet's masked bottlenecks lowered as `dync::` gather/scatter nodes (`--ops plugins`)."""
    factory, shape = SPATIAL_ZOO["lasnet_cifar"]
    torch.manual_seed(0)
    model = factory()
    force_masks(model, 0.4, per_sample=True)
    out = tmp_path_factory.mktemp("plugins") / "lasnet_plugins.dync"
    with warnings.catch_warnings():  # the stride-2 blocks stay dense, as tests/exporter/test_spatial_pass.py checks
        warnings.simplefilter("ignore", SpatialLoweringWarning)
        package = Path(dync.export(model, out, input_shape=shape, spatial_crossover=1.0, ops="plugins"))
    assert load_manifest(package).custom_ops, "the plugin form wrote no dync:: op"
    return package
