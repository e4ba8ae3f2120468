"""Every bad input is one line: `error: ...` on stderr, exit status 1, no traceback, the package unchanged and
nothing written, checked before the long work. One row per case a careless or hostile user hit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dync.package import MANIFEST_FILE
from tests.conftest import CliExport, invoke
from tests.helpers import copy_package
from tests.models import TINY_SHAPE

Case = Callable[[Path, Path, Path], list[object]]
"""(package, scratch directory, a good input file) -> the command line."""


def _edited(field: str, value: object) -> Callable[[Path], None]:
    def edit(package: Path) -> None:
        raw = json.loads((package / MANIFEST_FILE).read_text())
        target: dict = raw
        *path, last = field.split(".")
        for key in path:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
        (package / MANIFEST_FILE).write_text(json.dumps(raw))
    return edit


CASES: list[tuple[str, Case, list[str]]] = [
    ("bench_repeats_0", lambda p, t, x: ["bench", p, "--repeats", "0"], ["--repeats", "0"]),
    ("bench_batch_negative", lambda p, t, x: ["bench", p, "--batch", "-5"], ["--batch", "-5"]),
    ("threads_100000", lambda p, t, x: ["run", p, "--input", x, "-o", t / "o.npz", "--threads", "100000"],
     ["--threads", "100000"]),
    ("run_output_dir_missing", lambda p, t, x: ["run", p, "--input", x, "-o", t / "none" / "o.npz"],
     ["does not exist"]),
    ("empty_npy", lambda p, t, x: ["run", p, "--input", t / "empty.npy", "-o", t / "o.npz"], ["empty.npy"]),
    ("plot_dir_missing", lambda p, t, x: ["calibrate", p, "--data", x, "--budget", "0.5", "--plot",
                                          t / "none" / "c.png"], ["--plot", "does not exist"]),
    ("budget_inf", lambda p, t, x: ["calibrate", p, "--data", x, "--budget", "inf"], ["budget inf"]),
    ("calibrate_one_sample", lambda p, t, x: ["calibrate", p, "--data", t / "one.npy", "--budget", "0.5"],
     ["at least 2 samples"]),
    ("overflowing_input", lambda p, t, x: ["run", p, "--input", t / "huge.npy", "-o", t / "o.npz"],
     ["non-finite values", "sample 0"]),
    ("model_is_a_directory", lambda p, t, x: ["export", t, "-o", t / "new.dync"], ["is a directory"]),
]

MANIFEST_EDITS: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("threshold_text", _edited("stages.0.exit.threshold", "abc"), ["threshold must be"]),
    ("unknown_dtype", _edited("inputs.0.dtype", "float99"), ["dtype 'float99'"]),
    ("duplicate_stage_names", _edited("stages.1.name", "stage0"), ["not each once"]),
    ("absolute_stage_path", _edited("stages.0.onnx", "/etc/passwd"), ["outside the package"]),
]


def _one_line_error(result: object, words: list[str]) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.mark.parametrize(("case", "words"), [(c, w) for _, c, w in CASES], ids=[i for i, _, _ in CASES])
def test_a_bad_command_line_is_one_line(cli_export: CliExport, tmp_path: Path, case: Case, words: list[str]) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    before = (package / MANIFEST_FILE).read_text()
    x = np.random.default_rng(0).standard_normal((4, *TINY_SHAPE[1:])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "one.npy", x[:1])
    np.save(tmp_path / "huge.npy", np.full_like(x, 3e38))
    (tmp_path / "empty.npy").write_bytes(b"")
    _one_line_error(invoke(case(package, tmp_path, tmp_path / "x.npy")), words)
    assert (package / MANIFEST_FILE).read_text() == before
    assert not (tmp_path / "o.npz").exists() and not (tmp_path / "new.dync").exists()


@pytest.mark.parametrize(("edit", "words"), [(e, w) for _, e, w in MANIFEST_EDITS],
                         ids=[i for i, _, _ in MANIFEST_EDITS])
def test_an_edited_manifest_is_one_line(cli_export: CliExport, tmp_path: Path, edit: Callable[[Path], None],
                                        words: list[str]) -> None:
    package = copy_package(cli_export.package, tmp_path / "tiny.dync")
    edit(package)
    _one_line_error(invoke(["inspect", package]), words)


def test_run_writes_exactly_the_named_file(cli_export: CliExport, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, *TINY_SHAPE[1:]), np.float32))
    result = invoke(["run", cli_export.package, "--input", tmp_path / "x.npy", "-o", tmp_path / "outnoext"])
    assert result.exit_code == 0 and "wrote " in result.output
    assert (tmp_path / "outnoext").is_file() and not (tmp_path / "outnoext.npz").exists()
    assert set(np.load(tmp_path / "outnoext")) == {"logits", "exit"}


def test_an_unexpected_error_is_one_line_with_a_debug_hint(cli_export: CliExport,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import dync.describe

    def broken(*_args: object) -> str:
        raise KeyError("boom")

    monkeypatch.setattr(dync.describe, "format_description", broken)
    result = invoke(["inspect", cli_export.package])
    _one_line_error(result, ["internal error (KeyError", "--debug"])
    assert isinstance(invoke(["--debug", "inspect", cli_export.package]).exception, KeyError), "--debug lets it through"
