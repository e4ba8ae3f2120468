"""Look-alikes of token-dynamic vision transformers (DynamicViT, DyT).

None of this code comes from the published repositories; it reproduces their eval-mode semantics with
plain PyTorch ops:

* **token pruning** (DynamicViT): at each pruning stage a small predictor scores the patch tokens (a local
  feature concatenated with the mean over the tokens still running, then an MLP to two log-probabilities,
  "keep" first); each sample keeps its ``k = ceil(ratio * N)`` best tokens (``TopK`` on the keep score,
  ``N`` the patch count of the input image) and the class token, and later blocks run on those only. The
  keep ratios are fixed, so every shape is static apart from the batch;
* **token dispatch** (DyT, "Dynamic Tuning"): in each block a linear gate scores every token and tokens
  whose logit is negative skip the MLP: ``x + mlp(norm2(x)) * (gate(x) >= 0)``, the mask a float
  ``[B, N, 1]`` (a Cast of a bool), so the kept count differs per sample.

Conventions (as in ``zoo/multi_exit.py``): ``forward(x)`` takes one ``[B, 3, H, W]`` batch and returns the
logits; no Python control flow on tensor values; construction is deterministic given
``torch.manual_seed``. ``set_kept_fraction`` shifts the gate biases for a target kept fraction on a
given batch; ``mlp_kept_fractions`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from zoo.idioms import batch_index_select as batch_index_select_flat

__all__ = [
    "TOKENS_ZOO",
    "DispatchBlock",
    "DyTLike",
    "DynamicViTLike",
    "TokenPredictor",
    "mlp_kept_fractions",
    "set_kept_fraction",
]

Select = Literal["gather", "flat"]
Gate = Literal["hard", "soft"]


class Mlp(nn.Sequential):
    """fc1 -> GELU -> fc2, as timm's ViT MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Attention(nn.Module):
    """Multi-head self-attention written out (qkv projection, softmax(q k^T / sqrt(d)) v, projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTrunk(nn.Module):
    """Patch embedding, class token and position embedding, the final norm and the class-token head."""

    def __init__(self, image: int, patch: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.patches = (image // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, self.patches + 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, images: Tensor) -> Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x)[:, 0])


# --------------------------------------------------------------------------- #
# Token pruning (DynamicViT)
# --------------------------------------------------------------------------- #


class TokenPredictor(nn.Module):
    """Per-token (drop, keep) log-probabilities from a local feature and the mean of all running tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                 nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        half = x.shape[-1] // 2
        pooled = x[:, :, half:].mean(dim=1, keepdim=True).expand(-1, x.shape[1], -1)
        return self.out(torch.cat([x[:, :, :half], pooled], dim=-1))


def batch_index_select(x: Tensor, index: Tensor, select: Select) -> Tensor:
    """Rows `index [B, K]` of each sample of `x [B, N, C]`: `torch.gather`, or DynamicViT's flat offsets."""
    if select == "gather":
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    b, n, c = x.shape
    flat = index + torch.arange(b, device=x.device).view(b, 1) * n
    return x.reshape(b * n, c)[flat.reshape(-1)].reshape(b, index.shape[1], c)


class DynamicViTLike(nn.Module):
    """A ViT whose blocks listed in `prune_at` are each preceded by a pruning stage with its keep ratio.

    Ratios are fractions of the image's patch count (DynamicViT's convention, e.g. 0.7, 0.49, 0.343); a
    ratio of 1.0 disables that stage (no predictor runs), so all ratios 1.0 is the plain ViT.
    """

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, depth: int = 6, heads: int = 4,
                 prune_at: Sequence[int] = (2, 4), ratios: Sequence[float] = (0.7, 0.49), num_classes: int = 10,
                 select: Select = "gather") -> None:
        super().__init__()
        assert len(prune_at) == len(ratios)
        self.trunk = ViTTrunk(image, patch, dim, num_classes)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.prune_at = tuple(prune_at)
        self.ratios = tuple(ratios)
        self.predictors = nn.ModuleList(TokenPredictor(dim) for _ in prune_at)
        self.select = select

    def kept_tokens(self, stage: int) -> int:
        """Patch tokens kept after pruning stage `stage` (the class token is kept besides)."""
        return math.ceil(self.ratios[stage] * self.trunk.patches)

    def forward(self, images: Tensor) -> Tensor:
        x = self.trunk.tokens(images)
        for i, block in enumerate(self.blocks):
            if i in self.prune_at:
                x = self._prune(x, self.prune_at.index(i))
            x = block(x)
        return self.trunk.logits(x)

    def _prune(self, x: Tensor, stage: int) -> Tensor:
        if self.ratios[stage] >= 1.0:
            return x
        patches = x[:, 1:]
        keep_score = self.predictors[stage](patches)[:, :, 1]
        keep = torch.topk(keep_score, self.kept_tokens(stage), dim=1).indices
        return torch.cat([x[:, :1], batch_index_select(patches, keep, self.select)], dim=1)


