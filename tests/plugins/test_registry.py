"""The plugin-op registry: lookups, faces, clear errors, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dync.plugins as plugins
from dync.errors import DyncError, PluginError
from dync.plugins import PluginOp


def test_get_returns_the_record():
    op = plugins.get("GatherPatches")
    assert (op.domain, op.version, op.namespace, op.plugin_id) == ("dync", "1", "dync", "dync::GatherPatches")


def test_record_defaults_and_plugin_id_without_namespace():
    op = PluginOp(name="Probe")
    assert (op.domain, op.version, op.namespace, op.plugin_id) == ("dync", "1", "", "dync::Probe")
    assert op.present_faces() == ()


def test_faces_lists_present_faces_only():
    assert plugins.faces("GatherPatches") == ("reference", "emit_onnx", "decompose_onnx", "triton", "tensorrt")
    assert plugins.faces("ScatterAddPatches") == ("reference", "emit_onnx", "decompose_onnx", "triton")


def test_unknown_op_names_it_and_the_known_ones():
    with pytest.raises(DyncError, match=r"'Conv9'.*GatherPatches, PerSampleConv2d, ScatterAddPatches"):
        plugins.get("Conv9")


def test_missing_face_says_which_faces_exist():
    with pytest.raises(PluginError, match="ScatterAddPatches has no cpu_fast face; it has reference"):
        plugins.get("ScatterAddPatches").face("cpu_fast")


def test_registering_a_different_op_under_a_taken_name_fails():
    plugins.get("GatherPatches")
    with pytest.raises(PluginError, match="already registered"):
        plugins.register(PluginOp(name="GatherPatches"))


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        plugins.get("GatherPatches").version = "2"  # type: ignore[misc]


def test_import_stays_light():
    heavy = "('torch', 'onnx', 'triton', 'tensorrt')"
    code = f"import sys, dync.plugins; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
