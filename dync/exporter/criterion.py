"""The exit criterion an export writes into its package: a built-in name, or a user's PyTorch function.

`--criterion module:function` names an importable function from logits [B, C] (float32, flattened per sample as
the runtime flattens them) to one confidence per sample [B], higher meaning more confident. Its values must lie
in [0, 1], like the built-ins', so that thresholds keep their meaning (0 always exits, above 1 never does).
Because the runtime runs without torch, the function is exported with `torch.onnx.export(dynamo=True)` into a
small graph with a dynamic batch, one per class count among the exits (`criteria/NAME_cC.onnx`), and each graph
is checked against the function on random and saturated logits before the package is written.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from dync.errors import InputError
from dync.exporter.capture import quiet_torch_onnx
from dync.package import BATCH_DIM, Manifest
from dync.runtime.backends.ort import OrtSettings, session_from_onnx
from dync.runtime.exit_rule import BUILTIN_CRITERIA

CRITERIA_DIR = "criteria"
CHECK_BATCHES = (1, 3, 8)
"""Batches the exported graph is checked at; the capture sees the last, so the others test the dynamic batch."""
RTOL, ATOL = 1e-5, 1e-6
"""How close the graph must be to the function: float32 rounding, not a different function."""

Function = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExitCriterion:
    """What `--criterion` named: a built-in (no function) or `module:function` with the function imported."""

    name: str
    function: Function | None = None

    def attach(self, manifest: Manifest) -> dict[str, onnx.ModelProto]:
        """Set every exit's criterion in `manifest`; return the ONNX graphs the package must hold, by path."""
        graphs: dict[str, onnx.ModelProto] = {}
        for spec in manifest.exits:
            spec.criterion = self.name
            if self.function is None:
                continue
            assert spec.shape is not None, "the exporter records every exit's shape"
            classes = math.prod(int(d) for d in spec.shape[1:])
            spec.criterion_onnx = f"{CRITERIA_DIR}/{self.name.rsplit(':', 1)[1]}_c{classes}.onnx"
            if spec.criterion_onnx not in graphs:
                graphs[spec.criterion_onnx] = self.graph(classes)
        return graphs

    def graph(self, classes: int) -> onnx.ModelProto:
        """The function as a checked ONNX graph of logits [batch, classes] -> confidence [batch]."""
        checks = _check_logits(classes)
        for logits in checks:
            self._check_values(logits)
        try:
            with quiet_torch_onnx():
                program = torch.onnx.export(_AsModule(self.function), (checks[-1],), dynamo=True,
                                            input_names=["logits"], output_names=["confidence"],
                                            dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), verbose=False)
        except Exception as exc:
            cause = exc
            while cause.__cause__ is not None:  # torch.onnx wraps what torch.export said
                cause = cause.__cause__
            said = (str(cause).strip().splitlines() or [""])[0]
            raise InputError(
                f"exit criterion '{self.name}' cannot be exported to ONNX with torch.onnx.export(dynamo=True) "
                f"({type(cause).__name__}: {said}); write it with tensor operations that torch.export captures "
                "(no Python branches on tensor values)."
            ) from exc
        model = program.model_proto
        session = session_from_onnx(model, OrtSettings(threads=1, fixed_batches=0))
        for logits in checks:
            (got,) = session.run(None, {"logits": logits.numpy()})
            expected = self._call(logits).numpy()
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
                difference = (f"shape {list(got.shape)} instead of {list(expected.shape)}"
                              if got.shape != expected.shape
                              else f"by up to {float(np.abs(got - expected).max()):.3g}")
                raise InputError(
                    f"exit criterion '{self.name}' exported to ONNX disagrees with the PyTorch function on logits "
                    f"{list(logits.shape)} ({difference}); compute the confidence from the batch it is given alone, "
                    "with operations torch.onnx exports faithfully (no state kept between calls, no fixed batch size)."
                )
        return model

    def _call(self, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _AsModule(self.function)(logits)

    def _check_values(self, logits: torch.Tensor) -> None:
        """The function on `logits` returns one finite confidence in [0, 1] per sample."""
        try:
            with torch.no_grad():
                values = self.function(logits)
        except Exception as exc:
            raise InputError(
                f"exit criterion '{self.name}' failed on float32 logits of shape {list(logits.shape)} "
                f"({type(exc).__name__}: {exc}); make it take logits [B, C] and return a confidence per sample [B]."
            ) from exc
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            kind = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise InputError(f"exit criterion '{self.name}' returned {kind}, not a float tensor; return one "
                             "float confidence per sample [B].")
        if tuple(values.shape) != (len(logits),):
            raise InputError(f"exit criterion '{self.name}' returned shape {list(values.shape)} for logits "
                             f"{list(logits.shape)}; return one confidence per sample, shape [{len(logits)}].")
        if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise InputError(
                f"exit criterion '{self.name}' returned values from {values.min().item():.4g} to "
                f"{values.max().item():.4g} on logits {list(logits.shape)}, outside [0, 1]; map it into [0, 1] "
                "(0 least, 1 most confident) so that thresholds keep their meaning."
            )


class _AsModule(torch.nn.Module):
    """The function as the module torch.onnx exports, its output float32 as every criterion's is."""

    def __init__(self, function: Function) -> None:
        super().__init__()
        self.function = function

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.function(logits).to(torch.float32)


def _check_logits(classes: int) -> list[torch.Tensor]:
    """Logits at CHECK_BATCHES: random at several scales, and saturated rows (one class far ahead)."""
    generator = torch.Generator().manual_seed(0)
    checks = []
    for i, batch in enumerate(CHECK_BATCHES):
        logits = torch.randn(batch, classes, generator=generator) * (1.0, 10.0, 3.0)[i % 3]
        logits[0, 0] += 50.0
        checks.append(logits)
    return checks


def parse_criterion(spec: str) -> ExitCriterion:
    """`spec` as a built-in name, or `module:function` with the module imported and the function found."""
    if spec in BUILTIN_CRITERIA:
        return ExitCriterion(spec)
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name.isidentifier():
        raise InputError(f"exit criterion '{spec}' is neither a built-in ({', '.join(BUILTIN_CRITERIA)}) nor "
                         "module:function; give one of those, e.g. --criterion mypackage.exits:confidence.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InputError(f"exit criterion '{spec}': module '{module_name}' cannot be imported "
                         f"({type(exc).__name__}: {exc}); put its directory on PYTHONPATH.") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        found = "nothing" if function is None else f"a {type(function).__name__}"
        raise InputError(f"exit criterion '{spec}': {getattr(module, '__file__', module_name)} defines {found} "
                         f"named '{function_name}'; name a function of logits [B, C] -> confidence [B] in it.")
    return ExitCriterion(spec, function)


def write_graphs(package_dir: Path, graphs: dict[str, onnx.ModelProto]) -> None:
    """The criterion graphs `ExitCriterion.attach` returned, into the package."""
    for path, model in graphs.items():
        (package_dir / path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, package_dir / path)
