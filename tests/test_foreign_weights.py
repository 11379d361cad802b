"""Weights from other projects: akamaster/pytorch_resnet_cifar10's `.th` files, state_dicts saved through
DataParallel/DDP or torch.compile, and files of torch's legacy (pre-zip) format, good and damaged.

The akamaster files are made here as that project saves them: its ResNet (re-implemented below from its
description: option A pads the subsampled identity with zero channels on both sides, the classifier is `linear`),
wrapped in DataParallel (`module.` keys), saved as {"state_dict", "best_prec1"} in the legacy format, without the BN
batch counters that PyTorch had not yet added. Its inputs are normalized with ImageNet's mean and std.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from run_helpers import assert_same_tensors, tiny_config
from test_bad_input import _RunsCode  # unpickling it writes its marker file
from test_formats import write_cifar10
from torch import nn

from resnetlab.checkpoint import CIFAR10_CLASSES, CheckpointError
from resnetlab.cli import main as cli_main
from resnetlab.factory import create_model, load_model
from resnetlab.inference import predict
from resnetlab.train import prepare, train

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TheirShortcut(nn.Module):
    """Their option A where the shape changes: every other pixel, planes // 4 zero channels before and after."""

    def __init__(self, planes: int):
        super().__init__()
        self.planes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.planes // 4
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, side, side))


class TheirBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential() if stride == 1 and in_planes == planes else TheirShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class TheirResNet(nn.Module):
    """Their CIFAR ResNet of depth 6n+2: conv1/bn1, layer1..3 of n blocks (16/32/64 planes), pooling, `linear`."""

    def __init__(self, depth: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for index, planes in enumerate((16, 32, 64)):
            blocks = [TheirBlock(in_planes if b == 0 else planes, planes, 2 if index and b == 0 else 1)
                      for b in range(n)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.avg_pool2d(out, out.size(3)).flatten(1))


def their_network(depth: int = 20, seed: int = 0) -> TheirResNet:
    """Random weights, with BN statistics and affine parameters far from their initial values, in eval mode."""
    torch.manual_seed(seed)
    network = TheirResNet(depth)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2)
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
    return network.eval()


def their_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as their test loader gives them: ToTensor, then ImageNet's per-channel mean and std."""
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    return (images.float() / 255 - mean) / std


def save_their_file(network: TheirResNet, path: Path) -> Path:
    state_dict = {f"module.{key}": value for key, value in network.state_dict().items()
                  if not key.endswith("num_batches_tracked")}
    torch.save({"state_dict": state_dict, "best_prec1": 91.73}, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def their_file(tmp_path_factory) -> tuple[Path, TheirResNet]:
    network = their_network()
    return save_their_file(network, tmp_path_factory.mktemp("akamaster") / "resnet20.th"), network


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------------------
# akamaster/pytorch_resnet_cifar10
# --------------------------------------------------------------------------------------------------------------


def test_their_file_is_torchs_legacy_format(their_file):
    path, _ = their_file
    assert path.read_bytes()[:2] == b"\x80\x02"  # a pickle, not a zip archive (b"PK")


@pytest.mark.parametrize("depth", [20, 32])
def test_create_model_computes_their_network(tmp_path, depth):
    network = their_network(depth, seed=depth)
    path = save_their_file(network, tmp_path / f"resnet{depth}.th")
    model = create_model(f"resnet{depth}", weights=path).eval()
    x = their_inputs(images(16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), network(x), rtol=1e-5, atol=1e-5)
        # The zero channels' side matters: appended after the identity, as resnetlab's own nets have them, the same
        # weights compute something else.
        after = create_model(f"resnet{depth}", shortcut_padding="after")
        after.load_state_dict(model.state_dict())
        assert (after.eval()(x) - network(x)).abs().max() > 0.1


def test_load_model_brings_their_normalization_and_classes(their_file):
    path, network = their_file
    model, state = load_model(path, model_name="resnet20")
    from resnetlab.data.augment import Normalize

    normalize = Normalize.from_state_dict(state["normalize"])
    batch = images(8, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(normalize(batch)), network(their_inputs(batch)), rtol=1e-5, atol=1e-5)
    assert state["classes"] == list(CIFAR10_CLASSES)
    assert state["model_kwargs"] == {"num_classes": 10, "shortcut": "A", "shortcut_padding": "both"}
    assert normalize.mean.shape == (3, 32, 32)  # the training input size, which predict resizes images to


def test_a_model_option_that_contradicts_their_network_is_refused(their_file):
    path, _ = their_file
    with pytest.raises(CheckpointError, match=re.escape(
            f"weights file {path} holds a network of akamaster/pytorch_resnet_cifar10, which needs shortcut='A', "
            "shortcut_padding='both', not shortcut_padding='after'")):
        create_model("resnet20", weights=path, shortcut_padding="after")


def test_their_file_for_another_depth_is_refused_naming_both(their_file):
    path, _ = their_file
    with pytest.raises(CheckpointError, match=re.escape(
            f"weights file {path} seems to be for resnet20 or plain20 (10 classes, 3 input channels), not resnet32")):
        create_model("resnet32", weights=path)


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """An official-layout CIFAR-10 folder of random images under CIFAR-10's class names: (root, test images,
    test labels)."""
    root = tmp_path_factory.mktemp("cifar")
    test_rows, test_labels = write_cifar10(root, writer=2, per_class=5)["test_batch"]
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES]}
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root, torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)), torch.tensor(test_labels)


