"""Commands killed at arbitrary moments (calibrate, verify, export onto an existing package) leave a package
that loads, as it was before or as it is after; a reader loading a package while `calibrate` rewrites it
never fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dync.package import load_manifest
from tests.conftest import CliExport
from tests.helpers import copy_package
from tests.models import TINY_SHAPE

ROOT = Path(__file__).resolve().parents[1]


def _dync(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DYNC_TRUST_PICKLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "dync", *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _killed_after(process: subprocess.Popen, seconds: float) -> None:
    time.sleep(seconds)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "val.npy"
    np.save(data, np.random.default_rng(0).standard_normal((64, *TINY_SHAPE[1:])).astype(np.float32))
    return data


def test_a_killed_calibrate_leaves_the_package_before_or_after(cli_export: CliExport, tmp_path: Path) -> None:
    data = _data(tmp_path)
    for delay in (0.7, 1.4, 2.4):
        package = copy_package(cli_export.package, tmp_path / f"tiny{delay}.dync")
        _killed_after(_dync("calibrate", package, "--data", data, "--budget", "0.6"), delay)
        thresholds = load_manifest(package).thresholds
        assert thresholds is None or len(thresholds) == 2


def test_a_killed_verify_leaves_the_package_loading(cli_export: CliExport, tmp_path: Path) -> None:
    for delay in (1.5, 3.0):
        package = copy_package(cli_export.package, tmp_path / f"tiny{delay}.dync")
        _killed_after(_dync("verify", package, "--model", cli_export.model_path, "--trust-pickle"), delay)
        assert load_manifest(package).verification is not None


def test_a_killed_export_leaves_the_old_package_or_the_new(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    shape = "x".join(map(str, TINY_SHAPE))
    delays = (2.5, 5.0)
    for delay in delays:
        _killed_after(_dync("export", cli_export.model_path, "-o", package, "--input-shape", shape, "--force",
                            "--name", f"after{delay}"), delay)
        assert load_manifest(package).name in ("tiny", *(f"after{d}" for d in delays))
        for stray in tmp_path.glob(".tiny.dync.*"):  # a killed export's unfinished copy, never the package
            shutil.rmtree(stray)


def test_readers_during_calibrate_never_fail(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    data = _data(tmp_path)
    loads = 0
    for _ in range(2):
        calibrate = _dync("calibrate", package, "--data", data, "--budget", "0.6")
        while calibrate.poll() is None:
            load_manifest(package)
            loads += 1
        assert calibrate.returncode == 0
    assert loads > 0 and load_manifest(package).thresholds is not None
