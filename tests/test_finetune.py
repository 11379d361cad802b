"""create_model(weights=): the weights a model starts from (a resnetlab run, or a torchvision-format file), and
freezing the backbone.

The torchvision files are made here from the parity fixture's key names and shapes (torchvision's own, recorded
from real torchvision in fixtures/torchvision_resnets.json), filled with its deterministic weights.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_helpers import assert_same_tensors, differing_tensors, model_weights, tiny_config
from test_torchvision_parity import FIXTURE, deterministic
from torch import nn

from resnetlab.checkpoint import CheckpointError, load_weights
from resnetlab.models import create_model
from resnetlab.train import train

CLASSIFIER = ["fc.weight", "fc.bias"]


def torchvision_state_dict(name: str, num_classes: int = 1000) -> OrderedDict[str, torch.Tensor]:
    """A state_dict as torchvision's `name` has it (keys, order, shapes, dtypes), with deterministic values; the BN
    batch counters are nonzero, as in a trained file, so that loading them is seen."""
    template = OrderedDict(
        (key, torch.tensor(5004) if key.endswith("num_batches_tracked") else torch.zeros(shape))
        for key, shape in FIXTURE["models"][name]["keys_shapes"])
    state = OrderedDict(deterministic.deterministic_weights(template))
    for key in ("fc.weight", "fc.bias"):
        state[key] = state[key][:num_classes].clone()
    return state


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, OrderedDict[str, torch.Tensor]]:
    """resnet18 for ImageNet as torchvision publishes it: a .pth holding a plain state_dict."""
    path = tmp_path_factory.mktemp("torchvision") / "resnet18-deterministic.pth"
    state = torchvision_state_dict("resnet18")
    torch.save(state, path)
    return path, state


def fresh_classifier(name: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """The fc a model built after torch.manual_seed(seed) starts with."""
    torch.manual_seed(seed)
    return {f"fc.{key}": value for key, value in create_model(name, **kwargs).fc.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# create_model(weights=)
# --------------------------------------------------------------------------------------------------------------


def test_a_torchvision_file_loads_every_tensor_into_a_1000_class_model(resnet18_file, caplog):
    path, state = resnet18_file
    model = create_model("resnet18", weights=path)
    assert_same_tensors(model.state_dict(), state)
    assert caplog.records == []  # nothing adapted, nothing to say


def test_a_10_class_model_loads_all_but_fc_which_is_freshly_initialised(resnet18_file, caplog):
    path, state = resnet18_file
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        model = create_model("resnet18", num_classes=10, weights=path)
    # Every tensor is the file's but fc, which is the model's own initialisation (not a slice of the file's fc).
    assert_same_tensors(model.state_dict(), {**state, **fresh_classifier("resnet18", num_classes=10)})
    assert model.fc.weight.shape == (10, 512)
    assert [record.getMessage() for record in caplog.records] == [
        f"weights file {path}: fc re-initialised for 10 classes (the file's has 1000)"]


def test_a_1_channel_model_gets_the_stem_summed_over_rgb_and_other_counts_are_refused(resnet18_file):
    path, state = resnet18_file
    gray = create_model("resnet18", in_channels=1, weights=path).state_dict()
    assert torch.equal(gray["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert differing_tensors(gray, {**state, "conv1.weight": gray["conv1.weight"]}) == []
    # Summing is exact: a gray image through the summed stem is the image repeated in RGB through the file's.
    image = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(F.conv2d(image, gray["conv1.weight"]),
                               F.conv2d(image.expand(1, 3, 16, 16), state["conv1.weight"]))
    with pytest.raises(CheckpointError, match=re.escape(
            f"weights file {path} seems to be for resnet18 (1000 classes, 3 input channels), not resnet18 "
            "(1000 classes, 2 input channels): conv1 takes 3 input channels there and 2 here (only a 3-channel "
            "stem is adapted, to 1 channel, by summing its filters over RGB)")):
        create_model("resnet18", in_channels=2, weights=path)


@pytest.mark.parametrize(("file_for", "message"), [
    ("resnet34", "seems to be for resnet34 (1000 classes, 3 input channels), not resnet18 (1000 classes, 3 input "
                 "channels): unexpected layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias (and "),
    ("resnet50", "seems to be for resnet50 (1000 classes, 3 input channels), not resnet18 (1000 classes, 3 input "
                 "channels): unexpected layer1.0.conv3.weight, layer1.0.bn3.weight, layer1.0.bn3.bias (and 195 more); "
                 "shapes (file vs model) layer1.0.conv1.weight [64, 64, 1, 1] vs [64, 64, 3, 3], "),
])
def test_a_file_for_another_depth_is_one_error_and_loads_nothing(tmp_path, file_for, message):
    path = tmp_path / f"{file_for}.pth"
    torch.save(torchvision_state_dict(file_for), path)
    model = create_model("resnet18")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {path} {message}")):
        load_weights(model, path, "resnet18")
    assert_same_tensors(model.state_dict(), before)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A resnetlab run to start from: resnet20 on digits (1 channel, 10 classes), 10 iterations."""
    out = tmp_path_factory.mktemp("digits") / "run"
    train(tiny_config(out, iterations=10), progress=False)
    return out


@pytest.mark.parametrize("source", ["", "checkpoint.pt", "model.safetensors"])
def test_a_resnetlab_run_its_checkpoint_and_its_safetensors_all_load(digits_run, source):
    model = create_model("resnet20", in_channels=1, weights=digits_run / source)
    assert_same_tensors(model.state_dict(), model_weights(digits_run))


def test_a_run_of_another_model_with_the_same_keys_is_refused(digits_run):
    # Option A shortcuts have no weights, so resnet20 and plain20 share every key: only the record tells them apart.
    with pytest.raises(CheckpointError, match=re.escape(
            f"weights file {digits_run / 'checkpoint.pt'} seems to be for resnet20 (10 classes, 1 input channel), "
            "not plain20 (10 classes, 1 input channel)")):
        create_model("plain20", in_channels=1, weights=digits_run)


@pytest.mark.parametrize(("content", "message"), [
    (b"PK\x03\x04 cut short", "is truncated or corrupt: "),
    ({"epoch": 3, "optimizer": {}}, "is neither a state_dict (tensors by name) nor a resnetlab checkpoint; it holds "
                                    "epoch, optimizer"),
    ([torch.zeros(1)], "is neither a state_dict (tensors by name) nor a resnetlab checkpoint; it holds list"),
])
def test_a_file_that_holds_no_weights_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {path} {message}")):
        create_model("resnet18", weights=path)


def test_a_damaged_safetensors_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {path} is truncated or corrupt: ")):
        create_model("resnet18", weights=path)


# --------------------------------------------------------------------------------------------------------------
# Freezing the backbone
# --------------------------------------------------------------------------------------------------------------


def test_a_frozen_backbone_keeps_its_bn_statistics_whoever_calls_train():
    model = create_model("resnet20", num_classes=3)
    model.freeze_backbone()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()  # as the training loop does, and class_probabilities when it restores the mode
    assert model.training and model.fc.training
    assert not any(module.training for module in model.modules() if isinstance(module, nn.BatchNorm2d))
    F.cross_entropy(model(3 * torch.randn(8, 3, 32, 32) + 1), torch.arange(8) % 3).backward()
    assert [name for name, parameter in model.named_parameters() if parameter.grad is not None] == CLASSIFIER
    assert differing_tensors(model.state_dict(), before) == []  # running means, variances and counters included
