"""Real architectures from torchvision and timm, built with random weights (no downloads).

PyPI's torchvision ships compiled ops built against CUDA libtorch; beside the CPU torch they fail to load and
`import torchvision` (which timm imports) then dies registering fake kernels for `torchvision::nms` / `qnms`, so
`import_torchvision` defines those two schemas and imports again (the classifiers here never call them).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

NUM_CLASSES = 10

_STANDIN_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_standin_library: torch.library.Library | None = None
"""Owns the stand-in schemas, which are dropped when this object is collected."""


def import_torchvision() -> ModuleType:
    """`torchvision`, importable whether or not its compiled ops load beside this torch."""
    global _standin_library
    try:
        import torchvision
    except RuntimeError as error:
        if _standin_library is not None or "torchvision::nms does not exist" not in str(error):
            raise
        # A torchvision whose ops load defines these itself, so define them only once its import has failed.
        _standin_library = torch.library.Library("torchvision", "DEF")
        for schema in _STANDIN_SCHEMAS:
            _standin_library.define(schema)
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    import_torchvision()
    import timm

    return timm


def randomize(model: nn.Module) -> None:
    """Re-draw the weights so that the logits depend on the input and every branch counts: conv and linear weights
    variance-preserving (timm's trunc_normal(0.02) and GoogLeNet's init make deep random models output nearly
    constant logits), noise on every constant parameter (zero heads, zero-init residual gammas, 1e-6 layer scales,
    identity norms) and non-trivial BatchNorm statistics."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for param in model.parameters():
            if param.is_floating_point() and bool((param == param.flatten()[0]).all()):
                param.add_(0.1 * torch.randn_like(param))


def build(library: str, name: str, **kwargs: Any) -> nn.Module:
    """`name` (a torchvision builder or model class, or a timm model name) with `NUM_CLASSES` outputs, seeded
    random weights (`randomize`), in eval mode."""
    torch.manual_seed(0)
    if library == "torchvision":
        model = getattr(import_torchvision().models, name)(num_classes=NUM_CLASSES, **kwargs)
    else:
        model = import_timm().create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    randomize(model)
    return model.eval()
