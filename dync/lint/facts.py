"""TensorRT's ONNX-parser operator support matrix: which ops it supports, for which types, with what restrictions.

The matrix ships as `dync/data/tensorrt_onnx_operators.json`, transcribed from onnx-tensorrt's
`docs/operators.md`; reading it needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dync.errors import LintError

FACTS_RESOURCE = "data/tensorrt_onnx_operators.json"

# Typos in the upstream table, kept verbatim in the data file and corrected on load.
_TYPE_ALIASES = {"INF64": "INT64"}


@dataclass(frozen=True)
class OpFacts:
    """One row of the parser's support matrix."""

    name: str
    supported: bool
    types: frozenset[str]
    restrictions: str


@dataclass(frozen=True)
class OperatorFacts:
    """The whole matrix plus the opset range and TensorRT version it describes."""

    operators: dict[str, OpFacts]
    opset_min: int
    opset_max: int
    tensorrt_version: str
    source: str = ""


def load_operator_facts(path: Path | None = None) -> OperatorFacts:
    """Read the support matrix; by default the copy shipped inside the package (works from a wheel too)."""
    where = str(path) if path is not None else f"dync/{FACTS_RESOURCE}"
    source = Path(path) if path is not None else resources.files("dync").joinpath(FACTS_RESOURCE)
    try:
        return _facts_from_json(json.loads(source.read_text()))
    except OSError as exc:
        raise LintError(f"cannot read the TensorRT operator facts {where} ({exc}); pass an existing file.") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LintError(
            f"{where} is not a TensorRT operator support matrix ({exc!r}); "
            "use a file shaped like dync's tensorrt_onnx_operators.json."
        ) from exc


def _facts_from_json(raw: dict[str, Any]) -> OperatorFacts:
    operators = {
        name: OpFacts(
            name=name,
            supported=bool(row["supported"]),
            types=frozenset(_TYPE_ALIASES.get(t, t) for t in row.get("types", []) if t),
            restrictions=_clean_text(row.get("restrictions", "")),
        )
        for name, row in raw["operators"].items()
    }
    return OperatorFacts(
        operators=operators,
        opset_min=int(raw["opset_min"]),
        opset_max=int(raw["opset_max"]),
        tensorrt_version=str(raw["tensorrt_version"]),
        source=str(raw.get("source", "")),
    )


def _clean_text(text: str) -> str:
    """The upstream table is Markdown with HTML line breaks; one line of plain text reads better in a report."""
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())
