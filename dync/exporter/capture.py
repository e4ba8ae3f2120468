"""Capture a model's forward as one ONNX graph whose outputs are its exits, with a dynamic batch axis.

Capture uses `torch.onnx.export(dynamo=True)`, i.e. `torch.export`: unlike tracing, it refuses a Python `if`
on a tensor value instead of silently baking one branch in, which is what a dynamic network's author must
hear about. Inputs are the example's (`example.py`), all sharing one symbolic batch; exits are picked out
of whatever the forward returns (`outputs.py`), and nothing else it returns is kept.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dync.errors import CaptureError
from dync.exporter import outputs as outputs_module
from dync.exporter import rewrites
from dync.exporter.example import INPUT_NAME, Example, by_keyword, call_model
from dync.exporter.probe import ORT_ERRORS
from dync.exporter.repairs import repair_translation_defects
from dync.exporter.symbolic_batch import symbolic_batch
from dync.graph import innermost_frame
from dync.package import BATCH_DIM
from dync.plugins.splice import decompose_custom_nodes
from dync.records import BatchFixRecord


@dataclass
class Captured:
    """The full graph: the model inputs, and one output per exit named `exit{k}`; `output_paths` says where
    each exit is in what the forward returns (`outputs.py`), `picked` how it was chosen when that was a guess,
    `repairs` which translation defects were repaired in the graph (`repairs.py`), and `batch_fix` how a forward
that fixes the batch was made to take any (`symbolic_batch.py`). `program` is the ExportedProgram the graph
was translated from: the graph's tensors carry its node names, which is how a wrong tensor is found."""

    model: onnx.ModelProto
    input_names: list[str]
    exit_names: list[str]
    output_paths: list[str]
    picked: str | None = None
    repairs: list[str] = field(default_factory=list)
    batch_fix: BatchFixRecord | None = None
    program: torch.export.ExportedProgram | None = None


class _SelectExits(torch.nn.Module):
    """Calls the model as the example says and returns the chosen exits in the chosen order, so capture drops
    what no chosen exit needs (auxiliary outputs included)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], paths: Sequence[str],
                 exits: Sequence[int] | None) -> None:
        super().__init__()
        self.model = model
        self.names, self.paths = list(names), list(paths)
        self.exits = list(exits) if exits is not None else None

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        outputs = outputs_module.pick(call_model(self.model, self.names, inputs), self.paths)
        return outputs if self.exits is None else [outputs[i] for i in self.exits]


def eager_exits(model: torch.nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor],
                paths: Sequence[str] | None, exits: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The exits of one eager run, at `paths` (None: the forward returns the exits, as packages written before
    output paths assume); a failure here means the inputs do not fit this model."""
    outputs = _eager_outputs(model, names, inputs)
    return _selected(outputs_module.pick(outputs, paths) if paths is not None else _legacy_exits(outputs), exits)


def _selected(found: list[torch.Tensor], exits: Sequence[int] | None) -> list[torch.Tensor]:
    if exits is None:
        return found
    _check_exit_indices(exits, len(found))
    return [found[i] for i in exits]


def _eager_outputs(model: torch.nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> object:
    try:
        with torch.no_grad():
            return call_model(model, names, inputs)
    except CaptureError:
        raise
    except Exception as exc:
        given = (f"an input of shape {list(inputs[0].shape)}" if not by_keyword(names) else
                 "the inputs " + ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, inputs, strict=True)))
        raise CaptureError(
            f"the model rejected {given} ({type(exc).__name__}: {exc}); pass the shape it expects with "
            "--input-shape, e.g. 16x3x32x32, or its arguments with --example EXAMPLE.npz."
        ) from exc


def _legacy_exits(outputs: object) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise CaptureError(f"the model's forward returned {type(outputs).__name__}, not the exits this package was "
                       "exported with; verify against the model the package came from.")


def _check_exit_indices(exits: Sequence[int], count: int) -> None:
    bad = [i for i in exits if not -count <= i < count]
    if bad or len(set(exits)) != len(exits):
        raise CaptureError(
            f"--exits {list(exits)} is not a list of distinct indices into the model's {count} exits; "
            f"pick from 0..{count - 1}."
        )


