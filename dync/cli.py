"""The `dync` command line: export, inspect, run, verify, bench, calibrate, quantize, profile, demo.

Every user-facing failure is a `DyncError` and is printed as one line without a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from dync.errors import DyncError, InputError
from dync.extras import require, require_export


class _Group(click.Group):
    """Turns DyncError and bad option values into a one-line message and exit status 1; any other exception
    too, with a hint to rerun with --debug, which lets it through with its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DyncError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except click.UsageError as exc:  # a bad option value: one line too, naming the option
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: internal error ({type(exc).__name__}{': ' + first if first else ''}); rerun with "
                       "dync --debug ... for the traceback, and report it.", err=True)
            sys.exit(1)


def _threads_bound() -> int:
    """More threads than 4 per core only slow onnxruntime down and can stall the machine."""
    return 4 * (os.cpu_count() or 1)


def _progress(message: str) -> None:
    click.echo(f"dync: {message}", err=True)


def _separated(convert: Callable[[str], Any], separator: str, example: str) -> Callable[..., list | None]:
    """A click callback parsing `value` as a list of numbers such as '16x3x32x32' or '0.9,0.8'."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list | None:
        if value is None:
            return None
        try:
            return [convert(v) for v in value.lower().split(separator)]
        except ValueError:
            raise click.BadParameter(f"'{value}' is not {example}.") from None

    return parse


_parse_shape = _separated(int, "x", "a shape like 16x3x32x32")
_parse_floats = _separated(float, ",", "a comma-separated list of numbers like 0.9,0.8")
_parse_exits = _separated(int, ",", "a comma-separated list of exit indices like 0,2,4")
_parse_sizes = _separated(int, ",", "a comma-separated list of batch sizes like 1,8,64")


def _parse_paths(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    """'logits,aux.0' as output paths (`dync.exporter.outputs`); case is kept, since they are dict keys."""
    return None if value is None else [path.strip() for path in value.split(",")]


@dataclass(frozen=True)
class _BackendChoice:
    """The backend `run`, `bench`, `calibrate` and `profile` load a package on, with that backend's options."""

    backend: str
    threads: int
    fixed_batches: int
    providers: list[str] | None
    engine_batch: str | None

    def load(self, package: Path, precision: str | None) -> Any:
        import dync

        if self.backend == "trt":
            if self.providers:
                raise InputError("--providers chooses onnxruntime's execution providers; it does not apply to "
                                 "--backend trt, which runs TensorRT engines itself.")
            return dync.load(package, backend="trt", precision=precision, batch=self.engine_batch,
                             progress=_progress)
        if self.engine_batch is not None:
            raise InputError("--engine-batch is the TensorRT engines' batch range; use it with --backend trt.")
        providers = {"providers": self.providers} if self.providers else {}
        return dync.load(package, backend=self.backend, precision=precision, threads=self.threads,
                         fixed_batches=self.fixed_batches, **providers)


