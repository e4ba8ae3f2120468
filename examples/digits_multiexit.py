"""Bundled multi-exit CNN for scikit-learn's 8x8 digits, used by ``dync demo``.

The network follows the MSDNet idea in miniature: a trunk of conv blocks whose
cost grows block by block, with a classifier ("exit") after every block.  Easy
samples can stop at an early exit and skip the expensive later blocks, which is
what the deployment compiler exploits.

Run ``python examples/digits_multiexit.py`` to retrain; it rewrites the
bundled weights (``digits_multiexit.pt``) and test split (``digits_test.npz``)
next to this file.  Loading either needs only torch and numpy, not sklearn.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
WEIGHTS_PATH = HERE / "digits_multiexit.pt"
TEST_SPLIT_PATH = HERE / "digits_test.npz"

NUM_CLASSES = 10
# Output channels of the two convs in each trunk block.  Widths grow so later
# blocks cost clearly more than earlier ones (roughly 1 : 3 : 7 : 12 in MACs),
# which gives early exit real time to save.
BLOCK_CHANNELS: tuple[tuple[int, int], ...] = ((48, 48), (64, 64), (96, 96), (128, 128))
SEED = 0


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU; BN folds into the conv at export time."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ExitHead(nn.Module):
    """MSDNet-style classifier: global average pool + linear.

    Deliberately cheap, so the trunk dominates the cost, and deliberately weak
    at the shallow first exit (5x5 receptive field, no spatial layout), so
    early exit trades accuracy for compute rather than being free.
    """

    def __init__(self, c_in: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


class DigitsMultiExit(nn.Module):
    """Four-exit CNN: ``forward`` returns the exit logits in compute order.

    Input ``[B, 1, 8, 8]`` float32 (pixels scaled to [0, 1]); output is a list
    of four ``[B, 10]`` logit tensors, exit ``i`` depending only on blocks
    ``0..i``.  There is no data-dependent control flow, so the whole network
    exports as one static graph with a dynamic batch dimension.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        heads: list[nn.Module] = []
        c_in = 1
        for c_mid, c_out in BLOCK_CHANNELS:
            blocks.append(nn.Sequential(conv_bn_relu(c_in, c_mid), conv_bn_relu(c_mid, c_out)))
            heads.append(ExitHead(c_out, num_classes))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            outs.append(head(x))
        return outs


def load_pretrained() -> DigitsMultiExit:
    """Return the bundled trained model in eval mode (BN uses running stats)."""
    model = DigitsMultiExit()
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_test_split() -> tuple[np.ndarray, np.ndarray]:
    """Return the held-out test set ``(X [N,1,8,8] float32, y [N] int64)``.

    Stored pre-normalized so the demo needs neither sklearn nor the training
    preprocessing.
    """
    with np.load(TEST_SPLIT_PATH) as data:
        return data["X"].astype(np.float32), data["y"].astype(np.int64)


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to one pixel (zero fill) for augmentation."""
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            mask = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            if mask.any():
                out[mask] = padded[mask, :, dy : dy + 8, dx : dx + 8]
    return out


@torch.no_grad()
def _exit_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    model.eval()
    return [(logits.argmax(1) == y).float().mean().item() for logits in model(x)]


def main(epochs: int = 12, batch_size: int = 64, lr: float = 3e-3) -> None:
    """Train all exits jointly and write the weights and the test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=SEED)
    xtr, ytr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xte, yte = torch.from_numpy(x_te), torch.from_numpy(y_te)

    model = DigitsMultiExit()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)

    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            xb = _random_shift(xtr[idx], gen)
            # Equal-weight sum: every exit must be a usable classifier.
            loss = sum(F.cross_entropy(logits, ytr[idx]) for logits in model(xb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        accs = _exit_accuracies(model, xte, yte)
        print(
            f"epoch {epoch + 1:2d}/{epochs} loss {total / len(xtr):.4f} "
            f"test acc per exit: {' '.join(f'{a:.4f}' for a in accs)} "
            f"({time.perf_counter() - start:.1f}s)"
        )

    accs = _exit_accuracies(model, xte, yte)
    for i, acc in enumerate(accs):
        print(f"exit {i}: test accuracy {acc:.4f}")
    print(f"training time {time.perf_counter() - start:.1f}s")

    torch.save(model.state_dict(), WEIGHTS_PATH)
    np.savez_compressed(TEST_SPLIT_PATH, X=x_te, y=y_te)
    print(f"wrote {WEIGHTS_PATH.name} and {TEST_SPLIT_PATH.name}")


if __name__ == "__main__":
    main()
