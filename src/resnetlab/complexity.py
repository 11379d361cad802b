"""Parameters and multiply-accumulates (MACs) of a model, measured from a real forward pass.

The paper's "FLOPs" (Table 1) are multiply-adds of the convolutions and the fully connected layer; BN, ReLU,
pooling and the shortcut additions are not counted, so they are not counted here either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def complexity(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> Complexity:
    """Count parameters and the MACs of one image of shape `input_size` (C, H, W) through `model`."""
    if len(input_size) != 3 or any(not isinstance(s, int) or s < 1 for s in input_size):
        raise ValueError(f"input_size={input_size!r} is not valid; give (channels, height, width) as positive ints")
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = module.in_channels // module.groups * kh * kw
            macs += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            macs += output[0].numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for p in model.parameters())
    return Complexity(params=params, macs=macs)


def native_input_size(family: str, in_channels: int = 3) -> tuple[int, int, int]:
    return (in_channels, 224, 224) if family == "imagenet" else (in_channels, 32, 32)


def model_table(stride_in_1x1: bool = False) -> list[dict]:
    """One row per named model: its complexity at its native input size beside the paper's figure.

    The paper's GFLOPs (Table 1) are for the stride on a bottleneck's first 1x1; pass stride_in_1x1=True to
    compare like with like (torchvision's default form costs 4.09 G for resnet50, not 3.8)."""
    from resnetlab.models import MODELS
    from resnetlab.paper import CIFAR_PARAMS_M, IMAGENET_GFLOPS

    rows = []
    for name, spec in MODELS.items():
        imagenet = spec.family == "imagenet"
        with torch.device("meta"):  # shapes without storage: the forward pass costs nothing, even for 1202 layers
            model = spec.build(stride_in_1x1=stride_in_1x1) if imagenet else spec.build()
            measured = complexity(model, native_input_size(spec.family))
        paper = IMAGENET_GFLOPS.get(spec.depth) if imagenet else CIFAR_PARAMS_M.get(spec.depth)
        rows.append({
            "name": name, "family": spec.family, "depth": spec.depth,
            "shortcut": model.shortcut if spec.residual else "none",
            "params": measured.params, "gmacs": measured.gmacs,
            "paper": paper if spec.residual else None,
            "paper_unit": "GFLOPs" if imagenet else "M params",
        })
    return rows
