"""The networks of "Deep Residual Learning for Image Recognition" (He, Zhang, Ren, Sun, 2015).

One block class per block kind (BasicBlock, Bottleneck), one network class (ResNet) and small builders.
The module tree and state_dict keys are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, `downsample.0`, `fc`),
so a torchvision checkpoint loads with strict=True. The paper's options are constructor arguments:

- ``residual=False`` gives the plain network: the same layers with no shortcut addition at all.
- ``shortcut`` picks how a residual block's shortcut is built (paper Sec. 3.3 / Table 3):
  "A" identity, subsampled and zero-padded where the shape changes (no parameters);
  "B" 1x1 projection + BN only where the shape changes; "C" projection + BN on every block.
- ``shortcut_padding`` says where option A puts its zero channels: "after" the identity's (the default), or
  "both": half before and half after, as the CIFAR nets of akamaster/pytorch_resnet_cifar10 do. The two compute
  different functions of the same weights, so a network trained with one needs it to be run with the same.
- ``stride_in_1x1=True`` puts a bottleneck's stride-2 on its first 1x1 conv, as the paper does ("v1", 3.86 GMACs
  for 50 layers); the default puts it on the 3x3 as torchvision does ("v1.5", 4.09 GMACs).
- ``stem="cifar"`` gives the CIFAR networks of Sec. 4.2: a 3x3 conv stem, no max-pool, three stages of 16/32/64 filters.

Not paper options but ways to compute: ``model.activation_checkpointing = True`` trades one extra forward per
training step for memory (each stage's blocks are recomputed in backward instead of kept), with the same numbers;
``model.fp32_residual_stream = False`` adds each block's branch and shortcut in bf16 under bf16 autocast, as plain
autocast does (`add_shortcut`; the benchmarks measure what the fp32 default costs and buys).

Fine-tuning: ``model.freeze_backbone()`` leaves only the classifier to train. This module reads and writes no
files: a model built from a name with weights (``create_model(name, weights=PATH)``, from a resnetlab run, a
torchvision/timm file or another project's file whose layout resnetlab knows) comes from `factory`.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

SHORTCUTS = ("A", "B", "C")
SHORTCUT_PADDINGS = ("after", "both")
STEMS = ("imagenet", "cifar")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: the identity, subsampled by `stride` and with zero channels added; it has no parameters.
    `padding` "after" appends them; "both" puts half of them before the identity's channels and half after."""

    def __init__(self, extra_channels: int, stride: int, padding: str = "after"):
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra_channels // 2 if self.padding == "both" else 0
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}, padding={self.padding!r}"


