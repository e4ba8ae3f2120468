"""Tiny models for the tests that need an export but not a realistic network (loading formats, CLI, errors).

Classes live here (importable as `tests.models`) so that `torch.save(model)` pickles can be loaded back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.multi_exit import conv_bn, init_like_trained


class TinyMultiExit(nn.Module):
    """Three conv blocks, each followed by a pooled linear exit: exits in compute order, logits [B, 10]."""

    def __init__(self, in_ch: int = 3, num_classes: int = 10, width: int = 8, num_exits: int = 3) -> None:
        super().__init__()
        chans = [in_ch] + [width * 2**k for k in range(num_exits)]
        self.blocks = nn.ModuleList(conv_bn(chans[k], chans[k + 1], 3, 1 if k == 0 else 2) for k in range(num_exits))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(chans[k + 1], num_classes))
            for k in range(num_exits)
        )
        init_like_trained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            outs.append(head(x))
        return outs


class ChainedExits(nn.Module):
    """Two exits where the second is computed from the first: listing them as [1, 0] cannot be partitioned."""

    def __init__(self, in_ch: int = 3, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.block = conv_bn(in_ch, width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))
        self.refine = nn.Linear(num_classes, num_classes)
        init_like_trained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        first = self.head(self.block(x))
        return [first, self.refine(torch.relu(first))]


TINY_SHAPE = (4, 3, 16, 16)


def tiny_model(seed: int = 0) -> TinyMultiExit:
    torch.manual_seed(seed)
    return TinyMultiExit().eval()
