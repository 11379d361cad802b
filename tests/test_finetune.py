"""Starting from other weights: create_model(weights=), train --init and --freeze-backbone, --tensorboard, and
torch.hub through hubconf.py.

The torchvision files are made here from the parity fixture's key names and shapes (torchvision's own, recorded
from real torchvision in fixtures/torchvision_resnets.json), filled with its deterministic weights. The fine-tuning
on real images reads a few hundred CIFAR-10 test images from ../shared/data/cifar10 and writes them as a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from run_helpers import (
    assert_same_tensors,
    differing_tensors,
    model_weights,
    read_metrics,
    tiny_config,
    train_until,
    write_png_folder,
)
from test_torchvision_parity import FIXTURE, deterministic
from torch import nn

from resnetlab.checkpoint import CheckpointError, load_checkpoint, load_weights
from resnetlab.cli import main as cli_main
from resnetlab.data import load_dataset
from resnetlab.factory import create_model
from resnetlab.models import list_models
from resnetlab.train import prepare, resume_config, train

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
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


# --------------------------------------------------------------------------------------------------------------
# train --init, --freeze-backbone
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_classes", [1000, 2])
def test_init_loads_a_torchvision_file_into_the_run_and_records_it(tmp_path, caplog, file_classes):
    path = tmp_path / "resnet18.pth"
    state = torchvision_state_dict("resnet18", num_classes=file_classes)
    torch.save(state, path)
    write_png_folder(tmp_path / "images")  # 2 classes
    config = tiny_config(tmp_path / "out", model="resnet18", data=f"folder:{tmp_path / 'images'}", init=str(path))
    run = prepare(config, resume=False)
    loaded = run.network.state_dict()
    if file_classes == 2:
        assert_same_tensors(loaded, state)
        assert run.init["adapted"] == []
    else:
        assert_same_tensors(loaded, {**state, **fresh_classifier("resnet18", num_classes=2)})
        assert run.init["adapted"] == ["fc re-initialised for 2 classes (the file's has 1000)"]
        assert "fc re-initialised for 2 classes" in caplog.text
    assert run.init["path"] == str(path.resolve())
    assert run.init["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_freeze_backbone_changes_no_tensor_but_fc(digits_run, tmp_path):
    config = tiny_config(tmp_path / "out", iterations=10, init=str(digits_run), freeze_backbone=True)
    train(config, progress=False)
    assert differing_tensors(model_weights(config.out), model_weights(digits_run)) == CLASSIFIER


def per_channel_std(images: torch.Tensor) -> torch.Tensor:
    """(C, 1, 1): each channel's std, in [0, 1] units, of uint8 `images` less their per-pixel mean."""
    pixels = images.double() / 255
    return (pixels - pixels.mean(0)).square().mean((0, 2, 3)).sqrt().view(-1, 1, 1)


def test_per_channel_std_divides_by_the_training_images_std(digits_run, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--init", str(digits_run),
                     "--freeze-backbone", "--per-channel-std", "--iterations", "2", "--train-eval-size", "10",
                     "--out", str(out), "--quiet"]) == 0
    stored = load_checkpoint(out)["normalize"]
    assert stored["std"].shape == (1, 1, 1)
    torch.testing.assert_close(stored["std"], per_channel_std(load_dataset("digits").train.images).float())


@pytest.mark.skipif(not CIFAR_DIR.is_dir(), reason=f"the CIFAR-10 images are not in {CIFAR_DIR}")
def test_fine_tuning_resnet18_on_real_cifar_images_with_a_frozen_backbone(resnet18_file, tmp_path, caplog):
    path, state = resnet18_file
    images = tmp_path / "cifar-folder"
    write_cifar_test_images(images, per_class=20)  # 200 images: 160 train / 40 test
    out, settings = tmp_path / "out", tmp_path / "evaluation.toml"
    settings.write_text("eval_batch_size = 40\ntrain_eval_size = 16\n")
    with caplog.at_level(logging.WARNING):
        assert cli_main(["train", "--model", "resnet18", "--data", f"folder:{images}", "--init", str(path),
                         "--freeze-backbone", "--per-channel-std", "--lr", "0.01", "--iterations", "3",
                         "--batch-size", "8", "--workers", "0", "--config", str(settings), "--out", str(out),
                         "--quiet"]) == 0
    assert f"weights file {path}: fc re-initialised for 10 classes (the file's has 1000)" in caplog.text
    initial_fc = fresh_classifier("resnet18", num_classes=10)
    assert differing_tensors(model_weights(out), {**state, **initial_fc}) == CLASSIFIER  # the classifier did learn
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"] == {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "adapted": ["fc re-initialised for 10 classes (the file's has 1000)"]}
    assert summary["config"]["freeze_backbone"] is True and "160 train / 40 test" in summary["data_note"]
    crops = load_dataset(f"folder:{images}").train.normalization_images()  # what the run fitted its input to
    torch.testing.assert_close(load_checkpoint(out)["normalize"]["std"], per_channel_std(crops).float())


def write_cifar_test_images(root: Path, per_class: int) -> None:
    """The first `per_class` CIFAR-10 test images of each class as root/<class>/<index>.jpg (the stored JPEGs)."""
    with np.load(CIFAR_DIR / "cifar10-jpeg.npz") as data:
        classes, jpeg, offsets, labels = (data[key] for key in ("classes", "test_jpeg", "test_offsets",
                                                                 "test_labels"))
    for label, name in enumerate(classes):
        (root / str(name)).mkdir(parents=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            (root / str(name) / f"{index:05d}.jpg").write_bytes(jpeg[offsets[index]:offsets[index + 1]].tobytes())


def test_init_that_does_not_exist_fails_before_any_work(tmp_path, capsys):
    missing, out = tmp_path / "missing.pth", tmp_path / "run"
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--init", str(missing), "--out", str(out),
                     "--quiet"]) == 2
    assert capsys.readouterr().err == f"resnetlab train: error: weights file {missing.resolve()} does not exist\n"
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# A run started with --init: resume, TensorBoard
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def init_run(digits_run, tmp_path_factory) -> tuple[Path, Path]:
    """20 iterations from the digits run's weights, logged every iteration, also to TensorBoard: (out, init)."""
    init = tmp_path_factory.mktemp("init") / "source"
    shutil.copytree(digits_run, init)
    out = init.parent / "out"
    train(tiny_config(out, iterations=20, checkpoint_every=10, init=str(init), tensorboard=True), progress=False)
    return out, init


