"""GatherPatches / ScatterAddPatches: every face against the reference, over one table of cases.

The reference itself is checked against a naive per-pixel loop; the decomposition runs in onnxruntime, the
Triton kernels in the interpreter (TRITON_INTERPRET=1) or on a GPU, and capture must keep each op one node.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch

from dync.errors import PluginError
from dync.plugins import gather_scatter as ops
from dync.plugins import registry
from dync.plugins.gather_scatter import kernels
from dync.plugins.gather_scatter import reference as ref
from dync.plugins.splice import decompose_custom_nodes
from tests.helpers import plugin_model, run_onnx


@dataclass(frozen=True)
class Case:
    """One table row: an image batch, a patch size and halo, and which blocks the index lists."""

    id: str
    n: int
    c: int
    h: int
    w: int
    patch: int
    halo: int
    blocks: str  # "all", "some" (a different seeded subset per image) or "none" (M = 0)


CASES = [
    Case("odd15_s4_h1_some", 2, 3, 15, 15, 4, 1, "some"),
    Case("odd15_s2_h0_all", 1, 2, 15, 15, 2, 0, "all"),
    Case("odd_hw_s4_h0_some", 3, 5, 9, 7, 4, 0, "some"),
    Case("odd_hw_s2_h1_all", 2, 5, 7, 5, 2, 1, "all"),
    Case("even_s4_h1_all", 1, 1, 8, 8, 4, 1, "all"),
    Case("empty_s4_h1", 2, 3, 15, 15, 4, 1, "none"),
    Case("empty_s2_h0", 1, 2, 6, 6, 2, 0, "none"),
]


def _index(case: Case) -> torch.Tensor:
    """Distinct (n, by, bx) rows in shuffled order, the blocks chosen differently for every image."""
    nby, nbx = -(-case.h // case.patch), -(-case.w // case.patch)
    rows = [(n, by, bx) for n in range(case.n) for by in range(nby) for bx in range(nbx)]
    rng = np.random.default_rng(len(case.id))
    if case.blocks == "some":
        rows = [r for r in rows if rng.random() < 0.5] or rows[:1]
    elif case.blocks == "none":
        rows = []
    order = rng.permutation(len(rows))
    return torch.tensor([rows[i] for i in order], dtype=torch.int64).reshape(-1, 3)


def _inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N,C,H,W], index [M,3] and un-haloed patches [M,C,S,S] for the case."""
    gen = torch.Generator().manual_seed(0)
    index = _index(case)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen)
    patches = torch.randn(index.shape[0], case.c, case.patch, case.patch, generator=gen)
    return x, index, patches


def _naive_gather(x: torch.Tensor, index: torch.Tensor, s: int, h: int) -> torch.Tensor:
    """GatherPatches by definition, one pixel at a time."""
    out = torch.zeros(index.shape[0], x.shape[1], s + 2 * h, s + 2 * h)
    for m, (n, by, bx) in enumerate(index.tolist()):
        for i in range(s + 2 * h):
            for j in range(s + 2 * h):
                r, c = by * s - h + i, bx * s - h + j
                if 0 <= r < x.shape[2] and 0 <= c < x.shape[3]:
                    out[m, :, i, j] = x[n, :, r, c]
    return out


def _naive_scatter(base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, s: int) -> torch.Tensor:
    """ScatterAddPatches by definition, one pixel at a time."""
    out = base.clone()
    for m, (n, by, bx) in enumerate(index.tolist()):
        for i in range(s):
            for j in range(s):
                r, c = by * s + i, bx * s + j
                if r < base.shape[2] and c < base.shape[3]:
                    out[n, :, r, c] += patches[m, :, i, j]
    return out


def _block_mask(case: Case, index: torch.Tensor) -> torch.Tensor:
    """1 on the pixels of the listed blocks, 0 elsewhere, shaped [N,1,H,W]."""
    mask = torch.zeros(case.n, 1, case.h, case.w)
    for n, by, bx in index.tolist():
        mask[n, :, by * case.patch:(by + 1) * case.patch, bx * case.patch:(bx + 1) * case.patch] = 1
    return mask


cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


# ------------------------------------------------------------------------------------------------ reference


