"""The PyTorch faces of GatherPatches / ScatterAddPatches: eager semantics and the `torch.library` custom ops
that capture keeps as one node each (semantics in the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dync.errors import PluginError


def check_inputs(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> None:
    """Reject shapes and attributes the kernels cannot index, before any of them runs."""
    if x.dim() != 4 or index.dim() != 2 or index.shape[1] != 3:
        raise PluginError(
            f"Patch ops need x [N,C,H,W] and index [M,3], got {tuple(x.shape)} and {tuple(index.shape)}."
        )
    if index.dtype != torch.int64 or patch < 1 or halo < 0:
        raise PluginError(
            f"Patch ops need an int64 index, patch >= 1 and halo >= 0; got {index.dtype}, {patch}, {halo}."
        )


def _patch_coords(index: torch.Tensor, patch: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcastable (n [M,1,1], rows [M,size,1], cols [M,1,size]) of each block's top-left-anchored window."""
    offsets = torch.arange(size, device=index.device)
    n = index[:, 0].view(-1, 1, 1)
    rows = (index[:, 1:2] * patch + offsets).unsqueeze(2)
    cols = (index[:, 2:3] * patch + offsets).unsqueeze(1)
    return n, rows, cols


def _padded_nhwc(x: torch.Tensor, patch: int, before: int, after: int) -> torch.Tensor:
    """x zero-padded by `before` on top/left and `after + patch - 1` on bottom/right, as [N,H',W',C].

    `patch - 1` extra covers the last partial block, so every window of every valid block is in range.
    """
    pad = after + patch - 1
    return F.pad(x, (before, pad, before, pad)).permute(0, 2, 3, 1)


def gather_patches_reference(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    """Eager semantics of GatherPatches, vectorized: one advanced-indexing gather on the padded image."""
    check_inputs(x, index, patch, halo)
    n, rows, cols = _patch_coords(index, patch, patch + 2 * halo)
    return _padded_nhwc(x, patch, halo, halo)[n, rows, cols].permute(0, 3, 1, 2).contiguous()


def scatter_add_patches_reference(
    base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int
) -> torch.Tensor:
    """Eager semantics of ScatterAddPatches: accumulate into the padded image, then crop the padding away."""
    check_inputs(base, index, patch, 0)
    n, rows, cols = _patch_coords(index, patch, patch)
    height, width = base.shape[2:]
    out = _padded_nhwc(base, patch, 0, 0).index_put((n, rows, cols), patches.permute(0, 2, 3, 1), accumulate=True)
    return out[:, :height, :width].permute(0, 3, 1, 2).contiguous()


@torch.library.custom_op("dync::gather_patches", mutates_args=())
def gather_patches(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    """GatherPatches as one opaque op, so torch.export keeps it as a single node."""
    return gather_patches_reference(x, index, patch, halo)


@gather_patches.register_fake
def _gather_patches_fake(x: torch.Tensor, index: torch.Tensor, patch: int, halo: int) -> torch.Tensor:
    side = patch + 2 * halo
    return x.new_empty((index.shape[0], x.shape[1], side, side))


@torch.library.custom_op("dync::scatter_add_patches", mutates_args=())
def scatter_add_patches(base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int) -> torch.Tensor:
    """ScatterAddPatches as one opaque op, so torch.export keeps it as a single node."""
    return scatter_add_patches_reference(base, patches, index, patch)


@scatter_add_patches.register_fake
def _scatter_add_patches_fake(
    base: torch.Tensor, patches: torch.Tensor, index: torch.Tensor, patch: int
) -> torch.Tensor:
    return torch.empty_like(base)
