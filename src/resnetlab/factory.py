"""Models from names and files: a named architecture with starting weights, and the network a run trained.

`models` builds architectures and reads no files; `checkpoint` reads files and builds no models. This module joins
the two, as timm's `_factory` sits above its architectures and its `_helpers`:

- ``create_model(name, weights=PATH)``: a fresh model, optionally started from a run or a torchvision/timm file
  (`checkpoint.load_weights`' rules); resnetlab.create_model, train's --init and hubconf.py use it.
- ``load_model(run)``: the network a checkpoint was trained as, with its weights (evaluate, predict, export).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from resnetlab.checkpoint import Weights, checkpoint_path, load_checkpoint, load_weights, restore_weights
from resnetlab.models import ResNet, build_model


def create_model(name: str, weights: str | os.PathLike | Weights | None = None, **kwargs) -> ResNet:
    """Build a named model, e.g. create_model("resnet56", shortcut="B"); "cifar_resnet"/"cifar_plain" take depth=.

    `weights`: start from a resnetlab run directory, its checkpoint.pt or model.safetensors, or a torchvision-format
    state_dict (.pth). A file for another number of classes loads all but `fc`, which stays freshly initialised;
    see checkpoint.load_weights for the rules."""
    model = build_model(name, **kwargs)
    if weights is not None:
        load_weights(model, weights, name)
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model a checkpoint was trained as, with its weights, in eval mode; and the checkpoint itself."""
    state = load_checkpoint(path, map_location)
    model = create_model(state["model_name"], **state["model_kwargs"])
    restore_weights(model, state, checkpoint_path(path))
    return model.eval(), state
