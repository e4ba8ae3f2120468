"""A zoo of small look-alike multi-exit networks of published structures.

None of these models was written for dync: each one mimics the structure of a
published dynamic network (MSDNet, RANet, Dynamic Perceiver) closely enough to
exercise the same export paths (feature lists carried between blocks, resampling
between resolutions, attention over flattened feature maps, global pooling), but
is small enough that one ``torch.onnx.export(..., dynamo=True)`` takes seconds.

Conventions shared by every multi-exit model here:

* a plain ``nn.Module`` whose ``forward(x)`` takes one image batch ``[B, C, H, W]``
  and returns a Python ``list`` of exit logits ``[B, num_classes]`` in compute
  order (earliest exit first);
* no Python control flow on tensor values, no cross-sample mixing (BatchNorm is
  meant to run in eval mode), reshapes keep the batch dimension first;
* construction is deterministic given ``torch.manual_seed``; weights and
  BatchNorm statistics are initialised to look trained (see ``init_like_trained``)
  so that eval-mode BatchNorm is not the identity and logits are of order one.

``SingleExitNet`` (a plain tensor output) and ``DataDependentNet`` (a Python
``if`` on a tensor value, which ``torch.export`` cannot capture) cover the
single-stage path and the error path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ZOO",
    "DataDependentNet",
    "DynamicPerceiverLike",
    "MSDNetLike",
    "RANetLike",
    "SingleExitNet",
    "init_like_trained",
    "msdnet_cifar7",
]


# --------------------------------------------------------------------------- #
# Shared building blocks
# --------------------------------------------------------------------------- #


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU, the basic unit of all three CNN families."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def bottleneck(cin: int, cout: int, stride: int = 1, width: int = 4) -> nn.Sequential:
    """1x1 bottleneck then 3x3 conv, as in MSDNet's and RANet's dense layers.

    The 1x1 conv is left out where it would not narrow the input.
    """
    if cin <= width * cout:
        return conv_bn(cin, cout, 3, stride)
    return nn.Sequential(conv_bn(cin, width * cout, 1), conv_bn(width * cout, cout, 3, stride))


def conv_pool_head(cin: int, mid: int, num_classes: int, convs: int = 2) -> nn.Sequential:
    """Exit classifier: strided convs, global average pool, linear."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(conv_bn(cin if i == 0 else mid, mid, 3, 2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(mid, num_classes)]
    return nn.Sequential(*layers)


