"""Exit criteria as a PyTorch evaluation script writes them: the references for dync's built-ins, a user criterion
for `--criterion tests.criteria_fixture:top1_minus_mean`, and criteria that export must refuse."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _probabilities(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float().flatten(1), dim=-1)


def torch_max_softmax(logits: Tensor) -> Tensor:
    return _probabilities(logits).max(dim=-1).values


def torch_entropy(logits: Tensor) -> Tensor:
    """1 - H(p) / ln C, clamped to [0, 1]."""
    p = _probabilities(logits)
    return (1 - torch.special.entr(p).sum(dim=-1) / math.log(p.shape[-1])).clamp(0, 1)


def torch_margin(logits: Tensor) -> Tensor:
    top = _probabilities(logits).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


TORCH_CRITERIA = {"max_softmax": torch_max_softmax, "entropy": torch_entropy, "margin": torch_margin}


def top1_minus_mean(logits: Tensor) -> Tensor:
    """The user criterion: how far the top probability stands above the mean one, in [0, 1 - 1/C]."""
    p = torch.softmax(logits, dim=1)
    return p.max(dim=1).values - p.mean(dim=1)


def per_class(logits: Tensor) -> Tensor:
    """Wrong: a confidence per class, not per sample."""
    return torch.softmax(logits, dim=1)


def raw_margin(logits: Tensor) -> Tensor:
    """Wrong: unbounded (a logit difference), so thresholds in [0, 1] would mean nothing."""
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def branchy(logits: Tensor) -> Tensor:
    """Wrong: a Python branch on a tensor value, which torch.export refuses."""
    p = torch.softmax(logits, dim=1)
    if p.max() > 0.5:
        return p.max(dim=1).values
    return p.min(dim=1).values


def integer_votes(logits: Tensor) -> Tensor:
    """Wrong: not a float confidence."""
    return logits.argmax(dim=1)


def broken(logits: Tensor) -> Tensor:
    raise ValueError("this criterion is broken")


_calls = [0]


def drifting(logits: Tensor) -> Tensor:
    """Wrong: depends on how often it was called, so the exported graph (one call's constant) is not it."""
    _calls[0] += 1
    return torch.softmax(logits, dim=1).max(dim=1).values / _calls[0]


NOT_A_FUNCTION = 0.5
