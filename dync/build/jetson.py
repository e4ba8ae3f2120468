"""`dync build PKG --target jetson`: a bundle that builds its TensorRT engines on the Jetson, with JetPack's trtexec.

TensorRT engines are built on the machine that runs them, and a Jetson is slow at everything else, so the host
does all the rest and writes one directory to copy over:

```
manifest.json, stages/, quant/ ...   the package, copied byte for byte (a loadable dync package); not engines/,
                                     and not calib/ (latency profiles of the host, wrong for the device)
tensorrt/<stage>.onnx                each stage as the target's TensorRT parses it (dync.build.forms)
build.sh                             trtexec per stage, then Polygraphy's check of each engine
verify/<stage>.inputs.json           a small random batch and onnxruntime's outputs of the tensorrt/ graph,
verify/<stage>.outputs.json          in Polygraphy's formats (--load-inputs, --load-outputs)
engines/                             where build.sh writes the engines and trtexec's timing cache
bundle.json                          what build.sh builds (dync.build.bundle_record), for the TensorRT backend
README.md                            the steps on the device
```

Engines are strongly typed (the precision is in the graph), so build.sh passes no precision flag; the trtexec
options it uses, with their documentation, are in `dync/data/trtexec_options.json`. A stage that keeps
`dync::` plugin nodes (JetPack 7.2, TensorRT with AOT plugins) cannot be built by trtexec, which does not load
Python `tensorrt.plugin` plugins: build.sh hands those to `dync build --target trt` on the device, which takes
the trtexec engines of the other stages from the bundle and builds the rest.

Polygraphy CLI options used by build.sh (`polygraphy run --help`; the examples `cli/run/02_comparing_across_runs`
and `06_comparing_with_custom_output_data` in NVIDIA/TensorRT tools/Polygraphy): `--model-type engine` and
`--trt` (run a serialized engine with TensorRT), `--load-inputs` (a JSON list of feed dicts, `save_json`),
`--load-outputs` (a saved `RunResults`), `--atol` / `--rtol` (per-element tolerances of its default comparison).
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template

import numpy as np
import onnx

from dync.build import tensorrt_manifest
from dync.build.bundle_record import BUNDLE_FILE, BundleRecord, BundleStage
from dync.build.forms import plugins_kept, stage_for_tensorrt
from dync.build.profiles import BatchRange, StageProfile, stage_profiles
from dync.build.targets import JetPack, plugin_mode
from dync.build.targets import jetpack as jetpack_release
from dync.errors import ExportError
from dync.extras import require
from dync.package import (
    MANIFEST_FILE,
    Manifest,
    StageSpec,
    file_record,
    file_sha256,
    load_manifest,
    write_atomically,
)
from dync.plugins.op_registry import DOMAIN
from dync.records import to_json
from dync.version import __version__

TENSORRT_DIR = "tensorrt"
VERIFY_DIR = "verify"
ENGINES_DIR = "engines"
BUILD_SCRIPT = "build.sh"
README = "README.md"
HOST_ONLY_DIRS = ("calib/",)
"""Package files a bundle leaves out: latency profiles measured on the host, which would mislead on the device."""
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
"""Where JetPack installs trtexec (not on PATH by default)."""
TIMING_CACHE = f"{ENGINES_DIR}/timing.cache"
VERIFY_BATCH = 2
"""The batch of the reference data: small, and within any profile (clamped to the bundle's batch range)."""
VERIFY_SEED = 0
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (1e-2, 1e-2), "int8": (1e-1, 1e-1), "fp8": (2.5e-1, 2.5e-1)}
"""Polygraphy's (atol, rtol) per precision, the engine against onnxruntime on the same graph: an element passes
within either. int8 and fp8 engines round at other points than onnxruntime's Q/DQ emulation (fused
requantization), so one quantization step of difference must pass."""
REFERENCE_RUNNER = "onnxruntime-cpu"
"""The runner name the reference outputs are saved under (Polygraphy compares every loaded run with --trt)."""


