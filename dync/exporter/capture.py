"""Capture a model's forward as one ONNX graph whose outputs are its exits, with a dynamic batch axis.

Capture uses `torch.onnx.export(dynamo=True)`, i.e. `torch.export`: unlike tracing, it refuses a Python `if`
on a tensor value instead of silently baking one branch in, which is what a dynamic network's author must
hear about. Exits are the forward's returned tensors (a list/tuple for multi-exit models).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import torch

from dync.errors import CaptureError
from dync.exporter import rewrites
from dync.exporter.repairs import repair_translation_defects
from dync.package import BATCH_DIM

INPUT_NAME = "input"


@dataclass
class Captured:
    """The full graph: one input, and one output per exit named `exit{k}`; `repairs` says which translation
    defects were repaired in it (`repairs.py`)."""

    model: onnx.ModelProto
    input_name: str
    exit_names: list[str]
    repairs: list[str] = field(default_factory=list)


class _SelectExits(torch.nn.Module):
    """Returns the chosen exits, in the chosen order, so capture drops what no chosen exit needs."""

    def __init__(self, model: torch.nn.Module, exits: Sequence[int] | None) -> None:
        super().__init__()
        self.model = model
        self.exits = list(exits) if exits is not None else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = _as_exit_list(self.model(x))
        return outputs if self.exits is None else [outputs[i] for i in self.exits]


def _as_exit_list(outputs: object) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise CaptureError(
        f"the model's forward returned {type(outputs).__name__}, not a tensor or a list/tuple of exit tensors; "
        "make forward return the exits' logits as a list, earliest exit first."
    )


def eager_exits(model: torch.nn.Module, x: torch.Tensor, exits: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Run the eager model once; a failure here means the input shape is wrong for this model."""
    try:
        with torch.no_grad():
            outputs = _as_exit_list(model(x))
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(
            f"the model rejected an input of shape {list(x.shape)} ({type(exc).__name__}: {exc}); "
            "pass the shape it expects with --input-shape, e.g. 16x3x32x32."
        ) from exc
    if exits is None:
        return outputs
    bad = [i for i in exits if not -len(outputs) <= i < len(outputs)]
    if bad or len(set(exits)) != len(exits):
        raise CaptureError(
            f"--exits {list(exits)} is not a list of distinct indices into the model's {len(outputs)} outputs; "
            f"pick from 0..{len(outputs) - 1}."
        )
    return [outputs[i] for i in exits]


def check_exit_shapes(outputs: list[torch.Tensor], batch: int) -> None:
    """The runtime scatters every exit into one `logits` array, so exits must agree on the per-sample shape."""
    for k, out in enumerate(outputs):
        if out.dim() == 0 or out.shape[0] != batch:
            raise CaptureError(
                f"exit {k} has shape {list(out.shape)}, without the batch of {batch} first; "
                "dync needs every output to keep the batch as its first axis."
            )
        if out.shape[1:] != outputs[0].shape[1:]:
            raise CaptureError(
                f"exit {k} gives per-sample shape {list(out.shape[1:])} but exit 0 gives {list(outputs[0].shape[1:])}; "
                "select exits of one kind with --exits."
            )


def capture(model: torch.nn.Module, example: torch.Tensor, exits: Sequence[int] | None = None) -> Captured:
    """Export the full multi-exit graph with a dynamic batch; exit k becomes graph output `exit{k}`."""
    outputs = eager_exits(model, example, exits)
    check_exit_shapes(outputs, example.shape[0])
    exit_names = [f"exit{k}" for k in range(len(outputs))]
    wrapped = _SelectExits(model, exits)
    wrapped.training = False  # not .eval(): it would recurse into modules that refuse it (see eval_mode)
    try:
        with quiet_torch_onnx(), rewrites.recognize_per_sample_convs(model):
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=exit_names,
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                custom_translation_table=rewrites.translations(),
                verbose=False,
            )
    except CaptureError:
        raise
    except Exception as exc:
        raise _explain_capture_failure(exc) from exc
    graph_outputs = [o.name for o in program.model_proto.graph.output]
    assert graph_outputs == exit_names, f"capture renamed the exits: {graph_outputs}"
    _check_batch_kept(program.model_proto, wrapped, example)
    model, repairs = repair_translation_defects(program.model_proto)
    return Captured(model=model, input_name=INPUT_NAME, exit_names=exit_names, repairs=repairs)


def _check_batch_kept(model: onnx.ModelProto, wrapped: torch.nn.Module, example: torch.Tensor) -> None:
    """torch.onnx falls back to a static batch when torch.export specializes it; such a graph takes one batch
    size only, so it is refused with the source line that fixed the batch."""
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value"):
        site = _specialization_site(wrapped, example)
        raise CaptureError(
            f"the forward fixes the batch size to the example's {batch.dim_value}{site}, so the package would "
            "take no other batch; compute the batch from x.shape[0] with integer arithmetic (a // b, not "
            "int(a / b)) or let view/reshape infer it with -1."
        )


def _specialization_site(model: torch.nn.Module, example: torch.Tensor) -> str:
    """' at FILE:LINE (`code`)': the first model line where torch.export specialized the batch, found by
    tracing once more with `torch.export.draft_export`, which records each guard with its user stack; empty
    when it records none."""
    with quiet_torch_onnx():
        try:
            report = torch.export.draft_export(model, (example,), dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
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


def _explain_capture_failure(exc: Exception) -> CaptureError:
    text = _exception_chain_text(exc)
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
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return CaptureError(
        f"torch.export could not capture the forward ({first_line}); "
        "see https://pytorch.org/docs/stable/export.html for supported constructs."
    )


def _exception_chain_text(exc: BaseException) -> str:
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


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
    """torch.onnx and torch.export print progress and warnings of their own; dync reports its own steps."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
