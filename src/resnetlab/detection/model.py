"""Faster R-CNN with the paper's backbones (Sec. 4.3 and Appendix A), assembled from torchvision's parts.

A ResNet is cut in two where the paper cuts it: the shared trunk is the stem and every stage but the last
(conv1..conv4_x of an ImageNet net: stride 16), on which the RPN runs; each region is RoI-pooled from the trunk's
feature map to 14x14 and goes through the last stage (conv5_x, whose first block has stride 2: 7x7) and the
global average pool, then through sibling classification and box-regression layers. A CIFAR net is cut the same
way (trunk: stem and the first two stages, stride 2; head: the third stage). The VGG-16 baseline is Faster
R-CNN's own: the trunk is conv1_1..conv5_3 (stride 16), each region is RoI-pooled to 7x7 and goes through fc6
and fc7.

When the backbone comes from a trained classifier, its BN layers become torchvision's FrozenBatchNorm2d: the
ImageNet statistics and affine parameters turned into a constant scale and shift, as the paper does; and its first
layers keep the classifier's weights (`freeze_early_layers`). From scratch, everything trains, BN included.
Everything detection-specific (the anchors, the RPN, proposal selection, sampling, the losses, the resizing
transform) is torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg16
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, RoIPool

from resnetlab.checkpoint import CheckpointError, checkpoint_path, load_weights, read_weights
from resnetlab.factory import create_model, load_model
from resnetlab.models import MODELS, ResNet

VGG16 = "vgg16"
VGG16_ROI_POOL_SIZE = 7  # fc6 takes 7x7x512, as in Fast/Faster R-CNN
VGG16_CONV3_1 = 10  # the index of conv3_1 in torchvision's vgg16().features
# torchvision's ImageNet weights expect inputs normalized with these (in [0, 1] units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_names() -> list[str]:
    return [*MODELS, VGG16]


class Trunk(nn.Sequential):
    """The shared convolutional layers: images in, one feature map out (what torchvision calls the backbone)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int, stride: int):
        super().__init__(layers)
        self.out_channels, self.stride = out_channels, stride


class RegionHead(nn.Sequential):
    """What each pooled region goes through before the sibling layers: conv5_x + average pool, or fc6 + fc7."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int):
        super().__init__(layers)
        self.out_channels = out_channels


class TrunkRoIPool(nn.Module):
    """RoI max pooling (torchvision.ops.RoIPool) of the trunk's feature map, with the call signature torchvision's
    RoIHeads gives its `box_roi_pool`: (features by name, proposals per image, image sizes)."""

    def __init__(self, output_size: int, stride: int):
        super().__init__()
        self.pool = RoIPool(output_size, spatial_scale=1.0 / stride)

    def forward(self, features: OrderedDict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        (feature_map,) = features.values()
        return self.pool(feature_map, proposals)


def split_resnet(network: ResNet) -> tuple[Trunk, RegionHead]:
    """Trunk: the stem and all stages but the last; head: the last stage (its first block halves the pooled
    region) and the global average pool."""
    names = network.stage_names
    layers = OrderedDict([("conv1", network.conv1), ("bn1", network.bn1), ("relu", network.relu),
                          ("maxpool", network.maxpool)])
    layers.update((name, getattr(network, name)) for name in names[:-1])
    stem_stride = 4 if network.stem == "imagenet" else 1  # 7x7/2 conv and 3x3/2 max-pool, or a 3x3/1 conv
    trunk_channels = getattr(network, names[-2])[-1].residual_branch_end().num_features
    trunk = Trunk(layers, trunk_channels, stride=stem_stride * 2 ** (len(names) - 2))
    head = RegionHead(OrderedDict([(names[-1], getattr(network, names[-1])), ("avgpool", network.avgpool),
                                   ("flatten", nn.Flatten(1))]), network.num_features)
    return trunk, head


def split_vgg16(network: nn.Module) -> tuple[Trunk, RegionHead]:
    """torchvision's vgg16: the trunk ends with conv5_3 and its ReLU (the last max-pool is left out); the head is
    fc6 and fc7 with their ReLUs and dropout (the 1000-way fc8 is left out)."""
    trunk = Trunk(OrderedDict([("features", network.features[:-1])]), out_channels=512, stride=16)
    head = RegionHead(OrderedDict([("flatten", nn.Flatten(1)), ("classifier", network.classifier[:-1])]),
                      out_channels=network.classifier[3].out_features)
    return trunk, head


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a FrozenBatchNorm2d holding its statistics and affine parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def freeze_early_layers(network: nn.Module, backbone: str) -> None:
    """Keep the first layers of a trained classifier as they are: a ResNet's stem and first stage (conv1 and
    conv2_x), as Detectron's C4 detectors do when they start from ImageNet weights, and VGG-16's conv1_x and
    conv2_x, as Faster R-CNN does (it fine-tunes from conv3_1 up). Those layers compute generic low-level features
    that the classifier has already learnt."""
    early = network.features[:VGG16_CONV3_1] if backbone == VGG16 else [network.conv1, network.layer1]
    for module in early:
        module.requires_grad_(False)


def classification_network(backbone: str, settings: dict | None = None) -> nn.Module:
    """A fresh classifier of the named architecture with `settings` (create_model's keyword arguments, e.g.
    shortcut="B"), with torchvision's module names (so its weights load)."""
    if backbone == VGG16:
        return vgg16()
    if backbone not in MODELS:
        raise ValueError(f"--model {backbone!r} is not a backbone; choose one of {', '.join(backbone_names())}")
    return create_model(backbone, **(settings or {}))