@dataclass(frozen=True)
class StageBuild:
    """One stage of the bundle: its graph as TensorRT parses it, its profile, the plugins it keeps, and the
    SHA-256 of the package file it was made from."""

    stage: StageSpec
    model: onnx.ModelProto
    profile: StageProfile
    kept_plugins: set[str]
    source_sha256: str

    @property
    def onnx_path(self) -> str:
        return f"{TENSORRT_DIR}/{self.stage.name}.onnx"

    @property
    def engine_path(self) -> str:
        return f"{ENGINES_DIR}/{self.stage.name}.plan"

    @property
    def by_trtexec(self) -> bool:
        """trtexec loads no Python plugins, so a stage that keeps `dync::` nodes is built by `dync build`."""
        return not self.kept_plugins


def write_bundle(package_dir: Path, output: Path, *, jetpack: str, device: str, precision: str, batch: BatchRange,
                 progress: Callable[[str], None]) -> BundleRecord:
    """Write the Jetson bundle of `package_dir` to `output` (a new or empty directory, or a previous bundle, which
    is replaced) for JetPack `jetpack` on `device` at `precision`, with engines for the request range `batch`.
    Everything is checked before anything is written, and the bundle appears whole or not at all."""
    release = jetpack_release(jetpack, device, precision)
    require("polygraphy", "build", "dync build --target jetson")
    package_dir, output = Path(package_dir), Path(output)
    _check_output(package_dir, output)
    mode = plugin_mode(release.tensorrt_version, None)
    manifest, calibration = tensorrt_manifest(package_dir, precision)
    profiles = stage_profiles(manifest, batch, calibration)
    progress(f"bundle for JetPack {release.version} (TensorRT {release.tensorrt}) on Jetson {device.capitalize()}: "
             f"{len(manifest.stages)} stage(s) at {precision}, batch {batch}, plugins {mode}")
    builds = [_stage_build(package_dir, manifest, stage, profile, mode, precision)
              for stage, profile in zip(manifest.stages, profiles, strict=True)]
    with _staging(output) as staged:
        _copy_package(package_dir, staged, progress)
        stages = [_write_stage_form(staged, build, progress) for build in builds]
        _write_verification(package_dir, staged, builds, batch, progress)
        (staged / ENGINES_DIR).mkdir()
        record = BundleRecord(jetpack=release.version, device=device, tensorrt=release.tensorrt, precision=precision,
                              plugins=mode, stages=stages, created=datetime.now(timezone.utc).isoformat())
        script = build_script(release, device, precision, batch, builds)
        write_atomically(staged / BUILD_SCRIPT, script)
        (staged / BUILD_SCRIPT).chmod(0o755)
        write_atomically(staged / README, bundle_readme(manifest, release, device, precision, batch, builds))
        write_atomically(staged / BUNDLE_FILE, json.dumps(to_json(record), indent=2) + "\n")
        load_manifest(staged)  # the copy is a package whose every file is what the manifest recorded
    progress(f"wrote {output}: copy it to the Jetson and run bash build.sh there (see its README.md)")
    return record


def _check_output(package_dir: Path, output: Path) -> None:
    """The bundle goes to a new or empty directory, or replaces a previous bundle; nothing else is overwritten."""
    if output.exists() and output.resolve() == package_dir.resolve():
        raise ExportError(f"{output} is the package itself; write the bundle to another directory with -o.")
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} exists and is not a directory; give -o a new directory for the bundle.")
    if output.is_dir() and any(output.iterdir()) and not (output / BUNDLE_FILE).is_file():
        raise ExportError(f"{output} exists, is not empty and is not a dync bundle (it has no {BUNDLE_FILE}); give "
                          "-o a new or empty directory, or remove it first.")


@contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """A hidden directory beside `output` to write into; moved into place (after a previous bundle is moved aside)
    only when everything is written, and removed if anything fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staged.chmod(0o755)  # mkdtemp's 0700 would become the bundle's
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        output.replace(old / "bundle")
    staged.replace(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_package(package_dir: Path, staged: Path, progress: Callable[[str], None]) -> None:
    """The manifest and every file it records, byte for byte; the host's latency profiles are left out (and then
    dropped from the copied manifest's file list, which is the only change)."""
    stored = load_manifest(package_dir)
    kept = {path: record for path, record in stored.files.items() if not path.startswith(HOST_ONLY_DIRS)}
    for path in sorted(set(kept) | program_paths(stored)):
        target = staged / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package_dir / path, target)
    if len(kept) == len(stored.files):
        shutil.copyfile(package_dir / MANIFEST_FILE, staged / MANIFEST_FILE)
        progress("copied the package")
        return
    stored.files = kept
    write_atomically(staged / MANIFEST_FILE, json.dumps(stored.to_json(), indent=2) + "\n")
    progress("copied the package, without the latency profiles of the host")


def program_paths(manifest: Manifest) -> set[str]:
    """Every file the manifest names for its program (stages, criterion graphs, quantized forms and ranges), so
    that a package written before `files` existed is copied whole too."""
    paths = {stage.onnx for stage in manifest.stages}
    paths |= {stage.exit.criterion_onnx for stage in manifest.stages if stage.exit.criterion_onnx is not None}
    for quantized in manifest.quantization.stages if manifest.quantization is not None else []:
        paths |= set(filter(None, (quantized.cpu, quantized.trt, quantized.ranges,
                                   *quantized.branch_ranges.values())))
    return paths


def _stage_build(package_dir: Path, manifest: Manifest, stage: StageSpec, profile: StageProfile, mode: str,
                 precision: str) -> StageBuild:
    model = onnx.load(package_dir / stage.onnx)
    return StageBuild(stage, stage_for_tensorrt(model, plugins=mode, precision=precision), profile,
                      plugins_kept(model, mode), file_sha256(package_dir, manifest, stage.onnx))


def _write_stage_form(staged: Path, build: StageBuild, progress: Callable[[str], None]) -> BundleStage:
    path = staged / build.onnx_path
    path.parent.mkdir(exist_ok=True)
    onnx.save(build.model, path)
    kept = f", keeping the plugin nodes {', '.join(sorted(build.kept_plugins))}" if build.kept_plugins else ""
    progress(f"stage '{build.stage.name}': wrote {build.onnx_path}{kept}")
    return BundleStage(stage=build.stage.name, onnx=build.onnx_path, onnx_sha256=file_record(path).sha256,
                       engine=build.engine_path, source_sha256=build.source_sha256, profile=build.profile.to_json())


# ----------------------------------------------------------------------------------------------- reference data


def verify_batch(batch: BatchRange) -> int:
    return min(batch.max, max(batch.min, VERIFY_BATCH))


