"""The plugin-op registry: one record per dynamic op, holding every face the op has, built once.

Exporter, runtime, lint and backends look ops up here and nowhere else. A record's ONNX faces (decomposition,
fast CPU path, output shape, MACs) are plain functions of torch-free modules; faces that need torch, triton or
tensorrt (the PyTorch reference, the capture-time translation, the Triton kernel, the TensorRT plugin) are
`Face`s: a module and a name, imported on first use. So the runtime runs every package without torch.

An op family is a subpackage of `dync.plugins` whose `__init__` defines `OPS`, a tuple of `OpRecord`s; the
registry finds the subpackages itself, so adding an op family edits no list.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dync.errors import PluginError

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from dync.graph import Builder

DOMAIN = "dync"
PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")
"""Node attributes for TensorRT's parser (which plugin to load), not op semantics."""

FACES = ("reference", "translation", "decompose", "cpu_fast", "shape", "macs", "triton", "tensorrt")


@dataclass(frozen=True)
class DType:
    """How one element type is named by ONNX tensors, TensorRT and Triton pointers."""

    onnx: str
    tensorrt: str
    triton: str


DTYPES = {
    "float32": DType("tensor(float)", "float32", "fp32"),
    "float16": DType("tensor(float16)", "float16", "fp16"),
    "bfloat16": DType("tensor(bfloat16)", "bfloat16", "bf16"),
    "float8_e4m3fn": DType("tensor(float8e4m3fn)", "fp8", "fp8e4nv"),
}
"""Every element type an op may declare; a record declaring another fails when the registry is built."""


@dataclass(frozen=True)
class Face:
    """A face implemented in a module that imports torch, triton or tensorrt: found by name on first use."""

    module: str
    name: str

    def load(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.name)


Decomposition = Callable[..., None]
"""`(builder, inputs, outputs, **attrs)`: nodes computing `outputs` from `inputs` (graphsurgeon tensors)."""
FastPath = Callable[..., None]
"""`(builder, inputs, outputs, batch, **attrs)`: like a decomposition, for one known batch size."""
MacCount = Callable[..., int]
"""`(input_shapes, output_shapes, **attrs)`: multiply-accumulates of one node at these static shapes."""


@dataclass(frozen=True)
class OpRecord:
    """Every face of one dynamic op. ONNX nodes are `domain`-qualified, TensorRT plugins `namespace`-qualified.

    decompose: standard ONNX ops computing the op (runs anywhere; required).
    macs: its multiply-accumulates (required, so that no op silently counts as free).
    shape: output shape from input shapes, on ints or on TensorRT shape expressions alike.
    cpu_fast: a faster graph for one known batch size, where the decomposition is slow.
    reference: PyTorch semantics, a `torch.library` custom op that capture keeps as one node.
    translation: a one-entry torch.onnx custom translation table, `{reference's overload: translation}`, that
        captures `reference` as this op's ONNX node.
    triton: launches the GPU kernel from PyTorch.
    tensorrt: registers the op with `tensorrt.plugin` (shape function and AOT kernel).
    dtypes: the element types the kernels take, keys of `DTYPES`.
    """

    name: str
    decompose: Decomposition
    macs: MacCount
    shape: Callable[..., Any] | None = None
    cpu_fast: FastPath | None = None
    reference: Face | None = None
    translation: Face | None = None
    triton: Face | None = None
    tensorrt: Face | None = None
    dtypes: tuple[str, ...] = ("float32", "float16")
    domain: str = DOMAIN
    namespace: str = DOMAIN
    version: str = "1"

    @property
    def plugin_id(self) -> str:
        """The `namespace::name` id `tensorrt.plugin` registers the plugin under."""
        return f"{self.namespace or self.domain}::{self.name}"

    def face(self, face: str) -> Callable[..., Any]:
        """The named face as a callable (imported if it lives elsewhere), or a PluginError naming those it has."""
        if face not in FACES:
            raise PluginError(f"Unknown plugin face {face!r}; the faces are {', '.join(FACES)}.")
        impl = getattr(self, face)
        if impl is None:
            raise PluginError(f"Plugin op {self.name} has no {face} face; it has {', '.join(self.present_faces())}.")
        return impl.load() if isinstance(impl, Face) else impl

    def present_faces(self) -> tuple[str, ...]:
        """The faces this op has, in the order of FACES, without importing any of them."""
        return tuple(face for face in FACES if getattr(self, face) is not None)

    def emit(self, builder: Builder, inputs: Sequence[gs.Tensor], output: gs.Tensor | None = None, *,
             name: str, **attrs: Any) -> gs.Tensor:
        """The op's `dync::` node, with the attributes TensorRT's parser reads to find the plugin."""
        return builder.op(self.name, name, inputs, out=output, domain=self.domain, plugin_version=self.version,
                          plugin_namespace=self.namespace, **attrs)

    def emit_many(self, builder: Builder, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *,
                  name: str, **attrs: Any) -> list[gs.Tensor]:
        """`emit` for an op with several outputs, written to `outputs`."""
        return builder.ops(self.name, name, inputs, len(outputs), outs=outputs, domain=self.domain,
                           plugin_version=self.version, plugin_namespace=self.namespace, **attrs)

    def check(self) -> None:
        """Invariants the registry checks when it is built, so that a mistake shows on any machine."""
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown:
            raise PluginError(f"Plugin op {self.name} declares element types {unknown} that dync.plugins.op_registry "
                              f"cannot map to TensorRT and Triton; use some of {', '.join(DTYPES)} or add them there.")
        if self.translation is not None and self.reference is None:
            raise PluginError(f"Plugin op {self.name} has a translation but no reference op to translate; add the "
                              "reference face.")


class OpRegistry:
    """Op records by name; lookups fail with the names that exist."""

    def __init__(self, records: Sequence[OpRecord] = ()) -> None:
        self._records: dict[str, OpRecord] = {}
        for record in records:
            self.add(record)

    @classmethod
    def builtin(cls) -> OpRegistry:
        """The op families bundled with dync: every subpackage of `dync.plugins` with an `OPS` tuple."""
        return cls([record for module in _op_modules([str(Path(__file__).parent)]) for record in module.OPS])

    def add(self, record: OpRecord) -> None:
        """Add a record; a second, different record under the same name is an error, lookups must be unambiguous."""
        if record.name in self._records and self._records[record.name] != record:
            raise PluginError(f"Plugin op {record.name} is already registered; give the new op another name.")
        record.check()
        self._records[record.name] = record

    def get(self, name: str) -> OpRecord:
        try:
            return self._records[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise PluginError(f"Unknown plugin op {name!r}; the known plugin ops are: {known}.") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._records))

    def __iter__(self) -> Iterator[OpRecord]:
        return iter(self._records[name] for name in self.names())

    def with_face(self, face: str) -> tuple[str, ...]:
        """The names of the ops that have `face`."""
        return tuple(record.name for record in self if getattr(record, face) is not None)


def _op_modules(path: Sequence[str]) -> Iterator[Any]:
    for info in pkgutil.iter_modules(path):
        if info.ispkg:
            module = importlib.import_module(f"dync.plugins.{info.name}")
            if hasattr(module, "OPS"):
                yield module


@functools.cache
def registry() -> OpRegistry:
    """The registry of the bundled ops, built on first use (importing `dync.plugins` imports no op module)."""
    return OpRegistry.builtin()