def make_shortcut(in_planes: int, out_planes: int, stride: int, shortcut: str,
                  padding: str = "after") -> nn.Module | None:
    """The module added to a block's output, or None for the plain identity (torchvision's `downsample`)."""
    shape_changes = stride != 1 or in_planes != out_planes
    if shortcut == "C" or (shortcut == "B" and shape_changes):
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    if shortcut == "A" and shape_changes:
        return ZeroPadShortcut(out_planes - in_planes, stride, padding)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets); y = relu(F(x) + shortcut(x)), or relu(F(x)) when plain."""

    expansion = 1
    fp32_residual_stream = True  # see add_shortcut; ResNet.fp32_residual_stream sets it on every block

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, residual: bool = True,
                 shortcut: str = "B", shortcut_padding: str = "after", stride_in_1x1: bool = False):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_planes)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = (make_shortcut(in_planes, out_planes, stride, shortcut, shortcut_padding) if residual
                           else None)

    def residual_branch_end(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(add_shortcut(self, out, x))


class Bottleneck(nn.Module):
    """1x1 (reduce) - 3x3 - 1x1 (restore, 4x) convs (ResNet-50/101/152)."""

    expansion = 4
    fp32_residual_stream = True  # see add_shortcut; ResNet.fp32_residual_stream sets it on every block

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, residual: bool = True,
                 shortcut: str = "B", shortcut_padding: str = "after", stride_in_1x1: bool = False):
        super().__init__()
        out_planes = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_planes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = (make_shortcut(in_planes, out_planes, stride, shortcut, shortcut_padding) if residual
                           else None)

    def residual_branch_end(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(add_shortcut(self, out, x))


def add_shortcut(block: BasicBlock | Bottleneck, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """branch + shortcut(x), summed in fp32. Under bf16 autocast the convs and BNs output bf16; summing in bf16
    (8 mantissa bits) would round away the part of a small branch below the identity's precision in every
    block, so the stream between blocks stays fp32 and each conv casts its own input to bf16. In fp32 this is
    a no-op (bit-identical). docs/benchmarks.md measures what it changes, against the plain sum in the operands'
    dtype that a block with fp32_residual_stream False takes."""
    if not block.residual:
        return branch
    identity = x if block.downsample is None else block.downsample(x)
    if not block.fp32_residual_stream:
        return branch + identity
    stream = torch.promote_types(identity.dtype, torch.float32)  # fp64 stays fp64 for a model run in double
    return branch.to(stream) + identity.to(stream)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A stem, stages of blocks (the first block of each stage after the first halves the resolution), global
    average pool and a fully connected layer. ImageNet nets: 4 stages of 64/128/256/512 planes after a 7x7/2 conv
    and a 3x3/2 max-pool. CIFAR nets: 3 stages of 16/32/64 planes after a 3x3 conv, no max-pool."""

    def __init__(self, block: Block, layers: list[int], *, num_classes: int = 1000, in_channels: int = 3,
                 residual: bool = True, shortcut: str = "B", shortcut_padding: str = "after",
                 stride_in_1x1: bool = False, zero_init_residual: bool = False, stem: str = "imagenet",
                 widths: tuple[int, ...] | None = None):
        super().__init__()
        check_choice("shortcut", shortcut, SHORTCUTS)
        check_choice("shortcut_padding", shortcut_padding, SHORTCUT_PADDINGS)
        check_choice("stem", stem, STEMS)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if zero_init_residual and not residual:
            raise ValueError("zero_init_residual=True needs residual=True: a plain net with zeroed BNs outputs "
                             "constants")
        widths = widths or ((64, 128, 256, 512) if stem == "imagenet" else (16, 32, 64))
        if len(widths) != len(layers):
            raise ValueError(f"widths {widths} and layers {layers} must have the same length (one per stage)")
        self.residual, self.shortcut, self.stride_in_1x1, self.stem = residual, shortcut, stride_in_1x1, stem
        self.activation_checkpointing = False  # see the module docstring; not in the state_dict
        self.backbone_frozen = False  # set by freeze_backbone

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        in_planes = widths[0]
        self.stage_names: list[str] = []
        for index, (planes, blocks) in enumerate(zip(widths, layers)):
            stage = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                stage.append(block(in_planes, planes, stride, residual=residual, shortcut=shortcut,
                                   shortcut_padding=shortcut_padding, stride_in_1x1=stride_in_1x1))
                in_planes = planes * block.expansion
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.residual_branch_end().weight)

    def freeze_backbone(self) -> None:
        """Train the classifier (fc) alone: every other parameter stops learning, and every BN normalises with
        its running statistics and keeps them as they are, in training mode too."""
        self.backbone_frozen = True
        for name, parameter in self.named_parameters():
            parameter.requires_grad = name.startswith("fc.")
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        """As nn.Module.train; with a frozen backbone the BNs stay in eval mode, whoever calls it."""
        super().train(mode)
        if self.backbone_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        return [block for stage in self.stages() for block in stage]

    @property
    def fp32_residual_stream(self) -> bool:
        """Whether the blocks add branch and shortcut in fp32 (the default; module docstring)."""
        return all(block.fp32_residual_stream for block in self.blocks())

    @fp32_residual_stream.setter
    def fp32_residual_stream(self, fp32: bool) -> None:
        for block in self.blocks():
            block.fp32_residual_stream = fp32

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1, bn1, relu and the max-pool (none in a CIFAR net): the input of the first stage."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stages(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The output of every stage, e.g. layer1..layer4 = C2..C5 of an ImageNet net; any input size works."""
        x = self.forward_stem(x)
        outputs: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, before the pooling (N, num_features, H', W'), as timm's forward_features."""
        x = self.forward_stem(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages():
            x = checkpointed_stage(stage, x) if recompute else stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def checkpointed_stage(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run `stage` as about sqrt(len) segments that keep only their inputs; backward recomputes the rest.
    That cuts a stage's activation memory from O(n) blocks to O(sqrt(n))."""
    size = max(1, round(math.sqrt(len(stage))))
    for start in range(0, len(stage), size):
        segment = stage[start:start + size]
        x = checkpoint(segment, x, use_reentrant=False,
                       context_fn=lambda segment=segment: (contextlib.nullcontext(), unchanged_bn_statistics(segment)))
    return x


@contextlib.contextmanager
def unchanged_bn_statistics(module: nn.Module) -> Iterator[None]:
    """The recomputation runs every BN forward a second time in training mode, which would update its running
    statistics twice per step; put them back as they were before it."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def check_choice(argument: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{argument}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def check_positive_int(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}={value!r} is not valid; it must be a positive integer")


# ---------------------------------------------------------------------------------------------------------------
# Builders. ImageNet nets (paper Table 1) default to torchvision's form; CIFAR nets (Sec. 4.2) to option A.

IMAGENET_LAYERS: dict[int, tuple[Block, list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def imagenet_resnet(depth: int, **kwargs) -> ResNet:
    if depth not in IMAGENET_LAYERS:
        raise ValueError(f"depth={depth!r} is not an ImageNet ResNet depth; choose one of {sorted(IMAGENET_LAYERS)}")
    block, layers = IMAGENET_LAYERS[depth]
    return ResNet(block, layers, **kwargs)


def cifar_resnet(depth: int, *, num_classes: int = 10, shortcut: str = "A", **kwargs) -> ResNet:
    """A CIFAR network of depth 6n+2 (three stages of n basic blocks, 16/32/64 filters)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r} is not valid for a CIFAR ResNet; it must be 6n+2 with n >= 1 "
                         f"(8, 14, 20, ...; the paper's are {', '.join(map(str, CIFAR_DEPTHS))})")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], num_classes=num_classes, shortcut=shortcut, stem="cifar", **kwargs)