def _backend_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--backend` and its options, handed to the command as one `backend: _BackendChoice`."""

    @functools.wraps(command)
    def with_backend(*args: Any, backend: str, threads: int, fixed_batches: int, providers: str | None,
                     engine_batch: str | None, **kwargs: Any) -> Any:
        names = [p.strip() for p in providers.split(",")] if providers else None
        return command(*args, backend=_BackendChoice(backend, threads, fixed_batches, names, engine_batch), **kwargs)

    options = [
        click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
                     help="onnxruntime, or TensorRT engines (built on first use; see dync build)."),
        click.option("--threads", default=0, show_default=True, type=click.IntRange(0, _threads_bound()),
                     help="onnxruntime intra-op threads (0: one per core)."),
        click.option("--fixed-batches", default=8, show_default=True,
                     help="Batch sizes per stage that get a fixed-shape onnxruntime session (0: none)."),
        click.option("--providers", metavar="NAME,...",
                     help="onnxruntime execution providers in order, e.g. TensorrtExecutionProvider,"
                          "CUDAExecutionProvider (needs onnxruntime-gpu; default: the CPU)."),
        click.option("--engine-batch", metavar="MIN:OPT:MAX",
                     help="With --backend trt: the engines' batch range (default: what dync build used)."),
    ]
    for option in reversed(options):
        with_backend = option(with_backend)
    return with_backend


def _precision_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--precision` for the commands that run a package: the stages `dync quantize` wrote, or float32."""
    return click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
                        help="Run the float32 stages or the quantized ones (default: what the package holds; "
                             "see dync quantize); fp16: TensorRT engines only (--backend trt).")(command)


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a .npy array file ({exc}); save the batch with numpy.save.") from exc


def _load_inputs(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    from dync.inputs import load_inputs

    return load_inputs(path)


def _parse_crossover(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """'auto' (None: measure) or a density in [0, 1]."""
    if value == "auto":
        return None
    try:
        density = float(value)
    except ValueError:
        density = -1.0
    if not 0.0 <= density <= 1.0:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a density between 0 and 1, e.g. 0.5.")
    return density


@click.group(cls=_Group)
@click.version_option(package_name="dync")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dync: deploy dynamic (multi-exit) neural networks with real per-sample early exit."""
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Package directory to write.")
@click.option("--input-shape", callback=_parse_shape, help="Example input shape, batch first (default 16x3x32x32).")
@click.option("--example", "example", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An .npz with one array per forward argument, keyed by its name, batch first (float or integer).")
@click.option("--outputs", callback=_parse_paths,
              help="Which returned entries are the exits, e.g. logits or 0 or exits (a list), comma-separated.")
@click.option("--exits", callback=_parse_exits, help="Exits to keep, in compute order, e.g. 0,2,4.")
@click.option("--name", help="Package name (default: the output directory's name).")
@click.option("--lower-spatial/--no-lower-spatial", default=True, show_default=True,
              help="Run masked bottlenecks as gather-scatter, exact against eager (--no-lower-spatial is "
                   "--no-pass spatial).")
@click.option("--ops", type=click.Choice(["portable", "plugins"]), default="portable", show_default=True,
              help="portable: standard ONNX (onnxruntime); plugins: dync:: nodes for TensorRT's plugins.")
@click.option("--spatial-crossover", callback=_parse_crossover, default="auto", show_default=True,
              help="Mask density above which a lowered block runs dense: 'auto' measures it per block here.")
@click.option("--no-pass", "skip_passes", multiple=True, metavar="NAME",
              help="Skip an exporter pass (spatial, tokens, sparse_attention, attention); repeat for several.")
@click.option("--force", is_flag=True, help="Replace an existing package at -o (its calibration is not kept).")
@click.option("--trust-pickle", is_flag=True,
              help="Load a pickled MODEL (torch.save): unpickling runs code from the file (also DYNC_TRUST_PICKLE=1).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the package against eager PyTorch at the example batch and batches 1 and 3 before "
                   "writing it.")
@click.option("--criterion", default="max_softmax", show_default=True, metavar="NAME|MODULE:FUNCTION",
              help="Exit confidence: max_softmax, entropy, margin, or a PyTorch function of logits [B, C] -> "
                   "confidence [B] in [0, 1] (its module on PYTHONPATH), exported into the package.")
@click.option("--sparse-attention", "sparse_attention", metavar="SPEC",
              help="Make every softmax attention block-sparse: tile:T=..,H=..,W=..,tile=AxBxC,window=AxBxC (a static "
                   "3-D tile window over raster-order tokens) or meansim:cdf=..|topk=..[,sim=..][,block=128] (per "
                   "input); add dense-until=0.3[,timestep=t][,t-max=1000] to keep early denoising steps dense.")
@click.option("--attention-fp8", type=click.Choice(["off", "e4m3", "e5m2"]), default="off", show_default=True,
              help="Round attention's Q, K (per tile) and V (per channel) to fp8; alone, dense fp8 attention.")
def export(model: Path, output: Path, input_shape: list[int] | None, example: Path | None,
           outputs: list[str] | None, exits: list[int] | None, name: str | None, lower_spatial: bool, ops: str,
           spatial_crossover: float | None, skip_passes: tuple[str, ...], force: bool, trust_pickle: bool,
           verify: bool, criterion: str, sparse_attention: str | None, attention_fp8: str) -> None:
    """Export MODEL (torch.save'd module, TorchScript or .pt2) to a .dync package.

    A pickled module is loaded only with --trust-pickle: unpickling runs code from the file.
    """
    require_export("dync export")
    from dync.exporter import export as run_export

    with warnings.catch_warnings():
        warnings.showwarning = _echo_warning
        run_export(model, output, input_shape, exits=exits, name=name, progress=_progress,
                   lower_spatial=lower_spatial, ops=ops, spatial_crossover=spatial_crossover, skip_passes=skip_passes,
                   verify=verify, example=example, outputs=outputs, criterion=criterion, force=force,
                   trust_pickle=trust_pickle, sparse_attention=sparse_attention, attention_fp8=attention_fp8)
    _print_summary(output)


def _echo_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Warnings as one `warning:` line on stderr, in order with the progress lines."""
    click.echo(f"dync: warning: {message}", err=True)


def _print_summary(package: Path) -> None:
    from dync.package import load_manifest

    manifest = load_manifest(package)
    click.echo(f"{package}: {len(manifest.stages)} stage(s), full model {manifest.full_macs / 1e6:.2f} MMACs/sample")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--target", type=click.Choice(["trt"]),
              help="Also lint the stages for a deployment target (trt: TensorRT's ONNX parser); status 1 on errors.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
              help="With --target: lint the stages dync build makes at this precision (fp16: converted from the "
                   "float32 stages; int8, fp8: see dync quantize; default: what the package holds).")
@click.option("--tensorrt", "tensorrt_version", metavar="VERSION",
              help="With --target trt: lint for this TensorRT version (10.3, 10.9, 11.4, ...): its documented "
                   "opsets and plugin support (default: the operator matrix's own, 10.0).")
@click.option("--plugins", type=click.Choice(["aot", "decomposed"]),
              help="With --target trt: keep dync's ops as AOT plugins or lint their decompositions (default: aot "
                   "on TensorRT 10.9 or later, else decomposed).")
def inspect(package: Path, as_json: bool, target: str | None, precision: str | None, tensorrt_version: str | None,
            plugins: str | None) -> None:
    """Show a package's stages, exits, costs and thresholds (and, with --target, what the target cannot run)."""
    from dync.build.cache import EngineCache
    from dync.describe import describe, format_description
    from dync.package import load_manifest

    if target is None and (tensorrt_version is not None or plugins is not None):
        raise InputError("--tensorrt and --plugins say what --target trt lints; add --target trt.")
    manifest = load_manifest(package)
    report = None
    if target is not None:
        from dync.lint import format_lint, lint_package

        report = lint_package(package, target=target, precision=precision, tensorrt_version=tensorrt_version,
                              plugins=plugins)
    engines = EngineCache(package).records()
    if as_json:
        description = describe(manifest, engines)
        if report is not None:
            description["lint"] = report.to_json()
        click.echo(json.dumps(description, indent=2))
    else:
        click.echo(format_description(manifest, engines))
        if report is not None:
            click.echo("\n" + format_lint(report))
    if report is not None and not report.ok:
        sys.exit(1)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A .npy batch shaped like the package input, or an .npz of arrays keyed by input name.")
@click.option("--thresholds", callback=_parse_floats, help="Exit thresholds t0,t1,... (default: the package's).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help=".npz file for logits and exit.")
@_backend_options
@_precision_option
def run(package: Path, input_path: Path, thresholds: list[float] | None, output: Path, backend: _BackendChoice,
        precision: str | None) -> None:
    """Run PACKAGE on a batch with per-sample early exit; write `logits` and `exit` to OUTPUT (with exits of
    different per-sample shapes: `exit`, and `exitK` with its mask `exitK_taken` per exit K)."""
    if not output.parent.is_dir():
        raise InputError(f"the directory of -o {output} does not exist; create it or choose another path.")
    engine = backend.load(package, precision)
    result = engine.run(_load_inputs(input_path), thresholds=thresholds)
    with open(output, "wb") as file:  # a file object: numpy would add .npz to a name without it
        np.savez(file, **result.arrays())
    counts = np.bincount(result.exit, minlength=engine.num_exits).tolist()
    click.echo(f"wrote {output}: {len(result.exit)} samples, exit counts {counts}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), required=True, help="The model the package came from.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A .npy batch (or .npz by input name) to check with (default: random data).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1),
              help="Batch size of the random check data.")
@click.option("--rtol", type=float, help="Allowed error relative to the largest output (default 1e-4; 0.02 for "
              "fp16, 0.1 for int8, 0.25 for fp8).")
@click.option("--atol", default=1e-5, show_default=True, help="Allowed absolute error.")
@click.option("--trust-pickle", is_flag=True,
              help="Load a pickled MODEL (torch.save): unpickling runs code from the file (also DYNC_TRUST_PICKLE=1).")
@_backend_options
@_precision_option
def verify(package: Path, model: Path, input_path: Path | None, batch: int, rtol: float | None, atol: float,
           trust_pickle: bool, backend: _BackendChoice, precision: str | None) -> None:
    """Check every exit path of PACKAGE against eager PyTorch; exit status 1 on mismatch."""
    require_export("dync verify")
    from dync.verify import verify as run_verify

    x = _load_inputs(input_path) if input_path else None
    engine = backend.load(package, precision)
    record = run_verify(engine, model, x=x, batch=batch, rtol=rtol, atol=atol, progress=_progress,
                        trust_pickle=trust_pickle)
    on = "" if engine.backend.name == "ort" else f" on {engine.backend.name}"
    if engine.precision == "fp32" and not on:
        within = "matches eager"
    else:
        within = (f"is within {record.rtol:g} x the largest output of eager float32 ({engine.precision}{on}, "
                  "not recorded)")
    click.echo(f"verified {package}: every exit path {within} (worst abs error "
               f"{max(*record.max_abs_error, record.mixed_max_abs_error):.3g})")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1),
              help="Batch size of random data (ignored with --input).")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A .npy batch (or .npz by input name) to measure on (real data gives realistic exit shares).")
