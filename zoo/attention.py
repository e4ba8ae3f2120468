"""Look-alikes of cheaper-attention vision transformers: FLatten (focused linear attention) and Agent attention.

None of this code comes from the published repositories (LeapLabTHU/FLatten-Transformer,
LeapLabTHU/Agent-Attention); it reproduces their eval-mode semantics with plain PyTorch ops:

* **focused linear attention** (FLatten): ``k`` gets a learned positional encoding; ``q`` and ``k`` go through
  ``relu(.) + 1e-6``, are divided by ``softplus(scale)`` (a learned per-channel parameter), then *focused*:
  raised to the power ``p`` (3) and rescaled to keep their norm, ``f(x) = x**p / ||x**p|| * ||x||``.
  Per head, ``out = q (k^T v) / n * z`` with the normalizer ``z = 1 / (q . mean(k) + 1e-6)``; a depthwise
  ``k x k`` conv over ``v`` (one conv of ``head_dim`` channels shared by all heads) restores rank and is added.
  With ``sr_ratio > 1`` (PVT), keys and values come from a strided conv of the map and ``v`` is linearly
  interpolated back to ``N`` tokens before the depthwise conv;
* **agent attention** (Agent): agent tokens are ``q`` adaptively average-pooled to an ``a x a`` grid (cells
  ``[floor(i*H/a), ceil((i+1)*H/a))``, overlapping when ``a`` does not divide ``H``); the agents gather
  ``softmax(A K^T * scale + bias) V`` and broadcast it back with ``softmax(Q A^T * scale + bias)``. Each bias is
  a 7x7 table per (head, agent) bilinearly interpolated to the key grid (``align_corners=False``) plus a
  row bias and a column bias; a depthwise 3x3 conv over ``v`` is added to the output. The biases depend on
  parameters only, so they are constants at inference, but the forward rebuilds them (``interpolate``, then
  ``repeat`` over the batch) on every call;
* **windowed** variants (Swin): attention runs inside ``w x w`` windows (batch x windows become the attention
  batch); plain window attention adds a relative position bias gathered from a learned table by a fixed index.

Conventions (as in ``zoo/multi_exit.py``): ``forward(x)`` takes an image batch ``[B, 3, H, W]`` and returns logits
``[B, num_classes]``; no Python control flow on tensor values; construction is deterministic given
``torch.manual_seed``; weights look trained (``init_like_trained``: biases and bias tables far from zero so
that a wrongly folded or broadcast table shows); factories return eval-mode models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_ZOO",
    "AgentAttention",
    "FocusedLinearAttention",
    "SoftmaxAttention",
    "WindowAttention",
    "agent_attention",
    "agent_pvt_10",
    "agent_pvt_14",
    "agent_swin",
    "classifier",
    "flatten_attention",
    "flatten_pvt",
    "flatten_swin",
    "init_like_trained",
    "softmax_attention",
    "stage",
    "window_stage",
]

BIAS_TABLE = 7
"""Side of the learned agent bias tables, interpolated to the key grid (as in Agent attention)."""


# --------------------------------------------------------------------------- #
# Attention modules: tokens [B, N, C] on an H x W grid
# --------------------------------------------------------------------------- #


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, C] -> [B, heads, N, C / heads]."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


class SoftmaxAttention(nn.Module):
    """Plain multi-head softmax attention, with PVT's spatial reduction of keys/values when `sr_ratio > 1`."""

    def __init__(self, dim: int, heads: int, sr_ratio: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q = _heads(self.q(x), self.heads)
        kv = self.kv(_reduced(self, x, h, w)).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, n, c))


def _reduced(attn: nn.Module, x: Tensor, h: int, w: int) -> Tensor:
    """PVT's spatial reduction: the tokens keys and values are computed from (strided conv + LayerNorm)."""
    if attn.sr_ratio == 1:
        return x
    b, _, c = x.shape
    x = attn.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1)
    return attn.norm(x)


