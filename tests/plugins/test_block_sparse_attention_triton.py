"""BlockSparseAttention's Triton kernels against the reference, over one table of cases, and their AOT build.

The kernels run in the interpreter (TRITON_INTERPRET=1, tiny shapes: it is slow) or on a GPU. FP8 cases
quantize Q, K and V outside the kernel, with the reference's own arithmetic, because the interpreter rounds
in-kernel fp32 -> fp8 casts wrongly (the expected failure below tracks the Triton issue); on a GPU the launcher
also quantizes with the quantize kernel.

Tolerances (absolute, against the reference in float64 for float cases), from what the kernel rounds that the
reference does not, summation order aside:
* fp32: exact products in the interpreter, so 1e-5 covers the online softmax's order; on a GPU both products
  run in TF32 (operands rounded to 10 explicit bits, 2^-11 relative each), about 2^-10 on the weights and
  2^-10 on the PV product: 2^-9 * max|v|;
* fp16: P is rounded to fp16 for the PV product and the output to fp16, each at most 2^-11 relative to
  max|v|: 2^-10 * max|v|;
* fp8: the kernel gets the reference's own codes and scales (QK^T of fp8 codes is exact in fp32), so only P's
  fp16 rounding: 2^-11 * max|v|, plus 1e-5 for the fp32 products of codes and scales.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from dync.errors import PluginError
from dync.plugins import registry
from dync.plugins.block_sparse_attention import kernels
from dync.plugins.block_sparse_attention import reference as ref

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton_only = pytest.mark.skipif(
    not _HAS_TRITON or not (_INTERPRET or torch.cuda.is_available()),
    reason="needs triton, and either a CUDA GPU or TRITON_INTERPRET=1 to run its kernels on the CPU",
)
gpu_only = pytest.mark.skipif(_INTERPRET or not torch.cuda.is_available(),
                              reason="needs a CUDA GPU without TRITON_INTERPRET (in-kernel fp8 casts)")
INTERPRETER_FP8_ISSUE = "https://github.com/triton-lang/triton/issues/8322"


@dataclass(frozen=True)
class Case:
    """One table row: shapes, op blocks, element type, which blocks the lists hold, and the kernel's tiles."""

    id: str
    b: int
    h: int
    queries: int  # L
    keys: int  # S
    d: int
    dv: int
    block_q: int
    block_k: int
    dtype: torch.dtype = torch.float32
    fp8: str = "off"
    lists: str = "random"  # "random" (distinct, shuffled, some rows empty), "dense", "empty"
    list_bh: tuple[bool, bool] = (True, True)  # per batch / per head lists, else one broadcast
    tiles: kernels.Tiles | None = None


CASES = [
    Case("fp32_partial_blocks", 2, 2, 37, 45, 16, 16, 16, 16),
    Case("fp16_split_blocks_odd_dims", 2, 2, 50, 70, 24, 40, 32, 32, torch.float16, tiles=kernels.Tiles(16, 16)),
    Case("fp32_broadcast_lists", 2, 3, 33, 48, 16, 8, 16, 16, list_bh=(False, False)),
    Case("fp16_lists_per_batch", 2, 2, 40, 40, 16, 16, 16, 16, torch.float16, list_bh=(True, False)),
    Case("fp32_dense", 1, 2, 40, 33, 16, 16, 16, 16, lists="dense"),
    Case("fp32_no_block", 2, 1, 20, 20, 16, 16, 16, 16, lists="empty"),
    Case("e4m3_partial_blocks", 2, 2, 37, 45, 16, 16, 16, 16, fp8="e4m3"),
    Case("e4m3_split_blocks", 1, 2, 45, 64, 32, 16, 32, 32, fp8="e4m3", tiles=kernels.Tiles(16, 16)),
    Case("e5m2_broadcast_lists", 2, 2, 30, 30, 16, 24, 16, 16, fp8="e5m2", list_bh=(False, True)),
]

cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def _device() -> str:
    return "cpu" if _INTERPRET else "cuda"


