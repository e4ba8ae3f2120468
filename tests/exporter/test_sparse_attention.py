"""`--sparse-attention` and `--attention-fp8` end to end on the Wan-style video DiT look-alike, written as its
authors write it (SDPA over `.view(b, s, n, d).transpose(1, 2)` heads), plus flex_attention capture and the
refusals.

A sparse package approximates the model by design, so it is checked two ways: with every mask listing every
block it equals eager (what export and `dync verify` check), and as it is it equals eager PyTorch whose
attention runs the same mask (the reference ops on the same lists), here patched into the model's
`attention` function. The schedule is checked per sample: a timestep above the threshold runs dense.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import dync
import dync.exporter
import zoo.video_dit
from dync.errors import CaptureError, ExportError, InputError, SparseAttentionWarning
from dync.exporter.passes.sparse_attention import parse_sparse_attention, sparsify_attention
from dync.plugins.block_sparse_attention import reference as ref
from dync.plugins.block_sparse_attention import tile_order, tile_window_lists
from dync.verify import verify
from tests.conftest import invoke
from tests.helpers import max_abs_rel_error
from zoo.video_dit import VideoDiT, token_grid, video_dit_example, video_dit_tiny

TILE = "tile:T=4,H=8,W=8,tile=2x4x4,window=1x2x2,dense-until=0.5"
MEANSIM = "meansim:cdf=0.6,sim=0.1,block=32"


@pytest.fixture(scope="module")
def model() -> VideoDiT:
    torch.manual_seed(0)
    return video_dit_tiny()


@pytest.fixture(scope="module")
def tile_package(model: VideoDiT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dync.exporter.export(model, tmp_path_factory.mktemp("sparse") / "tile.dync", example=video_dit_example(2),
                                sparse_attention=TILE)


@pytest.fixture(scope="module")
def meansim_package(model: VideoDiT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dync.exporter.export(model, tmp_path_factory.mktemp("sparse") / "meansim.dync",
                                example=video_dit_example(2), sparse_attention=MEANSIM, attention_fp8="e4m3")


def _tile_lists() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    count, index = tile_window_lists((4, 8, 8), (2, 4, 4), (1, 2, 2))
    return torch.from_numpy(count), torch.from_numpy(index), tile_order((4, 8, 8), (2, 4, 4))


def _tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, d] attention under the tile window, in tile order and back, as the package computes it."""
    count, index, order = _tile_lists()
    inverse = torch.from_numpy(np.argsort(order))
    tiled = [x[:, :, torch.from_numpy(order)] for x in (q, k, v)]
    out = ref.block_sparse_attention_reference(*tiled, count, index, 32, 32, q.shape[-1] ** -0.5)
    return out[:, :, inverse]


def _meansim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    count, index = ref.mean_sim_mask_reference(q, k, 32, 32, scale, 0.6, 0.0, 0.1)
    return ref.block_sparse_attention_reference(q, k, v, count, index, 32, 32, scale, "e4m3")


@contextlib.contextmanager
def _eager_attention(core: object) -> Iterator[None]:
    """The model's `attention` ([B, L, heads, d] in and out) running `core` on [B, heads, L, d]."""
    original = zoo.video_dit.attention

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return core(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2).contiguous()

    zoo.video_dit.attention = attention
    try:
        yield
    finally:
        zoo.video_dit.attention = original


def _eager(model: VideoDiT, arrays: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{name: torch.from_numpy(a) for name, a in arrays.items()}).numpy()


