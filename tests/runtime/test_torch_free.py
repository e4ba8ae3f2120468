"""`dync.load(pkg).run(x)` works where torch (and triton, tensorrt) cannot be imported, and gives exactly what
it gives with torch present.

Each package kind (multi-exit, spatial gather-scatter as standard ONNX and as `dync::` plugin nodes,
per-sample conv, token dispatch, a user exit criterion's ONNX graph) is exported once per module, then run in
a subprocess whose import system refuses those modules, at batch 5 and batch 1 (the fixed-shape sessions are
per batch size), and compared with the same runs here: same onnxruntime graphs, same input, so logits and exits
must be bitwise equal. A refused import fails the subprocess with a ModuleNotFoundError naming the chain of
modules that asked for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dync
from dync.runtime.engine import Engine
from tests.helpers import eager_outputs, spread_thresholds
from tests.models import TINY_SHAPE, tiny_model
from zoo import random_input
from zoo.arc import ARC_ZOO
from zoo.multi_exit import ZOO
from zoo.spatial import SPATIAL_ZOO, force_masks
from zoo.tokens import TOKENS_ZOO, set_kept_fraction

REPO = Path(__file__).resolve().parents[2]
REFUSED = ("torch", "triton", "tensorrt")
BATCHES = (5, 1)

HOOK = f'''
import sys

class _Refuse:
    """A meta-path finder refusing {REFUSED} and their submodules, as if they were not installed."""

    refused = {REFUSED!r}

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if not any(name == top or name.startswith(top + ".") for top in cls.refused):
            return None
        chain, frame = [], sys._getframe(1)
        while frame is not None:  # innermost first; one entry per run of frames in the same module
            module = frame.f_globals.get("__name__", "?")
            internal = frame.f_code.co_filename.startswith("<frozen") or module.startswith("importlib")
            if not internal and (not chain or chain[-1][0] != module):
                chain.append((module, frame.f_lineno))
            frame = frame.f_back
        via = " -> ".join(f"{{module}}:{{line}}" for module, line in reversed(chain))
        raise ModuleNotFoundError(f"No module named {{name!r}} (refused: torch-free process); via {{via}}", name=name)

assert not [m for m in sys.modules if m.split(".")[0] in _Refuse.refused], "imported before the hook"
sys.meta_path.insert(0, _Refuse)
'''
"""Prepended to every snippet: from here on, importing a refused module raises ModuleNotFoundError."""

RUN = """
import json
import numpy as np
import dync

package, jobs, out = sys.argv[1:4]
engine = dync.load(package)
results = {}
for i, job in enumerate(json.loads(open(jobs).read())):
    r = engine.run(np.load(job["x"]), thresholds=job["thresholds"])
    results[f"logits_{i}"], results[f"exit_{i}"] = r.logits, r.exit
np.savez(out, **results)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "tensorrt"))))
"""
"""argv: package, a JSON list of {"x": .npy path, "thresholds": list or null}, the .npz to write."""


def run_without_torch(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `code` (after HOOK) in a fresh interpreter, in the repo root, with the repo on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", HOOK + code, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=timeout)


def test_hook_refuses_torch_triton_tensorrt_and_nothing_else() -> None:
    code = """
