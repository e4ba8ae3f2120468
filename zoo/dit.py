"""A small diffusion transformer written the way facebookresearch/DiT writes one, quirks included.

`forward(x, t, y)` takes the latent, a timestep per sample (int64 here, cast with `.float()` inside the
sinusoidal embedding, as DiT does) and a class label per sample (int64, through an embedding table with the
extra "null" class of classifier-free guidance). adaLN-Zero blocks modulate with `x * (1 + scale.unsqueeze(1))
+ shift.unsqueeze(1)` from `.chunk(6, dim=1)`; attention follows timm's `qkv.reshape(B, N, 3, H, C // H)
.permute(2, 0, 3, 1, 4)` and `unbind(0)`; `unpatchify` takes the side as `int(x.shape[1] ** 0.5)` and uses
`torch.einsum('nhwpqc->nchpwq')`. The keyword argument with a default (`complete_model=False`) is how DyDiT
switches its dynamic paths off; the export example leaves it out.

Weights are random, not adaLN-Zero's zeros (which would make every output 0 and every check vacuous).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def unpatchify(x: Tensor, p: int, c: int) -> Tensor:
    """[N, T, p * p * c] tokens back to [N, c, H, W] images, the side taken as DiT takes it."""
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            random = torch.rand(labels.shape[0]) < self.dropout_prob
            drop = random if force_drop_ids is None else force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    """[B, 4, 8, 8] latent, [B] int64 timesteps in [0, 1000), [B] int64 labels -> [B, 8, 8, 8] (noise and
    variance, `learn_sigma`)."""

    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 32,
                 depth: int = 2, num_heads: int = 4, num_classes: int = 10, class_dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels * 2, patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, hidden_size) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x: Tensor) -> Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, complete_model: bool = False) -> Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def dit_example(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for `TinyDiT.forward` by argument name: a latent, timesteps and labels."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            "t": rng.integers(0, 1000, size=batch).astype(np.int64),
            "y": rng.integers(0, 10, size=batch).astype(np.int64)}