def _run(package: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    return dync.load(package).run(arrays).output(0)


def _records(package: Path) -> list[dict]:
    return json.loads((package / "manifest.json").read_text())["sparse_attention"]


def test_tile_package_lists_each_attention_with_its_rule(tile_package: Path) -> None:
    records = _records(tile_package)
    assert [r["sparse"] for r in records] == [True, True]
    assert {(r["queries"], r["keys"], r["block_q"]) for r in records} == {(256, 256, 32)}
    assert all("tile 2x4x4, window 1x2x2 over a 4x8x8 grid, dense while t > 500" in r["rule"] for r in records)
    manifest = json.loads((tile_package / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["verification"]["dense_attention"]
    assert [(t["name"], t["dtype"]) for t in manifest["inputs"]] == [("x", "float32"), ("t", "float32"),
                                                                     ("context", "float32")]


def test_tile_package_equals_eager_with_the_same_mask_below_the_schedule(model: VideoDiT, tile_package: Path) -> None:
    arrays = video_dit_example(3, seed=5)
    arrays["t"] = np.array([100.0, 499.0, 20.0], np.float32)
    with _eager_attention(_tile_attention):
        expected = _eager(model, arrays)
    rel = max_abs_rel_error(_run(tile_package, arrays), expected)
    assert rel < 1e-4
    rel_dense = max_abs_rel_error(_run(tile_package, arrays), _eager(model, arrays))
    assert rel_dense > 1e-3  # the mask is not vacuous: half the key tiles are skipped


def test_tile_package_runs_dense_while_the_schedule_says(model: VideoDiT, tile_package: Path) -> None:
    arrays = video_dit_example(2, seed=6)
    arrays["t"] = np.array([900.0, 100.0], np.float32)
    out = _run(tile_package, arrays)
    dense_rel = max_abs_rel_error(out[:1], _eager(model, arrays)[:1])
    with _eager_attention(_tile_attention):
        sparse_rel = max_abs_rel_error(out[1:], _eager(model, arrays)[1:])
    assert dense_rel < 1e-4 and sparse_rel < 1e-4


def test_meansim_fp8_package_equals_eager_with_the_same_mask(model: VideoDiT, meansim_package: Path) -> None:
    arrays = video_dit_example(2, seed=7)
    with _eager_attention(_meansim_attention):
        expected = _eager(model, arrays)
    rel = max_abs_rel_error(_run(meansim_package, arrays), expected)
    assert rel < 1e-3  # fp8 rounding of values a float ulp apart may land on neighbouring codes
    records = _records(meansim_package)
    assert all(r["fp8"] == "e4m3" and 0.0 < r["density"] < 1.0 for r in records)


def test_dync_verify_checks_sparse_packages_with_dense_masks(model: VideoDiT, meansim_package: Path) -> None:
    record = verify(dync.load(meansim_package), model, video_dit_example(2, seed=8), record=False)
    assert record.passed and record.dense_attention


def test_inspect_names_rule_density_and_fp8(meansim_package: Path) -> None:
    from dync.describe import format_description

    text = format_description(dync.load(meansim_package).manifest)
    assert "sparse attention: 2 of 2 softmax attentions block-sparse" in text
    assert "meansim cdf 0.6, sim 0.1, blocks of 32, fp8 e4m3" in text and "on the example" in text
    assert "checked with every block listed" in text


class _SelfAttention(torch.nn.Module):
    """SDPA over 64 tokens, 2 heads of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], 64, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_a_grid_that_does_not_match_the_tokens_is_refused_naming_the_nodes(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparseAttentionWarning)
        with pytest.raises(ExportError, match=r"left every softmax attention dense \(node_\w+: it has 64 queries "
                                              r"and 64 keys, but the tile grid 2x4x4 has 32 tokens"):
            dync.exporter.export(_SelfAttention().eval(), tmp_path / "bad.dync", input_shape=(2, 64, 16),
                                 sparse_attention="tile:T=2,H=4,W=4,tile=1x2x2,window=1x1x1")
    assert not (tmp_path / "bad.dync").exists()


class _FoldedHeadsAttention(torch.nn.Module):
    """Heads folded into the batch, [B * heads, tokens, dim]: a 3-D chain the matcher does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(-1, 64, 3, 8).unbind(2)
        return ((q @ k.transpose(1, 2) * 0.35).softmax(-1) @ v).reshape(x.shape[0], 64, 16)


def test_an_attention_the_matcher_cannot_take_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"found no softmax attention it can take: its Softmax nodes node_\w+ are "
                                          r"not in a matmul-softmax-matmul chain over 4-D"):
        dync.exporter.export(_FoldedHeadsAttention().eval(), tmp_path / "folded.dync", input_shape=(2, 64, 16),
                             sparse_attention="meansim:topk=0.5,block=16")


@pytest.mark.parametrize(("spec", "message"), [
    ("tile:T=21,H=30,W=52,tile=6x8x8,window=3x3x3", r"tile 6x8x8 does not divide the token grid 21x30x52.*T=21: 1, "
                                                    r"3, 7, 21"),
    ("tile:T=4,H=8,tile=2x4x4,window=1x1x1", r"lacks W"),
    ("meansim:cdf=1.5", r"cdf=1.5 is outside \(0, 1\]"),
    ("meansim:cdf=0", r"cdf=0 is outside \(0, 1\]"),
    ("meansim:cdf=0.9,topk=0.5", r"exactly one of cdf="),
    ("meansim:cdf=0.9,sim=-1", r"sim=-1 is outside"),
    ("meansim:cdf=0.9,window=3", r"window is not an option of the meansim rule"),
    ("flash:x=1", r"the rule 'flash' is unknown"),
    ("tile:T=4,H=8,W=8,tile=2x4,window=1x1x1", r"tile='2x4' is not three sizes"),
])
def test_bad_specs_are_one_clear_error(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_sparse_attention(spec)


def test_unknown_fp8_format_is_refused() -> None:
    with pytest.raises(InputError, match=r"--attention-fp8 'e3m4' is unknown"):
        parse_sparse_attention("dense", "e3m4")


class _BiasedAttention(torch.nn.Module):
    """Swin-style: a learned bias added to the scores, which BlockSparseAttention does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(2, 64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = k = v = x.reshape(x.shape[0], 64, 2, 8).transpose(1, 2)
        return (((q @ k.transpose(-2, -1)) * 0.3 + self.bias).softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_an_attention_with_a_bias_is_left_dense_with_its_reason() -> None:
    x = torch.randn(2, 64, 16)
    model = torch.onnx.export(_BiasedAttention(), (x,), dynamo=True, dynamic_shapes=({0: "batch"},),
                              verbose=False).model_proto
    spec = parse_sparse_attention("meansim:topk=0.5,block=16")
    with pytest.warns(SparseAttentionWarning, match=r"adds a bias to its scores"):
        rewritten, records = sparsify_attention(model, spec)
    assert rewritten is model and [r.sparse for r in records] == [False]


def _window(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return (q // 32 - kv // 32).abs() <= 1


def _causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return q >= kv


class _FlexAttention(torch.nn.Module):
    """flex_attention with a BlockMask built once in __init__, as its docs recommend."""

    def __init__(self, mask_mod: object) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.block_mask = create_block_mask(mask_mod, None, None, 200, 200, device="cpu", BLOCK_SIZE=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.proj(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v, block_mask=self.block_mask).transpose(1, 2).reshape(B, N, C)


def test_flex_attention_with_a_block_aligned_mask_is_captured_as_the_op(tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = _FlexAttention(_window).eval()
    package = dync.exporter.export(module, tmp_path / "flex.dync", input_shape=(2, 200, 16))
    stage = onnx.load(package / "stages" / "stage0.onnx")
    assert [n.op_type for n in stage.graph.node].count("BlockSparseAttention") == 1
    x = np.random.default_rng(3).standard_normal((3, 200, 16)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    rel = max_abs_rel_error(dync.load(package).run(x).output(0), expected)
    assert rel < 1e-4


def test_flex_attention_with_a_token_level_mask_is_refused_naming_the_block(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"mask_mod is not block-aligned: key block 0 of query block 0 .*BLOCK_SIZE "
                                           r"\(32, 32\)"):
        dync.exporter.export(_FlexAttention(_causal).eval(), tmp_path / "causal.dync", input_shape=(2, 200, 16))


def test_token_grid_of_the_look_alike_is_what_the_tile_spec_names(model: VideoDiT) -> None:
    assert token_grid(model) == (4, 8, 8)


def test_cli_refuses_a_bad_spec_in_one_line_before_loading(tmp_path: Path) -> None:
    result = invoke(["export", str(tmp_path / "absent.pt2"), "-o", str(tmp_path / "p.dync"),
                     "--sparse-attention", "meansim:cdf=2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: --sparse-attention 'meansim:cdf=2': cdf=2 is outside (0, 1]" in result.stderr


def test_fp8_in_the_plugins_form_is_refused_before_capture(model: VideoDiT, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--attention-fp8 e4m3 with --ops plugins"):
        dync.exporter.export(model, tmp_path / "p.dync", example=video_dit_example(2), ops="plugins",
                             sparse_attention="dense", attention_fp8="e4m3")
