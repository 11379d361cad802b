"""resnetlab's ImageNet ResNets are torchvision's: same state_dict, same parameter count, same logits.

The suite never has torchvision, so the reference is fixtures/torchvision_resnets.json, made once from real
torchvision by fixtures/make_torchvision_fixture.py. Both sides fill every state_dict tensor with the same
deterministic_weights (fixtures/deterministic_weights.py, imported here by path) and feed the same input.

Logit tolerance: the fixture's logits are at most ~1.2 in magnitude and stored to 6 significant digits
(rounding error <= 5e-6). Re-running torchvision with 1 or 2 threads, channels_last or without mkldnn
reproduces them within 5e-6, and so does resnetlab on torch 2.13.0 against this torch 2.14.1 fixture: fp32
reordering noise is ~1e-6. An atol of 1e-4 leaves 20x headroom for other kernels, while real architecture
differences move the logits by 1.7e-3 (BatchNorm eps 1e-3 instead of 1e-5) to 1.5e-2 (resnet50 with its
stride on the first 1x1 conv, the paper's "v1").
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import resnetlab

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
FIXTURE = json.loads((FIXTURES_DIR / "torchvision_resnets.json").read_text())
MODEL_NAMES = list(FIXTURE["models"])
LOGITS_ATOL = 1e-4


def load_deterministic_module():
    # Imported by path: a `fixtures` package name could be shadowed by an installed package of that name.
    path = FIXTURES_DIR / "deterministic_weights.py"
    spec = importlib.util.spec_from_file_location("resnetlab_test_deterministic_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deterministic = load_deterministic_module()


def test_fixture_covers_every_imagenet_resnet_with_the_shared_input():
    assert MODEL_NAMES == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert FIXTURE["input"] == {
        "seed": deterministic.INPUT_SEED,
        "shape": list(deterministic.INPUT_SHAPE),
        "dtype": "float32",
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_keys_shapes_and_parameter_count_match_torchvision(name):
    expected = FIXTURE["models"][name]
    model = resnetlab.create_model(name)

    keys_shapes = [[key, list(tensor.shape)] for key, tensor in model.state_dict().items()]
    assert keys_shapes == expected["keys_shapes"]
    assert sum(parameter.numel() for parameter in model.parameters()) == expected["num_params"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_match_torchvision_with_the_same_weights(name):
    expected = torch.tensor(FIXTURE["models"][name]["logits"])
    model = resnetlab.create_model(name)
    model.load_state_dict(deterministic.deterministic_weights(model.state_dict()), strict=True)
    model.eval()

    with torch.no_grad():
        logits = model(deterministic.deterministic_input())

    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, expected, rtol=0, atol=LOGITS_ATOL)