def _write_verification(package_dir: Path, staged: Path, builds: list[StageBuild], batch: BatchRange,
                        progress: Callable[[str], None]) -> None:
    """Per stage, the inputs Polygraphy feeds the engine and onnxruntime's outputs of the same TensorRT-form graph
    on them: model inputs are random, carried state is what the package's earlier stages compute from them."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    (staged / VERIFY_DIR).mkdir()
    feeds = stage_feeds(package_dir, verify_batch(batch))
    for build, stage_inputs in zip(builds, feeds, strict=True):
        results = RunResults()
        results.add([reference_outputs(build.model, stage_inputs)], runner_name=REFERENCE_RUNNER)
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # not a line per file saved
            save_json([stage_inputs], str(staged / VERIFY_DIR / f"{build.stage.name}.inputs.json"),
                      description=f"inputs of stage {build.stage.name}")
            results.save(str(staged / VERIFY_DIR / f"{build.stage.name}.outputs.json"))
    progress(f"wrote onnxruntime's reference outputs of every stage at batch {verify_batch(batch)} to {VERIFY_DIR}/")


def stage_feeds(package_dir: Path, batch: int) -> list[dict[str, np.ndarray]]:
    """What each stage reads when every sample runs every stage: random model inputs (`dync.inputs`) and the state
    the float32 package computes from them, observed stage by stage on onnxruntime."""
    from dync.inputs import random_inputs
    from dync.runtime.engine import Engine

    engine = Engine.load(package_dir, precision="fp32", one_graph=False)
    stages = engine.manifest.stages
    seen: list[dict[str, np.ndarray]] = []

    def observe(k: int, state: dict[str, np.ndarray]) -> None:
        seen.append({name: np.ascontiguousarray(state[name]) for name in stages[k].reads})

    no_exit = np.full(len(stages) - 1, np.inf)
    engine.execute(random_inputs(engine.manifest.inputs, batch, VERIFY_SEED), no_exit, observe=observe)
    assert len(seen) == len(stages), "a sample left early although no threshold can be reached"
    return seen


def reference_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of a TensorRT-form stage: kept plugin nodes run as their decomposition; graph
    optimizations off, since onnxruntime's Q/DQ fusions compute fp8 wrongly, and one thread, so that the numbers
    are the graph's own and reproducible."""
    from dync.plugins.splice import decompose_custom_nodes
    from dync.runtime.backends.ort import OrtSettings, session_from_onnx

    session = session_from_onnx(decompose_custom_nodes(model), OrtSettings(threads=1, optimization="disable"))
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()}), strict=True))


# ------------------------------------------------------------------------------------------------------ build.sh

HEADER = Template("""\
#!/usr/bin/env bash
# Builds the TensorRT engines of this dync bundle on the Jetson ($target),
# then checks them against the outputs of onnxruntime with Polygraphy. Written by dync $version; see README.md.
set -euo pipefail
cd "$$(dirname "$$0")"
mkdir -p $engines
""")

TRTEXEC_SETUP = Template("""\
trtexec=$$(command -v trtexec || true)
if [[ -z "$$trtexec" && -x $jetpack_trtexec ]]; then trtexec=$jetpack_trtexec; fi
if [[ -z "$$trtexec" ]]; then
  echo "error: trtexec is neither on PATH nor at $jetpack_trtexec; install the TensorRT of JetPack" \\
       "(sudo apt install nvidia-jetpack) and run bash build.sh again." >&2
  exit 1
fi

trtexec_build() {  # STAGE FLAGS...: the log of trtexec goes to $engines/STAGE.log, shown when the build fails
  local stage=$$1; shift
  echo "stage $$stage: trtexec $$*"
  if ! "$$trtexec" "$$@" >"$engines/$$stage.log" 2>&1; then
    tail -n 30 "$engines/$$stage.log" >&2
    echo "error: trtexec could not build stage $$stage (whole log: $engines/$$stage.log)." >&2
    exit 1
  fi
}
""")

CHECKS = Template("""\
if command -v polygraphy >/dev/null 2>&1; then
$checks
else
  echo "polygraphy is not on PATH, so the engines were not checked: pip install \\"dync[build]\\" in the venv" \\
       "that README.md describes and run bash build.sh again."
fi
""")


