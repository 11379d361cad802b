"""resnetlab: the networks of "Deep Residual Learning for Image Recognition" (He et al., 2015), exact and fast."""

from resnetlab.complexity import Complexity, complexity
from resnetlab.factory import create_model
from resnetlab.models import (
    BasicBlock,
    Bottleneck,
    ResNet,
    cifar_plain,
    cifar_resnet,
    imagenet_plain,
    imagenet_resnet,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Complexity",
    "ResNet",
    "cifar_plain",
    "cifar_resnet",
    "complexity",
    "create_model",
    "imagenet_plain",
    "imagenet_resnet",
    "list_models",
]
