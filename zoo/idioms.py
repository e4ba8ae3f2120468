"""Small modules written the way research code writes one thing, quirks included, for the idiom tests.

Each class reproduces an idiom of published code (its docstring names the repository), not the code itself,
and says the per-sample input shape it takes. Some capture exactly at every batch; some make `torch.export`
fix the batch, and some are mistranslated by torch.onnx and exact only through a capture-time repair
(`dync/exporter/repairs.py`); `tests/exporter/test_idioms.py` says which is which.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from zoo.dit import unpatchify


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
    """microsoft/Swin-Transformer (window partition and reverse): patch embedding, a per-window MLP between
    `window_partition` and `window_reverse`, pooled classifier: [B, 3, 16, 16]."""

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
    """LeapLabTHU/Dynamic_Perceiver (its exits pool the latents so): `torch.mean(x, dim=1).squeeze(1)` on
    [B, N, C], where the squeeze does nothing in PyTorch (C != 1) but is translated as an ONNX Squeeze of axis
    1: [B, 5, 12]."""

    def __init__(self, tokens: int = 5, dim: int = 12, num_classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.mean(self.proj(x), dim=1).squeeze(1))


# --------------------------------------------------------------------------- #
# Shape arithmetic
# --------------------------------------------------------------------------- #


class SimMIMSquareSide(nn.Module):
    """microsoft/Swin-Transformer (SimMIM encoders): the token grid's side recovered as `H = W = int(L ** 0.5)`
    after `B, C, L = x.shape`, then a reshape back to a feature map: [B, 3, 16, 16]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        x = x.transpose(1, 2)
        B, C, L = x.shape
        H = W = int(L ** 0.5)
        x = x.reshape(B, C, H, W)
        return self.head(self.conv(x).mean(dim=(2, 3)))


class MathSqrtTokenGrid(nn.Module):
    """raoyongming/DynamicViT (its position-embedding resize): a class token plus a square grid whose side is
    `int(math.sqrt(N - 1))`; the grid goes through a depthwise conv and is put back after the class token:
    [B, 3, 16, 16]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        B, N, C = x.shape
        gs = int(math.sqrt(N - 1))
        grid = x[:, 1:].transpose(1, 2).reshape(B, C, gs, gs)
        grid = self.pos(grid).flatten(2).transpose(1, 2)
        x = torch.cat((x[:, :1], x[:, 1:] + grid), dim=1)
        return self.head(x[:, 0])


class NumpySqrtMerge(nn.Module):
    """LeapLabTHU/FLatten-Transformer (CSWin merge block): `B, new_HW, C = x.shape`, `H = W = int(np.sqrt(new_HW))`,
    a `.contiguous().view(B, C, H, W)`, a strided conv, and `B, C = x.shape[:2]` read again: [B, 16, 8]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, 2 * dim, 3, 2, 1)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B, new_HW, C = x.shape
        H = W = int(np.sqrt(new_HW))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        x = self.conv(x)
        B, C = x.shape[:2]
        x = self.norm(x.view(B, C, -1).transpose(-2, -1).contiguous())
        return self.head(x.mean(1))


class UnpackedShapeView(nn.Module):
    """microsoft/Swin-Transformer (patch embedding and patch merging): `B, C, H, W = x.shape`, then `x.view(B, H,
    W, C)`, four strided slices concatenated and `x.view(B, -1, 4 * C)`: [B, 3, 8, 8]."""

    def __init__(self, dim: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 2, stride=2)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2).contiguous().view(B, H, W, C)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
        return self.head(self.reduction(x).mean(1))


