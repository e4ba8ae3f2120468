"""The onnxruntime backend's stage sessions: fixed-shape sessions per batch size, where and as many as asked; its
static full model; and the sessions the timing module gives candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

import dync
from dync.errors import InputError
from dync.runtime.backends.ort import OrtSettings, StageSession, _with_optimized_branches, session_from_onnx
from dync.timing import onnx_session
from tests.conftest import Exported
from tests.helpers import assert_close, eager_outputs
from zoo import random_input


def test_single_stage_gets_a_fixed_session_per_batch_size(single_exit: Exported) -> None:
    engine = dync.load(single_exit.package)
    stage = engine.manifest.stages[0].name
    for batch in (2, 3, 2):
        x = random_input(single_exit.sample_shape, batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(single_exit.model, x)[0], what=f"batch {batch}")
    assert engine.backend.fixed_batch_sizes() == {stage: [2, 3]}


def test_fixed_sessions_stop_at_the_limit_and_the_rest_share_the_dynamic_one(single_exit: Exported) -> None:
    engine = dync.load(single_exit.package, fixed_batches=1)
    for batch in (4, 1, 5):
        x = random_input(single_exit.sample_shape, batch, seed=batch)
        assert_close(engine.run(x).logits, eager_outputs(single_exit.model, x)[0], what=f"batch {batch}")
    assert list(engine.backend.fixed_batch_sizes().values()) == [[4]]


def test_no_fixed_sessions_when_turned_off(single_exit: Exported) -> None:
    engine = dync.load(single_exit.package, fixed_batches=0)
    engine.run(random_input(single_exit.sample_shape, 2, seed=0))
    assert list(engine.backend.fixed_batch_sizes().values()) == [[]]


def test_only_the_first_stage_of_an_early_exit_package_is_fixed(msdnet: Exported) -> None:
    engine = dync.load(msdnet.package, one_graph=False)
    x = random_input(msdnet.sample_shape, 6, seed=0)
    engine.run(x, thresholds=[2.0] * (engine.num_exits - 1))  # no exit fires: every stage runs the whole batch
    sizes = list(engine.backend.fixed_batch_sizes().values())
    assert sizes[0] == [6] and all(not later for later in sizes[1:])


def test_fixed_session_takes_the_batch_as_a_static_dim(single_exit: Exported) -> None:
    session = StageSession(single_exit.package / dync.load(single_exit.package).manifest.stages[0].onnx,
                           OrtSettings(), sees_request_batch=True, spinning=True)
    x = random_input(single_exit.sample_shape, 3, seed=0)
    name = session._dynamic.get_inputs()[0].name
    session.run(None, {name: x})
    assert session._session(3).get_inputs()[0].shape[0] == 3
    assert not isinstance(session._dynamic.get_inputs()[0].shape[0], int)
    with pytest.raises(InvalidArgument, match="Got: 6 Expected: 3"):
        session._session(3).run(None, {name: np.concatenate([x, x])})


def test_negative_fixed_batches_is_refused() -> None:
    with pytest.raises(InputError, match="fixed_batches -1 must be >= 0"):
        OrtSettings(fixed_batches=-1)


def test_static_full_model_takes_each_batch_size_and_is_built_once(msdnet: Exported) -> None:
    engine = dync.load(msdnet.package, fixed_batches=2)
    for batch in (3, 2, 5, 3):  # two fixed-shape sessions, then the dynamic one, then the first again
        x = random_input(msdnet.sample_shape, batch, seed=batch)
        outputs = engine.backend.run_static(engine.input_feeds(x))
        for k, (got, ref) in enumerate(zip(outputs, eager_outputs(msdnet.model, x), strict=True)):
            assert_close(got, ref, what=f"static exit {k} at batch {batch}")
    static = engine.backend._static_session
    assert static.fixed_batch_sizes == [2, 3] and engine.backend._static_session is static


def test_timing_sessions_use_dync_settings(single_exit: Exported) -> None:
    stage = single_exit.package / dync.load(single_exit.package).manifest.stages[0].onnx
    assert onnx_session(stage).get_session_options().intra_op_num_threads == OrtSettings().intra_op_threads
    session = onnx_session(stage, OrtSettings(threads=1, optimization="basic"))
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]


def _conv_in_branches() -> onnx.ModelProto:
    """If(flag) -> relu(conv(x)) else conv(x): onnxruntime optimizes neither branch itself."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "weight")
    def branch(name: str, relu: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("Conv", ["x", "weight"], [f"{name}_conv"], pads=[1, 1, 1, 1])]
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}_conv"], [f"{name}_out"]))
        out = f"{name}_out" if relu else f"{name}_conv"
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("relu", True), else_branch=branch("plain", False))],
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 8, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_if_branches_are_optimized_as_models_of_their_own_and_compute_the_same() -> None:
    model = _conv_in_branches()
    rewritten = onnx.load_from_string(_with_optimized_branches(model.SerializeToString(), OrtSettings()))
    for branch in (a.g for a in rewritten.graph.node[0].attribute):
        convs = [node for node in branch.node if "Conv" in node.op_type]
        assert convs and all(node.domain.startswith("com.microsoft") for node in convs), \
            f"branch {branch.name}: the convolutions should be onnxruntime's optimized ones, got {convs}"
    optimized = session_from_onnx(model, OrtSettings())
    plain = session_from_onnx(model, OrtSettings(), optimize_branches=False)
    x = np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        assert_close(optimized.run(None, feeds)[0], plain.run(None, feeds)[0], what=f"branch {flag}")


def test_a_provider_onnxruntime_lacks_is_refused_naming_onnxruntime_gpu() -> None:
    with pytest.raises(InputError, match="pip install onnxruntime-gpu"):
        OrtSettings(providers=("CUDAExecutionProvider",))


def test_the_tensorrt_provider_caches_engines_per_graph_weights_included(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """onnxruntime's own TensorRT cache key leaves weights out: dync gives each graph's bytes a directory."""
    import onnxruntime

    from dync.runtime.backends.ort import ENGINE_CACHE, _for_providers

    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))
    settings = OrtSettings(**_for_providers(tmp_path, {"providers": providers}))
    assert not settings.one_graph and not settings.on_cpu_only
    assert settings.engine_cache == str(tmp_path / ENGINE_CACHE)
    first, second = settings.provider_list(b"graph, weights 1"), settings.provider_list(b"graph, weights 2")
    assert first[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    name, options = first[0]
    assert name == "TensorrtExecutionProvider" and options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] != second[0][1]["trt_engine_cache_path"]
    assert Path(options["trt_engine_cache_path"]).parent == tmp_path / ENGINE_CACHE


def test_onnxruntime_s_tensorrt_provider_runs_the_tensorrt_form_of_quantized_stages() -> None:
    from dync.runtime.backends import backend_form

    assert backend_form("ort", {}) == "cpu"
    assert backend_form("ort", {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}) == "cpu"
    assert backend_form("ort", {"providers": ["TensorrtExecutionProvider", "CPUExecutionProvider"]}) == "trt"
    assert backend_form("trt", {}) == "trt"
    with pytest.raises(InputError, match="choose one of"):
        backend_form("tvm", {})
