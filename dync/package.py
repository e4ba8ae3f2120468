"""The `.dync` package: a directory holding `manifest.json` and `stages/*.onnx`.

The manifest is the contract between exporter, runtime and calibration. It is plain JSON so it can be read
and diffed by hand; `load_manifest` validates it so a corrupt package fails with a message that names the
file and the field instead of failing later inside a stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dync.errors import InputError, PackageError
from dync.records import (
    PASS_RECORDS,
    BatchFixRecord,
    CalibrationRecord,
    CustomOpRecord,
    PassRecord,
    Provenance,
    QuantizationRecord,
    RecordError,
    VerificationRecord,
    from_json,
    to_json,
)

FORMAT_NAME = "dync-package"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
STAGES_DIR = "stages"
BATCH_DIM = "batch"
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
"""The dtypes a package's inputs and carried state may have."""
PRECISIONS = ("fp32", "int8", "fp8")
"""What a package's stages can run in: as exported, or as `dync quantize` wrote them."""
FORMS = ("cpu", "trt")
"""The two graphs of a quantized stage: onnxruntime CPU's fast kernels, and TensorRT's symmetric signed Q/DQ."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor crossing the package boundary or a stage boundary; shape[0] is the symbolic batch.
    `value_range` is [min, max] of an integer model input in the export example (see `dync.inputs`)."""

    name: str
    dtype: str
    shape: list[int | str]
    value_range: list[float] | None = None


@dataclass
class ExitSpec:
    """The exit a stage ends in: which output it is, how confident it must be, and what reaching it costs.
    `threshold` is the one field calibration changes in place. `shape` is the exit output's shape (batch first),
    which the runtime needs when exits differ in per-sample shape; None in packages written before it.
    `criterion` is a built-in name (`dync.runtime.exit_rule.BUILTIN_CRITERIA`) or a user's `module:function`,
    whose ONNX graph in the package `criterion_onnx` names (None for built-ins)."""

    output: str
    criterion: str
    macs: int
    cumulative_macs: int
    threshold: float | None = None
    shape: list[int | str] | None = None
    criterion_onnx: str | None = None


