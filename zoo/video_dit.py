"""A small video diffusion transformer written the way Wan2.1 (`wan/modules/model.py`) writes one, with DiT's
adaLN conditioning, quirks included.

`forward(x, t, context)` takes a latent video [B, C_in, F, H, W], a float timestep per sample in [0, 1000) and
a pooled text embedding [B, C_txt]. Wan cross-attends to T5 tokens; here the pooled condition goes through
Wan's `text_embedding` MLP and is added to the time embedding (DiT's `c = t + y`), so it enters every block
through the adaLN modulation and every attention is a self-attention over the T * H * W video tokens.

Kept from Wan: `nn.Conv3d` patchify and `x.flatten(2).transpose(1, 2)` (tokens in raster (t, h, w) order);
`sinusoidal_embedding_1d` in float64 (`position.type(torch.float64)`, `torch.outer`, `torch.pow(10000, ...)`),
then `.float()`; `time_projection(e).unflatten(1, (6, dim))`; blocks that add a learned `modulation`
[1, 6, dim] and `.chunk(6, dim=1)`; `WanLayerNorm` (no affine, `super().forward(x.float()).type_as(x)`) and
`WanRMSNorm` on q and k; `.view(b, s, n, d)` heads and the scaled_dot_product_attention fallback of
`wan/modules/attention.py` (`.transpose(1, 2)` in and out), then `.flatten(2)`; a GELU(tanh) FFN; a head with
its own [1, 2, dim] modulation; `unpatchify` by `einsum('fhwpqrc->cfphqwr')`, here with a batch letter.

RoPE is Wan's 3-D rotary embedding (head_dim split into frame, height and width bands, `rope_params(1024, .)`
tables, float64 arithmetic, `.float()` after), but in real cos/sin arithmetic on (even, odd) channel pairs, the
pairs `view_as_complex` reads, instead of `torch.polar` and complex multiplication: torch.onnx cannot export
complex tensors. The float64 islands (timestep embedding, RoPE) export as float64 ONNX ops.

Left out, because the batch here is one tensor rather than Wan's list of clips: the per-sample loops, the
padding to `seq_len` and `grid_sizes.tolist()` (the grid is `x.shape[2:]`, static ints under torch.export).
Also left out: the `amp.autocast` regions (no-ops in a float32 model) and the bfloat16 default of the
attention fallback (`dtype=torch.float32` here, so that the package can match eager to 1e-4). Weights follow
Wan's `init_weights` (xavier, zero biases) but not its zero head (every output would be 0) nor its std-0.02
time and text embeddings (the condition would barely move the output, and checks of its path would be weak).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "VIDEO_DIT_BENCH",
    "VIDEO_DIT_ZOO",
    "VideoDiT",
    "token_grid",
    "video_dit_bench",
    "video_dit_example",
    "video_dit_tiny",
]


def sinusoidal_embedding_1d(dim: int, position: Tensor) -> Tensor:
    """[B] timesteps -> [B, dim] (cos | sin), in float64 as Wan computes it."""
    assert dim % 2 == 0
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_params(max_seq_len: int, dim: int, theta: float = 10000) -> Tensor:
    """Rotation angles [max_seq_len, dim // 2] in float64: Wan's table before `torch.polar` makes it complex."""
    assert dim % 2 == 0
    freqs = torch.outer(
        torch.arange(max_seq_len),
        1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return freqs


def rope_apply(x: Tensor, grid_sizes: tuple[int, int, int], freqs: Tensor) -> Tensor:
    """Rotate [B, L, heads, head_dim] queries or keys by their (frame, row, column) position.

    Channel pairs (2i, 2i + 1) are the real and imaginary parts Wan's `view_as_complex` would read; the
    complex product with `polar(1, angle)` is written out in cos and sin so that the graph stays real."""
    b, n, c = x.size(0), x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid_sizes
    seq_len = f * h * w
    x_i = x[:, :seq_len].to(torch.float64).reshape(b, seq_len, n, -1, 2)
    freqs_i = torch.cat([
        freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(seq_len, 1, -1)
    cos, sin = torch.cos(freqs_i), torch.sin(freqs_i)
    re, im = x_i.unbind(-1)
    x_i = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3)
    return x_i.float()


def attention(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Wan's scaled_dot_product_attention fallback: [B, L, heads, d] in and out (Wan defaults to bfloat16)."""
    q = q.transpose(1, 2).to(dtype)
    k = k.transpose(1, 2).to(dtype)
    v = v.transpose(1, 2).to(dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.)
    return out.transpose(1, 2).contiguous()


class WanRMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self._norm(x.float()).type_as(x) * self.weight

    def _norm(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm without affine (adaLN supplies scale and shift), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


class WanSelfAttention(nn.Module):
    """Full self-attention over the video tokens with RMS-normed q and k and 3-D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, grid_sizes: tuple[int, int, int], freqs: Tensor) -> Tensor:
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim

        def qkv_fn(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            q = self.norm_q(self.q(x)).view(b, s, n, d)
            k = self.norm_k(self.k(x)).view(b, s, n, d)
            v = self.v(x).view(b, s, n, d)
            return q, k, v

        q, k, v = qkv_fn(x)
        x = attention(q=rope_apply(q, grid_sizes, freqs), k=rope_apply(k, grid_sizes, freqs), v=v)
        x = x.flatten(2)
        return self.o(x)


class WanAttentionBlock(nn.Module):
    """Self-attention and FFN, each modulated by (shift, scale, gate) from the 6 time-and-text vectors."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor, grid_sizes: tuple[int, int, int], freqs: Tensor) -> Tensor:
        """x [B, L, C]; e [B, 6, C]: each chunk is [B, 1, C] and broadcasts over the tokens unsqueezed."""
        assert e.dtype == torch.float32
        e = (self.modulation + e).chunk(6, dim=1)
        y = self.self_attn(self.norm1(x).float() * (1 + e[1]) + e[0], grid_sizes, freqs)
        x = x + y * e[2]

        def ffn_fn(x: Tensor, e: tuple[Tensor, ...]) -> Tensor:
            y = self.ffn(self.norm2(x).float() * (1 + e[4]) + e[3])
            return x + y * e[5]

        return ffn_fn(x, e)


class Head(nn.Module):
    """Final adaLN (its own shift and scale) and the projection to one patch of output channels per token."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = patch_size
        out_dim = math.prod(patch_size) * out_dim
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, C]; e [B, C], the embedding before `time_projection`."""
        assert e.dtype == torch.float32
        e = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + e[1]) + e[0])


class VideoDiT(nn.Module):
    """Latent video [B, in_dim, F, H, W], timesteps [B] (float32), pooled text [B, text_dim] ->
    [B, out_dim, F, H, W].

    `latent_size` (F, H, W) is the latent the zoo's examples are made for (`token_grid`); forward takes any
    size whose token grid fits the 1024-position RoPE tables."""

    def __init__(self, in_dim: int = 4, out_dim: int = 4, latent_size: tuple[int, int, int] = (4, 16, 16),
                 patch_size: tuple[int, int, int] = (1, 2, 2), dim: int = 64, ffn_dim: int = 256, freq_dim: int = 64,
                 text_dim: int = 32, num_heads: int = 2, num_layers: int = 2, qk_norm: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.latent_size, self.patch_size = in_dim, out_dim, tuple(latent_size), patch_size
        self.dim, self.ffn_dim, self.freq_dim, self.text_dim = dim, ffn_dim, freq_dim, text_dim
        self.num_heads, self.num_layers, self.qk_norm, self.eps = num_heads, num_layers, qk_norm, eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(dim, ffn_dim, num_heads, qk_norm, eps)
                                     for _ in range(num_layers)])
        self.head = Head(dim, out_dim, patch_size, eps)

        # a plain attribute, as Wan keeps it, so that `.to(dtype)` leaves the float64 table alone
        assert (dim % num_heads) == 0 and (dim // num_heads) % 2 == 0
        d = dim // num_heads
        self.freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                                rope_params(1024, 2 * (d // 6))], dim=1)
        self.init_weights()

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)

        x = self.patch_embedding(x)
        grid_sizes = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)

        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t).float()) + self.text_embedding(context)
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        assert e.dtype == torch.float32 and e0.dtype == torch.float32

        for block in self.blocks:
            x = block(x, e=e0, grid_sizes=grid_sizes, freqs=self.freqs)
        x = self.head(x, e)
        return self.unpatchify(x, grid_sizes).float()

    def unpatchify(self, x: Tensor, grid_sizes: tuple[int, int, int]) -> Tensor:
        """[B, L, prod(patch) * C_out] tokens back to [B, C_out, F, H, W]."""
        c = self.out_dim
        x = x[:, :math.prod(grid_sizes)].view(x.size(0), *grid_sizes, *self.patch_size, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.size(0), c, *[i * j for i, j in zip(grid_sizes, self.patch_size, strict=True)])

    def init_weights(self) -> None:
        """Wan's xavier init with zero biases, without its zero head (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))


def token_grid(model: VideoDiT) -> tuple[int, int, int]:
    """(T, H, W) of the token grid for the model's `latent_size`: the tokens are T * H * W, raster ordered."""
    return tuple(s // p for s, p in zip(model.latent_size, model.patch_size, strict=True))


def video_dit_example(batch: int, seed: int = 0, **sizes: object) -> dict[str, np.ndarray]:
    """Arrays for `VideoDiT(**sizes).forward` by argument name: a latent, float32 timesteps in [0, 1000) and a
    pooled text embedding. `sizes` are constructor arguments (unknown names raise TypeError)."""
    bound = inspect.signature(VideoDiT).bind(**sizes)
    bound.apply_defaults()
    cfg = bound.arguments
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, cfg["in_dim"], *cfg["latent_size"])).astype(np.float32),
            "t": rng.uniform(0, 1000, size=batch).astype(np.float32),
            "context": rng.standard_normal((batch, cfg["text_dim"])).astype(np.float32)}


VIDEO_DIT_BENCH: dict[str, object] = {"latent_size": (4, 32, 32), "dim": 128, "ffn_dim": 512, "num_heads": 2}
"""4 x 16 x 16 = 1024 tokens, 2 heads of 64: attention's L^2 terms are most of the MACs."""


def video_dit_tiny() -> nn.Module:
    """[B, 4, 4, 16, 16] latent -> 4 x 8 x 8 = 256 tokens, width 64, 2 heads of 32, 2 blocks."""
    return VideoDiT().eval()


def video_dit_bench() -> nn.Module:
    """[B, 4, 4, 32, 32] latent -> 1024 tokens, width 128, 2 heads of 64, 2 blocks (a CPU attention benchmark)."""
    return VideoDiT(**VIDEO_DIT_BENCH).eval()


VIDEO_DIT_ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[..., dict[str, np.ndarray]]]] = {
    "video_dit_tiny": (video_dit_tiny, video_dit_example),
    "video_dit_bench": (video_dit_bench, partial(video_dit_example, **VIDEO_DIT_BENCH)),
}
"""name -> (factory returning an eval-mode model, `example(batch, seed=0)` giving its inputs by argument name)."""