def cifar_plain(depth: int, **kwargs) -> ResNet:
    return cifar_resnet(depth, residual=False, **kwargs)


def imagenet_plain(depth: int, **kwargs) -> ResNet:
    return imagenet_resnet(depth, residual=False, **kwargs)


def _named(builder: Callable[..., ResNet], depth: int) -> Callable[..., ResNet]:
    def build(**kwargs) -> ResNet:
        return builder(depth, **kwargs)

    build.__doc__ = f"{builder.__name__}({depth}, **kwargs)"
    return build


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its builder and what it is."""

    build: Callable[..., ResNet]  # build(**kwargs): num_classes, in_channels, shortcut, ... (create_model)
    depth: int
    family: str  # "imagenet" or "cifar": the stem and the input size it was made for
    residual: bool  # False: the plain net, the same layers without shortcuts


# The named models; "cifar_resnet"/"cifar_plain" (create_model) take any depth=6n+2.
MODELS: dict[str, ModelSpec] = {}
for _depth in IMAGENET_LAYERS:
    MODELS[f"resnet{_depth}"] = ModelSpec(_named(imagenet_resnet, _depth), _depth, "imagenet", residual=True)
    MODELS[f"plain{_depth}"] = ModelSpec(_named(imagenet_plain, _depth), _depth, "imagenet", residual=False)
for _depth in CIFAR_DEPTHS:
    MODELS[f"resnet{_depth}"] = ModelSpec(_named(cifar_resnet, _depth), _depth, "cifar", residual=True)
    MODELS[f"plain{_depth}"] = ModelSpec(_named(cifar_plain, _depth), _depth, "cifar", residual=False)

resnet18, resnet34, resnet50, resnet101, resnet152 = (MODELS[f"resnet{d}"].build for d in IMAGENET_LAYERS)
resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = (MODELS[f"resnet{d}"].build for d in CIFAR_DEPTHS)


def list_models() -> list[str]:
    """Every named model: ImageNet nets first, then CIFAR nets, residual before plain."""
    return list(MODELS)


def build_model(name: str, **kwargs) -> ResNet:
    if name == "cifar_resnet":
        return cifar_resnet(**kwargs)
    if name == "cifar_plain":
        return cifar_plain(**kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}, "
                         "or cifar_resnet / cifar_plain with depth=6n+2")
    try:
        return MODELS[name].build(**kwargs)
    except TypeError as error:  # an unknown keyword: say which are valid
        raise ValueError(f"{name}: {error}; valid arguments: num_classes, in_channels, shortcut, "
                         "shortcut_padding, stride_in_1x1, zero_init_residual, widths, weights") from None


def model_family(name: str) -> str:
    """'imagenet' or 'cifar': which input size and stem a named model was made for."""
    return "cifar" if name.startswith("cifar_") else MODELS[name].family