def _lists(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_count, kv_index): per row a random subset of distinct key blocks in random order, unlisted slots
    filled with out-of-range blocks (which must be ignored); about one row in five empty."""
    qb, kb = ref.blocks_of(case.queries, case.block_q), ref.blocks_of(case.keys, case.block_k)
    lead = (case.b if case.list_bh[0] else 1, case.h if case.list_bh[1] else 1, qb)
    count = torch.zeros(lead, dtype=torch.int64)
    index = torch.full((*lead, kb + 1), kb + 7, dtype=torch.int64)
    for row in range(count.numel()):
        n = {"dense": kb, "empty": 0}.get(case.lists, int(torch.randint(0, kb + 1, (1,), generator=gen)))
        count.view(-1)[row] = n
        index.view(-1, kb + 1)[row, :n] = torch.randperm(kb, generator=gen)[:n]
    return count, index


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """q, k, v (float32; the case's dtype is applied by the test) and the lists."""
    gen = torch.Generator().manual_seed(len(case.id))
    q, k = (torch.randn(case.b, case.h, n, case.d, generator=gen) for n in (case.queries, case.keys))
    v = torch.randn(case.b, case.h, case.keys, case.dv, generator=gen)
    return q, k, v, *_lists(case, gen)


def _codes(x: torch.Tensor, scale: torch.Tensor, fp8: str, block: int | None = None) -> torch.Tensor:
    """x's fp8 codes under the reference's scales, per tile of `block` tokens or (None) per channel."""
    dtype, fmax = ref.FP8_FORMATS[fp8]
    per = scale[:, :, None, :] if block is None else scale.repeat_interleave(block, 2)[:, :, :x.shape[2], None]
    return (x / per).clamp(-fmax, fmax).to(dtype)


def _scale(case: Case) -> float:
    return case.d ** -0.5


def _tolerance(case: Case, v: torch.Tensor) -> float:
    """The bound of the module docstring for the case's element type."""
    largest = float(v.abs().max())
    if case.fp8 != "off":
        return 2 ** -11 * largest + 1e-5
    if case.dtype == torch.float32:
        return 1e-5 if _INTERPRET else 2 ** -9 * largest
    return 2 ** -10 * largest


# ------------------------------------------------------------------------------------------------ attention


@triton_only
@cases
def test_triton_kernel_matches_reference(case: Case):
    q, k, v, count, index = _inputs(case)
    attrs = (case.block_q, case.block_k, _scale(case))
    if case.fp8 == "off":
        q, k, v = (t.to(case.dtype) for t in (q, k, v))
        expected = ref.block_sparse_attention_reference(*(t.double() for t in (q, k, v)), count, index, *attrs)
        got = registry().get("BlockSparseAttention").face("triton")(
            *(t.to(_device()) for t in (q, k, v, count, index)), *attrs, tiles=case.tiles)
    else:
        scales = (ref.tile_scales(q, case.block_q, case.fp8), ref.tile_scales(k, case.block_k, case.fp8),
                  ref.channel_scales(v, case.fp8))
        codes = (_codes(q, scales[0], case.fp8, case.block_q), _codes(k, scales[1], case.fp8, case.block_k),
                 _codes(v, scales[2], case.fp8))
        expected = ref.block_sparse_attention_reference(q, k, v, count, index, *attrs, fp8=case.fp8)
        got = kernels.attention_on_quantized(*(t.to(_device()) for t in (*codes, *scales, count, index)), *attrs,
                                             tiles=case.tiles)
    assert got.dtype == q.dtype and got.shape == (case.b, case.h, case.queries, case.dv)
    torch.testing.assert_close(got.cpu().double(), expected.double(), rtol=0, atol=_tolerance(case, v))
    empty = (count == 0).expand(case.b, case.h, -1).repeat_interleave(case.block_q, 2)[:, :, :case.queries]
    assert bool((got.cpu()[empty] == 0).all()), "a query block with no listed block must output exact zeros"


@gpu_only
@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_fp8_launcher_quantizes_on_gpu_like_the_reference(fp8: str):
    """The quantize kernel's cast is the reference's rounding on GPUs, so the fp8 bound holds end to end."""
    case = next(c for c in CASES if c.fp8 != "off")
    q, k, v, count, index = _inputs(case)
    attrs = (case.block_q, case.block_k, _scale(case))
    got = kernels.block_sparse_attention_triton(*(t.cuda() for t in (q, k, v, count, index)), *attrs, fp8=fp8)
    expected = ref.block_sparse_attention_reference(q, k, v, count, index, *attrs, fp8=fp8)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=_tolerance(case, v))


# ------------------------------------------------------------------------------------------------ quantize kernel


@triton_only
@pytest.mark.xfail(_INTERPRET, strict=True, reason=(
    "the Triton interpreter rounds fp32 -> fp8 casts wrongly: ties away from zero and a lost carry (126.24 -> 64 "
    f"in e4m3), {INTERPRETER_FP8_ISSUE}; XPASS here means it is fixed and the FP8 tests can quantize in-kernel"))
