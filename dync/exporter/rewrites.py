"""Rewrites applied while the forward is captured, for dynamic ops that models write in eager-only idioms.

Per-sample convolution (ARC, CondConv-style kernels): eager code folds the batch into the channels and runs
one grouped conv, `conv2d(x.reshape(1, B*Cin, H, W), w.reshape(B*Cout, Cin/g, kh, kw), groups=B*g)`. ONNX's
Conv needs a constant `group`, so a dynamic batch cannot be captured. While `recognize_per_sample_convs` is
active, a `TorchFunctionMode` sees every `conv2d` call during `torch.export` tracing; a call whose `groups`
is symbolic (it depends on the batch) is replaced by

    conv2d([1, B*Cin, H, W], [B*Cout, Cin/g, kh, kw], groups=B*g)
      -> dync::per_sample_conv2d([B, Cin, H, W], [B, Cout, Cin/g, kh, kw], groups=g) -> [1, B*Cout, H', W']

which returns the same folded layout, so the model's own reshape back to [B, Cout, H', W'] is untouched.
Guarantees: every other call passes through unchanged, outputs equal eager, the batch stays symbolic. A
batch-dependent `groups` that does not fit the pattern is a CaptureError naming the module; never a
silently specialized graph.

flex_attention (`torch.nn.attention.flex_attention`) with a BlockMask: torch.onnx has no translation for it,
so while `recognize_flex_attention` is active the model's calls run as `dync::block_sparse_attention` on the
mask's block lists, exact where the mask is block-aligned (checked token by token; a CaptureError otherwise).

`translations()` gathers every plugin op's torch.onnx translation from the
registry, so the op is emitted as its `dync::PerSampleConv2d` plugin node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.overrides import TorchFunctionMode

from dync.errors import CaptureError, PluginError
from dync.plugins import registry

_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _pair(value: Any) -> list[int]:
    """A conv hyper-parameter as [h, w]."""
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * 2


class _PerSampleConvMode(TorchFunctionMode):
    """Replaces batch-folded grouped convs by `dync::per_sample_conv2d`; knows the batch and the module stack."""

    def __init__(self, module_names: dict[int, str]) -> None:
        super().__init__()
        self.module_names = module_names
        self.batch: torch.SymInt | int | None = None
        self.modules: list[torch.nn.Module] = []
        self.error: CaptureError | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = {**_CONV2D_DEFAULTS, **dict(zip(_CONV2D_ARGS, args, strict=False)), **kwargs}
            if isinstance(call["groups"], torch.SymInt) and self.batch is not None:
                return self._per_sample_conv(**call)
        return func(*args, **kwargs)

    def _where(self) -> str:
        """The innermost module running, as `name (Class)`, for error messages."""
        if not self.modules:
            return "the model's forward"
        module = self.modules[-1]
        return f"module {self.module_names.get(id(module), '?') or '(root)'} ({type(module).__name__})"

    def _fail(self, reason: str) -> CaptureError:
        """The error, also kept so it survives torch.onnx wrapping it in errors of its own."""
        self.error = CaptureError(f"{self._where()} calls conv2d with groups depending on the batch, but {reason}; "
                            "dync lowers only conv2d(x.reshape(1, B*Cin, H, W), w.reshape(B*Cout, Cin/g, kh, kw), "
                            "groups=B*g), so write the per-sample conv in that form.")
        return self.error

    def _per_sample_conv(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                         padding: Any, dilation: Any, groups: torch.SymInt) -> torch.Tensor:
        """The folded grouped conv as `dync::per_sample_conv2d` on unfolded views, folded back."""
        batch = self.batch
        if isinstance(padding, str):
            raise self._fail(f"padding={padding!r} is a string; pass the padding as numbers")
        if input.dim() != 4 or weight.dim() != 4:
            raise self._fail(f"its input and weight have {input.dim()} and {weight.dim()} dims, not 4")
        if not statically_known_true(input.shape[0] == 1):
            raise self._fail(f"its input {list(input.shape)} does not hold the batch folded into one image")
        if not all(statically_known_true(n % batch == 0) for n in (groups, input.shape[1], weight.shape[0])):
            raise self._fail(f"groups={groups}, the input's {input.shape[1]} channels and the weight's "
                             f"{weight.shape[0]} kernels are not all provably multiples of the batch {batch}")
        x = input.reshape(batch, -1, *input.shape[2:])
        w = weight.reshape(batch, -1, *weight.shape[1:])
        per_sample_conv2d = registry().get("PerSampleConv2d").face("reference")
        out = per_sample_conv2d(x, w, _pair(stride), _pair(padding), _pair(dilation), int(groups // batch))
        if bias is not None:
            out = out + bias.reshape(batch, -1, 1, 1)
        return out.reshape(1, -1, *out.shape[2:])


@contextlib.contextmanager
def recognize_per_sample_convs(model: torch.nn.Module) -> Iterator[None]:
    """While active, calls of `model` (e.g. under torch.export) see per-sample convs as one custom op.

    The batch is read from the first argument of `model`'s forward; the module stack, kept by global
    forward hooks, names the module in errors. Eager calls see plain ints for `groups` and are untouched.
    """
    mode = _PerSampleConvMode({id(m): name for name, m in model.named_modules()})

    def read_batch(module: torch.nn.Module, args: tuple) -> None:
        if mode.batch is None and args and isinstance(args[0], torch.Tensor):
            mode.batch = args[0].shape[0]

    def enter(module: torch.nn.Module, args: tuple) -> None:
        mode.modules.append(module)

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if mode.modules and mode.modules[-1] is module:
            mode.modules.pop()

    handles = [model.register_forward_pre_hook(read_batch),
               torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with mode:
            yield
    except Exception as exc:
        if mode.error is not None and mode.error is not exc:
            raise mode.error from exc
        raise
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def recognize_flex_attention(model: torch.nn.Module) -> Iterator[None]:
    """While active, `flex_attention(q, k, v, block_mask=...)` called by `model`'s modules runs as
    `dync::block_sparse_attention` on the BlockMask's block lists (torch.onnx cannot translate flex_attention).

    The name `flex_attention` is rebound where the model's code finds it: in the module of each submodule's
    class that imported it, and on `torch.nn.attention.flex_attention`; every binding is restored after.
    """
    import sys

    import torch.nn.attention.flex_attention as flex

    original = flex.flex_attention
    homes = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__module__ in sys.modules}
    bound = [(home, name) for home in homes | {flex} for name, value in vars(home).items() if value is original]
    for home, name in bound:
        setattr(home, name, _as_block_sparse_attention)
    try:
        yield
    finally:
        for home, name in bound:
            setattr(home, name, original)


def _as_block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Any = None,
                               block_mask: Any = None, scale: float | None = None, enable_gqa: bool = False,
                               return_lse: bool = False, kernel_options: Any = None, **options: Any) -> torch.Tensor:
    """flex_attention's semantics for what BlockSparseAttention expresses; a CaptureError for the rest."""
    from dync.plugins.block_sparse_attention.reference import block_mask_lists

    used = {"score_mod": score_mod is not None, "enable_gqa": enable_gqa, "return_lse": return_lse,
            **{name: value is not None for name, value in options.items()}}
    unsupported = [name for name, on in used.items() if on]
    if unsupported:
        raise CaptureError(f"flex_attention is called with {', '.join(unsupported)}, which dync cannot lower; it "
                           "takes flex_attention(q, k, v, block_mask=..., scale=...) with a block-aligned mask.")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if block_mask is None:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
    try:
        with _outside_tracing():  # the mask is a constant of the model: read it, do not trace its reading
            count, index, block_q, block_k = block_mask_lists(block_mask, int(query.shape[2]), int(key.shape[2]))
            count, index = count.tolist(), index.tolist()
    except PluginError as exc:
        raise CaptureError(str(exc)) from None
    count, index = torch.tensor(count, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)  # graph constants
    attention = registry().get("BlockSparseAttention").face("reference")
    return attention(query, key, value, count, index, block_q, block_k, float(scale), "off")


@contextlib.contextmanager
def _outside_tracing() -> Iterator[None]:
    """Plain eager tensors inside a torch.export trace, for computing constants."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


def translations() -> dict[Any, Any]:
    """torch.onnx's `custom_translation_table`: every plugin op's reference op, translated to its `dync::` node."""
    table: dict[Any, Any] = {}
    for op in registry():
        if op.translation is not None:
            table.update(op.face("translation"))
    return table