@click.option("--thresholds", callback=_parse_floats,
              help="Exit thresholds (default: the package's, else an even split of the data over the exits).")
@click.option("--repeats", default=15, show_default=True, type=click.IntRange(1),
              help="Timed calls of each variant; medians are reported.")
@click.option("--profile", "with_profile", is_flag=True,
              help="Also print where dync's run spends its time: per stage and per op type (onnxruntime's profiler).")
@_backend_options
@_precision_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench(package: Path, batch: int, input_path: Path | None, thresholds: list[float] | None, repeats: int,
          with_profile: bool, backend: _BackendChoice, precision: str | None, as_json: bool) -> None:
    """Measure PACKAGE against its static full model, side by side under the same session options."""
    from dync.bench import bench as run_bench
    from dync.bench import format_report, format_time_shares, time_shares
    from dync.inputs import batch_of

    if with_profile and backend.backend != "ort":
        raise InputError("bench --profile reads onnxruntime's profiler; use it with --backend ort (for TensorRT's "
                         "layer times, run trtexec --dumpProfile on the engines).")
    engine = backend.load(package, precision)
    x = _load_inputs(input_path) if input_path else engine.example_input(batch)
    _progress(f"timing {repeats} calls of each variant, in alternating blocks, at batch "
              f"{batch_of(engine.input_feeds(x))}")
    report = run_bench(engine, x, thresholds=thresholds, repeats=repeats)
    shares = None
    if with_profile:
        _progress("profiling dync's run with onnxruntime's profiler")
        shares = time_shares(package, x, report.thresholds, precision=engine.precision, threads=backend.threads,
                             fixed_batches=backend.fixed_batches)
    if as_json:
        click.echo(json.dumps({**report.to_json(), **({"time_shares": asdict(shares)} if shares else {})}, indent=2))
    else:
        click.echo(format_report(report) + ("\n\n" + format_time_shares(shares) if shares else ""))


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Validation inputs: a .npy shaped like the package input, or an .npz by input name.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Integer class per validation sample (.npy): pick the most accurate setting, print the curve.")
@click.option("--budget", type=float, help="Average cost as a fraction of the full model, e.g. 0.5.")
@click.option("--metric", type=click.Choice(["flops", "latency"]), default="flops", show_default=True,
              help="Cost measure: MACs, or latency predicted from the package's profile (see `dync profile`).")
