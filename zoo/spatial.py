"""Look-alikes of spatially dynamic residual networks (LASNet, LAUDNet, DynConv).

None of this code comes from the published repositories; it reproduces, with plain
PyTorch ops, the eval-mode semantics described in ``docs/spatial_semantics.md``:

* **spatial masks** (LASNet, LAUDNet "spatial", DynConv): a masker reads the block
  input, pools it to a coarse grid (one cell per ``patch x patch`` output pixels),
  a 1x1 conv with bias gives two logits per cell and group, a cell is kept where
  ``logit_keep >= logit_drop``; the binary grid is upsampled (nearest) to the block's
  output size and multiplies the output of ``bn3``, just before the residual add:
  ``relu(mask * bn3(conv3(...)) + identity)``. The convs themselves run dense, so
  the exported graph contains the dense convs, the mask computation and the
  ``Mul``/``Add`` pattern that dync lowers to gather-scatter. DynConv's masker
  (``masker="dynconv"``) instead gives one logit per output pixel from a strided
  3x3 conv plus a global term, kept where ``>= 0``, with no grid or upsampling;
* **layer skipping** (LAUDNet "layer"): the same masker with a 1x1 grid, one bit per
  sample per block;
* **channel skipping** (LAUDNet "channel"): a per-sample mask over contiguous groups
  of the bottleneck width multiplies the conv1 and conv2 outputs *before* their
  BatchNorm, so a skipped channel carries ``relu(beta - gamma * mean / std)``.

Conventions (as in ``zoo/multi_exit.py``): ``forward(x)`` takes one ``[B, C, H, W]`` batch
and returns one tensor; no Python control flow on tensor values; construction is
deterministic given ``torch.manual_seed``; weights and BatchNorm statistics look
trained (``init_like_trained``) and the masker biases are calibrated on a fixed
random batch so that a chosen fraction of positions is kept. The models are meant
for eval mode: the hard decision is used in train mode too (the originals use
Gumbel-softmax there, which dync never sees).

Helpers for tests and benchmarks: ``calibrate_density`` (set masker biases for a
target density on given inputs), ``force_masks`` (exact densities: per-sample
top-k, or a fixed pattern), ``mask_densities`` (measure), ``conv1_positions`` (the
positions where conv1's output is needed, i.e. the dilated mask) and
``channel_fill_values`` (what a skipped channel carries).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.multi_exit import init_like_trained

__all__ = [
    "SPATIAL_ZOO",
    "ChannelMaskedBottleneck",
    "ChannelMasker",
    "DynConvMasker",
    "LASNetLike",
    "MaskedBottleneck",
    "SpatialMasker",
    "calibrate_density",
    "channel_fill_values",
    "conv1_positions",
    "conv_out_size",
    "force_masks",
    "lasnet_resnet50_like",
    "mask_densities",
    "upsample_mask",
]

Mode = Literal["spatial", "layer", "channel"]

_FORCE_MARGIN = 2.0
"""Forced fixed patterns decide on ``clamp(gap, -1, 1) +- _FORCE_MARGIN``: exact for any gap."""


def conv_out_size(size: int, stride: int) -> int:
    """Output size of the block's 3x3 / padding-1 conv2 (and of its 1x1 strided shortcut)."""
    return (size - 1) // stride + 1


def upsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of a coarse mask grid to the block's output size.

    As in LASNet, nothing is emitted when the grid already has the output size
    (patch 1); otherwise ``F.interpolate(mode="nearest")``, which maps output pixel
    ``i`` to grid cell ``floor(i * grid / size)``: ``S x S`` patches when the size is
    a multiple of the grid.
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="nearest")


def _expand_groups(mask: Tensor, channels: int) -> Tensor:
    """Map ``G`` mask groups onto ``channels`` contiguous channel blocks (channel c -> group c // (channels/G))."""
    groups = mask.shape[1]
    if groups == 1 or groups == channels:
        return mask
    per = channels // groups
    if mask.dim() == 2:
        return mask.unsqueeze(2).expand(-1, -1, per).flatten(1)
    return mask.unsqueeze(2).expand(-1, -1, per, -1, -1).flatten(1, 2)