def build_script(release: JetPack, device: str, precision: str, batch: BatchRange, builds: list[StageBuild]) -> str:
    """build.sh: trtexec for the stages it can build, then `dync build` for those that keep plugin nodes, then
    Polygraphy's check of each trtexec engine when polygraphy is installed."""
    by_trtexec = [b for b in builds if b.by_trtexec]
    by_dync = [b for b in builds if not b.by_trtexec]
    target = f"JetPack {release.version}, TensorRT {release.tensorrt}, Jetson {device.capitalize()}, {precision}"
    parts = [HEADER.substitute(target=target, version=__version__, engines=ENGINES_DIR)]
    if by_trtexec:
        parts.append(TRTEXEC_SETUP.substitute(jetpack_trtexec=JETPACK_TRTEXEC, engines=ENGINES_DIR))
        parts.append("\n".join(_trtexec_line(b) for b in by_trtexec) + "\n")
    if by_dync:
        parts.append(_dync_build_lines(by_dync, precision, batch, after_trtexec=bool(by_trtexec)))
    checks = [_polygraphy_lines(b, *TOLERANCES[precision]) for b in by_trtexec]
    checks += [f"  echo {shlex.quote(_unchecked(b))}" for b in by_dync]
    if by_trtexec:
        parts.append(CHECKS.substitute(checks="\n".join(checks)))
    else:
        parts.append("\n".join(line.strip() for line in checks) + "\n")
    parts.append(f"echo {shlex.quote('done: ' + _summary(by_trtexec, by_dync))}\n")
    return "\n".join(parts)


def _summary(by_trtexec: list[StageBuild], by_dync: list[StageBuild]) -> str:
    done = []
    if by_trtexec:
        done.append(f"trtexec built {', '.join(b.stage.name for b in by_trtexec)} into {ENGINES_DIR}/")
    if by_dync:
        done.append(f"dync build built {', '.join(b.stage.name for b in by_dync)} into the engine cache of the "
                    "package")
    return "; ".join(done)


def _unchecked(build: StageBuild) -> str:
    return (f"stage {build.stage.name}: built by dync build with plugins, not checked here (Polygraphy has no "
            "dync plugin registrations)")


def trtexec_flags(build: StageBuild) -> list[str]:
    """trtexec's options for one stage (each documented in dync/data/trtexec_options.json): strongly typed, no
    precision flag, one profile, the shared timing cache, and no inference run."""
    profile = build.profile
    return [f"--onnx={build.onnx_path}", f"--saveEngine={build.engine_path}", "--stronglyTyped",
            f"--minShapes={profile.trtexec_shapes(0)}", f"--optShapes={profile.trtexec_shapes(1)}",
            f"--maxShapes={profile.trtexec_shapes(2)}", f"--timingCacheFile={TIMING_CACHE}", "--skipInference"]


def _trtexec_line(build: StageBuild) -> str:
    flags = [shlex.quote(flag) for flag in trtexec_flags(build)]
    return f"trtexec_build {shlex.quote(build.stage.name)} " + " \\\n    ".join(
        [" ".join(flags[:3]), " ".join(flags[3:6]), " ".join(flags[6:])])


def _dync_build_lines(by_dync: list[StageBuild], precision: str, batch: BatchRange, after_trtexec: bool) -> str:
    """`dync build` for the stages that keep plugin nodes; it takes the engines trtexec built for the others from
    the bundle (`dync.build.bundle_engine`) instead of building them again."""
    names = ", ".join(b.stage.name for b in by_dync)
    ops = ", ".join(sorted(set().union(*(b.kept_plugins for b in by_dync))))
    taking = ", taking the engines trtexec built" if after_trtexec else ""
    why = (f"stage(s) {names} keep the {DOMAIN}:: plugin nodes {ops}, which trtexec cannot load (they are Python "
           f"tensorrt.plugin plugins), so dync build builds them{taking}")
    missing = ("error: stages that keep plugin nodes need dync build, which is not installed here; pip install "
               "\"dync[trt,gpu]\" (triton compiles the AOT kernels of the plugins) and run bash build.sh again.")
    command = ["dync", "build", ".", "--target", "trt", "--precision", precision, "--batch", str(batch)]
    return "\n".join([
        f"echo {shlex.quote(why)}",
        "if ! command -v dync >/dev/null 2>&1; then",
        f"  echo {shlex.quote(missing)} >&2",
        "  exit 1",
        "fi",
        " ".join(shlex.quote(word) for word in command),
    ]) + "\n"


