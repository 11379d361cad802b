"""Models from names and files: a named architecture with starting weights, and the network a run trained.

`models` builds architectures and reads no files; `checkpoint` reads files and builds no models. This module joins
the two, as timm's `_factory` sits above its architectures and its `_helpers`:

- ``create_model(name, weights=PATH)``: a fresh model, optionally started from a run, a torchvision/timm file or
  another project's file in a layout resnetlab knows (`checkpoint.load_weights`' rules, `checkpoint.LAYOUTS`);
  resnetlab.create_model, train's --init and hubconf.py use it.
- ``load_model(run)``: the network a checkpoint was trained as, with its weights (evaluate, predict, export), or,
  given the model's name, another project's network (`foreign_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from resnetlab.checkpoint import (
    FORMAT,
    CheckpointError,
    Weights,
    checkpoint_path,
    is_checkpoint,
    known_layouts,
    load_weights,
    read_torch_file,
    read_weights,
    restore_weights,
    weights_in,
)
from resnetlab.models import ResNet, build_model


def create_model(name: str, weights: str | os.PathLike | Weights | None = None, **kwargs) -> ResNet:
    """Build a named model, e.g. create_model("resnet56", shortcut="B"); "cifar_resnet"/"cifar_plain" take depth=.

    `weights`: start from a resnetlab run directory, its checkpoint.pt or model.safetensors, a torchvision-format
    state_dict (.pth), or another project's file whose layout resnetlab knows (checkpoint.LAYOUTS: its network's
    own constructor arguments, such as shortcut_padding="both", are then set). A file for another number of
    classes loads all but `fc`, which stays freshly initialised; see checkpoint.load_weights for the rules."""
    if weights is None:
        return build_model(name, **kwargs)
    if not isinstance(weights, Weights):
        weights = read_weights(weights)
    model = build_model(name, **weights.model_kwargs(kwargs))
    load_weights(model, weights, name)
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               model_name: str | None = None) -> tuple[nn.Module, dict]:
    """The model a checkpoint was trained as, with its weights, in eval mode; and the checkpoint itself.

    Given `model_name`, `path` may also be another project's file in a layout resnetlab knows (LAYOUTS): the
    checkpoint returned then holds what evaluating it needs, the model, its classes and its input normalization."""
    path = checkpoint_path(path)
    state = read_torch_file(path, "checkpoint", map_location)
    if not is_checkpoint(state):
        if model_name is None:
            raise CheckpointError(f"{path} is not a resnetlab checkpoint (no format={FORMAT!r} entry); weights from "
                                  f"another project load given the model they hold (--model, e.g. resnet20)")
        return foreign_model(weights_in(path, path.read_bytes(), state), model_name)
    model = create_model(state["model_name"], **state["model_kwargs"])
    restore_weights(model, state, path, model_name)
    return model.eval(), state


def foreign_model(weights: Weights, model_name: str) -> tuple[nn.Module, dict]:
    """Another project's network, in eval mode, and the checkpoint entries that evaluate and predict read."""
    layout = weights.layout
    if layout is None:
        raise CheckpointError(f"{weights.path} is not a resnetlab checkpoint, and its keys fit no other project's "
                              f"layout that resnetlab knows ({known_layouts()}), so its classes and input "
                              f"normalization are unknown; it holds {weights.made_for()}")
    classes = len(weights.tensors["fc.weight"])
    if classes != len(layout.classes):
        raise CheckpointError(f"weights file {weights.path} ({layout.source}) has a classifier for {classes} "
                              f"classes, not the {len(layout.classes)} of {layout.dataset}")
    kwargs = weights.model_kwargs({"num_classes": classes})
    model = create_model(model_name, weights=weights, **kwargs)
    state = {"model_name": model_name, "model_kwargs": kwargs, "classes": list(layout.classes),
             "normalize": layout.normalize().state_dict()}
    return model.eval(), state