@cases
def test_reference_matches_the_definition(case: Case):
    x, index, patches = _inputs(case)
    gathered = registry().get("GatherPatches").face("reference")(x, index, case.patch, case.halo)
    assert gathered.shape == (index.shape[0], case.c, case.patch + 2 * case.halo, case.patch + 2 * case.halo)
    torch.testing.assert_close(gathered, _naive_gather(x, index, case.patch, case.halo), rtol=0, atol=0)
    scattered = registry().get("ScatterAddPatches").face("reference")(x, patches, index, case.patch)
    torch.testing.assert_close(scattered, _naive_scatter(x, patches, index, case.patch))


@cases
def test_gather_then_scatter_reproduces_x_on_the_chosen_blocks(case: Case):
    x, index, _ = _inputs(case)
    gathered = ref.gather_patches(x, index, case.patch, 0)
    restored = ref.scatter_add_patches(torch.zeros_like(x), gathered, index, case.patch)
    torch.testing.assert_close(restored, x * _block_mask(case, index), rtol=0, atol=0)


@cases
def test_masked_conv_by_gather_scatter_equals_dense_conv_on_the_blocks(case: Case):
    """The LASNet lowering this op family exists for: halo-1 gather, unpadded 3x3 conv, scatter."""
    x, index, _ = _inputs(case)
    conv = torch.nn.Conv2d(case.c, 2, 3, padding=1, bias=False)
    dense = conv(x) * _block_mask(case, index)
    sparse = torch.nn.functional.conv2d(ref.gather_patches(x, index, case.patch, 1), conv.weight)
    out = ref.scatter_add_patches(torch.zeros_like(dense), sparse, index, case.patch)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_bad_index_is_a_plugin_error():
    with pytest.raises(PluginError, match=r"index \[M,3\]"):
        ref.gather_patches_reference(torch.zeros(1, 1, 4, 4), torch.zeros(2, 2, dtype=torch.int64), 2, 0)
    with pytest.raises(PluginError, match="int64 index"):
        ref.gather_patches_reference(torch.zeros(1, 1, 4, 4), torch.zeros(2, 3, dtype=torch.int32), 2, 0)


# ------------------------------------------------------------------------------------------------ capture


class _Lasnet(torch.nn.Module):
    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        patches = torch.ops.dync.gather_patches(x, index, 4, 1)[:, :, 1:-1, 1:-1] * 2
        return torch.ops.dync.scatter_add_patches(x, patches, index, 4)


def test_export_keeps_each_op_as_one_node():
    case = CASES[0]
    x, index, _ = _inputs(case)
    dims = ({0: torch.export.Dim("n")}, {0: torch.export.Dim("m")})
    program = torch.export.export(_Lasnet(), (x, index), dynamic_shapes=dims)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("dync.gather_patches.default") == 1
    assert targets.count("dync.scatter_add_patches.default") == 1
    fewer = index[:2]  # the fake implementations keep M (and N) symbolic
    torch.testing.assert_close(program.module()(x, fewer), _Lasnet()(x, fewer))


# ------------------------------------------------------------------------------------------------ ONNX


def test_emitted_nodes_are_custom_domain_with_plugin_attributes():
    feeds = {"x": np.zeros((1, 1, 4, 4), np.float32), "index": np.zeros((1, 3), np.int64)}
    gather = plugin_model("GatherPatches", feeds, 4, patch=4, halo=1).graph.node[0]
    scatter = plugin_model("ScatterAddPatches", {"x": feeds["x"], "p2": feeds["x"], "index": feeds["index"]}, 4,
                           patch=4).graph.node[0]
    for node, op_type in ((gather, "GatherPatches"), (scatter, "ScatterAddPatches")):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (node.domain, node.op_type, node.name) == ("dync", op_type, op_type)
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"dync"
        assert attrs["patch"] == 4
    assert {a.name: a.i for a in gather.attribute if a.name == "halo"} == {"halo": 1}
    assert list(scatter.input) == ["x", "p2", "index"]