@dataclass(frozen=True)
class FileRecord:
    """What a package file held when it was written: its size and SHA-256, checked at every load."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class StageSpec:
    """One static ONNX subgraph of the program, with the state it reads and writes."""

    name: str
    onnx: str
    reads: list[str]
    writes: list[str]
    exit: ExitSpec
    nodes: int
    ops: dict[str, int]


@dataclass
class Manifest:
    """Everything about a package except the ONNX bytes.

    `output_selection` says where in the forward's returned structure each exit is (`dync.exporter.outputs`
    paths, e.g. "logits" or "0"); None in packages written before it, whose forward returned the exits.
    `quantization` says how `dync quantize` made the int8 or fp8 stages it holds beside the float32 ones
    (see `at_precision`). `exit_selection` is the `--exits` choice (indices into those exits), None for all of them.
    `passes` holds, per exporter pass that found something (its name, e.g. "spatial"), one record per candidate
    (see `dync.records.PASS_RECORDS`); in the JSON each pass's records sit under its name. `custom_ops` lists
    the `dync::` ops the stages use and the fallback a backend without their plugin takes. `files` holds the
    size and SHA-256 of every file the package's program runs (stages, criterion graphs) and of its latency
    profiles, by path inside the package; `load_manifest` checks them. `batch_fix` says how
    a forward that fixes the batch size was made to take any (None when it does not fix it).
    """

    name: str
    inputs: list[TensorSpec]
    state: list[TensorSpec]
    stages: list[StageSpec]
    provenance: Provenance
    output_selection: list[str] | None = None
    exit_selection: list[int] | None = None
    custom_ops: list[CustomOpRecord] = field(default_factory=list)
    passes: dict[str, list[PassRecord]] = field(default_factory=dict)
    batch_fix: BatchFixRecord | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    verification: VerificationRecord | None = None
    calibration: CalibrationRecord | None = None
    quantization: QuantizationRecord | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def exits(self) -> list[ExitSpec]:
        return [stage.exit for stage in self.stages]

    @property
    def thresholds(self) -> list[float] | None:
        """The stored thresholds of every exit but the last, or None when the package has none."""
        values = [e.threshold for e in self.exits[:-1]]
        return None if any(v is None for v in values) else [float(v) for v in values]

    @property
    def full_macs(self) -> int:
        return self.exits[-1].cumulative_macs

    def records(self, pass_name: str) -> list[PassRecord]:
        """The records of one pass, empty when it found nothing or did not run."""
        return self.passes.get(pass_name, [])

    def to_json(self) -> dict[str, Any]:
        raw = to_json({f.name: getattr(self, f.name) for f in fields(self) if f.name != "passes"})
        return {**raw, **{name: to_json(records) for name, records in self.passes.items()}}


def default_precision(manifest: Manifest) -> str:
    """What a package runs in unless told otherwise: what `dync quantize` made of it, else float32."""
    return manifest.quantization.format if manifest.quantization is not None else "fp32"


def at_precision(manifest: Manifest, precision: str | None = None, form: str = "cpu") -> Manifest:
    """The manifest as a backend runs it at `precision` (None: the package's default): each stage's graph in
    that precision's `form` and that precision's thresholds. A copy; never written back (calibration and
    verification store into the manifest on disk)."""
    precision = precision or default_precision(manifest)
    if precision == "fp16" and form == "trt":
        return manifest  # TensorRT builds fp16 engines from the float32 stages (dync.build.forms)
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is unknown; choose one of {', '.join(PRECISIONS)}.")
    assert form in FORMS, form
    if precision == "fp32":
        return manifest
    record = manifest.quantization
    if record is None or record.format != precision:
        held = "float32 only" if record is None else f"float32 and {record.format}"
        raise InputError(f"package '{manifest.name}' holds {held} stages, not {precision}; make them with "
                         f"`dync quantize PKG --data VAL.npy --format {precision}`.")
    by_stage = {r.stage: r for r in record.stages}
    thresholds = [*(record.thresholds or [None] * (len(manifest.stages) - 1)), None]
    stages = []
    for stage, threshold in zip(manifest.stages, thresholds, strict=True):
        quantized = by_stage[stage.name]
        graph = (quantized.cpu or stage.onnx) if form == "cpu" else quantized.trt
        stages.append(replace(stage, onnx=graph, exit=replace(stage.exit, threshold=threshold)))
    return replace(manifest, stages=stages)


def write_manifest(package_dir: Path, manifest: Manifest) -> None:
    """Replace the package's manifest (see `write_package_file`)."""
    write_package_file(package_dir, MANIFEST_FILE, json.dumps(manifest.to_json(), indent=2) + "\n")


def write_package_file(package_dir: Path, relative: str, text: str) -> Path:
    """Replace a file of the package atomically (see `write_atomically`), one writer at a time; a failed write
    is one PackageError and leaves the package as it was."""
    path = Path(package_dir) / relative
    try:
        with package_lock(package_dir):
            write_atomically(path, text)
        return path
    except OSError as exc:
        raise PackageError(f"could not write {path} ({exc.strerror or exc}); the package is as it was: fix that "
                           "and run the command again.") from exc


def write_atomically(path: Path, text: str | bytes) -> None:
    """`path` holds `text` (or bytes) or what it held before, never a part: it goes to a temporary file beside it,
    is flushed to disk, and the file is renamed over `path` (atomic on POSIX and Windows), then the directory
    entry is flushed. A reader sees the old or the new file; a kill or a full disk leaves the old one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(text if isinstance(text, bytes) else text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return  # Windows has no directory handles to flush; its rename is durable on its own
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def package_lock(package_dir: Path) -> Iterator[None]:
    """Hold the package's writer lock (an advisory `flock` on `.lock` in the package): calibrate, verify and
    profile rewrite files of a package in place, and two of them at once must not interleave. Readers need
    no lock, since every write is atomic."""
    lock_path = Path(package_dir) / LOCK_FILE
    with open(lock_path, "a") as lock:
        if os.name == "posix":
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def load_manifest(package_dir: str | Path) -> Manifest:
    """Read and validate a package's manifest; every failure names the package and what to do."""
    package_dir = Path(package_dir)
    path = package_dir / MANIFEST_FILE
    if not package_dir.is_dir():
        raise PackageError(f"{package_dir} is not a dync package directory; create one with `dync export`.")
    if not path.is_file():
        raise PackageError(f"{package_dir} has no {MANIFEST_FILE}; re-export the package with `dync export`.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); re-export the package with `dync export`.") from exc
    manifest = _manifest_from_json(raw, path)
    _check_program(manifest, package_dir)
    return manifest


def _manifest_from_json(raw: Any, path: Path) -> Manifest:
    """The manifest with every field checked against its type; pass records are read by their pass's type."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise PackageError(f"{path} is not a dync manifest (no 'format': '{FORMAT_NAME}'); re-export it.")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{path} has format_version {version!r} but this dync reads version {FORMAT_VERSION}; "
            "re-export the model with this dync or install the dync that wrote it."
        )
    try:
        passes = {name: [from_json(kind, r, f"{name}[{i}]") for i, r in enumerate(_list(raw.pop(name, [])))]
                  for name, kind in PASS_RECORDS.items()}
        manifest = from_json(Manifest, raw, "manifest")
    except RecordError as exc:
        raise PackageError(f"{path} is missing or has a malformed field ({exc}); re-export the package with "
                           "`dync export`.") from exc
    manifest.passes = {name: records for name, records in passes.items() if records}
    return manifest


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise RecordError(f"pass records must be a list, not {type(value).__name__}")
    return value


def _check_program(manifest: Manifest, package_dir: Path) -> None:
    """Every stage file lies inside the package, exists and is what was written; every tensor a stage reads is
    a model input or written earlier."""
    where = package_dir / MANIFEST_FILE
    if not manifest.stages:
        raise PackageError(f"{where} lists no stages; re-export the package.")
    names = [stage.name for stage in manifest.stages]
    if len(set(names)) != len(names):
        raise PackageError(f"{where} names stages {names}, not each once; re-export the package.")
    for spec in [*manifest.inputs, *manifest.state]:
        if spec.dtype not in TENSOR_DTYPES:
            raise PackageError(f"{where}: tensor '{spec.name}' has dtype {spec.dtype!r}, which is not one of "
                               f"{', '.join(TENSOR_DTYPES)}; re-export the package.")
        _check_shape(spec.shape, f"tensor '{spec.name}'", where)
        if spec.value_range is not None and len(spec.value_range) != 2:
            raise PackageError(f"{where}: input '{spec.name}' has a value range {spec.value_range}, not [min, max]; "
                               "re-export the package.")
    for stage in manifest.stages:
        if stage.exit.shape is not None:
            _check_shape(stage.exit.shape, f"the exit of stage '{stage.name}'", where)
    available = {t.name for t in manifest.inputs}
    state_names = {t.name for t in manifest.state}
    for stage in manifest.stages:
        for path, what in ((stage.onnx, "stage"), (stage.exit.criterion_onnx, "exit criterion of stage")):
            if path is not None:
                _check_inside(package_dir, path, f"{what} '{stage.name}'")
            if path is not None and not (package_dir / path).is_file():
                raise PackageError(f"{package_dir / path} ({what} '{stage.name}') is missing; re-export the package.")
        missing = [name for name in stage.reads if name not in available]
        if missing:
            raise PackageError(
                f"{where}: stage '{stage.name}' reads {missing} that no earlier stage writes; re-export the package."
            )
        undeclared = [name for name in stage.writes if name not in state_names]
        if undeclared:
            raise PackageError(f"{where}: stage '{stage.name}' writes undeclared state {undeclared}; re-export it.")
        available.update(stage.writes)
        if not 0 <= stage.exit.macs <= stage.exit.cumulative_macs:
            raise PackageError(f"{where}: stage '{stage.name}' has inconsistent MAC counts; re-export the package.")
    _check_quantization(manifest, where)
    _check_files(manifest, package_dir)


def _check_quantization(manifest: Manifest, where: Path) -> None:
    """A quantization record covers every stage once, its graphs are files the manifest records, and it has
    a threshold per exit but the last."""
    record = manifest.quantization
    if record is None:
        return
    fix = "run `dync quantize` again"
    names = [s.name for s in manifest.stages]
    if record.format not in PRECISIONS[1:] or sorted(r.stage for r in record.stages) != sorted(names):
        raise PackageError(f"{where}: the quantization record does not cover the stages {names} in int8 or fp8; "
                           f"{fix}.")
    for stage in record.stages:
        for path in filter(None, (stage.cpu, stage.trt, stage.ranges, *stage.branch_ranges.values())):
            if path not in manifest.files:
                raise PackageError(f"{where}: the quantized stage '{stage.stage}' names {path!r}, which the manifest's "
                                   f"file list does not hold; {fix}.")
    if record.thresholds is not None and len(record.thresholds) != len(manifest.stages) - 1:
        raise PackageError(f"{where}: the quantization record has {len(record.thresholds)} thresholds for "
                           f"{len(manifest.stages)} exits; {fix}.")


def _check_shape(shape: list[int | str], what: str, where: Path) -> None:
    """A batch first, then per-sample sizes: non-negative integers."""
    if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape[1:]):
        raise PackageError(f"{where}: {what} has shape {shape}, not a batch followed by sizes; re-export the "
                           "package.")


def _check_inside(package_dir: Path, path: str, what: str) -> None:
    """A path the manifest names must resolve inside the package: no absolute path, no `..`, no link out."""
    root = package_dir.resolve()
    target = (package_dir / path).resolve()
    if Path(path).is_absolute() or ".." in Path(path).parts or not target.is_relative_to(root):
        raise PackageError(f"{package_dir / MANIFEST_FILE}: {what} names {path!r}, which is outside the package; a "
                           "package may only run its own files: re-export it.")


def _check_files(manifest: Manifest, package_dir: Path) -> None:
    """Each recorded file has the size and SHA-256 it was written with (`FileRecord`)."""
    for path, record in manifest.files.items():
        _check_inside(package_dir, path, "the file list")
        found = package_dir / path
        if not found.is_file():
            raise PackageError(f"{found} is missing; re-export the package or restore the file.")
        if found.stat().st_size != record.bytes or file_record(found).sha256 != record.sha256:
            raise PackageError(f"{found} changed after it was written (its size or SHA-256 differs from the "
                               "manifest's): re-export the package or restore the file.")


def file_record(path: Path) -> FileRecord:
    """The size and SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return FileRecord(bytes=path.stat().st_size, sha256=digest.hexdigest())


def file_sha256(package_dir: Path, manifest: Manifest, relative: str) -> str:
    """The SHA-256 of a package file: the one `load_manifest` checked it against, read again only for files a
    package written before file records does not list."""
    recorded = manifest.files.get(relative)
    return recorded.sha256 if recorded is not None else file_record(Path(package_dir) / relative).sha256


def program_files(package_dir: Path, manifest: Manifest) -> dict[str, FileRecord]:
    """The records of every file the program runs: stage graphs and criterion graphs."""
    paths = {s.onnx for s in manifest.stages}
    paths |= {s.exit.criterion_onnx for s in manifest.stages if s.exit.criterion_onnx is not None}
    return {path: file_record(Path(package_dir) / path) for path in sorted(paths)}


def live_state(manifest: Manifest) -> list[set[str]]:
    """After stage k, only tensors a later stage reads are kept (and compacted)."""
    live = []
    for k in range(len(manifest.stages)):
        live.append({name for stage in manifest.stages[k + 1 :] for name in stage.reads})
    return live