def pretrained_classifier(backbone: str, weights: str | Path
                          ) -> tuple[nn.Module, dict, tuple[float, ...], tuple[float, ...]]:
    """The classifier `weights` holds, its settings (`classification_network` rebuilds it from them: a resnetlab
    run's model_kwargs, none for a torchvision file), and the input normalization its training used (mean, std in
    [0, 1] units).

    `weights` is a resnetlab run directory or checkpoint (the network it names, normalized with its fitted mean
    and std, std 1 when it fitted none), or a torchvision-format state_dict file (.pth/.pt or .safetensors), such
    as torchvision's ImageNet weights, normalized as torchvision's are. Every file is read by the one reader,
    `checkpoint.read_weights`, and a ResNet's weights load by `checkpoint.load_weights`' rules."""
    path = checkpoint_path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights {weights}: no such file or run directory")
    read = read_weights(path)
    if read.recorded_model is not None and path.suffix != ".safetensors":  # only a checkpoint records it in torch
        network, checkpoint = load_model(path)
        if checkpoint["model_name"] != backbone:
            raise CheckpointError(f"--backbone-weights {path} holds a {checkpoint['model_name']}, not a {backbone}")
        if checkpoint["model_kwargs"].get("in_channels", 3) != 3:
            raise CheckpointError(f"--backbone-weights {path} takes {checkpoint['model_kwargs']['in_channels']}-"
                                  "channel images; detection needs an RGB (3-channel) classifier")
        normalize = checkpoint["normalize"]
        mean = tuple(normalize["mean"].mean((1, 2)).tolist())
        std = (1.0, 1.0, 1.0) if normalize.get("std") is None else tuple(normalize["std"].flatten().tolist())
        return network, dict(checkpoint["model_kwargs"]), mean, std
    network = classification_network(backbone)
    if backbone != VGG16:
        load_weights(network, read, backbone)
        return network, {}, IMAGENET_MEAN, IMAGENET_STD
    classifier_keys = "classifier.6."  # the 1000-way layer the detector drops
    kept = {key: value for key, value in read.tensors.items() if not key.startswith(classifier_keys)}
    missing, unexpected = network.load_state_dict(kept, strict=False)
    missing = [key for key in missing if not key.startswith(classifier_keys)]
    if missing or unexpected:
        raise CheckpointError(f"--backbone-weights {path} is not a torchvision-format {backbone} state_dict: "
                              f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:2]})")
    return network, {}, IMAGENET_MEAN, IMAGENET_STD


def build_detector(backbone: str, num_classes: int, *, frozen_bn: bool, image_mean: Sequence[float],
                   image_std: Sequence[float], min_size: int, max_size: int, anchor_sizes: Sequence[int],
                   aspect_ratios: Sequence[float], roi_pool_size: int, rpn_pre_nms_train: int, rpn_post_nms_train: int,
                   rpn_pre_nms_test: int, rpn_post_nms_test: int, rpn_batch_size: int, rois_per_image: int,
                   box_nms_threshold: float, detections_per_image: int, backbone_kwargs: dict | None = None,
                   classifier: nn.Module | None = None) -> FasterRCNN:
    """Faster R-CNN on `backbone` (a resnetlab model name or "vgg16", built with `backbone_kwargs`) for
    `num_classes` classes including the background. `classifier` (with trained weights) is split into trunk and
    head; None starts from a fresh network. `frozen_bn` (a detector of a trained classifier): BN frozen and the
    first layers kept (`freeze_early_layers`)."""
    network = classifier if classifier is not None else classification_network(backbone, backbone_kwargs)
    if frozen_bn:
        freeze_early_layers(network, backbone)
    trunk, head = split_vgg16(network) if backbone == VGG16 else split_resnet(network)
    if frozen_bn:
        freeze_batch_norm(trunk)
        freeze_batch_norm(head)
    pool_size = VGG16_ROI_POOL_SIZE if backbone == VGG16 else roi_pool_size
    anchors = AnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=(tuple(aspect_ratios),))
    detector = FasterRCNN(
        trunk, min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=rpn_pre_nms_train,
        rpn_post_nms_top_n_train=rpn_post_nms_train, rpn_pre_nms_top_n_test=rpn_pre_nms_test,
        rpn_post_nms_top_n_test=rpn_post_nms_test, rpn_batch_size_per_image=rpn_batch_size, box_head=head,
        box_predictor=FastRCNNPredictor(head.out_channels, num_classes), box_batch_size_per_image=rois_per_image,
        box_nms_thresh=box_nms_threshold, box_detections_per_img=detections_per_image)
    # FasterRCNN's constructor accepts only its RoIAlign pooler; RoIHeads calls any module with its signature.
    detector.roi_heads.box_roi_pool = TrunkRoIPool(pool_size, trunk.stride)
    return detector
