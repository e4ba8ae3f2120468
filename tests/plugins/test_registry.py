"""The plugin-op registry: lookups, faces, clear errors, the checks it makes when built, and that importing it
and the ONNX faces stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dync.errors import DyncError, PluginError
from dync.plugins import Face, OpRecord, OpRegistry, registry
from dync.plugins.op_registry import DTYPES


def _noop(*args, **kwargs):
    return 0


def test_get_returns_the_record():
    op = registry().get("GatherPatches")
    assert (op.domain, op.version, op.namespace, op.plugin_id) == ("dync", "1", "dync", "dync::GatherPatches")


def test_record_defaults_and_plugin_id_without_namespace():
    op = OpRecord(name="Probe", decompose=_noop, macs=_noop, namespace="")
    assert (op.domain, op.version, op.namespace, op.plugin_id) == ("dync", "1", "", "dync::Probe")
    assert op.present_faces() == ("decompose", "macs")


def test_faces_lists_present_faces_only():
    assert registry().get("GatherPatches").present_faces() == ("reference", "decompose", "shape", "macs", "triton",
                                                               "tensorrt")
    assert registry().get("ScatterAddPatches").present_faces() == ("reference", "decompose", "shape", "macs",
                                                                   "triton")
    assert registry().with_face("tensorrt") == ("BlockSparseAttention", "GatherPatches", "PerSampleConv2d")


def test_unknown_op_names_it_and_the_known_ones():
    known = ("BlockMaskIndex, BlockSparseAttention, GatherPatches, MeanSimMask, PerSampleConv2d, ScatterAddPatches, "
             "TileWindowMask")
    with pytest.raises(DyncError, match=rf"'Conv9'.*{known}"):
        registry().get("Conv9")


def test_missing_face_says_which_faces_exist():
    with pytest.raises(PluginError, match="ScatterAddPatches has no cpu_fast face; it has reference"):
        registry().get("ScatterAddPatches").face("cpu_fast")


def test_registering_a_different_op_under_a_taken_name_fails():
    ops = OpRegistry(list(registry()))
    with pytest.raises(PluginError, match="already registered"):
        ops.add(OpRecord(name="GatherPatches", decompose=_noop, macs=_noop))


def test_an_undeclared_element_type_fails_when_the_registry_is_built():
    """Without an entry in the one type table, a TensorRT plugin would fail only on a GPU."""
    with pytest.raises(PluginError, match=r"Fp8Probe declares element types \['float8_e5m2'\]"):
        OpRegistry([OpRecord(name="Fp8Probe", decompose=_noop, macs=_noop, dtypes=("float8_e5m2",))])


def test_every_declared_dtype_has_tensorrt_and_triton_names():
    for op in registry():
        assert set(op.dtypes) <= set(DTYPES), op.name


def test_a_translation_needs_its_reference():
    with pytest.raises(PluginError, match="translation but no reference"):
        OpRegistry([OpRecord(name="Probe", decompose=_noop, macs=_noop, translation=Face("math", "sqrt"))])


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        registry().get("GatherPatches").version = "2"  # type: ignore[misc]


def test_lazy_faces_load_their_module_on_use():
    reference = registry().get("PerSampleConv2d").face("reference")
    assert reference._qualname == "dync::per_sample_conv2d"


HEAVY = "('torch', 'triton', 'tensorrt')"


@pytest.mark.parametrize(("code", "heavy"), [
    ("import dync.plugins", "('torch', 'onnx', 'triton', 'tensorrt')"),
    ("from dync.plugins import registry; [op.present_faces() for op in registry()]", HEAVY),
    ("from dync.plugins.splice import decompose_custom_nodes", HEAVY),
])
def test_imports_stay_light(code: str, heavy: str):
    script = f"import sys; {code}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
