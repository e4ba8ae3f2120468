"""Small modules written the way research code writes one thing, quirks included, for the idiom tests.

Each class reproduces an idiom of published code (the repository it comes from is named), not the code
itself. Some capture exactly at every batch; some make `torch.export` fix the batch or mistranslate, and
are what export verification exists for.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Swin Transformer's split of [B, H, W, C] into [B * nW, ws, ws, C] windows."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """Swin Transformer's merge back, with the batch recovered by float arithmetic on the window count (the
    idiom copied into many Swin derivatives); torch.export fixes the batch here."""
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class SwinWindowBlock(nn.Module):
    """Patch embedding, a per-window MLP between partition and reverse, pooled classifier: [B, 3, 16, 16]."""

    def __init__(self, dim: int = 8, window_size: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.window_size = window_size
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        H, W = x.shape[1], x.shape[2]
        windows = window_partition(x, self.window_size)
        windows = windows + self.mix(windows).softmax(dim=1)
        x = window_reverse(windows, self.window_size, H, W)
        return self.head(x.mean(dim=(1, 2)))


class MeanThenNoOpSqueeze(nn.Module):
    """Token pooling as DynamicViT-style heads write it: `torch.mean(x, dim=1).squeeze(1)` on [B, N, C], where
    the squeeze does nothing in PyTorch (C != 1) but is translated as an ONNX Squeeze of axis 1."""

    def __init__(self, tokens: int = 5, dim: int = 12, num_classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.mean(self.proj(x), dim=1).squeeze(1))