class DiTUnpatchify(nn.Module):
    """facebookresearch/DiT (final layer and unpatchify): `h = w = int(x.shape[1] ** 0.5)`, `x.reshape(shape=(
    x.shape[0], h, w, p, p, c))`, `torch.einsum('nhwpqc->nchpwq', x)` back to an image: [B, 3, 8, 8]."""

    def __init__(self, patch: int = 2, dim: int = 8, channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.final = nn.Linear(dim, patch * patch * channels)
        self.head = nn.Conv2d(channels, num_classes, 3, padding=1)

    def unpatchify(self, x: Tensor) -> Tensor:
        return unpatchify(x, self.patch, self.channels)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.final(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.unpatchify(tokens) + x).mean(dim=(2, 3))


class SizeToSubmodule(nn.Module):
    """raoyongming/DynamicViT: `B = x.shape[0]` is read once and handed on: to `expand(B, -1, -1)` for the class
    token, to `torch.ones(B, N, 1)` for the initial keep decision, and as an argument to a submodule that views
    with it (MSDNet's `res.view(res.size(0), -1)`, here with the size passed in): [B, 16, 8]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.head = _BatchSizedHead(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B, N = x.shape[0], x.shape[1]
        decision = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x * decision), dim=1)
        return self.head(x, x.size(0))


class _BatchSizedHead(nn.Module):
    """Takes the batch size from its caller instead of from its input."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor, batch_size: int) -> Tensor:
        return self.fc(x.mean(1).view(batch_size, -1))


class ShapeToList(nn.Module):
    """LeapLabTHU/Dynamic_Perceiver (RegNet widths, `torch.tensor(...).int().tolist()`), moved into a forward:
    the shape goes through a tensor and back, `B, N, C = torch.tensor(x.shape).tolist()`: [B, 6, 8]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(6 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = torch.tensor(x.shape).tolist()
        return self.fc(x.reshape(B, N * C))


class ShapeItem(nn.Module):
    """kalviny/MSDNet-PyTorch (its meters take `loss.item()` and `input.size(0)`), in a forward: the batch read
    as `torch.tensor(x.size(0)).item()` and used to flatten: [B, 6, 8]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(6 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        batch_size = torch.tensor(x.size(0)).item()
        return self.fc(x.view(batch_size, -1))


# --------------------------------------------------------------------------- #
# Op idioms
# --------------------------------------------------------------------------- #


class ConvThenNoOpSqueeze(nn.Module):
    """LeapLabTHU/LASNet (its maskers score positions with a 1x1 conv): a per-position score map written for
    one mask group, `self.score(x).squeeze(1)`, where the conv gives two channels and the squeeze does nothing
    in PyTorch: [B, 3, 8, 8]."""

    def __init__(self, width: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, width, 3, padding=1)
        self.score = nn.Conv2d(width, 2, 1)
        self.head = nn.Linear(2 * 64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        score = self.score(torch.relu(self.body(x))).squeeze(1)
        return self.head(score.flatten(1))


class SqueezeKeepingBatch(nn.Module):
    """fschmid56/EfficientAT (DyMN's fully convolutional head): `x = self.classifier(x).squeeze()` on [B, K, 1, 1],
    then `if x.dim() == 1: x = x.unsqueeze(0)` to put back a batch of one; an exit after each of two blocks,
    so that the second stage also runs on one sample after compaction: [B, 3, 8, 8]."""

    def __init__(self, width: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1) for i in range(2))
        self.classifiers = nn.ModuleList(nn.Sequential(nn.Conv2d(width, num_classes, 1), nn.AdaptiveAvgPool2d(1))
                                         for _ in range(2))

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for block, classifier in zip(self.blocks, self.classifiers, strict=True):
            x = torch.relu(block(x))
            y = classifier(x).squeeze()
            if y.dim() == 1:
                # squeezed batch dimension
                y = y.unsqueeze(0)
            outs.append(y)
        return outs


class EinopsPerceiver(nn.Module):
    """LeapLabTHU/Dynamic_Perceiver: latents repeated over the batch with `repeat(latent, "... -> b ...", b=b)`,
    the feature map flattened with `rearrange(x, "b c ... -> b (...) c")`, heads folded into the batch as
    `"b n (h c) -> (b h) n c"` for einsum attention, and the map restored with `"b (h w) c -> b c h w"`:
    [B, 3, 8, 8]."""

    def __init__(self, dim: int = 8, latents: int = 4, heads: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.stem = nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.latent = nn.Parameter(torch.randn(latents, dim))
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.z2x = nn.Linear(dim, dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x_latent = repeat(self.latent, "... -> b ...", b=b)
        x = self.stem(x)
        _, _, h, w = x.shape
        x_kv = rearrange(x, "b c ... -> b (...) c")
        q, (k, v) = self.to_q(x_latent), self.to_kv(x_kv).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h c) -> (b h) n c", h=self.heads) for t in (q, k, v))
        attn = torch.einsum("b i c, b j c -> b i j", q, k) * self.scale
        o = torch.einsum("b i j, b j c -> b i c", attn.softmax(dim=-1), v)
        x_latent = x_latent + rearrange(o, "(b h) n c -> b n (h c)", h=self.heads)
        x = rearrange(x_kv + self.z2x(x_kv), "b (h w) c -> b c h w", h=h, w=w)
        return self.head(torch.cat([x.mean(dim=(2, 3)), x_latent.mean(1)], dim=1))


class NearestScaleFactor(nn.Module):
    """LeapLabTHU/LASNet (its bundled mmdetection FPN): top-down fusion with `F.interpolate(x, scale_factor=2,
    mode='nearest')` added to the lateral of the next finer level: [B, 3, 16, 16]."""

    def __init__(self, width: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        fine = self.c1(x)
        coarse = self.c2(fine)
        fused = self.lateral(fine) + F.interpolate(coarse, scale_factor=2, mode="nearest")
        return self.head(fused.mean(dim=(2, 3)))


class BilinearScaleFactor(nn.Module):
    """yangle15/RANet-pytorch (fusion of a coarser scale, there by `size=`; here by factor): `F.interpolate(x,
    scale_factor=2, mode='bilinear', align_corners=True)` and a `scale_factor=0.5` downsample, concatenated with
    the finer features: [B, 3, 8, 8]."""

    def __init__(self, width: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.fine = nn.Conv2d(3, width, 3, padding=1)
        self.coarse = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.head = nn.Linear(3 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        fine = self.fine(x)
        res = [fine,
               F.interpolate(self.coarse(x), scale_factor=2, mode="bilinear", align_corners=True),
               F.interpolate(F.interpolate(fine, scale_factor=0.5, mode="bilinear", align_corners=False),
                             scale_factor=2.0, mode="nearest")]
        return self.head(torch.cat(res, dim=1).mean(dim=(2, 3)))


def batch_index_select(x: Tensor, idx: Tensor) -> Tensor:
    """DynamicViT's selection of tokens `idx` [B, N_new] from x [B, N, C]: per-sample offsets into the
    flattened batch, then one index."""
    B, N, C = x.size()
    N_new = idx.size(1)
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    idx = idx + offset
    return x.reshape(B * N, C)[idx.reshape(-1)].reshape(B, N_new, C)


class TopKBatchIndexSelect(nn.Module):
    """raoyongming/DynamicViT (inference path): a predictor scores the tokens, `torch.argsort(score, dim=1,
    descending=True)[:, :num_keep_node]` keeps the best with `num_keep_node = int(N * ratio)`, the class token
    is prepended to the policy and `batch_index_select` gathers: [B, 16, 8]."""

    def __init__(self, dim: int = 8, ratio: float = 0.5, num_classes: int = 5) -> None:
        super().__init__()
        self.ratio = ratio
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.predictor = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2), nn.LogSoftmax(dim=-1))
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        score = self.predictor(x[:, 1:]).reshape(B, -1, 2)[:, :, 0]
        num_keep_node = int(N * self.ratio)
        keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
        cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype, device=keep_policy.device)
        now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
        x = batch_index_select(x, now_policy)
        x = x + self.mlp(x)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


class GatherAndIndexSelect(nn.Module):
    """raoyongming/DynamicViT (DynamicSwin/ConvNeXt keep and drop sets): `idx = torch.argsort(score, dim=1,
    descending=True)` split into kept and dropped tokens, taken with `torch.gather(x, 1, idx.expand(-1, -1,
    C))`; channels picked by `index_select` with indices computed from a learned importance:
    [B, 16, 8]."""

    def __init__(self, dim: int = 8, keep: int = 6, channels: int = 5, num_classes: int = 5) -> None:
        super().__init__()
        self.keep, self.channels = keep, channels
        self.score = nn.Linear(dim, 1)
        self.importance = nn.Parameter(torch.randn(dim))
        self.fast = nn.Linear(channels, channels)
        self.slow = nn.Linear(channels, channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        idx = torch.argsort(self.score(x), dim=1, descending=True)
        chosen = torch.argsort(self.importance, descending=True)[: self.channels].sort().values
        x = x.index_select(2, chosen)
        C = x.shape[-1]
        idx1, idx2 = idx[:, : self.keep], idx[:, self.keep :]
        x1 = torch.gather(x, 1, idx1.expand(-1, -1, C))
        x2 = torch.gather(x, 1, idx2.expand(-1, -1, C))
        return self.head(self.slow(x1).mean(1) + self.fast(x2).mean(1))


class CausalMaskedFillInPlace(nn.Module):
    """karpathy/minGPT (causal self-attention): a `torch.tril` buffer sliced to the sequence, `1.0 / math.sqrt(
    k.size(-1))` scaling, `.view(B, T, n_head, C // n_head)`, and the mask applied in place as LeapLabTHU/
    Dynamic_Perceiver's attention does, `att.masked_fill_(self.bias[:, :, :T, :T] == 0, float('-inf'))`:
    [B, 6, 8]."""

    def __init__(self, dim: int = 8, n_head: int = 2, block_size: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att.masked_fill_(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.head(y[:, -1])


class ShiftedWindowMask(nn.Module):
    """microsoft/Swin-Transformer (shifted-window attention): the mask built in `__init__` from an image of
    region ids, `attn_mask.masked_fill(attn_mask != 0, -100.0)`, registered as a buffer and added after
    `attn.view(B_ // nW, nW, num_heads, N, N)`: [B, 16, 8] tokens of a 4x4 grid, windows of 2."""

    def __init__(self, dim: int = 8, resolution: int = 4, window_size: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.resolution, self.window_size, self.shift = resolution, window_size, window_size // 2
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, num_classes)
        img_mask = torch.zeros((1, resolution, resolution, 1))
        cnt = 0
        for h in (slice(0, -window_size), slice(-window_size, -self.shift), slice(-self.shift, None)):
            for w in (slice(0, -window_size), slice(-window_size, -self.shift), slice(-self.shift, None)):
                img_mask[:, h, w, :] = cnt
                cnt += 1
        mask_windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        ws, R = self.window_size, self.resolution
        x = torch.roll(x.view(B, R, R, C), shifts=(-self.shift, -self.shift), dims=(1, 2))
        x_windows = window_partition(x, ws).view(-1, ws * ws, C)
        B_, N, _ = x_windows.shape
        q, k, v = self.qkv(x_windows).chunk(3, dim=-1)
        attn = q @ k.transpose(-2, -1) * C ** -0.5
        nW = self.attn_mask.shape[0]
        attn = attn.view(B_ // nW, nW, N, N) + self.attn_mask.unsqueeze(0)
        attn = attn.view(-1, N, N).softmax(dim=-1)
        return self.head((attn @ v).view(B, -1, C).mean(1))


# --------------------------------------------------------------------------- #
# Lists, loops and exits
# --------------------------------------------------------------------------- #


class ScaleListParallel(nn.Module):
    """kalviny/MSDNet-PyTorch (first layer and ParallelModule): a Python list of per-scale features, built with
    `res.append(x)` in a loop and mapped scale by scale with `for i in range(len(x)): res.append(self.m[i](x[i]))`;
    the list's last entry is classified: [B, 3, 8, 8]."""

    def __init__(self, width: int = 4, scales: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, 1 if i == 0 else 2, 1)
                                    for i in range(scales))
        self.m = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scales))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        res = []
        for i in range(len(self.layers)):
            x = self.layers[i](x)
            res.append(x)
        out = []
        for i in range(len(res)):
            out.append(self.m[i](res[i]))
        return self.head(sum(o.mean(dim=(2, 3)) for o in out))


class _ClassifierModule(nn.Module):
    """MSDNet's classifier: conv, pooling, `res.view(res.size(0), -1)`, linear."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.m = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        res = self.m(x)
        res = res.view(res.size(0), -1)
        return self.linear(res)


class ModuleListExits(nn.Module):
    """kalviny/MSDNet-PyTorch (forward): `for i in range(self.nBlocks): x = self.blocks[i](x); res.append(
    self.classifier[i](x))` over two `nn.ModuleList`s, returning the list of every exit's logits: [B, 3, 8, 8]."""

    def __init__(self, width: int = 6, n_blocks: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.nBlocks = n_blocks
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU())
                                    for i in range(n_blocks))
        self.classifier = nn.ModuleList(_ClassifierModule(width, num_classes) for _ in range(n_blocks))

    def forward(self, x: Tensor) -> list[Tensor]:
        res = []
        for i in range(self.nBlocks):
            x = self.blocks[i](x)
            res.append(self.classifier[i](x))
        return res


class ConcatExitFeatures(nn.Module):
    """LeapLabTHU/Dynamic_Perceiver (its merged classifier over the CNN and latent branches): every exit's
    pooled feature is kept in a list, and the last exit classifies `torch.cat(feats, dim=1)` of them all:
    [B, 3, 8, 8], three exits."""

    def __init__(self, width: int = 4, n_blocks: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1) for i in range(n_blocks))
        self.exits = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(n_blocks))
        self.merge = nn.Sequential(nn.BatchNorm1d(n_blocks * width), nn.Linear(n_blocks * width, num_classes))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats, outs = [], []
        for block, exit_head in zip(self.blocks, self.exits, strict=True):
            x = torch.relu(block(x))
            feats.append(x.mean(dim=(2, 3)))
            outs.append(exit_head(feats[-1]))
        outs.append(self.merge(torch.cat(feats, dim=1)))
        return outs


class TokenMergeMean(nn.Module):
    """facebookresearch/ToMe (bipartite soft matching): under `torch.no_grad()` the tokens are split into
    alternating halves, the class token's scores are set in place to `-math.inf`, `argsort` ranks the best
    matches, and a `merge` closure averages each merged token into its match with `dst.scatter_reduce(-2,
    index, src, reduce="mean")` before `torch.cat([unm, dst], dim=1)`: [B, 9, 8], a class token and 8 tokens."""

    def __init__(self, dim: int = 8, r: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.r = r
        self.qk = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def matching(self, metric: Tensor) -> Callable[[Tensor], Tensor]:
        """The merge function for this batch's tokens, decided once from `metric` [B, N, C]."""
        r = self.r
        with torch.no_grad():
            metric = metric / metric.norm(dim=-1, keepdim=True)
            even, odd = metric[..., ::2, :], metric[..., 1::2, :]
            scores = even @ odd.transpose(-1, -2)
            scores[..., 0, :] = -math.inf  # the class token is never merged away
            best, best_idx = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)[..., None]
            kept, merged = order[..., r:, :].sort(dim=1)[0], order[..., :r, :]
            target = best_idx[..., None].gather(dim=-2, index=merged)

        def merge(x: Tensor, mode: str = "mean") -> Tensor:
            src, dst = x[..., ::2, :], x[..., 1::2, :]
            n, t, c = src.shape
            unm = src.gather(dim=-2, index=kept.expand(n, t - r, c))
            src = src.gather(dim=-2, index=merged.expand(n, r, c))
            dst = dst.scatter_reduce(-2, target.expand(n, r, c), src, reduce=mode)
            return torch.cat([unm, dst], dim=1)

        return merge

    def forward(self, x: Tensor) -> Tensor:
        merge = self.matching(self.qk(x))
        x = merge(x)
        x = x + self.mlp(x)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


class NoGradPolicy(nn.Module):
    """raoyongming/DynamicViT (`with torch.no_grad():` around a probe of the backbone), here inside forward:
    the token keep mask is computed under `torch.no_grad()` and applied outside it: [B, 16, 8]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            score = self.score(x).squeeze(-1)
            keep = (score >= score.mean(dim=1, keepdim=True)).to(x.dtype).unsqueeze(-1)
        x = x + self.mlp(x) * keep
        return self.head(x.mean(1))


# --------------------------------------------------------------------------- #
# NumPy constants
# --------------------------------------------------------------------------- #


def sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos table, computed in NumPy: [grid_size ** 2, embed_dim]."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
    halves = []
    for pos in grid.reshape(2, -1):
        out = np.einsum("m,d->md", pos, omega)
        halves.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    return np.concatenate(halves, axis=1)


class NumpyPosEmbedAndScale(nn.Module):
    """facebookresearch/DiT: a frozen `nn.Parameter` filled with `torch.from_numpy(pos_embed).float().unsqueeze(0)`
    of a NumPy sin-cos table, a `np.sqrt(dim)` temperature (a NumPy float64 meeting float32 tensors) and a NumPy
    array turned into a tensor inside forward: [B, 3, 8, 8]."""

    def __init__(self, dim: int = 8, patch: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        grid = 8 // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim), requires_grad=False)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(dim, grid)).float().unsqueeze(0))
        self.temperature = np.sqrt(dim)
        self.class_weights = np.linspace(0.5, 1.5, num_classes, dtype=np.float32)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        attn = (x @ x.transpose(1, 2) / self.temperature).softmax(dim=-1)
        return self.head((attn @ x).mean(1)) * torch.from_numpy(self.class_weights)


# --------------------------------------------------------------------------- #
# Structured outputs
# --------------------------------------------------------------------------- #


class LogitsAndKeepMask(nn.Module):
    """raoyongming/DynamicViT (training forward, `return x, out_pred_prob`): the logits returned together with
    the token keep decision as `(logits, mask)`, the mask [B, N] beside logits [B, num_classes]: [B, 16, 8]."""

    def __init__(self, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 2)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mask = (self.score(x).softmax(dim=-1)[:, :, 0] > 0.5).to(x.dtype)
        logits = self.head((x * mask.unsqueeze(-1)).sum(1) / (mask.sum(1, keepdim=True) + 1))
        return logits, mask