class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention with depthwise-conv rank restoration (see the module docstring)."""

    def __init__(self, dim: int, grid: tuple[int, int], heads: int, sr_ratio: int = 1, focusing_factor: int = 3,
                 kernel_size: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.focusing_factor = focusing_factor
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)
        head_dim = dim // heads
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        keys = (grid[0] // sr_ratio) * (grid[1] // sr_ratio)
        self.positional_encoding = nn.Parameter(torch.zeros(1, keys, dim))

    def _focus(self, x: Tensor, scale: Tensor) -> Tensor:
        """ReLU feature map, then x**p rescaled to keep the norm of x (sharpens the attention distribution)."""
        x = (F.relu(x) + 1e-6) / scale
        norm = x.norm(dim=-1, keepdim=True)
        x = x**self.focusing_factor
        return x / x.norm(dim=-1, keepdim=True) * norm

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        kv = self.kv(_reduced(self, x, h, w)).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
        k, v = kv[0] + self.positional_encoding, kv[1]
        m = k.shape[1]
        scale = F.softplus(self.scale)
        q, k, v = (_heads(t, self.heads) for t in (self._focus(self.q(x), scale), self._focus(k, scale), v))
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        out = q @ ((k.transpose(-2, -1) * m**-0.5) @ (v * m**-0.5)) * z
        if self.sr_ratio > 1:
            v = F.interpolate(v.transpose(-2, -1).reshape(b * self.heads, -1, m), size=n, mode="linear")
            v = v.reshape(b, self.heads, -1, n).transpose(-2, -1)
        out = out.transpose(1, 2).reshape(b, n, c)
        v = v.reshape(b * self.heads, h, w, -1).permute(0, 3, 1, 2)
        return self.proj(out + self.dwc(v).reshape(b, c, n).permute(0, 2, 1))


class AgentAttention(nn.Module):
    """Agent attention: agents pooled from q attend to the keys, then queries attend to the agents."""

    def __init__(self, dim: int, grid: tuple[int, int], heads: int, agents: int) -> None:
        super().__init__()
        self.heads = heads
        self.grid = grid
        self.agents = agents
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        side = math.isqrt(agents)
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        self.an_bias = nn.Parameter(torch.zeros(heads, agents, BIAS_TABLE, BIAS_TABLE))
        self.na_bias = nn.Parameter(torch.zeros(heads, agents, BIAS_TABLE, BIAS_TABLE))
        self.ah_bias = nn.Parameter(torch.zeros(1, heads, agents, grid[0], 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, heads, agents, 1, grid[1]))
        self.ha_bias = nn.Parameter(torch.zeros(1, heads, grid[0], 1, agents))
        self.wa_bias = nn.Parameter(torch.zeros(1, heads, 1, grid[1], agents))

    def _agent_bias(self, batch: int) -> Tensor:
        """Bias of agents over keys, [B, heads, agents, N], rebuilt from the tables on every call."""
        table = F.interpolate(self.an_bias, size=self.grid, mode="bilinear")
        table = table.reshape(1, self.heads, self.agents, -1).repeat(batch, 1, 1, 1)
        return table + (self.ah_bias + self.aw_bias).reshape(1, self.heads, self.agents, -1).repeat(batch, 1, 1, 1)

    def _query_bias(self, batch: int) -> Tensor:
        """Bias of queries over agents, [B, heads, N, agents]."""
        table = F.interpolate(self.na_bias, size=self.grid, mode="bilinear")
        table = table.reshape(1, self.heads, self.agents, -1).permute(0, 1, 3, 2).repeat(batch, 1, 1, 1)
        return table + (self.ha_bias + self.wa_bias).reshape(1, self.heads, -1, self.agents).repeat(batch, 1, 1, 1)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        agents = self.pool(q.reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
        q, k, v, agents = (_heads(t, self.heads) for t in (q, k, v, agents))
        agent_attn = ((agents * self.scale) @ k.transpose(-2, -1) + self._agent_bias(b)).softmax(dim=-1)
        query_attn = ((q * self.scale) @ agents.transpose(-2, -1) + self._query_bias(b)).softmax(dim=-1)
        out = (query_attn @ (agent_attn @ v)).transpose(1, 2).reshape(b, n, c)
        v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.proj(out + self.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c))


class WindowAttention(nn.Module):
    """Swin's window attention with a relative position bias gathered from a learned table."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", relative[..., 0] * (2 * window - 1) + relative[..., 1])

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = ((q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


# --------------------------------------------------------------------------- #
# Blocks and classifiers
# --------------------------------------------------------------------------- #

AttentionFactory = Callable[[int, tuple[int, int], int], nn.Module]
"""(dim, token grid, heads) -> attention module taking (x, h, w)."""


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, grid: tuple[int, int], heads: int, attention: AttentionFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, grid, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B * windows, window * window, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """[B * windows, window * window, C] -> [B, H * W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h * w, c)


class WindowBlock(Block):
    """Swin block: the attention runs inside non-overlapping windows (no shift: enough for export paths)."""

    def __init__(self, dim: int, window: int, heads: int, attention: AttentionFactory) -> None:
        super().__init__(dim, (window, window), heads, attention)
        self.window = window

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        windows = window_partition(self.norm1(x).view(b, h, w, c), self.window)
        x = x + window_reverse(self.attn(windows, self.window, self.window), self.window, h, w)
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """Patch embedding (strided conv + LayerNorm), learned position embedding, then blocks."""

    def __init__(self, cin: int, dim: int, patch: int, grid: tuple[int, int], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Conv2d(cin, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        b, c, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2)) + self.pos
        for block in self.blocks:
            x = block(x, h, w)
        return x.transpose(1, 2).reshape(b, c, h, w)


class Classifier(nn.Module):
    """Stages, global average pool over tokens, LayerNorm, linear head."""

    def __init__(self, stages: Sequence[Stage], dim: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.stages:
            x = layer(x)
        return self.head(self.norm(x.flatten(2).mean(dim=2)))


@torch.no_grad()
def init_like_trained(model: nn.Module) -> None:
    """Fan-in weights; biases, LayerNorm affines, position embeddings and bias tables far from their zero init,
    so that every learned table visibly changes the output."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2 and leaf == "weight":
            nn.init.normal_(p, 0.0, 1.0 / math.sqrt(p[0].numel()))
        elif leaf == "weight":
            p.uniform_(0.8, 1.2)
        else:
            p.normal_(0.0, 0.5 if leaf.endswith(("_bias", "table", "scale")) else 0.1)


def classifier(stages: Sequence[Stage], dim: int) -> Classifier:
    model = Classifier(stages, dim)
    init_like_trained(model)
    return model.eval()


def stage(cin: int, dim: int, patch: int, grid: tuple[int, int], depth: int, heads: int,
           attention: AttentionFactory) -> Stage:
    return Stage(cin, dim, patch, grid, [Block(dim, grid, heads, attention) for _ in range(depth)])


def softmax_attention(sr_ratio: int = 1) -> AttentionFactory:
    return lambda dim, grid, heads: SoftmaxAttention(dim, heads, sr_ratio)


def flatten_attention(sr_ratio: int = 1) -> AttentionFactory:
    return lambda dim, grid, heads: FocusedLinearAttention(dim, grid, heads, sr_ratio)


def agent_attention(agents: int) -> AttentionFactory:
    return lambda dim, grid, heads: AgentAttention(dim, grid, heads, agents)


def flatten_pvt() -> Classifier:
    """FLatten-PVT-like: 56x56 image, 14x14 tokens with FLatten attention over sr 2 keys, then 7x7 plain."""
    return classifier([stage(3, 32, 4, (14, 14), 2, 2, flatten_attention(sr_ratio=2)),
                       stage(32, 64, 2, (7, 7), 1, 4, softmax_attention())], 64)


def agent_pvt_14() -> Classifier:
    """Agent-PVT-like: 14x14 tokens pooled to 7x7 agents (dividing), then 7x7 tokens with 2x2 agents, then
    a plain softmax block (the mix Agent-PVT configs use)."""
    last = [Block(64, (7, 7), 4, agent_attention(4)), Block(64, (7, 7), 4, softmax_attention())]
    return classifier([stage(3, 32, 4, (14, 14), 2, 2, agent_attention(49)), Stage(32, 64, 2, (7, 7), last)], 64)


def agent_pvt_10() -> Classifier:
    """Agent-PVT-like on a 40x40 image: 10x10 tokens pooled to 7x7 agents, which 7 does not divide."""
    return classifier([stage(3, 32, 4, (10, 10), 2, 2, agent_attention(49)),
                       stage(32, 64, 2, (5, 5), 1, 4, softmax_attention())], 64)


def window_stage(cin: int, dim: int, patch: int, grid: int, window: int, heads: int,
                  attentions: Sequence[AttentionFactory]) -> Stage:
    return Stage(cin, dim, patch, (grid, grid), [WindowBlock(dim, window, heads, a) for a in attentions])


def flatten_swin() -> Classifier:
    """FLatten-Swin-like: 14x14 tokens in 7x7 windows, FLatten then plain window attention."""
    def window(dim: int, grid: tuple[int, int], heads: int) -> nn.Module:
        return WindowAttention(dim, grid[0], heads)

    return classifier([window_stage(3, 32, 4, 14, 7, 2, [flatten_attention(), window])], 32)


def agent_swin() -> Classifier:
    """Agent-Swin-like: 14x14 tokens in 7x7 windows with 3x3 agents per window (7 is not divisible by 3),
    then plain window attention."""
    def window(dim: int, grid: tuple[int, int], heads: int) -> nn.Module:
        return WindowAttention(dim, grid[0], heads)

    return classifier([window_stage(3, 32, 4, 14, 7, 2, [agent_attention(9), window])], 32)


ATTENTION_ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "flatten_pvt": (flatten_pvt, (2, 3, 56, 56)),
    "flatten_swin": (flatten_swin, (2, 3, 56, 56)),
    "agent_pvt_14": (agent_pvt_14, (2, 3, 56, 56)),
    "agent_pvt_10": (agent_pvt_10, (2, 3, 40, 40)),
    "agent_swin": (agent_swin, (2, 3, 56, 56)),
}
"""name -> (factory returning an eval-mode model, example input shape); single tensor output."""