def test_quantize_kernel_rounds_like_the_reference():
    """One tile whose amax is 448 (scale 1, so the codes are the values): carries, ties, saturation-free."""
    values = torch.tensor([448.0, 126.2386, 31.6051, 1.97, 1.0625, 1.1875, -3.3, 0.0])
    x = torch.cat([values, torch.randn(8 * 16 - 8, generator=torch.Generator().manual_seed(0)) * 60])
    x = x.reshape(1, 1, 16, 8).clamp(-448, 448)
    codes, scales = kernels.quantize_tiles_triton(x.to(_device()), 16, "e4m3")
    expected_scales = ref.tile_scales(x, 16, "e4m3")
    torch.testing.assert_close(scales.cpu(), expected_scales, rtol=0, atol=0)
    torch.testing.assert_close(codes.cpu().float(), ref.quantize_tiles(x, expected_scales, 16, "e4m3"), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ block mapping


@pytest.mark.parametrize(("block", "cap", "side"), [(16, 128, 16), (48, 128, 16), (96, 128, 32), (128, 64, 64),
                                                    (384, 128, 128)])
def test_op_blocks_map_to_power_of_two_tiles_that_divide_them(block: int, cap: int, side: int):
    assert kernels.kernel_tile(block, cap, "block_q") == side


@pytest.mark.parametrize("block", [8, 24, 100])
def test_blocks_that_are_not_multiples_of_16_are_refused(block: int):
    with pytest.raises(PluginError, match=f"block_k={block} is not a multiple of 16"):
        kernels.kernel_tile(block, 64, "block_k")


def test_tensorrt_tactics_are_the_distinct_tile_shapes():
    assert kernels.distinct_tactics(64, 64) == [1]
    assert kernels.distinct_tactics(128, 128) == [1, 2, 3, 4]
    assert kernels.tactic_tiles(0, 128, 128) == kernels.tactic_tiles(1, 128, 128) == kernels.Tiles(128, 64, 8)


def test_bad_inputs_are_plugin_errors():
    q, k, v, count, index = _inputs(CASES[0])
    attention = kernels.block_sparse_attention_triton
    with pytest.raises(PluginError, match="divides block_q=16"):
        attention(q, k, v, count, index, 16, 16, 0.25, tiles=kernels.Tiles(32, 16))
    with pytest.raises(PluginError, match="outside"):
        attention(q, k, v, count, torch.full_like(index, 9), 16, 16, 0.25)
    with pytest.raises(PluginError, match="one list per H"):
        attention(q, k, v, count.expand(2, 2, -1)[:, :1].expand(2, 3, -1), index, 16, 16, 0.25)
    with pytest.raises(PluginError, match="one type"):
        attention(q, k.half(), v, count, index, 16, 16, 0.25)
    with pytest.raises(PluginError, match="q_scale"):
        kernels.attention_on_quantized(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)), torch.ones(2, 2, 1),
                                       torch.ones(2, 2, 3), torch.ones(2, 2, 16), count, index, 16, 16, 0.25)


# ------------------------------------------------------------------------------------------------ ahead of time

AOT_SCRIPT = """
import re
from triton.backends.compiler import GPUTarget
from dync.plugins.block_sparse_attention import kernels
for dtype, arguments in (("fp16", 12), ("fp8e4nv", 15)):
    kernel = kernels.compile_attention_kernel(dtype, 64, 64, 64, 64, 0.125, kernels.Tiles(64, 64),
                                              target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    params = [line.split()[1] for line in ptx.splitlines() if ".param" in line]
    print(kernel.metadata.name, "".join("p" if p == ".u64" else "i" for p in params[:arguments]),
          sorted(set(re.findall(r"wgmma[.a-z0-9_]+(?:e4m3|f16)", ptx))))
"""


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_attention_kernels_compile_ahead_of_time_to_ptx_for_sm90():
    """What `@trtp.aot_impl` returns is built here; compiling for sm_90 needs no GPU. In a fresh process without
    TRITON_INTERPRET: under the interpreter the kernels' shared body is an interpreted function, not JIT code."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, check=True)
    float_line, fp8_line = result.stdout.splitlines()
    assert float_line.startswith("block_sparse_attention_kernel ppppp" + "i" * 6 + "p ")  # the AOT order
    assert fp8_line.startswith("block_sparse_attention_fp8_kernel pppppppp" + "i" * 6 + "p ")
    assert "e4m3" in fp8_line, "QK^T of the FP8 kernel must run on Hopper's fp8 tensor cores"


# ------------------------------------------------------------------------------------------------ TensorRT


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_tensorrt_registration_is_idempotent():
    pytest.importorskip("tensorrt.plugin", reason="tensorrt.plugin needs TensorRT >= 10.7")
    registry().get("BlockSparseAttention").face("tensorrt")()
    registry().get("BlockSparseAttention").face("tensorrt")()