def check_exit_shapes(outputs: list[torch.Tensor], batch: int) -> None:
    """The runtime compacts and scatters exits by sample, so every exit keeps the batch as its first axis."""
    for k, out in enumerate(outputs):
        if out.dim() == 0 or out.shape[0] != batch:
            raise CaptureError(
                f"exit {k} has shape {list(out.shape)}, without the batch of {batch} first; "
                "dync needs every output to keep the batch as its first axis."
            )


def capture(model: torch.nn.Module, example: Example | torch.Tensor, exits: Sequence[int] | None = None,
            outputs: Sequence[str] | None = None) -> Captured:
    """Export the full multi-exit graph with a dynamic batch shared by every input; exit k becomes graph output
    `exit{k}`. `outputs` names the exits in the forward's returned structure (default: `default_paths`)."""
    if isinstance(example, torch.Tensor):
        example = Example({INPUT_NAME: example.numpy()})
    tensors = example.tensors()
    returned = _eager_outputs(model, example.names, tensors)
    paths, picked = outputs_module.exit_paths(returned, outputs)
    found = _selected(outputs_module.pick(returned, paths), exits)
    check_exit_shapes(found, example.batch)
    exit_names = [f"exit{k}" for k in range(len(found))]
    wrapped = _SelectExits(model, example.names, paths, exits)
    wrapped.training = False  # not .eval(): it would recurse into modules that refuse it (see eval_mode)
    program = _onnx_program(wrapped, tensors, example.names, exit_names, "dynamic")
    graph, repairs = repair_translation_defects(program.model_proto)
    eager_program, batch_fix = program.exported_program, None
    if _fixed_batch(graph) or not _exits_follow_batch(graph, example):
        graph, eager_program, batch_fix = _any_batch_graph(wrapped, program, example, exit_names)
        graph, repairs = repair_translation_defects(graph)
    return Captured(model=graph, input_names=example.names, exit_names=exit_names, output_paths=paths,
                    picked=picked, repairs=repairs, batch_fix=batch_fix, program=eager_program)


def _onnx_program(wrapped: torch.nn.Module, tensors: tuple[torch.Tensor, ...], names: list[str],
                  exit_names: list[str], mode: str) -> torch.onnx.ONNXProgram:
    """torch.onnx's program of the wrapped forward: the graph, and the ExportedProgram it was translated from.
    `mode`: "dynamic" (every input's first axis is one symbolic
    batch, traced by torch.export's non-strict tracer), "bytecode" (each first axis dynamic, traced by
    TorchDynamo, which keeps `int()` of a float batch symbolic where the non-strict tracer specializes it), or
    "static" (the example's shapes). TorchDynamo refuses the global module hooks that recognize per-sample
    convs, so "bytecode" graphs keep those convs as the model wrote them."""
    assert mode in ("dynamic", "bytecode", "static")
    batch = torch.export.Dim(BATCH_DIM)
    recognize = contextlib.nullcontext() if mode == "bytecode" else rewrites.recognize_per_sample_convs(wrapped.model)
    try:
        with quiet_torch_onnx(), recognize, rewrites.recognize_flex_attention(wrapped.model):
            if mode == "bytecode":
                model: torch.nn.Module | torch.export.ExportedProgram = torch.export.export(
                    wrapped, tensors, dynamic_shapes=(tuple({0: torch.export.Dim.DYNAMIC} for _ in tensors),),
                    strict=True)
                args: tuple = ()
            else:
                model, args = wrapped, tensors
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=names,
                output_names=exit_names,
                dynamic_shapes=(tuple({0: batch} for _ in tensors),) if mode == "dynamic" else None,  # *inputs
                custom_translation_table=rewrites.translations(),
                verbose=False,
            )
    except CaptureError:
        raise
    except Exception as exc:
        raise _explain_capture_failure(exc, lambda: torch.export.export(wrapped, tensors, strict=False)) from exc
    graph_outputs = [o.name for o in program.model_proto.graph.output]
    assert graph_outputs == exit_names, f"capture renamed the exits: {graph_outputs}"
    return program


