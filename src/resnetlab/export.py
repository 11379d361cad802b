"""Inference forms of a trained model: BN folded into the convolutions, the fast CPU path, the ONNX form.

In eval mode a BatchNorm is an affine map per channel, so conv -> BN equals one conv with scaled weights and a
bias: `fold_batchnorm` returns that network (fp32 logits within 1e-4 of the original). `fast_inference` wraps it
for speed: channels_last, bf16 autocast where the CPU computes bf16 natively, and optionally torch.compile.

    resnetlab export runs/x --format onnx --out resnet20.onnx
    resnetlab export runs/x --format onnx --precision int8    # runs/x/model.int8.onnx (resnetlab.quantize)

The command (`inference.export`) writes the folded network as ONNX or TorchScript. The exported model takes the
normalized image batch (N, C, H, W) and returns logits; the batch size is free.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resnetlab.precision import resolve_precision


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every BN that follows a conv folded into it (the BN becomes Identity).

    The pairs are the ones the forward passes apply in sequence: `convK` -> `bnK` inside one module, and a
    conv followed by a BN in an nn.Sequential (the projection shortcuts)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                conv_name = conv_before(module, name)
                if conv_name is not None:
                    setattr(module, conv_name, fuse_conv_bn_eval(getattr(module, conv_name), child))
                    setattr(module, name, nn.Identity())
    return folded


def conv_before(module: nn.Module, bn_name: str) -> str | None:
    """The name of the conv whose output `bn_name` normalizes, or None."""
    if isinstance(module, nn.Sequential):
        names = [name for name, _ in module.named_children()]
        position = names.index(bn_name)
        previous = names[position - 1] if position > 0 else None
        return previous if isinstance(getattr(module, previous or "", None), nn.Conv2d) else None
    conv_name = "conv" + bn_name.removeprefix("bn")
    return conv_name if bn_name.startswith("bn") and isinstance(getattr(module, conv_name, None), nn.Conv2d) else None


class FastInference(nn.Module):
    """The fast CPU inference path: BN folded, channels_last, bf16 autocast when `bf16` (logits come back fp32)."""

    def __init__(self, model: nn.Module, *, bf16: bool):
        super().__init__()
        self.model = fold_batchnorm(model).to(memory_format=torch.channels_last)
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float()


def fast_inference(model: nn.Module, *, precision: str = "auto", compile: bool = False) -> nn.Module:
    """`model` as the fast path; precision "auto" is bf16 where it is faster than fp32 (`resolve_precision`)."""
    device = next(model.parameters()).device
    fast = FastInference(model, bf16=resolve_precision(precision, device, training=False) == "bf16").eval()
    if not compile:
        return fast
    # Freezing turns the weights into constants, so Inductor can pre-pack them for oneDNN once (faster: section 2 of
    # docs/benchmarks.md). It is read when the first call compiles, so it is set for the process (torch.compile's
    # options= did not reach it); Inductor applies it to graphs without gradients only.
    import torch._inductor.config  # imported here: loading Inductor costs seconds that eager use should not pay

    torch._inductor.config.freezing = True
    return torch.compile(fast)


def write_onnx(folded: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The fp32 ONNX form of a folded network: input "images" (normalized, any batch size), output "logits"."""
    with torch.no_grad():
        # The TorchScript-based exporter needs no onnxscript; the batch dimension stays free.
        torch.onnx.export(folded, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