@click.option("--budget-ms", type=float, help="With --metric latency: milliseconds per sample.")
@click.option("--batch-size", default=64, show_default=True, help="Deployment batch size for latency prediction.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the accuracy/cost curve and exit histogram to this image (e.g. calib.png).")
@_backend_options
@_precision_option
def calibrate(package: Path, data_path: Path, labels_path: Path | None, budget: float | None, metric: str,
              budget_ms: float | None, batch_size: int, plot_path: Path | None, backend: _BackendChoice,
              precision: str | None) -> None:
    """Choose exit thresholds for a budget and store them in PACKAGE (used by run and bench)."""
    from dync.calib.calibrate import BudgetRequest, calibrate_package, format_calibration
    from dync.inputs import batch_of

    if plot_path is not None and not plot_path.parent.is_dir():
        raise InputError(f"the directory of --plot {plot_path} does not exist; create it or choose another path.")
    if plot_path is not None:  # before calibrating, which stores thresholds: fail before changing the package
        require("matplotlib", "plot", "dync calibrate --plot")
    engine = backend.load(package, precision)
    labels = _load_array(labels_path) if labels_path else None
    request = BudgetRequest(metric=metric, budget=budget, budget_ms=budget_ms, batch_size=batch_size)
    data = _load_inputs(data_path)
    _progress(f"searching thresholds over {batch_of(engine.input_feeds(data))} samples")
    result = calibrate_package(engine, data, request, labels=labels)
    click.echo(format_calibration(result, metric))
    click.echo(f"stored {engine.precision} thresholds in {package}")
    if plot_path:
        from dync.calib.plot import plot_calibration

        click.echo(f"wrote {plot_calibration(result, plot_path, metric)}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Calibration inputs: a .npy shaped like the package input, or an .npz by input name.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Integer class per sample (.npy), for the accuracy of the thresholds chosen again.")