def _decomposed(op: str, feeds: dict[str, np.ndarray], **attrs: int) -> np.ndarray:
    """The op's portable decomposition, spliced in by the runtime's path, run in onnxruntime."""
    return run_onnx(decompose_custom_nodes(plugin_model(op, feeds, 4, opset=ops.OPSET, **attrs)), feeds)


@cases
def test_onnx_decomposition_matches_reference_in_onnxruntime(case: Case):
    x, index, patches = _inputs(case)
    feeds = {"x": x.numpy(), "index": index.numpy()}
    expected = ref.gather_patches(x, index, case.patch, case.halo).numpy()
    np.testing.assert_array_equal(_decomposed("GatherPatches", feeds, patch=case.patch, halo=case.halo), expected)

    expected = ref.scatter_add_patches(x, patches, index, case.patch).numpy()
    feeds = {"x": x.numpy(), "patches": patches.numpy(), "index": index.numpy()}
    np.testing.assert_allclose(_decomposed("ScatterAddPatches", feeds, patch=case.patch), expected, rtol=0, atol=1e-6)


def test_one_onnx_decomposition_serves_every_shape():
    """The nodes depend only on patch and halo, so one graph handles any N, H, W and M (dynamic axes)."""
    shapes = {"x": np.zeros((1, 1, 1, 1), np.float32), "index": np.zeros((1, 3), np.int64)}
    model = decompose_custom_nodes(plugin_model("GatherPatches", shapes, 4, opset=ops.OPSET, patch=4, halo=1))
    for case in (CASES[0], CASES[2], CASES[5]):
        if case.patch == 4:
            x, index, _ = _inputs(case)
            got = run_onnx(model, {"x": x.numpy(), "index": index.numpy()})
            np.testing.assert_array_equal(got, ref.gather_patches(x, index, 4, 1).numpy())


# ------------------------------------------------------------------------------------------------ Triton

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton_only = pytest.mark.skipif(
    not _HAS_TRITON or not (_INTERPRET or torch.cuda.is_available()),
    reason="needs triton, and either a CUDA GPU or TRITON_INTERPRET=1 to run its kernels on the CPU",
)


def _device() -> str:
    return "cpu" if _INTERPRET else "cuda"


@triton_only
@cases
def test_triton_kernels_match_reference(case: Case):
    x, index, patches = (t.to(_device()) for t in _inputs(case))
    got = registry().get("GatherPatches").face("triton")(x, index, case.patch, case.halo)
    expected = ref.gather_patches(x.cpu(), index.cpu(), case.patch, case.halo)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    got = registry().get("ScatterAddPatches").face("triton")(x, patches, index, case.patch)
    expected = ref.scatter_add_patches(x.cpu(), patches.cpu(), index.cpu(), case.patch)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_gather_kernel_compiles_ahead_of_time_to_ptx_with_the_aot_argument_order():
    """What `@trtp.aot_impl` returns is built here; compiling for sm_90 needs no GPU."""
    from triton.backends.compiler import GPUTarget

    kernel = kernels.compile_gather_kernel("fp16", 4, 1, target=GPUTarget("cuda", 90, 32))
    params = [line.split()[1:3] for line in kernel.asm["ptx"].splitlines() if ".param" in line][:8]
    assert kernel.metadata.name == "gather_patches_kernel"
    assert [p[0] for p in params] == [".u64"] * 2 + [".u32"] * 5 + [".u64"]


@pytest.mark.parametrize(("side", "block"), [(1, 1), (2, 4), (4, 16), (6, 64), (16, 256)])
def test_triton_tile_holds_the_patch(side: int, block: int):
    assert kernels._block_p(side) == block


# ------------------------------------------------------------------------------------------------ TensorRT


def test_tensorrt_shape_function_on_ints():
    assert ops.gather_patches_shape((2, 8, 15, 15), (5, 3), patch=4, halo=1) == (5, 8, 6, 6)
    assert ops.gather_patches_shape((1, 3, 7, 7), (0, 3), patch=2, halo=0) == (0, 3, 2, 2)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_tensorrt_registration_is_idempotent():
    pytest.importorskip("tensorrt.plugin", reason="tensorrt.plugin needs TensorRT >= 10.7")
    registry().get("GatherPatches").face("tensorrt")()
    registry().get("GatherPatches").face("tensorrt")()