def polygraphy_args(build: StageBuild, atol: float, rtol: float) -> list[str]:
    """`polygraphy run` on the engine trtexec wrote, fed the saved inputs and compared with the saved outputs."""
    name = build.stage.name
    return [build.engine_path, "--model-type", "engine", "--trt",
            "--load-inputs", f"{VERIFY_DIR}/{name}.inputs.json", "--load-outputs", f"{VERIFY_DIR}/{name}.outputs.json",
            "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]


def _polygraphy_lines(build: StageBuild, atol: float, rtol: float) -> str:
    say = (f"stage {build.stage.name}: polygraphy compares {build.engine_path} with the outputs of onnxruntime "
           f"(atol {atol:g}, rtol {rtol:g})")
    args = [shlex.quote(arg) for arg in polygraphy_args(build, atol, rtol)]
    wrapped = " \\\n      ".join([" ".join(args[:4]), " ".join(args[4:8]), " ".join(args[8:])])
    return f"  echo {shlex.quote(say)}\n  polygraphy run {wrapped}"


# ----------------------------------------------------------------------------------------------------- README.md


def _built_by(build: StageBuild) -> str:
    return "trtexec" if build.by_trtexec else f"dync build (keeps {', '.join(sorted(build.kept_plugins))})"


def bundle_readme(manifest: Manifest, release: JetPack, device: str, precision: str, batch: BatchRange,
                  builds: list[StageBuild]) -> str:
    """The steps on the device, and what build.sh checks."""
    atol, rtol = TOLERANCES[precision]
    rows = "\n".join(f"| {b.stage.name} | {_built_by(b)} | {b.profile.trtexec_shapes(0)} | "
                     f"{b.profile.trtexec_shapes(1)} | {b.profile.trtexec_shapes(2)} |" for b in builds)
    plugin_note = ""
    if any(not b.by_trtexec for b in builds):
        plugin_note = ("\nStages that keep `dync::` plugin nodes are built by `dync build . --target trt` (trtexec "
                       "cannot load Python `tensorrt.plugin` plugins), which needs `pip install \"dync[trt,gpu]\"` "
                       "(triton compiles the plugins' AOT kernels); build.sh runs it after trtexec.\n")
    return f"""# {manifest.name}: TensorRT bundle for Jetson {device.capitalize()}

Written by dync {__version__} for JetPack {release.version} (TensorRT {release.tensorrt}, CUDA {release.cuda}) on
Jetson {device.capitalize()}, at {precision}, for batches {batch} (min:opt:max). The directory is a dync package
(`manifest.json`, `stages/`) plus each stage in the form that TensorRT parses (`tensorrt/`), `build.sh`, which
builds the engines with JetPack's trtexec, and reference data to check them (`verify/`).

## On the device

```bash
python3 -m venv --system-site-packages .venv    # so that JetPack's tensorrt is visible in the venv
. .venv/bin/activate
pip install "dync[build]"
bash build.sh
dync run . --backend trt --input x.npy -o out.npz
dync bench . --backend trt
```

`build.sh` finds trtexec on PATH or at `{JETPACK_TRTEXEC}` and builds one strongly typed engine per stage
into `engines/` (the precision is in the graphs, so it passes no precision flag), sharing
`{TIMING_CACHE}`. The TensorRT backend (`--backend trt`) takes those engines into the package's engine
cache on first load (`bundle.json` says which stage file, precision and profile each was built from).
{plugin_note}
## What build.sh checks

When `polygraphy` is on PATH (it comes with `dync[build]`), each trtexec engine runs on
`verify/<stage>.inputs.json` ({verify_batch(batch)} random samples and, for later stages, the state the earlier
stages compute from them) and its outputs are compared with `verify/<stage>.outputs.json`,
onnxruntime's outputs of the same `tensorrt/<stage>.onnx`, within atol {atol:g} or rtol {rtol:g} per element.
A stage that fails stops the script with Polygraphy's report.

| stage | built by | min shapes | opt shapes | max shapes |
| --- | --- | --- | --- | --- |
{rows}
"""