# --------------------------------------------------------------------------- #
# Token dispatch (DyT)
# --------------------------------------------------------------------------- #


class DispatchBlock(Block):
    """A block whose MLP runs only on the tokens the gate keeps: `x + mlp(norm2(x)) * (gate(x) >= 0)`.

    `gate="soft"` multiplies by `sigmoid(gate(x))` instead (not a dispatch: nothing may be skipped).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, gate: Gate = "hard") -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.gate = nn.Linear(dim, 1)
        self.gate_kind = gate

    always_kept = 0
    """Leading tokens that run the MLP whatever the gate says (none here)."""

    @property
    def gate_layer(self) -> nn.Linear:
        return self.gate

    def keeps(self, logits: Tensor) -> Tensor:
        """Which gated tokens run the MLP, from the gate's logits (a soft gate skips none)."""
        return logits >= 0 if self.gate_kind == "hard" else torch.ones_like(logits, dtype=torch.bool)

    def mask(self, x: Tensor) -> Tensor:
        logit = self.gate(x)
        return (logit >= 0).float() if self.gate_kind == "hard" else torch.sigmoid(logit)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x)) * self.mask(x)


class DyTLike(nn.Module):
    """A ViT of dispatch blocks (every block's MLP gated per token)."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, depth: int = 3, heads: int = 4,
                 num_classes: int = 10, gate: Gate = "hard") -> None:
        super().__init__()
        self.trunk = ViTTrunk(image, patch, dim, num_classes)
        self.blocks = nn.ModuleList(DispatchBlock(dim, heads, gate=gate) for _ in range(depth))

    def forward(self, images: Tensor) -> Tensor:
        x = self.trunk.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.trunk.logits(x)


@torch.no_grad()
def set_kept_fraction(model: nn.Module, fraction: float, images: Tensor) -> None:
    """Shift each gate's bias so that about `fraction` of the gated tokens of `images` run its block's MLP.

    Works on any model whose gated blocks have a `gate_layer` (DyTLike, DynamicTuningViT), block by block in
    order, since a block's bias moves what later gates see. 0 and 1 are exact (bias -inf and +inf).
    Otherwise the logits' zero lies in the widest gap between sorted gate logits near the target rank, so
    onnxruntime's last-bit differences cannot flip a token.
    """
    for block in _gated_blocks(model):
        logits = _gate_logits(model, images)[block]
        block.gate_layer.bias.copy_(block.gate_layer.bias - _threshold_for(logits.flatten(), fraction))


def _threshold_for(logits: Tensor, fraction: float) -> float:
    if fraction <= 0.0:
        return math.inf
    if fraction >= 1.0:
        return -math.inf
    ranked = logits.sort(descending=True).values
    target = round(fraction * len(ranked))
    window = range(max(target - 3, 1), min(target + 4, len(ranked)))
    rank = max(window, key=lambda r: float(ranked[r - 1] - ranked[r]))
    return float(ranked[rank - 1] + ranked[rank]) / 2


@torch.no_grad()
def mlp_kept_fractions(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Per gated block, the fraction of each sample's tokens that run the MLP `[B]` (always-kept ones count)."""
    fractions = []
    for block, logits in _gate_logits(model, images).items():
        kept = block.keeps(logits).flatten(1).sum(1) + block.always_kept
        fractions.append(kept / (logits[0].numel() + block.always_kept))
    return fractions


