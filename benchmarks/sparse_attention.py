"""Block-sparse attention on the CPU: one layer against onnxruntime's dense `Attention`, and the video DiT
look-alike end to end against the same package with every block listed.

Run from the repository root:  python -m benchmarks.sparse_attention [--repeats 10] [--skip-dit]

* **Layer** (L = 4096 and 8192 tokens, 2 heads of 128, blocks of 128, 2 threads): "dense" is one ONNX
  `Attention` node (opset 23); "sparse" is `dync::BlockSparseAttention`'s portable decomposition (what a
  package runs on onnxruntime) at 0, 50, 75 and 90% block sparsity, every query block listing the same
  number of random key blocks. "ideal" is 1 / (1 - sparsity); "of ideal" is the speedup over it.
* **DiT** (`zoo/video_dit.py` at a 4 x 64 x 64 latent: a 4 x 32 x 32 grid of 4096 tokens, width 128, 2 heads
  of 64, 2 blocks): the package exported with `--sparse-attention tile:...,tile=1x8x16,window=2x2x2` (8 of
  32 key tiles: 75% sparsity) against the same package with every block listed (`dense_equivalent`) and the
  plain dync package (no `--sparse-attention`: dense attention as onnxruntime's chain or `Attention`).
* **Error of one denoising step** (the model's output against dense eager PyTorch) per window, without and
  with fp8 (e4m3): relative L2 and cosine. Computed in eager PyTorch with the mask and fp8 applied by the
  op's reference (what the package computes: tests/exporter/test_sparse_attention.py checks they agree).

Times are medians of alternating blocks of calls after warm-up (`dync.timing.median_times`); ratios are
measured side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

import dync
import dync.exporter
import zoo.video_dit
from dync.exporter.verification import dense_attention_copy
from dync.graph import Builder
from dync.plugins import registry
from dync.plugins.block_sparse_attention import reference as ref
from dync.plugins.block_sparse_attention import tile_order, tile_window_lists
from dync.plugins.splice import decompose_custom_nodes
from dync.runtime.backends.ort import OrtSettings
from dync.timing import median_times, onnx_session
from zoo.video_dit import VideoDiT, video_dit_example

HEADS, HEAD_DIM, BLOCK, THREADS = 2, 128, 128, 2
SPARSITIES = (0.0, 0.5, 0.75, 0.9)
LAYER_GOALS = {0.0: 1 / 1.2, 0.5: 1.3, 0.75: 2.0, 0.9: 3.0}
DIT = {"latent_size": (4, 64, 64), "dim": 128, "ffn_dim": 512, "num_heads": 2}
GRID, TILE = (4, 32, 32), (1, 8, 16)
WINDOWS = {"50%": (2, 4, 2), "75%": (2, 2, 2), "91%": (1, 3, 1)}
DIT_GOAL = 1.8


def attention_layer(tokens: int) -> onnx.ModelProto:
    """ONNX `Attention` over [1, HEADS, tokens, HEAD_DIM]: onnxruntime's dense kernel."""
    shape = [1, HEADS, tokens, HEAD_DIM]
    graph = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"], scale=HEAD_DIM ** -0.5)],
                              "dense", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def sparse_layer(tokens: int) -> onnx.ModelProto:
    """BlockSparseAttention's portable decomposition, the lists as inputs."""
    blocks = tokens // BLOCK
    shape = [1, HEADS, tokens, HEAD_DIM]
    inputs = [gs.Variable(n, dtype=np.float32, shape=shape) for n in "qkv"]
    inputs += [gs.Variable("kv_count", dtype=np.int64, shape=[1, HEADS, blocks]),
               gs.Variable("kv_index", dtype=np.int64, shape=[1, HEADS, blocks, blocks])]
    out = gs.Variable("y", dtype=np.float32, shape=shape)
    nodes: list[gs.Node] = []
    registry().get("BlockSparseAttention").emit(Builder(nodes, ""), inputs, out, name="attention", block_q=BLOCK,
                                                block_k=BLOCK, scale=HEAD_DIM ** -0.5)
    return decompose_custom_nodes(gs.export_onnx(gs.Graph(nodes=nodes, inputs=inputs, outputs=[out], opset=19)))


