"""Look-alikes of adaptive rotated convolution (ARC) networks.

None of this code comes from the published repository; it reproduces, with plain PyTorch ops, the eval-mode
semantics of ARC's ``AdaptiveRotatedConv2d``, written the way its authors write it:

* a **routing function** reads the block input: 3x3 depthwise conv, LayerNorm over channels, ReLU, global
  average pool, dropout (training only), then two linear heads giving per sample ``n`` mixing weights
  ``alpha = sigmoid(.)`` and ``n`` angles ``theta = softsign(.) * 40 degrees`` (in radians);
* each of the ``n`` 3x3 kernels ``W_i [Cout, Cin/g, 3, 3]`` is rotated by a 9x9 interpolation matrix
  ``R(theta)`` acting on the flattened taps (``rotation_matrix``): corners move along the ring of the
  eight outer taps, edge midpoints interpolate bilinearly with their ring neighbours and the centre, the
  centre stays; meant for ``|theta| <= 45`` degrees;
* the per-sample kernel ``W_b = sum_i alpha_bi R(theta_bi) W_i`` is applied by one grouped conv with the
  batch folded into the channels: ``conv2d(x.reshape(1, B*Cin, H, W), W.reshape(B*Cout, Cin/g, 3, 3),
  groups=B*g)``, reshaped back to ``[B, Cout, H', W']``.

Conventions as in ``zoo/multi_exit.py``: factories return eval-mode models built deterministically under
``torch.manual_seed``, ``forward(x)`` takes ``[B, C, H, W]`` and returns one tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.multi_exit import init_like_trained

__all__ = ["ARC_ZOO", "AdaptiveRotatedConv2d", "ArcResNetLike", "RoutingFunction", "rotation_matrix"]

RING = (0, 1, 2, 5, 8, 7, 6, 3)
"""The outer taps of a 3x3 kernel (raster order), clockwise from the top-left corner."""


def _ring_patterns(direction: int) -> list[tuple[str, Tensor]]:
    """(coefficient name, 9x9 0/1 pattern) pairs of R(theta) for theta >= 0 (direction 1) or < 0 (-1).

    Row t of R gives rotated tap t as a mix of original taps. A corner takes (c - s) of itself and the rest
    from its next ring tap; an edge midpoint mixes itself, the next corner, the centre and the next edge
    midpoint bilinearly, where c = cos(theta), s = |sin(theta)| and "next" follows `direction`.
    """
    patterns: dict[str, Tensor] = {name: torch.zeros(9, 9) for name in ("c-s", "1-c+s", "c(1-s)", "cs", "(1-c)(1-s)",
                                                                      "s(1-c)", "1")}
    patterns["1"][4, 4] = 1
    for position, tap in enumerate(RING):
        following = RING[(position + direction) % 8]
        if position % 2 == 0:
            patterns["c-s"][tap, tap] = 1
            patterns["1-c+s"][tap, following] = 1
        else:
            patterns["c(1-s)"][tap, tap] = 1
            patterns["cs"][tap, following] = 1
            patterns["(1-c)(1-s)"][tap, 4] = 1
            patterns["s(1-c)"][tap, RING[(position + 2 * direction) % 8]] = 1
    return list(patterns.items())


_POSITIVE, _NEGATIVE = _ring_patterns(1), _ring_patterns(-1)


def _coefficients(c: Tensor, s: Tensor) -> dict[str, Tensor]:
    return {"c-s": c - s, "1-c+s": 1 - c + s, "c(1-s)": c * (1 - s), "cs": c * s, "(1-c)(1-s)": (1 - c) * (1 - s),
            "s(1-c)": s * (1 - c), "1": torch.ones_like(c)}


def rotation_matrix(theta: Tensor) -> Tensor:
    """R(theta) [..., 9, 9] for angles `theta` [...] in radians: both branches built, then selected by sign."""
    c, s = torch.cos(theta), torch.sin(theta).abs()
    coefficients = _coefficients(c, s)
    branches = [sum(coefficients[name][..., None, None] * pattern for name, pattern in patterns)
                for patterns in (_POSITIVE, _NEGATIVE)]
    positive = (theta >= 0).to(theta.dtype)[..., None, None]
    return positive * branches[0] + (1 - positive) * branches[1]


def rotate_and_mix(weight: Tensor, alphas: Tensor, thetas: Tensor) -> Tensor:
    """Per-sample kernels [B*Cout, Cin/g, 3, 3] = sum_i alpha_bi R(theta_bi) W_i, as one matrix product."""
    n, cout, cin, k, _ = weight.shape
    b = thetas.shape[0]
    mix = rotation_matrix(thetas) * alphas[..., None, None]  # [B, n, 9, 9]
    mix = mix.permute(0, 2, 1, 3).reshape(b * 9, n * 9)
    taps = weight.permute(0, 3, 4, 1, 2).reshape(n * 9, cout * cin)
    mixed = torch.mm(mix, taps).reshape(b, k, k, cout, cin)
    return mixed.permute(0, 3, 4, 1, 2).reshape(b * cout, cin, k, k)


class RoutingFunction(nn.Module):
    """Per-sample mixing weights (sigmoid) and angles (softsign times `max_degrees`, in radians)."""

    def __init__(self, channels: int, kernels: int, dropout: float = 0.2, max_degrees: float = 40.0) -> None:
        super().__init__()
        self.dwc = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = nn.LayerNorm(channels)
        self.dropout_alpha = nn.Dropout(dropout)
        self.dropout_theta = nn.Dropout(dropout)
        self.fc_alpha = nn.Linear(channels, kernels)
        self.fc_theta = nn.Linear(channels, kernels, bias=False)
        self.scale = max_degrees / 180.0 * math.pi

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(self.dwc(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)
        alphas = torch.sigmoid(self.fc_alpha(self.dropout_alpha(pooled)))
        thetas = F.softsign(self.fc_theta(self.dropout_theta(pooled))) * self.scale
        return alphas, thetas


class AdaptiveRotatedConv2d(nn.Module):
    """A 3x3 conv whose kernel is rotated and mixed per sample, run as a batch-folded grouped conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, kernels: int = 4) -> None:
        super().__init__()
        self.cout, self.stride, self.groups = cout, stride, groups
        self.routing = RoutingFunction(cin, kernels)
        self.weight = nn.Parameter(torch.empty(kernels, cout, cin // groups, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        alphas, thetas = self.routing(x)
        weight = rotate_and_mix(self.weight, alphas, thetas)
        b, cin, h, w = x.shape
        out = F.conv2d(x.reshape(1, b * cin, h, w), weight, None, self.stride, 1, 1, self.groups * b)
        return out.reshape(b, self.cout, *out.shape[2:])


class ArcBasicBlock(nn.Module):
    """ResNet basic block whose two 3x3 convs are adaptive rotated convs (as in ARC-ResNet's later stages)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = AdaptiveRotatedConv2d(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = AdaptiveRotatedConv2d(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ArcResNetLike(nn.Module):
    """A small ARC-ResNet: plain conv stem and first stage, adaptive rotated convs from the second stage on."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(widths[0], widths[0], 3, padding=1, bias=False),
                                    nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.Sequential(*(ArcBasicBlock(cin, cout, 2) for cin, cout in itertools.pairwise(widths)))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stage1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _ready(model: nn.Module) -> nn.Module:
    """Trained-looking convs and BatchNorms (`init_like_trained`), and angle heads that reach both signs."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            init_like_trained(module)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 2.0 / math.sqrt(module.in_features))
            if module.bias is not None:
                nn.init.normal_(module.bias, 0.0, 0.5)
    return model.eval()


def arc_conv() -> nn.Module:
    return _ready(AdaptiveRotatedConv2d(8, 12))


def arc_conv_s2_grouped() -> nn.Module:
    return _ready(AdaptiveRotatedConv2d(8, 12, stride=2, groups=2))


def arc_resnet() -> nn.Module:
    return _ready(ArcResNetLike())


ARC_ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "arc_conv": (arc_conv, (2, 8, 9, 9)),
    "arc_conv_s2_grouped": (arc_conv_s2_grouped, (2, 8, 9, 9)),
    "arc_resnet": (arc_resnet, (2, 3, 32, 32)),
}
