"""PerSampleConv2d: every face against the reference, over one table of cases.

The reference is checked against a loop of ordinary convs, one per sample; the decomposition runs in
onnxruntime (one graph for every batch), the Triton kernel in the interpreter (TRITON_INTERPRET=1) or on a
GPU, and capture must keep the op one node with a symbolic batch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from dync.errors import PluginError
from dync.plugins import per_sample_conv as psc
from dync.plugins import registry
from dync.plugins.per_sample_conv import reference as ref
from dync.plugins.splice import decompose_custom_nodes, specialize_custom_nodes
from tests.helpers import plugin_model, run_onnx


@dataclass(frozen=True)
class Case:
    """One table row: x [b, cin, h, w], kernels [b, cout, cin/groups, k, k], and the conv's attributes."""

    id: str
    b: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int
    padding: int
    dilation: int = 1
    groups: int = 1

    @property
    def attrs(self) -> tuple[list[int], list[int], list[int], int]:
        return [self.stride] * 2, [self.padding] * 2, [self.dilation] * 2, self.groups


CASES = [
    Case("s1_p1", 3, 4, 5, 7, 6, 3, 1, 1),
    Case("s2_p1_odd", 2, 3, 4, 9, 7, 3, 2, 1),
    Case("s1_p0", 1, 2, 3, 6, 6, 3, 1, 0),
    Case("s2_p0_k1", 2, 4, 6, 5, 5, 1, 2, 0),
    Case("s1_p2_dil2", 2, 3, 2, 8, 8, 3, 1, 2, dilation=2),
    Case("groups2_s1", 2, 4, 6, 6, 5, 3, 1, 1, groups=2),
    Case("depthwise_s2", 3, 4, 4, 7, 7, 3, 2, 1, groups=4),
    Case("k5_p2", 2, 3, 4, 9, 9, 5, 1, 2),
]
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def _inputs(case: Case, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(case.id))
    batch = case.b if batch is None else batch
    x = torch.randn(batch, case.cin, case.h, case.w, generator=gen)
    weight = torch.randn(batch, case.cout, case.cin // case.groups, case.k, case.k, generator=gen)
    return x, weight


def _per_sample_loop(x: torch.Tensor, weight: torch.Tensor, case: Case) -> torch.Tensor:
    """The definition: an ordinary conv per sample, each with its own kernel."""
    stride, padding, dilation, groups = case.attrs
    return torch.cat([F.conv2d(x[i:i + 1], weight[i], stride=stride, padding=padding, dilation=dilation,
                               groups=groups) for i in range(x.shape[0])])


def _onnx_attrs(case: Case) -> dict:
    stride, padding, dilation, groups = case.attrs
    return psc.conv_attributes([case.k, case.k], stride, padding, dilation, groups)


# ------------------------------------------------------------------------------------------------ reference


@cases
def test_reference_matches_a_conv_per_sample(case: Case):
    x, weight = _inputs(case)
    got = registry().get("PerSampleConv2d").face("reference")(x, weight, *case.attrs)
    torch.testing.assert_close(got, _per_sample_loop(x, weight, case), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_plugin_errors():
    x = torch.zeros(2, 4, 5, 5)
    with pytest.raises(PluginError, match="one batch"):
        ref.per_sample_conv2d_reference(x, torch.zeros(3, 2, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(PluginError, match="groups=2"):
        ref.per_sample_conv2d_reference(x, torch.zeros(2, 2, 4, 3, 3), [1, 1], [1, 1], [1, 1], 2)


def test_empty_batch_gives_an_empty_output():
    out = ref.per_sample_conv2d(torch.zeros(0, 2, 5, 5), torch.zeros(0, 3, 2, 3, 3), [2, 2], [1, 1], [1, 1], 1)
    assert out.shape == (0, 3, 3, 3)


class _PerSample(torch.nn.Module):
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.dync.per_sample_conv2d(x, weight, [2, 2], [1, 1], [1, 1], 1) * 2


def test_export_keeps_the_op_as_one_node_with_a_symbolic_batch():
    x, weight = _inputs(CASES[1])
    batch = torch.export.Dim("batch")
    program = torch.export.export(_PerSample(), (x, weight), dynamic_shapes=({0: batch}, {0: batch}))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("dync.per_sample_conv2d.default") == 1
    x3, w3 = torch.randn(3, *x.shape[1:]), torch.randn(3, *weight.shape[1:])
    torch.testing.assert_close(program.module()(x3, w3), _PerSample()(x3, w3))


# ------------------------------------------------------------------------------------------------ ONNX


def _model(case: Case) -> onnx.ModelProto:
    """One `dync::PerSampleConv2d` node with dynamic-shaped inputs x, w and output out."""
    x, weight = _inputs(case)
    return plugin_model("PerSampleConv2d", {"x": x.numpy(), "w": weight.numpy()}, 4, opset=psc.OPSET,
                        **_onnx_attrs(case))


def test_emitted_node_is_custom_domain_with_plugin_attributes():
    node = _model(CASES[5]).graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type, node.name) == ("dync", "PerSampleConv2d", "PerSampleConv2d")
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"dync"
    assert attrs["kernel_shape"] == [3, 3] and attrs["pads"] == [1, 1, 1, 1] and attrs["group"] == 2


@cases
def test_onnx_decomposition_matches_reference_at_every_batch(case: Case):
    """One graph, built from attributes only, serves batches 1, the case's and 4."""
    portable = decompose_custom_nodes(_model(case))
    for batch in sorted({1, case.b, 4}):
        x, weight = _inputs(case, batch)
        got = run_onnx(portable, {"x": x.numpy(), "w": weight.numpy()})
        np.testing.assert_allclose(got, ref.per_sample_conv2d(x, weight, *case.attrs).numpy(), rtol=1e-4, atol=1e-4)


@cases
def test_fast_cpu_path_matches_reference_at_its_batch(case: Case):
    x, weight = _inputs(case)
    got = run_onnx(specialize_custom_nodes(_model(case), case.b), {"x": x.numpy(), "w": weight.numpy()})
    np.testing.assert_allclose(got, ref.per_sample_conv2d(x, weight, *case.attrs).numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ Triton

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton_only = pytest.mark.skipif(
    not _HAS_TRITON or not (_INTERPRET or torch.cuda.is_available()),
    reason="needs triton, and either a CUDA GPU or TRITON_INTERPRET=1 to run its kernels on the CPU",
)


@triton_only
@cases
def test_triton_kernel_matches_reference(case: Case):
    device = "cpu" if _INTERPRET else "cuda"
    x, weight = (t.to(device) for t in _inputs(case))
    got = registry().get("PerSampleConv2d").face("triton")(x, weight, *case.attrs)
    expected = ref.per_sample_conv2d(x.cpu(), weight.cpu(), *case.attrs)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


AOT_SCRIPT = """
from triton.backends.compiler import GPUTarget
from dync.plugins.per_sample_conv import kernels
kernel = kernels.compile_kernel("fp16", [3, 3], [2, 2], [1, 1], [1, 1], target=GPUTarget("cuda", 90, 32))
params = [line.split()[1:3] for line in kernel.asm["ptx"].splitlines() if ".param" in line][:10]
print(kernel.metadata.name, *[p[0] for p in params])
"""


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
def test_kernel_compiles_ahead_of_time_to_ptx_with_the_aot_argument_order():
    """What `@trtp.aot_impl` returns is built here; compiling for sm_90 needs no GPU.

    In a fresh process without TRITON_INTERPRET: an AOT build targets a GPU, and this kernel does not
    compile in a process where Triton's interpreter mode is on.
    """
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, check=True)
    name, *params = result.stdout.split()
    assert name == "per_sample_conv2d_kernel"
    assert params == [".u64"] * 2 + [".u32"] * 7 + [".u64"]


# ------------------------------------------------------------------------------------------------ TensorRT


@cases
def test_tensorrt_shape_function_on_ints(case: Case):
    x, weight = _inputs(case)
    attrs = _onnx_attrs(case)
    shape = registry().get("PerSampleConv2d").face("shape")(x.shape, weight.shape, **attrs)
    assert shape == tuple(_per_sample_loop(x, weight, case).shape)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_tensorrt_registration_is_idempotent():
    pytest.importorskip("tensorrt.plugin", reason="tensorrt.plugin needs TensorRT >= 10.7")
    registry().get("PerSampleConv2d").face("tensorrt")()
    registry().get("PerSampleConv2d").face("tensorrt")()
