"""The plugin-op registry: one record per dynamic op, holding every face the op has.

Exporter, runtime and backends look ops up here and nowhere else (DESIGN.md, "Plugin ops"). A face an op
lacks is `None`, and `faces(name)` says which exist, so a backend can pick the portable decomposition where
the TensorRT plugin or the Triton kernel is missing. Op modules register themselves on import; importing
this package imports only the op modules listed in `_OP_MODULES`, whose heavy imports (onnx, triton,
tensorrt) are made inside the functions that need them, so `import dync.plugins` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from dync.errors import PluginError

if TYPE_CHECKING:
    import onnx

__all__ = ["FACES", "PluginError", "PluginOp", "custom_nodes", "custom_ops_used", "decompose_custom_nodes", "faces",
           "get", "has_fast_cpu_path", "names", "register", "specialize_custom_nodes"]

FACES = ("reference", "emit_onnx", "decompose_onnx", "cpu_fast", "triton", "tensorrt")
DOMAIN = "dync"
PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")  # for TensorRT's parser, not op semantics

_OP_MODULES = ("dync.plugins.gather_scatter", "dync.plugins.per_sample_conv")


@dataclass(frozen=True)
class PluginOp:
    """Every face of one dynamic op; ONNX nodes are `domain`-qualified, TensorRT plugins `namespace`-qualified.

    reference: PyTorch semantics (a `torch.library` custom op, so capture keeps it as one node).
    emit_onnx: builds the custom-domain node carrying `plugin_version`/`plugin_namespace` for TensorRT.
    decompose_onnx: builds the same computation from standard ONNX ops (runs on any runtime).
    cpu_fast: a faster CPU path where the decomposition is slow.
    triton: launches the GPU kernel.
    tensorrt: registers the op with `tensorrt.plugin` (shape function and AOT Triton kernel).
    """

    name: str
    domain: str = "dync"
    version: str = "1"
    namespace: str = ""
    reference: Callable[..., Any] | None = None
    emit_onnx: Callable[..., Any] | None = None
    decompose_onnx: Callable[..., Any] | None = None
    cpu_fast: Callable[..., Any] | None = None
    triton: Callable[..., Any] | None = None
    tensorrt: Callable[..., Any] | None = None

    @property
    def plugin_id(self) -> str:
        """The `namespace::name` id `tensorrt.plugin` registers the plugin under (the domain if no namespace)."""
        return f"{self.namespace or self.domain}::{self.name}"

    def face(self, face: str) -> Callable[..., Any]:
        """The named face, or a PluginError saying the op lacks it (callers then fall back)."""
        if face not in FACES:
            raise PluginError(f"Unknown plugin face {face!r}; the faces are {', '.join(FACES)}.")
        impl = getattr(self, face)
        if impl is None:
            raise PluginError(
                f"Plugin op {self.name} has no {face} face; it has {', '.join(self.present_faces())}."
            )
        return impl

    def present_faces(self) -> tuple[str, ...]:
        """The faces this op has, in the order of FACES."""
        return tuple(f.name for f in fields(self) if f.name in FACES and getattr(self, f.name) is not None)


_REGISTRY: dict[str, PluginOp] = {}
_loaded = False

T = TypeVar("T", bound=PluginOp)


def register(op: T) -> T:
    """Add an op record; a second record under the same name is an error, since lookups must be unambiguous."""
    if op.name in _REGISTRY and _REGISTRY[op.name] != op:
        raise PluginError(f"Plugin op {op.name} is already registered; give the new op another name.")
    _REGISTRY[op.name] = op
    return op


def _load_builtin_ops() -> None:
    """Import the bundled op modules once, so that they register their records."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _OP_MODULES:
            importlib.import_module(module)


def get(name: str) -> PluginOp:
    """The record of op `name`, or a PluginError naming the known ops."""
    _load_builtin_ops()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise PluginError(f"Unknown plugin op {name!r}; the known plugin ops are: {known}.") from None


def faces(name: str) -> tuple[str, ...]:
    """Which faces op `name` has, e.g. ('reference', 'emit_onnx', 'decompose_onnx', 'triton')."""
    return get(name).present_faces()


def names() -> tuple[str, ...]:
    """Every registered op name, sorted."""
    _load_builtin_ops()
    return tuple(sorted(_REGISTRY))


def custom_ops_used(models: list[onnx.ModelProto]) -> list[dict[str, str]]:
    """One record per `dync::` op the models use: its plugin id and version, and what runs it without the plugin."""
    used = sorted({node.op_type for model in models for node in model.graph.node if node.domain == DOMAIN})
    return [{"op": f"{DOMAIN}::{name}", "plugin": get(name).plugin_id, "plugin_version": get(name).version,
             "fallback": _fallback(get(name))} for name in used]


def _fallback(op: PluginOp) -> str:
    if op.cpu_fast is not None:
        return "onnxruntime: a graph specialized per batch size (fast CPU path); elsewhere the portable decomposition"
    return "portable decomposition"


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's top-level `dync::` nodes."""
    return [node for node in model.graph.node if node.domain == DOMAIN]


def has_fast_cpu_path(model: onnx.ModelProto) -> bool:
    """Whether some `dync::` node of `model` has a fast CPU path, which only a batch-specialized graph can use."""
    return any(get(node.op_type).cpu_fast is not None for node in custom_nodes(model))


def decompose_custom_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every `dync::` node replaced by its portable decomposition (standard ONNX ops).

    This is how a runtime without the op's plugin (onnxruntime) runs a package exported for TensorRT.
    """
    return _replace_custom_nodes(model)


def specialize_custom_nodes(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of `model` for one batch size: `dync::` nodes replaced by their fast CPU path where they have
    one, by their portable decomposition otherwise."""
    return _replace_custom_nodes(model, batch)


def _replace_custom_nodes(model: onnx.ModelProto, batch: int | None = None) -> onnx.ModelProto:
    """`model` with each `dync::` node replaced by its fast CPU path for `batch` when a batch is given and the
    op has one, by its portable decomposition otherwise."""
    import onnx.helper

    nodes = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.name not in PLUGIN_ATTRIBUTES}
        op = get(node.op_type)
        if batch is not None and op.cpu_fast is not None:
            attrs["batch"] = batch
            build = op.cpu_fast
        else:
            build = op.face("decompose_onnx")
        nodes.extend(build(list(node.input), list(node.output), prefix=f"{node.name}/", **attrs))
    replaced = onnx.ModelProto()
    replaced.CopyFrom(model)
    del replaced.graph.node[:]
    replaced.graph.node.extend(nodes)
    kept = [o for o in replaced.opset_import if o.domain != DOMAIN]
    del replaced.opset_import[:]
    replaced.opset_import.extend(kept)
    return replaced