def _gated_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gate_layer")]


def _gate_logits(model: nn.Module, images: Tensor) -> dict[nn.Module, Tensor]:
    """Each gated block's gate logits `[B, tokens gated, 1]` in one forward of `model` on `images`."""
    logits: dict[nn.Module, Tensor] = {}
    hooks = [block.gate_layer.register_forward_hook(lambda _, __, out, block=block: logits.setdefault(block, out))
             for block in _gated_blocks(model)]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits


# --------------------------------------------------------------------------- #
# As their authors wrote them (idioms kept, code not copied)
# --------------------------------------------------------------------------- #


class PolicyPredictor(nn.Module):
    """DynamicViT's `PredictorLG`: the global half is a mean weighted by the previous decision (the policy)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
                                      nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
                                      nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        B, N, C = x.size()
        local_x = x[:, :, :C // 2]
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
        return self.out_conv(x)


class DiffPruningViT(nn.Module):
    """raoyongming/DynamicViT's `VisionTransformerDiffPruning`, eval path, in its idioms.

    A literal initial token count (`init_n = 14 * 14` there; the patch count here), `int(init_n * ratio)`
    tokens kept by `argsort(descending=True)[:, :k]` of score column 0, the class token as a zeros index
    prepended to `keep + 1`, rows selected with flat offsets over the batch, the previous decision carried
    through the same select into the next predictor's weighted mean, and `x.shape[0]` read as `B` once.
    """

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, depth: int = 6, heads: int = 4,
                 pruning_loc: Sequence[int] = (2, 4), token_ratio: Sequence[float] = (0.7, 0.49),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.trunk = ViTTrunk(image, patch, dim, num_classes)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.pruning_loc = list(pruning_loc)
        self.token_ratio = list(token_ratio)
        self.score_predictor = nn.ModuleList(PolicyPredictor(dim) for _ in pruning_loc)
        self.init_n = self.trunk.patches

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        x = self.trunk.tokens(x)
        p_count = 0
        init_n = self.init_n
        prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype, device=x.device)
        for i, blk in enumerate(self.blocks):
            if i in self.pruning_loc:
                spatial_x = x[:, 1:]
                pred_score = self.score_predictor[p_count](spatial_x, prev_decision).reshape(B, -1, 2)
                score = pred_score[:, :, 0]
                num_keep_node = int(init_n * self.token_ratio[p_count])
                keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype, device=keep_policy.device)
                now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
                x = batch_index_select_flat(x, now_policy)
                prev_decision = batch_index_select_flat(prev_decision, keep_policy)
                x = blk(x)
                p_count += 1
            else:
                x = blk(x)
        return self.trunk.logits(x)


class TokenSelect(nn.Module):
    """DyT's router: `zeros_like(logits).masked_fill(logits.sigmoid() > threshold, 1.0)` on the patch tokens,
    with a `new_ones` column for the class token, which therefore always runs the MLP."""

    def __init__(self, dim_in: int, num_sub_layer: int = 1, threshold: float = 0.5) -> None:
        super().__init__()
        self.mlp_head = nn.Linear(dim_in, num_sub_layer)
        self.threshold = threshold

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _tokens = x.shape[:2]
        logits = self.mlp_head(x[:, 1:, :])
        y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).masked_fill(
            logits.sigmoid() > self.threshold, 1.0)
        token_select = torch.cat([y_hard.new_ones(b, 1, 1), y_hard], dim=1)
        return token_select, logits


class Adapter(nn.Module):
    """DyT's parallel bottleneck adapter: down projection, ReLU, up projection, times a float scalar."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1) -> None:
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.non_linear_func = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = float(scale)

    def forward(self, x: Tensor, add_residual: bool = True, residual: Tensor | None = None) -> Tensor:
        residual = x if residual is None else residual
        up = self.up_proj(self.non_linear_func(self.down_proj(x))) * self.scale
        return up + residual if add_residual else up