@click.option("--format", "quant_format", type=click.Choice(["int8", "fp8"]), default="int8", show_default=True,
              help="int8 (fast onnxruntime CPU kernels and TensorRT) or fp8 e4m3 (TensorRT; emulated on the CPU).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="onnxruntime's calibrator for the activation ranges.")
@click.option("--min-samples", default=64, show_default=True, type=click.IntRange(1),
              help="A stage fewer samples reach than this is calibrated on all of them.")
@click.option("--quantize-heads", is_flag=True, help="Quantize the exit heads too (by default they stay float).")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Time each stage's op types in int8 against float32 and keep the faster (int8 only; op types "
                   "that cost accuracy stay float either way).")
def quantize(package: Path, data_path: Path, labels_path: Path | None, quant_format: str, method: str,
             min_samples: int, quantize_heads: bool, measure: bool) -> None:
    """Quantize PACKAGE stage by stage, each on the samples that reach it; store the CPU and TensorRT forms."""
    from dync.calib.quantize import QuantizeRequest, format_quantization, quantize_package

    labels = _load_array(labels_path) if labels_path else None
    request = QuantizeRequest(format=quant_format, method=method, min_samples=min_samples, heads=quantize_heads,
                              measure=measure)
    record = quantize_package(package, _load_inputs(data_path), labels, request, progress=_progress)
    click.echo(format_quantization(record))
    click.echo(f"stored the {quant_format} stages in {package}; run, bench, verify and calibrate use them unless "
               "given --precision fp32")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--batch-sizes", callback=_parse_sizes, default="1,2,4,8,16,32,64,128,256", show_default=True,
              help="Batch sizes to measure each stage at.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(1),
              help="Timed rounds per batch size; medians are kept.")