def test_evaluate_reports_their_networks_error(their_file, cifar_like, capsys):
    path, network = their_file
    root, test_images, labels = cifar_like
    with torch.no_grad():
        expected = (network(their_inputs(test_images)).argmax(1) != labels).float().mean().item()
    assert 0 < expected < 1
    assert cli_main(["evaluate", str(path), "--model", "resnet20", "--data", f"cifar10:{root}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["checkpoints"]) == (50, [str(path)])
    assert result["top1_error"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_without_a_model_name_or_data_says_what_to_give(their_file, capsys):
    path, _ = their_file
    assert cli_main(["evaluate", str(path)]) != 0
    assert (f"{path} is not a resnetlab checkpoint (no format='resnetlab-checkpoint-1' entry); weights from another "
            "project load given the model they hold (--model, e.g. resnet20)") in capsys.readouterr().err
    assert cli_main(["evaluate", str(path), "--model", "resnet20"]) != 0
    assert "does not record its dataset; give --data" in capsys.readouterr().err


def test_predict_ranks_their_networks_classes(their_file, tmp_path, capsys):
    path, network = their_file
    batch = images(3, seed=2)
    paths = []
    for index, image in enumerate(batch):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    with torch.no_grad():
        expected = network(their_inputs(batch)).softmax(1)
    rankings = predict(path, paths, k=3, device="cpu", precision="fp32", model_name="resnet20")
    for ranking, scores in zip(rankings, expected, strict=True):
        top = scores.topk(3)
        assert [p.name for p in ranking] == [p.label for p in ranking] == [CIFAR10_CLASSES[i]
                                                                            for i in top.indices.tolist()]
        assert [p.probability for p in ranking] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert cli_main(["predict", str(path), str(paths[0]), "--model", "resnet20", "--top", "1",
                     "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.split() == [str(paths[0]), f"{rankings[0][0][1]:.4f}", rankings[0][0][0]]


def test_a_plain_state_dict_is_not_evaluated_as_if_its_data_were_known(tmp_path):
    path = tmp_path / "resnet20.pth"
    torch.save(create_model("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path} is not a resnetlab checkpoint, and its keys fit no other project's layout that resnetlab knows "
            "(resnetlab runs, torchvision/timm state_dicts, akamaster/pytorch_resnet_cifar10), so its classes and "
            "input normalization are unknown")):
        load_model(path, model_name="resnet20")


def test_fine_tuning_from_their_file_keeps_their_shortcuts_through_a_resume(their_file, tmp_path):
    path, _ = their_file
    config = tiny_config(tmp_path / "out", iterations=4, init=str(path))  # resnet20 on the 1-channel digits
    run = prepare(config, resume=False)
    assert run.network.layer2[0].downsample.padding == "both"
    assert run.init["adapted"] == ["conv1 summed over its RGB filters for 1 input channel"]
    train(config, progress=False)
    resumed = prepare(config, resume=True)
    assert resumed.network.layer3[0].downsample.padding == "both"
    model, state = load_model(config.out)
    assert state["model_kwargs"]["shortcut_padding"] == "both" and model.layer2[0].downsample.padding == "both"


# --------------------------------------------------------------------------------------------------------------
# Wrapper prefixes, legacy files, damaged files
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model_state_dict"])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix, wrapper):
    state = create_model("resnet20", num_classes=7).state_dict()
    content = {prefix + key: value for key, value in state.items()}
    path = tmp_path / "weights.pt"
    torch.save(content if wrapper is None else {wrapper: content, "epoch": 3}, path)
    assert_same_tensors(create_model("resnet20", num_classes=7, weights=path).state_dict(), state)


def test_a_legacy_format_state_dict_loads(tmp_path):
    state = create_model("resnet20").state_dict()
    path = tmp_path / "resnet20.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same_tensors(create_model("resnet20", weights=path).state_dict(), state)


def test_a_legacy_file_with_a_pickle_payload_is_refused_without_running_it(their_file, tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "resnet20.th"
    state_dict = torch.load(their_file[0], weights_only=True)["state_dict"]
    torch.save({"state_dict": state_dict, "payload": _RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    torch.load(path, weights_only=False)  # an ordinary load runs it ...
    assert marker.exists()
    marker.unlink()
    for load in (lambda: create_model("resnet20", weights=path), lambda: load_model(path, model_name="resnet20")):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} holds objects that are not weights; "
                                                  "refusing to unpickle them"):
            load()  # ... these do not
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["random bytes", "cut short", "cut in the header", "empty"])
def test_a_damaged_file_is_refused_as_truncated_or_corrupt_naming_it(their_file, tmp_path, damage):
    data = their_file[0].read_bytes()
    content = {"random bytes": np.random.default_rng(0).bytes(4096), "cut short": data[:-100],
               "cut in the header": data[:12], "empty": b""}[damage]
    path = tmp_path / "resnet20.th"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {path} is truncated or corrupt: ")) as error:
        create_model("resnet20", weights=path)
    if damage in ("random bytes", "empty"):
        assert str(error.value).endswith("neither a complete zip archive nor a file in torch's legacy format")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} is truncated or corrupt: ")):
        load_model(path, model_name="resnet20")