@torch.no_grad()
def init_like_trained(model: nn.Module) -> None:
    """Variance-preserving (fan-in) Kaiming conv init plus non-trivial
    BatchNorm statistics and affine parameters, so eval-mode BatchNorm matters."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.8, 1.2)
            m.bias.normal_(0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- #
# MSDNet (Huang et al., ICLR 2018; kalviny/MSDNet-PyTorch)
# --------------------------------------------------------------------------- #


class MSDStem(nn.Module):
    """First MSDNet layer: builds the initial pyramid at scales 1, 1/2, 1/4, ..."""

    def __init__(self, in_ch: int, channels: Sequence[int]) -> None:
        super().__init__()
        cins = [in_ch, *channels[:-1]]
        self.layers = nn.ModuleList(
            conv_bn(cin, cout, 3, 1 if s == 0 else 2) for s, (cin, cout) in enumerate(zip(cins, channels, strict=True))
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MSDScaleUnit(nn.Module):
    """One scale of an MSDNet dense layer.

    New features come from the same scale (regular conv) and, when a finer scale
    exists, from it through a strided conv; both are concatenated to the carried
    features (dense connectivity).
    """

    def __init__(self, c_same: int, c_finer: int | None, growth: int) -> None:
        super().__init__()
        if c_finer is None:
            self.regular = bottleneck(c_same, growth)
            self.down = None
            self.out_channels = c_same + growth
        else:
            half = max(1, growth // 2)
            self.regular = bottleneck(c_same, half)
            self.down = bottleneck(c_finer, half, stride=2)
            self.out_channels = c_same + 2 * half

    def forward(self, same: Tensor, finer: Tensor | None = None) -> Tensor:
        parts = [same, self.regular(same)]
        if self.down is not None:
            parts.append(self.down(finer))
        return torch.cat(parts, dim=1)


class MSDLayer(nn.Module):
    """A dense layer over the scale list; it may drop the finest scales.

    ``in_channels`` lists the carried channels per scale (finest first); the
    layer keeps the ``n_out`` coarsest scales, and the new finest one still
    reads the dropped scale through its strided conv, as in MSDNet.
    """

    def __init__(self, in_channels: Sequence[int], n_out: int, growth: Sequence[int]) -> None:
        super().__init__()
        self.offset = len(in_channels) - n_out
        units = []
        for j in range(n_out):
            i = j + self.offset
            c_finer = in_channels[i - 1] if i > 0 else None
            units.append(MSDScaleUnit(in_channels[i], c_finer, growth[i]))
        self.units = nn.ModuleList(units)
        self.out_channels = [u.out_channels for u in units]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = []
        for j, unit in enumerate(self.units):
            i = j + self.offset
            out.append(unit(feats[i], feats[i - 1] if i > 0 else None))
        return out


class MSDTransition(nn.Module):
    """Per-scale 1x1 compression, applied after a block that dropped a scale."""

    def __init__(self, channels: Sequence[int], reduction: float) -> None:
        super().__init__()
        outs = [max(1, int(c * reduction)) for c in channels]
        self.convs = nn.ModuleList(conv_bn(c, o, 1) for c, o in zip(channels, outs, strict=True))
        self.out_channels = outs

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats, strict=True)]


class MSDBlock(nn.Module):
    """The layers between two exits: dense layers, then optional compression."""

    def __init__(
        self,
        in_channels: Sequence[int],
        n_out: int,
        growth: Sequence[int],
        layers: int,
        reduction: float,
    ) -> None:
        super().__init__()
        dropped = len(in_channels) > n_out
        mods: list[nn.Module] = []
        channels = list(in_channels)
        for _ in range(layers):
            layer = MSDLayer(channels, n_out, growth)
            mods.append(layer)
            channels = layer.out_channels
            growth = growth[-n_out:]  # keep per-scale growth aligned with `channels`
        if dropped and reduction < 1.0:
            trans = MSDTransition(channels, reduction)
            mods.append(trans)
            channels = trans.out_channels
        self.mods = nn.ModuleList(mods)
        self.out_channels = channels

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        for mod in self.mods:
            feats = mod(feats)
        return feats


def msd_scales_per_block(scales: int, num_exits: int) -> list[int]:
    """MSDNet's 'even' schedule: the number of scales shrinks from ``scales`` to 1."""
    return [max(1, scales - (b * scales) // num_exits) for b in range(num_exits)]


class MSDNetLike(nn.Module):
    """Look-alike of MSDNet (Multi-Scale Dense Network, Huang et al. 2018).

    Mimicked because it is the canonical anytime-prediction network: a list of
    feature maps at scales 1, 1/2, 1/4 is carried between blocks; every block
    grows each scale densely from the same scale and the finer one (strided
    conv); later blocks drop the finest scales; every exit classifier reads the
    coarsest scale only (conv, conv, global pool, linear).
    """

    def __init__(
        self,
        num_exits: int = 4,
        in_ch: int = 3,
        num_classes: int = 10,
        scales: int = 3,
        growth: int = 8,
        base: int = 16,
        layers_per_block: int | Sequence[int] = 1,
        reduction: float = 0.5,
        head_width: int | None = None,
    ) -> None:
        super().__init__()
        mult = [2**s for s in range(scales)]
        channels = [base * m for m in mult]
        growths = [growth * m for m in mult]
        if isinstance(layers_per_block, int):
            layers_per_block = [layers_per_block] * num_exits
        self.stem = MSDStem(in_ch, channels)
        blocks, heads = [], []
        for n_out, n_layers in zip(msd_scales_per_block(scales, num_exits), layers_per_block, strict=True):
            block = MSDBlock(channels, n_out, growths[-len(channels) :], n_layers, reduction)
            channels = block.out_channels
            blocks.append(block)
            c = channels[-1]
            heads.append(conv_pool_head(c, head_width or c, num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        init_like_trained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.stem(x)
        outs = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            feats = block(feats)
            outs.append(head(feats[-1]))
        return outs


def msdnet_cifar7(num_classes: int = 10) -> MSDNetLike:
    """A CIFAR-sized (3x32x32) 7-exit MSDNet look-alike for benchmarks.

    About 84 MMACs per image for the full model (a batch of 256 takes roughly
    0.5-1 s in onnxruntime on two CPU cores). Blocks get more layers as the
    finest scales are dropped, so the cumulative cost grows roughly linearly
    with the exit index: about 0.09, 0.23, 0.40, 0.58, 0.74, 0.87, 1.0 of the
    full model at exits 1..7.
    """
    return MSDNetLike(
        num_exits=7,
        in_ch=3,
        num_classes=num_classes,
        scales=3,
        growth=6,
        base=20,
        layers_per_block=[1, 2, 2, 2, 3, 3, 4],
        reduction=0.5,
        head_width=32,
    )


# --------------------------------------------------------------------------- #
# RANet (Yang et al., CVPR 2020; yangle15/RANet-pytorch)
# --------------------------------------------------------------------------- #


class RANetFusionBlock(nn.Module):
    """One block of a RANet sub-network.

    Sub-networks above the lowest resolution fuse the matching block's feature
    of the next-lower-resolution sub-network: upsample, 1x1 conv, concatenate.
    """

    def __init__(self, width: int, lower_width: int | None, up: int) -> None:
        super().__init__()
        self.up = up
        self.lateral = None if lower_width is None else conv_bn(lower_width, width, 1)
        cin = width if lower_width is None else 2 * width
        self.body = nn.Sequential(bottleneck(cin, width), conv_bn(width, width))

    def forward(self, x: Tensor, lower: Tensor | None = None) -> Tensor:
        if self.lateral is not None:
            lower = F.interpolate(lower, scale_factor=float(self.up), mode="nearest")
            x = torch.cat([x, self.lateral(lower)], dim=1)
        return self.body(x)


class RANetSubnet(nn.Module):
    """A sub-network at one input resolution, with its stem, blocks and exits."""

    def __init__(
        self,
        in_ch: int,
        width: int,
        down: int,
        blocks: int,
        exits: int,
        lower_width: int | None,
        up: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.down = down
        self.stem = conv_bn(in_ch, width)
        self.blocks = nn.ModuleList(RANetFusionBlock(width, lower_width, up) for _ in range(blocks))
        self.exit_after = [round((k + 1) * blocks / exits) - 1 for k in range(exits)]
        self.heads = nn.ModuleList(conv_pool_head(width, width, num_classes, convs=1) for _ in range(exits))

    def forward(self, image: Tensor, lower: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
        x = F.avg_pool2d(image, self.down) if self.down > 1 else image
        x = self.stem(x)
        feats, outs = [], []
        for j, block in enumerate(self.blocks):
            x = block(x, None if lower is None else lower[j])
            feats.append(x)
            for k, after in enumerate(self.exit_after):
                if after == j:
                    outs.append(self.heads[k](x))
        return feats, outs


class RANetLike(nn.Module):
    """Look-alike of RANet (Resolution Adaptive Network, Yang et al. 2020).

    Mimicked because its cost is driven by input resolution rather than depth:
    a low-resolution sub-network runs first on a downsampled image, then
    sub-networks at growing resolutions, each fusing the features of the
    previous sub-network (upsample + concat); every sub-network ends in one or
    more exits (default 2 + 1 + 1 = 4 exits, low resolution first).
    """

    def __init__(
        self,
        in_ch: int = 3,
        num_classes: int = 10,
        downsample: Sequence[int] = (4, 2, 1),
        width: int = 16,
        blocks: int = 2,
        exits_per_subnet: Sequence[int] = (2, 1, 1),
    ) -> None:
        super().__init__()
        subnets = []
        for r, (down, exits) in enumerate(zip(downsample, exits_per_subnet, strict=True)):
            lower = None if r == 0 else width
            up = 1 if r == 0 else downsample[r - 1] // down
            subnets.append(RANetSubnet(in_ch, width, down, blocks, exits, lower, up, num_classes))
        self.subnets = nn.ModuleList(subnets)
        init_like_trained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        lower: list[Tensor] | None = None
        for subnet in self.subnets:
            lower, sub_outs = subnet(x, lower)
            outs.extend(sub_outs)
        return outs


# --------------------------------------------------------------------------- #
# Dynamic Perceiver (Han et al., ICCV 2023; LeapLabTHU/Dynamic_Perceiver)
# --------------------------------------------------------------------------- #


class Attention(nn.Module):
    """Pre-norm single-head attention with a residual: queries attend to tokens.

    Written with plain matmul + softmax; used both as latent->feature
    cross-attention and as latent self-attention.
    """

    def __init__(self, q_dim: int, kv_dim: int, dim: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(q_dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.q = nn.Linear(q_dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.proj = nn.Linear(dim, q_dim)
        self.scale = dim**-0.5

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        q = self.q(self.norm_q(queries))
        kv = self.norm_kv(tokens)
        k, v = self.k(kv), self.v(kv)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return queries + self.proj(torch.matmul(attn, v))


class LatentMLP(nn.Module):
    """Pre-norm MLP with a residual over the latent tokens."""

    def __init__(self, dim: int, ratio: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class PerceiverStage(nn.Module):
    """One stage: CNN convs, then latents read the CNN map and think."""

    def __init__(self, cin: int, cout: int, stride: int, latent_dim: int) -> None:
        super().__init__()
        self.cnn = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout))
        self.cross = Attention(latent_dim, cout, latent_dim)
        self.self_attn = Attention(latent_dim, latent_dim, latent_dim)
        self.mlp = LatentMLP(latent_dim)

    def forward(self, x: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        x = self.cnn(x)
        tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        latents = self.cross(latents, tokens)
        latents = self.self_attn(latents, latents)
        return x, self.mlp(latents)


class LatentHead(nn.Module):
    """Exit reading the latent tokens: LayerNorm, mean over latents, linear;
    optionally also the globally pooled CNN features (the last exit)."""

    def __init__(self, latent_dim: int, num_classes: int, cnn_dim: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(latent_dim)
        self.fc = nn.Linear(latent_dim + cnn_dim, num_classes)
        self.use_cnn = cnn_dim > 0

    def forward(self, latents: Tensor, x: Tensor) -> Tensor:
        z = self.norm(latents).mean(dim=1)
        if self.use_cnn:
            z = torch.cat([z, x.mean(dim=(2, 3))], dim=1)
        return self.fc(z)


class DynamicPerceiverLike(nn.Module):
    """Look-alike of Dynamic Perceiver (Han et al. 2023).

    Mimicked because it decouples the exits from the CNN: a CNN branch runs in
    stages while a branch of learned latent tokens (expanded over the batch)
    cross-attends to the flattened CNN features after each stage, then runs
    self-attention and an MLP; the exits read the latent tokens (mean + linear),
    and the last exit also reads the pooled CNN features.
    """

    def __init__(
        self,
        in_ch: int = 3,
        num_classes: int = 10,
        num_latents: int = 8,
        latent_dim: int = 32,
        stages: int = 3,
        base: int = 16,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_ch, base)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * 0.5)
        chans = [base * 2**s for s in range(stages + 1)]
        self.stages = nn.ModuleList(PerceiverStage(chans[s], chans[s + 1], 2, latent_dim) for s in range(stages))
        self.heads = nn.ModuleList(
            LatentHead(latent_dim, num_classes, chans[-1] if s == stages - 1 else 0) for s in range(stages)
        )
        init_like_trained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        latents = self.latents.unsqueeze(0).expand(x.size(0), -1, -1)
        outs = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x, latents = stage(x, latents)
            outs.append(head(latents, x))
        return outs


# --------------------------------------------------------------------------- #
# Single-stage and unsupported models
# --------------------------------------------------------------------------- #


class SingleExitNet(nn.Module):
    """A tiny ordinary CNN with one output tensor (not a list): the single-stage path."""

    def __init__(self, in_ch: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(in_ch, width), conv_bn(width, 2 * width, 3, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(2 * width, num_classes))
        init_like_trained(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DataDependentNet(nn.Module):
    """A tiny early-exit net that decides *in Python* whether to stop.

    ``if confidence > threshold: return`` branches on a tensor value, which
    ``torch.export`` cannot capture; used to test dync's error message.
    """

    def __init__(self, in_ch: int = 3, num_classes: int = 10, width: int = 8, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.block1 = conv_bn(in_ch, width)
        self.head1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))
        self.block2 = conv_bn(width, width, 3, 2)
        self.head2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))
        init_like_trained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.block1(x)
        early = self.head1(h)
        if early.softmax(dim=-1).max() > self.threshold:  # data-dependent: not exportable
            return [early]
        return [early, self.head2(self.block2(h))]


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "msdnet": (MSDNetLike, (4, 3, 32, 32)),
    "ranet": (RANetLike, (4, 3, 32, 32)),
    "dynamic_perceiver": (DynamicPerceiverLike, (4, 3, 32, 32)),
    "single_exit": (SingleExitNet, (4, 3, 16, 16)),
}
"""name -> (factory, example input shape with batch 4); exportable models only."""