# --------------------------------------------------------------------------- #
# Maskers
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Force:
    """How a masker's decision is overridden (see ``force_masks``)."""

    density: float
    per_sample: bool
    seed: int


class _Masker(nn.Module):
    """Shared decision logic, calibration and forcing of all maskers.

    LASNet/LAUDNet view their ``2G`` logits as ``[B, 2, G, ...]``, take index 0 as
    "keep" (the Gumbel-softmax output they keep in training) and decide
    ``keep >= drop`` at inference; DynConv has one logit and decides ``logit >= 0``.
    Ties keep in both.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.force: _Force | None = None
        self.calibrate_to: float | None = None

    def _last_bias(self) -> Tensor:
        raise NotImplementedError

    def _decide_pair(self, logits: Tensor) -> Tensor:
        """LASNet/LAUDNet rule on ``2G`` logits ``[keep_0..keep_G-1, drop_0..drop_G-1]``."""
        pair = logits.unflatten(1, (2, self.groups))
        return self._decide(pair[:, 0], pair[:, 1])

    def _decide(self, keep: Tensor, drop: Tensor | None) -> Tensor:
        """Keep where ``keep >= drop`` (or ``keep >= 0`` for DynConv's single logit); ties keep."""
        gap = keep if drop is None else keep - drop
        if self.calibrate_to is not None:
            shift = self._calibrate(gap, self.calibrate_to)
            keep, gap = keep - shift, gap - shift
        if self.force is not None:
            return self._forced(gap).to(keep.dtype)
        return (keep >= (0.0 if drop is None else drop)).to(keep.dtype)

    @torch.no_grad()
    def _calibrate(self, gap: Tensor, density: float) -> Tensor:
        """Shift the keep biases so that a ``density`` fraction of ``gap >= 0`` on this batch.

        Returns the per-group shift (broadcastable to ``gap``) to apply to this pass.
        """
        per_group = gap.transpose(0, 1).flatten(1) if gap.dim() > 2 else gap.flatten().unsqueeze(0)
        if density >= 1.0:
            t = per_group.amin(1) - 1.0
        elif density <= 0.0:
            t = per_group.amax(1) + 1.0
        else:
            t = torch.quantile(per_group, 1.0 - density, dim=1)
        if gap.dim() == 2:  # channel masker: one shift for all groups
            t = t.expand(self.groups)
        self._last_bias()[: self.groups] -= t
        return t.view(1, -1, *([1] * (gap.dim() - 2))) if gap.dim() > 2 else t.view(1, -1)

    def _forced(self, gap: Tensor) -> Tensor:
        force = self.force
        assert force is not None
        rows = gap.flatten(2) if gap.dim() > 2 else gap.unsqueeze(1)  # [B, R, n]
        n = rows.shape[-1]
        k = int(force.density * n + 0.5)
        if force.per_sample and n > 1:
            if k == 0:
                kept = rows > rows.amax(-1, keepdim=True)
            elif k >= n:
                kept = rows >= rows.amin(-1, keepdim=True)
            else:
                kept = rows >= rows.topk(k, dim=-1).values[..., k - 1 : k]
            return kept.view_as(gap)
        rng = random.Random(force.seed)
        pattern = []
        for _ in range(rows.shape[1]):
            chosen = set(rng.sample(range(n), k))
            pattern.append([_FORCE_MARGIN if i in chosen else -_FORCE_MARGIN for i in range(n)])
        prior = torch.tensor(pattern, dtype=gap.dtype, device=gap.device).view(1, *rows.shape[1:])
        return (rows.clamp(-1.0, 1.0) + prior >= 0).view_as(gap)


class SpatialMasker(_Masker):
    """LASNet/LAUDNet spatial masker: adaptive average pool, 1x1 conv with bias, hard decision.

    Reads the block *input* ``[B, cin, H, W]`` (at the input resolution, also for
    stride-2 blocks) and returns the binary grid ``[B, G, gh, gw]``. The grid is
    ``mask_size x mask_size`` when ``mask_size`` is given (1 = layer skipping),
    otherwise ``(Ho // patch, Wo // patch)`` for the block output size ``(Ho, Wo)``
    (the originals fix it at construction from the training input size). Pooling is
    skipped when the grid already has the input's size, as in the originals.
    """

    def __init__(self, cin: int, groups: int = 1, mask_size: int | None = None, patch: int = 1) -> None:
        super().__init__(groups)
        self.mask_size = mask_size
        self.patch = patch
        self.conv = nn.Conv2d(cin, 2 * groups, 1, bias=True)

    def _last_bias(self) -> Tensor:
        return self.conv.bias.data

    def grid(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """Mask grid size for a block output of size ``out_hw``."""
        if self.mask_size is not None:
            return (self.mask_size, self.mask_size)
        return (max(1, out_hw[0] // self.patch), max(1, out_hw[1] // self.patch))

    def forward(self, x: Tensor, out_hw: tuple[int, int]) -> Tensor:
        gh, gw = self.grid(out_hw)
        pooled = F.adaptive_avg_pool2d(x, (gh, gw)) if (gh < x.shape[-2] or gw < x.shape[-1]) else x
        return self._decide_pair(self.conv(pooled))


class ChannelMasker(_Masker):
    """LAUDNet channel masker: global average pool, small MLP, two logits per channel group.

    ``kind="mlp"`` (the configuration of LAUDNet's training scripts): Linear -> ReLU ->
    Linear, hidden width ``max(groups // reduction, 16)``. ``kind="conv_linear"``:
    1x1 conv -> BN -> ReLU at full resolution, then pool and one Linear. Returns
    ``[B, G]`` in {0, 1}.
    """

    def __init__(self, cin: int, groups: int, kind: Literal["mlp", "conv_linear"] = "mlp", reduction: int = 16) -> None:
        super().__init__(groups)
        self.kind = kind
        if kind == "mlp":
            hidden = max(groups // reduction, 16)
            self.squeeze: nn.Module = nn.Identity()
            self.fc = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, 2 * groups))
        else:
            hidden = max(cin // reduction, 1)
            self.squeeze = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
            self.fc = nn.Sequential(nn.Linear(hidden, 2 * groups))

    def _last_bias(self) -> Tensor:
        return self.fc[-1].bias.data

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(self.squeeze(x), 1).flatten(1)
        return self._decide_pair(self.fc(pooled))


class DynConvMasker(_Masker):
    """DynConv's masker (Verelst & Tuytelaars): one logit per output pixel, kept where ``>= 0``.

    A 3x3 conv (stride of the block, with bias) on the block input plus a Linear on
    its global average pool, broadcast over the map: the mask is produced directly
    at the block's output resolution (no grid, no upsampling).
    """

    def __init__(self, cin: int, stride: int = 1) -> None:
        super().__init__(1)
        self.conv = nn.Conv2d(cin, 1, 3, stride, 1, bias=True)
        self.fc = nn.Linear(cin, 1)

    def _last_bias(self) -> Tensor:
        return self.conv.bias.data

    def forward(self, x: Tensor, out_hw: tuple[int, int]) -> Tensor:
        logit = self.conv(x) + self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))[:, :, None, None]
        return self._decide(logit, None)


# --------------------------------------------------------------------------- #
# Blocks
# --------------------------------------------------------------------------- #


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """ResNet v1.5 projection shortcut (dense 1x1 strided conv + BN), or identity."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _BottleneckLayers(nn.Module):
    """The dense layers every ResNet bottleneck variant here shares: three convs with BN, and the shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)


class MaskedBottleneck(_BottleneckLayers):
    """LASNet / LAUDNet spatial (or layer-skipping) ResNet bottleneck, eval semantics.

    ``conv1 1x1 -> bn1 -> relu -> conv2 3x3/stride -> bn2 -> relu -> conv3 1x1 -> bn3``,
    all dense; the masker's grid, upsampled (nearest) to the output size and mapped
    onto ``mask_groups`` contiguous channel groups, multiplies the bn3 output; then
    the dense shortcut is added and ReLU applied:
    ``relu(mask * bn3(...) + shortcut(x))``. Outside the mask the output is
    ``relu(shortcut(x))``. ``mask_size=1`` gives LAUDNet's layer skipping;
    ``masker="dynconv"`` DynConv's pixel-wise masker (same block pattern).
    """

    def __init__(
        self,
        cin: int,
        mid: int,
        cout: int,
        stride: int = 1,
        mask_size: int | None = None,
        patch: int = 1,
        mask_groups: int = 1,
        masker: Literal["lasnet", "dynconv"] = "lasnet",
    ) -> None:
        if cout % mask_groups:
            raise ValueError(f"cout={cout} is not a multiple of mask_groups={mask_groups}")
        super().__init__(cin, mid, cout, stride)
        self.masker: nn.Module = (
            SpatialMasker(cin, mask_groups, mask_size, patch) if masker == "lasnet" else DynConvMasker(cin, stride)
        )

    def output_size(self, hw: Sequence[int]) -> tuple[int, int]:
        """Output ``(Ho, Wo)`` for an input of spatial size ``hw``."""
        return (conv_out_size(hw[0], self.stride), conv_out_size(hw[1], self.stride))

    def compute_mask(self, x: Tensor) -> Tensor:
        """The binary mask at output resolution, ``[B, G, Ho, Wo]`` (before the channel mapping)."""
        out_hw = self.output_size(x.shape[-2:])
        return upsample_mask(self.masker(x, out_hw), out_hw)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.compute_mask(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out * _expand_groups(mask, out.shape[1])
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ChannelMaskedBottleneck(_BottleneckLayers):
    """LAUDNet channel-skipping ResNet bottleneck, eval semantics.

    One per-sample mask over ``mid // group_size`` contiguous channel groups of the
    bottleneck width multiplies the conv1 and conv2 outputs before bn1 and bn2:
    ``relu(bn1(conv1(x) * m))``, ``relu(bn2(conv2(.) * m))``; conv3/bn3 and the
    shortcut are dense and unmasked. A skipped channel therefore carries the
    BatchNorm shift ``relu(beta - gamma * mean / sqrt(var + eps))`` (see
    ``channel_fill_values``), not zero.
    """

    def __init__(
        self,
        cin: int,
        mid: int,
        cout: int,
        stride: int = 1,
        group_size: int = 1,
        masker: Literal["mlp", "conv_linear"] = "mlp",
        reduction: int = 16,
    ) -> None:
        if mid % group_size:
            raise ValueError(f"mid={mid} is not a multiple of group_size={group_size}")
        super().__init__(cin, mid, cout, stride)
        self.masker = ChannelMasker(cin, mid // group_size, masker, reduction)

    def compute_mask(self, x: Tensor) -> Tensor:
        """The per-channel mask ``[B, mid, 1, 1]`` applied after conv1 and conv2."""
        return _expand_groups(self.masker(x), self.conv1.out_channels)[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        m = self.compute_mask(x)
        out = F.relu(self.bn1(self.conv1(x) * m))
        out = F.relu(self.bn2(self.conv2(out) * m))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _make_block(mode: Mode, cin: int, mid: int, cout: int, stride: int, patch: int, group_size: int) -> nn.Module:
    if mode == "spatial":
        return MaskedBottleneck(cin, mid, cout, stride, patch=patch)
    if mode == "layer":
        return MaskedBottleneck(cin, mid, cout, stride, mask_size=1)
    if mode == "channel":
        return ChannelMaskedBottleneck(cin, mid, cout, stride, group_size=group_size)
    raise ValueError(f"unknown mode {mode!r}; expected 'spatial', 'layer' or 'channel'")


# --------------------------------------------------------------------------- #
# Networks
# --------------------------------------------------------------------------- #


class LASNetLike(nn.Module):
    """A ResNet-style stack of masked bottlenecks with a linear classifier (logits only).

    Mimics LASNet's / LAUDNet's ResNet: a stem, stages of bottlenecks (the first of
    each stage strided with a projection shortcut), global average pool, Linear.
    ``stages`` lists ``(mid, cout, blocks, stride)``; ``patches`` the mask patch size
    per stage (LASNet's ``S_net``); ``mode`` is one per model or per stage
    (LAUDNet allows a mode per stage). ``stem="cifar"``: 3x3 conv; ``"imagenet"``:
    7x7/2 conv and 3x3/2 max pool. With ``density`` set, the masker biases are
    calibrated on a fixed random ``[4, in_ch, calib_size, calib_size]`` batch so that
    about that fraction of positions (channels, blocks) is kept.
    """

    def __init__(
        self,
        in_ch: int = 3,
        num_classes: int = 10,
        stem_channels: int = 16,
        stages: Sequence[tuple[int, int, int, int]] = ((16, 64, 2, 1), (32, 128, 2, 2), (64, 256, 2, 2)),
        patches: Sequence[int] = (2, 2, 1),
        mode: Mode | Sequence[Mode] = "spatial",
        stem: Literal["cifar", "imagenet"] = "cifar",
        channel_group_size: int = 1,
        density: float | None = 0.5,
        calib_size: int = 32,
        calib_batch: int = 4,
    ) -> None:
        super().__init__()
        modes = [mode] * len(stages) if isinstance(mode, str) else list(mode)
        if len(modes) != len(stages) or len(patches) != len(stages):
            raise ValueError("mode (if a sequence) and patches need one entry per stage")
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_ch, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_ch, stem_channels, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks: list[nn.Module] = []
        cin = stem_channels
        for (mid, cout, n, stride), patch, m in zip(stages, patches, modes, strict=True):
            for i in range(n):
                blocks.append(_make_block(m, cin, mid, cout, stride if i == 0 else 1, patch, channel_group_size))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_like_trained(self)
        if density is not None:
            gen = torch.Generator().manual_seed(0)
            calibrate_density(self, torch.randn(calib_batch, in_ch, calib_size, calib_size, generator=gen), density)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def lasnet_resnet50_like(
    density_bias: float | None = 0.35,
    *,
    num_classes: int = 1000,
    patches: Sequence[int] = (4, 4, 2, 1),
    mode: Mode | Sequence[Mode] = "spatial",
    width_mult: float = 1.0,
    depths: Sequence[int] = (3, 4, 6, 3),
    input_size: int = 224,
    calib_batch: int = 2,
) -> LASNetLike:
    """ResNet-50 stage sizes as in LASNet's ``dyn_resnet50`` (LAUDNet's ``uni_resnet50``).

    At 224x224: 56x56x64->256, 28x28x128->512, 14x14x256->1024, 7x7x512->2048 with
    3/4/6/3 blocks; ``patches`` defaults to LASNet's ``S_net = 4-4-2-1``.
    ``density_bias`` is the target fraction of kept positions: the masker biases are
    set (block by block, in order) so that about this fraction is kept on a fixed
    random ``input_size`` batch; ``None`` leaves them at zero. ``width_mult`` and
    ``depths`` shrink the model for quick tests.
    """

    def w(c: int) -> int:
        return max(1, int(c * width_mult))

    stages = [
        (w(64), w(256), depths[0], 1),
        (w(128), w(512), depths[1], 2),
        (w(256), w(1024), depths[2], 2),
        (w(512), w(2048), depths[3], 2),
    ]
    return LASNetLike(
        in_ch=3,
        num_classes=num_classes,
        stem_channels=w(64),
        stages=stages,
        patches=patches,
        mode=mode,
        stem="imagenet",
        density=density_bias,
        calib_size=input_size,
        calib_batch=calib_batch,
    )


# --------------------------------------------------------------------------- #
# Mask control and reference helpers
# --------------------------------------------------------------------------- #


def _maskers(model: nn.Module) -> list[_Masker]:
    return [m for m in model.modules() if isinstance(m, _Masker)]


@torch.no_grad()
def mask_densities(model: nn.Module, x: Tensor) -> list[float]:
    """Fraction of kept cells (grid cells, channel groups, or blocks) per masker on ``x``, in forward order."""
    seen: list[float] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(float(out.mean()))) for m in _maskers(model)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def calibrate_density(model: nn.Module, x: Tensor, density: float) -> list[float]:
    """Set every masker's keep bias so that about ``density`` of its cells are kept on ``x``.

    Maskers are calibrated in forward order in one pass (each sees the features
    produced with the already calibrated masks upstream). The masks stay
    input-dependent and may differ per sample; 0 and 1 give empty and full masks on
    ``x`` (with a margin of 1 logit). Puts the model in eval mode; returns
    ``mask_densities(model, x)`` afterwards.
    """
    model.eval()
    maskers = _maskers(model)
    for m in maskers:
        m.calibrate_to = density
    try:
        model(x)
    finally:
        for m in maskers:
            m.calibrate_to = None
    return mask_densities(model, x)


def force_masks(model: nn.Module, density: float | None, *, per_sample: bool = True, seed: int = 0) -> None:
    """Make every masker keep exactly ``round(density * n)`` of its ``n`` cells (``None`` restores).

    ``per_sample=True``: each sample keeps its own top-scoring cells (per mask group),
    ranked by the masker's logit gap, so masks differ per sample but have the same
    size: the graph gains a ``TopK`` (``ReduceMax``/``ReduceMin`` for 0 and 1).
    ``per_sample=False``: a fixed pseudo-random pattern (from ``seed``), the same for
    every sample, still computed from the masker's output (exact for any logits).
    Layer-skipping maskers (a single cell) are decided per block instead: a fixed
    ``round(density * L)`` of the ``L`` layer-skipping blocks run, for every sample.
    For benchmarks at 10/25/50/75/100% density.
    """
    maskers = _maskers(model)
    if density is None:
        for m in maskers:
            m.force = None
        return
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    single = [m for m in maskers if (isinstance(m, SpatialMasker) and m.mask_size == 1 and m.groups == 1)]
    kept = set(random.Random(seed).sample(range(len(single)), int(density * len(single) + 0.5)))
    for i, m in enumerate(single):
        m.force = _Force(1.0 if i in kept else 0.0, per_sample=False, seed=seed)
    for i, m in enumerate(k for k in maskers if all(k is not s for s in single)):
        m.force = _Force(density, per_sample=per_sample, seed=seed + 1000 * (i + 1))


def conv1_positions(mask: Tensor, stride: int, in_hw: Sequence[int]) -> Tensor:
    """Where conv1's output is needed so that conv2 (3x3, padding 1) is exact on ``mask``.

    ``mask`` is the output-resolution mask ``[B, G, Ho, Wo]`` (any group kept counts);
    returns a bool ``[B, 1, H, W]`` at the input resolution: each kept output cell
    ``(i, j)`` needs input rows ``stride*i-1 .. stride*i+1`` and likewise columns,
    clipped to the image (outside it conv2 reads its zero padding). This is what
    LASNet's ``ExpandMask`` computes (placement at stride, then a 3x3 dilation).
    """
    m = mask.amax(1, keepdim=True).float()
    b, _, ho, wo = m.shape
    if stride > 1:
        placed = m.new_zeros(b, 1, ho * stride, wo * stride)
        placed[:, :, ::stride, ::stride] = m
        m = placed
    m = F.max_pool2d(m, 3, 1, 1)
    return m[:, :, : in_hw[0], : in_hw[1]] > 0.5


def channel_fill_values(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel value a skipped channel carries after ``relu(bn(0))``: ``relu(beta - gamma*mean/std)``."""
    std = torch.sqrt(bn.running_var + bn.eps)
    return F.relu(bn.bias - bn.weight * bn.running_mean / std).detach()


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


def _calibrated(block: nn.Module, shape: tuple[int, ...], density: float = 0.5) -> nn.Module:
    init_like_trained(block)
    gen = torch.Generator().manual_seed(0)
    calibrate_density(block, torch.randn(*shape, generator=gen), density)
    return block.eval()


def lasnet_block() -> nn.Module:
    """One stride-1 spatial bottleneck with 2x2 patches (LASNet, S=2)."""
    return _calibrated(MaskedBottleneck(64, 16, 64, patch=2), (4, 64, 16, 16))


def lasnet_block_s2_odd() -> nn.Module:
    """A stride-2 spatial bottleneck (projection shortcut, pixel-wise mask) on an odd 15x15 input."""
    return _calibrated(MaskedBottleneck(32, 16, 64, stride=2, patch=1), (4, 32, 15, 15))


def laudnet_layer_block() -> nn.Module:
    """A layer-skipping bottleneck (1x1 mask grid, LAUDNet ``dyn_mode='layer'``)."""
    return _calibrated(MaskedBottleneck(64, 16, 64, mask_size=1), (4, 64, 16, 16))


def laudnet_channel_block() -> nn.Module:
    """A channel-skipping bottleneck (LAUDNet ``dyn_mode='channel'``, MLP masker, groups of 2)."""
    return _calibrated(ChannelMaskedBottleneck(64, 16, 64, group_size=2), (4, 64, 16, 16))


def dynconv_block() -> nn.Module:
    """A stride-2 bottleneck with DynConv's pixel-wise masker (3x3 strided conv + global term)."""
    return _calibrated(MaskedBottleneck(32, 16, 64, stride=2, masker="dynconv"), (4, 32, 16, 16))


def lasnet_cifar() -> nn.Module:
    """Small CIFAR-size LASNet look-alike (3 stages, patches 2-2-1, ~50% density)."""
    return LASNetLike()


def laudnet_layer_cifar() -> nn.Module:
    """Small CIFAR-size LAUDNet look-alike with layer skipping."""
    return LASNetLike(mode="layer")


def laudnet_channel_cifar() -> nn.Module:
    """Small CIFAR-size LAUDNet look-alike with channel skipping."""
    return LASNetLike(mode="channel")


def lasnet_resnet50_tiny() -> nn.Module:
    """ResNet-50 layout (16 blocks, patches 4-4-2-1) at width 1/8 and 64x64 input, 35% density."""
    return lasnet_resnet50_like(0.35, num_classes=10, width_mult=0.125, input_size=64)


SPATIAL_ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lasnet_block": (lasnet_block, (2, 64, 16, 16)),
    "lasnet_block_s2_odd": (lasnet_block_s2_odd, (2, 32, 15, 15)),
    "laudnet_layer_block": (laudnet_layer_block, (2, 64, 16, 16)),
    "laudnet_channel_block": (laudnet_channel_block, (2, 64, 16, 16)),
    "dynconv_block": (dynconv_block, (2, 32, 16, 16)),
    "lasnet_cifar": (lasnet_cifar, (4, 3, 32, 32)),
    "laudnet_layer_cifar": (laudnet_layer_cifar, (4, 3, 32, 32)),
    "laudnet_channel_cifar": (laudnet_channel_cifar, (4, 3, 32, 32)),
    "lasnet_resnet50_tiny": (lasnet_resnet50_tiny, (2, 3, 64, 64)),
}
"""name -> (factory returning an eval-mode model, example input shape); single tensor output."""