@_backend_options
@_precision_option
def profile(package: Path, batch_sizes: list[int], repeats: int, backend: _BackendChoice,
            precision: str | None) -> None:
    """Measure every stage's latency across batch sizes on this machine and store it in PACKAGE."""
    from dync.calib.profile import profile_stages, save_profile

    engine = backend.load(package, precision)
    path = save_profile(package, profile_stages(engine, batch_sizes, repeats=repeats, progress=_progress))
    click.echo(f"wrote {path}")


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Keep the exported package here.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default="dync_demo_calibration.png",
              show_default=True, help="Where to write the calibration picture.")
def demo(output: Path | None, plot: Path) -> None:
    """Export, verify, run and calibrate the bundled multi-exit digits CNN, with accuracy and speedups."""
    require_export("dync demo")
    require("matplotlib", "plot", "dync demo")
    from dync.demo import run_demo

    run_demo(output, plot, echo=click.echo, progress=_progress)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["trt", "jetson"]), required=True,
              help="trt: engines for this machine's GPU, in PACKAGE/engines/; jetson: a bundle that builds them on "
                   "the device with trtexec.")
@click.option("--batch", default="1:64:256", show_default=True, metavar="MIN:OPT:MAX",
              help="Batch range of the engines; later stages are tuned at OPT x the share of samples reaching them.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
              help="fp16 converts the float32 stages; int8/fp8 use dync quantize's TensorRT form (default: what "
                   "the package holds).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="TensorRT timing cache to read and extend (default: PACKAGE/engines/timing.cache).")
@click.option("--plugins", type=click.Choice(["aot", "decomposed"]),
              help="dync:: ops as tensorrt.plugin plugins (TensorRT >= 10.9, the default there) or as standard ONNX.")
@click.option("--jetpack", help="With --target jetson: the device's JetPack release, e.g. 6.2.")
@click.option("--device", type=click.Choice(["orin", "thor"]), default="orin", show_default=True,
              help="With --target jetson: the Jetson module.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="With --target jetson: the bundle directory.")
def build(package: Path, target: str, batch: str, precision: str | None, timing_cache: Path | None,
          plugins: str | None, jetpack: str | None, device: str, output: Path | None) -> None:
    """Build PACKAGE's TensorRT engines, one per stage, or write a Jetson bundle that builds them on the device."""
    from dync.build.profiles import BatchRange
    from dync.package import default_precision, load_manifest

    batch_range = BatchRange.parse(batch)
    precision = precision or default_precision(load_manifest(package))
    if target == "jetson":
        _write_jetson_bundle(package, output, jetpack, device, precision, batch_range, timing_cache, plugins)
        return
    if jetpack is not None or output is not None:
        raise InputError("--jetpack and -o describe a Jetson bundle; use them with --target jetson.")
    require("polygraphy", "build", "dync build")
    from dync.build import EngineOptions, build_engines, format_builds

    options = EngineOptions(batch=batch_range, precision=precision, plugins=plugins, timing_cache=timing_cache)
    click.echo(format_builds(build_engines(package, options, progress=_progress)))


def _write_jetson_bundle(package: Path, output: Path | None, jetpack: str | None, device: str, precision: str,
                         batch: Any, timing_cache: Path | None, plugins: str | None) -> None:
    if output is None or jetpack is None:
        raise InputError("--target jetson writes a bundle: give the device's release with --jetpack (e.g. 6.2) "
                         "and the bundle directory with -o.")
    if timing_cache is not None or plugins is not None:
        raise InputError("--timing-cache and --plugins apply to --target trt; a Jetson bundle builds with the "
                         "JetPack's TensorRT, which fixes the plugin mode.")
    require("polygraphy", "build", "dync build --target jetson")
    from dync.build.jetson import write_bundle

    record = write_bundle(package, output, jetpack=jetpack, device=device, precision=precision, batch=batch,
                          progress=_progress)
    click.echo(f"wrote {output}: {len(record.stages)} stage(s) for JetPack {record.jetpack} on {record.device} "
               f"(TensorRT {record.tensorrt}, {record.precision}, plugins {record.plugins}); copy it to the device "
               "and run bash build.sh there")