class TuningBlock(Block):
    """DyT's block: `x = residual + sub_token_select * mlp_x + adapt_x`, returning `(x, dict(...))`."""

    always_kept = 1
    """The class token's `new_ones` column."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, bottleneck: int = 8) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.adaptmlp = Adapter(dim, bottleneck)
        self.mlp_token_select = TokenSelect(dim)

    @property
    def gate_layer(self) -> nn.Linear:
        return self.mlp_token_select.mlp_head

    def keeps(self, logits: Tensor) -> Tensor:
        return logits.sigmoid() > self.mlp_token_select.threshold

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # type: ignore[override]
        x = x + self.attn(self.norm1(x))
        sub_token_select, token_logits = self.mlp_token_select(x)
        adapt_x = self.adaptmlp(x, add_residual=False)
        residual = x
        mlp_x = self.mlp(self.norm2(x))
        mlp_x = sub_token_select * mlp_x
        x = residual + mlp_x + adapt_x
        return x, dict(sub_token_select=sub_token_select, token_logits=token_logits)


class DynamicTuningViT(nn.Module):
    """NUS-HPC-AI-Lab/Dynamic-Tuning's `VisionTransformer` forward: returns `(logits, dict(token_select=...,
    token_logits=...))`, the per-block decisions stacked on dim 1 with the class token's column dropped."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, depth: int = 3, heads: int = 4,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.trunk = ViTTrunk(image, patch, dim, num_classes)
        self.blocks = nn.ModuleList(TuningBlock(dim, heads) for _ in range(depth))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.trunk.tokens(x)
        token_select_list, token_logits_list = [], []
        for blk in self.blocks:
            x, token_select = blk(x)
            token_select_list.append(token_select["sub_token_select"])
            token_logits_list.append(token_select["token_logits"])
        token_select = torch.stack(token_select_list, dim=1)[:, :, 1:, :]
        token_logits = torch.stack(token_logits_list, dim=1)
        return self.trunk.logits(x), dict(token_select=token_select, token_logits=token_logits)


# --------------------------------------------------------------------------- #
# Zoo
# --------------------------------------------------------------------------- #


def dynamic_vit_tiny() -> nn.Module:
    """Six blocks at width 64 on 32x32 images (64 patches), pruned to 70% then 49% before blocks 2 and 4."""
    return DynamicViTLike().eval()


def dynamic_vit_flat_tiny() -> nn.Module:
    """Four blocks, the last three each after a pruning stage (70%, 49%, 34%), selecting tokens with
    DynamicViT's flat offsets over the batch."""
    return DynamicViTLike(depth=4, prune_at=(1, 2, 3), ratios=(0.7, 0.49, 0.343), select="flat").eval()


def dyt_tiny() -> nn.Module:
    """Three dispatch blocks at width 64; untrained gates keep about half the tokens."""
    return DyTLike().eval()


def diff_pruning_tiny() -> nn.Module:
    """DynamicViT as its authors wrote it: four blocks at width 64, 70% then 49% of 64 patches kept before
    blocks 1 and 3."""
    return DiffPruningViT(depth=4, pruning_loc=(1, 3)).eval()


def dynamic_tuning_tiny() -> nn.Module:
    """DyT as its authors wrote it: three blocks at width 64 returning `(logits, dict of decisions)`."""
    return DynamicTuningViT().eval()


TOKENS_ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "dynamic_vit_tiny": (dynamic_vit_tiny, (2, 3, 32, 32)),
    "dynamic_vit_flat_tiny": (dynamic_vit_flat_tiny, (2, 3, 32, 32)),
    "dyt_tiny": (dyt_tiny, (2, 3, 32, 32)),
    "diff_pruning_tiny": (diff_pruning_tiny, (2, 3, 32, 32)),
    "dynamic_tuning_tiny": (dynamic_tuning_tiny, (2, 3, 32, 32)),
}
"""name -> (factory returning an eval-mode model, example input shape). The look-alikes return the logits;
the as-published ones return what their authors' forwards return (DyT: a tuple with a dict of masks)."""

