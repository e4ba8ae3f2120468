"""`pip install dync` (no extras) runs packages: every runtime command works where torch, onnxscript,
matplotlib, polygraphy, triton and tensorrt cannot be imported, and the commands that need an extra fail with
one line naming it and the pip command.

Packages are exported here (the tiny 3-exit model through the CLI, and a spatial model as `dync::` plugin
nodes, whose run splices their decompositions), then used in subprocesses whose import system refuses those
modules from the start, as if the light install had left them out. Each refused import is also logged, so a
runtime command that tried one and recovered still fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dync
from dync.package import load_manifest
from tests.conftest import CliExport
from tests.helpers import copy_package
from tests.models import TINY_SHAPE
from zoo import random_input

REPO = Path(__file__).resolve().parents[1]
REFUSED = ("torch", "onnxscript", "matplotlib", "polygraphy", "triton", "tensorrt")
BATCH = 8

PRELUDE = f'''
import os
import sys

class _Refuse:
    """Refuses {REFUSED} and their submodules as if not installed; logs each name to $DYNC_REFUSED_LOG."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] not in {REFUSED!r}:
            return None
        with open(os.environ["DYNC_REFUSED_LOG"], "a") as log:
            log.write(name + "\\n")
        raise ModuleNotFoundError(f"No module named {{name!r}} (refused: light install)", name=name)