def test_the_tensorboard_scalars_are_the_metrics_records(init_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = init_run
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    records = read_metrics(out)
    assert set(events.Tags()["scalars"]) == {key for record in records for key in record} - {"iteration"}
    assert {"lr", "train_loss", "train_error", "test_error", "images_per_second"} <= set(events.Tags()["scalars"])
    for tag in events.Tags()["scalars"]:
        logged = [(record["iteration"], record[tag]) for record in records if tag in record]
        scalars = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in scalars] == [step for step, _ in logged]
        assert [value for _, value in scalars] == pytest.approx([value for _, value in logged], rel=1e-6)  # float32


def test_a_run_started_with_init_resumes_without_the_init_file(init_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uninterrupted, first_init = init_run
    init = tmp_path / "source"
    shutil.copytree(first_init, init)
    config = replace(resume_config(uninterrupted), out=str(tmp_path / "out"), init=str(init))
    train_until(config, 13)
    shutil.rmtree(init)  # the checkpoint holds the weights now
    summary = train(resume_config(config.out), resume=True, progress=False)

    assert_same_tensors(model_weights(config.out), model_weights(uninterrupted))
    first = json.loads((uninterrupted / "summary.json").read_text())["init"]
    assert summary["init"] == {**first, "path": str((init / "checkpoint.pt").resolve())}
    assert summary["config"]["init"] == str(init)
    # Iterations 11 to 13 ran twice; TensorBoard, like metrics.jsonl, keeps only the second time.
    events = EventAccumulator(str(tmp_path / "out" / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == list(range(1, 21))
    assert [event.value for event in events.Scalars("train_loss")] == pytest.approx(
        [record["train_loss"] for record in read_metrics(config.out)], rel=1e-6)


def test_tensorboard_without_the_package_is_a_clear_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # how an import fails without tensorboard
    out = tmp_path / "run"
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--tensorboard", "--out", str(out),
                     "--quiet"]) == 2
    assert capsys.readouterr().err == ("resnetlab train: error: --tensorboard needs the tensorboard package: pip "
                                       "install tensorboard (or pip install 'resnetlab[tensorboard]')\n")
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------------------
# torch.hub
# --------------------------------------------------------------------------------------------------------------

HUB_LOAD = """
import importlib.util, sys, torch
clone, weights, saved = sys.argv[1:]
model = torch.hub.load(clone, "resnet18", source="local", weights=weights, num_classes=10)
torch.save(model.state_dict(), saved)
print(sys.modules["resnetlab.models"].__file__)
spec = importlib.util.spec_from_file_location("hubconf", clone + "/hubconf.py")
hub = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub)
print(" ".join(name for name in dir(hub) if callable(getattr(hub, name)) and not name.startswith("_")))
"""


def test_torch_hub_loads_from_a_clone_that_is_not_installed(resnet18_file, tmp_path):
    path, state = resnet18_file
    clone = tmp_path / "clone"  # what a clone holds that torch.hub reads: hubconf.py and the sources
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "hubconf.py", clone)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", HUB_LOAD, str(clone), str(path), str(tmp_path / "saved.pt")],
                            capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    module_file, entry_points = result.stdout.splitlines()
    assert Path(module_file) == clone / "src" / "resnetlab" / "models.py"  # the clone's code, not an installed one
    assert sorted(entry_points.split()) == sorted(list_models())
    assert f"weights file {path}: fc re-initialised for 10 classes (the file's has 1000)" in result.stderr
    loaded = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert loaded["fc.weight"].shape == (10, 512)
    assert_same_tensors({key: loaded[key] for key in state if key not in CLASSIFIER},
                        {key: state[key] for key in state if key not in CLASSIFIER})