def _fixed_batch(model: onnx.ModelProto) -> bool:
    """torch.onnx falls back to a static batch when torch.export specializes it."""
    return any(i.type.tensor_type.shape.dim[0].HasField("dim_value") for i in model.graph.input)


def _exits_follow_batch(model: onnx.ModelProto, example: Example) -> bool:
    """Whether the graph gives the example's first sample alone what it gives it within the example batch.
    A graph whose input batch is symbolic can still hold the example's batch in a reshape (torch.export may
    specialize without saying so), and then it computes garbage at any other batch."""
    session = ort.InferenceSession(decompose_custom_nodes(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    try:
        whole = session.run(None, example.arrays)
        alone = session.run(None, {name: a[:1] for name, a in example.arrays.items()})
    except ORT_ERRORS:
        return False
    return all(a.shape == w[:1].shape and np.allclose(a, w[:1], rtol=1e-4,
                                                      atol=1e-5 + 1e-4 * float(np.abs(w).max(initial=0)))
               for a, w in zip(alone, whole, strict=True))


def _any_batch_graph(wrapped: torch.nn.Module, captured: torch.onnx.ONNXProgram, example: Example, exit_names: list[str]
                     ) -> tuple[onnx.ModelProto, torch.export.ExportedProgram, BatchFixRecord]:
    """A graph for every batch from a forward that fixes it: traced again by TorchDynamo; failing that, from
    static captures at the example's batch and at one sample more (`symbolic_batch`)."""
    tensors = example.tensors()
    site = _specialization_site(wrapped, tensors)
    located = site.removeprefix(" at ") or "a line torch.export did not name"
    try:
        traced = _onnx_program(wrapped, tensors, example.names, exit_names, "bytecode")
    except CaptureError:
        traced = None
    traced_graph = traced.model_proto if traced is not None else None  # each read serializes the program
    if traced_graph is not None and not _fixed_batch(traced_graph) and _exits_follow_batch(
            repair_translation_defects(traced_graph)[0], example):
        record = BatchFixRecord(site=located, method="bytecode", captures=[example.batch], constants=[])
        return traced_graph, traced.exported_program, record
    b1 = example.batch
    captured_graph = captured.model_proto
    first = captured if _fixed_batch(captured_graph) else _onnx_program(wrapped, tensors, example.names,
                                                                        exit_names, "static")
    grown = tuple(torch.cat([t, t[:1]]) for t in tensors)
    second = _onnx_program(wrapped, grown, example.names, exit_names, "static")
    graph, constants = symbolic_batch(first.model_proto, b1, second.model_proto, b1 + 1, site)
    record = BatchFixRecord(site=located, method="two captures", captures=[b1, b1 + 1], constants=constants)
    return graph, first.exported_program, record


def _specialization_site(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """' at FILE:LINE (`code`)': the first model line where torch.export specialized the batch, found by
    tracing once more with `torch.export.draft_export`, which records each guard with its user stack; empty
    when it records none."""
    with quiet_torch_onnx():
        try:
            batch = torch.export.Dim(BATCH_DIM)
            report = torch.export.draft_export(model, inputs, dynamic_shapes=(tuple({0: batch} for _ in inputs),),
                                               strict=False)._report
        except Exception as exc:  # the site is a hint on top of the error, which stands without it
            return f" (torch.export.draft_export could not locate the line: {type(exc).__name__})"
    for failure in report.failures:
        frames = failure.data.get("user_stack") if isinstance(failure.data, dict) else None
        if frames:
            frame = frames[-1]
            file = report.str_to_filename.get(frame["filename"]) or _interned_filenames().get(frame["filename"], "?")
            return f" at {file}:{frame['line']} (`{frame['loc']}`)"
    return ""


def _explain_capture_failure(exc: Exception, retrace: Callable[[], torch.export.ExportedProgram]) -> CaptureError:
    """One sentence for a failed capture; `retrace` traces the forward again, for the line of an op torch.onnx
    has no translation for (its failure names only the program node)."""
    text = _exception_chain_text(exc)
    untranslated = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if untranslated:
        node = re.search(r"Error when translating node %(\w+)", text)
        op = f"{untranslated.group(1)}.{untranslated.group(2)}"
        return CaptureError(
            f"torch.onnx has no translation for {op}{_program_line(retrace, node.group(1)) if node else ''}; "
            "write that line with ops ONNX has (e.g. a median as x.sort(dim).values.select(dim, (n - 1) // 2)), "
            "or give torch.onnx a translation for it."
        )
    if "GuardOnDataDependentSymNode" in text or "data-dependent" in text:
        where = _user_frame(text)
        return CaptureError(
            f"the forward branches on a tensor's value{where}, which cannot be captured as a static graph; "
            "return every exit's output (a list of logits) instead of choosing one in Python, and dync will "
            "make the per-sample choice at run time."
        )
    if "Constraints violated" in text or "specialized" in text:
        return CaptureError(
            "the forward fixes the batch size (e.g. a reshape with a literal batch or a loop over the batch), "
            "so the package could not take any batch; use x.flatten(1) or x.view(x.size(0), -1) instead."
        )
    node = re.search(r"Error when translating node %(\w+) : .*?target=([\w.]+)", text)
    if node is not None or "step 2/3" in text or "step 3/3" in text:
        op = f" of {node.group(2).removeprefix('torch.ops.')}" if node else ""
        where = _program_line(retrace, node.group(1)) if node else ""
        return CaptureError(
            f"torch.onnx could not translate the captured forward{op}{where} ({_innermost_cause(exc)}); write "
            "that line with other ops, or report it to torch.onnx with this message."
        )
    return CaptureError(
        f"torch.export could not capture the forward ({_innermost_cause(exc)}); "
        "see https://pytorch.org/docs/stable/export.html for supported constructs."
    )


def _innermost_cause(exc: BaseException) -> str:
    """The first line of the deepest exception in the chain (torch.onnx wraps the real cause in several
    layers), without terminal colour codes."""
    for cause in reversed(_exception_chain(exc)):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
        if text:
            return f"{type(cause).__name__}: {text.splitlines()[0]}"
    return type(exc).__name__


def _program_line(retrace: Callable[[], torch.export.ExportedProgram], name: str) -> str:
    """' at FILE:LINE (`code`)' of the program node `name`, from a fresh trace; empty when that fails."""
    try:
        with quiet_torch_onnx():
            program = retrace()
    except Exception:  # the line is a hint on top of the error, which stands without it
        return ""
    node = next((n for n in program.graph.nodes if n.name == name), None)
    frame = innermost_frame((node.meta.get("stack_trace") or "") if node is not None else "")
    found = re.match(r'File "([^"]+)", line (\d+)', frame)
    return f" at {found.group(1)}:{found.group(2)}" if found else ""


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first (each exception once)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _exception_chain_text(exc: BaseException) -> str:
    return "\n".join(f"{type(e).__name__}: {e}" for e in _exception_chain(exc))


def _user_frame(text: str) -> str:
    """The model source line torch.export blamed, if it named one."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "The following call raised this error" in line and i + 1 < len(lines):
            location = lines[i + 1].strip()
            code = lines[i + 2].strip() if i + 2 < len(lines) else ""
            return f" at {location} (`{code}`)"
    return ""


def _interned_filenames() -> dict[int, str]:
    """torch's structured logs name files by interned ids; a file interned by an earlier trace in this process
    is not in the draft report's own table."""
    from torch._logging.structured import INTERN_TABLE

    return {index: name for name, index in INTERN_TABLE.items()}


@contextlib.contextmanager
def quiet_torch_onnx():
    """torch.onnx and torch.export print progress, warnings and graph dumps of their own (to stdout, stderr and
    their loggers); dync reports its own steps, and a failure as one line."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                                                    "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
