"""What the Triton kernel modules share: the ahead-of-time build TensorRT's AOT plugins embed."""

from __future__ import annotations

from typing import Any

import triton


def compile_ahead_of_time(kernel: Any, signature: dict[str, str], constexprs: dict[str, int],
                          target: Any = None) -> Any:
    """`kernel` compiled for `target` (a `triton.backends.compiler.GPUTarget`, None for the current GPU), PTX in
    `.asm["ptx"]`. Under TRITON_INTERPRET=1 kernels are wrapped for the interpreter, so the JIT function is
    rebuilt from the wrapped Python function first."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = triton.runtime.jit.JITFunction(kernel.fn)
    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs), target=target)