import importlib, json
import numpy, onnx, onnxruntime
refused = {}
for name in ("torch", "torch.nn", "triton", "triton.language", "tensorrt", "tensorrt.plugin"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        refused[name] = [error.name, str(error)]
print(json.dumps(refused))
"""
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    refused = json.loads(result.stdout.splitlines()[-1])
    assert sorted(refused) == sorted(["torch", "torch.nn", "triton", "triton.language", "tensorrt", "tensorrt.plugin"])
    for name, (missing, message) in refused.items():
        assert missing == name.split(".")[0] and "refused" in message and "via __main__:" in message, (name, message)


@dataclass
class Case:
    """One exported package and the model it came from (for thresholds that spread samples over exits)."""

    kind: str
    model: torch.nn.Module
    package: Path
    sample_shape: tuple[int, ...]


def _msdnet() -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]:
    factory, shape = ZOO["msdnet"]
    torch.manual_seed(0)
    return factory().eval(), shape, {}


def _lasnet() -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]:
    factory, shape = SPATIAL_ZOO["lasnet_cifar"]
    torch.manual_seed(0)
    model = factory()
    force_masks(model, 0.4, per_sample=True)
    return model, shape, {"spatial_crossover": 1.0}  # lowered everywhere, nothing measured


def _lasnet_plugins() -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]:
    model, shape, options = _lasnet()
    return model, shape, {**options, "ops": "plugins"}  # dync:: gather/scatter nodes, decomposed by onnxruntime


def _arc() -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]:
    factory, shape = ARC_ZOO["arc_conv"]
    torch.manual_seed(0)
    return factory(), shape, {}


def _dyt() -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]:
    factory, shape = TOKENS_ZOO["dyt_tiny"]
    torch.manual_seed(0)
    model = factory()
    set_kept_fraction(model, 0.4, torch.from_numpy(random_input(shape[1:], 3, seed=3)))
    return model.eval(), shape, {}


def _custom_criterion() -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]:
    return tiny_model(), TINY_SHAPE, {"criterion": "tests.criteria_fixture:top1_minus_mean"}


KINDS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...], dict[str, Any]]]] = {
    "multi_exit-msdnet": _msdnet,
    "spatial-lasnet_cifar": _lasnet,
    "spatial_plugins-lasnet_cifar": _lasnet_plugins,
    "per_sample_conv-arc_conv": _arc,
    "tokens-dyt_tiny": _dyt,
    "custom_criterion-tiny": _custom_criterion,
}
"""kind -> (model, example input shape, export options)."""


@pytest.fixture(scope="module", params=list(KINDS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    model, shape, options = KINDS[request.param]()
    out = tmp_path_factory.mktemp("torch_free") / f"{request.param}.dync"
    package = Path(dync.export(model, out, input_shape=shape, **options))
    return Case(request.param, model, package, tuple(shape[1:]))


def _jobs(case: Case, engine: Engine, tmp_path: Path) -> list[dict[str, Any]]:
    """Batch 5 then batch 1, each without thresholds and, for several exits, with thresholds spreading the
    samples over the exits (by the package's criterion on eager outputs)."""
    jobs = []
    for batch in BATCHES:
        x = random_input(case.sample_shape, batch, seed=batch)
        np.save(tmp_path / f"x{batch}.npy", x)
        jobs.append({"x": str(tmp_path / f"x{batch}.npy"), "thresholds": None})
        if engine.num_exits > 1:
            confidences = engine.criteria.confidences(eager_outputs(case.model, x))
            jobs.append({"x": jobs[-1]["x"], "thresholds": spread_thresholds(confidences).thresholds})
    return jobs


def test_runs_without_torch_and_equals_the_run_with_torch(case: Case, tmp_path: Path) -> None:
    engine = dync.load(case.package)
    jobs = _jobs(case, engine, tmp_path)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = run_without_torch(RUN, str(case.package), str(tmp_path / "jobs.json"), str(tmp_path / "out.npz"))
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ModuleNotFoundError")]
        tail = "\n".join(result.stderr.splitlines()[-30:])
        pytest.fail(f"{case.kind}: dync.load(pkg).run(x) failed without torch: {errors[-1] if errors else ''}\n"
                    f"{tail}", pytrace=False)
    assert json.loads(result.stdout.splitlines()[-1]) == [], f"{case.kind}: imported {result.stdout}"
    without = np.load(tmp_path / "out.npz")
    exits_seen = set()
    for i, job in enumerate(jobs):
        expected = engine.run(np.load(job["x"]), thresholds=job["thresholds"])
        what = f"{case.kind}, batch {len(expected.exit)}, thresholds {job['thresholds']}"
        np.testing.assert_array_equal(without[f"exit_{i}"], expected.exit, err_msg=what)
        np.testing.assert_array_equal(without[f"logits_{i}"], expected.logits, err_msg=what)
        exits_seen.update(expected.exit.tolist())
    if engine.num_exits > 1:
        assert len(exits_seen) > 1, f"{case.kind}: the spread thresholds sent every sample to one exit"