def random_lists(tokens: int, sparsity: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every query block listing round((1 - sparsity) * KB) distinct random key blocks."""
    blocks = tokens // BLOCK
    keep = np.zeros((1, HEADS, blocks, blocks), bool)
    kept = max(1, round(blocks * (1 - sparsity)))
    for h in range(HEADS):
        for i in range(blocks):
            keep[0, h, i, rng.choice(blocks, kept, replace=False)] = True
    count, index = ref.kept_lists(torch.from_numpy(keep))
    return count.numpy(), index.numpy()


def layer_rows(tokens: int, repeats: int) -> list[str]:
    settings = OrtSettings(threads=THREADS)
    dense, sparse = onnx_session(attention_layer(tokens), settings), onnx_session(sparse_layer(tokens), settings)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, HEADS, tokens, HEAD_DIM)).astype(np.float32) for _ in range(3))
    variants: dict[str, Callable[[], object]] = {"dense": functools.partial(dense.run, None, {"q": q, "k": k, "v": v})}
    for sparsity in SPARSITIES:
        count, index = random_lists(tokens, sparsity, rng)
        feeds = {"q": q, "k": k, "v": v, "kv_count": count, "kv_index": index}
        variants[sparsity] = functools.partial(sparse.run, None, feeds)
    times = median_times(variants, repeats=repeats)
    rows = []
    for sparsity in SPARSITIES:
        speedup = times["dense"] / times[sparsity]
        ideal = 1 / (1 - sparsity)
        goal = LAYER_GOALS[sparsity]
        rows.append(f"| {tokens} | {sparsity:.0%} | {speedup:.2f}x | {ideal:.1f}x | {speedup / ideal:.2f} | "
                    f">= {goal:.2f}x: {'met' if speedup >= goal else 'MISSED'} |")
    return rows


def _tile_spec(window: tuple[int, int, int]) -> str:
    return (f"tile:T={GRID[0]},H={GRID[1]},W={GRID[2]},tile={'x'.join(map(str, TILE))},"
            f"window={'x'.join(map(str, window))}")


def dit_rows(repeats: int, work: Path) -> list[str]:
    torch.manual_seed(0)
    model = VideoDiT(**DIT).eval()
    example = video_dit_example(1, **DIT)
    sparse = dync.exporter.export(model, work / "sparse.dync", example=example,
                                  sparse_attention=_tile_spec(WINDOWS["75%"]), verify=False)
    plain = dync.exporter.export(model, work / "plain.dync", example=example, verify=False)
    rows = []
    with dense_attention_copy(sparse) as dense:
        engines = {"sparse": dync.load(sparse), "dense": dync.load(dense), "plain": dync.load(plain)}
        for batch in (1, 2):
            arrays = video_dit_example(batch, seed=batch, **DIT)
            times = median_times({key: functools.partial(e.run, arrays) for key, e in engines.items()},
                                 repeats=repeats)
            over_dense = times["dense"] / times["sparse"]
            rows.append(f"| {batch} | {over_dense:.2f}x | {times['plain'] / times['sparse']:.2f}x | "
                        f"{times['plain'] / times['dense']:.2f}x | >= {DIT_GOAL}x: "
                        f"{'met' if over_dense >= DIT_GOAL else 'MISSED'} |")
    return rows


@contextlib.contextmanager
def _masked(window: tuple[int, int, int] | None, fp8: str) -> Iterator[None]:
    """The look-alike's attention under the tile window (None: every block) and fp8, by the op's reference."""
    original = zoo.video_dit.attention
    order = torch.from_numpy(tile_order(GRID, TILE))
    inverse = torch.argsort(order)
    block = TILE[0] * TILE[1] * TILE[2]
    if window is None:
        blocks = -(-len(order) // block)
        count, index = torch.full((1, 1, blocks), blocks), torch.arange(blocks).expand(1, 1, blocks, blocks)
    else:
        count, index = (torch.from_numpy(a) for a in tile_window_lists(GRID, TILE, window))

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2)[:, :, order] for x in (q, k, v))
        out = ref.block_sparse_attention_reference(q, k, v, count, index, block, block, q.shape[-1] ** -0.5, fp8)
        return out[:, :, inverse].transpose(1, 2).contiguous()

    zoo.video_dit.attention = attention
    try:
        yield
    finally:
        zoo.video_dit.attention = original


def error_rows() -> list[str]:
    torch.manual_seed(0)
    model = VideoDiT(**DIT).eval()
    inputs = {k: torch.from_numpy(a) for k, a in video_dit_example(1, seed=3, **DIT).items()}
    inputs["t"] = torch.tensor([400.0])
    with torch.no_grad():
        dense = model(**inputs).double().flatten()
        rows = []
        for label, window in {"0%": None, **WINDOWS}.items():
            cells = []
            for fp8 in ("off", "e4m3"):
                with _masked(window, fp8):
                    out = model(**inputs).double().flatten()
                l2 = float(torch.linalg.vector_norm(out - dense) / torch.linalg.vector_norm(dense))
                cosine = float(torch.nn.functional.cosine_similarity(out, dense, dim=0))
                cells.append(f"{l2:.2e} | {cosine:.5f}")
            rows.append(f"| {label} | {' | '.join(cells)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-dit", action="store_true", help="Only the layer table.")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {OrtSettings(threads=THREADS).describe()}\n")
    print("| tokens | block sparsity | sparse vs dense Attention | ideal | of ideal | goal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in (4096, 8192):
        print("\n".join(layer_rows(tokens, args.repeats)), flush=True)
    if args.skip_dit:
        return
    print("\n| batch | 75% tile window vs same package dense | vs plain dync package | dense package vs plain | "
          "goal |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        print("\n".join(dit_rows(args.repeats, Path(scratch))), flush=True)
    print("\n| block sparsity | rel. L2 | cosine | rel. L2, fp8 e4m3 | cosine, fp8 e4m3 |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(error_rows()))


if __name__ == "__main__":
    main()