assert not [m for m in sys.modules if m.split(".")[0] in {REFUSED!r}], "imported before the hook"
sys.meta_path.insert(0, _Refuse)
'''
"""Prepended to every child's code: from here on, importing a refused module raises ModuleNotFoundError."""

CLI = "from dync.cli import main\nmain(args=sys.argv[1:], prog_name='dync')\n"

RUN_API = """
import numpy as np
import dync

package, x, out = sys.argv[1:4]
result = dync.load(package).run(np.load(x))
np.savez(out, logits=result.logits, exit=result.exit)
"""

EXPORT_API = """
import dync
from dync.errors import InstallError

try:
    dync.export(sys.argv[1], sys.argv[2], input_shape=(4, 3, 16, 16))
except InstallError as error:
    print(error)
"""


def light(code: str, *args: object, cwd: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `code` after PRELUDE in a fresh interpreter; the result and the module names it was refused."""
    log = cwd / "refused.log"
    log.unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "DYNC_REFUSED_LOG": str(log)}
    result = subprocess.run([sys.executable, "-c", PRELUDE + code, *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    return result, log.read_text().split() if log.exists() else []


def light_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`dync ARGS` without the extras; it must succeed without even trying to import a refused module."""
    result, refused = light(CLI, *args, cwd=cwd)
    assert result.returncode == 0, f"dync {' '.join(map(str, args))} failed:\n{result.stderr}"
    assert refused == [], f"dync {' '.join(map(str, args))} tried to import {refused}"
    return result


def assert_one_line_naming(result: subprocess.CompletedProcess[str], command: str, module: str, extra: str) -> None:
    """Exit status 1 and exactly one `error:` line naming the command, the module and the pip command."""
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {command} needs {module}, which the light install leaves out; install it with "
        f'pip install "dync[{extra}]"' + (" (and pin torch==2.13.0 for the CPU build)." if module == "torch" else ".")
    ], result.stderr


@pytest.fixture
def tiny(cli_export: CliExport, tmp_path: Path) -> Path:
    """A private copy of the CLI's tiny 3-exit package (calibrate, quantize and profile write into it)."""
    assert cli_export.result.exit_code == 0, cli_export.result.output
    return copy_package(cli_export.package, tmp_path / "tiny.dync")


def _input(package: Path, directory: Path, batch: int = BATCH) -> Path:
    sample_shape = [int(d) for d in load_manifest(package).inputs[0].shape[1:]]
    path = directory / f"x_{package.stem}.npy"
    np.save(path, random_input(sample_shape, batch, seed=1))
    return path


def test_the_hook_refuses_the_extras_and_not_the_runtime(tmp_path: Path) -> None:
    code = """
import importlib, json
import click, ml_dtypes, numpy, onnx, onnx_graphsurgeon, onnxruntime
refused = []
for name in ("torch", "torch.nn", "onnxscript", "matplotlib.pyplot", "polygraphy.backend.onnx", "triton"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        refused.append(name)
print(json.dumps(refused))
"""
    result, log = light(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["torch", "torch.nn", "onnxscript", "matplotlib.pyplot",
                                         "polygraphy.backend.onnx", "triton"]
    assert {name.split(".")[0] for name in log} == {"torch", "onnxscript", "matplotlib", "polygraphy", "triton"}


@pytest.mark.parametrize("kind", ["tiny", "plugins"])
def test_inspect_run_and_bench_without_the_extras(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    package = request.getfixturevalue("tiny" if kind == "tiny" else "plugins_package")
    x = _input(package, tmp_path)
    description = json.loads(light_cli("inspect", package, "--json", cwd=tmp_path).stdout)
    assert len(description["stages"]) == len(load_manifest(package).stages)
    light_cli("run", package, "--input", x, "-o", tmp_path / "out.npz", cwd=tmp_path)
    expected = dync.load(package, threads=0, fixed_batches=8).run(np.load(x))
    written = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(written["exit"], expected.exit)
    np.testing.assert_allclose(written["logits"], expected.logits, rtol=1e-5, atol=1e-6)
    report = json.loads(light_cli("bench", package, "--repeats", 1, "--batch", 4, "--json", cwd=tmp_path).stdout)
    assert report, "bench printed an empty report"


@pytest.mark.parametrize("kind", ["tiny", "plugins"])
def test_the_python_api_runs_without_the_extras(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    package = request.getfixturevalue("tiny" if kind == "tiny" else "plugins_package")
    x = _input(package, tmp_path, batch=5)
    result, refused = light(RUN_API, package, x, tmp_path / "api.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert refused == [], f"dync.load(...).run(...) tried to import {refused}"
    expected = dync.load(package).run(np.load(x))
    written = np.load(tmp_path / "api.npz")
    np.testing.assert_array_equal(written["exit"], expected.exit)
    np.testing.assert_array_equal(written["logits"], expected.logits)


def test_calibrate_quantize_and_profile_without_the_extras(tiny: Path, tmp_path: Path) -> None:
    x = _input(tiny, tmp_path, batch=32)
    light_cli("calibrate", tiny, "--data", x, "--budget", 0.5, cwd=tmp_path)
    assert load_manifest(tiny).thresholds is not None, "calibrate stored no thresholds"
    light_cli("quantize", tiny, "--data", x, "--min-samples", 1, "--no-measure", cwd=tmp_path)
    light_cli("run", tiny, "--input", x, "-o", tmp_path / "int8.npz", "--precision", "int8", cwd=tmp_path)
    assert np.load(tmp_path / "int8.npz")["exit"].shape == (32,)
    light_cli("profile", tiny, "--batch-sizes", "1,2", "--repeats", 1, cwd=tmp_path)


def test_export_and_verify_name_the_export_extra(cli_export: CliExport, tmp_path: Path) -> None:
    shape = "x".join(map(str, TINY_SHAPE))
    out = tmp_path / "again.dync"
    result, _ = light(CLI, "export", cli_export.model_path, "-o", out, "--input-shape", shape, cwd=tmp_path)
    assert_one_line_naming(result, "dync export", "torch", "export")
    assert not out.exists()
    result, _ = light(CLI, "verify", cli_export.package, "--model", cli_export.model_path, cwd=tmp_path)
    assert_one_line_naming(result, "dync verify", "torch", "export")
    result, _ = light(CLI, "demo", "-o", tmp_path / "demo.dync", cwd=tmp_path)
    assert_one_line_naming(result, "dync demo", "torch", "export")
    result, _ = light(EXPORT_API, cli_export.model_path, out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ('dync.export(...) needs torch, which the light install leaves out; install it '
                                     'with pip install "dync[export]" (and pin torch==2.13.0 for the CPU build).')
    assert not out.exists()


def test_calibrate_plot_names_the_plot_extra_and_leaves_the_package(tiny: Path, tmp_path: Path) -> None:
    before = (tiny / "manifest.json").read_bytes()
    x = _input(tiny, tmp_path, batch=32)
    args = ("calibrate", tiny, "--data", x, "--budget", 0.5, "--plot", tmp_path / "calib.png")
    result, _ = light(CLI, *args, cwd=tmp_path)
    assert_one_line_naming(result, "dync calibrate --plot", "matplotlib", "plot")
    assert (tiny / "manifest.json").read_bytes() == before
    assert not (tmp_path / "calib.png").exists()
