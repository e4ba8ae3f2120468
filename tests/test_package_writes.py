"""Writes that cannot lose data: export never replaces what is not a package, replaces a package only with
--force, and every manifest rewrite is atomic, so a kill, a full disk or a concurrent reader sees the old or
the new manifest, never a part of one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import dync
from dync.errors import ExportError, PackageError
from dync.package import MANIFEST_FILE, load_manifest, write_manifest
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package
from tests.models import TINY_SHAPE, tiny_model


def test_a_directory_that_is_not_a_package_is_never_replaced(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / MANIFEST_FILE).write_text("{}")
    (project / "src" / "main.py").write_text("x")
    with pytest.raises(ExportError, match="is a directory that is not a dync package"):
        dync.export(tiny_model(), project, input_shape=TINY_SHAPE, force=True)
    assert (project / "src" / "main.py").read_text() == "x"


def test_the_output_is_checked_before_any_work(tmp_path: Path) -> None:
    """The working directory as -o is refused at once: the model file named is never even opened."""
    (tmp_path / "notes.txt").write_text("keep me")
    result = invoke(["export", tmp_path / "missing.pt", "-o", tmp_path, "--input-shape", "4x3x16x16"])
    assert result.exit_code == 1 and "is a directory that is not a dync package" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_existing_package_is_replaced_only_with_force(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    before = (package / MANIFEST_FILE).read_text()
    args = ["export", cli_export.model_path, "-o", package, "--input-shape", "x".join(map(str, TINY_SHAPE)),
            "--no-verify"]
    refused = invoke(args)
    assert refused.exit_code == 1 and "is a dync package already; pass --force" in refused.stderr
    assert (package / MANIFEST_FILE).read_text() == before
    assert invoke([*args, "--force"]).exit_code == 0
    assert load_manifest(package).verification is None, "the new package replaced the verified one"
    assert not list(tmp_path.glob(".tiny.dync.*")), "nothing is left beside the package"


_REWRITER = """
import sys
from dync.package import load_manifest, write_manifest
package = sys.argv[1]
manifest = load_manifest(package)
print("ready", flush=True)
while True:
    manifest.name = "a" * 5000 if manifest.name != "a" * 5000 else "tiny"
    write_manifest(package, manifest)
"""


def test_a_killed_rewrite_leaves_a_loadable_manifest(cli_export: CliExport, tmp_path: Path) -> None:
    """A process rewriting the manifest in a loop (as calibrate and verify do, once each) is killed at
    arbitrary moments; every time, the package loads."""
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    for delay in (0.0, 0.01, 0.03, 0.05, 0.08, 0.13):
        writer = subprocess.Popen([sys.executable, "-c", _REWRITER, str(package)], stdout=subprocess.PIPE,
                                  cwd=Path(__file__).resolve().parents[1])
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert load_manifest(package).name in ("tiny", "a" * 5000)


def test_readers_never_see_a_partial_manifest(cli_export: CliExport, tmp_path: Path) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    manifest = load_manifest(package)
    done = threading.Event()

    def rewrite() -> None:
        for k in range(150):
            manifest.name = f"tiny{k}"
            write_manifest(package, manifest)
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    loads = 0
    while not done.is_set():
        json.loads((package / MANIFEST_FILE).read_text())
        load_manifest(package)
        loads += 1
    writer.join()
    assert loads > 0 and load_manifest(package).name == "tiny149"


def test_a_full_disk_leaves_the_old_manifest(cli_export: CliExport, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    before = (package / MANIFEST_FILE).read_text()
    manifest = load_manifest(package)
    manifest.name = "changed"

    def no_space(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(PackageError, match=r"could not write .*No space left on device.*the package is as it was"):
        write_manifest(package, manifest)
    assert (package / MANIFEST_FILE).read_text() == before
    assert sorted(p.name for p in package.iterdir() if p.name.endswith(".tmp")) == []
